//! `listeners.proxy_protocol`: connections from a trusted load balancer start with a PROXY
//! header (v1 or v2), and the client address in it is the one the broker knows the client
//! by (the client view, per-address limits); a connection without one, or from a peer that
//! is not a trusted proxy, is closed before its CONNECT is read.

use ferrymq_mqtt::{Packet, ProtocolVersion, ReasonCode};
use ferrymq_server::{Config, Server};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::common::*;

fn proxied_config(trusted: &str) -> Config {
    let mut c = test_config();
    // A proxied listener's clients are remote: anonymous ones only when allowed.
    c.auth.allow_anonymous = Some(true);
    c.listeners.proxy_protocol = vec!["mqtt".into()];
    c.listeners.trusted_proxies = vec![trusted.into()];
    c
}

fn v2_header(client: &str) -> Vec<u8> {
    let addresses = (
        client.parse::<std::net::SocketAddr>().unwrap(),
        "10.0.0.1:1883".parse::<std::net::SocketAddr>().unwrap(),
    );
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        addresses,
    )
    .build()
    .unwrap()
}

/// Connects through the "balancer": `header`, then CONNECT in the same write (as a client's
/// first bytes follow the balancer's header); the CONNACK's reason, or None when closed.
async fn connect_behind(server: &Server, header: &[u8], id: &str) -> (Raw, Option<ReasonCode>) {
    let mut stream = TcpStream::connect(server.mqtt_addr()).await.unwrap();
    let mut bytes = bytes::BytesMut::from(header);
    let connect = connect_packet(id, ProtocolVersion::V5);
    ferrymq_mqtt::encode(&connect, ProtocolVersion::V5, &mut bytes).unwrap();
    stream.write_all(&bytes).await.unwrap();
    let mut raw = Raw::from_stream(stream, ProtocolVersion::V5);
    let reason = match raw.recv().await {
        Some(Packet::ConnAck(a)) => Some(a.reason),
        None => None,
        Some(other) => panic!("{id}: {other:?}"),
    };
    (raw, reason)
}

async fn address_of(server: &Server, id: &str) -> String {
    let (status, body) = http_get(server, &format!("/api/v1/clients/{id}")).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["address"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_client_behind_a_proxy_is_known_by_the_address_in_its_header() {
    let server = start_with(proxied_config("127.0.0.1")).await;
    let (_v2, reason) = connect_behind(&server, &v2_header("203.0.113.7:50000"), "via-v2").await;
    assert_eq!(reason, Some(ReasonCode::Success));
    assert_eq!(address_of(&server, "via-v2").await, "203.0.113.7:50000");
    let v1 = b"PROXY TCP6 2001:db8::7 2001:db8::1 40001 1883\r\n";
    let (_v1, reason) = connect_behind(&server, v1, "via-v1").await;
    assert_eq!(reason, Some(ReasonCode::Success));
    assert_eq!(address_of(&server, "via-v1").await, "[2001:db8::7]:40001");
    // The balancer's own health check: LOCAL, the proxy's address stands.
    let local = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Local,
        ppp::v2::Protocol::Unspecified,
        ppp::v2::Addresses::Unspecified,
    )
    .build()
    .unwrap();
    let (_local, reason) = connect_behind(&server, &local, "via-local").await;
    assert_eq!(reason, Some(ReasonCode::Success));
    assert!(address_of(&server, "via-local")
        .await
        .starts_with("127.0.0.1:"));
}

#[tokio::test]
async fn a_connection_without_a_header_or_from_an_untrusted_peer_is_closed() {
    let server = start_with(proxied_config("127.0.0.1")).await;
    // Straight to the broker, skipping the balancer: the CONNECT is not a PROXY header.
    let (_raw, reason) = connect_behind(&server, b"", "direct").await;
    assert_eq!(reason, None, "closed without a CONNACK");
    let (_raw, reason) = connect_behind(&server, b"PROXY TCP4 bad\r\n", "garbled").await;
    assert_eq!(reason, None);

    // Only 10.0.0.0/8 may send headers: a loopback peer is closed whatever it claims.
    let server = start_with(proxied_config("10.0.0.0/8")).await;
    let (_raw, reason) = connect_behind(&server, &v2_header("203.0.113.7:50000"), "x").await;
    assert_eq!(reason, None);
    assert!(
        metric(
            &server,
            "ferrymq_listener_handshake_failures_total{listener=\"mqtt\"}"
        )
        .await
            >= 1
    );
}

/// Per-address limits count the client's address, not the balancer's: every connection
/// here comes from 127.0.0.1, and with one connection per address two clients get in and a
/// second from the same client address is refused.
#[tokio::test]
async fn per_address_limits_count_the_client_address() {
    let mut c = proxied_config("127.0.0.1");
    c.limits.max_connections_per_address = 1;
    let server = start_with(c).await;
    let (a, first) = connect_behind(&server, &v2_header("198.51.100.1:1000"), "a").await;
    let (_b, other) = connect_behind(&server, &v2_header("198.51.100.2:1000"), "b").await;
    let (mut c, again) = connect_behind(&server, &v2_header("198.51.100.1:2000"), "c").await;
    assert_eq!(first, Some(ReasonCode::Success));
    assert_eq!(other, Some(ReasonCode::Success));
    assert_eq!(again, Some(ReasonCode::ServerBusy));
    // Its count is given back when it closes (and the refused one's too): the address may
    // connect again.
    drop(a);
    let _ = c.until_closed().await;
    eventually("the client address's count given back", || async {
        connect_behind(&server, &v2_header("198.51.100.1:3000"), "d")
            .await
            .1
            == Some(ReasonCode::Success)
    })
    .await;
}

#[test]
fn proxy_settings_are_checked() {
    let mut c = test_config();
    c.listeners.proxy_protocol = vec!["mqtt".into()];
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("listeners.trusted_proxies"), "{e}");
    c.listeners.trusted_proxies = vec!["10.0.0.0/40".into()];
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.contains("listeners.trusted_proxies") && e.contains("10.0.0.0/40"),
        "{e}"
    );
    c.listeners.trusted_proxies = vec!["10.0.0.0/8".into()];
    c.listeners.proxy_protocol = vec!["mqtt".into(), "http".into()];
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.contains("listeners.proxy_protocol") && e.contains("http"),
        "{e}"
    );
    c.listeners.proxy_protocol = vec!["mqtts".into()];
    let e = c.validate().unwrap_err().to_string();
    assert!(e.contains("names mqtts, which is off"), "{e}");
    c.listeners.proxy_protocol = vec!["mqtt".into()];
    c.validate().unwrap();
}

