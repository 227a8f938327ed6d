//! A work queue's definition as users write it: a `[[queue]]` table in the config file, or
//! the JSON body of `POST /api/v1/queues`. The same field names in both; turned into the
//! engine's [`QueueDef`] and checked by its `validate`, so a bad definition gets the same
//! error (queue, field, why) wherever it comes from.

use ferrymq_core::workqueue::{Backoff, Overflow, QueueDef, QueueDefError};
use serde::{Deserialize, Serialize};

/// One queue, as written.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSpec {
    pub name: String,
    /// One topic filter, or a list.
    pub filter: Filters,
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    #[serde(default)]
    pub backoff: BackoffSpec,
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_messages: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    #[serde(default)]
    pub overflow: OverflowSpec,
    #[serde(default)]
    pub dead_letter_on_expiry: bool,
    #[serde(default = "default_priority")]
    pub default_priority: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dlq_retention_s: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Filters {
    One(String),
    Many(Vec<String>),
}

/// `{ kind, initial_ms, max_ms, multiplier, delays_ms }`; `fixed` waits `initial_ms`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffSpec {
    pub kind: BackoffKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delays_ms: Option<Vec<u64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackoffKind {
    None,
    Fixed,
    Linear,
    Exponential,
    ExponentialJitter,
    List,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowSpec {
    #[default]
    DropOldest,
    RejectNew,
    DeadLetter,
}

impl Default for BackoffSpec {
    fn default() -> Self {
        BackoffSpec {
            kind: BackoffKind::None,
            initial_ms: None,
            max_ms: None,
            multiplier: None,
            delays_ms: None,
        }
    }
}

fn default_attempts() -> u32 {
    5
}
fn default_ack_timeout() -> u64 {
    30_000
}
fn default_priority() -> u8 {
    4
}

/// A backoff without the parameter its kind needs.
const DEFAULT_MAX_MS: u64 = 60_000;

impl QueueSpec {
    /// The engine's definition, validated.
    pub fn to_def(&self) -> Result<QueueDef, QueueDefError> {
        let fail = |field: &str, message: &str| QueueDefError {
            queue: self.name.clone(),
            field: field.into(),
            message: message.into(),
        };
        let b = &self.backoff;
        let need = |v: Option<u64>, field: &str| {
            v.ok_or_else(|| fail(field, "is required for this backoff kind"))
        };
        let backoff = match b.kind {
            BackoffKind::None => Backoff::None,
            BackoffKind::Fixed => Backoff::Fixed {
                delay_ms: need(b.initial_ms, "backoff.initial_ms")?,
            },
            BackoffKind::Linear => Backoff::Linear {
                initial_ms: need(b.initial_ms, "backoff.initial_ms")?,
                max_ms: b.max_ms.unwrap_or(DEFAULT_MAX_MS),
            },
            BackoffKind::Exponential => Backoff::Exponential {
                initial_ms: need(b.initial_ms, "backoff.initial_ms")?,
                max_ms: b.max_ms.unwrap_or(DEFAULT_MAX_MS),
                multiplier: b.multiplier.unwrap_or(2.0),
            },
            BackoffKind::ExponentialJitter => Backoff::ExponentialJitter {
                initial_ms: need(b.initial_ms, "backoff.initial_ms")?,
                max_ms: b.max_ms.unwrap_or(DEFAULT_MAX_MS),
                multiplier: b.multiplier.unwrap_or(2.0),
            },
            BackoffKind::List => Backoff::List {
                delays_ms: b
                    .delays_ms
                    .clone()
                    .ok_or_else(|| fail("backoff.delays_ms", "is required for kind \"list\""))?,
            },
        };
        let def = QueueDef {
            name: self.name.clone(),
            filters: match &self.filter {
                Filters::One(f) => vec![f.clone()],
                Filters::Many(v) => v.clone(),
            },
            max_attempts: self.max_attempts,
            backoff,
            ack_timeout_ms: self.ack_timeout_ms,
            max_messages: self.max_messages,
            max_bytes: self.max_bytes,
            overflow: match self.overflow {
                OverflowSpec::DropOldest => Overflow::DropOldest,
                OverflowSpec::RejectNew => Overflow::RejectNew,
                OverflowSpec::DeadLetter => Overflow::DeadLetter,
            },
            dead_letter_on_expiry: self.dead_letter_on_expiry,
            default_priority: self.default_priority,
            dlq_retention_s: self.dlq_retention_s,
        };
        def.validate()?;
        Ok(def)
    }

    /// The definition as users write it (for `GET /api/v1/queues`).
    pub fn from_def(d: &QueueDef) -> QueueSpec {
        let mut backoff = BackoffSpec::default();
        match &d.backoff {
            Backoff::None => {}
            Backoff::Fixed { delay_ms } => {
                backoff.kind = BackoffKind::Fixed;
                backoff.initial_ms = Some(*delay_ms);
            }
            Backoff::Linear { initial_ms, max_ms } => {
                backoff.kind = BackoffKind::Linear;
                backoff.initial_ms = Some(*initial_ms);
                backoff.max_ms = Some(*max_ms);
            }
            Backoff::Exponential {
                initial_ms,
                max_ms,
                multiplier,
            }
            | Backoff::ExponentialJitter {
                initial_ms,
                max_ms,
                multiplier,
            } => {
                backoff.kind = if matches!(d.backoff, Backoff::Exponential { .. }) {
                    BackoffKind::Exponential
                } else {
                    BackoffKind::ExponentialJitter
                };
                backoff.initial_ms = Some(*initial_ms);
                backoff.max_ms = Some(*max_ms);
                backoff.multiplier = Some(*multiplier);
            }
            Backoff::List { delays_ms } => {
                backoff.kind = BackoffKind::List;
                backoff.delays_ms = Some(delays_ms.clone());
            }
        }
        QueueSpec {
            name: d.name.clone(),
            filter: match d.filters.as_slice() {
                [one] => Filters::One(one.clone()),
                many => Filters::Many(many.to_vec()),
            },
            max_attempts: d.max_attempts,
            backoff,
            ack_timeout_ms: d.ack_timeout_ms,
            max_messages: d.max_messages,
            max_bytes: d.max_bytes,
            overflow: match d.overflow {
                Overflow::DropOldest => OverflowSpec::DropOldest,
                Overflow::RejectNew => OverflowSpec::RejectNew,
                Overflow::DeadLetter => OverflowSpec::DeadLetter,
            },
            dead_letter_on_expiry: d.dead_letter_on_expiry,
            default_priority: d.default_priority,
            dlq_retention_s: d.dlq_retention_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_and_json_give_the_same_definition_and_it_round_trips() {
        let toml_text = r#"
            name = "orders"
            filter = ["orders/#", "legacy/orders/+"]
            max_attempts = 3
            backoff = { kind = "exponential", initial_ms = 100, max_ms = 5000, multiplier = 3.0 }
            max_messages = 1000
            overflow = "dead_letter"
        "#;
        let json_text = r#"{"name":"orders","filter":["orders/#","legacy/orders/+"],
            "max_attempts":3,"backoff":{"kind":"exponential","initial_ms":100,"max_ms":5000,
            "multiplier":3.0},"max_messages":1000,"overflow":"dead_letter"}"#;
        let a: QueueSpec = toml::from_str(toml_text).expect("toml");
        let b: QueueSpec = serde_json::from_str(json_text).expect("json");
        assert_eq!(a, b);
        let def = a.to_def().expect("valid");
        assert_eq!(def.ack_timeout_ms, 30_000, "default");
        assert_eq!(def.overflow, Overflow::DeadLetter);
        assert_eq!(QueueSpec::from_def(&def).to_def().expect("valid"), def);
    }

    #[test]
    fn errors_name_the_queue_and_the_field() {
        let s: QueueSpec =
            serde_json::from_str(r#"{"name":"q","filter":"a/#","backoff":{"kind":"fixed"}}"#)
                .expect("parses");
        let e = s.to_def().expect_err("fixed needs its delay");
        assert_eq!(
            (e.queue.as_str(), e.field.as_str()),
            ("q", "backoff.initial_ms")
        );
        let s: QueueSpec =
            serde_json::from_str(r#"{"name":"q","filter":"a/#","default_priority":12}"#)
                .expect("parses");
        assert_eq!(s.to_def().expect_err("0-9").field, "default_priority");
        assert!(
            serde_json::from_str::<QueueSpec>(r#"{"name":"q","filter":"a","nope":1}"#).is_err()
        );
    }
}
