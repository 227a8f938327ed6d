//! MQTT over TLS (`listeners.mqtts`, `[tls]`): real clients (rumqttc with rustls, mosquitto
//! clients with OpenSSL, a rustls client), certificates made in the test, mutual TLS, and
//! certificates replaced on disk while the broker runs.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferrymq_mqtt::ProtocolVersion;
use ferrymq_server::config::{CertUsername, Tls};
use ferrymq_server::{Config, ListenerKind, Server};

use crate::common::{self, eventually, metric, test_config, WAIT};
use crate::edge::{self, Ca, Issued, Role, Wire};

/// A broker with only `mqtt` and `mqtts` on (ephemeral ports), serving `server` (signed by
/// the CA in `ca_pem`), and verifying client certificates against `client_ca` if given.
pub fn tls_config(dir: &Path, server: &Issued, client_ca: Option<&Ca>, require: bool) -> Config {
    let mut c = test_config();
    c.listeners.mqtts = Some("127.0.0.1:0".parse().unwrap());
    c.listeners.wss = Some(Default::default());
    c.tls = Some(Tls {
        cert: edge::write(dir, "server.pem", &server.cert),
        key: edge::write(dir, "server.key", &server.key),
        client_ca: client_ca.map(|ca| edge::write(dir, "client-ca.pem", &ca.pem)),
        require_client_cert: require,
        cert_username: CertUsername::None,
    });
    c
}

fn mqtts(server: &Server) -> std::net::SocketAddr {
    server
        .listener_addr(ListenerKind::Mqtts)
        .expect("mqtts is on")
}

#[tokio::test]
async fn rumqttc_publishes_and_subscribes_over_tls() {
    let ca = Ca::new("ferrymq test CA");
    let dir = edge::cert_dir("tls-rumqttc");
    let server =
        common::start_with(tls_config(&dir, &ca.issue(Role::Server, 1), None, false)).await;
    let tls_options = |id: &str| {
        let a = mqtts(&server);
        let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", a.port());
        let config = edge::client_config(&ca.pem, None);
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(config),
        ));
        o
    };
    let mut sub = common::v4(tls_options("tls-sub")).await;
    sub.subscribe("tls/#", rumqttc::QoS::AtLeastOnce).await;
    let mut publisher = common::v4(tls_options("tls-pub")).await;
    publisher
        .client
        .publish("tls/x", rumqttc::QoS::AtLeastOnce, false, "over tls")
        .await
        .unwrap();
    publisher.acked(1).await;
    let got = common::next(&mut sub.rx).await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("tls/x", &b"over tls"[..])
    );
    // A plain TCP subscriber gets what TLS clients publish: one broker behind both.
    let mut plain = common::v4(common::v4_options(&server, "tcp-sub")).await;
    plain.subscribe("tls/#", rumqttc::QoS::AtMostOnce).await;
    publisher
        .client
        .publish("tls/y", rumqttc::QoS::AtLeastOnce, false, "to tcp")
        .await
        .unwrap();
    assert_eq!(common::next(&mut plain.rx).await.topic, "tls/y");
    assert_eq!(
        metric(
            &server,
            "ferrymq_listener_connections_open{listener=\"mqtts\"}"
        )
        .await,
        2
    );
    assert_eq!(
        metric(
            &server,
            "ferrymq_listener_connections_open{listener=\"mqtt\"}"
        )
        .await,
        1
    );
}

/// Runs a mosquitto client to completion (bounded by its own `-W`/QoS waits and ours).
fn mosquitto(tool: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("{tool} cannot run ({e}): install Debian's mosquitto-clients (scripts/test.sh does)")
    });
    out
}