/// The header comes before TLS and the WebSocket upgrade: a `wss` client behind the
/// balancer gets through both and is known by its own address.
#[tokio::test]
async fn the_header_comes_before_tls_and_websocket() {
    use crate::edge::{self, Ca, Role, Wire};
    use ferrymq_server::ListenerKind;
    let ca = Ca::new("ferrymq proxy test CA");
    let dir = edge::cert_dir("proxied-wss");
    let mut c = crate::tls::tls_config(&dir, &ca.issue(Role::Server, 1), None, false);
    c.listeners.wss = Some("127.0.0.1:0".parse().unwrap());
    c.listeners.proxy_protocol = vec!["wss".into()];
    c.listeners.trusted_proxies = vec!["127.0.0.1".into()];
    c.auth.allow_anonymous = Some(true);
    let server = start_with(c).await;
    let addr = server.listener_addr(ListenerKind::Wss).unwrap();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&v2_header("192.0.2.77:44444")).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio_rustls::TlsConnector::from(edge::client_config(&ca.pem, None))
        .connect(name, tcp)
        .await
        .unwrap();
    let url = format!("wss://127.0.0.1:{}/mqtt", addr.port());
    let (ws, _) = edge::ws_connect(tls, &url, Some("mqtt")).await.unwrap();
    let _client = Wire::connected(ws, "proxied-wss", ProtocolVersion::V5).await;
    assert_eq!(address_of(&server, "proxied-wss").await, "192.0.2.77:44444");
}

/// Like [`connect_behind`], with a user name and password in the CONNECT.
async fn login_behind(server: &Server, client: &str, password: &[u8]) -> Option<ReasonCode> {
    let mut stream = TcpStream::connect(server.mqtt_addr()).await.unwrap();
    let mut bytes = bytes::BytesMut::from(&v2_header(client)[..]);
    let Packet::Connect(mut connect) = connect_packet("login", ProtocolVersion::V5) else {
        unreachable!()
    };
    connect.username = Some("alice".into());
    connect.password = Some(bytes::Bytes::copy_from_slice(password));
    let connect = Packet::Connect(connect);
    ferrymq_mqtt::encode(&connect, ProtocolVersion::V5, &mut bytes).unwrap();
    stream.write_all(&bytes).await.unwrap();
    match Raw::from_stream(stream, ProtocolVersion::V5).recv().await {
        Some(Packet::ConnAck(a)) => Some(a.reason),
        None => None,
        Some(other) => panic!("{client}: {other:?}"),
    }
}

