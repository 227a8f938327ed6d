//! Work queues through the engine on a virtual clock (issue 11): MQTT consumers on
//! `$queue/{name}`, acks and nacks, retries with backoff, ack timeouts, lost consumers, every
//! dead-lettering cause, priority, delay, expiry, each overflow policy, fair distribution,
//! redrive, and restarts from the journal (with and without a checkpoint).

#![allow(clippy::unwrap_used, clippy::needless_range_loop)]

mod wq;

use ferrymq_core::workqueue::*;
use ferrymq_core::*;
use ferrymq_mqtt::*;
use wq::*;

#[test]
fn three_nacks_with_growing_delays_then_a_dead_letter_redriven_and_acked() {
    let mut h = setup(|d| {
        d.max_attempts = 3;
        d.backoff = Backoff::Exponential {
            initial_ms: 100,
            max_ms: 10_000,
            multiplier: 3.0,
        };
    });
    h.publish(2, "jobs/a", "work");
    assert_eq!(h.acks(2), vec![ReasonCode::Success]);
    let mut t = 0;
    let mut delays = Vec::new();
    for attempt in 1..=3 {
        let got = h.got(1);
        assert_eq!(got.len(), 1, "attempt {attempt} delivered once");
        assert_eq!(got[0].attempt.as_deref(), Some(&*attempt.to_string()));
        assert_eq!(got[0].first_enqueued.as_deref(), Some(&*START.to_string()));
        assert_eq!(got[0].topic, "jobs/a");
        h.nack(
            1,
            got[0].pid.unwrap(),
            ReasonCode::UnspecifiedError,
            &format!("boom {attempt}"),
            None,
        );
        if attempt < 3 {
            // Not before its delay, then at once.
            let due = h.b.next_deadline().unwrap().0 - START;
            delays.push(due - t);
            h.tick_to(due - 1);
            assert!(h.got(1).is_empty(), "redelivered before its backoff");
            h.tick_to(due);
            t = due;
        }
    }
    assert_eq!(delays, vec![100, 300], "exponential, multiplier 3");
    let dead = h.dead("jobs");
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.dead.cause, Cause::MaxAttempts);
    assert_eq!(d.dead.entry.attempts, 3);
    let reasons: Vec<&str> = d.dead.failures.iter().map(|f| &*f.reason).collect();
    assert_eq!(reasons, vec!["boom 1", "boom 2", "boom 3"]);
    assert!(d
        .dead
        .failures
        .iter()
        .all(|f| &*f.consumer == "c" && f.reason_code == 0x80));
    assert_eq!(&*d.message.topic, "jobs/a");
    assert_eq!(h.view("jobs").depth, 0);

    // Redrive: attempt 1 again, the failures kept; an ack clears it.
    let id = d.dead.entry.id;
    let moved =
        h.b.redrive_dead_letters("jobs", &[id], None, h.now, &mut h.out)
            .unwrap();
    assert_eq!(moved, 1);
    let got = h.got(1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].attempt.as_deref(), Some("1"));
    h.nack(
        1,
        got[0].pid.unwrap(),
        ReasonCode::UnspecifiedError,
        "boom 4",
        Some(0),
    );
    let got = h.got(1);
    assert_eq!(
        got[0].attempt.as_deref(),
        Some("2"),
        "a nack's own delay of 0"
    );
    h.ack(1, got[0].pid.unwrap());
    let v = h.view("jobs");
    assert_eq!((v.depth, v.leased, v.dead_letters), (0, 0, 0));
    assert_eq!(v.stats.acked, 1);
}

