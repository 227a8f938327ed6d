//! `ferrymq pub` and `ferrymq sub`: flags follow mosquitto_pub and mosquitto_sub.

use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use ferrymq_client::{Client, ConnectOptions};
use ferrymq_mqtt::{
    Packet, Properties, PropertyValues, ProtocolVersion, Publish, QoS, RetainHandling,
    SubscriptionOptions,
};

#[derive(clap::Args, Clone)]
pub struct ConnArgs {
    /// Print help (-h is the host, as in mosquitto_pub).
    #[arg(long, action = clap::ArgAction::Help)]
    help: Option<bool>,
    /// Broker host.
    #[arg(short = 'h', long, default_value = "127.0.0.1")]
    host: String,
    /// Broker port.
    #[arg(short = 'p', long, default_value_t = 1883)]
    port: u16,
    /// Protocol version: 3 (3.1.1) or 5.
    #[arg(short = 'V', long = "protocol-version", default_value = "5")]
    version: String,
    /// Client id; empty lets the broker assign one.
    #[arg(short = 'i', long = "id", default_value = "")]
    id: String,
    #[arg(short = 'u', long)]
    username: Option<String>,
    #[arg(short = 'P', long)]
    password: Option<String>,
    /// Keep alive in seconds.
    #[arg(short = 'k', long, default_value_t = 60)]
    keepalive: u16,
    /// A user property KEY=VALUE on each PUBLISH (repeatable).
    #[arg(long = "user-property", value_name = "KEY=VALUE")]
    user_properties: Vec<String>,
    /// TLS (`--tls-ca`), WebSocket (`--ws`) or a broker URL (`--url mqtts://host:8883`).
    #[command(flatten)]
    transport: crate::transport_args::TransportArgs,
}

fn version(s: &str) -> anyhow::Result<ProtocolVersion> {
    Ok(match s {
        "3" | "311" | "31" | "mqttv311" => ProtocolVersion::V311,
        "5" | "mqttv5" => ProtocolVersion::V5,
        other => bail!("unknown protocol version {other:?}: use 3 or 5"),
    })
}

fn qos(q: u8) -> anyhow::Result<QoS> {
    QoS::from_u8(q).with_context(|| format!("QoS must be 0, 1 or 2, not {q}"))
}

fn user_props(list: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    list.iter()
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("user property {kv:?} is not KEY=VALUE"))?;
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

fn options(
    c: &ConnArgs,
    clean_start: bool,
    properties: Properties,
) -> anyhow::Result<ConnectOptions> {
    let endpoint = c.transport.endpoint(&c.host, c.port, true)?;
    let mut o = ConnectOptions::new(endpoint.addr.clone(), c.id.clone());
    endpoint.apply(&mut o);
    o.version = version(&c.version)?;
    o.username = c.username.clone();
    o.password = c.password.clone().map(Bytes::from);
    o.keep_alive = c.keepalive;
    o.clean_start = clean_start;
    if o.version == ProtocolVersion::V5 {
        o.properties = properties;
    } else if c.id.is_empty() && !clean_start {
        bail!("a persistent 3.1.1 session needs a client id (-i)");
    }
    Ok(o)
}

#[derive(clap::Args)]
pub struct PubArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Topic to publish to.
    #[arg(short = 't', long)]
    topic: String,
    /// Message payload.
    #[arg(short = 'm', long, conflicts_with_all = ["file", "null", "stdin_lines"])]
    message: Option<String>,
    /// Read the payload from a file.
    #[arg(short = 'f', long)]
    file: Option<std::path::PathBuf>,
    /// Send an empty payload (clears a retained message).
    #[arg(short = 'n', long = "null-message")]
    null: bool,
    /// Send each line of standard input as a message.
    #[arg(short = 'l', long = "stdin-line")]
    stdin_lines: bool,
    #[arg(short = 'q', long, default_value_t = 0)]
    qos: u8,
    /// Retain the message.
    #[arg(short = 'r', long)]
    retain: bool,
    /// Send the message this many times.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// MQTT 5: message expiry interval in seconds.
    #[arg(long)]
    message_expiry: Option<u32>,
    /// MQTT 5: content type.
    #[arg(long)]
    content_type: Option<String>,
    /// MQTT 5: response topic.
    #[arg(long)]
    response_topic: Option<String>,
    /// MQTT 5: correlation data.
    #[arg(long)]
    correlation_data: Option<String>,
    /// MQTT 5: mark the payload as UTF-8 text.
    #[arg(long)]
    utf8: bool,
}

