//! Fuzz JWT verification (`[auth.jwt]`, the token in the MQTT password field): any bytes as a
//! token, and any JSON as the claims of a token signed with the right key (so that the
//! claim checks — `exp`, `nbf`, the user-name claim, the `acl` claim — see arbitrary
//! shapes), are accepted or refused, never a panic.
#![no_main]

use std::sync::OnceLock;

use ferrymq_server::jwt::{JwtAlgorithm, JwtConfig, JwtVerifier};
use jsonwebtoken::{encode, EncodingKey, Header};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-secret";

fn verifier() -> &'static JwtVerifier {
    static V: OnceLock<JwtVerifier> = OnceLock::new();
    V.get_or_init(|| {
        let config = JwtConfig {
            algorithm: JwtAlgorithm::HS256,
            secret: Some(SECRET.into()),
            public_key: None,
            username_claim: "sub".into(),
            leeway_secs: 0,
            audience: None,
            issuer: None,
        };
        JwtVerifier::new(&config).expect("a valid configuration")
    })
}

fuzz_target!(|data: &[u8]| {
    let v = verifier();
    let _ = v.verify(data);
    if let Ok(claims) = serde_json::from_slice::<serde_json::Value>(data) {
        let Ok(key) = EncodingKey::from_secret(SECRET.as_bytes()) else {
            return;
        };
        if let Ok(token) = encode(&Header::default(), &claims, &key) {
            let _ = v.verify(token.as_bytes());
        }
    }
});