#[test]
fn an_ack_timeout_is_a_failed_attempt_and_a_late_ack_does_nothing() {
    let mut h = H::new();
    h.declare(jobs(|d| d.ack_timeout_ms = 1_000));
    // An MQTT 3.1.1 consumer can only ack: it never does.
    h.connect(1, "c", V3, 10, true);
    assert_eq!(
        h.subscribe(1, "$queue/jobs", QoS::AtLeastOnce),
        ReasonCode::GrantedQoS1
    );
    h.connect(2, "p", V5, 10, false);
    h.publish(2, "jobs/x", "m");
    let first = h.got(1);
    assert_eq!(first.len(), 1);
    h.tick_to(999);
    assert!(h.got(1).is_empty());
    h.tick_to(1_000);
    let again = h.got(1);
    assert_eq!(again.len(), 1, "redelivered after the ack timeout");
    assert_ne!(again[0].pid, first[0].pid, "a new delivery, not a resend");
    assert_eq!(h.view("jobs").stats.nacked, 1);
    // The late ack of the first delivery does not ack the second lease.
    h.ack(1, first[0].pid.unwrap());
    assert_eq!(h.view("jobs").leased, 1);
    h.ack(1, again[0].pid.unwrap());
    assert_eq!((h.view("jobs").leased, h.view("jobs").stats.acked), (0, 1));
}

#[test]
fn a_lost_consumer_gives_its_leases_back_at_once_each_a_failed_attempt() {
    let mut h = setup(|_| {});
    h.connect(3, "c2", V5, 10, false);
    h.subscribe(3, "$queue/jobs", QoS::AtLeastOnce);
    for i in 0..4 {
        h.publish(2, "jobs/x", &format!("m{i}"));
    }
    let c1 = h.payloads(1);
    let c2 = h.payloads(3);
    assert_eq!((c1.len(), c2.len()), (2, 2), "round robin");
    h.b.closed(ConnId(1), h.now, &mut h.out);
    let moved = h.got(3);
    assert_eq!(
        moved.iter().map(|g| g.payload.clone()).collect::<Vec<_>>(),
        c1,
        "the lost consumer's two go to the other"
    );
    assert!(moved.iter().all(|g| g.attempt.as_deref() == Some("2")));
    let v = h.view("jobs");
    assert_eq!((v.leased, v.stats.nacked, v.stats.redelivered), (4, 2, 2));
}

#[test]
fn a_rejection_dead_letters_at_once_and_dlq_subscribers_see_it() {
    let mut h = setup(|_| {});
    h.connect(4, "ops", V5, 10, false);
    h.subscribe(4, "$dlq/jobs", QoS::AtLeastOnce);
    h.publish_with(
        2,
        "jobs/x",
        "bad",
        &[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )],
    );
    let got = h.got(1);
    h.nack(
        1,
        got[0].pid.unwrap(),
        ReasonCode::PayloadFormatInvalid,
        "not json",
        None,
    );
    let dead = h.dead("jobs");
    assert_eq!(dead[0].dead.cause, Cause::Rejected);
    assert_eq!(dead[0].dead.failures[0].reason_code, 0x99);
    assert_eq!(
        dead[0].trace_id.as_deref(),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );
    let dlq = h.got(4);
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].topic, "$dlq/jobs");
    assert_eq!(dlq[0].payload, "bad");
    // A new reader of `$dlq/jobs` gets the dead letters already there.
    h.connect(5, "ops2", V5, 10, false);
    h.subscribe(5, "$dlq/#", QoS::AtLeastOnce);
    assert_eq!(h.payloads(5), vec!["bad"]);
}

