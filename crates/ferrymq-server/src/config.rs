//! The configuration file: plain data, validated in one place. Every option has a default, so
//! an empty file (or none) is a complete configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ferrymq_core::BrokerConfig;
use serde::{Deserialize, Serialize};

use crate::ServerError;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where durable state lives (the log is in `{data_dir}/log`).
    pub data_dir: PathBuf,
    pub storage: Storage,
    pub listeners: Listeners,
    /// TLS for the `mqtts` and `wss` listeners; unset: they are off.
    pub tls: Option<Tls>,
    pub mqtt: Mqtt,
    pub limits: Limits,
    pub sys: Sys,
    pub log: Log,
    pub admin: Admin,
    /// Authentication (`auth.rs`).
    pub auth: crate::auth::AuthConfig,
    /// Access control rules (`acl.rs`).
    pub acl: crate::acl::AclSection,
    /// Work queues declared at start (`[[queue]]` tables; see docs/queues.md). Queues
    /// created over the API live in the log, not here.
    #[serde(rename = "queue")]
    pub queues: Vec<crate::queue_spec::QueueSpec>,
    /// The audit log (`audit.rs`); off unless `file` is set.
    pub audit: crate::audit::AuditConfig,
}

/// Durability: what is written, when it is synced, how much disk it may use.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    /// false: a pure in-memory broker; nothing survives a restart.
    pub persistence: bool,
    /// When an acknowledged QoS 1/2 message is on disk: see [`Fsync`].
    pub fsync: Fsync,
    /// Milliseconds between syncs with `fsync = "interval"`.
    pub fsync_interval_ms: u64,
    /// A log segment is sealed and a new one started at this size.
    pub segment_bytes: u64,
    /// Retention: once this many bytes were written since the last checkpoint (and at least
    /// twice that checkpoint's size), the live state is checkpointed and older segments
    /// deleted. Disk use stays near the live state plus this plus one segment.
    pub compact_after_bytes: u64,
    /// Free bytes the data directory's file system must keep: below it the broker refuses
    /// new durable work (QoS 1/2 and retained publishes, new durable sessions and their
    /// subscriptions get 0x97) and raises the `disk_low` alarm, and the rest is a reserve for
    /// what must still be written (acks, resumed sessions, checkpoints). 0 = only a write
    /// that finds the disk full (ENOSPC) does it.
    pub min_free_bytes: u64,
}

/// When an acknowledged message is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fsync {
    /// fdatasync before acknowledging (group commit: one sync covers every waiting writer).
    /// Survives power loss.
    Always,
    /// Written to the OS before acknowledging, synced every `fsync_interval_ms`. Survives a
    /// process crash; a power loss can lose the last interval.
    Interval,
    /// Written to the OS before acknowledging; the OS syncs when it likes.
    Os,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            persistence: true,
            // Chosen by measurement (docs/performance.md): keeps everything acknowledged when
            // the process is killed at ~90% of in-memory QoS 1 throughput; `always` adds power
            // loss at roughly half of it.
            fsync: Fsync::Interval,
            fsync_interval_ms: 10,
            segment_bytes: 64 * 1024 * 1024,
            compact_after_bytes: 256 * 1024 * 1024,
            // Room for a few segments' worth of acks and a checkpoint of a modest state once
            // durable writes stop; small against today's disks.
            min_free_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Where the broker listens. Each key takes an address or a list of addresses; an empty list
/// turns that listener off. The MQTT transports share everything past the socket (see
/// `transport.rs`); defaults follow shared/DESIGN.md.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listeners {
    /// MQTT over TCP.
    pub mqtt: ListenAddrs,
    /// MQTT over TLS. Unset: port 8883 on the `mqtt` listener's addresses, when `[tls]` is set.
    pub mqtts: Option<ListenAddrs>,
    /// MQTT over WebSocket. Unset: port 8083 on the `mqtt` listener's addresses; when that
    /// default port is taken the broker says so and runs without it (an address set here
    /// must bind).
    pub ws: Option<ListenAddrs>,
    /// MQTT over WebSocket over TLS. Unset: port 8084 on the `mqtt` listener's addresses,
    /// when `[tls]` is set (skipped, like `ws`, when that default port is taken).
    pub wss: Option<ListenAddrs>,
    /// The HTTP path WebSocket clients connect to; any other path gets 404.
    pub ws_path: String,
    /// Web origins (`https://app.example`, or `*` for any) whose pages may open MQTT over
    /// WebSocket, besides loopback ones (`http://localhost:…`, `http://127.0.0.1:…`). An
    /// upgrade from a browser page of another origin gets 403: WebSocket is not subject to
    /// CORS, and without this any page open on a host could use its broker. Clients that are
    /// not browsers send no `Origin` and are not affected.
    pub ws_origins: Vec<String>,
    /// Admin HTTP: REST API, `/health`, `/metrics`. Off with `[]`.
    pub http: ListenAddrs,
    /// MQTT listeners (`mqtt`, `mqtts`, `ws`, `wss`) whose connections start with a PROXY
    /// protocol header (v1 or v2) from a load balancer: its client address becomes the
    /// connection's (`proxy_protocol.rs`).
    pub proxy_protocol: Vec<String>,
    /// Peers allowed to connect to those listeners (`"10.0.0.0/8"`, `"192.0.2.1"`); required
    /// with `proxy_protocol`, since anyone else could claim any address.
    pub trusted_proxies: Vec<String>,
}

/// A listener's addresses: `"127.0.0.1:1883"` or `["0.0.0.0:1883", "[::]:1883"]` in the file,
/// `"a,b"` on the command line; empty = off.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(from = "AddrsText", into = "Vec<SocketAddr>")]
pub struct ListenAddrs(pub Vec<SocketAddr>);

#[derive(Deserialize)]
#[serde(untagged)]
enum AddrsText {
    One(SocketAddr),
    Many(Vec<SocketAddr>),
}

impl From<AddrsText> for ListenAddrs {
    fn from(t: AddrsText) -> Self {
        match t {
            AddrsText::One(a) => ListenAddrs(vec![a]),
            AddrsText::Many(v) => ListenAddrs(v),
        }
    }
}

impl From<ListenAddrs> for Vec<SocketAddr> {
    fn from(a: ListenAddrs) -> Self {
        a.0
    }
}

impl From<SocketAddr> for ListenAddrs {
    fn from(a: SocketAddr) -> Self {
        ListenAddrs(vec![a])
    }
}

impl std::str::FromStr for ListenAddrs {
    type Err = std::net::AddrParseError;

    /// Comma-separated addresses; an empty string is no address (the listener is off).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(str::parse)
            .collect::<Result<Vec<_>, _>>()
            .map(ListenAddrs)
    }
}

