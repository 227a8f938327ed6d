//! Review of issue 11's work queues through the engine on a virtual clock: hostile or odd
//! consumer sequences, overflow bounds, and restarts. Each test here states what should
//! hold; a failing one is a finding of the review (branch `review-queues`).

#![allow(clippy::unwrap_used, clippy::needless_range_loop)]

mod wq;

use bytes::Bytes;
use ferrymq_core::queues::DeadLetterQuery;
use ferrymq_core::workqueue::*;
use ferrymq_core::*;
use ferrymq_mqtt::*;
use wq::*;

fn unsubscribe(h: &mut H, conn: u64, filter: &str) {
    h.packet(
        conn,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 2,
            filters: vec![filter.into()],
            properties: Properties::default(),
        }),
    );
}

/// A session holding two subscriptions that consume the same queue (`$queue/jobs` and
/// `$share/jobs/…`) drops one of them: it still has the other, so it must still consume.
#[test]
fn unsubscribing_one_of_two_subscriptions_to_a_queue_keeps_the_consumer() {
    let mut h = setup(|_| {});
    assert_eq!(
        h.subscribe(1, "$share/jobs/jobs/#", QoS::AtLeastOnce),
        ReasonCode::GrantedQoS1
    );
    unsubscribe(&mut h, 1, "$share/jobs/jobs/#");
    h.take(1);
    assert_eq!(
        h.view("jobs").consumers,
        1,
        "`$queue/jobs` is still subscribed"
    );
    h.publish(2, "jobs/a", "work");
    assert_eq!(
        h.payloads(1),
        vec!["work"],
        "the remaining subscription consumes"
    );
}

/// `$share/jobs/…` made while no queue `jobs` exists is a plain shared subscription. Once
/// the queue is declared, the same SUBSCRIBE again must not be a record naming missing
/// state (the engine's own debug check) and should make the session a consumer.
#[test]
fn resubscribing_a_share_filter_once_its_queue_exists_is_handled() {
    let mut h = H::new();
    h.connect(1, "c", V5, 10, true);
    assert_eq!(
        h.subscribe(1, "$share/jobs/jobs/#", QoS::AtLeastOnce),
        ReasonCode::GrantedQoS1
    );
    h.declare(jobs(|_| {}));
    // The same filter again, now that the queue exists (network input only).
    let code = h.subscribe(1, "$share/jobs/jobs/#", QoS::AtLeastOnce);
    assert_eq!(code, ReasonCode::GrantedQoS1);
    h.connect(2, "p", V5, 10, false);
    h.publish(2, "jobs/a", "work");
    let got = h.got(1);
    assert_eq!(got.len(), 1, "delivered once: {got:?}");
}

/// Whether `$share/{name}/…` consumes a queue is decided when the subscription is applied.
/// A checkpoint writes queues before sessions, so a restart from it must not turn a plain
/// shared subscription (made before the queue existed) into a consumer.
#[test]
fn a_share_subscription_made_before_its_queue_means_the_same_after_a_checkpoint() {
    let mut h = H::new();
    h.connect(1, "c", V5, 10, true);
    h.subscribe(1, "$share/jobs/jobs/#", QoS::AtLeastOnce);
    h.declare(jobs(|_| {}));
    let before = h.view("jobs").consumers;
    h.checkpoint();
    h.restart();
    let after = h.view("jobs").consumers;
    assert_eq!(
        before, after,
        "consumers of `jobs` before ({before}) and after ({after}) a checkpoint and restart"
    );
}

