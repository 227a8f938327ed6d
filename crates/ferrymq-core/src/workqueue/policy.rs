//! A queue's definition and retry policy: plain data, checked in one place, and the delay
//! before each retry.
//!
//! The engine has no clock and no randomness of its own: a jittered delay takes its random
//! draw as an argument, so the engine can use a seeded generator and tests can pin it.

/// Longest delay any backoff may ask for: 30 days. A longer one is almost certainly a unit
/// mistake (seconds written as milliseconds the other way round), and it would keep a message
/// invisible past any sensible retention.
pub const MAX_DELAY_MS: u64 = 30 * 24 * 3600 * 1000;

/// Longest ack timeout: 12 hours.
const MAX_ACK_TIMEOUT_MS: u64 = 12 * 3600 * 1000;

/// Most attempts a queue may allow before dead-lettering.
const MAX_ATTEMPTS: u32 = 1000;

/// Longest queue name: it appears in topics (`$queue/{name}`, `$dlq/{name}`) and in URLs.
const MAX_NAME_LEN: usize = 128;

/// How long to wait before the next attempt after a failed one (a nack, an ack timeout, a
/// consumer that went away).
#[derive(Debug, Clone, PartialEq)]
pub enum Backoff {
    /// Again at once.
    None,
    /// Always `delay_ms`.
    Fixed { delay_ms: u64 },
    /// `initial_ms` times the number of failed attempts, at most `max_ms`.
    Linear { initial_ms: u64, max_ms: u64 },
    /// `initial_ms × multiplier^(failures − 1)`, at most `max_ms`.
    Exponential {
        initial_ms: u64,
        max_ms: u64,
        multiplier: f64,
    },
    /// Uniformly random between `initial_ms` and what `Exponential` would wait: spreads out
    /// the retries of messages that failed together (a downstream outage), never sooner than
    /// `initial_ms`.
    ExponentialJitter {
        initial_ms: u64,
        max_ms: u64,
        multiplier: f64,
    },
    /// The n-th failure waits `delays_ms[n − 1]`; past the end of the list, its last entry.
    List { delays_ms: Vec<u64> },
}

impl Backoff {
    /// The delay after `failures` failed attempts (1 after the first failure), in
    /// milliseconds. `random` is a uniform draw in [0, 1), used only by
    /// [`Backoff::ExponentialJitter`].
    pub fn delay_ms(&self, failures: u32, random: f64) -> u64 {
        let n = failures.max(1);
        let delay = match self {
            Backoff::None => 0,
            Backoff::Fixed { delay_ms } => *delay_ms,
            Backoff::Linear { initial_ms, max_ms } => {
                initial_ms.saturating_mul(u64::from(n)).min(*max_ms)
            }
            Backoff::Exponential {
                initial_ms,
                max_ms,
                multiplier,
            } => exponential(*initial_ms, *max_ms, *multiplier, n),
            Backoff::ExponentialJitter {
                initial_ms,
                max_ms,
                multiplier,
            } => {
                let cap = exponential(*initial_ms, *max_ms, *multiplier, n);
                let low = (*initial_ms).min(cap);
                let span = (cap - low) as f64;
                let random = if random.is_finite() {
                    random.clamp(0.0, 1.0)
                } else {
                    0.0
                };
                // `random` < 1, but a draw of exactly 1 (or rounding) must not pass the cap.
                (low + (span * random) as u64).min(cap)
            }
            Backoff::List { delays_ms } => {
                let i = (n as usize - 1).min(delays_ms.len().saturating_sub(1));
                delays_ms.get(i).copied().unwrap_or(0)
            }
        };
        delay.min(MAX_DELAY_MS)
    }

