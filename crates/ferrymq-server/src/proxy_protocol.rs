//! The PROXY protocol (HAProxy's, v1 text and v2 binary) in front of a listener's
//! connections: a load balancer that terminates nothing but hides the client's address
//! (AWS NLB, HAProxy `send-proxy-v2`, Envoy) sends one header first, and the client's
//! address in it is the connection's address for everything after: per-address limits and
//! bans, the client view, the audit log and logs.
//!
//! Only peers in `listeners.trusted_proxies` may connect to such a listener (anyone else could
//! claim any address); a connection from elsewhere, or one whose first bytes are not a whole
//! valid header within the connect timeout, is closed before anything else is read. A header
//! that names no address (v2 `LOCAL`, the balancer's own health check; v1 `UNKNOWN`; a UNIX
//! socket) leaves the proxy's.
//!
//! The header is read exactly, byte for byte where it has no length (v1, at most 107 bytes),
//! so that nothing after it (a CONNECT, a TLS ClientHello, an HTTP upgrade) is consumed. The
//! parsing is the `ppp` crate's.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt};

/// v1 headers are at most 107 bytes, `\r\n` included.
const V1_MAX: usize = 107;
/// The v2 signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// v2 address and TLV bytes accepted: addresses take at most 216 (UNIX), and load balancers
/// add a few small TLVs; more is refused rather than buffered for an unauthenticated peer.
const V2_MAX_PAYLOAD: usize = 1024;

/// Who may send PROXY headers (`listeners.trusted_proxies`).
#[derive(Debug)]
pub(crate) struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub(crate) fn new(nets: Vec<IpNet>) -> TrustedProxies {
        TrustedProxies(nets)
    }

    /// Whether `ip` (an IPv4-mapped IPv6 address counts as its IPv4 one) is a trusted proxy.
    pub(crate) fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// `"10.0.0.0/8"`, `"fd00::/8"` or a single address (`"192.0.2.1"`, a /32 or /128). An
