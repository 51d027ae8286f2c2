//! One connection to a distribuidor: send requests, receive replies (one
//! JSON object per line).

use std::time::Duration;

use anyhow::{bail, Context};
use tareas_common::protocol::{Reply, Request, TaskRequest};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, Lines,
};
use tokio::net::TcpStream;

type Read = Box<dyn AsyncRead + Send + Unpin>;
type Write = Box<dyn AsyncWrite + Send + Unpin>;

/// Where a distribuidor is, the token to present to it (when it requires
/// one), and whether it speaks TLS.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: String,
    pub token: Option<String>,
    /// Connect with TLS, trusting these roots.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl Endpoint {
    /// An endpoint that presents no token (a development distribuidor).
    pub fn anonymous(addr: impl Into<String>) -> Endpoint {
        Endpoint {
            addr: addr.into(),
            token: None,
            tls: None,
        }
    }

    /// Connects and, with a token, authenticates.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let mut client = match &self.tls {
            None => Client::connect(&self.addr).await?,
            Some(config) => Client::connect_tls(&self.addr, config.clone()).await?,
        };
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
    writer: Write,
}

impl Client {
    pub async fn connect(addr: &str) -> anyhow::Result<Client> {
        Client::over(tcp(addr).await?)
    }

    /// Connects with TLS; the certificate must name the host of `addr`.
    pub async fn connect_tls(
        addr: &str,
        config: std::sync::Arc<rustls::ClientConfig>,
    ) -> anyhow::Result<Client> {
        let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .with_context(|| format!("{host} is not a host name or address"))?;
        let stream = tcp(addr).await?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(name, stream)
            .await
            .with_context(|| {
                format!("TLS with the distribuidor at {addr} failed; does it speak TLS, and does --ca (TAREAS_CA) hold the certificate that signed its own?")
            })?;
        let (reader, writer) = tokio::io::split(stream);
        Ok(Client::from_halves(Box::new(reader), Box::new(writer)))
    }

    /// A client over a stream connected already (say, from a chosen address).
    pub fn over(stream: TcpStream) -> anyhow::Result<Client> {
        let (reader, writer) = stream.into_split();
        Ok(Client::from_halves(Box::new(reader), Box::new(writer)))
    }

    fn from_halves(reader: Read, writer: Write) -> Client {
        Client {
            reader: ReplyReader {
                lines: BufReader::new(reader).lines(),
            },
            writer,
        }
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
    writer: BufWriter<Write>,
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
    lines: Lines<BufReader<Read>>,
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

async fn tcp(addr: &str) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await.with_context(|| {
        format!("cannot connect to the distribuidor at {addr}; is it running (`scripts/run`), and is DISTRIBUIDOR_ADDR right?")
    })?;
    stream.set_nodelay(true)?;
    Ok(stream)
}