#[test]
fn priority_first_fifo_within_a_level_delay_and_expiry() {
    let mut h = H::new();
    h.declare(jobs(|d| d.dead_letter_on_expiry = true));
    h.connect(2, "p", V5, 10, false);
    h.publish_with(2, "jobs/a", "low", &[("priority", "1")]);
    h.publish_with(2, "jobs/a", "high1", &[("priority", "9")]);
    h.publish(2, "jobs/a", "default");
    h.publish_with(2, "jobs/a", "high2", &[("priority", "9")]);
    h.publish_with(2, "jobs/a", "later", &[("delay-ms", "5000")]);
    h.publish_full(2, "jobs/a", "stale", &[], Some(1));
    h.publish(2, "$delayed/2/jobs/b", "delayed-publish");
    assert_eq!(h.acks(2).len(), 7);
    assert_eq!(
        h.view("jobs").depth,
        6,
        "the $delayed one is not in the queue yet"
    );
    h.tick_to(1_000);
    h.connect(1, "c", V5, 100, false);
    h.subscribe(1, "$queue/jobs", QoS::AtLeastOnce);
    assert_eq!(h.payloads(1), vec!["high1", "high2", "default", "low"]);
    assert_eq!(h.dead("jobs")[0].dead.cause, Cause::Expired);
    h.tick_to(2_000);
    assert_eq!(
        h.payloads(1),
        vec!["delayed-publish"],
        "published to jobs/b when due"
    );
    h.tick_to(5_000);
    assert_eq!(h.payloads(1), vec!["later"]);
    // An invalid $delayed topic is refused.
    h.publish(2, "$delayed/soon/jobs/a", "x");
    assert_eq!(h.acks(2), vec![ReasonCode::TopicNameInvalid]);
}

#[test]
fn each_overflow_policy() {
    // reject_new: 0x97 to the publisher, nothing else lost.
    let mut h = H::new();
    h.declare(jobs(|d| {
        d.max_messages = Some(2);
        d.overflow = Overflow::RejectNew;
    }));
    h.connect(2, "p", V5, 10, false);
    for i in 0..3 {
        h.publish(2, "jobs/a", &format!("m{i}"));
    }
    assert_eq!(
        h.acks(2),
        vec![
            ReasonCode::Success,
            ReasonCode::Success,
            ReasonCode::QuotaExceeded
        ]
    );
    assert_eq!(h.view("jobs").depth, 2);

    // drop_oldest: counted.
    let mut h = H::new();
    h.declare(jobs(|d| {
        d.max_messages = Some(2);
        d.overflow = Overflow::DropOldest;
    }));
    h.connect(2, "p", V5, 10, false);
    for i in 0..3 {
        h.publish(2, "jobs/a", &format!("m{i}"));
    }
    assert_eq!(h.view("jobs").stats.dropped_overflow, 1);
    h.connect(1, "c", V5, 10, false);
    h.subscribe(1, "$queue/jobs", QoS::AtLeastOnce);
    assert_eq!(h.payloads(1), vec!["m1", "m2"]);

    // dead_letter: the oldest becomes a dead letter, cause overflow.
    let mut h = H::new();
    h.declare(jobs(|d| {
        d.max_messages = Some(2);
        d.overflow = Overflow::DeadLetter;
    }));
    h.connect(2, "p", V5, 10, false);
    for i in 0..3 {
        h.publish(2, "jobs/a", &format!("m{i}"));
    }
    let dead = h.dead("jobs");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].dead.cause, Cause::Overflow);
    assert_eq!(&dead[0].message.payload[..], b"m0");
}

#[test]
fn distribution_is_fair_and_each_window_bounds_leases() {
    let mut h = H::new();
    h.declare(jobs(|_| {}));
    h.connect(2, "p", V5, 10, false);
    for c in 0..3u64 {
        h.connect(10 + c, &format!("c{c}"), V5, 5, false);
        h.subscribe(10 + c, "$queue/jobs", QoS::AtLeastOnce);
    }
    for i in 0..30 {
        h.publish(2, "jobs/a", &format!("m{i}"));
    }
    let mut counts = Vec::new();
    for c in 0..3u64 {
        counts.push(h.got(10 + c).len());
    }
    assert_eq!(counts, vec![5, 5, 5], "each holds its window, no more");
    assert_eq!(h.view("jobs").depth, 15);
    // Acks open windows; over the whole run each consumer gets a third.
    let mut total = [5usize; 3];
    let mut pids: Vec<Vec<u16>> = vec![(1..=5).collect(); 3];
    while h.view("jobs").depth > 0 || h.view("jobs").leased > 0 {
        for c in 0..3usize {
            for pid in std::mem::take(&mut pids[c]) {
                h.ack(10 + c as u64, pid);
            }
        }
        for c in 0..3usize {
            let got = h.got(10 + c as u64);
            total[c] += got.len();
            pids[c] = got.iter().map(|g| g.pid.unwrap()).collect();
        }
    }
    assert_eq!(total, [10, 10, 10]);
}