    /// Checks the parameters; `field` names this backoff in the error (`backoff`).
    fn validate(&self, field: &str) -> Result<(), (String, String)> {
        let err = |key: &str, message: String| Err((format!("{field}.{key}"), message));
        let delay = |key: &str, ms: u64| {
            if ms > MAX_DELAY_MS {
                err(
                    key,
                    format!("{ms} ms is more than 30 days ({MAX_DELAY_MS} ms)"),
                )
            } else {
                Ok(())
            }
        };
        let range = |initial_ms: u64, max_ms: u64| {
            delay("initial_ms", initial_ms)?;
            delay("max_ms", max_ms)?;
            if initial_ms > max_ms {
                return err(
                    "max_ms",
                    format!("{max_ms} is less than initial_ms ({initial_ms})"),
                );
            }
            Ok(())
        };
        match self {
            Backoff::None => Ok(()),
            Backoff::Fixed { delay_ms } => delay("delay_ms", *delay_ms),
            Backoff::Linear { initial_ms, max_ms } => range(*initial_ms, *max_ms),
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
                range(*initial_ms, *max_ms)?;
                if !multiplier.is_finite() || *multiplier < 1.0 || *multiplier > 100.0 {
                    return err(
                        "multiplier",
                        format!("{multiplier} must be between 1 and 100"),
                    );
                }
                Ok(())
            }
            Backoff::List { delays_ms } => {
                if delays_ms.is_empty() {
                    return err("delays_ms", "must list at least one delay".into());
                }
                for (i, ms) in delays_ms.iter().enumerate() {
                    delay(&format!("delays_ms[{i}]"), *ms)?;
                }
                Ok(())
            }
        }
    }
}

/// `initial × multiplier^(n − 1)`, at most `max`, without overflow.
fn exponential(initial: u64, max: u64, multiplier: f64, n: u32) -> u64 {
    let exp = i32::try_from(n - 1).unwrap_or(i32::MAX);
    let value = initial as f64 * multiplier.powi(exp);
    if !value.is_finite() || value >= max as f64 {
        max
    } else {
        value as u64
    }
}

/// What a full queue (`max_messages` or `max_bytes`) does with a new message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// The oldest ready message is dropped (counted) to make room.
    DropOldest,
    /// The new message is refused: a QoS 1/2 publisher gets 0x97 Quota exceeded.
    RejectNew,
    /// The oldest ready message becomes a dead letter (cause `overflow`) to make room.
    DeadLetter,
}

/// A queue as declared in configuration, over REST or from the CLI.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueDef {
    pub name: String,
    /// Topic filters whose messages the queue stores (at least one).
    pub filters: Vec<String>,
    /// Attempts before a message is dead-lettered (cause `max_attempts`).
    pub max_attempts: u32,
    pub backoff: Backoff,
    /// A leased message not acknowledged within this is a failed attempt.
    pub ack_timeout_ms: u64,
    pub max_messages: Option<u64>,
    pub max_bytes: Option<u64>,
    pub overflow: Overflow,
    /// An expired message becomes a dead letter (cause `expired`) instead of being dropped.
    pub dead_letter_on_expiry: bool,
    /// Priority of a message without a `priority` user property (0–9, higher first).
    pub default_priority: u8,
    /// Dead letters older than this are discarded; `None` keeps them until purged.
    pub dlq_retention_s: Option<u64>,
}

impl QueueDef {
    /// A queue on `filter` with the documented defaults: 5 attempts, no backoff, a 30 s ack
    /// timeout, no size limit, `drop_oldest`, priority 4.
    pub fn new(name: &str, filter: &str) -> QueueDef {
        QueueDef {
            name: name.into(),
            filters: vec![filter.into()],
            max_attempts: 5,
            backoff: Backoff::None,
            ack_timeout_ms: 30_000,
            max_messages: None,
            max_bytes: None,
            overflow: Overflow::DropOldest,
            dead_letter_on_expiry: false,
            default_priority: 4,
            dlq_retention_s: None,
        }
    }