/// The reverse: a `$share/jobs/…` consumer whose queue is deleted stays a consumer ("consumes
/// again if a queue of that name is declared"), also after a checkpoint and restart.
#[test]
fn a_share_consumer_of_a_deleted_queue_consumes_its_redeclaration_after_a_restart() {
    let mut h = H::new();
    h.declare(jobs(|_| {}));
    h.connect(1, "c", V5, 10, true);
    h.subscribe(1, "$share/jobs/jobs/#", QoS::AtLeastOnce);
    h.b.delete_queue("jobs", &mut h.out).unwrap();
    // Live, it stays a consumer through a delete and a new declaration.
    h.declare(jobs(|_| {}));
    assert_eq!(h.view("jobs").consumers, 1);
    h.b.delete_queue("jobs", &mut h.out).unwrap();
    h.checkpoint();
    h.restart();
    h.connect(1, "c", V5, 10, true);
    h.declare(jobs(|_| {}));
    assert_eq!(
        h.view("jobs").consumers,
        1,
        "still registered as a consumer"
    );
    h.connect(2, "p", V5, 10, false);
    h.publish(2, "jobs/a", "work");
    let got = h.got(1);
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].attempt.as_deref(),
        Some("1"),
        "a queue delivery, not a plain shared one"
    );
}

/// `drop_oldest` under `max_bytes`: a message larger than the one it displaces must not
/// leave the queue over its byte limit.
#[test]
fn drop_oldest_keeps_a_queue_within_max_bytes() {
    let mut h = H::new();
    h.declare(jobs(|d| {
        d.max_bytes = Some(100);
        d.overflow = Overflow::DropOldest;
    }));
    h.connect(2, "p", V5, 10, false);
    // 6 bytes of topic + 24 of payload = 30 each.
    for _ in 0..3 {
        h.publish(2, "jobs/a", &"x".repeat(24));
    }
    assert_eq!(h.view("jobs").bytes, 90);
    // 6 + 84 = 90 bytes: two of the old ones must go (or it must be refused).
    h.publish(2, "jobs/a", &"y".repeat(84));
    let acks = h.acks(2);
    let v = h.view("jobs");
    assert!(
        v.bytes <= 100,
        "queue holds {} bytes with max_bytes = 100 (depth {}, acks {acks:?})",
        v.bytes,
        v.depth
    );
}

/// A `$delayed/…` publish is acknowledged at once. When it comes due its queue is full
/// (`reject_new`): a message accepted with PUBACK must not be dropped silently — it should
/// wait, be dead-lettered, or at least stay visible somewhere.
#[test]
fn a_delayed_publish_acked_to_its_publisher_is_not_lost_when_its_queue_is_full() {
    let mut h = H::new();
    h.declare(jobs(|d| {
        d.max_messages = Some(1);
        d.overflow = Overflow::RejectNew;
    }));
    h.connect(2, "p", V5, 10, false);
    h.publish(2, "jobs/a", "first");
    h.publish(2, "$delayed/1/jobs/b", "delayed");
    assert_eq!(h.acks(2), vec![ReasonCode::Success, ReasonCode::Success]);
    h.tick_to(1_000);
    let v = h.view("jobs");
    let held = h.b.delayed_publishes();
    let dead = h.dead("jobs").len();
    assert!(
        v.depth + held + dead as u64 == 2,
        "the delayed message is gone: queue depth {}, still delayed {held}, dead letters {dead}, \
         refused {}",
        v.depth,
        v.stats.refused
    );
}

/// Redrive sends dead letters back into their queue: a `reject_new` queue at
/// `max_messages` must not end up holding more than its limit.
#[test]
fn redrive_does_not_push_a_queue_past_max_messages() {
    let mut h = setup(|d| {
        d.max_messages = Some(2);
        d.overflow = Overflow::RejectNew;
        d.max_attempts = 1;
    });
    h.publish(2, "jobs/a", "bad");
    let got = h.got(1);
    h.nack(
        1,
        got[0].pid.unwrap(),
        ReasonCode::UnspecifiedError,
        "no",
        None,
    );
    assert_eq!(h.dead("jobs").len(), 1);
    // Fill the queue while nobody consumes.
    h.b.closed(ConnId(1), h.now, &mut h.out);
    h.publish(2, "jobs/a", "m1");
    h.publish(2, "jobs/a", "m2");
    h.acks(2);
    assert_eq!(h.view("jobs").depth, 2);
    let ids: Vec<u64> = h.dead("jobs").iter().map(|d| d.dead.entry.id).collect();
    let moved =
        h.b.redrive_dead_letters("jobs", &ids, None, h.now, &mut h.out)
            .unwrap();
    let v = h.view("jobs");
    assert!(
        v.depth <= 2,
        "redrive moved {moved} into a full queue: depth {} > max_messages 2",
        v.depth
    );
}

