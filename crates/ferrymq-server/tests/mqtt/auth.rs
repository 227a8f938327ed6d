//! Authentication: a password file and JWTs let the right clients in and refuse the rest
//! with the right code per version; repeated failures ban the address, and the ban ends.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ferrymq_client::{Client, ClientError, ConnectOptions};
use ferrymq_mqtt::{ProtocolVersion, ReasonCode};
use ferrymq_server::Server;
use jsonwebtoken::{encode, EncodingKey, Header};

use crate::common::*;

const V3: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;
const SECRET: &str = "a shared secret for the tests";

async fn login(
    server: &Server,
    v: ProtocolVersion,
    user: Option<&str>,
    password: Option<&[u8]>,
) -> Result<Client, ReasonCode> {
    let mut o = ConnectOptions::new(server.mqtt_addr().to_string(), "auth-test");
    o.version = v;
    o.username = user.map(Into::into);
    o.password = password.map(Bytes::copy_from_slice);
    match Client::connect(o).await {
        Ok((c, _)) => Ok(c),
        Err(ClientError::Refused(r)) => Err(r),
        Err(e) => panic!("connect failed: {e}"),
    }
}

/// A password file with alice:wonderland (written as `ferrymq passwd` writes it).
fn password_file() -> std::path::PathBuf {
    let dir = fresh_data_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("passwd");
    let hash = ferrymq_server::password_file::hash_password(b"wonderland").unwrap();
    std::fs::write(&path, format!("# users\nalice:{hash}\n")).unwrap();
    path
}

fn jwt_config() -> ferrymq_server::jwt::JwtConfig {
    toml::from_str(&format!("algorithm = \"HS256\"\nsecret = {SECRET:?}\n")).unwrap()
}

fn token(claims: serde_json::Value, secret: &str) -> Vec<u8> {
    let key = EncodingKey::from_secret(secret.as_bytes()).unwrap();
    encode(&Header::default(), &claims, &key)
        .unwrap()
        .into_bytes()
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

#[tokio::test]
async fn password_file_users_get_in_and_wrong_or_unknown_ones_get_0x86_or_code_4() {
    let mut c = test_config();
    c.auth.password_file = Some(password_file());
    c.auth.allow_anonymous = Some(false);
    let server = start_with(c).await;
    for v in [V3, V5] {
        let ok = login(&server, v, Some("alice"), Some(b"wonderland")).await;
        assert!(ok.is_ok(), "{v:?}");
        for (user, pw) in [("alice", &b"wrong"[..]), ("mallory", b"wonderland")] {
            let r = login(&server, v, Some(user), Some(pw)).await.err();
            // 3.1.1 return code 4 decodes to the same reason.
            assert_eq!(r, Some(ReasonCode::BadUserNameOrPassword), "{user} {v:?}");
        }
        let r = login(&server, v, None, None).await.err();
        assert_eq!(r, Some(ReasonCode::NotAuthorized), "anonymous {v:?}");
    }
    let refused = |reason: &'static str| {
        let server = &server;
        async move {
            let name = format!("ferrymq_auth_refused_total{{reason=\"{reason}\"}}");
            metric(server, &name).await
        }
    };
    assert_eq!(refused("bad_credentials").await, 4);
    assert_eq!(refused("not_authorized").await, 2);
    assert_eq!(refused("banned").await, 0);
    server.shutdown().await;
}