    /// Checks every field; the error names the queue and the field.
    pub fn validate(&self) -> Result<(), QueueDefError> {
        let fail = |field: &str, message: String| QueueDefError {
            queue: self.name.clone(),
            field: field.into(),
            message,
        };
        valid_name(&self.name).map_err(|m| fail("name", m))?;
        if self.filters.is_empty() {
            return Err(fail("filter", "needs at least one topic filter".into()));
        }
        for (i, f) in self.filters.iter().enumerate() {
            let field = format!("filter[{i}]");
            if f.starts_with("$share/") || f.starts_with("$queue/") {
                return Err(fail(
                    &field,
                    format!("{f:?}: a queue takes plain topic filters, not a shared subscription"),
                ));
            }
            if !ferrymq_mqtt::topic::valid_topic_filter(f) {
                return Err(fail(&field, format!("{f:?} is not a valid topic filter")));
            }
        }
        if self.max_attempts == 0 || self.max_attempts > MAX_ATTEMPTS {
            return Err(fail(
                "max_attempts",
                format!("{} must be between 1 and {MAX_ATTEMPTS}", self.max_attempts),
            ));
        }
        self.backoff
            .validate("backoff")
            .map_err(|(field, m)| fail(&field, m))?;
        if self.ack_timeout_ms == 0 || self.ack_timeout_ms > MAX_ACK_TIMEOUT_MS {
            return Err(fail(
                "ack_timeout_ms",
                format!(
                    "{} must be between 1 and {MAX_ACK_TIMEOUT_MS} (12 hours)",
                    self.ack_timeout_ms
                ),
            ));
        }
        if self.max_messages == Some(0) {
            return Err(fail(
                "max_messages",
                "must be at least 1 (omit it for no limit)".into(),
            ));
        }
        if self.max_bytes == Some(0) {
            return Err(fail(
                "max_bytes",
                "must be at least 1 (omit it for no limit)".into(),
            ));
        }
        if self.default_priority > 9 {
            return Err(fail(
                "default_priority",
                format!("{} must be between 0 and 9", self.default_priority),
            ));
        }
        if self.dlq_retention_s == Some(0) {
            return Err(fail(
                "dlq_retention_s",
                "must be at least 1 (omit it to keep dead letters until purged)".into(),
            ));
        }
        Ok(())
    }
}

/// A queue name: letters, digits, `-`, `_` and `.`, at most 128 characters. It appears as a
/// topic level (`$queue/{name}`) and in URLs, so nothing that needs escaping there.
fn valid_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("is longer than {MAX_NAME_LEN} characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{name:?} has {c:?}: use letters, digits, '-', '_' and '.'"
        ));
    }
    if name.starts_with('.') {
        return Err(format!("{name:?} must not start with '.'"));
    }
    Ok(())
}

/// An invalid queue definition: which queue, which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("queue {queue:?}: {field}: {message}")]
pub struct QueueDefError {
    pub queue: String,
    pub field: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp(jitter: bool) -> Backoff {
        let (initial_ms, max_ms, multiplier) = (100, 5_000, 2.0);
        if jitter {
            Backoff::ExponentialJitter {
                initial_ms,
                max_ms,
                multiplier,
            }
        } else {
            Backoff::Exponential {
                initial_ms,
                max_ms,
                multiplier,
            }
        }
    }

    #[test]
    fn each_backoff_kind_waits_exactly_what_it_says() {
        let delays = |b: &Backoff| (1..=8).map(|n| b.delay_ms(n, 0.5)).collect::<Vec<_>>();
        assert_eq!(delays(&Backoff::None), [0; 8]);
        assert_eq!(delays(&Backoff::Fixed { delay_ms: 250 }), [250; 8]);
        let linear = Backoff::Linear {
            initial_ms: 100,
            max_ms: 450,
        };
        assert_eq!(delays(&linear), [100, 200, 300, 400, 450, 450, 450, 450]);
        assert_eq!(
            delays(&exp(false)),
            [100, 200, 400, 800, 1600, 3200, 5000, 5000]
        );
        let list = Backoff::List {
            delays_ms: vec![10, 1_000, 60_000],
        };
        assert_eq!(
            delays(&list),
            [10, 1_000, 60_000, 60_000, 60_000, 60_000, 60_000, 60_000]
        );
        // "After 0 failures" is read as the first retry.
        assert_eq!(exp(false).delay_ms(0, 0.0), 100);
    }

    #[test]
    fn jitter_stays_between_the_initial_delay_and_the_exponential_cap() {
        let b = exp(true);
        for n in 1..=12 {
            let cap = exp(false).delay_ms(n, 0.0);
            assert_eq!(b.delay_ms(n, 0.0), 100.min(cap), "lowest draw, failure {n}");
            let top = b.delay_ms(n, 0.999_999);
            assert!(
                top <= cap && top + 1 >= cap,
                "failure {n}: {top} vs cap {cap}"
            );
            for r in [0.1, 0.37, 0.5, 0.93] {
                let d = b.delay_ms(n, r);
                assert!(
                    (100.min(cap)..=cap).contains(&d),
                    "failure {n}, draw {r}: {d}"
                );
            }
            // A draw out of range (or not a number) is held to the bounds.
            assert!(b.delay_ms(n, 7.0) <= cap);
            assert_eq!(b.delay_ms(n, f64::NAN), 100.min(cap));
        }
        // Different draws spread the retries.
        assert_ne!(b.delay_ms(5, 0.2), b.delay_ms(5, 0.8));
    }