/// After every kind of outcome (ack, nack and retry, dead letter and discard, expiry,
/// overflow, a lost consumer) the queue's gauges return to zero.
#[test]
fn gauges_return_to_zero_after_every_kind_of_outcome() {
    let mut h = setup(|d| {
        d.max_attempts = 2;
        d.backoff = Backoff::None;
        d.max_messages = Some(3);
        d.overflow = Overflow::DropOldest;
    });
    h.publish(2, "jobs/a", "ack-me");
    h.publish(2, "jobs/a", "nack-me");
    h.publish_full(2, "jobs/a", "expire-me", &[], Some(1));
    let got = h.got(1);
    assert_eq!(got.len(), 3);
    h.ack(1, got[0].pid.unwrap());
    h.nack(
        1,
        got[1].pid.unwrap(),
        ReasonCode::UnspecifiedError,
        "x",
        None,
    );
    h.nack(
        1,
        got[2].pid.unwrap(),
        ReasonCode::UnspecifiedError,
        "x",
        None,
    );
    let again = h.got(1);
    for g in &again {
        h.nack(1, g.pid.unwrap(), ReasonCode::UnspecifiedError, "x", None);
    }
    // Both are dead letters now; discard them.
    let ids: Vec<u64> = h.dead("jobs").iter().map(|d| d.dead.entry.id).collect();
    assert_eq!(ids.len(), 2);
    h.b.discard_dead_letters("jobs", &ids, &mut h.out).unwrap();
    // Overflow with nobody consuming, then a consumer that leaves with leases.
    h.b.closed(ConnId(1), h.now, &mut h.out);
    for i in 0..5 {
        h.publish(2, "jobs/a", &format!("o{i}"));
    }
    h.connect(1, "c", V5, 10, true);
    let got = h.got(1);
    assert_eq!(got.len(), 3);
    h.b.closed(ConnId(1), h.now, &mut h.out);
    h.connect(1, "c", V5, 10, true);
    for g in h.got(1) {
        h.ack(1, g.pid.unwrap());
    }
    h.tick_to(10_000);
    let v = h.view("jobs");
    assert_eq!(
        (v.depth, v.leased, v.delayed, v.bytes, v.dead_letters),
        (0, 0, 0, 0, 0),
        "{v:?}"
    );
}

/// A `$delayed` publish survives a checkpoint and a restart and is published when due.
#[test]
fn a_delayed_publish_survives_a_checkpoint_and_restart() {
    let mut h = setup(|_| {});
    h.publish(2, "$delayed/10/jobs/a", "later");
    h.checkpoint();
    h.restart();
    h.connect(1, "c", V5, 10, true);
    h.tick_to(9_999);
    assert!(h.got(1).is_empty());
    h.tick_to(10_000);
    assert_eq!(h.payloads(1), vec!["later"]);
}

/// x-attempt never repeats for one message across restarts and checkpoints while its
/// consumer comes and goes.
#[test]
fn attempt_numbers_never_repeat_across_restarts_and_checkpoints() {
    let mut h = setup(|d| {
        d.max_attempts = 20;
        d.backoff = Backoff::None;
    });
    h.publish(2, "jobs/a", "m");
    let mut seen = Vec::new();
    let mut firsts = Vec::new();
    for round in 0..8 {
        let got = h.got(1);
        assert_eq!(got.len(), 1, "round {round}: {got:?}");
        seen.push(got[0].attempt.clone().unwrap());
        firsts.push(got[0].first_enqueued.clone().unwrap());
        match round % 4 {
            0 => {
                h.restart();
            }
            1 => {
                h.checkpoint();
                h.restart();
            }
            2 => {
                h.b.closed(ConnId(1), h.now, &mut h.out);
                h.checkpoint();
            }
            _ => {
                h.checkpoint();
                h.b.closed(ConnId(1), h.now, &mut h.out);
                h.restart();
            }
        }
        h.connect(1, "c", V5, 10, true);
        h.take(2);
    }
    let mut sorted = seen.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), seen.len(), "attempts delivered: {seen:?}");
    firsts.dedup();
    assert_eq!(firsts.len(), 1, "x-first-enqueued-ms moved: {firsts:?}");
}

