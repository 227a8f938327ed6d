//! RabbitMQ with a quorum queue.
//!
//! The queue `qbench` is declared durable with `x-queue-type = quorum` (deleted first, so
//! every run starts empty); publishers put channels in confirm mode and publish persistent
//! messages to it through the default exchange, keeping `inflight` confirms outstanding;
//! consumers set `basic.qos` to the prefetch and ack each delivery. With `--nack-once`, a
//! delivery that is not marked redelivered gets `basic.nack` with requeue, and the
//! redelivery is acked. The attempt number is the quorum queue's `x-delivery-count` header
//! plus one (the header is absent on a first delivery).

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::Barrier;

use crate::{finish, payload, Load, Report, Shared, Tally};

const QUEUE: &str = "qbench";

async fn connect(url: &str) -> anyhow::Result<Connection> {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to RabbitMQ at {url}"))
}

pub async fn run(url: &str, load: &Load, shared: Arc<Shared>) -> anyhow::Result<Report> {
    let admin = connect(url).await?;
    let ch = admin.create_channel().await?;
    let _ = ch
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        QUEUE.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .context("declaring the quorum queue")?;

    let ready = Arc::new(Barrier::new(load.publishers + load.consumers + 1));
    let mut consumers = Vec::new();
    for c in 0..load.consumers {
        let conn = connect(url).await?;
        let (shared, ready, load) = (shared.clone(), ready.clone(), load.clone());
        consumers.push(tokio::spawn(async move {
            consume(conn, c, &load, &shared, &ready).await
        }));
    }
    let mut publishers = Vec::new();
    for p in 0..load.publishers {
        let conn = connect(url).await?;
        let (shared, ready, load) = (shared.clone(), ready.clone(), load.clone());
        publishers.push(tokio::spawn(async move {
            publish(conn, p as u32, &load, &shared, &ready).await
        }));
    }
    ready.wait().await;
    let started = Instant::now();
    let report = finish(load, &shared, QUEUE, started, publishers, consumers).await;
    let _ = ch
        .queue_delete(QUEUE.into(), QueueDeleteOptions::default())
        .await;
    report
}

async fn publish(
    conn: Connection,
    id: u32,
    load: &Load,
    shared: &Shared,
    ready: &Barrier,
) -> anyhow::Result<u64> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let props = BasicProperties::default().with_delivery_mode(2);
    ready.wait().await;
    let mut window = VecDeque::with_capacity(load.inflight);
    let mut acked = 0;
    for seq in 0..shared.messages {
        if shared.stop.load(Relaxed) {
            return Ok(acked);
        }
        if window.len() >= load.inflight {
            if let Some(confirm) = window.pop_front() {
                confirmed(confirm).await?;
                acked += 1;
            }
        }
        let confirm = ch
            .basic_publish(
                "".into(),
                QUEUE.into(),
                BasicPublishOptions::default(),
                &payload(id, seq, load.payload),
                props.clone(),
            )
            .await?;
        window.push_back(confirm);
    }
    for confirm in window {
        confirmed(confirm).await?;
        acked += 1;
    }
    Ok(acked)
}

async fn confirmed(confirm: lapin::PublisherConfirm) -> anyhow::Result<()> {
    let c = confirm.await.context("publisher confirm")?;
    if !c.is_ack() {
        anyhow::bail!("the broker nacked a publish");
    }
    Ok(())
}

async fn consume(
    conn: Connection,
    index: usize,
    load: &Load,
    shared: &Shared,
    ready: &Barrier,
) -> anyhow::Result<Tally> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(load.prefetch, BasicQosOptions::default())
        .await?;
    let mut deliveries = ch
        .basic_consume(
            QUEUE.into(),
            format!("qbench-{index}").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut tally = Tally::new()?;
    ready.wait().await;
    while !shared.done() {
        let d = tokio::select! {
            d = deliveries.next() => d,
            _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
        };
        let Some(d) = d else { break };
        let d = d.context("delivery")?;
        let attempt = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count").cloned())
            .and_then(|v| match v {
                AMQPValue::LongLongInt(n) => u32::try_from(n).ok(),
                AMQPValue::LongInt(n) => u32::try_from(n).ok(),
                AMQPValue::LongUInt(n) => Some(n),
                _ => None,
            })
            .map_or(if d.redelivered { 2 } else { 1 }, |n| n + 1);
        tally.attempt(attempt);
        if load.nack_once && attempt == 1 {
            d.nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await?;
            tally.nacked += 1;
            continue;
        }
        d.ack(BasicAckOptions::default()).await?;
        tally.acked(shared, &d.data)?;
    }
    Ok(tally)
}