#[test]
fn a_consumer_of_a_missing_queue_is_refused_and_share_syntax_consumes() {
    let mut h = H::new();
    h.declare(jobs(|_| {}));
    h.connect(1, "c", V5, 10, false);
    assert_eq!(
        h.subscribe(1, "$queue/nope", QoS::AtLeastOnce),
        ReasonCode::TopicFilterInvalid
    );
    assert_eq!(
        h.subscribe(1, "$share/jobs/jobs/#", QoS::AtLeastOnce),
        ReasonCode::GrantedQoS1
    );
    h.connect(2, "p", V5, 10, false);
    h.publish(2, "jobs/a", "x");
    let got = h.got(1);
    assert_eq!(
        got.len(),
        1,
        "once, through the queue, not also as a shared subscription"
    );
    assert_eq!(got[0].attempt.as_deref(), Some("1"));
    // Publishing to the reserved prefixes is refused.
    h.publish(2, "$queue/jobs", "x");
    h.publish(2, "$dlq/jobs", "x");
    let acks = h.acks(2);
    assert_eq!(
        acks[1..],
        [ReasonCode::NotAuthorized, ReasonCode::NotAuthorized]
    );
}

fn restart_keeps_everything(checkpoint: bool) {
    let mut h = setup(|d| {
        d.max_attempts = 5;
        d.backoff = Backoff::Fixed { delay_ms: 60_000 };
    });
    h.connect(3, "c2", V5, 1, false);
    h.subscribe(3, "$queue/jobs", QoS::AtLeastOnce);
    for i in 0..6 {
        h.publish(2, "jobs/a", &format!("m{i}"));
    }
    // Round robin with c2's window of 1: c leases m0, m2, m3, m4, m5 and c2 m1. c nacks m0
    // (delayed a minute), rejects m2 (dead), acks m3; m4, m5 and m1 stay leased.
    let got = h.got(1);
    let other = h.payloads(3);
    assert_eq!((got.len(), other.len()), (5, 1), "{got:?} {other:?}");
    h.nack(
        1,
        got[0].pid.unwrap(),
        ReasonCode::UnspecifiedError,
        "later",
        None,
    );
    h.nack(
        1,
        got[1].pid.unwrap(),
        ReasonCode::PayloadFormatInvalid,
        "bad",
        None,
    );
    h.ack(1, got[2].pid.unwrap());
    h.publish(2, "$delayed/30/jobs/b", "timed");
    let before = h.view("jobs");
    assert_eq!(before.depth, 1, "{before:?}");
    assert_eq!(before.leased, 3);
    if checkpoint {
        h.checkpoint();
    }
    let report = h.restart();
    assert_eq!(report.queues, 2, "jobs and $delayed");
    let after = h.view("jobs");
    // The three leases came back as failed attempts ("broker restarted"), delayed by the
    // fixed backoff; nothing was lost.
    assert_eq!(after.leased, 0);
    assert_eq!(after.depth, 4, "{after:?}");
    assert_eq!(after.delayed, 4);
    assert_eq!(after.dead_letters, 1);
    assert_eq!(h.b.delayed_publishes(), 1);
    h.connect(1, "c", V5, 10, true);
    h.tick_to(60_000);
    let got = h.got(1);
    let mut payloads: Vec<_> = got.iter().map(|g| g.payload.clone()).collect();
    payloads.sort();
    assert_eq!(payloads, vec!["m0", "m1", "m4", "m5", "timed"]);
    let attempts: Vec<_> = got
        .iter()
        .filter(|g| g.payload != "timed")
        .map(|g| g.attempt.clone().unwrap())
        .collect();
    assert!(attempts.iter().all(|a| a == "2"), "{attempts:?}");
}