/// A QoS 2 queue delivery the consumer answered with PUBREC (the queue's ack) is, for the
/// consumer, an exchange waiting for PUBREL. After a broker restart the session comes back
/// without it (docs/queues.md lists this as a limit), and the next QoS 2 delivery reuses its
/// packet id: a client that still holds that id (MQTT 5 4.3.3, method B) takes the new
/// message for a resend, PUBRECs it without processing it, and the broker counts that as
/// the new message's ack. The session must either resend the PUBREL or not reuse the id.
#[test]
fn a_qos2_queue_delivery_acked_by_pubrec_keeps_its_packet_id_across_a_restart() {
    let mut h = H::new();
    h.declare(jobs(|_| {}));
    h.connect(1, "c", V5, 10, true);
    assert_eq!(
        h.subscribe(1, "$queue/jobs", QoS::ExactlyOnce),
        ReasonCode::GrantedQoS2
    );
    h.connect(2, "p", V5, 10, false);
    h.publish(2, "jobs/a", "first");
    let got = h.got(1);
    let pid = got[0].pid.unwrap();
    h.packet(1, Packet::PubRec(PubResp::new(pid, ReasonCode::Success)));
    assert_eq!(
        h.view("jobs").stats.acked,
        1,
        "PUBREC acks the queue message"
    );
    h.restart();
    h.connect(1, "c", V5, 10, true);
    let resumed = h.take(1);
    let pubrel = resumed
        .iter()
        .any(|a| matches!(a, Action::Send(Packet::PubRel(r)) if r.packet_id == pid));
    h.connect(2, "p", V5, 10, false);
    h.publish(2, "jobs/a", "second");
    let second = h.got(1);
    assert_eq!(second.len(), 1);
    assert!(
        pubrel || second[0].pid != Some(pid),
        "after the restart no PUBREL for packet id {pid}, and the next QoS 2 delivery \
         reuses it"
    );
}

/// A durable consumer's connection drops while it holds leases; it reconnects at once
/// (clean_start = false). Each lease comes back exactly once, as one failed attempt, and
/// the stale in-flight copies are not resent as duplicates.
#[test]
fn a_durable_consumer_that_reconnects_gets_each_lease_back_once() {
    let mut h = setup(|d| d.backoff = Backoff::None);
    for i in 0..3 {
        h.publish(2, "jobs/a", &format!("m{i}"));
    }
    assert_eq!(h.got(1).len(), 3);
    h.b.closed(ConnId(1), h.now, &mut h.out);
    h.connect(3, "c", V5, 10, true);
    let got = h.got(3);
    let mut attempts: Vec<_> = got
        .iter()
        .map(|g| (g.payload.clone(), g.attempt.clone()))
        .collect();
    attempts.sort();
    assert_eq!(
        attempts,
        vec![
            ("m0".into(), Some("2".into())),
            ("m1".into(), Some("2".into())),
            ("m2".into(), Some("2".into()))
        ]
    );
    let v = h.view("jobs");
    assert_eq!((v.leased, v.stats.nacked), (3, 3));
}

/// Session takeover of a consumer holding leases: the leases go back once (one failed
/// attempt each) and the new connection gets them.
#[test]
fn a_takeover_of_a_consumer_with_leases_returns_each_once() {
    let mut h = setup(|d| d.backoff = Backoff::None);
    h.publish(2, "jobs/a", "m");
    assert_eq!(h.got(1).len(), 1);
    // The same client id connects again while the first connection is open.
    h.connect(3, "c", V5, 10, true);
    let got = h.got(3);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].attempt.as_deref(), Some("2"));
    assert_eq!(h.view("jobs").stats.nacked, 1);
    h.ack(3, got[0].pid.unwrap());
    let v = h.view("jobs");
    assert_eq!((v.leased, v.depth, v.stats.acked), (0, 0, 1));
}

