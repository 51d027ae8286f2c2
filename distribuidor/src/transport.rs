//! The bytes under a client connection: plain TCP, or TLS over it
//! (`TAREAS_TLS_CERT`, `TAREAS_TLS_KEY`). The connection reads by
//! readiness (it takes a read buffer from the shared pool only once bytes
//! are there), which [`Reader`] offers for both; decrypting needs a buffer
//! of its own, so a TLS connection holds one record's worth while it waits.

use std::io;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, ReadHalf};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// The most decrypted bytes a TLS connection holds before the connection
/// takes them: one TLS record. Held while it waits, outside the shared pool
/// (docs/security.md counts it with rustls' own buffers).
const TLS_CHUNK: usize = 16 * 1024;

/// The write side: written whole lines, then flushed.
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// The read side of a client connection.
pub enum Reader {
    /// Plain TCP: readiness straight from the socket.
    Plain(OwnedReadHalf),
    /// Decrypting needs a buffer: `staged` holds what was decrypted until
    /// the connection takes it (and nothing while the client is silent).
    Tls {
        stream: ReadHalf<TlsStream<TcpStream>>,
        staged: BytesMut,
        eof: bool,
    },
}

/// A plain connection's two halves.
pub fn plain(stream: TcpStream) -> (Reader, Writer) {
    let (reader, writer) = stream.into_split();
    (Reader::Plain(reader), Box::new(writer))
}

/// A TLS connection's two halves (after its handshake).
pub fn tls(stream: TlsStream<TcpStream>) -> (Reader, Writer) {
    let (reader, writer) = tokio::io::split(stream);
    let reader = Reader::Tls {
        stream: reader,
        staged: BytesMut::new(),
        eof: false,
    };
    (reader, Box::new(writer))
}

impl Reader {
    /// Waits until a read would find bytes or the end. Cancel-safe: no
    /// byte is lost if the wait is dropped.
    pub async fn readable(&mut self) -> io::Result<()> {
        match self {
            Reader::Plain(reader) => reader.readable().await,
            Reader::Tls {
                stream,
                staged,
                eof,
            } => {
                if !staged.is_empty() || *eof {
                    return Ok(());
                }
                staged.reserve(TLS_CHUNK);
                if stream.read_buf(staged).await? == 0 {
                    *eof = true;
                }
                Ok(())
            }
        }
    }

    /// Moves the bytes that are there into `buffer` without waiting; `Ok(0)`
    /// at the end of the stream, `WouldBlock` when there is nothing yet.
    pub fn try_read_buf(&mut self, buffer: &mut BytesMut) -> io::Result<usize> {
        match self {
            Reader::Plain(reader) => reader.try_read_buf(buffer),
            Reader::Tls { staged, eof, .. } => {
                if staged.is_empty() {
                    return match eof {
                        true => Ok(0),
                        false => Err(io::ErrorKind::WouldBlock.into()),
                    };
                }
                // Within the room the connection made (at least a byte).
                let room = (buffer.capacity() - buffer.len()).max(1);
                let taken = staged.len().min(room);
                buffer.extend_from_slice(&staged[..taken]);
                staged.advance(taken);
                if staged.is_empty() {
                    *staged = BytesMut::new();
                }
                Ok(taken)
            }
        }
    }

    /// Reads and discards (a closing connection lingering for its client).
    pub async fn read(&mut self, sink: &mut [u8]) -> io::Result<usize> {
        match self {
            Reader::Plain(reader) => reader.read(sink).await,
            Reader::Tls { stream, staged, .. } => {
                staged.clear();
                stream.read(sink).await
            }
        }
    }
}