impl ListenAddrs {
    /// The first address, if the listener is on.
    pub fn first(&self) -> Option<SocketAddr> {
        self.0.first().copied()
    }

    pub fn is_off(&self) -> bool {
        self.0.is_empty()
    }

    /// The same IP addresses with another port (how the unset MQTT listeners default).
    fn with_port(&self, port: u16) -> ListenAddrs {
        let mut ips: Vec<SocketAddr> = Vec::new();
        for a in &self.0 {
            let a = SocketAddr::new(a.ip(), port);
            if !ips.contains(&a) {
                ips.push(a);
            }
        }
        if ips.is_empty() {
            ips.push(SocketAddr::from(([127, 0, 0, 1], port)));
        }
        ListenAddrs(ips)
    }
}

/// The MQTT transports, as named in `[listeners]`, in metrics (`listener` label) and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenerKind {
    Mqtt,
    Mqtts,
    Ws,
    Wss,
}

impl ListenerKind {
    pub const ALL: [ListenerKind; 4] = [
        ListenerKind::Mqtt,
        ListenerKind::Mqtts,
        ListenerKind::Ws,
        ListenerKind::Wss,
    ];

    /// The `[listeners]` key.
    pub fn name(self) -> &'static str {
        match self {
            ListenerKind::Mqtt => "mqtt",
            ListenerKind::Mqtts => "mqtts",
            ListenerKind::Ws => "ws",
            ListenerKind::Wss => "wss",
        }
    }

    pub fn tls(self) -> bool {
        matches!(self, ListenerKind::Mqtts | ListenerKind::Wss)
    }

    pub fn websocket(self) -> bool {
        matches!(self, ListenerKind::Ws | ListenerKind::Wss)
    }

    fn default_port(self) -> u16 {
        match self {
            ListenerKind::Mqtt => 1883,
            ListenerKind::Mqtts => 8883,
            ListenerKind::Ws => 8083,
            ListenerKind::Wss => 8084,
        }
    }
}

/// One MQTT listener to bind, after defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttListener {
    pub kind: ListenerKind,
    pub addrs: ListenAddrs,
    /// Set from a default rather than the file or a flag: a port already taken is a warning
    /// and the listener is skipped, instead of a failed start.
    pub implicit: bool,
}

impl Listeners {
    /// The MQTT listeners to bind (`tls`: whether `[tls]` is set), in `ListenerKind::ALL` order,
    /// without those that are off.
    pub fn mqtt_listeners(&self, tls: bool) -> Vec<MqttListener> {
        ListenerKind::ALL
            .into_iter()
            .filter_map(|t| {
                let set = match t {
                    ListenerKind::Mqtt => Some(&self.mqtt),
                    ListenerKind::Mqtts => self.mqtts.as_ref(),
                    ListenerKind::Ws => self.ws.as_ref(),
                    ListenerKind::Wss => self.wss.as_ref(),
                };
                let (addrs, implicit) = match set {
                    Some(a) => (a.clone(), false),
                    None if t.tls() && !tls => return None,
                    None => (
                        self.mqtt.with_port(t.default_port()),
                        t != ListenerKind::Mqtts,
                    ),
                };
                (!addrs.is_off()).then_some(MqttListener {
                    kind: t,
                    addrs,
                    implicit,
                })
            })
            .collect()
    }
}

/// `[tls]`: the server certificate for `mqtts` and `wss`, and client certificates (mutual TLS).
/// The files are read again when they change (checked every few seconds): new handshakes use
/// the new certificates, open connections keep theirs.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain, server certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that client certificates are verified against. Unset: clients are
    /// not asked for a certificate.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Refuse clients without a valid certificate (needs `client_ca`).
    #[serde(default)]
    pub require_client_cert: bool,
    /// Which name of a verified client certificate becomes the MQTT user name.
    #[serde(default)]
    pub cert_username: CertUsername,
}

/// `tls.cert_username`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CertUsername {
    /// The subject's common name.
    Cn,
    /// The first DNS name, else the first e-mail address, of the subject alternative names.
    San,
    /// The certificate gives no user name; the CONNECT's own is used.
    #[default]
    None,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mqtt {
    pub max_keep_alive: u16,
    pub receive_maximum: u16,
    pub max_packet_size: u32,
    pub max_inflight: u16,
    pub max_queued_messages: usize,
    /// What a new QoS 1/2 message does for a session whose queue is full.
    pub queue_full: QueueFull,
    /// How long `backpressure` holds an acknowledgement before refusing the message.
    pub queue_full_timeout_ms: u64,
    pub topic_alias_maximum: u16,
    pub max_topic_levels: usize,
    pub max_subscriptions_per_client: usize,
    pub max_session_expiry: u32,
    /// Unset: allowed only when every listener is on a loopback address.
    pub allow_anonymous: Option<bool>,
    pub deny_subscribe: Vec<String>,
    pub deny_subscribe_reason: DenyReason,
    pub default_session_expiry: u32,
    /// Largest CONNECT accepted (fixed header included), checked as soon as its fixed header
    /// is read, before the rest is buffered: a larger one is refused (5.0: CONNACK 0x95) and
    /// closed. Raise it for large will payloads; `max_packet_size` applies too.
    pub max_connect_size: u32,
}

/// What a new QoS 1/2 message does for a session whose queue holds `max_queued_messages`
/// (the engine's [`ferrymq_core::QueueFull`], which documents each).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueFull {
    /// Queue it, hold the publisher's PUBACK/PUBREC and stop reading it until there is room;
    /// refuse it after `queue_full_timeout_ms`.
    Backpressure,
    /// Refuse it at once: 0x97 (5.0), connection closed (3.1.1).
    Reject,
    /// Drop the session's oldest queued message (counted): acknowledged messages are lost.
    DropOldest,
}

impl From<QueueFull> for ferrymq_core::QueueFull {
    fn from(q: QueueFull) -> Self {
        match q {
            QueueFull::Backpressure => ferrymq_core::QueueFull::Backpressure,
            QueueFull::Reject => ferrymq_core::QueueFull::Reject,
            QueueFull::DropOldest => ferrymq_core::QueueFull::DropOldest,
        }
    }
}

impl From<ferrymq_core::QueueFull> for QueueFull {
    fn from(q: ferrymq_core::QueueFull) -> Self {
        match q {
            ferrymq_core::QueueFull::Backpressure => QueueFull::Backpressure,
            ferrymq_core::QueueFull::Reject => QueueFull::Reject,
            ferrymq_core::QueueFull::DropOldest => QueueFull::DropOldest,
        }
    }
}