#[tokio::test]
async fn a_jwt_in_the_password_authenticates_and_bad_ones_are_refused() {
    let mut c = test_config();
    c.auth.jwt = Some(jwt_config());
    c.auth.allow_anonymous = Some(false);
    let server = start_with(c).await;
    let good = token(
        serde_json::json!({"sub": "dev-1", "exp": now() + 600}),
        SECRET,
    );
    let expired = token(
        serde_json::json!({"sub": "dev-1", "exp": now() - 600}),
        SECRET,
    );
    let early = token(
        serde_json::json!({"sub": "dev-1", "exp": now() + 600, "nbf": now() + 300}),
        SECRET,
    );
    let forged = token(
        serde_json::json!({"sub": "dev-1", "exp": now() + 600}),
        "guess",
    );
    for v in [V3, V5] {
        // The user name field is free: the token names the user.
        assert!(login(&server, v, Some("ignored"), Some(&good))
            .await
            .is_ok());
        if v == V5 {
            // 3.1.1 forbids a password without a user name (MQTT-3.1.2-22); 5.0 allows it.
            assert!(login(&server, v, None, Some(&good)).await.is_ok());
        }
        for (what, t) in [
            ("expired", &expired),
            ("not yet valid", &early),
            ("bad signature", &forged),
        ] {
            let r = login(&server, v, Some("dev-1"), Some(t)).await.err();
            assert_eq!(r, Some(ReasonCode::BadUserNameOrPassword), "{what} {v:?}");
        }
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_jwt_acl_claim_narrows_what_the_client_may_publish() {
    let mut c = test_config();
    c.auth.jwt = Some(jwt_config());
    let server = start_with(c).await;
    let t = token(
        serde_json::json!({"sub": "dev-7", "exp": now() + 600,
            "acl": {"publish": ["telemetry/%u/#"]}}),
        SECRET,
    );
    let mut client = login(&server, V5, None, Some(&t)).await.unwrap();
    let p = |topic: &str| crate::acl::publish(topic, "x", ferrymq_mqtt::QoS::AtLeastOnce, false);
    assert_eq!(
        client.publish(p("telemetry/dev-7/temp")).await.unwrap(),
        ReasonCode::Success
    );
    assert_eq!(
        client.publish(p("telemetry/dev-8/temp")).await.unwrap(),
        ReasonCode::NotAuthorized
    );
    server.shutdown().await;
}

#[tokio::test]
async fn repeated_failures_ban_the_address_until_the_cooling_off_time_passes() {
    let ban = Duration::from_millis(1500);
    let mut c = test_config();
    c.auth.password_file = Some(password_file());
    c.auth.max_failures = 3;
    c.auth.ban_ms = ban.as_millis() as u64;
    let server = start_with(c).await;
    for _ in 0..3 {
        let r = login(&server, V5, Some("alice"), Some(b"guess"))
            .await
            .err();
        assert_eq!(r, Some(ReasonCode::BadUserNameOrPassword));
    }
    let banned_at = Instant::now();
    // Banned now, even with the right password, on either version (3.1.1: code 5).
    let r = login(&server, V5, Some("alice"), Some(b"wonderland"))
        .await
        .err();
    assert_eq!(r, Some(ReasonCode::Banned));
    let r = login(&server, V3, Some("alice"), Some(b"wonderland"))
        .await
        .err();
    assert_eq!(r, Some(ReasonCode::NotAuthorized));
    // Let in again once the ban is over, and not before.
    let deadline = banned_at + WAIT;
    loop {
        match login(&server, V5, Some("alice"), Some(b"wonderland")).await {
            Ok(_) => break,
            Err(r) => assert_eq!(r, ReasonCode::Banned),
        }
        assert!(Instant::now() < deadline, "still banned after {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        banned_at.elapsed() >= ban - Duration::from_millis(200),
        "let in after {:?}, before the ban ended",
        banned_at.elapsed()
    );
    server.shutdown().await;
}

#[tokio::test]
async fn rs256_and_es256_tokens_are_checked_with_the_configured_public_key() {
    use jsonwebtoken::Algorithm;
    let keys = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mqtt/jwt-keys");
    for (alg, name) in [(Algorithm::RS256, "rs256"), (Algorithm::ES256, "es256")] {
        let mut c = test_config();
        c.auth.allow_anonymous = Some(false);
        c.auth.jwt = Some(
            toml::from_str(&format!(
                "algorithm = \"{alg:?}\"\npublic_key = {:?}\nusername_claim = \"device\"\n",
                keys.join(format!("{name}-public.pem"))
                    .display()
                    .to_string()
            ))
            .unwrap(),
        );
        let server = start_with(c).await;
        let pem = std::fs::read(keys.join(format!("{name}-private.pem"))).unwrap();
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
            _ => EncodingKey::from_ec_pem(&pem).unwrap(),
        };
        let sign = |claims: serde_json::Value, header: Header| {
            encode(&header, &claims, &key).unwrap().into_bytes()
        };
        let good = sign(
            serde_json::json!({"device": "d-1", "exp": now() + 60}),
            Header::new(alg),
        );
        assert!(
            login(&server, V5, Some("x"), Some(&good)).await.is_ok(),
            "{alg:?}"
        );
        assert!(
            login(&server, V3, Some("x"), Some(&good)).await.is_ok(),
            "{alg:?}"
        );
        // The user name must be in the configured claim.
        let no_user = sign(
            serde_json::json!({"sub": "d-1", "exp": now() + 60}),
            Header::new(alg),
        );
        // An HS256 token "signed" with the public key (the classic confusion) is refused.
        let public = std::fs::read(keys.join(format!("{name}-public.pem"))).unwrap();
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"device": "d-1", "exp": now() + 60}),
            &EncodingKey::from_secret(&public).unwrap(),
        )
        .unwrap()
        .into_bytes();
        for (what, t) in [
            ("no user claim", no_user),
            ("HS256 with the public key", confused),
        ] {
            let r = login(&server, V5, Some("x"), Some(&t)).await.err();
            assert_eq!(r, Some(ReasonCode::BadUserNameOrPassword), "{what} {alg:?}");
        }
        server.shutdown().await;
    }
}