/// A message whose expiry passes while nobody consumes its queue: with
/// `dead_letter_on_expiry` it should become a dead letter (and leave the depth) when it
/// expires, not stay counted in `depth`/`bytes`/`oldest_age_ms` until some consumer
/// subscribes.
#[test]
fn an_expired_message_leaves_the_depth_without_a_consumer() {
    let mut h = H::new();
    h.declare(jobs(|d| d.dead_letter_on_expiry = true));
    h.connect(2, "p", V5, 10, false);
    h.publish_full(2, "jobs/a", "stale", &[], Some(1));
    h.tick_to(60_000);
    let v = h.view("jobs");
    let dead = h.dead("jobs").len();
    assert_eq!(
        (v.depth, dead),
        (0, 1),
        "a minute after it expired: depth {}, bytes {}, oldest age {:?} ms, dead letters {dead}",
        v.depth,
        v.bytes,
        v.oldest_age_ms
    );
}

/// A consumer that sends PUBREC for a QoS 1 delivery, PUBACK for a QoS 2 one, PUBCOMP
/// without PUBREC, and a PUBACK for a packet id never used: none of it acks anything, and
/// the broker stays up; the leases time out and are delivered again.
#[test]
fn wrong_answers_to_queue_deliveries_ack_nothing() {
    let mut h = setup(|d| {
        d.ack_timeout_ms = 1_000;
        d.backoff = Backoff::None;
    });
    h.connect(3, "c2", V5, 10, false);
    assert_eq!(
        h.subscribe(3, "$queue/jobs", QoS::ExactlyOnce),
        ReasonCode::GrantedQoS2
    );
    h.publish(2, "jobs/a", "q1");
    h.publish(2, "jobs/a", "q2");
    let one = h.got(1);
    let two = h.got(3);
    assert_eq!((one.len(), two.len()), (1, 1));
    h.packet(
        1,
        Packet::PubRec(PubResp::new(one[0].pid.unwrap(), ReasonCode::Success)),
    );
    h.packet(1, Packet::PubAck(PubResp::new(999, ReasonCode::Success)));
    h.packet(
        3,
        Packet::PubAck(PubResp::new(two[0].pid.unwrap(), ReasonCode::Success)),
    );
    h.packet(
        3,
        Packet::PubComp(PubResp::new(two[0].pid.unwrap(), ReasonCode::Success)),
    );
    assert_eq!(h.view("jobs").stats.acked, 0);
    assert_eq!(h.view("jobs").leased, 2);
    h.tick_to(1_000);
    assert_eq!(h.view("jobs").stats.nacked, 2);
}