/// SUBACK reason for a denied subscription (5.0 clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    /// 0x87 Not authorized.
    NotAuthorized,
    /// 0x80 Unspecified error.
    UnspecifiedError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowConsumer {
    /// Drop QoS 0 messages for a connection whose outbound buffer is full.
    Drop,
    /// Disconnect it.
    Disconnect,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_connections: usize,
    pub connect_timeout_secs: u64,
    /// A connection's high mark, in bytes queued for it. A delivery that puts a subscriber
    /// over it holds back the publisher that sent it (its socket is not read) until the
    /// subscriber drains to half; the connection's own socket is not read either while it is
    /// over (a client that does not read its acks).
    pub max_outbound_bytes: usize,
    /// What happens to a subscriber that stays over its high mark past the grace period.
    pub slow_consumer: SlowConsumer,
    /// Milliseconds a subscriber may stay over its high mark, holding its publishers back,
    /// before it is treated as slow (it holds nobody back any more, and `slow_consumer`
    /// applies). A subscriber that reads as fast as it can loses nothing to a burst.
    pub slow_consumer_grace_ms: u64,
    /// Milliseconds a write to a connection may make no progress (the socket accepts no
    /// byte) before the connection is closed: catches clients that never read.
    pub write_timeout_ms: u64,
    /// PUBLISH packets a second one connection may send; 0 = unlimited.
    pub max_messages_per_sec: u64,
    /// Bytes a second (whole packets) one connection may send; 0 = unlimited.
    pub max_bytes_per_sec: u64,
    /// Burst allowance of every rate limit (the per-client ones and the connection rates), in
    /// milliseconds of its rate: a token bucket holds this much and starts full.
    pub rate_burst_ms: u64,
    /// What a client over `max_messages_per_sec` or `max_bytes_per_sec` gets.
    pub rate_exceeded: RateExceeded,
    /// Simultaneous connections from one source IP address; 0 = unlimited.
    pub max_connections_per_address: usize,
    /// New connections a second the listener accepts; 0 = unlimited.
    pub max_connection_rate: u64,
    /// New connections a second from one source IP address; 0 = unlimited.
    pub max_connection_rate_per_address: u64,
    /// Resident memory over which QoS 1/2 publishes are refused (0x97) and QoS 0 ones
    /// dropped, until it is back under 90% of it: bytes (`536870912`, `"512MiB"`), or a
    /// percentage (`"80%"`) of the cgroup's memory limit or else the machine's. 0 = off.
    pub memory_high_watermark: MemoryWatermark,
    /// Messages held for one session (in flight and queued) at which the `queue_depth` alarm
    /// is raised; it clears under 90% of it. Unset: 80% of `mqtt.max_queued_messages`;
    /// 0 = off.
    pub queue_depth_alarm: Option<usize>,
    /// Work-queue messages (topic and payload bytes) kept in memory across all queues;
    /// past it a queued message stays only in the log and is read back when leased, so a
    /// backlog may be larger than memory (docs/queues.md).
    pub queue_memory_bytes: u64,
    /// Bytes of read buffer that connections which have not completed CONNECT may hold, all
    /// listeners together. Past it, connections still reading their CONNECT (new ones
    /// included) are not read until room is made, or their connect timeout closes them.
    pub preauth_buffer_bytes: usize,
}

/// What a client over its message or byte rate gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RateExceeded {
    /// Its reader stops reading until the bucket refills, so TCP slows the client; nothing is
    /// dropped.
    Throttle,
    /// DISCONNECT 0x96 Message rate too high (5.0) or a closed connection (3.1.1).
    Disconnect,
}

/// `limits.memory_high_watermark`: an integer (bytes) or a string (`"512MiB"`, `"2GB"`,
/// `"80%"`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Deserialize, Serialize)]
#[serde(try_from = "WatermarkText", into = "WatermarkText")]
pub enum MemoryWatermark {
    #[default]
    Off,
    Bytes(u64),
    /// Percent of the memory limit, in (0, 100].
    Percent(f64),
}

#[derive(Deserialize, Serialize)]
#[serde(untagged)]
enum WatermarkText {
    Bytes(u64),
    Text(String),
}

impl From<MemoryWatermark> for WatermarkText {
    fn from(m: MemoryWatermark) -> Self {
        match m {
            MemoryWatermark::Off => WatermarkText::Bytes(0),
            MemoryWatermark::Bytes(b) => WatermarkText::Bytes(b),
            MemoryWatermark::Percent(p) => WatermarkText::Text(format!("{p}%")),
        }
    }
}

impl TryFrom<WatermarkText> for MemoryWatermark {
    type Error = String;

    fn try_from(raw: WatermarkText) -> Result<Self, String> {
        let text = match raw {
            WatermarkText::Bytes(0) => return Ok(MemoryWatermark::Off),
            WatermarkText::Bytes(b) => return Ok(MemoryWatermark::Bytes(b)),
            WatermarkText::Text(t) => t,
        };
        let t = text.trim();
        if let Some(p) = t.strip_suffix('%') {
            return match p.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => Ok(MemoryWatermark::Percent(p)),
                _ => Err(format!(
                    "{text:?}: a percentage must be over 0% and at most 100%"
                )),
            };
        }
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(digits);
        let scale: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => {
                return Err(format!(
                    "{text:?}: expected bytes (\"512MiB\") or a percentage (\"80%\")"
                ))
            }
        };
        let n: u64 = number
            .parse()
            .map_err(|_| format!("{text:?}: expected a whole number before the unit"))?;
        match n.checked_mul(scale) {
            Some(0) => Ok(MemoryWatermark::Off),
            Some(b) => Ok(MemoryWatermark::Bytes(b)),
            None => Err(format!("{text:?} is too large")),
        }
    }
}

/// The admin HTTP API (`listeners.http`). Its `Debug` leaves the token out (`ferrymq
/// check-config` prints the configuration).
#[derive(Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// With a token, every admin route but `/health` and `/ready` requires
    /// `Authorization: Bearer <token>`. Without one (and no `token_file`), the admin
    /// listener must be on a loopback address: the broker refuses to start otherwise.
    pub token: Option<String>,
    /// A file holding the token (surrounding whitespace is ignored), read at start; instead
    /// of `token`.
    pub token_file: Option<PathBuf>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("token", &self.token.as_ref().map(|_| "(set, not shown)"))
            .field("token_file", &self.token_file)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sys {
    /// Seconds between `$SYS/` updates; 0 turns them off.
    pub interval_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// A `tracing` filter: `info`, `debug`, `ferrymq_server=debug,info`, ...
    pub level: String,
    pub format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./data"),
            storage: Storage::default(),
            listeners: Listeners::default(),
            tls: None,
            mqtt: Mqtt::default(),
            limits: Limits::default(),
            sys: Sys::default(),
            log: Log::default(),
            admin: Admin::default(),
            auth: crate::auth::AuthConfig::default(),
            acl: crate::acl::AclSection::default(),
            queues: Vec::new(),
            audit: crate::audit::AuditConfig::default(),
        }
    }
}

