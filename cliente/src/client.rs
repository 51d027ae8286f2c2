//! One connection to a distribuidor: send requests, receive replies (one
//! JSON object per line).

use std::time::Duration;

use anyhow::{bail, Context};
use tareas_common::protocol::{Reply, Request, TaskRequest};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter, Lines};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Where a distribuidor is, and the token to present to it (when it
/// requires one).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: String,
    pub token: Option<String>,
}

impl Endpoint {
    /// An endpoint that presents no token (a development distribuidor).
    pub fn anonymous(addr: impl Into<String>) -> Endpoint {
        Endpoint {
            addr: addr.into(),
            token: None,
        }
    }

    /// Connects and, with a token, authenticates.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let mut client = Client::connect(&self.addr).await?;
        if let Some(token) = &self.token {
            client
                .send(&Request::Auth {
                    token: token.clone(),
                })
                .await?;
            match client.recv_within(Duration::from_secs(30)).await? {
                Reply::Auth { ok: true, .. } => {}
                Reply::Error(error) => bail!(
                    "the distribuidor refused the token: {} (check TAREAS_TOKEN or --token)",
                    error.message
                ),
                other => bail!("unexpected answer to auth: {other:?}"),
            }
        }
        Ok(client)
    }
}

/// A client connection.
pub struct Client {
    reader: ReplyReader,
    writer: OwnedWriteHalf,
}

impl Client {
    pub async fn connect(addr: &str) -> anyhow::Result<Client> {
        let stream = TcpStream::connect(addr).await.with_context(|| {
            format!("cannot connect to the distribuidor at {addr}; is it running (`scripts/run`), and is DISTRIBUIDOR_ADDR right?")
        })?;
        Client::over(stream)
    }

    /// A client over a stream connected already (say, from a chosen address).
    pub fn over(stream: TcpStream) -> anyhow::Result<Client> {
        stream.set_nodelay(true)?;
        let (reader, writer) = stream.into_split();
        Ok(Client {
            reader: ReplyReader {
                lines: BufReader::new(reader).lines(),
            },
            writer,
        })
    }

    /// Sends one request, newline-terminated.
    pub async fn send(&mut self, request: &Request) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        self.send_raw(&line).await
    }

    /// Sends raw bytes, as they are (for tests of malformed input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.writer
            .write_all(bytes)
            .await
            .context("the distribuidor closed the connection")?;
        Ok(())
    }

    /// Submits a task.
    pub async fn submit(&mut self, task: TaskRequest) -> anyhow::Result<()> {
        self.send(&Request::Task(task)).await
    }

    /// The next reply; `None` when the distribuidor closed the connection.
    pub async fn recv(&mut self) -> anyhow::Result<Option<Reply>> {
        self.reader.recv().await
    }

    /// The next reply within `limit`; an error on timeout or closed connection.
    pub async fn recv_within(&mut self, limit: Duration) -> anyhow::Result<Reply> {
        match tokio::time::timeout(limit, self.recv()).await {
            Err(_) => bail!("no reply from the distribuidor within {limit:?}"),
            Ok(Ok(None)) => bail!("the distribuidor closed the connection"),
            Ok(Ok(Some(reply))) => Ok(reply),
            Ok(Err(err)) => Err(err),
        }
    }

    /// Splits into a writer and a reader that can be used from two tasks.
    pub fn into_split(self) -> (RequestWriter, ReplyReader) {
        (
            RequestWriter {
                writer: BufWriter::new(self.writer),
            },
            self.reader,
        )
    }

    /// Closes the sending half (the distribuidor then finishes and closes).
    pub async fn finish_sending(&mut self) -> anyhow::Result<()> {
        self.writer.shutdown().await?;
        Ok(())
    }
}

/// The sending half of a split [`Client`]; buffers until [`RequestWriter::flush`].
pub struct RequestWriter {
    writer: BufWriter<OwnedWriteHalf>,
}

impl RequestWriter {
    /// Buffers one request, newline-terminated.
    pub async fn send(&mut self, request: &Request) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .await
            .context("the distribuidor closed the connection")?;
        Ok(())
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.writer
            .flush()
            .await
            .context("the distribuidor closed the connection")?;
        Ok(())
    }
}

/// The receiving half of a split [`Client`].
pub struct ReplyReader {
    lines: Lines<BufReader<OwnedReadHalf>>,
}

impl ReplyReader {
    /// The next reply; `None` when the distribuidor closed the connection.
    pub async fn recv(&mut self) -> anyhow::Result<Option<Reply>> {
        let Some(line) = self
            .lines
            .next_line()
            .await
            .context("reading from the distribuidor")?
        else {
            return Ok(None);
        };
        let reply = serde_json::from_str(&line)
            .with_context(|| format!("unreadable reply from the distribuidor: {line}"))?;
        Ok(Some(reply))
    }
}