/// Two clients behind one balancer: the one guessing passwords bans its own address, and
/// the other still gets in (before PROXY support, both were the balancer's address).
#[tokio::test]
async fn a_password_guesser_behind_the_proxy_bans_only_itself() {
    let dir = fresh_data_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let passwd = dir.join("passwd");
    let hash = ferrymq_server::password_file::hash_password(b"wonderland").unwrap();
    std::fs::write(&passwd, format!("alice:{hash}\n")).unwrap();
    let mut c = proxied_config("127.0.0.1");
    c.auth.password_file = Some(passwd);
    c.auth.max_failures = 3;
    let audit = dir.join("audit.log");
    c.audit.file = Some(audit.clone());
    let server = start_with(c).await;
    let guesser = "198.51.100.66:1000";
    for _ in 0..3 {
        let r = login_behind(&server, guesser, b"guess").await;
        assert_eq!(r, Some(ReasonCode::BadUserNameOrPassword));
    }
    let r = login_behind(&server, guesser, b"wonderland").await;
    assert_eq!(
        r,
        Some(ReasonCode::Banned),
        "the guesser's address is banned"
    );
    let r = login_behind(&server, "198.51.100.67:1000", b"wonderland").await;
    assert_eq!(r, Some(ReasonCode::Success), "its neighbour is not");
    // The audit log names each by its own address, never the balancer's.
    server.shutdown().await;
    let log = std::fs::read_to_string(&audit).unwrap();
    let lines = |what: &str| {
        log.lines()
            .filter(|l| l.contains(what))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let failures = lines("auth_failure");
    assert!(!failures.is_empty(), "{log}");
    assert!(
        failures.iter().all(|l| l.contains("198.51.100.66")),
        "{log}"
    );
    assert!(
        lines("198.51.100.67")
            .iter()
            .any(|l| l.contains("\"connect")),
        "{log}"
    );
    assert!(!log.contains("127.0.0.1"), "{log}");
}

/// A connection still reading its PROXY header counts as open, as one in its TLS handshake
/// does: `max_connections` and the open gauges see it, and it is uncounted when the connect
/// timeout closes it. Before, a balancer's stalled connections were invisible to both.
#[tokio::test]
async fn a_connection_reading_its_header_counts_as_open_until_it_ends() {
    let mut c = proxied_config("127.0.0.1");
    c.limits.max_connections = 2;
    c.limits.connect_timeout_secs = 1;
    let server = start_with(c).await;
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(server.mqtt_addr()).await.unwrap();
        s.write_all(b"PROXY TCP4 198.51.").await.unwrap();
        stalled.push(s);
    }
    let open = || async { metric(&server, "ferrymq_connections_open ").await };
    eventually("the stalled headers count as open", || async {
        open().await == 2
    })
    .await;
    let (_raw, busy) = connect_behind(&server, &v2_header("203.0.113.1:1"), "third").await;
    assert_eq!(busy, Some(ReasonCode::ServerBusy), "over max_connections");
    // The connect timeout closes the stalled ones and uncounts them.
    for mut s in stalled {
        let mut b = [0u8; 1];
        let read = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut s, &mut b));
        assert!(
            matches!(read.await, Ok(Ok(0) | Err(_))),
            "closed by the broker"
        );
    }
    eventually("every count back to zero", || async { open().await == 0 }).await;
    let (_raw, ok) = connect_behind(&server, &v2_header("203.0.113.1:2"), "after").await;
    assert_eq!(ok, Some(ReasonCode::Success));
}

/// A v1 header sent a byte at a time and the CONNECT after it: nothing of either is lost.
/// A v1 line ended by a bare `\n` is not a header.
#[tokio::test]
async fn a_v1_header_byte_by_byte_then_the_connect() {
    let server = start_with(proxied_config("127.0.0.1")).await;
    let mut s = TcpStream::connect(server.mqtt_addr()).await.unwrap();
    s.set_nodelay(true).unwrap();
    for b in b"PROXY TCP4 192.0.2.5 10.0.0.1 40000 1883\r\n" {
        s.write_all(&[*b]).await.unwrap();
        s.flush().await.unwrap();
    }
    let mut raw = Raw::from_stream(s, ProtocolVersion::V5);
    raw.send(&connect_packet("slow-v1", ProtocolVersion::V5))
        .await;
    assert!(
        matches!(raw.recv().await, Some(Packet::ConnAck(a)) if a.reason == ReasonCode::Success)
    );
    assert_eq!(address_of(&server, "slow-v1").await, "192.0.2.5:40000");
    let lf = b"PROXY TCP4 192.0.2.5 10.0.0.1 40000 1883\n";
    let (_raw, reason) = connect_behind(&server, lf, "lf-only").await;
    assert_eq!(reason, None, "closed without a CONNACK");
}