impl Default for Listeners {
    fn default() -> Self {
        Listeners {
            mqtt: SocketAddr::from(([127, 0, 0, 1], 1883)).into(),
            mqtts: None,
            ws: None,
            wss: None,
            ws_path: "/mqtt".into(),
            ws_origins: Vec::new(),
            http: SocketAddr::from(([127, 0, 0, 1], 8080)).into(),
            proxy_protocol: Vec::new(),
            trusted_proxies: Vec::new(),
        }
    }
}

impl Default for Mqtt {
    fn default() -> Self {
        let b = BrokerConfig::default();
        Mqtt {
            max_keep_alive: b.max_keep_alive,
            receive_maximum: b.receive_maximum,
            max_packet_size: b.max_packet_size,
            max_inflight: b.max_inflight,
            max_queued_messages: b.max_queued_messages,
            queue_full: b.queue_full.into(),
            queue_full_timeout_ms: b.queue_full_timeout_ms,
            topic_alias_maximum: b.topic_alias_maximum,
            max_topic_levels: b.max_topic_levels,
            max_subscriptions_per_client: b.max_subscriptions_per_client,
            max_session_expiry: b.max_session_expiry,
            allow_anonymous: None,
            deny_subscribe: Vec::new(),
            deny_subscribe_reason: DenyReason::NotAuthorized,
            default_session_expiry: b.default_session_expiry,
            max_connect_size: 64 * 1024,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 100_000,
            connect_timeout_secs: 10,
            max_outbound_bytes: 8 * 1024 * 1024,
            slow_consumer: SlowConsumer::Drop,
            slow_consumer_grace_ms: 1000,
            write_timeout_ms: 30_000,
            max_messages_per_sec: 0,
            max_bytes_per_sec: 0,
            rate_burst_ms: 1000,
            rate_exceeded: RateExceeded::Throttle,
            max_connections_per_address: 0,
            max_connection_rate: 0,
            max_connection_rate_per_address: 0,
            // Off: a mark must be over what the broker needs at rest and under what would
            // get it killed, which only the operator knows (a container: "80%" of its cgroup
            // limit is a good start; a shared machine: bytes).
            memory_high_watermark: MemoryWatermark::Off,
            queue_depth_alarm: None,
            queue_memory_bytes: 256 * 1024 * 1024,
            // A thousand CONNECTs of the largest default size at once.
            preauth_buffer_bytes: 64 * 1024 * 1024,
        }
    }
}

impl Default for Sys {
    fn default() -> Self {
        Sys { interval_secs: 10 }
    }
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// What a secret shows as in [`Config::redacted_json`].
pub const REDACTED: &str = "(redacted)";

/// Keys whose values are secrets: never shown by [`Config::redacted_json`] nor in an error.
const SECRET_KEYS: &[&str] = &["admin.token", "auth.jwt.secret"];

/// A parse error's message for `key`, with the value it quotes (`` invalid type: integer
/// `123`, expected a string ``) left out when the key holds a secret: the message goes to the
/// log, the reload's HTTP response and the audit log.
fn hide_secret(key: Option<&str>, message: &str) -> String {
    if !key.is_some_and(|k| SECRET_KEYS.contains(&k)) {
        return message.to_string();
    }
    // Every other piece between backticks is a quoted value.
    message
        .split('`')
        .enumerate()
        .map(|(i, piece)| if i % 2 == 1 { REDACTED } else { piece })
        .collect()
}

/// `file:line: invalid config value for `key`: message` (parts left out when unknown).
pub(crate) fn located(
    path: &Path,
    line: Option<usize>,
    key: Option<&str>,
    message: &str,
) -> String {
    let place = match line {
        Some(l) => format!("{}:{l}", path.display()),
        None => path.display().to_string(),
    };
    match key {
        Some(k) => format!("{place}: invalid config value for `{k}`: {message}"),
        None => format!("{place}: {message}"),
    }
}

/// The 1-based line of a byte offset.
fn line_of_offset(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// A table header line (`[a.b]` or `[[a.b]]`): its name and whether it is an array's.
fn header(line: &str) -> Option<(String, bool)> {
    let t = line.split('#').next().unwrap_or("").trim();
    if let Some(inner) = t.strip_prefix("[[").and_then(|r| r.strip_suffix("]]")) {
        return Some((inner.trim().to_string(), true));
    }
    let inner = t.strip_prefix('[')?.strip_suffix(']')?;
    Some((inner.trim().to_string(), false))
}

/// The key defined on a line (`table.key`), for errors toml reports by position only.
fn key_at_line(text: &str, line: usize) -> Option<String> {
    let mut table = String::new();
    for (i, l) in text.lines().enumerate() {
        if let Some((name, _)) = header(l) {
            table = name;
        }
        if i + 1 == line {
            let (k, _) = l.split_once('=')?;
            let k = k.trim();
            return Some(if table.is_empty() {
                k.to_string()
            } else {
                format!("{table}.{k}")
            });
        }
    }
    None
}

/// The line that sets a dotted key as `validate` names it (`limits.rate_burst_ms`,
/// `acl.rule[2].topic`, `queue[0].name`, `mqtt.deny_subscribe[0]`), if it is written as
/// `key = …` under its table's header; None otherwise (a default, or another spelling).
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let (table, leaf) = match key.rsplit_once('.') {
        Some((t, l)) => (t, l),
        None => ("", key),
    };
    let leaf = leaf.split('[').next().unwrap_or(leaf);
    // `acl.rule[2]` is the third `[[acl.rule]]`.
    let (table, index) = match table.split_once('[') {
        Some((t, rest)) => (t, rest.trim_end_matches(']').parse::<usize>().ok()),
        None => (table, None),
    };
    let mut seen = 0usize;
    let mut in_place = table.is_empty();
    for (i, l) in text.lines().enumerate() {
        if let Some((name, array)) = header(l) {
            in_place = name == table && (!array || index.is_none_or(|n| n == seen));
            if array && name == table {
                seen += 1;
            }
            continue;
        }
        if !in_place {
            continue;
        }
        if let Some((k, _)) = l.split_once('=') {
            if k.trim() == leaf {
                return Some(i + 1);
            }
        }
    }
    None
}

fn invalid(key: &str, message: impl Into<String>) -> ServerError {
    ServerError::Config {
        key: key.into(),
        message: message.into(),
    }
}

impl Config {
    /// The `[[queue]]` definitions (already checked by `validate`).
    pub fn queue_defs(&self) -> Vec<ferrymq_core::workqueue::QueueDef> {
        self.queues.iter().filter_map(|q| q.to_def().ok()).collect()
    }

