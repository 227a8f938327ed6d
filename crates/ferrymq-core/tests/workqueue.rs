//! One work queue's state machine on a virtual clock (issue 11, not yet reachable from the
//! broker): retries with backoff, attempt counting, ack timeouts, lost consumers, every
//! dead-lettering cause, priority, delay, expiry and each overflow policy.

use ferrymq_core::workqueue::*;
use ferrymq_core::{SessionId, Time};

const C1: SessionId = SessionId(1);
const C2: SessionId = SessionId(2);

fn entry(id: u64, priority: u8) -> Entry {
    Entry {
        id,
        position: id,
        size: 100,
        priority,
        attempts: 0,
        first_enqueued: Time(0),
    }
}

fn nack(at: u64, consumer: SessionId, reason: &str) -> Failure {
    Failure {
        at: Time(at),
        reason_code: 0x80,
        reason: reason.into(),
        consumer,
    }
}

fn never(_: &Entry) -> bool {
    false
}

fn queue(f: impl FnOnce(&mut QueueDef)) -> Queue {
    let mut def = QueueDef::new("jobs", "jobs/#");
    f(&mut def);
    def.validate().expect("valid");
    Queue::new(def)
}

#[test]
fn three_nacks_with_growing_delays_then_a_dead_letter_with_every_failure() {
    let mut q = queue(|d| {
        d.max_attempts = 3;
        d.backoff = Backoff::Exponential {
            initial_ms: 100,
            max_ms: 10_000,
            multiplier: 3.0,
        };
    });
    q.enqueue(entry(1, 4), None, Time(0));
    let mut now = 0;
    let mut dues = Vec::new();
    for attempt in 1..=3u16 {
        let e = q.lease(C1, Time(now), never).expect("ready");
        assert_eq!(e.attempts, attempt - 1, "attempts so far travel with it");
        let r = q.fail(
            1,
            nack(now, C1, &format!("boom {attempt}")),
            None,
            0.0,
            Time(now),
        );
        match r {
            Some(Retry::At(due)) => {
                // Not before its due time.
                assert!(q.lease(C1, Time(due.0 - 1), never).is_none());
                dues.push(due.0 - now);
                now = due.0;
            }
            Some(Retry::DeadLettered(cause)) => {
                assert_eq!((attempt, cause), (3, Cause::MaxAttempts));
            }
            None => panic!("the lease was not known"),
        }
    }
    assert_eq!(dues, vec![100, 300], "initial, then times the multiplier");
    let dead: Vec<&DeadLetter> = q.dead_letters().collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].entry.attempts, 3);
    let reasons: Vec<&str> = dead[0].failures.iter().map(|f| &*f.reason).collect();
    assert_eq!(reasons, vec!["boom 1", "boom 2", "boom 3"]);
    assert_eq!(q.depth(), 0);
    assert_eq!(q.stats.dead_lettered.get(&Cause::MaxAttempts), Some(&1));
    assert_eq!(q.stats.redelivered, 2);
}

#[test]
fn a_nack_s_own_delay_overrides_the_backoff() {
    let mut q = queue(|d| d.backoff = Backoff::Fixed { delay_ms: 5_000 });
    q.enqueue(entry(1, 4), None, Time(0));
    q.lease(C1, Time(0), never).expect("ready");
    let r = q.fail(1, nack(0, C1, "later"), Some(50), 0.0, Time(0));
    assert_eq!(r, Some(Retry::At(Time(50))));
}

#[test]
fn an_ack_timeout_is_a_failed_attempt_and_a_late_ack_is_refused() {
    let mut q = queue(|d| {
        d.ack_timeout_ms = 1_000;
        d.backoff = Backoff::Fixed { delay_ms: 200 };
    });
    q.enqueue(entry(1, 4), None, Time(0));
    q.lease(C1, Time(0), never).expect("ready");
    assert_eq!(q.next_deadline(), Some(Time(1_000)));
    assert!(q.expire_leases(Time(999), || 0.0).is_empty());
    let expired = q.expire_leases(Time(1_000), || 0.0);
    assert_eq!(expired, vec![(1, Retry::At(Time(1_200)))]);
    assert!(
        !q.ack(1, C1),
        "the lease was returned: a late ack does not count"
    );
    let again = q.lease(C2, Time(1_200), never).expect("redelivered");
    assert_eq!(again.attempts, 1);
    assert!(!q.ack(1, C1), "only the consumer holding the lease acks it");
    assert!(q.ack(1, C2));
    assert_eq!((q.depth(), q.leased()), (0, 0));
    assert_eq!(q.stats.acked, 1);
}

#[test]
fn a_lost_consumer_returns_every_lease_at_once_each_a_failed_attempt() {
    let mut q = queue(|d| d.max_attempts = 2);
    for id in 1..=3 {
        q.enqueue(entry(id, 4), None, Time(0));
    }
    q.lease(C1, Time(0), never);
    q.lease(C2, Time(0), never);
    q.lease(C1, Time(0), never);
    let returned = q.release_consumer(C1, Time(10), || 0.0);
    assert_eq!(
        returned,
        vec![(1, Retry::At(Time(10))), (3, Retry::At(Time(10)))]
    );
    assert_eq!(q.leased(), 1, "the other consumer keeps its lease");
    // Lost again: the second attempt is the last.
    q.lease(C1, Time(10), never);
    q.lease(C1, Time(10), never);
    let returned = q.release_consumer(C1, Time(20), || 0.0);
    assert_eq!(returned.len(), 2);
    assert!(returned
        .iter()
        .all(|(_, r)| *r == Retry::DeadLettered(Cause::MaxAttempts)));
    let d = q.dead_letters().next().expect("a dead letter");
    assert_eq!(&*d.failures[0].reason, "consumer gone");
}

