//! How `ferrymq bench`, `pub` and `sub` reach a broker: TCP, TLS, WebSocket or both, from
//! flags (`--tls-ca`, `--ws`) or a URL (`--url mqtts://host:8883`, `wss://host:8084/mqtt`).

use std::path::PathBuf;

use anyhow::{bail, Context};
use ferrymq_client::{ConnectOptions, TlsFiles, TlsOptions, WsOptions};

#[derive(clap::Args, Clone, Debug, Default)]
pub struct TransportArgs {
    /// Broker URL instead of host and port: mqtt://, mqtts://, ws:// or wss://HOST:PORT[/PATH]
    /// (mqtts and wss need --tls-ca).
    #[arg(long, global = true, value_name = "URL")]
    url: Option<String>,
    /// TLS: PEM file of the CA that signed the broker's certificate (turns TLS on).
    #[arg(long, global = true, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// TLS: client certificate chain (PEM), for brokers that ask for one.
    #[arg(long, global = true, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS: the client certificate's private key (PEM).
    #[arg(long, global = true, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// TLS: the name the broker's certificate must carry [default: the host].
    #[arg(long, global = true, value_name = "NAME")]
    tls_server_name: Option<String>,
    /// MQTT over WebSocket (ws://, or wss:// with --tls-ca), subprotocol `mqtt`.
    #[arg(long, global = true)]
    ws: bool,
    /// HTTP path of the WebSocket endpoint.
    #[arg(long, global = true, default_value = "/mqtt", value_name = "PATH")]
    ws_path: String,
}

/// Where and how to connect, resolved from the flags.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// `host:port`.
    pub addr: String,
    pub tls: Option<TlsOptions>,
    pub websocket: Option<WsOptions>,
}

impl Endpoint {
    /// `tcp`, `tls`, `ws` or `wss`: for reports.
    pub fn transport(&self) -> &'static str {
        match (self.tls.is_some(), self.websocket.is_some()) {
            (false, false) => "tcp",
            (true, false) => "tls",
            (false, true) => "ws",
            (true, true) => "wss",
        }
    }

    /// Puts the transport into connect options.
    pub fn apply(&self, o: &mut ConnectOptions) {
        o.tls = self.tls.clone();
        o.websocket = self.websocket.clone();
    }
}

impl TransportArgs {
    /// The endpoint for `host`/`port` (or `--url`). `resume`: keep TLS sessions for
    /// resumption (a benchmark of connection setup wants full handshakes: false).
    pub fn endpoint(&self, host: &str, port: u16, resume: bool) -> anyhow::Result<Endpoint> {
        let (addr, tls, ws_path) = match &self.url {
            None => (
                format!("{host}:{port}"),
                self.tls_ca.is_some(),
                self.ws.then(|| self.ws_path.clone()),
            ),
            Some(url) => parse_url(url)?,
        };
        if tls && self.tls_ca.is_none() {
            bail!("TLS needs the broker's CA: --tls-ca FILE");
        }
        let tls = match tls {
            false => None,
            true => Some(
                TlsOptions::from_files(TlsFiles {
                    ca: self.tls_ca.as_deref(),
                    cert: self.tls_cert.as_deref(),
                    key: self.tls_key.as_deref(),
                    server_name: self.tls_server_name.as_deref(),
                    resume,
                })
                .context("TLS")?,
            ),
        };
        Ok(Endpoint {
            addr,
            tls,
            websocket: ws_path.map(|path| WsOptions { path }),
        })
    }
}

/// `scheme://host:port[/path]` → (`host:port`, TLS?, WebSocket path if WebSocket).
fn parse_url(url: &str) -> anyhow::Result<(String, bool, Option<String>)> {
    let (scheme, rest) = url
        .split_once("://")
        .with_context(|| format!("{url:?} is not a URL (mqtt://, mqtts://, ws://, wss://)"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (tls, ws, default_port) = match scheme.to_ascii_lowercase().as_str() {
        "mqtt" | "tcp" => (false, false, 1883),
        "mqtts" | "ssl" => (true, false, 8883),
        "ws" => (false, true, 8083),
        "wss" => (true, true, 8084),
        other => bail!("unknown scheme {other:?}: use mqtt, mqtts, ws or wss"),
    };
    if authority.is_empty() {
        bail!("no host in {url:?}");
    }
    let has_port = match authority.rfind(']') {
        Some(end) => authority[end..].contains(':'),
        None => authority.contains(':'),
    };
    let addr = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    };
    let ws_path = ws.then(|| if path.is_empty() { "/mqtt" } else { path }.to_string());
    Ok((addr, tls, ws_path))
}

#[cfg(test)]
mod tests {
    use super::parse_url;

    #[test]
    fn urls_give_the_address_the_transport_and_the_websocket_path() {
        let ok = |u: &str| parse_url(u).unwrap();
        assert_eq!(ok("mqtt://h:1"), ("h:1".into(), false, None));
        assert_eq!(ok("mqtts://h"), ("h:8883".into(), true, None));
        assert_eq!(ok("ws://h:9/x"), ("h:9".into(), false, Some("/x".into())));
        assert_eq!(
            ok("wss://[::1]"),
            ("[::1]:8084".into(), true, Some("/mqtt".into()))
        );
        assert!(parse_url("http://h").is_err());
        assert!(parse_url("h:1883").is_err());
        assert!(parse_url("mqtt://").is_err());
    }
}
