//! The open-files limit: every connection is a descriptor, so the process's soft
//! `RLIMIT_NOFILE` (1,024 by default on many systems) would cap a broker far below
//! `limits.max_connections`. At start the soft limit is raised to the hard limit, as Go's
//! runtime does for nats-server, and a hard limit below what the configuration allows is
//! reported once, instead of showing up later as refused connections.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors the broker needs besides connections: listeners, the log's segments and lock,
/// the admin server, the runtime's own.
pub(crate) const RESERVED: u64 = 64;

/// The open-files limit before and after [`raise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FdLimit {
    pub before: Option<u64>,
    /// `None` = unlimited.
    pub now: Option<u64>,
}

impl FdLimit {
    /// Connections the limit leaves room for; `None` = unlimited.
    pub fn connections(&self) -> Option<u64> {
        self.now.map(|n| n.saturating_sub(RESERVED))
    }
}

/// Raises the soft limit to the hard one. Never fails: a refusal leaves the limit as it was.
pub(crate) fn raise() -> FdLimit {
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    if limit.current == limit.maximum {
        return FdLimit {
            before,
            now: before,
        };
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => FdLimit {
            before,
            now: limit.maximum,
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-files limit");
            FdLimit {
                before,
                now: before,
            }
        }
    }
}

/// Logs the limit, and warns when it leaves less room than `max_connections`.
pub(crate) fn report(limit: FdLimit, max_connections: u64) {
    let show = |v: Option<u64>| v.map_or_else(|| "unlimited".to_string(), |n| n.to_string());
    if limit.before != limit.now {
        tracing::info!(
            from = %show(limit.before),
            to = %show(limit.now),
            "raised the open-files limit"
        );
    }
    if let Some(room) = limit.connections() {
        if room < max_connections {
            tracing::warn!(
                open_files = %show(limit.now),
                max_connections,
                "the open-files limit leaves room for {room} connections, fewer than \
                 limits.max_connections: more are refused with Server Busy; raise the hard \
                 limit (ulimit -Hn, LimitNOFILE=) or lower limits.max_connections"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_reaches_the_hard_limit_and_is_idempotent() {
        // Lower the soft limit a little (always allowed), as a system default would be.
        let hard = getrlimit(Resource::Nofile).maximum;
        let lowered = hard.map_or(65_536, |h| h - 100);
        let lower = Rlimit {
            current: Some(lowered),
            maximum: hard,
        };
        setrlimit(Resource::Nofile, lower).expect("lowering the soft limit");
        let first = raise();
        assert_eq!(first.before, Some(lowered));
        assert_eq!(first.now, hard);
        assert_eq!(getrlimit(Resource::Nofile).current, hard);
        let second = raise();
        assert_eq!(second.before, hard);
        assert_eq!(second.now, hard);
    }

    #[test]
    fn room_for_connections_leaves_the_reserve() {
        let l = FdLimit {
            before: Some(1024),
            now: Some(20_000),
        };
        assert_eq!(l.connections(), Some(20_000 - RESERVED));
        let unlimited = FdLimit {
            before: None,
            now: None,
        };
        assert_eq!(unlimited.connections(), None);
    }
}