#[test]
fn a_restart_keeps_queued_leased_delayed_and_dead_messages_and_attempts() {
    restart_keeps_everything(false);
}

#[test]
fn a_restart_from_a_checkpoint_keeps_the_same() {
    restart_keeps_everything(true);
}

#[test]
fn a_backlog_past_the_memory_budget_is_read_back_from_the_log() {
    let mut h = H::with_config(BrokerConfig {
        queue_memory_bytes: 1_000,
        ..Default::default()
    });
    h.declare(jobs(|_| {}));
    h.connect(2, "p", V5, 10, false);
    for i in 0..100 {
        h.publish(2, "jobs/a", &format!("payload-{i:04}-{}", "x".repeat(40)));
        h.flush();
    }
    let v = h.view("jobs");
    assert_eq!(v.depth, 100);
    assert!(
        v.cached_bytes <= 1_000,
        "kept {} bytes in memory",
        v.cached_bytes
    );
    assert!(
        h.b.queue_floor().is_some_and(|f| f > 0),
        "the floor is the first message's record"
    );
    // A checkpoint and a restart hold positions, not messages; the consumer gets them all,
    // in order, read back from the log.
    h.checkpoint();
    h.write_snapshot();
    assert_eq!(
        h.snapshot_floor,
        h.b.queue_floor(),
        "the floor found while writing the snapshot is the queue's"
    );
    h.inline_checkpoint();
    assert_eq!(
        h.b.checkpoint_queue_floor(),
        h.b.queue_floor(),
        "the floor found while writing an inline checkpoint is the queue's"
    );
    h.restart();
    assert_eq!(h.view("jobs").cached_bytes, 0);
    h.connect(1, "c", V5, 1000, false);
    h.subscribe(1, "$queue/jobs", QoS::AtLeastOnce);
    let got = h.payloads(1);
    let want: Vec<String> = (0..100)
        .map(|i| format!("payload-{i:04}-{}", "x".repeat(40)))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn a_record_that_is_not_the_message_is_never_delivered() {
    let mut h = H::new();
    h.declare(jobs(|_| {}));
    h.connect(2, "p", V5, 10, false);
    h.publish(2, "jobs/a", "real");
    h.checkpoint();
    h.restart();
    // Damage: every record that could hold the message is replaced by something else.
    {
        let mut log = h.log.lock().unwrap();
        for r in log.iter_mut() {
            if r.first() == Some(&24) {
                *r = vec![26, 4, b'j', b'o', b'b', b's', 9];
            }
        }
    }
    h.connect(1, "c", V5, 10, false);
    h.subscribe(1, "$queue/jobs", QoS::AtLeastOnce);
    assert!(h.payloads(1).is_empty());
    let v = h.view("jobs");
    assert_eq!((v.depth, v.stats.unreadable), (0, 1));
}

#[test]
fn message_ids_are_not_handed_out_again_after_a_restart() {
    let mut h = H::new();
    h.declare(jobs(|_| {}));
    h.connect(2, "p", V5, 10, false);
    for i in 0..3 {
        h.publish(2, "jobs/a", &format!("before-{i}"));
    }
    // No checkpoint: the queue's records are all replay has to go on.
    h.restart();
    h.connect(2, "p", V5, 10, false);
    for i in 0..3 {
        h.publish(2, "jobs/a", &format!("after-{i}"));
    }
    assert_eq!(h.view("jobs").depth, 6);
    h.connect(1, "c", V5, 100, false);
    h.subscribe(1, "$queue/jobs", QoS::AtLeastOnce);
    let got = h.got(1);
    let payloads: Vec<_> = got.iter().map(|g| g.payload.clone()).collect();
    assert_eq!(
        payloads,
        vec!["before-0", "before-1", "before-2", "after-0", "after-1", "after-2"]
    );
    for g in got {
        h.ack(1, g.pid.unwrap());
    }
    let v = h.view("jobs");
    assert_eq!((v.depth, v.leased, v.bytes, v.stats.acked), (0, 0, 0, 6));
}

#[test]
fn a_checkpoint_of_a_large_backlog_keeps_order_failures_and_delays() {
    let mut h = setup(|d| d.backoff = Backoff::Fixed { delay_ms: 1_000 });
    h.b.closed(ConnId(1), h.now, &mut h.out);
    for i in 0..10_000 {
        h.publish(2, "jobs/a", &format!("m{i:05}"));
    }
    // One message fails once (it keeps its failure and waits a second); another of higher
    // priority jumps the line.
    h.connect(3, "c3", V5, 1, false);
    h.subscribe(3, "$queue/jobs", QoS::AtLeastOnce);
    let first = h.got(3);
    assert_eq!(first[0].payload, "m00000");
    h.nack(
        3,
        first[0].pid.unwrap(),
        ReasonCode::UnspecifiedError,
        "once",
        None,
    );
    let second = h.got(3);
    h.b.closed(ConnId(3), h.now, &mut h.out);
    assert_eq!(second[0].payload, "m00001");
    h.publish_with(2, "jobs/a", "urgent", &[("priority", "9")]);
    h.checkpoint();
    h.restart();
    let v = h.view("jobs");
    assert_eq!((v.depth, v.delayed), (10_001, 2));
    h.tick_to(1_000);
    h.connect(1, "c", V5, 20_000, false);
    h.subscribe(1, "$queue/jobs", QoS::AtLeastOnce);
    // The window (at most mqtt.max_inflight, 1,024) bounds the leases: ack as they come.
    let mut got = Vec::new();
    for _ in 0..100 {
        let batch = h.got(1);
        if batch.is_empty() {
            break;
        }
        for g in &batch {
            h.ack(1, g.pid.unwrap());
        }
        got.extend(batch);
    }
    assert_eq!(got.len(), 10_001);
    assert_eq!(got[0].payload, "urgent");
    // The rest in order; the two that failed (a nack, then "consumer gone") come back last,
    // each on its second attempt.
    let rest: Vec<&str> = got[1..].iter().map(|g| g.payload.as_str()).collect();
    let want: Vec<String> = (2..10_000).map(|i| format!("m{i:05}")).collect();
    assert_eq!(
        rest[..9_998],
        want.iter().map(String::as_str).collect::<Vec<_>>()[..]
    );
    let tail: Vec<(&str, Option<&str>)> = got[9_999..]
        .iter()
        .map(|g| (g.payload.as_str(), g.attempt.as_deref()))
        .collect();
    assert_eq!(tail, vec![("m00000", Some("2")), ("m00001", Some("2"))]);
    let failures =
        h.b.queue_view("jobs", h.now)
            .map(|v| v.stats.redelivered)
            .unwrap();
    assert_eq!(failures, 2);
}

/// What a fresh consumer drains from `jobs`, acking all: (payload, attempt), sorted, with the
/// queue's depth, delayed count and dead letter ids before it starts.
fn drained(h: &mut H) -> (u64, usize, Vec<u64>, Vec<(String, String)>) {
    let v = h.view("jobs");
    let dead: Vec<u64> = h.dead("jobs").iter().map(|d| d.dead.entry.id).collect();
    h.tick_to(10_000);
    h.connect(9, "drain", V5, 1000, false);
    h.subscribe(9, "$queue/jobs", QoS::AtLeastOnce);
    let mut got = Vec::new();
    loop {
        let batch = h.got(9);
        if batch.is_empty() {
            break;
        }
        for g in batch {
            h.ack(9, g.pid.unwrap());
            got.push((g.payload, g.attempt.unwrap_or_default()));
        }
    }
    got.sort();
    (v.depth, v.delayed, dead, got)
}

/// The history every run below shares: a backlog across several of the ring's chunks, with
/// leased, failed, delayed and dead messages, a checkpoint, then everything changing after
/// it (acks, new messages, a redrive, a new dead letter). `after` runs between the two.
fn snapshot_history(after: impl FnOnce(&mut H)) -> H {
    let mut h = setup(|d| {
        d.backoff = Backoff::Fixed { delay_ms: 1_000 };
        d.max_attempts = 3;
    });
    h.b.closed(ConnId(1), h.now, &mut h.out);
    for i in 0..3_000 {
        h.publish(2, "jobs/a", &format!("m{i:05}"));
    }
    h.connect(3, "c3", V5, 6, false);
    h.subscribe(3, "$queue/jobs", QoS::AtLeastOnce);
    let leased = h.got(3);
    assert_eq!(leased.len(), 6);
    h.ack(3, leased[0].pid.unwrap());
    h.nack(
        3,
        leased[1].pid.unwrap(),
        ReasonCode::UnspecifiedError,
        "later",
        None,
    );
    h.nack(
        3,
        leased[2].pid.unwrap(),
        ReasonCode::PayloadFormatInvalid,
        "bad",
        None,
    );
    let _ = h.got(3);
    h.checkpoint();
    // Everything moves after the image was taken.
    for g in &leased[3..] {
        h.ack(3, g.pid.unwrap());
    }
    let more = h.got(3);
    for g in &more {
        h.ack(3, g.pid.unwrap());
    }
    h.b.closed(ConnId(3), h.now, &mut h.out);
    for i in 0..500 {
        h.publish(2, "jobs/a", &format!("n{i:05}"));
    }
    let dead = h.dead("jobs");
    assert_eq!(dead.len(), 1);
    h.b.redrive_dead_letters("jobs", &[dead[0].dead.entry.id], None, h.now, &mut h.out)
        .unwrap();
    h.connect(4, "c4", V5, 2, false);
    h.subscribe(4, "$queue/jobs", QoS::AtLeastOnce);
    let two = h.got(4);
    h.nack(
        4,
        two[0].pid.unwrap(),
        ReasonCode::PayloadFormatInvalid,
        "bad again",
        None,
    );
    h.b.closed(ConnId(4), h.now, &mut h.out);
    after(&mut h);
    h
}

/// A checkpoint's queue snapshot is the queues as they were at the checkpoint, whatever
/// happens to them while it is written; and a crash before it is written leaves a void
/// checkpoint whose replay gives the same state from the log before it.
#[test]
fn a_queue_snapshot_is_the_queue_at_its_checkpoint_and_a_lost_one_is_void() {
    let mut live = snapshot_history(|_| {});
    let want = drained(&mut live);
    assert_eq!(want.3.len() as u64, want.0, "every waiting message drained");
    assert!(want.0 > 2_000 && want.2.len() == 1);

    let mut written = snapshot_history(|h| {
        let r = h.restart();
        assert_eq!((r.void_checkpoints, r.skipped), (0, 0), "{r:?}");
    });
    assert!(written.snapshots.len() == 1, "the snapshot was written");
    assert_eq!(drained(&mut written), want, "restart from the snapshot");

    let mut lost = snapshot_history(|h| {
        let r = h.restart_losing_snapshot();
        assert_eq!(r.void_checkpoints, 1, "{r:?}");
        assert!(r
            .void_reason
            .as_deref()
            .is_some_and(|w| w.contains("no snapshot")));
    });
    assert_eq!(drained(&mut lost), want, "restart without the snapshot");

    // And a checkpoint with the entries in the log gives the same again.
    let mut inline = snapshot_history(|h| {
        h.inline_checkpoint();
        h.restart();
    });
    assert_eq!(
        drained(&mut inline),
        want,
        "restart from an inline checkpoint"
    );
}
