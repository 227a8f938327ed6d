//! `[auth.jwt]`: a JSON Web Token in the MQTT password field authenticates a client.
//!
//! The signature is checked with the configured algorithm only (a token naming another one,
//! `none` included, is refused), `exp` is required and checked, `nbf` is checked when present,
//! and `aud`/`iss` when configured, with `leeway_secs` of clock skew. The user name is the
//! string claim `username_claim` (default `sub`). An `acl` claim
//! `{"publish": [filters], "subscribe": [filters]}` narrows what the ACL rules allow this
//! client (see `ferrymq_core::acl`).
//!
//! [`JwtVerifier::verify`] is a pure function of the token and the clock (a fuzz target): it
//! must not panic on any input.

use std::path::PathBuf;
use std::sync::Arc;

use ferrymq_core::acl::TokenAcl;
use ferrymq_core::Identity;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

/// `[auth.jwt]`. Its `Debug` leaves the secret out (`ferrymq check-config` prints it).
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    pub algorithm: JwtAlgorithm,
    /// The shared secret (HS256).
    #[serde(default)]
    pub secret: Option<String>,
    /// A PEM file with the public key (RS256: RSA; ES256: P-256).
    #[serde(default)]
    pub public_key: Option<PathBuf>,
    /// The claim that carries the user name.
    #[serde(default = "default_username_claim")]
    pub username_claim: String,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds.
    #[serde(default)]
    pub leeway_secs: u64,
    /// When set, the token's `aud` must contain it.
    #[serde(default)]
    pub audience: Option<String>,
    /// When set, the token's `iss` must equal it.
    #[serde(default)]
    pub issuer: Option<String>,
}

impl std::fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("algorithm", &self.algorithm)
            .field("secret", &self.secret.as_ref().map(|_| "(set, not shown)"))
            .field("public_key", &self.public_key)
            .field("username_claim", &self.username_claim)
            .field("leeway_secs", &self.leeway_secs)
            .field("audience", &self.audience)
            .field("issuer", &self.issuer)
            .finish()
    }
}

fn default_username_claim() -> String {
    "sub".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum JwtAlgorithm {
    HS256,
    RS256,
    ES256,
}

/// Why a JWT configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JwtConfigError {
    #[error("HS256 needs `secret` (and no `public_key`)")]
    NeedsSecret,
    #[error("{0:?} needs `public_key` (a PEM file) and no `secret`")]
    NeedsPublicKey(JwtAlgorithm),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bad key: {0}")]
    Key(String),
    #[error("`username_claim` must not be empty")]
    EmptyClaim,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("the token has no string claim {0:?}")]
    NoUserName(String),
    #[error("the `acl` claim is malformed: {0}")]
    BadAcl(String),
}

/// A ready verifier: the key decoded once.
pub struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
    username_claim: Arc<str>,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("algorithms", &self.validation.algorithms)
            .field("username_claim", &self.username_claim)
            .finish()
    }
}

impl JwtVerifier {
    /// Reads the public key file, if any.
    pub fn new(cfg: &JwtConfig) -> Result<JwtVerifier, JwtConfigError> {
        if cfg.username_claim.is_empty() {
            return Err(JwtConfigError::EmptyClaim);
        }
        let (key, alg) = match (cfg.algorithm, &cfg.secret, &cfg.public_key) {
            (JwtAlgorithm::HS256, Some(secret), None) => (
                DecodingKey::from_secret(secret.as_bytes())
                    .map_err(|e| JwtConfigError::Key(e.to_string()))?,
                Algorithm::HS256,
            ),
            (JwtAlgorithm::HS256, _, _) => return Err(JwtConfigError::NeedsSecret),
            (a, None, Some(path)) => {
                let pem = std::fs::read(path).map_err(|source| JwtConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                let key = match a {
                    JwtAlgorithm::RS256 => DecodingKey::from_rsa_pem(&pem),
                    _ => DecodingKey::from_ec_pem(&pem),
                }
                .map_err(|e| JwtConfigError::Key(format!("{}: {e}", path.display())))?;
                let alg = match a {
                    JwtAlgorithm::RS256 => Algorithm::RS256,
                    _ => Algorithm::ES256,
                };
                (key, alg)
            }
            (a, _, _) => return Err(JwtConfigError::NeedsPublicKey(a)),
        };
        let mut validation = Validation::new(alg);
        validation.leeway = cfg.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        match &cfg.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &cfg.issuer {
            validation.set_issuer(&[iss]);
        }
        Ok(JwtVerifier {
            key,
            validation,
            username_claim: cfg.username_claim.as_str().into(),
        })
    }

    /// Checks a token (the MQTT password) and returns who it names.
    pub fn verify(&self, token: &[u8]) -> Result<Identity, JwtError> {
        let token =
            std::str::from_utf8(token).map_err(|_| JwtError::Invalid("not UTF-8".into()))?;
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &self.key,
            &self.validation,
        )
        .map_err(|e| JwtError::Invalid(e.to_string()))?;
        let claims = data.claims;
        let user = match claims.get(self.username_claim.as_ref()) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => s.as_str(),
            _ => return Err(JwtError::NoUserName(self.username_claim.to_string())),
        };
        let token_acl = match claims.get("acl") {
            None => None,
            Some(v) => Some(token_acl(v)?),
        };
        Ok(Identity {
            user: Some(user.into()),
            token_acl,
        })
    }
}