/// Review finding: a resumed session keeps its `$queue/{name}` subscription whoever resumes
/// it, and queue messages are delivered without a per-message ACL check. alice (allowed
/// `$queue/orders`) leaves a durable session; an anonymous client that the rules deny
/// `$queue/orders` connects with her client id, clean_start = false, and consumes the queue.
#[tokio::test]
async fn resuming_another_users_session_does_not_inherit_its_queue_grant() {
    use ferrymq_mqtt::{Packet, QoS, SubscriptionOptions};
    let mut c = test_config();
    c.auth.password_file = Some(password_file());
    c.auth.allow_anonymous = Some(true);
    c.queues = vec![toml::from_str("name = \"orders\"\nfilter = \"orders/#\"\n").unwrap()];
    c.acl = toml::from_str(
        r#"
        default = "deny"
        [[rule]]
        permission = "allow"
        action = "subscribe"
        topic = "$queue/orders"
        user = "alice"
        [[rule]]
        permission = "allow"
        action = "publish"
        topic = "orders/#"
        "#,
    )
    .unwrap();
    let server = start_with(c).await;
    let options = |user: Option<&str>| {
        let mut o = ConnectOptions::new(server.mqtt_addr().to_string(), "worker-1");
        o.version = V5;
        o.clean_start = false;
        o.properties.session_expiry_interval = Some(3600);
        o.username = user.map(Into::into);
        o.password = user.map(|_| Bytes::from_static(b"wonderland"));
        o
    };
    let (mut alice, _) = Client::connect(options(Some("alice"))).await.unwrap();
    let sub = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        ..Default::default()
    };
    let ack = alice
        .subscribe(vec![("$queue/orders".to_string(), sub)], Default::default())
        .await
        .unwrap();
    assert_eq!(ack.reasons[0].as_u8(), 1, "alice may consume the queue");
    alice.disconnect().await.unwrap();
    // The anonymous client is denied the queue itself...
    let mut probe_opts = options(None);
    probe_opts.client_id = "probe".into();
    let (mut probe, _) = Client::connect(probe_opts).await.unwrap();
    let ack = probe
        .subscribe(vec![("$queue/orders".to_string(), sub)], Default::default())
        .await
        .unwrap();
    assert_eq!(ack.reasons[0].as_u8(), 0x87);
    // ...but resumes alice's session.
    let (mut mallory, _) = Client::connect(options(None)).await.unwrap();
    let mut shop_opts = ConnectOptions::new(server.mqtt_addr().to_string(), "shop");
    shop_opts.version = V5;
    let (mut shop, _) = Client::connect(shop_opts).await.unwrap();
    let p = crate::acl::publish("orders/1", "secret order", QoS::AtLeastOnce, false);
    assert_eq!(shop.publish(p).await.unwrap(), ReasonCode::Success);
    let leaked = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            if let Packet::Publish(p) = mallory.recv().await.unwrap() {
                return p.topic.to_string();
            }
        }
    })
    .await;
    assert!(
        leaked.is_err(),
        "an anonymous client read {leaked:?} from queue orders through alice's session"
    );
    server.shutdown().await;
}