/// `$dlq/{queue}` messages carry `x-dead-letter-id`, `x-cause`, … as user properties, which
/// tools act on (show, redrive, discard by id). A publisher's own user properties of those
/// names must not come first (or at all): here the publisher claims `x-dead-letter-id: 424242`
/// and `x-cause: overflow` on a message that is rejected (0x99).
#[test]
fn a_publisher_cannot_spoof_the_dead_letter_properties() {
    let mut h = setup(|_| {});
    h.connect(4, "ops", V5, 10, false);
    h.subscribe(4, "$dlq/jobs", QoS::AtLeastOnce);
    h.publish_with(
        2,
        "jobs/x",
        "bad",
        &[("x-dead-letter-id", "424242"), ("x-cause", "overflow")],
    );
    let got = h.got(1);
    h.nack(
        1,
        got[0].pid.unwrap(),
        ReasonCode::PayloadFormatInvalid,
        "not json",
        None,
    );
    let real_id = h.dead("jobs")[0].dead.entry.id.to_string();
    let dlq: Vec<Delivery> = h
        .take(4)
        .into_iter()
        .filter_map(|a| match a {
            Action::Deliver(d) => Some(d),
            _ => None,
        })
        .collect();
    assert_eq!(dlq.len(), 1);
    let props = dlq[0].properties();
    let values = |k: &str| -> Vec<String> {
        props
            .user_properties
            .iter()
            .filter(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .collect()
    };
    assert_eq!(values("x-dead-letter-id"), vec![real_id]);
    assert_eq!(values("x-cause"), vec!["rejected".to_string()]);
}

/// A queue deleted while its messages are leased: the consumer's acks and nacks of those
/// deliveries do nothing, free its window, and a queue declared again under the name is
/// consumed normally with its gauges at zero after.
#[test]
fn deleting_a_queue_with_leases_then_answering_them_is_harmless() {
    let mut h = setup(|d| d.backoff = Backoff::None);
    for i in 0..10 {
        h.publish(2, "jobs/a", &format!("m{i}"));
    }
    let got = h.got(1);
    assert_eq!(got.len(), 10, "the window is full");
    h.b.delete_queue("jobs", &mut h.out).unwrap();
    h.declare(jobs(|_| {}));
    h.publish(2, "jobs/a", "new");
    assert!(h.got(1).is_empty(), "the window is still full");
    for (i, g) in got.iter().enumerate() {
        if i % 2 == 0 {
            h.ack(1, g.pid.unwrap());
        } else {
            h.nack(1, g.pid.unwrap(), ReasonCode::UnspecifiedError, "x", None);
        }
    }
    let after = h.got(1);
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].payload, "new");
    h.ack(1, after[0].pid.unwrap());
    let v = h.view("jobs");
    assert_eq!((v.depth, v.leased, v.bytes, v.stats.acked), (0, 0, 0, 1));
}

/// An MQTT 3.1.1 consumer can only ack; its disconnect returns its lease as a failed
/// attempt, and the next delivery (to a 5.0 consumer) says attempt 2 on the same topic.
#[test]
fn a_3_1_1_consumer_that_disconnects_returns_its_lease() {
    let mut h = H::new();
    h.declare(jobs(|d| d.backoff = Backoff::None));
    h.connect(1, "old", V3, 10, true);
    assert_eq!(
        h.subscribe(1, "$queue/jobs", QoS::AtLeastOnce),
        ReasonCode::GrantedQoS1
    );
    h.connect(2, "p", V5, 10, false);
    h.publish(2, "jobs/a", "m");
    assert_eq!(h.got(1).len(), 1);
    h.b.closed(ConnId(1), h.now, &mut h.out);
    h.connect(3, "new", V5, 10, false);
    h.subscribe(3, "$queue/jobs", QoS::AtLeastOnce);
    let got = h.got(3);
    assert_eq!(got.len(), 1);
    assert_eq!(
        (got[0].topic.as_str(), got[0].attempt.as_deref()),
        ("jobs/a", Some("2"))
    );
}

/// Paging through dead letters with `cursor` (REST `GET .../dead-letters?cursor=&limit=`,
/// answered on the router thread) should read about one page of messages back from the
/// log, not every dead letter before the cursor: paging through n dead letters must not
/// cost n²/limit log reads.
#[test]
fn a_dead_letter_page_after_a_cursor_does_not_read_every_earlier_one() {
    let mut h = H::new();
    h.declare(jobs(|d| {
        d.max_messages = Some(1);
        d.overflow = Overflow::DeadLetter;
    }));
    h.connect(2, "p", V5, 10, false);
    for i in 0..3001 {
        h.publish(2, "jobs/a", &format!("m{i}"));
    }
    h.take(2);
    h.flush();
    assert_eq!(h.view("jobs").dead_letters, 3000);
    let all =
        h.b.dead_letter_ids("jobs", &DeadLetterQuery::default())
            .unwrap();
    let query = DeadLetterQuery {
        cursor: Some(all[2899]),
        limit: Some(100),
        ..Default::default()
    };
    let before = reads();
    let page = h.b.dead_letters("jobs", &query).unwrap();
    let read = reads() - before;
    assert_eq!(page.items.len(), 100);
    assert!(
        read <= 200,
        "the last page of 100 read {read} messages back from the log"
    );
}

