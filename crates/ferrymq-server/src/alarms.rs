//! Alarms: named conditions an operator must hear about (memory over its mark, disk low, a
//! subscriber stalling publishers, ...), each active or not, with when it began and why.
//!
//! ```text
//!  router / resource checks ──raise(name, message)/clear(name)──▶ Alarms (Arc<Mutex>)
//!        │                                                    │ list()   ──▶ GET /api/v1/alarms,
//!        │                                                    │              ferrymq_alarm_active
//!        └── each step: drain_changes() ──▶ retained PUBLISH on $SYS/broker/alarms/{name}
//! ```
//! One table behind a mutex, shared by the router (which raises, clears and publishes) and the
//! admin server (which lists): touched a few times a second at most, never per message.
//!
//! Raising an active alarm or clearing an inactive one changes nothing (the first message
//! and time stay). Clearing publishes the alarm again with `"active": false` and the time it
//! cleared, retained, rather than deleting the retained message: a client that subscribes
//! later still sees that it fired and when it ended.

use std::sync::{Arc, Mutex};

use serde::Serialize;

/// Every alarm the broker knows. Each is listed (and exported) whether active or not, so a
/// dashboard finds it at 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlarmName {
    /// The process's memory is over `limits.memory_high_watermark`.
    MemoryHighWatermark,
    /// The data directory's free space is under `storage.min_free_bytes`, or the log found
    /// the disk full.
    DiskLow,
    /// A session's queue is over its configured depth.
    QueueDepth,
    /// A subscriber has been holding publishers back.
    SlowSubscriber,
    /// A dead-letter queue is growing (once queues exist).
    DlqGrowth,
}

impl AlarmName {
    pub const ALL: [AlarmName; 5] = [
        AlarmName::MemoryHighWatermark,
        AlarmName::DiskLow,
        AlarmName::QueueDepth,
        AlarmName::SlowSubscriber,
        AlarmName::DlqGrowth,
    ];

    /// The name in topics, metric labels and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            AlarmName::MemoryHighWatermark => "memory_high_watermark",
            AlarmName::DiskLow => "disk_low",
            AlarmName::QueueDepth => "queue_depth",
            AlarmName::SlowSubscriber => "slow_subscriber",
            AlarmName::DlqGrowth => "dlq_growth",
        }
    }
}

/// One alarm as listed and published. Times are milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AlarmState {
    pub name: AlarmName,
    pub active: bool,
    /// When it was last raised (None: never since the broker started).
    pub since: Option<u64>,
    /// When it was last cleared, if it is not active.
    pub cleared: Option<u64>,
    /// Why it was last raised.
    pub message: String,
}

impl AlarmState {
    /// The retained payload on `$SYS/broker/alarms/{name}`: this, as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn topic(&self) -> String {
        format!("$SYS/broker/alarms/{}", self.name.as_str())
    }
}

#[derive(Debug)]
struct Table {
    alarms: Vec<AlarmState>,
    /// Alarms changed since the router last drained them, oldest first (an alarm raised and
    /// cleared in between appears twice, each with its state at the time).
    changes: Vec<AlarmState>,
}

/// The registry; clones share it.
#[derive(Debug, Clone)]
pub struct Alarms(Arc<Mutex<Table>>);

impl Default for Alarms {
    fn default() -> Self {
        let alarms = AlarmName::ALL
            .iter()
            .map(|&name| AlarmState {
                name,
                active: false,
                since: None,
                cleared: None,
                message: String::new(),
            })
            .collect();
        Alarms(Arc::new(Mutex::new(Table {
            alarms,
            changes: Vec::new(),
        })))
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Alarms {
    /// Activates `name` with `message`; true if it was not active already (otherwise nothing
    /// changes, the first message included).
    pub fn raise(&self, name: AlarmName, message: impl Into<String>) -> bool {
        let mut t = self.lock();
        let Some(a) = t.alarms.iter_mut().find(|a| a.name == name) else {
            return false;
        };
        if a.active {
            return false;
        }
        a.active = true;
        a.since = Some(now_ms());
        a.cleared = None;
        a.message = message.into();
        let changed = a.clone();
        tracing::warn!(alarm = name.as_str(), message = %changed.message, "alarm raised");
        t.changes.push(changed);
        true
    }

    /// Deactivates `name`; true if it was active.
    pub fn clear(&self, name: AlarmName) -> bool {
        let mut t = self.lock();
        let Some(a) = t.alarms.iter_mut().find(|a| a.name == name) else {
            return false;
        };
        if !a.active {
            return false;
        }
        a.active = false;
        a.cleared = Some(now_ms());
        let changed = a.clone();
        tracing::info!(alarm = name.as_str(), "alarm cleared");
        t.changes.push(changed);
        true
    }

    /// Raises or clears `name` as `active` says (`message` is used only to raise).
    pub fn set(&self, name: AlarmName, active: bool, message: impl FnOnce() -> String) -> bool {
        if active {
            self.raise(name, message())
        } else {
            self.clear(name)
        }
    }

    pub fn is_active(&self, name: AlarmName) -> bool {
        self.lock()
            .alarms
            .iter()
            .any(|a| a.name == name && a.active)
    }

    /// Every known alarm, active or not, in [`AlarmName::ALL`] order.
    pub fn list(&self) -> Vec<AlarmState> {
        self.lock().alarms.clone()
    }

    /// Whether changes wait to be drained.
    pub(crate) fn has_changes(&self) -> bool {
        !self.lock().changes.is_empty()
    }

    /// The changes since the last call, oldest first.
    pub(crate) fn drain_changes(&self) -> Vec<AlarmState> {
        std::mem::take(&mut self.lock().changes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn raise_and_clear_are_recorded_once_each_and_listed() {
        let alarms = Alarms::default();
        assert!(alarms.raise(AlarmName::DiskLow, "12 bytes free"));
        assert!(
            !alarms.raise(AlarmName::DiskLow, "11 bytes free"),
            "already active"
        );
        assert!(alarms.is_active(AlarmName::DiskLow));
        assert!(!alarms.clear(AlarmName::SlowSubscriber), "was not active");
        let changes = alarms.drain_changes();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].message, "12 bytes free");
        assert!(alarms.clear(AlarmName::DiskLow));
        let changes = alarms.drain_changes();
        assert_eq!(changes.len(), 1);
        assert!(!changes[0].active && changes[0].cleared.is_some());
        assert!(alarms.drain_changes().is_empty());
        let listed = alarms.list();
        assert_eq!(listed.len(), AlarmName::ALL.len());
        let json: serde_json::Value = serde_json::from_str(&listed[1].to_json()).unwrap();
        assert_eq!(json["name"], "disk_low");
        assert_eq!(json["active"], false);
        assert_eq!(json["message"], "12 bytes free");
    }
}
