//! Engine settings. Plain data; the server validates and fills them from its config file.

/// Limits and switches the engine enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Largest keep alive a client may use, in seconds; a 5.0 client asking for more (or for 0)
    /// is told this value as Server Keep Alive. 0 or 65,535 = no cap.
    pub max_keep_alive: u16,
    /// How many QoS 2 publishes a client may have awaiting PUBREL (our Receive Maximum).
    pub receive_maximum: u16,
    /// Largest packet accepted from clients, in bytes.
    pub max_packet_size: u32,
    /// Most outbound QoS 1/2 messages in flight per session, whatever the client allows.
    pub max_inflight: u16,
    /// Most QoS 1/2 messages queued per session beyond those in flight.
    pub max_queued_messages: usize,
    /// What a new QoS 1/2 message does when a target session's queue is full.
    pub queue_full: QueueFull,
    /// Under [`QueueFull::Backpressure`]: how long a publisher's acknowledgement may be held
    /// for a full queue before the message is refused, in milliseconds.
    pub queue_full_timeout_ms: u64,
    /// Most inbound topic aliases per connection (our Topic Alias Maximum).
    pub topic_alias_maximum: u16,
    /// Most levels in a topic name or filter.
    pub max_topic_levels: usize,
    /// Most subscriptions per session.
    pub max_subscriptions_per_client: usize,
    /// Largest session expiry interval granted, in seconds.
    pub max_session_expiry: u32,
    /// Who may publish to and read which topics (`acl.rs`). Authentication (and refusing
    /// anonymous clients) is the driver's job: the engine takes the identity it established.
    pub acl: crate::AclConfig,
    /// The SUBACK reason a 5.0 client gets for a denied filter (3.1.1 always gets 0x80).
    pub deny_subscribe_reason: ferrymq_mqtt::ReasonCode,
    /// Session expiry granted to a 5.0 client whose CONNECT has none. MQTT 5 says 0
    /// (§3.1.2.11.2); some test suites assume sessions outlive such connections.
    pub default_session_expiry: u32,
    /// Work-queue payloads kept in memory, in bytes (topic and payload), across all queues;
    /// past it a queued message's payload stays only in the log and is read back when it is
    /// leased. Needs a payload store (`Broker::set_payload_store`); without one everything
    /// stays in memory.
    pub queue_memory_bytes: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_keep_alive: 65_535,
            receive_maximum: 1024,
            max_packet_size: 1024 * 1024,
            max_inflight: 1024,
            max_queued_messages: 100_000,
            queue_full: QueueFull::Backpressure,
            // Long enough to ride out a subscriber's pause or reconnect; well under the 60 s
            // keep alive most client libraries use, so a held publisher hears back (ack or
            // refusal) before its own keep-alive timer gives up on a broker that stopped
            // reading it.
            queue_full_timeout_ms: 10_000,
            topic_alias_maximum: 64,
            max_topic_levels: 32,
            max_subscriptions_per_client: 1024,
            max_session_expiry: u32::MAX,
            acl: crate::AclConfig::default(),
            deny_subscribe_reason: ferrymq_mqtt::ReasonCode::NotAuthorized,
            default_session_expiry: 0,
            queue_memory_bytes: 256 * 1024 * 1024,
        }
    }
}

/// What a new QoS 1/2 message does for a session whose queue already holds
/// `max_queued_messages` (see `docs/flow-control.md`, "Full queues").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueFull {
    /// Queue it anyway, and hold the publisher's PUBACK/PUBREC (and pause its input) until
    /// the message's place in the queue is within the limit; refuse it (0x97, or a closed
    /// 3.1.1 connection) if `queue_full_timeout_ms` passes first.
    Backpressure,
    /// Refuse it at once: PUBACK/PUBREC 0x97 (5.0) or a closed connection (3.1.1); sessions
    /// with room still get it.
    Reject,
    /// Drop the session's oldest queued message to make room (counted): the publisher is
    /// acknowledged, and an acknowledged message is lost. Opt-in.
    DropOldest,
}
