//! The journal's promise, checked directly: after every step of a random run, a broker
//! rebuilt from the log alone holds exactly the live broker's durable state. The steps cover
//! clean-start flips, session expiry set on CONNECT and DISCONNECT, wills with delays, plain
//! and shared subscriptions (several filters in one group), unsubscribes, QoS 0/1/2 with
//! refused PUBRECs, retained and expiring messages, clock jumps past session expiry,
//! checkpoints (with the log before them dropped) and crashes; and full queues (a limit of 2)
//! under each `queue_full` policy, with held acknowledgements released, refused on timeout
//! (their messages removed) and dropped by disconnects.
#![allow(clippy::unwrap_used)]
use bytes::Bytes;
use ferrymq_mqtt::*;
use std::collections::BTreeMap;

use crate::*;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Durable state of journaled sessions, canonical.
fn snapshot(b: &Broker, connected_live: &[SessionId]) -> String {
    let mut s = String::new();
    let mut ids: Vec<_> = b.sessions.keys().copied().collect();
    ids.sort();
    for sid in ids {
        let x = &b.sessions[&sid];
        if !x.journaled {
            continue;
        }
        // A live connected session has no disconnect time; replay stamps one (the crash).
        let disc = if connected_live.contains(&sid) {
            None
        } else {
            x.disconnected_at
        };
        s += &format!(
            "S{} {} {:?} exp={} disc={:?}\n",
            sid.0, x.client_id, x.version, x.expiry_interval, disc
        );
        let subs: BTreeMap<_, _> = x.subscriptions.iter().collect();
        for (raw, sub) in subs {
            s += &format!("  sub {raw} {:?}\n", sub);
        }
        let mut q2: Vec<_> = x.inbound_qos2.iter().collect();
        q2.sort();
        s += &format!("  q2in {:?}\n", q2);
        for pid in x.inflight_in_order() {
            let f = &x.inflight[&pid];
            s += &format!(
                "  fl {pid} m{} {:?} {:?} {:?} {:?} r{}\n",
                f.pending.message.id,
                f.pending.qos,
                f.state,
                f.pending.shared,
                f.pending.subscription_ids,
                f.pending.retain
            );
        }
        for p in &x.pending {
            s += &format!(
                "  q m{} {:?} {:?} {:?} r{}\n",
                p.message.id, p.qos, p.shared, p.subscription_ids, p.retain
            );
        }
        if let Some((w, due)) = x.pending_will.as_deref() {
            s += &format!("  will {} {:?}\n", w.topic, due);
        }
    }
    let mut r: Vec<_> = b
        .retained
        .all()
        .iter()
        .filter(|m| !m.topic.starts_with("$SYS"))
        .map(|m| (m.topic.to_string(), m.id))
        .collect();
    r.sort();
    s += &format!("R {:?}\n", r);
    s
}

const FILTERS: [&str; 6] = [
    "t/#",
    "t/+",
    "$share/g/t/#",
    "$share/g/t/+",
    "$share/h/t/#",
    "t/1",
];

struct Client {
    conn: Option<u64>,
    unacked: Vec<(u16, QoS)>,
    rel: Vec<u16>,
    pubrec: Vec<u16>,
    next_pid: u16,
}

/// The engine settings of one run: a queue limit no run reaches, or a limit of 2 under each
/// `queue_full` policy (the timeout is shorter than most clock jumps, so held messages are
/// also refused and removed).
fn run_config(seed: u64) -> BrokerConfig {
    let (max_queued_messages, queue_full) = match seed % 4 {
        0 => (100_000, QueueFull::Backpressure),
        1 => (2, QueueFull::Backpressure),
        2 => (2, QueueFull::Reject),
        _ => (2, QueueFull::DropOldest),
    };
    BrokerConfig {
        max_queued_messages,
        queue_full,
        queue_full_timeout_ms: 5_000,
        ..Default::default()
    }
}