/// `listeners.proxy_protocol` and `listeners.trusted_proxies` are read at start: a reload
/// that changes them reports them as waiting for a restart, and the listener keeps its
/// running trust (a peer the new list drops still gets in).
#[tokio::test]
async fn a_reload_of_the_proxy_keys_waits_for_a_restart() {
    let config = proxied_config("127.0.0.1");
    let (server, next) = crate::common::start_reloadable(config.clone()).await;
    let mut changed = config;
    changed.listeners.trusted_proxies = vec!["10.0.0.0/8".into()];
    changed.listeners.proxy_protocol = vec!["mqtt".into(), "ws".into()];
    *next.lock().unwrap() = changed;
    let report = server.reload(ferrymq_server::Trigger::Api).await.unwrap();
    let mut keys = report.restart_required.clone();
    keys.sort();
    assert_eq!(
        keys,
        ["listeners.proxy_protocol", "listeners.trusted_proxies"],
        "{report:?}"
    );
    let (_raw, reason) = connect_behind(&server, &v2_header("203.0.113.5:5"), "kept").await;
    assert_eq!(reason, Some(ReasonCode::Success));
}

/// On a dual-stack listener an IPv4 balancer's address comes in IPv4-mapped
/// (`::ffff:127.0.0.1`); it is trusted by its IPv4 entry.
#[tokio::test]
async fn a_dual_stack_listener_trusts_a_mapped_balancer() {
    let mut c = proxied_config("127.0.0.1");
    c.listeners.mqtt = "[::]:0".parse::<std::net::SocketAddr>().unwrap().into();
    let Ok(server) = Server::start(c).await else {
        eprintln!("no IPv6 here: skipped");
        return;
    };
    let port = server.mqtt_addr().port();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut bytes = bytes::BytesMut::from(&v2_header("203.0.113.8:8")[..]);
    let connect = connect_packet("mapped", ProtocolVersion::V5);
    ferrymq_mqtt::encode(&connect, ProtocolVersion::V5, &mut bytes).unwrap();
    stream.write_all(&bytes).await.unwrap();
    let mut raw = Raw::from_stream(stream, ProtocolVersion::V5);
    match raw.recv().await {
        Some(Packet::ConnAck(a)) => assert_eq!(a.reason, ReasonCode::Success),
        other => panic!("{other:?}"),
    }
    assert_eq!(address_of(&server, "mapped").await, "203.0.113.8:8");
}

/// A loopback listener behind a balancer on the same host has remote clients: with
/// `auth.allow_anonymous` unset, an anonymous one is refused (0x87), as on a public address.
#[tokio::test]
async fn a_proxied_loopback_listener_refuses_anonymous_clients_by_default() {
    let mut c = proxied_config("127.0.0.1");
    c.auth.allow_anonymous = None;
    let server = start_with(c).await;
    let (_raw, reason) = connect_behind(&server, &v2_header("203.0.113.9:9"), "anon").await;
    assert_eq!(reason, Some(ReasonCode::NotAuthorized));
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// 1,000 trusted-proxy connections that each send the first 16 bytes of a v2 header naming
/// 1 KiB of addresses and TLVs, and stall: each counts as open while it holds its header
/// buffer and task, and all of it goes at the connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_stalled_v2_headers_hold_little() {
    let mut c = proxied_config("127.0.0.1");
    c.limits.connect_timeout_secs = 3;
    let server = start_with(c).await;
    let mut head = b"\r\n\r\n\0\r\nQUIT\n\x21\x11".to_vec();
    head.extend_from_slice(&1024u16.to_be_bytes());
    let before = rss_kib();
    let mut stalled = Vec::new();
    for _ in 0..1000 {
        let mut s = TcpStream::connect(server.mqtt_addr()).await.unwrap();
        s.write_all(&head).await.unwrap();
        stalled.push(s);
    }
    let open = || async { metric(&server, "ferrymq_connections_open ").await };
    eventually("all 1,000 reading their header", || async {
        open().await == 1000
    })
    .await;
    // Printed, not asserted: other tests share this process's RSS (measured alone: ~3.3 MiB,
    // both ends of the sockets included).
    let grown = rss_kib().saturating_sub(before);
    eprintln!("1,000 stalled v2 headers: +{grown} KiB RSS (both ends in this process)");
    eventually("the connect timeout closes them all", || async {
        open().await == 0
    })
    .await;
}