    /// Reads and validates a TOML file. The error names the file, the line (where toml or
    /// the key shows it) and the key: the one function behind the start, every reload and
    /// `ferrymq check-config`, so all three say the same.
    pub fn load(path: &Path) -> Result<Config, ServerError> {
        let text = std::fs::read_to_string(path).map_err(|source| ServerError::ConfigRead {
            path: path.to_path_buf(),
            source,
        })?;
        let at =
            |line: Option<usize>, key: Option<String>, message: String| ServerError::ConfigAt {
                path: path.to_path_buf(),
                line,
                key,
                message,
            };
        let config: Config = toml::from_str(&text).map_err(|e| {
            let line = e.span().map(|s| line_of_offset(&text, s.start));
            let key = line.and_then(|l| key_at_line(&text, l));
            let message = hide_secret(key.as_deref(), e.message().trim());
            at(line, key, message)
        })?;
        config.validate().map_err(|e| match e {
            ServerError::Config { key, message } => {
                at(line_of_key(&text, &key), Some(key), message)
            }
            other => other,
        })?;
        Ok(config)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ServerError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ServerError::ConfigSyntax(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// The configuration as JSON with every secret replaced by `"(redacted)"`: the admin
    /// token and the JWT secret (passwords live in the password file, which is not shown).
    pub fn redacted_json(&self) -> serde_json::Value {
        let mut c = self.clone();
        let hidden = || Some(REDACTED.to_string());
        if c.admin.token.is_some() {
            c.admin.token = hidden();
        }
        if let Some(j) = c.auth.jwt.as_mut() {
            if j.secret.is_some() {
                j.secret = hidden();
            }
        }
        serde_json::to_value(&c).unwrap_or(serde_json::Value::Null)
    }

    /// Checks every value; the error names the offending key.
    pub fn validate(&self) -> Result<(), ServerError> {
        let m = &self.mqtt;
        if m.receive_maximum == 0 {
            return Err(invalid("mqtt.receive_maximum", "must be at least 1"));
        }
        if m.max_packet_size < 64 || m.max_packet_size > 268_435_460 {
            return Err(invalid(
                "mqtt.max_packet_size",
                "must be between 64 and 268435460 bytes",
            ));
        }
        if m.max_inflight == 0 || m.max_inflight > 65_000 {
            return Err(invalid("mqtt.max_inflight", "must be between 1 and 65000"));
        }
        if m.queue_full_timeout_ms == 0 || m.queue_full_timeout_ms > 3_600_000 {
            return Err(invalid(
                "mqtt.queue_full_timeout_ms",
                "must be between 1 and 3600000",
            ));
        }
        if m.max_topic_levels == 0 {
            return Err(invalid("mqtt.max_topic_levels", "must be at least 1"));
        }
        if m.max_subscriptions_per_client == 0 {
            return Err(invalid(
                "mqtt.max_subscriptions_per_client",
                "must be at least 1",
            ));
        }
        self.auth.validate()?;
        self.acl.validate()?;
        self.audit.validate()?;
        if let (Some(a), Some(b)) = (self.auth.allow_anonymous, m.allow_anonymous) {
            if a != b {
                return Err(invalid(
                    "auth.allow_anonymous",
                    "disagrees with mqtt.allow_anonymous (the older spelling): set one",
                ));
            }
        }
        for (i, f) in m.deny_subscribe.iter().enumerate() {
            if !ferrymq_mqtt::topic::valid_topic_filter(f) {
                return Err(invalid(
                    &format!("mqtt.deny_subscribe[{i}]"),
                    format!("{f:?} is not a valid topic filter"),
                ));
            }
        }
        if self.limits.max_connections == 0 {
            return Err(invalid("limits.max_connections", "must be at least 1"));
        }
        if self.limits.connect_timeout_secs == 0 {
            return Err(invalid("limits.connect_timeout_secs", "must be at least 1"));
        }
        if self.limits.max_outbound_bytes < 1024 {
            return Err(invalid(
                "limits.max_outbound_bytes",
                "must be at least 1024",
            ));
        }
        if self.limits.slow_consumer_grace_ms > 3_600_000 {
            return Err(invalid(
                "limits.slow_consumer_grace_ms",
                "must be at most 3600000 (an hour): a stuck subscriber holds its publishers that long",
            ));
        }
        if self.limits.max_outbound_bytes > usize::MAX / 8 {
            return Err(invalid("limits.max_outbound_bytes", "is too large"));
        }
        if self.limits.write_timeout_ms == 0 || self.limits.write_timeout_ms > 3_600_000 {
            return Err(invalid(
                "limits.write_timeout_ms",
                "must be between 1 and 3600000",
            ));
        }
        if self.limits.rate_burst_ms == 0 || self.limits.rate_burst_ms > 60_000 {
            return Err(invalid(
                "limits.rate_burst_ms",
                "must be between 1 and 60000",
            ));
        }
        if self.limits.max_connections_per_address > self.limits.max_connections {
            return Err(invalid(
                "limits.max_connections_per_address",
                "must not exceed limits.max_connections (0 = unlimited)",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, q) in self.queues.iter().enumerate() {
            q.to_def()
                .map_err(|e| invalid(&format!("queue[{i}].{}", e.field), e.to_string()))?;
            if !names.insert(q.name.as_str()) {
                return Err(invalid(
                    &format!("queue[{i}].name"),
                    format!("{:?} is declared twice", q.name),
                ));
            }
        }
        self.validate_listeners()?;
        let st = &self.storage;
        if st.persistence && self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }
        if st.fsync_interval_ms == 0 || st.fsync_interval_ms > 60_000 {
            return Err(invalid(
                "storage.fsync_interval_ms",
                "must be between 1 and 60000",
            ));
        }
        if st.segment_bytes < 64 * 1024 || st.segment_bytes > 1 << 32 {
            return Err(invalid(
                "storage.segment_bytes",
                "must be between 65536 and 4294967296",
            ));
        }
        if st.compact_after_bytes < 64 * 1024 {
            return Err(invalid(
                "storage.compact_after_bytes",
                "must be at least 65536",
            ));
        }
        if m.max_connect_size < 64 {
            return Err(invalid("mqtt.max_connect_size", "must be at least 64"));
        }
        if self.limits.preauth_buffer_bytes < self.max_connect_size() {
            return Err(invalid(
                "limits.preauth_buffer_bytes",
                "must hold at least one whole CONNECT (mqtt.max_connect_size)",
            ));
        }
        let admin = &self.admin;
        if admin.token.is_some() && admin.token_file.is_some() {
            return Err(invalid(
                "admin.token_file",
                "give admin.token or admin.token_file, not both",
            ));
        }
        if admin.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(invalid("admin.token", "must not be empty"));
        }
        let open = self.listeners.http.0.iter().find(|a| !a.ip().is_loopback());
        if let (None, None, Some(addr)) = (&admin.token, &admin.token_file, open) {
            return Err(invalid(
                "listeners.http",
                format!(
                    "{addr} is not a loopback address, and the admin API has no token: set \
                     [admin] token or token_file, or bind it to 127.0.0.1 or ::1"
                ),
            ));
        }
        if self.log.level.trim().is_empty() {
            return Err(invalid("log.level", "must not be empty"));
        }
        Ok(())
    }

    /// Whether clients that do not authenticate are let in: `auth.allow_anonymous` (or its
    /// older spelling `mqtt.allow_anonymous`), or, when unset, only when every MQTT listener
    /// is on a loopback address and none is behind a PROXY-protocol balancer (whose clients
    /// are remote, whatever address it connects from).
    pub fn allow_anonymous(&self) -> bool {
        self.auth
            .allow_anonymous
            .or(self.mqtt.allow_anonymous)
            .unwrap_or_else(|| {
                self.listeners
                    .mqtt_listeners(self.tls.is_some())
                    .iter()
                    .all(|l| {
                        !self.proxied(l.kind) && l.addrs.0.iter().all(|a| a.ip().is_loopback())
                    })
            })
    }

    /// Listener addresses: no fixed port twice, TLS listeners only with `[tls]`, a WebSocket
    /// path that is one.
    fn validate_listeners(&self) -> Result<(), ServerError> {
        let l = &self.listeners;
        if self.tls.is_none() {
            for (key, set) in [("listeners.mqtts", &l.mqtts), ("listeners.wss", &l.wss)] {
                if set.as_ref().is_some_and(|a| !a.is_off()) {
                    return Err(invalid(key, "needs a [tls] table (cert and key)"));
                }
            }
        }
        if let Some(tls) = &self.tls {
            if tls.require_client_cert && tls.client_ca.is_none() {
                return Err(invalid(
                    "tls.require_client_cert",
                    "needs tls.client_ca (the CA that client certificates are verified against)",
                ));
            }
            if tls.cert_username != CertUsername::None && tls.client_ca.is_none() {
                return Err(invalid(
                    "tls.cert_username",
                    "needs tls.client_ca: only a verified client certificate gives a user name",
                ));
            }
        }
        if !l.ws_path.starts_with('/') {
            return Err(invalid("listeners.ws_path", "must start with '/'"));
        }
        for name in &l.proxy_protocol {
            if !ListenerKind::ALL.iter().any(|k| k.name() == name) {
                return Err(invalid(
                    "listeners.proxy_protocol",
                    format!("{name:?} is not an MQTT listener (mqtt, mqtts, ws, wss)"),
                ));
            }
            let on = l.mqtt_listeners(self.tls.is_some());
            if !on.iter().any(|m| m.kind.name() == name) {
                return Err(invalid(
                    "listeners.proxy_protocol",
                    format!("names {name}, which is off (no address, or no [tls] for it)"),
                ));
            }
        }
        self.trusted_proxies()
            .map_err(|e| invalid("listeners.trusted_proxies", e))?;
        if !l.proxy_protocol.is_empty() && l.trusted_proxies.is_empty() {
            return Err(invalid(
                "listeners.trusted_proxies",
                "must list the load balancers' addresses when listeners.proxy_protocol is set \
                 (anyone else could claim any client address)",
            ));
        }
        let mut seen: Vec<(SocketAddr, &str)> = Vec::new();
        let mqtt = l.mqtt_listeners(self.tls.is_some());
        let all = mqtt
            .iter()
            .flat_map(|m| {
                m.addrs
                    .0
                    .iter()
                    .map(move |a| (*a, m.kind.name(), m.implicit))
            })
            .chain(l.http.0.iter().map(|a| (*a, "http", false)));
        // A default address that is taken is skipped at start, so only set ones are checked.
        for (addr, key, _) in all.filter(|(a, _, implicit)| !implicit && a.port() != 0) {
            if let Some((_, other)) = seen.iter().find(|(a, _)| *a == addr) {
                return Err(invalid(
                    &format!("listeners.{key}"),
                    format!("{addr} is also listeners.{other}"),
                ));
            }
            seen.push((addr, key));
        }
        Ok(())
    }

    /// `listeners.trusted_proxies`, parsed.
    pub(crate) fn trusted_proxies(&self) -> Result<Vec<ipnet::IpNet>, String> {
        self.listeners
            .trusted_proxies
            .iter()
            .map(|t| crate::proxy_protocol::parse_net(t))
            .collect()
    }

    /// Whether connections to the `kind` listener start with a PROXY header.
    pub(crate) fn proxied(&self, kind: ListenerKind) -> bool {
        self.listeners
            .proxy_protocol
            .iter()
            .any(|n| n == kind.name())
    }

    /// The largest CONNECT read, in bytes: `mqtt.max_connect_size`, or `mqtt.max_packet_size`
    /// when that is smaller.
    pub fn max_connect_size(&self) -> usize {
        self.mqtt.max_connect_size.min(self.mqtt.max_packet_size) as usize
    }

    /// The admin API's token: `admin.token`, or the contents of `admin.token_file` (trimmed);
    /// `None` when neither is set. Read when called (at start).
    pub fn admin_token(&self) -> Result<Option<String>, ServerError> {
        if let Some(t) = &self.admin.token {
            return Ok(Some(t.clone()));
        }
        let Some(path) = &self.admin.token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            invalid(
                "admin.token_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(invalid(
                "admin.token_file",
                format!("{} is empty", path.display()),
            ));
        }
        Ok(Some(token.to_string()))
    }

