//! Integration tests over real sockets: a real `ferrymq` server (in-process, bound to loopback
//! port 0) and real MQTT clients (rumqttc for 3.1.1 and 5.0; raw sockets for hostile input).
//! One behaviour per module.

#![allow(clippy::unwrap_used)]

mod common;

mod acl;
mod admin_http;
mod admin_token;
mod auth;
mod backpressure;
mod client_rate_limit;
mod connect_churn;
mod connect_size_limit;
mod connection_limits;
mod disconnect_reaches_sending_client;
mod durability;
mod edge;
mod emoji_end_to_end;
mod full_queue_backpressure;
mod full_queue_reject;
mod identity;
mod inflight_window;
mod keep_alive;
mod limits;
mod malformed_burst;
mod never_reading_client;
mod proxy_protocol;
mod qos_flows;
mod queue_api;
mod queue_depth_alarm;
mod queued_messages_limit;
mod retained;
mod review_flow;
mod review_metrics;
mod review_queues;
mod session_resume;
mod shared_subscription;
mod shutdown;
mod slow_consumer_policy;
mod subscription_quota;
mod sys_topics;
mod takeover;
mod tls;
mod topic_alias;
mod topic_levels_limit;
mod views_api;
mod websocket;
mod will;
mod work_queue;