pub async fn publish(a: PubArgs) -> anyhow::Result<()> {
    let opts = options(&a.conn, true, Properties::default())?;
    let v5 = opts.version == ProtocolVersion::V5;
    let (mut client, _) = Client::connect(opts).await.context("connect failed")?;
    let payloads: Vec<Bytes> = if let Some(m) = &a.message {
        vec![Bytes::from(m.clone())]
    } else if let Some(f) = &a.file {
        vec![Bytes::from(
            std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?,
        )]
    } else if a.stdin_lines {
        std::io::stdin()
            .lock()
            .lines()
            .map(|l| l.map(Bytes::from))
            .collect::<Result<_, _>>()?
    } else if a.null {
        vec![Bytes::new()]
    } else {
        bail!("give a payload with -m, -f, -l or -n");
    };
    let mut properties = Properties::default();
    if v5 {
        properties.user_properties = user_props(&a.conn.user_properties)?;
        properties.message_expiry_interval = a.message_expiry;
        properties.content_type = a.content_type.clone();
        properties.response_topic = a.response_topic.clone();
        properties.correlation_data = a.correlation_data.clone().map(Bytes::from);
        properties.payload_format_indicator = a.utf8.then_some(1);
    }
    let qos = qos(a.qos)?;
    for _ in 0..a.repeat {
        for payload in &payloads {
            let p = Publish {
                dup: false,
                qos,
                retain: a.retain,
                topic: a.topic.clone(),
                packet_id: None,
                properties: properties.clone(),
                payload: payload.clone(),
            };
            let reason = client.publish(p).await?;
            if reason.is_error() {
                bail!("broker refused the message: {reason:?}");
            }
        }
    }
    client.disconnect().await?;
    Ok(())
}

#[derive(clap::Args)]
pub struct SubArgs {
    #[command(flatten)]
    conn: ConnArgs,
    /// Topic filter (repeatable).
    #[arg(short = 't', long = "topic", required = true)]
    topics: Vec<String>,
    #[arg(short = 'q', long, default_value_t = 0)]
    qos: u8,
    /// Exit after this many messages.
    #[arg(short = 'C', long = "count")]
    count: Option<u64>,
    /// Print the topic before each payload.
    #[arg(short = 'v', long)]
    verbose: bool,
    /// Keep the session (3.1.1 clean session = 0; 5.0 session expiry = forever unless set).
    #[arg(short = 'c', long = "persistent")]
    persistent: bool,
    /// MQTT 5: session expiry interval in seconds.
    #[arg(short = 'x', long)]
    session_expiry: Option<u32>,
    /// Do not print retained messages sent because of the subscription.
    #[arg(short = 'R', long = "no-stale")]
    no_stale: bool,
    /// Exit after this many seconds without a message.
    #[arg(short = 'W', long = "timeout")]
    timeout: Option<u64>,
    /// MQTT 5: do not receive our own messages.
    #[arg(long)]
    no_local: bool,
    /// MQTT 5: keep the RETAIN flag as published.
    #[arg(long)]
    retain_as_published: bool,
    /// MQTT 5: retain handling 0, 1 or 2.
    #[arg(long, default_value_t = 0)]
    retain_handling: u8,
    /// MQTT 5: subscription identifier.
    #[arg(long)]
    subscription_id: Option<u32>,
    /// Print MQTT 5 properties (user properties, content type, ...) after each message.
    #[arg(long)]
    show_properties: bool,
}