async fn mosquitto_async(tool: &'static str, args: Vec<String>) -> std::process::Output {
    let run = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        mosquitto(tool, &args)
    });
    tokio::time::timeout(WAIT * 2, run)
        .await
        .expect("mosquitto client ends in time")
        .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn mosquitto_clients_with_cafile_publish_and_subscribe() {
    let ca = Ca::new("ferrymq test CA");
    let dir = edge::cert_dir("tls-mosquitto");
    let server =
        common::start_with(tls_config(&dir, &ca.issue(Role::Server, 2), None, false)).await;
    let cafile = edge::write(&dir, "ca.pem", &ca.pem);
    let port = mqtts(&server).port().to_string();
    let cafile = cafile.to_str().unwrap();
    let common = ["-h", "127.0.0.1", "-p", &port, "--cafile", cafile];
    // Retained, at QoS 1: mosquitto_pub exits after the PUBACK, and the subscriber then gets
    // the message whenever it subscribes (no race between the two).
    let mut publish = args(&common);
    publish.extend(args(&[
        "-i",
        "mosq-pub",
        "-q",
        "1",
        "-r",
        "-t",
        "tls/mosquitto",
        "-m",
        "via openssl",
    ]));
    let out = mosquitto_async("mosquitto_pub", publish).await;
    assert!(
        out.status.success(),
        "mosquitto_pub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut subscribe = args(&common);
    subscribe.extend(args(&[
        "-i",
        "mosq-sub",
        "-t",
        "tls/mosquitto",
        "-C",
        "1",
        "-W",
        "10",
    ]));
    let out = mosquitto_async("mosquitto_sub", subscribe).await;
    assert!(
        out.status.success(),
        "mosquitto_sub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "via openssl");
    // A client that trusts another CA refuses the broker's certificate.
    let other = Ca::new("some other CA");
    let other_file = edge::write(&dir, "other-ca.pem", &other.pem);
    let refused = [
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "--cafile",
        other_file.to_str().unwrap(),
    ];
    let mut publish = args(&refused);
    publish.extend(args(&[
        "-i",
        "mosq-wrong-ca",
        "-q",
        "1",
        "-t",
        "tls/x",
        "-m",
        "no",
    ]));
    let out = mosquitto_async("mosquitto_pub", publish).await;
    assert!(
        !out.status.success(),
        "a client trusting another CA must not connect"
    );
}

#[tokio::test]
async fn mosquitto_clients_with_client_certificates_against_require_client_cert() {
    let ca = Ca::new("ferrymq test CA");
    let dir = edge::cert_dir("tls-mosquitto-mtls");
    let config = tls_config(&dir, &ca.issue(Role::Server, 3), Some(&ca), true);
    let server = common::start_with(config).await;
    let client = ca.issue(Role::Client("sensor-1"), 4);
    let cafile = edge::write(&dir, "ca.pem", &ca.pem);
    let cert = edge::write(&dir, "client.pem", &client.cert);
    let key = edge::write(&dir, "client.key", &client.key);
    let port = mqtts(&server).port().to_string();
    let base = [
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "--cafile",
        cafile.to_str().unwrap(),
    ];
    let with_cert = [
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ];
    let mut publish = args(&base);
    publish.extend(args(&with_cert));
    publish.extend(args(&[
        "-i", "mtls-pub", "-q", "1", "-r", "-t", "mtls/t", "-m", "signed",
    ]));
    let out = mosquitto_async("mosquitto_pub", publish).await;
    assert!(
        out.status.success(),
        "mosquitto_pub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut subscribe = args(&base);
    subscribe.extend(args(&with_cert));
    subscribe.extend(args(&[
        "-i", "mtls-sub", "-t", "mtls/t", "-C", "1", "-W", "10",
    ]));
    let out = mosquitto_async("mosquitto_sub", subscribe).await;
    assert!(
        out.status.success(),
        "mosquitto_sub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "signed");
    // Without a certificate: refused.
    let mut publish = args(&base);
    publish.extend(args(&[
        "-i",
        "mtls-nocert",
        "-q",
        "1",
        "-t",
        "mtls/t",
        "-m",
        "unsigned",
    ]));
    let out = mosquitto_async("mosquitto_pub", publish).await;
    assert!(
        !out.status.success(),
        "a client without a certificate must not connect"
    );
}

#[tokio::test]
async fn wrong_ca_expired_foreign_and_missing_client_certificates_are_refused() {
    let ca = Ca::new("ferrymq test CA");
    let other = Ca::new("some other CA");
    let dir = edge::cert_dir("tls-refusals");
    let server = common::start_with(tls_config(
        &dir,
        &ca.issue(Role::Server, 5),
        Some(&ca),
        true,
    ))
    .await;
    let addr = mqtts(&server);
    // A client trusting another CA refuses the broker.
    let wrong_ca = edge::client_config(&other.pem, Some(&ca.issue(Role::Client("c1"), 6)));
    let err = edge::tls_connect(addr, wrong_ca).await.unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");
    // The broker refuses an expired certificate, one from another CA, and none at all. With
    // TLS 1.3 the client's side of the handshake may finish before the broker's verdict
    // arrives, so the refusal shows as a connection that ends instead of a CONNACK.
    let refused = [
        ("expired", Some(ca.issue(Role::ExpiredClient("old"), 7))),
        ("foreign", Some(other.issue(Role::Client("stranger"), 8))),
        ("no certificate", None),
    ];
    for (what, cert) in &refused {
        let config = edge::client_config(&ca.pem, cert.as_ref());
        match edge::tls_connect(addr, config).await {
            Err(_) => {}
            Ok(tls) => {
                let mut wire = Wire::new(tls, ProtocolVersion::V5);
                let ack = wire.connect(what).await;
                assert!(
                    ack.is_none(),
                    "{what}: the broker answered CONNECT: {ack:?}"
                );
            }
        }
    }
    // A valid certificate gets in.
    let good = edge::client_config(&ca.pem, Some(&ca.issue(Role::Client("c2"), 9)));
    let tls = edge::tls_connect(addr, good).await.unwrap();
    Wire::connected(tls, "good", ProtocolVersion::V311).await;
    eventually("failed handshakes are counted per listener", || async {
        metric(
            &server,
            "ferrymq_listener_handshake_failures_total{listener=\"mqtts\"}",
        )
        .await
            >= 4
    })
    .await;
}

#[tokio::test]
async fn certificates_reload_from_disk_without_a_restart() {
    let ca = Ca::new("ferrymq test CA");
    let dir = edge::cert_dir("tls-reload");
    let first = ca.issue(Role::Server, 100);
    let server = common::start_with(tls_config(&dir, &first, None, false)).await;
    let addr = mqtts(&server);
    let client = edge::client_config(&ca.pem, None);
    let tls = edge::tls_connect(addr, client.clone()).await.unwrap();
    assert_eq!(edge::served_certificate(&tls), first.der);
    let mut before = Wire::connected(tls, "before-reload", ProtocolVersion::V5).await;
    before.subscribe(1, "reload/#").await;
    // A renewed certificate (and key) is written over the old files, as certbot would.
    let second = ca.issue(Role::Server, 200);
    edge::write(&dir, "server.key", &second.key);
    edge::write(&dir, "server.pem", &second.cert);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let tls = edge::tls_connect(addr, client.clone()).await.unwrap();
        let served = edge::served_certificate(&tls);
        if served == second.der {
            // New connections work with the new certificate...
            let mut after = Wire::connected(tls, "after-reload", ProtocolVersion::V5).await;
            after.publish(1, "reload/x", b"renewed").await;
            // ...and the connection made before the reload kept going.
            assert_eq!(
                before.next_publish().await,
                ("reload/x".into(), b"renewed".to_vec())
            );
            break;
        }
        assert_eq!(served, first.der, "served an unknown certificate");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was not served within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_bad_certificate_file_fails_the_start_naming_the_file() {
    let dir = edge::cert_dir("tls-bad");
    let mut config = test_config();
    config.listeners.mqtts = Some("127.0.0.1:0".parse().unwrap());
    let key = edge::write(&dir, "server.key", "not a key");
    config.tls = Some(Tls {
        cert: dir.join("missing.pem"),
        key: key.clone(),
        client_ca: None,
        require_client_cert: false,
        cert_username: CertUsername::None,
    });
    let err = Server::start(config.clone())
        .await
        .err()
        .expect("start fails")
        .to_string();
    assert!(err.contains("missing.pem"), "{err}");
    let ca = Ca::new("ferrymq test CA");
    let tls = config.tls.as_mut().unwrap();
    tls.cert = edge::write(&dir, "server.pem", &ca.issue(Role::Server, 1).cert);
    let err = Server::start(config)
        .await
        .err()
        .expect("start fails")
        .to_string();
    assert!(err.contains("server.key"), "{err}");
}

/// Edge review note: the per-address ban came before certificate users, so behind NAT or a
/// proxy a few wrong passwords from anyone shut out clients with valid certificates, which
/// cannot be guessed. A verified certificate user is now let in from a banned address.
#[tokio::test]
async fn a_certificate_user_gets_in_from_an_address_banned_for_wrong_passwords() {
    use bytes::Bytes;
    use ferrymq_client::{Client, ClientError, ConnectOptions};
    use ferrymq_mqtt::ReasonCode;

    let ca = Ca::new("ferrymq test CA");
    let dir = edge::cert_dir("tls-cert-user-ban");
    let mut config = tls_config(&dir, &ca.issue(Role::Server, 11), Some(&ca), false);
    if let Some(t) = config.tls.as_mut() {
        t.cert_username = CertUsername::Cn;
    }
    let hash = ferrymq_server::password_file::hash_password(b"wonderland").unwrap();
    config.auth.password_file = Some(edge::write(&dir, "passwd", &format!("alice:{hash}\n")));
    config.auth.max_failures = 2;
    config.auth.ban_ms = 60_000;
    let server = common::start_with(config).await;
    let password_login = |password: &'static [u8]| {
        let mut o = ConnectOptions::new(server.mqtt_addr().to_string(), "guesser");
        o.username = Some("alice".into());
        o.password = Some(Bytes::from_static(password));
        async move {
            match Client::connect(o).await {
                Ok(_) => None,
                Err(ClientError::Refused(r)) => Some(r),
                Err(e) => panic!("connect failed: {e}"),
            }
        }
    };
    for _ in 0..2 {
        assert_eq!(
            password_login(b"guess").await,
            Some(ReasonCode::BadUserNameOrPassword)
        );
    }
    assert_eq!(
        password_login(b"wonderland").await,
        Some(ReasonCode::Banned),
        "the address is banned, the right password included"
    );
    let client = ca.issue(Role::Client("sensor-7"), 12);
    let stream = edge::tls_connect(mqtts(&server), edge::client_config(&ca.pem, Some(&client)))
        .await
        .unwrap();
    let mut wire = Wire::connected(stream, "sensor-7", ProtocolVersion::V5).await;
    wire.subscribe(1, "cert/t").await;
}

/// A configuration reload that names other certificate files swaps them in for new
/// handshakes (open connections keep theirs); one whose files do not load is refused whole
/// and the running certificate stays.
#[tokio::test]
async fn a_config_reload_with_new_certificate_paths_swaps_them() {
    let ca = Ca::new("ferrymq test CA");
    let dir = edge::cert_dir("tls-config-reload");
    let first = ca.issue(Role::Server, 300);
    let config = tls_config(&dir, &first, None, false);
    let (server, next) = crate::common::start_reloadable(config.clone()).await;
    let addr = mqtts(&server);
    let client = edge::client_config(&ca.pem, None);
    let tls = edge::tls_connect(addr, client.clone()).await.unwrap();
    let mut before = Wire::connected(tls, "before", ProtocolVersion::V5).await;
    before.subscribe(1, "swap/#").await;

    let mut broken = config.clone();
    broken.tls.as_mut().unwrap().cert = dir.join("missing.pem");
    *next.lock().unwrap() = broken;
    let err = server
        .reload(ferrymq_server::Trigger::Api)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.pem"), "{err}");
    let tls = edge::tls_connect(addr, client.clone()).await.unwrap();
    assert_eq!(edge::served_certificate(&tls), first.der, "still the first");

    let second = ca.issue(Role::Server, 301);
    let mut swapped = config.clone();
    let t = swapped.tls.as_mut().unwrap();
    t.cert = edge::write(&dir, "renewed.pem", &second.cert);
    t.key = edge::write(&dir, "renewed.key", &second.key);
    *next.lock().unwrap() = swapped;
    let report = server.reload(ferrymq_server::Trigger::Api).await.unwrap();
    assert_eq!(report.applied, vec!["tls"], "{report:?}");
    assert!(report.restart_required.is_empty(), "{report:?}");
    let tls = edge::tls_connect(addr, client.clone()).await.unwrap();
    assert_eq!(edge::served_certificate(&tls), second.der);
    let mut after = Wire::connected(tls, "after", ProtocolVersion::V5).await;
    after.publish(1, "swap/x", b"new cert").await;
    assert_eq!(
        before.next_publish().await,
        ("swap/x".into(), b"new cert".to_vec())
    );
    assert_eq!(
        server.running_config().tls.as_ref().unwrap().cert,
        dir.join("renewed.pem")
    );
}

/// A reload with a valid ACL rule, limit and `$SYS` interval next to certificate files that
/// do not load is refused whole: none of its other changes applies either (the parts are
/// all checked before any applies).
#[tokio::test]
async fn a_reload_whose_certificate_fails_applies_none_of_its_other_changes() {
    let ca = Ca::new("ferrymq test CA");
    let dir = edge::cert_dir("tls-reload-whole");
    let config = tls_config(&dir, &ca.issue(Role::Server, 310), None, false);
    let (server, next) = crate::common::start_reloadable(config.clone()).await;
    let addr = mqtts(&server);
    let client = edge::client_config(&ca.pem, None);
    let tls = edge::tls_connect(addr, client.clone()).await.unwrap();
    let mut reader = Wire::connected(tls, "reader", ProtocolVersion::V5).await;
    reader.subscribe(1, "secret/#").await;

    let mut bad = Config::parse(
        "[[acl.rule]]\npermission = \"deny\"\naction = \"publish\"\ntopic = \"secret/#\"\n\
         [limits]\nmax_connections = 1\n[sys]\ninterval_secs = 1\n",
    )
    .unwrap();
    bad.listeners = config.listeners.clone();
    bad.data_dir = config.data_dir.clone();
    bad.storage = config.storage.clone();
    let mut tls_table = config.tls.clone().unwrap();
    tls_table.key = dir.join("missing.key");
    bad.tls = Some(tls_table);
    *next.lock().unwrap() = bad;
    let err = server
        .reload(ferrymq_server::Trigger::Api)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.key"), "{err}");
    assert_eq!(*server.running_config(), config, "the running config stays");
    // No connection limit of 1 (a second client gets in) and no ACL rule (it publishes).
    let tls = edge::tls_connect(addr, client.clone()).await.unwrap();
    let mut writer = Wire::connected(tls, "writer", ProtocolVersion::V5).await;
    writer.publish(1, "secret/x", b"still allowed").await;
    assert_eq!(
        reader.next_publish().await,
        ("secret/x".into(), b"still allowed".to_vec())
    );
}
