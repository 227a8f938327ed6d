//! A client still sending when the broker disconnects it reads the DISCONNECT and its reason,
//! and a clean close, not a reset. A socket closed with unread input (or input still arriving)
//! answers RST: the client's next write fails with a broken pipe (Paho's test_flow_control2
//! failed so; both tests here did before the fix), and a client whose stack drops unread
//! data on RST never sees the DISCONNECT. The broker half-closes and drains the input for a
//! bounded time instead (a lingering close).

use bytes::{Bytes, BytesMut};
use ferrymq_mqtt::{decode, encode, Limits, Packet, ProtocolVersion, Publish, QoS, ReasonCode};
use tokio::io::AsyncReadExt;

use crate::common::*;

/// Reads packets until the connection ends, and how it ended: `Ok` for a clean close (EOF).
async fn read_to_end(raw: &mut Raw) -> (Vec<Packet>, std::io::Result<()>) {
    let mut buf = BytesMut::new();
    let mut seen = Vec::new();
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match raw.stream.read_buf(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
            while let Some(p) = decode(&mut buf, raw.version, &Limits::default()).unwrap() {
                seen.push(p);
            }
        }
    })
    .await
    .expect("the broker closes in time");
    (seen, end)
}

fn publish(version: ProtocolVersion, qos: QoS, id: u16, size: usize) -> BytesMut {
    let p = Publish {
        dup: false,
        qos,
        retain: false,
        topic: "flood".into(),
        packet_id: (qos != QoS::AtMostOnce).then_some(id),
        properties: Default::default(),
        payload: Bytes::from(vec![b'x'; size]),
    };
    let mut out = BytesMut::new();
    encode(&Packet::Publish(p), version, &mut out).unwrap();
    out
}

/// QoS 0 publishes of 1,000 bytes, one a millisecond for 40 ms: a client that sends before
/// it reads. The first write error, if any.
async fn keep_sending(raw: &mut Raw) -> std::io::Result<()> {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(1));
    for _ in 0..40 {
        tick.tick().await;
        raw.send_bytes(&publish(raw.version, QoS::AtMostOnce, 0, 1000))
            .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_exceeded_reaches_a_client_that_is_still_sending() {
    let mut c = test_config();
    c.mqtt.receive_maximum = 5;
    let server = start_with(c).await;
    for round in 0..3 {
        let mut raw = Raw::connect(&server, ProtocolVersion::V5).await;
        raw.send(&connect_packet(
            &format!("flooder-{round}"),
            ProtocolVersion::V5,
        ))
        .await;
        assert!(
            matches!(raw.recv().await, Some(Packet::ConnAck(a)) if a.reason == ReasonCode::Success)
        );
        // Six QoS 2 publishes without PUBREL (the sixth exceeds the receive maximum of 5),
        // then QoS 0 publishes, one a millisecond for 40 ms, as a client does that sends
        // before it reads: most arrive after the broker has decided to disconnect us. 46 KiB
        // in all, less than the broker drains while lingering.
        let mut sent = Ok(());
        for id in 1..=6 {
            sent = sent.and(
                raw.send_bytes(&publish(ProtocolVersion::V5, QoS::ExactlyOnce, id, 1000))
                    .await,
            );
        }
        sent = sent.and(keep_sending(&mut raw).await);
        let (seen, end) = read_to_end(&mut raw).await;
        assert!(
            matches!(seen.last(), Some(Packet::Disconnect(d)) if d.reason == ReasonCode::ReceiveMaximumExceeded),
            "round {round}: expected DISCONNECT 0x93 last, got {seen:?} and then {end:?}"
        );
        assert!(
            end.is_ok(),
            "round {round}: the connection ended with {end:?}, not a clean close"
        );
        let pubrecs = seen
            .iter()
            .filter(|p| matches!(p, Packet::PubRec(_)))
            .count();
        assert_eq!(
            pubrecs, 5,
            "round {round}: the five within the window are answered"
        );
        // What Paho's test_flow_control2 saw: a broken pipe while it was still sending.
        assert!(sent.is_ok(), "round {round}: writing failed: {sent:?}");
    }
}

/// 3.1.1 has no DISCONNECT from the server; a client closed for a bad packet while it keeps
/// sending still gets a clean close (FIN), not a broken pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3_1_1_client_closed_while_sending_sees_a_clean_close() {
    let server = start().await;
    let mut raw = Raw::connect(&server, ProtocolVersion::V311).await;
    raw.send(&connect_packet("bad-311", ProtocolVersion::V311))
        .await;
    assert!(matches!(raw.recv().await, Some(Packet::ConnAck(_))));
    // A packet of reserved type 0, then more publishes.
    let mut sent = raw.send_bytes(&[0x00, 0x00]).await;
    sent = sent.and(keep_sending(&mut raw).await);
    let (seen, end) = read_to_end(&mut raw).await;
    assert!(seen.is_empty(), "nothing after CONNACK: {seen:?}");
    assert!(
        end.is_ok(),
        "the connection ended with {end:?}, not a clean close"
    );
    assert!(sent.is_ok(), "writing failed: {sent:?}");
}