/// The `acl` claim: an object with optional `publish` and `subscribe` lists of valid filters.
fn token_acl(v: &serde_json::Value) -> Result<TokenAcl, JwtError> {
    let serde_json::Value::Object(m) = v else {
        return Err(JwtError::BadAcl("not an object".into()));
    };
    let list = |key: &str| -> Result<Option<Vec<String>>, JwtError> {
        let Some(v) = m.get(key) else {
            return Ok(None);
        };
        let serde_json::Value::Array(items) = v else {
            return Err(JwtError::BadAcl(format!("{key} is not a list")));
        };
        items
            .iter()
            .map(|i| match i {
                serde_json::Value::String(f) if ferrymq_mqtt::topic::valid_topic_filter(f) => {
                    Ok(f.clone())
                }
                _ => Err(JwtError::BadAcl(format!(
                    "{key}: {i} is not a topic filter"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    };
    if let Some(k) = m.keys().find(|k| *k != "publish" && *k != "subscribe") {
        return Err(JwtError::BadAcl(format!("unknown key {k:?}")));
    }
    Ok(TokenAcl {
        publish: list("publish")?,
        subscribe: list("subscribe")?,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn hs(secret: &str) -> JwtVerifier {
        JwtVerifier::new(&JwtConfig {
            algorithm: JwtAlgorithm::HS256,
            secret: Some(secret.into()),
            public_key: None,
            username_claim: "sub".into(),
            leeway_secs: 0,
            audience: None,
            issuer: None,
        })
        .unwrap()
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    #[test]
    fn a_valid_token_names_its_user_and_acl() {
        let t = token(
            serde_json::json!({"sub": "alice", "exp": now() + 60,
                "acl": {"publish": ["a/#"], "subscribe": []}}),
            "k",
        );
        let who = hs("k").verify(t.as_bytes()).unwrap();
        assert_eq!(who.user.as_deref(), Some("alice"));
        let acl = who.token_acl.unwrap();
        assert_eq!(acl.publish, Some(vec!["a/#".to_string()]));
        assert_eq!(acl.subscribe, Some(vec![]));
    }

    #[test]
    fn refusals() {
        let v = hs("k");
        let cases = [
            token(serde_json::json!({"sub": "a", "exp": now() - 10}), "k"),
            token(
                serde_json::json!({"sub": "a", "exp": now() + 600, "nbf": now() + 300}),
                "k",
            ),
            token(serde_json::json!({"sub": "a", "exp": now() + 60}), "other"),
            token(serde_json::json!({"sub": "a"}), "k"),
            token(serde_json::json!({"name": "a", "exp": now() + 60}), "k"),
            token(
                serde_json::json!({"sub": "a", "exp": now() + 60, "acl": {"publish": ["a/#/b"]}}),
                "k",
            ),
            token(
                serde_json::json!({"sub": "a", "exp": now() + 60, "acl": {"read": []}}),
                "k",
            ),
        ];
        for t in cases {
            assert!(v.verify(t.as_bytes()).is_err(), "{t}");
        }
        for junk in ["", ".", "..", "a.b.c", "e30.e30.", "\u{0}", "😀.😀.😀"] {
            assert!(v.verify(junk.as_bytes()).is_err());
        }
        assert!(v.verify(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn config_needs_the_matching_key_kind() {
        let mut c = JwtConfig {
            algorithm: JwtAlgorithm::RS256,
            secret: Some("s".into()),
            public_key: None,
            username_claim: "sub".into(),
            leeway_secs: 0,
            audience: None,
            issuer: None,
        };
        assert!(JwtVerifier::new(&c).is_err());
        c.algorithm = JwtAlgorithm::HS256;
        assert!(JwtVerifier::new(&c).is_ok());
        c.public_key = Some("/nonexistent.pem".into());
        assert!(JwtVerifier::new(&c).is_err());
    }
}