fn run(seed: u64, steps: usize) -> Result<Stats, String> {
    let mut rng = Rng(seed | 1);
    let config = run_config(seed);
    let mut b = Broker::new(config.clone());
    b.enable_journal(&mut Outbox::default());
    let mut out = Outbox::default();
    let mut log: Vec<Vec<u8>> = Vec::new();
    let mut now = Time(1000);
    let mut next_conn = 1u64;
    let mut cl: Vec<Client> = (0..4)
        .map(|_| Client {
            conn: None,
            unacked: vec![],
            rel: vec![],
            pubrec: vec![],
            next_pid: 1,
        })
        .collect();
    for step in 0..steps {
        let i = rng.below(4) as usize;
        let op = rng.below(100);
        let desc;
        match op {
            0..=14 => {
                let conn = next_conn;
                next_conn += 1;
                let clean = rng.below(3) == 0;
                let expiry = [0u32, 60, 3600][rng.below(3) as usize];
                let mut c = Connect {
                    version: ProtocolVersion::V5,
                    client_id: format!("c{i}"),
                    clean_start: clean,
                    keep_alive: 0,
                    username: None,
                    password: None,
                    will: None,
                    properties: Properties::default(),
                };
                c.properties.session_expiry_interval = Some(expiry);
                c.properties.receive_maximum = Some([1u16, 2, 8][rng.below(3) as usize]);
                if rng.below(2) == 0 {
                    let mut wp = Properties::default();
                    wp.will_delay_interval = Some([0u32, 5, 100][rng.below(3) as usize]);
                    c.will = Some(Will {
                        topic: "t/w".into(),
                        payload: Bytes::from_static(b"will"),
                        qos: QoS::AtLeastOnce,
                        retain: rng.below(2) == 0,
                        properties: wp,
                    });
                }
                desc = format!("connect c{i} conn{conn} clean={clean} exp={expiry}");
                if let Some(old) = cl[i].conn.take() {
                    let _ = old;
                }
                b.connect(ConnId(conn), c, now, &mut out);
                cl[i].conn = Some(conn);
                cl[i].unacked.clear();
                cl[i].pubrec.clear();
            }
            15..=22 => {
                let Some(conn) = cl[i].conn.take() else {
                    continue;
                };
                match rng.below(3) {
                    0 => {
                        desc = format!("closed c{i}");
                        b.closed(ConnId(conn), now, &mut out);
                    }
                    _ => {
                        let mut d = Disconnect::new(if rng.below(2) == 0 {
                            ReasonCode::Success
                        } else {
                            ReasonCode::DisconnectWithWill
                        });
                        let e = [None, Some(0u32), Some(30), Some(3600)][rng.below(4) as usize];
                        d.properties.session_expiry_interval = e;
                        desc = format!("disconnect c{i} {:?} exp={e:?}", d.reason);
                        b.packet(ConnId(conn), Packet::Disconnect(d), now, &mut out);
                    }
                }
            }
            23..=30 => {
                let Some(conn) = cl[i].conn else { continue };
                let f = FILTERS[rng.below(6) as usize];
                let qos = if rng.below(2) == 0 {
                    QoS::AtLeastOnce
                } else {
                    QoS::ExactlyOnce
                };
                desc = format!("sub c{i} {f} {qos:?}");
                let mut props = Properties::default();
                if rng.below(2) == 0 {
                    props.subscription_identifiers = vec![1 + rng.below(5) as u32];
                }
                b.packet(
                    ConnId(conn),
                    Packet::Subscribe(Subscribe {
                        packet_id: 1,
                        filters: vec![(
                            f.into(),
                            SubscriptionOptions {
                                qos,
                                ..Default::default()
                            },
                        )],
                        properties: props,
                    }),
                    now,
                    &mut out,
                );
            }
            31..=33 => {
                let Some(conn) = cl[i].conn else { continue };
                let f = FILTERS[rng.below(6) as usize];
                desc = format!("unsub c{i} {f}");
                b.packet(
                    ConnId(conn),
                    Packet::Unsubscribe(Unsubscribe {
                        packet_id: 1,
                        filters: vec![f.into()],
                        properties: Properties::default(),
                    }),
                    now,
                    &mut out,
                );
            }
            34..=64 => {
                let Some(conn) = cl[i].conn else { continue };
                let qos =
                    [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][rng.below(3) as usize];
                let pid = cl[i].next_pid;
                cl[i].next_pid = cl[i].next_pid % 60000 + 1;
                let mut props = Properties::default();
                if rng.below(4) == 0 {
                    props.message_expiry_interval = Some(1 + rng.below(20) as u32);
                }
                let p = Publish {
                    dup: false,
                    qos,
                    retain: rng.below(5) == 0,
                    topic: format!("t/{}", rng.below(3)),
                    packet_id: (qos != QoS::AtMostOnce).then_some(pid),
                    properties: props,
                    payload: Bytes::from(format!("{step}")),
                };
                desc = format!("pub c{i} {qos:?} {}", p.topic);
                b.packet(ConnId(conn), Packet::Publish(p), now, &mut out);
            }
            65..=89 => {
                let Some(conn) = cl[i].conn else { continue };
                desc = format!("acks c{i}");
                for (pid, q) in std::mem::take(&mut cl[i].unacked) {
                    if rng.below(3) == 0 {
                        cl[i].unacked.push((pid, q));
                        continue;
                    }
                    let p = match q {
                        QoS::ExactlyOnce => Packet::PubRec(PubResp::new(
                            pid,
                            if rng.below(10) == 0 {
                                ReasonCode::UnspecifiedError
                            } else {
                                ReasonCode::Success
                            },
                        )),
                        _ => Packet::PubAck(PubResp::new(pid, ReasonCode::Success)),
                    };
                    b.packet(ConnId(conn), p, now, &mut out);
                }
                for pid in std::mem::take(&mut cl[i].rel) {
                    b.packet(
                        ConnId(conn),
                        Packet::PubComp(PubResp::new(pid, ReasonCode::Success)),
                        now,
                        &mut out,
                    );
                }
                for pid in std::mem::take(&mut cl[i].pubrec) {
                    b.packet(
                        ConnId(conn),
                        Packet::PubRel(PubResp::new(pid, ReasonCode::Success)),
                        now,
                        &mut out,
                    );
                }
            }
            90..=94 => {
                let secs = [1u32, 6, 10, 100, 4000][rng.below(5) as usize];
                now = now.plus_secs(secs);
                desc = format!("tick +{secs}");
                b.tick(now, &mut out);
            }
            95..=97 => {
                desc = "checkpoint".into();
                log.extend(out.journal.records().map(|r| r.to_vec()));
                out.journal.clear();
                let begin = b.checkpoint(&mut out).unwrap() as usize;
                log.clear();
                log.extend(out.journal.records().skip(begin).map(|r| r.to_vec()));
                out.journal.clear();
            }
            _ => {
                desc = "crash".into();
                log.extend(out.journal.records().map(|r| r.to_vec()));
                out.journal.clear();
                let mut nb = Broker::new(config.clone());
                let rep = nb
                    .restore(log.iter().map(|r| r.as_slice()), now)
                    .map_err(|e| e.to_string())?;
                if rep.skipped != 0 {
                    return Err(format!("step {step} crash: skipped {rep:?}"));
                }
                out = Outbox::default();
                nb.enable_journal(&mut out);
                b = nb;
                for c in &mut cl {
                    c.conn = None;
                    c.unacked.clear();
                    c.pubrec.clear();
                }
            }
        }
        // Client side: read actions.
        for (conn, a) in std::mem::take(&mut out.actions) {
            let Some(c) = cl.iter_mut().find(|c| c.conn == Some(conn.0)) else {
                continue;
            };
            match a {
                Action::Deliver(d) => {
                    if let Some(pid) = d.packet_id {
                        c.unacked.retain(|x| x.0 != pid);
                        c.unacked.push((pid, d.qos))
                    }
                }
                Action::Send(Packet::PubRel(r)) => c.rel.push(r.packet_id),
                Action::Send(Packet::PubRec(r)) if !r.reason.is_error() => {
                    c.pubrec.push(r.packet_id)
                }
                Action::Close => c.conn = None,
                _ => {}
            }
        }
        // Differential check.
        log.extend(out.journal.records().map(|r| r.to_vec()));
        out.journal.clear();
        let mut nb = Broker::new(config.clone());
        let rep = nb
            .restore(log.iter().map(|r| r.as_slice()), now)
            .map_err(|e| e.to_string())?;
        let connected: Vec<SessionId> = b
            .sessions
            .values()
            .filter(|s| s.conn.is_some())
            .map(|s| s.id)
            .collect();
        let (live, replayed) = (snapshot(&b, &connected), snapshot(&nb, &connected));
        if live != replayed || rep.skipped != 0 {
            return Err(format!("seed {seed} step {step} after `{desc}`: skipped={}\nLIVE:\n{live}\nREPLAYED:\n{replayed}", rep.skipped));
        }
    }
    Ok(b.stats().clone())
}

