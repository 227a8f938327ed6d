//! nats-server JetStream as a work queue.
//!
//! The stream `QBENCH` (subjects `qbench.>`) has WorkQueue retention and file storage (the
//! server's default sync policy); the durable pull consumer `workers` acks explicitly, with
//! MaxDeliver 5 and a BackOff list (which governs redeliveries after an ack timeout; a `-NAK`
//! without a delay is redelivered at once, like FerryMQ's `backoff = none`). MaxAckPending is
//! the prefetch times the consumers, so each client may hold about `prefetch` messages, as an
//! MQTT consumer's receive maximum allows. Every bench consumer is its own connection pulling
//! from that one durable consumer, in batches of `prefetch` (the client refills at half).

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer::pull, message::AckKind, stream};
use futures::StreamExt;
use tokio::sync::Barrier;

use crate::{finish, payload, Load, Report, Shared, Tally};

const STREAM: &str = "QBENCH";
const CONSUMER: &str = "workers";

pub async fn run(url: &str, load: &Load, shared: Arc<Shared>) -> anyhow::Result<Report> {
    let admin = async_nats::connect(url)
        .await
        .with_context(|| format!("connecting to nats-server at {url}"))?;
    let js = jetstream::new(admin);
    let _ = js.delete_stream(STREAM).await; // a fresh stream for every run
    let stream = js
        .create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec!["qbench.>".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("creating the WorkQueue stream")?;
    stream
        .create_consumer(pull::Config {
            durable_name: Some(CONSUMER.into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_deliver: 5,
            backoff: vec![
                Duration::from_secs(30),
                Duration::from_secs(60),
                Duration::from_secs(120),
            ],
            max_ack_pending: i64::from(load.prefetch) * load.consumers as i64,
            max_batch: i64::from(load.prefetch),
            ..Default::default()
        })
        .await
        .context("creating the durable pull consumer")?;

    let ready = Arc::new(Barrier::new(load.publishers + load.consumers + 1));
    let mut consumers = Vec::new();
    for _ in 0..load.consumers {
        let client = async_nats::connect(url).await?;
        let (shared, ready, load) = (shared.clone(), ready.clone(), load.clone());
        consumers.push(tokio::spawn(async move {
            consume(client, &load, &shared, &ready).await
        }));
    }
    let mut publishers = Vec::new();
    for p in 0..load.publishers {
        let client = async_nats::connect(url).await?;
        let (shared, ready, load) = (shared.clone(), ready.clone(), load.clone());
        publishers.push(tokio::spawn(async move {
            publish(client, p as u32, &load, &shared, &ready).await
        }));
    }
    ready.wait().await;
    let started = Instant::now();
    finish(load, &shared, STREAM, started, publishers, consumers).await
}

async fn publish(
    client: async_nats::Client,
    id: u32,
    load: &Load,
    shared: &Shared,
    ready: &Barrier,
) -> anyhow::Result<u64> {
    let js = jetstream::new(client);
    let subject = format!("qbench.{id}");
    ready.wait().await;
    let mut window = VecDeque::with_capacity(load.inflight);
    let mut acked = 0;
    for seq in 0..shared.messages {
        if shared.stop.load(Relaxed) {
            return Ok(acked);
        }
        if window.len() >= load.inflight {
            if let Some(ack) = window.pop_front() {
                let _: jetstream::publish::PublishAck = ack_of(ack).await?;
                acked += 1;
            }
        }
        let ack = js
            .publish(subject.clone(), payload(id, seq, load.payload))
            .await?;
        window.push_back(ack);
    }
    for ack in window {
        ack_of(ack).await?;
        acked += 1;
    }
    Ok(acked)
}

async fn ack_of(
    ack: jetstream::context::PublishAckFuture,
) -> anyhow::Result<jetstream::publish::PublishAck> {
    ack.await.context("JetStream publish not acknowledged")
}

async fn consume(
    client: async_nats::Client,
    load: &Load,
    shared: &Shared,
    ready: &Barrier,
) -> anyhow::Result<Tally> {
    let js = jetstream::new(client);
    let consumer: jetstream::consumer::PullConsumer = js
        .get_stream(STREAM)
        .await?
        .get_consumer(CONSUMER)
        .await
        .map_err(|e| anyhow::anyhow!("getting the consumer: {e}"))?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(usize::from(load.prefetch))
        .messages()
        .await?;
    let mut tally = Tally::new()?;
    ready.wait().await;
    while !shared.done() {
        let m = tokio::select! {
            m = messages.next() => m,
            _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
        };
        let Some(m) = m else { break };
        let m = m.map_err(|e| anyhow::anyhow!("pull: {e}"))?;
        let attempt = m
            .info()
            .map_err(|e| anyhow::anyhow!("message info: {e}"))?
            .delivered;
        let attempt = u32::try_from(attempt).unwrap_or(0);
        tally.attempt(attempt);
        if load.nack_once && attempt == 1 {
            m.ack_with(AckKind::Nak(None))
                .await
                .map_err(|e| anyhow::anyhow!("nak: {e}"))?;
            tally.nacked += 1;
            continue;
        }
        m.ack().await.map_err(|e| anyhow::anyhow!("ack: {e}"))?;
        tally.acked(shared, &m.payload)?;
    }
    Ok(tally)
}