/// Leases and acks through a queue with many dead letters, with or without
/// `dlq_retention_s`; returns how long the leasing took.
fn lease_through_dead_letters(retention: Option<u64>) -> std::time::Duration {
    let mut h = H::new();
    h.declare(jobs(|d| {
        d.max_messages = Some(1);
        d.overflow = Overflow::DeadLetter;
        d.dlq_retention_s = retention;
    }));
    h.connect(2, "p", V5, 10, false);
    for i in 0..20_001 {
        h.publish(2, "jobs/a", &format!("m{i}"));
        if i % 1000 == 0 {
            h.flush();
            h.take(2);
        }
    }
    h.flush();
    h.take(2);
    assert_eq!(h.view("jobs").dead_letters, 20_000);
    h.b.declare_queue(
        jobs(|d| {
            d.dlq_retention_s = retention;
            d.overflow = Overflow::DeadLetter;
        }),
        h.now,
        &mut h.out,
    )
    .unwrap();
    h.connect(1, "c", V5, 1, false);
    h.subscribe(1, "$queue/jobs", QoS::AtLeastOnce);
    let started = std::time::Instant::now();
    for i in 0..2_000 {
        h.publish(2, "jobs/a", &format!("n{i}"));
        for g in h.got(1) {
            h.ack(1, g.pid.unwrap());
        }
        h.take(2);
        if i % 500 == 0 {
            h.flush();
        }
    }
    started.elapsed()
}

/// With `dlq_retention_s` set, every lease re-arms the queue's timer, and finding the next
/// retention deadline scans every dead letter: a queue with many dead letters slows each
/// lease by their number. Leasing should cost about the same with or without retention.
#[test]
fn dlq_retention_does_not_make_each_lease_scan_every_dead_letter() {
    let without = lease_through_dead_letters(None);
    let with = lease_through_dead_letters(Some(7 * 24 * 3600));
    assert!(
        with < without * 5 + std::time::Duration::from_millis(200),
        "2,000 leases past 20,000 dead letters: {with:?} with retention, {without:?} without"
    );
}

/// Selecting dead letters by cause (redrive or purge by filter) needs no message bodies;
/// `dead_letter_ids` reads every dead letter the cause does not match back from the log.
#[test]
fn selecting_dead_letters_by_cause_reads_no_messages() {
    let mut h = H::new();
    h.declare(jobs(|d| {
        d.max_messages = Some(1);
        d.overflow = Overflow::DeadLetter;
    }));
    h.connect(2, "p", V5, 10, false);
    for i in 0..501 {
        h.publish(2, "jobs/a", &format!("m{i}"));
    }
    h.take(2);
    h.flush();
    let query = DeadLetterQuery {
        cause: Some(Cause::Expired),
        ..Default::default()
    };
    let before = reads();
    let ids = h.b.dead_letter_ids("jobs", &query).unwrap();
    let read = reads() - before;
    assert!(ids.is_empty(), "all 500 are overflow dead letters");
    assert_eq!(
        read, 0,
        "selecting by cause read {read} messages from the log"
    );
}

/// `$delayed/0/…` publishes at once; a QoS 2 `$delayed` publish resent (same packet id,
/// before PUBREL) is held once, not twice.
#[test]
fn delayed_zero_publishes_at_once_and_a_qos2_resend_is_held_once() {
    let mut h = setup(|_| {});
    h.publish(2, "$delayed/0/jobs/now", "now");
    assert_eq!(h.payloads(1), vec!["now"]);
    let p = Publish {
        dup: false,
        qos: QoS::ExactlyOnce,
        retain: false,
        topic: "$delayed/5/jobs/later".into(),
        packet_id: Some(9),
        properties: Properties::default(),
        payload: Bytes::from_static(b"later"),
    };
    h.packet(2, Packet::Publish(p.clone()));
    let mut again = p;
    again.dup = true;
    h.packet(2, Packet::Publish(again));
    assert_eq!(h.b.delayed_publishes(), 1, "held once");
    h.tick_to(5_000);
    assert_eq!(h.payloads(1), vec!["later"]);
}