/// `FERRYMQ_JOURNAL_SEEDS` runs more seeds than the default 200.
#[test]
fn replayed_state_equals_live_state_after_every_step() {
    let mut fails = Vec::new();
    let n: u64 = std::env::var("FERRYMQ_JOURNAL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let (mut held, mut refused, mut dropped) = (0, 0, 0);
    for seed in 1..=n {
        match run(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15), 600) {
            Ok(stats) => {
                held += stats.acks_held_total;
                refused += stats.refused_queue_full;
                dropped += stats.dropped_queue_full;
            }
            Err(e) => fails.push(e),
        }
    }
    if !fails.is_empty() {
        panic!("{} failing seeds; first:\n{}", fails.len(), fails[0]);
    }
    // Stats restart with each crash, so these count the last stretch of each run only.
    assert!(
        held > 0 && refused > 0 && dropped > 0,
        "full queues were not exercised: held {held}, refused {refused}, dropped {dropped}"
    );
}

fn rec(write: impl FnOnce(&mut super::format::Rec<'_>)) -> Vec<u8> {
    let mut b = bytes::BytesMut::new();
    let mut r = super::format::Rec::new(&mut b);
    write(&mut r);
    r.flush();
    b.to_vec()
}

/// A log as the previous version wrote it: Flight (8) and PopPending (9) name the front.
#[test]
fn a_log_in_the_previous_format_replays() {
    let sid = SessionId(1);
    let mut log = Vec::new();
    for id in 1..=4u64 {
        let mut m = Message::new("t", Bytes::from(format!("m{id}")), Time(10));
        m.qos = QoS::AtLeastOnce;
        m.id = id;
        log.push(rec(|b| super::format::encode_message(b, &m)));
    }
    // Session: old encode_session is byte-identical to the new Record::Session encoding.
    log.push(rec(|b| {
        b.put_u8(3);
        b.put_u64(1);
        b.put_u64(1);
        b.put_u8(b'c');
        b.put_u8(5);
        b.put_u64(600);
        b.put_u64(0);
    }));
    // Subscribe with old options byte (QoS 1, no local).
    log.push(rec(|b| {
        b.put_u8(5);
        b.put_u64(1);
        b.put_u64(3);
        for c in b"t/#" {
            b.put_u8(*c);
        }
        b.put_u8(1 | 4);
        b.put_u64(7);
    }));
    // Enqueue x4, old layout: sid | msg id | flags | n ids | ids
    for id in 1..=4u64 {
        log.push(rec(|b| {
            b.put_u8(7);
            b.put_u64(1);
            b.put_u64(id);
            b.put_u8(1);
            b.put_u8(1);
            b.put_u64(7);
        }));
    }
    // Flight (8): front (m1) in flight as pid 5; PubRec on it? (QoS1: no). PopPending (9): m2 expired.
    log.push(rec(|b| {
        b.put_u8(8);
        b.put_u64(1);
        b.put_u8(0);
        b.put_u8(5);
    }));
    log.push(rec(|b| {
        b.put_u8(9);
        b.put_u64(1);
    }));
    // Flight (8) m3 as pid 6, then Acked (11) pid 5.
    log.push(rec(|b| {
        b.put_u8(8);
        b.put_u64(1);
        b.put_u8(0);
        b.put_u8(6);
    }));
    log.push(rec(|b| {
        b.put_u8(11);
        b.put_u64(1);
        b.put_u8(0);
        b.put_u8(5);
    }));
    // A will (Message id 0 + Will 15).
    let mut w = Message::new("wills", Bytes::from_static(b"bye"), Time(99));
    w.publisher = Some(sid);
    log.push(rec(|b| super::format::encode_message(b, &w)));
    log.push(rec(|b| {
        b.put_u8(15);
        b.put_u64(1);
        b.put_u64(99);
        b.put_u64(0);
    }));
    let mut b = Broker::new(BrokerConfig::default());
    let r = b
        .restore(log.iter().map(|r| r.as_slice()), Time(50))
        .unwrap();
    assert_eq!(r.skipped, 0);
    let s = &b.sessions[&sid];
    assert_eq!(s.inflight.keys().copied().collect::<Vec<_>>(), vec![6]);
    assert_eq!(s.inflight[&6].pending.message.id, 3);
    assert_eq!(
        s.pending.iter().map(|p| p.message.id).collect::<Vec<_>>(),
        vec![4]
    );
    assert_eq!(s.pending[0].subscription_ids, vec![7]);
    assert!(s.subscriptions["t/#"].options.no_local);
    assert!(s.pending_will.is_some());
    // And a live engine continues on it.
    b.enable_journal(&mut Outbox::default());
}

/// A session connected at a crash was disconnected by it, at the restart: that time is
/// journaled, so a second restart does not move it (restarting more often than the expiry
/// interval must not keep a session alive forever).
#[test]
fn a_restart_does_not_move_the_disconnect_time_of_a_crashed_session() {
    let mut b = Broker::new(BrokerConfig::default());
    b.enable_journal(&mut Outbox::default());
    let mut out = Outbox::default();
    let mut c = Connect {
        version: ProtocolVersion::V5,
        client_id: "x".into(),
        clean_start: true,
        keep_alive: 0,
        username: None,
        password: None,
        will: None,
        properties: Properties::default(),
    };
    c.properties.session_expiry_interval = Some(60);
    b.connect(ConnId(1), c, Time(0), &mut out);
    let mut log: Vec<Vec<u8>> = out.journal.records().map(|r| r.to_vec()).collect();
    // Crash; restart at 10 s; nothing happens; crash; restart at 50 s.
    let mut b1 = Broker::new(BrokerConfig::default());
    b1.restore(log.iter().map(|r| r.as_slice()), Time(10_000))
        .unwrap();
    let mut first = Outbox::default();
    b1.enable_journal(&mut first);
    log.extend(first.journal.records().map(|r| r.to_vec()));
    let mut b2 = Broker::new(BrokerConfig::default());
    b2.restore(log.iter().map(|r| r.as_slice()), Time(50_000))
        .unwrap();
    let s = b2.sessions.values().next().unwrap();
    assert_eq!(s.disconnected_at, Some(Time(10_000)));
    // It expires 60 s after the first restart's disconnect, not after the second's.
    b2.tick(Time(70_001), &mut out);
    assert_eq!(b2.session_count(), 0);
}

fn durable_client(b: &mut Broker, conn: u64, id: &str, out: &mut Outbox) {
    let mut c = Connect {
        version: ProtocolVersion::V5,
        client_id: id.into(),
        clean_start: false,
        keep_alive: 0,
        username: None,
        password: None,
        will: None,
        properties: Properties::default(),
    };
    c.properties.session_expiry_interval = Some(3600);
    assert!(b.connect(ConnId(conn), c, Time(0), out).accepted);
}

fn publish_qos1(b: &mut Broker, conn: u64, pid: u16, out: &mut Outbox) {
    let p = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "q/t".into(),
        packet_id: Some(pid),
        properties: Properties::default(),
        payload: Bytes::from(format!("m{pid}")),
    };
    b.packet(ConnId(conn), Packet::Publish(p), Time(0), out);
}