#[test]
fn a_rejected_message_is_a_dead_letter_at_once() {
    let mut q = queue(|d| d.max_attempts = 10);
    q.enqueue(entry(1, 4), None, Time(0));
    q.lease(C1, Time(0), never);
    let mut f = nack(0, C1, "bad payload");
    f.reason_code = 0x99;
    assert!(q.reject(1, f, Time(5)));
    let d = q.dead_letters().next().expect("a dead letter");
    assert_eq!(
        (d.cause, d.entry.attempts, d.dead_lettered),
        (Cause::Rejected, 1, Time(5))
    );
}

#[test]
fn priority_first_fifo_within_a_level_and_delayed_messages_wait() {
    let mut q = queue(|_| {});
    q.enqueue(entry(1, 2), None, Time(0));
    q.enqueue(entry(2, 7), Some(Time(100)), Time(0));
    q.enqueue(entry(3, 7), None, Time(0));
    q.enqueue(entry(4, 2), None, Time(0));
    assert_eq!(q.delayed(), 1);
    let order = |q: &mut Queue, now| {
        std::iter::from_fn(|| q.lease(C1, Time(now), never).map(|e| e.id)).collect::<Vec<_>>()
    };
    assert_eq!(order(&mut q, 50), vec![3, 1, 4]);
    assert_eq!(order(&mut q, 100), vec![2]);
}

#[test]
fn expired_messages_are_dropped_or_dead_lettered() {
    for dead_letter_on_expiry in [false, true] {
        let mut q = queue(|d| d.dead_letter_on_expiry = dead_letter_on_expiry);
        q.enqueue(entry(1, 4), None, Time(0));
        q.enqueue(entry(2, 4), None, Time(0));
        let leased = q.lease(C1, Time(0), |e| e.id == 1).map(|e| e.id);
        assert_eq!(leased, Some(2), "the expired one is skipped");
        if dead_letter_on_expiry {
            let d = q.dead_letters().next().expect("a dead letter");
            assert_eq!((d.entry.id, d.cause), (1, Cause::Expired));
        } else {
            assert_eq!(q.dead_letters().count(), 0);
            assert_eq!(q.stats.dropped_expired, 1);
        }
    }
}

#[test]
fn each_overflow_policy() {
    let full = |overflow| {
        let mut q = queue(|d| {
            d.max_messages = Some(2);
            d.overflow = overflow;
        });
        q.enqueue(entry(1, 4), None, Time(0));
        q.enqueue(entry(2, 4), None, Time(0));
        q
    };
    let mut q = full(Overflow::RejectNew);
    assert_eq!(q.enqueue(entry(3, 4), None, Time(0)), Enqueued::Refused);
    assert_eq!(q.depth(), 2);

    let mut q = full(Overflow::DropOldest);
    assert_eq!(
        q.enqueue(entry(3, 4), None, Time(0)),
        Enqueued::Displaced(entry(1, 4))
    );
    assert_eq!(q.stats.dropped_overflow, 1);

    let mut q = full(Overflow::DeadLetter);
    assert_eq!(
        q.enqueue(entry(3, 4), None, Time(0)),
        Enqueued::DeadLettered(1)
    );
    assert_eq!(
        q.dead_letters().next().map(|d| d.cause),
        Some(Cause::Overflow)
    );

    // Leased messages count toward the limit; with nothing ready to make room, refused.
    let mut q = full(Overflow::DropOldest);
    q.lease(C1, Time(0), never);
    q.lease(C1, Time(0), never);
    assert_eq!(q.enqueue(entry(3, 4), None, Time(0)), Enqueued::Refused);

    // Bytes too.
    let mut q = queue(|d| {
        d.max_bytes = Some(250);
        d.overflow = Overflow::RejectNew;
    });
    assert_eq!(q.enqueue(entry(1, 4), None, Time(0)), Enqueued::Accepted);
    assert_eq!(q.enqueue(entry(2, 4), None, Time(0)), Enqueued::Accepted);
    assert_eq!(q.enqueue(entry(3, 4), None, Time(0)), Enqueued::Refused);
}

#[test]
fn jittered_retries_stay_within_their_bounds() {
    let mut q = queue(|d| {
        d.max_attempts = 100;
        d.backoff = Backoff::ExponentialJitter {
            initial_ms: 100,
            max_ms: 2_000,
            multiplier: 2.0,
        };
    });
    q.enqueue(entry(1, 4), None, Time(0));
    let mut now = 0;
    let draws = [0.0, 0.99, 0.5, 0.25, 0.75, 0.1, 0.9, 0.6];
    for (n, draw) in draws.iter().enumerate() {
        q.lease(C1, Time(now), never).expect("ready");
        let Some(Retry::At(due)) = q.fail(1, nack(now, C1, "x"), None, *draw, Time(now)) else {
            panic!("retried");
        };
        let cap = (100u64 << n).min(2_000);
        let delay = due.0 - now;
        assert!(
            (100..=cap).contains(&delay),
            "failure {}: {delay} ms, cap {cap}",
            n + 1
        );
        now = due.0;
    }
}