    #[test]
    fn huge_attempt_counts_and_multipliers_do_not_overflow() {
        let b = Backoff::Exponential {
            initial_ms: MAX_DELAY_MS,
            max_ms: MAX_DELAY_MS,
            multiplier: 100.0,
        };
        assert_eq!(b.delay_ms(u32::MAX, 0.0), MAX_DELAY_MS);
        let l = Backoff::Linear {
            initial_ms: MAX_DELAY_MS,
            max_ms: MAX_DELAY_MS,
        };
        assert_eq!(l.delay_ms(u32::MAX, 0.0), MAX_DELAY_MS);
    }

    #[test]
    fn a_sound_definition_passes() {
        let mut q = QueueDef::new("orders.v2", "orders/+/created");
        q.filters.push("orders/#".into());
        q.backoff = exp(true);
        q.max_messages = Some(1_000_000);
        q.overflow = Overflow::DeadLetter;
        assert_eq!(q.validate(), Ok(()));
    }

    #[test]
    fn each_bad_field_is_named() {
        let field = |f: fn(&mut QueueDef)| {
            let mut q = QueueDef::new("jobs", "jobs/#");
            f(&mut q);
            q.validate().expect_err("invalid").field
        };
        assert_eq!(field(|q| q.name = String::new()), "name");
        assert_eq!(field(|q| q.name = "a/b".into()), "name");
        assert_eq!(field(|q| q.name = "x".repeat(129)), "name");
        assert_eq!(field(|q| q.name = ".hidden".into()), "name");
        assert_eq!(field(|q| q.filters.clear()), "filter");
        assert_eq!(field(|q| q.filters = vec!["a/#/b".into()]), "filter[0]");
        assert_eq!(
            field(|q| q.filters.push("$share/g/jobs/#".into())),
            "filter[1]"
        );
        assert_eq!(field(|q| q.max_attempts = 0), "max_attempts");
        assert_eq!(field(|q| q.ack_timeout_ms = 0), "ack_timeout_ms");
        assert_eq!(field(|q| q.default_priority = 10), "default_priority");
        assert_eq!(field(|q| q.max_messages = Some(0)), "max_messages");
        assert_eq!(field(|q| q.max_bytes = Some(0)), "max_bytes");
        assert_eq!(field(|q| q.dlq_retention_s = Some(0)), "dlq_retention_s");
        assert_eq!(
            field(|q| q.backoff = Backoff::Linear {
                initial_ms: 500,
                max_ms: 100
            }),
            "backoff.max_ms"
        );
        assert_eq!(
            field(|q| q.backoff = Backoff::Exponential {
                initial_ms: 1,
                max_ms: 10,
                multiplier: 0.5
            }),
            "backoff.multiplier"
        );
        assert_eq!(
            field(|q| q.backoff = Backoff::ExponentialJitter {
                initial_ms: 1,
                max_ms: 10,
                multiplier: f64::NAN
            }),
            "backoff.multiplier"
        );
        assert_eq!(
            field(|q| q.backoff = Backoff::List { delays_ms: vec![] }),
            "backoff.delays_ms"
        );
        assert_eq!(
            field(|q| q.backoff = Backoff::List {
                delays_ms: vec![1, MAX_DELAY_MS + 1]
            }),
            "backoff.delays_ms[1]"
        );
        assert_eq!(
            field(|q| q.backoff = Backoff::Fixed { delay_ms: u64::MAX }),
            "backoff.delay_ms"
        );
    }

    #[test]
    fn the_error_says_which_queue_which_field_and_why() {
        let mut q = QueueDef::new("jobs", "jobs/#");
        q.max_attempts = 0;
        assert_eq!(
            q.validate().unwrap_err().to_string(),
            "queue \"jobs\": max_attempts: 0 must be between 1 and 1000"
        );
    }
}