pub async fn subscribe(a: SubArgs) -> anyhow::Result<()> {
    let mut props = Properties::default();
    if a.persistent || a.session_expiry.is_some() {
        props.session_expiry_interval = Some(a.session_expiry.unwrap_or(u32::MAX));
    }
    let opts = options(&a.conn, !a.persistent, props)?;
    let keep_alive = opts.keep_alive;
    let (mut client, _) = Client::connect(opts).await.context("connect failed")?;
    let retain_handling = match a.retain_handling {
        0 => RetainHandling::SendAtSubscribe,
        1 => RetainHandling::SendIfNew,
        2 => RetainHandling::DoNotSend,
        n => bail!("retain handling must be 0, 1 or 2, not {n}"),
    };
    let o = SubscriptionOptions {
        qos: qos(a.qos)?,
        no_local: a.no_local,
        retain_as_published: a.retain_as_published,
        retain_handling,
    };
    let filters = a.topics.iter().map(|t| (t.clone(), o)).collect();
    let sp = PropertyValues {
        subscription_identifiers: a.subscription_id.into_iter().collect(),
        ..Default::default()
    }
    .into();
    let ack = client.subscribe(filters, sp).await?;
    for (t, r) in a.topics.iter().zip(&ack.reasons) {
        if r.is_error() {
            bail!("subscription to {t:?} refused: {r:?}");
        }
    }
    let mut seen = 0u64;
    let ping_every = Duration::from_secs(u64::from(keep_alive.max(1)));
    let idle = a.timeout.map(Duration::from_secs);
    let mut ping = tokio::time::interval(ping_every);
    ping.tick().await;
    loop {
        let wait = async {
            match idle {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let packet = tokio::select! {
            p = client.recv() => p?,
            _ = ping.tick(), if keep_alive > 0 => {
                client.send(&Packet::PingReq).await?;
                continue;
            }
            _ = wait => bail!("timed out after {} s without a message", idle.unwrap_or_default().as_secs()),
        };
        match packet {
            Packet::Publish(p) => {
                client.queue_ack(&p)?;
                client.flush().await?;
                if a.no_stale && p.retain {
                    continue;
                }
                print_message(&p, a.verbose, a.show_properties);
                seen += 1;
                if a.count.is_some_and(|c| seen >= c) {
                    break;
                }
            }
            Packet::PubRel(r) => {
                client.queue_pubcomp(r.packet_id)?;
                client.flush().await?;
            }
            _ => {}
        }
    }
    client.disconnect().await?;
    Ok(())
}

fn print_message(p: &Publish, verbose: bool, show_properties: bool) {
    let payload = String::from_utf8_lossy(&p.payload);
    let mut out = std::io::stdout().lock();
    // Write errors (a closed pipe) end nothing: the subscriber keeps acknowledging.
    macro_rules! println {
        ($($t:tt)*) => {{ let _ = writeln!(out, $($t)*); }};
    }
    if verbose {
        println!("{} {}", p.topic, payload);
    } else {
        println!("{payload}");
    }
    if show_properties {
        let pr = &p.properties;
        for (k, v) in &pr.user_properties {
            println!("  user-property {k}={v}");
        }
        if let Some(ct) = &pr.content_type {
            println!("  content-type {ct}");
        }
        if let Some(rt) = &pr.response_topic {
            println!("  response-topic {rt}");
        }
        if let Some(cd) = &pr.correlation_data {
            println!("  correlation-data {}", String::from_utf8_lossy(cd));
        }
        if let Some(e) = pr.message_expiry_interval {
            println!("  message-expiry {e}");
        }
        for id in &pr.subscription_identifiers {
            println!("  subscription-id {id}");
        }
    }
}