/// IPv4-mapped block (`"::ffff:10.0.0.1"`, `/96` or longer) is its IPv4 block, since
/// [`TrustedProxies::trusts`] sees mapped peers as IPv4.
pub(crate) fn parse_net(text: &str) -> Result<IpNet, String> {
    let net = match text.parse::<IpNet>() {
        Ok(net) => net.trunc(),
        Err(_) => text
            .parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("{text:?} is not an IP address or a CIDR block (10.0.0.0/8)"))?,
    };
    if let IpNet::V6(v6) = net {
        if let (Some(v4), Some(len)) = (v6.addr().to_ipv4_mapped(), v6.prefix_len().checked_sub(96))
        {
            return ipnet::Ipv4Net::new(v4, len)
                .map(IpNet::V4)
                .map_err(|e| format!("{text:?}: {e}"));
        }
    }
    Ok(net)
}

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HeaderError {
    #[error("connection closed or failed before a whole PROXY header: {0}")]
    Io(#[from] std::io::Error),
    #[error("the connection does not start with a PROXY header")]
    Missing,
    #[error("a v1 PROXY header longer than 107 bytes")]
    TooLong,
    #[error("a v2 PROXY header with {0} bytes of addresses and TLVs (at most 1024)")]
    TooLarge(usize),
    #[error("an invalid PROXY header: {0}")]
    Invalid(String),
}

/// Reads one PROXY header off `stream`, exactly. The client's address, or `None` when the
/// header names none (the peer's own address stands).
pub(crate) async fn read_header<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<Option<SocketAddr>, HeaderError> {
    // Both versions are told apart by their first 6 bytes ("PROXY " or the signature's).
    let mut head = [0u8; 16];
    stream.read_exact(&mut head[..6]).await?;
    if &head[..6] == b"PROXY " {
        let mut line = Vec::with_capacity(V1_MAX);
        line.extend_from_slice(&head[..6]);
        while !line.ends_with(b"\r\n") {
            if line.len() == V1_MAX {
                return Err(HeaderError::TooLong);
            }
            // A bare `\n` ends the line too: refused now rather than read on into the
            // CONNECT until the connect timeout.
            if line.ends_with(b"\n") {
                return Err(HeaderError::Invalid("a v1 line not ended by \\r\\n".into()));
            }
            line.push(stream.read_u8().await?);
        }
        let header = ppp::v1::Header::try_from(&line[..])
            .map_err(|e| HeaderError::Invalid(e.to_string()))?;
        return Ok(match header.addresses {
            ppp::v1::Addresses::Tcp4(a) => Some((a.source_address, a.source_port).into()),
            ppp::v1::Addresses::Tcp6(a) => Some((a.source_address, a.source_port).into()),
            ppp::v1::Addresses::Unknown => None,
        });
    }
    if head[..6] != V2_SIGNATURE[..6] {
        return Err(HeaderError::Missing);
    }
    stream.read_exact(&mut head[6..]).await?;
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if len > V2_MAX_PAYLOAD {
        return Err(HeaderError::TooLarge(len));
    }
    let mut whole = Vec::with_capacity(16 + len);
    whole.extend_from_slice(&head);
    whole.resize(16 + len, 0);
    stream.read_exact(&mut whole[16..]).await?;
    let header =
        ppp::v2::Header::try_from(&whole[..]).map_err(|e| HeaderError::Invalid(e.to_string()))?;
    if header.command == ppp::v2::Command::Local {
        return Ok(None);
    }
    Ok(match header.addresses {
        ppp::v2::Addresses::IPv4(a) => Some((a.source_address, a.source_port).into()),
        ppp::v2::Addresses::IPv6(a) => Some((a.source_address, a.source_port).into()),
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> (Result<Option<SocketAddr>, HeaderError>, Vec<u8>) {
        let mut stream = bytes;
        let result = read_header(&mut stream).await;
        (result, stream.to_vec())
    }

    fn v2(source: &str, destination: &str, tlv: Option<&[u8]>) -> Vec<u8> {
        let addresses = (
            source.parse::<SocketAddr>().unwrap(),
            destination.parse::<SocketAddr>().unwrap(),
        );
        let mut b = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            addresses,
        );
        if let Some(value) = tlv {
            b = b.write_tlv(ppp::v2::Type::NoOp, value).unwrap();
        }
        b.build().unwrap()
    }

    #[tokio::test]
    async fn a_v1_header_gives_the_client_address_and_leaves_what_follows() {
        let (r, rest) = read(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 1883\r\n\x10\x0c").await;
        assert_eq!(r.unwrap(), Some("203.0.113.7:51234".parse().unwrap()));
        assert_eq!(
            rest, b"\x10\x0c",
            "the CONNECT's first bytes are still there"
        );
        let (r, _) = read(b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 1883\r\n").await;
        assert_eq!(r.unwrap(), Some("[2001:db8::7]:51234".parse().unwrap()));
        let (r, rest) = read(b"PROXY UNKNOWN\r\nX").await;
        assert_eq!(r.unwrap(), None);
        assert_eq!(rest, b"X");
    }

    #[tokio::test]
    async fn a_v2_header_gives_the_client_address_and_leaves_what_follows() {
        let mut bytes = v2("198.51.100.9:40000", "10.0.0.1:8883", Some(&[0; 40]));
        bytes.extend_from_slice(b"\x16\x03\x01");
        let (r, rest) = read(&bytes).await;
        assert_eq!(r.unwrap(), Some("198.51.100.9:40000".parse().unwrap()));
        assert_eq!(rest, b"\x16\x03\x01", "the TLS ClientHello is still there");
        let bytes = v2("[2001:db8::9]:40000", "[2001:db8::1]:1883", None);
        assert_eq!(
            read(&bytes).await.0.unwrap(),
            Some("[2001:db8::9]:40000".parse().unwrap())
        );
        // LOCAL: the balancer's own health check.
        let local = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::Protocol::Unspecified,
            ppp::v2::Addresses::Unspecified,
        )
        .build()
        .unwrap();
        assert_eq!(read(&local).await.0.unwrap(), None);
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        // A client that skipped the balancer: a CONNECT straight away.
        assert!(matches!(
            read(b"\x10\x0c\x00\x04MQTT\x04\x02").await.0,
            Err(HeaderError::Missing)
        ));
        assert!(matches!(
            read(b"PROXY TCP4 nonsense\r\n").await.0,
            Err(HeaderError::Invalid(_))
        ));
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert!(matches!(read(&long).await.0, Err(HeaderError::TooLong)));
        assert!(matches!(
            read(b"PROXY TCP4 1.2.3.4").await.0,
            Err(HeaderError::Io(_))
        ));
        let mut big = v2("198.51.100.9:40000", "10.0.0.1:1883", None);
        big[14..16].copy_from_slice(&2000u16.to_be_bytes());
        assert!(matches!(
            read(&big).await.0,
            Err(HeaderError::TooLarge(2000))
        ));
        let mut bad_version = v2("198.51.100.9:40000", "10.0.0.1:1883", None);
        bad_version[12] = 0x31;
        assert!(matches!(
            read(&bad_version).await.0,
            Err(HeaderError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn v2_unix_short_and_tlv_headers() {
        // AF_UNIX (216 bytes of paths): no client address, the proxy's stands.
        let mut unix = V2_SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31]);
        unix.extend_from_slice(&216u16.to_be_bytes());
        unix.extend_from_slice(&[0; 216]);
        unix.push(0x10);
        let (r, rest) = read(&unix).await;
        assert_eq!(r.unwrap(), None);
        assert_eq!(rest, b"\x10");
        // IPv4 claimed with 4 bytes of addresses instead of 12: refused, not read past.
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4, 0x10]);
        let (r, rest) = read(&short).await;
        assert!(matches!(r, Err(HeaderError::Invalid(_))), "{r:?}");
        assert_eq!(rest, b"\x10");
        // The largest length field (65535) is refused before anything is allocated.
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(
            read(&huge).await.0,
            Err(HeaderError::TooLarge(65535))
        ));
    }

    #[tokio::test]
    async fn a_v1_line_ended_by_a_bare_newline_is_refused_at_once() {
        // Not read on to 107 bytes (into the CONNECT), waiting for a `\r\n` that never comes.
        let (r, rest) = read(b"PROXY TCP4 192.0.2.5 10.0.0.1 40000 1883\n\x10\x0c").await;
        assert!(matches!(r, Err(HeaderError::Invalid(_))), "{r:?}");
        assert_eq!(rest, b"\x10\x0c");
        let (r, _) = read(b"PROXY TCP4 192.0.2.5 10.0.0.1 40000 1883\r\r\n").await;
        assert!(matches!(r, Err(HeaderError::Invalid(_))), "{r:?}");
    }

    /// A trusted address written IPv4-mapped (`::ffff:10.0.0.1`, as a dual-stack socket shows
    /// it) matches the balancer however its address comes in.
    #[test]
    fn a_mapped_trusted_address_matches() {
        let t = TrustedProxies::new(vec![
            parse_net("::ffff:10.0.0.1").unwrap(),
            parse_net("::ffff:192.0.2.0/120").unwrap(),
        ]);
        for ok in [
            "10.0.0.1",
            "::ffff:10.0.0.1",
            "192.0.2.9",
            "::ffff:192.0.2.9",
        ] {
            assert!(t.trusts(ok.parse().unwrap()), "{ok}");
        }
        for no in ["10.0.0.2", "192.0.3.1"] {
            assert!(!t.trusts(no.parse().unwrap()), "{no}");
        }
    }

    #[test]
    fn trusted_proxies_match_by_block_and_mapped_addresses() {
        let t = TrustedProxies::new(
            ["10.0.0.0/8", "192.0.2.1", "fd00::/8"]
                .iter()
                .map(|n| parse_net(n).unwrap())
                .collect(),
        );
        for ok in ["10.1.2.3", "192.0.2.1", "fd12::1", "::ffff:10.9.9.9"] {
            assert!(t.trusts(ok.parse().unwrap()), "{ok}");
        }
        for no in ["11.0.0.1", "192.0.2.2", "fe80::1", "127.0.0.1"] {
            assert!(!t.trusts(no.parse().unwrap()), "{no}");
        }
        assert!(parse_net("10.0.0.0/33").is_err());
        assert!(parse_net("example.com").is_err());
    }
}