    /// The `queue_depth` alarm's threshold in messages (None: off).
    pub fn queue_depth_alarm(&self) -> Option<usize> {
        match self.limits.queue_depth_alarm {
            Some(0) => None,
            Some(n) => Some(n),
            None => Some((self.mqtt.max_queued_messages / 10 * 8).max(1)),
        }
    }

    /// The engine's part of the configuration.
    pub fn broker_config(&self) -> BrokerConfig {
        let m = &self.mqtt;
        BrokerConfig {
            max_keep_alive: m.max_keep_alive,
            receive_maximum: m.receive_maximum,
            max_packet_size: m.max_packet_size,
            max_inflight: m.max_inflight,
            max_queued_messages: m.max_queued_messages,
            queue_full: m.queue_full.into(),
            queue_full_timeout_ms: m.queue_full_timeout_ms,
            topic_alias_maximum: m.topic_alias_maximum,
            max_topic_levels: m.max_topic_levels,
            max_subscriptions_per_client: m.max_subscriptions_per_client,
            max_session_expiry: m.max_session_expiry,
            acl: self.acl.to_engine(&m.deny_subscribe),
            deny_subscribe_reason: match m.deny_subscribe_reason {
                DenyReason::NotAuthorized => ferrymq_mqtt::ReasonCode::NotAuthorized,
                DenyReason::UnspecifiedError => ferrymq_mqtt::ReasonCode::UnspecifiedError,
            },
            default_session_expiry: m.default_session_expiry,
            queue_memory_bytes: self.limits.queue_memory_bytes,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn the_example_file_shows_exactly_the_defaults() {
        let example = include_str!("../../../ferrymq.example.toml");
        assert_eq!(Config::parse(example).unwrap(), Config::default());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::parse("[mqtt]\nmax_keepalive = 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_keepalive"), "{err}");
    }

    #[test]
    fn invalid_values_name_their_key() {
        let err = Config::parse("[mqtt]\nreceive_maximum = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("mqtt.receive_maximum"), "{err}");
        let err = Config::parse("[mqtt]\ndeny_subscribe = [\"a/#/b\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("mqtt.deny_subscribe[0]"), "{err}");
        let err = Config::parse("[limits]\nslow_consumer = \"explode\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("slow_consumer") || err.contains("explode"),
            "{err}"
        );
    }

    #[test]
    fn queue_full_parses_and_is_checked() {
        let d = Config::default();
        assert_eq!(d.mqtt.queue_full, QueueFull::Backpressure);
        assert_eq!(d.broker_config().queue_full_timeout_ms, 10_000);
        for (text, want) in [
            ("reject", ferrymq_core::QueueFull::Reject),
            ("drop_oldest", ferrymq_core::QueueFull::DropOldest),
            ("backpressure", ferrymq_core::QueueFull::Backpressure),
        ] {
            let c = Config::parse(&format!("[mqtt]\nqueue_full = \"{text}\"\n")).unwrap();
            assert_eq!(c.broker_config().queue_full, want);
        }
        let c = Config::parse("[mqtt]\nqueue_full_timeout_ms = 250\n").unwrap();
        assert_eq!(c.broker_config().queue_full_timeout_ms, 250);
        for bad in ["queue_full_timeout_ms = 0", "queue_full = \"drop_newest\""] {
            let err = Config::parse(&format!("[mqtt]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("queue_full"), "{err}");
        }
    }

    #[test]
    fn write_timeout_parses_and_is_checked() {
        assert_eq!(Config::default().limits.write_timeout_ms, 30_000);
        let c = Config::parse("[limits]\nwrite_timeout_ms = 250\n").unwrap();
        assert_eq!(c.limits.write_timeout_ms, 250);
        for bad in ["0", "3600001"] {
            let err = Config::parse(&format!("[limits]\nwrite_timeout_ms = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("limits.write_timeout_ms"), "{err}");
        }
    }

    #[test]
    fn rate_and_connection_limits_parse_and_are_checked() {
        let l = Config::default().limits;
        assert_eq!(
            (l.max_messages_per_sec, l.max_bytes_per_sec, l.rate_burst_ms),
            (0, 0, 1000),
            "unlimited by default"
        );
        assert_eq!(l.rate_exceeded, RateExceeded::Throttle);
        let c = Config::parse(
            "[limits]\nmax_messages_per_sec = 2000\nmax_bytes_per_sec = 1048576\n\
             rate_burst_ms = 250\nrate_exceeded = \"disconnect\"\n\
             max_connections_per_address = 10\nmax_connection_rate = 100\n\
             max_connection_rate_per_address = 5\n",
        )
        .unwrap();
        assert_eq!(c.limits.max_messages_per_sec, 2000);
        assert_eq!(c.limits.rate_exceeded, RateExceeded::Disconnect);
        assert_eq!(c.limits.max_connection_rate_per_address, 5);
        for (bad, key) in [
            ("rate_burst_ms = 0", "limits.rate_burst_ms"),
            ("rate_burst_ms = 60001", "limits.rate_burst_ms"),
            (
                "max_connections = 10\nmax_connections_per_address = 11",
                "limits.max_connections_per_address",
            ),
            ("rate_exceeded = \"drop\"", "drop"),
        ] {
            let err = Config::parse(&format!("[limits]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn storage_options_parse_and_are_checked() {
        let c = Config::parse("[storage]\nfsync = \"interval\"\nfsync_interval_ms = 5\n").unwrap();
        assert_eq!(c.storage.fsync, Fsync::Interval);
        assert!(c.storage.persistence, "persistence is on by default");
        let c = Config::parse("[storage]\npersistence = false\n").unwrap();
        assert!(!c.storage.persistence);
        let err = Config::parse("[storage]\nsegment_bytes = 10\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("storage.segment_bytes"), "{err}");
        let err = Config::parse("[storage]\nfsync = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sometimes"), "{err}");
    }

    #[test]
    fn memory_watermark_takes_bytes_units_and_percentages() {
        let mark = |v: &str| {
            Config::parse(&format!("[limits]\nmemory_high_watermark = {v}\n"))
                .map(|c| c.limits.memory_high_watermark)
                .map_err(|e| e.to_string())
        };
        assert_eq!(mark("0").unwrap(), MemoryWatermark::Off);
        assert_eq!(mark("1048576").unwrap(), MemoryWatermark::Bytes(1 << 20));
        assert_eq!(
            mark("\"512MiB\"").unwrap(),
            MemoryWatermark::Bytes(512 << 20)
        );
        assert_eq!(
            mark("\"2GB\"").unwrap(),
            MemoryWatermark::Bytes(2_000_000_000)
        );
        assert_eq!(mark("\"80%\"").unwrap(), MemoryWatermark::Percent(80.0));
        for bad in ["\"120%\"", "\"0%\"", "\"12 parsecs\"", "\"MiB\"", "-5"] {
            let err = mark(bad).unwrap_err();
            assert!(err.contains("memory_high_watermark"), "{bad}: {err}");
        }
    }

    #[test]
    fn queue_depth_alarm_defaults_to_80_percent_of_the_queue_limit() {
        assert_eq!(Config::default().queue_depth_alarm(), Some(80_000));
        let c = Config::parse("[mqtt]\nmax_queued_messages = 50\n").unwrap();
        assert_eq!(c.queue_depth_alarm(), Some(40));
        let c = Config::parse("[limits]\nqueue_depth_alarm = 0\n").unwrap();
        assert_eq!(c.queue_depth_alarm(), None);
        let c = Config::parse("[limits]\nqueue_depth_alarm = 7\n").unwrap();
        assert_eq!(c.queue_depth_alarm(), Some(7));
    }

    #[test]
    fn pre_auth_limits_parse_and_are_checked() {
        let d = Config::default();
        assert_eq!(d.max_connect_size(), 64 * 1024);
        assert_eq!(d.limits.preauth_buffer_bytes, 64 * 1024 * 1024);
        let c = Config::parse("[mqtt]\nmax_connect_size = 2000000\n").unwrap();
        assert_eq!(c.max_connect_size(), 1 << 20, "max_packet_size applies too");
        for (bad, key) in [
            ("[mqtt]\nmax_connect_size = 10", "mqtt.max_connect_size"),
            (
                "[limits]\npreauth_buffer_bytes = 1000",
                "limits.preauth_buffer_bytes",
            ),
        ] {
            let err = Config::parse(bad).unwrap_err().to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    #[test]
    fn listeners_take_one_address_or_a_list_and_default_by_transport() {
        let c = Config::default();
        let names = |c: &Config| -> Vec<(&'static str, Vec<SocketAddr>, bool)> {
            c.listeners
                .mqtt_listeners(c.tls.is_some())
                .into_iter()
                .map(|l| (l.kind.name(), l.addrs.0, l.implicit))
                .collect()
        };
        let lo = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        assert_eq!(
            names(&c),
            vec![
                ("mqtt", vec![lo(1883)], false),
                ("ws", vec![lo(8083)], true)
            ]
        );
        assert_eq!(c.listeners.ws_path, "/mqtt");
        let c = Config::parse(
            "[listeners]\nmqtt = [\"0.0.0.0:1883\", \"[::1]:1884\"]\nws = []\nhttp = []\n\
             [tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
        )
        .unwrap();
        let any = |p: u16| SocketAddr::from(([0, 0, 0, 0], p));
        let v6 = |p: u16| SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, p));
        assert_eq!(
            names(&c),
            vec![
                ("mqtt", vec![any(1883), v6(1884)], false),
                ("mqtts", vec![any(8883), v6(8883)], false),
                ("wss", vec![any(8084), v6(8084)], true),
            ]
        );
        assert!(c.listeners.http.is_off());
        assert_eq!(
            "127.0.0.1:1,127.0.0.1:2".parse::<ListenAddrs>().unwrap().0,
            vec![lo(1), lo(2)]
        );
        assert!("".parse::<ListenAddrs>().unwrap().is_off());
    }

    #[test]
    fn listener_and_tls_mistakes_name_their_key() {
        for (text, key) in [
            (
                "[listeners]\nmqtts = \"127.0.0.1:8883\"\n",
                "listeners.mqtts",
            ),
            ("[listeners]\nwss = \"127.0.0.1:8884\"\n", "listeners.wss"),
            ("[listeners]\nws_path = \"mqtt\"\n", "listeners.ws_path"),
            ("[listeners]\nws = \"127.0.0.1:1883\"\n", "listeners.ws"),
            (
                "[tls]\ncert = \"c\"\nkey = \"k\"\nrequire_client_cert = true\n",
                "tls.require_client_cert",
            ),
            (
                "[tls]\ncert = \"c\"\nkey = \"k\"\ncert_username = \"cn\"\n",
                "tls.cert_username",
            ),
        ] {
            let err = Config::parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn the_admin_api_needs_a_token_off_loopback() {
        assert_eq!(Config::default().admin_token().unwrap(), None);
        let err = Config::parse("[listeners]\nhttp = \"0.0.0.0:8080\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("listeners.http") && err.contains("token"),
            "{err}"
        );
        let c = Config::parse("[listeners]\nhttp = \"0.0.0.0:8080\"\n[admin]\ntoken = \"x1\"\n")
            .unwrap();
        assert_eq!(c.admin_token().unwrap().as_deref(), Some("x1"));
        for bad in [
            "[admin]\ntoken = \" \"",
            "[admin]\ntoken = \"a\"\ntoken_file = \"/t\"",
        ] {
            let err = Config::parse(bad).unwrap_err().to_string();
            assert!(err.contains("admin.token"), "{bad}: {err}");
        }
        let c = Config::parse("[admin]\ntoken_file = \"/nonexistent/ferrymq.token\"\n").unwrap();
        let err = c.admin_token().unwrap_err().to_string();
        assert!(
            err.contains("admin.token_file") && err.contains("/nonexistent"),
            "{err}"
        );
    }

    #[test]
    fn file_errors_name_the_file_the_line_and_the_key() {
        let dir = std::env::temp_dir().join(format!("ferrymq-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        let check = |text: &str, want: &str| {
            std::fs::write(&path, text).unwrap();
            let err = Config::load(&path).unwrap_err().to_string();
            assert!(err.starts_with(&path.display().to_string()), "{err}");
            assert!(err.contains(want), "{text:?}: {err}");
        };
        check(
            "[limits]\n\nrate_burst_ms = 0\n",
            ":3: invalid config value for `limits.rate_burst_ms`",
        );
        check(
            "[mqtt]\nmax_keepalive = 5\n",
            ":2: invalid config value for `mqtt.max_keepalive`",
        );
        check("[limits]\nmax_connections = \"many\"\n", ":2:");
        check(
            "[[acl.rule]]\npermission = \"deny\"\naction = \"all\"\ntopic = \"a\"\n\
             [[acl.rule]]\npermission = \"deny\"\naction = \"all\"\ntopic = \"a/#/b\"\n",
            ":8: invalid config value for `acl.rule[1].topic`",
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn anonymous_defaults_to_loopback_only() {
        assert!(Config::default().allow_anonymous());
        let c = Config::parse("[listeners]\nmqtt = \"0.0.0.0:1883\"\n").unwrap();
        assert!(!c.allow_anonymous());
        let c =
            Config::parse("[listeners]\nmqtt = \"0.0.0.0:1883\"\n[mqtt]\nallow_anonymous = true\n")
                .unwrap();
        assert!(c.allow_anonymous());
    }

    /// A loopback listener behind a PROXY-protocol balancer (HAProxy on the same host) has
    /// remote clients: by default it lets no anonymous one in.
    #[test]
    fn a_proxied_loopback_listener_is_not_loopback_for_anonymous_clients() {
        let proxied =
            "[listeners]\nproxy_protocol = [\"mqtt\"]\ntrusted_proxies = [\"127.0.0.1\"]\n";
        assert!(!Config::parse(proxied).unwrap().allow_anonymous());
        let allowed = format!("{proxied}[auth]\nallow_anonymous = true\n");
        assert!(Config::parse(&allowed).unwrap().allow_anonymous());
    }
}