fn queued_for(b: &Broker, id: &str) -> usize {
    b.session_pending(id).map_or(0, |(f, q)| f + q)
}

/// What the server does at start: restore, then journal what restore concluded, closing an
/// unfinished checkpoint with a whole one. Returns the new broker and its first records.
fn start_from(log: &[Vec<u8>]) -> (Broker, Vec<Vec<u8>>, RestoreReport) {
    let mut b = Broker::new(BrokerConfig::default());
    let report = b
        .restore(log.iter().map(|r| r.as_slice()), Time(0))
        .unwrap();
    let mut first = Outbox::default();
    b.enable_journal(&mut first);
    if report.incomplete_checkpoint {
        b.checkpoint(&mut first);
    }
    let records = first.journal.records().map(|r| r.to_vec()).collect();
    (b, records, report)
}

/// A crash cut a checkpoint that spans several batches; the next start appends after it. The
/// records appended then are not swallowed as part of the unfinished checkpoint, and a second
/// crash cutting the new start's checkpoint too still leaves the state before both.
#[test]
fn records_after_an_unfinished_checkpoint_are_kept() {
    let mut b = Broker::new(BrokerConfig::default());
    let mut out = Outbox::default();
    b.enable_journal(&mut out);
    durable_client(&mut b, 1, "sub", &mut out);
    let sub = Subscribe {
        packet_id: 1,
        filters: vec![(
            "q/#".into(),
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
        )],
        properties: Properties::default(),
    };
    b.packet(ConnId(1), Packet::Subscribe(sub), Time(0), &mut out);
    b.closed(ConnId(1), Time(0), &mut out);
    durable_client(&mut b, 2, "pub", &mut out);
    for pid in 1..=3 {
        publish_qos1(&mut b, 2, pid, &mut out);
    }
    assert_eq!(queued_for(&b, "sub"), 3);
    let mut log: Vec<Vec<u8>> = out.journal.records().map(|r| r.to_vec()).collect();
    out.journal.clear();
    // A checkpoint, cut by a crash before its end.
    b.checkpoint(&mut out);
    let checkpoint: Vec<Vec<u8>> = out.journal.records().map(|r| r.to_vec()).collect();
    log.extend(checkpoint[..checkpoint.len() - 2].iter().cloned());

    // Second start: the unfinished checkpoint is ignored, a whole one is written, and a new
    // message is accepted after it.
    let (mut b2, first, report) = start_from(&log);
    assert!(report.incomplete_checkpoint);
    assert_eq!(queued_for(&b2, "sub"), 3);
    let mut torn = log.clone();
    torn.extend(first[..first.len() / 2].iter().cloned());
    log.extend(first);
    let mut out = Outbox::default();
    durable_client(&mut b2, 2, "pub", &mut out);
    publish_qos1(&mut b2, 2, 4, &mut out);
    log.extend(out.journal.records().map(|r| r.to_vec()));
    assert_eq!(queued_for(&b2, "sub"), 4);

    // Third start: all four are there.
    let (b3, _, report) = start_from(&log);
    assert!(!report.incomplete_checkpoint);
    assert_eq!(
        queued_for(&b3, "sub"),
        4,
        "the message accepted after the restart was lost"
    );

    // Had the second start's checkpoint been cut too, the state before both stands.
    let (b4, _, report) = start_from(&torn);
    assert!(report.incomplete_checkpoint);
    assert_eq!(queued_for(&b4, "sub"), 3);
}
