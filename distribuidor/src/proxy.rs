//! The PROXY protocol (HAProxy's `send-proxy` and `send-proxy-v2`): behind
//! a balancer every connection comes from the balancer's address, so the
//! balancer states the client's in a header before the first byte of the
//! client's own. Read only with `TAREAS_PROXY_PROTOCOL=true`: otherwise a
//! client could claim any address (and with it another client's quota).
//!
//! The header is read exactly (v2: 16 bytes, then the length they state;
//! v1: up to its CRLF), so the bytes after it stay in the socket for the
//! connection; [`ppp`] checks and decodes it.

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest v1 header (the specification's 107 bytes).
const V1_MAX: usize = 107;

/// Why a connection did not begin with a usable PROXY header.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the connection did not begin with a PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the header at the start of `stream`; returns the client's address,
/// or `None` for a connection the balancer opened for itself (a `LOCAL`
/// health check, or an `UNKNOWN` v1 header): its own address stands.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<SocketAddr>, ProxyError> {
    let mut first = [0u8; 16];
    stream.read_exact(&mut first[..5]).await?;
    if &first[..5] == b"PROXY" {
        return read_v1(stream).await;
    }
    stream.read_exact(&mut first[5..]).await?;
    if !first.starts_with(ppp::v2::PROTOCOL_PREFIX) {
        return Err(ProxyError::Missing);
    }
    let length = usize::from(u16::from_be_bytes([first[14], first[15]]));
    let mut header = Vec::with_capacity(16 + length);
    header.extend_from_slice(&first);
    header.resize(16 + length, 0);
    stream.read_exact(&mut header[16..]).await?;
    let parsed = ppp::v2::Header::try_from(&header[..])
        .map_err(|err| ProxyError::Malformed(err.to_string()))?;
    if parsed.command == ppp::v2::Command::Local {
        return Ok(None);
    }
    Ok(match parsed.addresses {
        ppp::v2::Addresses::IPv4(ip) => Some(source(ip.source_address, ip.source_port)),
        ppp::v2::Addresses::IPv6(ip) => Some(source(ip.source_address, ip.source_port)),
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
    })
}

/// The rest of a v1 header, after its `PROXY`.
async fn read_v1<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Option<SocketAddr>, ProxyError> {
    let mut line = b"PROXY".to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(ProxyError::Malformed(
                "v1 header longer than 107 bytes".into(),
            ));
        }
        line.push(stream.read_u8().await?);
    }
    let parsed = ppp::v1::Header::try_from(&line[..])
        .map_err(|err| ProxyError::Malformed(err.to_string()))?;
    Ok(match parsed.addresses {
        ppp::v1::Addresses::Tcp4(ip) => Some(source(ip.source_address, ip.source_port)),
        ppp::v1::Addresses::Tcp6(ip) => Some(source(ip.source_address, ip.source_port)),
        ppp::v1::Addresses::Unknown => None,
    })
}

fn source(address: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(address.into(), port)
}

/// A v2 header for `client` connecting to `server`, as HAProxy's
/// `send-proxy-v2` writes it (for tests and tools).
pub fn v2_header(client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (client, server),
    )
    .build()
    .expect("a header of two socket addresses always builds")
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyError>, Vec<u8>) {
        let mut reader = bytes;
        let parsed = read_header(&mut reader).await;
        (parsed, reader.to_vec())
    }

    #[tokio::test]
    async fn a_v2_header_gives_the_client_and_leaves_its_bytes() {
        let client: SocketAddr = "203.0.113.7:40000".parse().unwrap();
        let mut bytes = v2_header(client, "10.0.0.2:8888".parse().unwrap());
        bytes.extend_from_slice(b"{\"type\":\"ping\"}\n");
        let (parsed, rest) = parse(&bytes).await;
        assert_eq!(parsed.unwrap(), Some(client));
        assert_eq!(rest, b"{\"type\":\"ping\"}\n");
    }

    #[tokio::test]
    async fn a_v1_header_gives_the_client_and_leaves_its_bytes() {
        let (parsed, rest) =
            parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 5000 8888\r\n{\"type\":\"ping\"}\n").await;
        assert_eq!(parsed.unwrap(), Some("[2001:db8::1]:5000".parse().unwrap()));
        assert_eq!(rest, b"{\"type\":\"ping\"}\n");
        let (parsed, _) = parse(b"PROXY UNKNOWN\r\n").await;
        assert_eq!(parsed.unwrap(), None);
    }

    #[tokio::test]
    async fn a_client_that_sends_its_own_bytes_first_is_refused() {
        let (parsed, _) = parse(b"{\"type\":\"ping\"}\n").await;
        assert!(matches!(parsed, Err(ProxyError::Missing)), "{parsed:?}");
        let (parsed, _) = parse(b"PROXY TCP4 1.2.3.4 nonsense\r\n").await;
        assert!(
            matches!(parsed, Err(ProxyError::Malformed(_))),
            "{parsed:?}"
        );
        let endless = [b'x'; 300];
        let mut v1 = b"PROXY ".to_vec();
        v1.extend_from_slice(&endless);
        let (parsed, _) = parse(&v1).await;
        assert!(
            matches!(parsed, Err(ProxyError::Malformed(_))),
            "{parsed:?}"
        );
    }
}
