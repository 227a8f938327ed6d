//! A minimal HTTP/1.1 client for the broker's admin API, used by `ferrymq queue` and
//! `ferrymq dlq`: one request per connection on hyper's client connection API. hyper is in
//! the build already (axum serves the admin API with it), so the CLI adds no HTTP crate;
//! `http://` only, as the admin listener has no TLS.

use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Uri};
use serde_json::Value;

/// How long connecting may take, and then the whole exchange.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The admin API at one base URL.
pub struct Api {
    url: String,
    host: String,
    port: u16,
    /// A path the base URL has (behind a proxy), without a trailing `/`.
    prefix: String,
    /// Sent as `Authorization: Bearer` (`--token`, `FERRYMQ_ADMIN_TOKEN`).
    token: Option<String>,
}

/// A successful answer (status below 400).
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Api {
    pub fn new(url: &str, token: Option<String>) -> anyhow::Result<Api> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("--url {url:?} is not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => bail!("--url {url:?}: the admin API speaks http, not {other}"),
            None => bail!("--url {url:?}: give the scheme, e.g. http://127.0.0.1:8080"),
        }
        let host = uri
            .host()
            .with_context(|| format!("--url {url:?} has no host"))?;
        Ok(Api {
            url: url.trim_end_matches('/').to_string(),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port: uri.port_u16().unwrap_or(80),
            prefix: uri.path().trim_end_matches('/').to_string(),
            token,
        })
    }

    /// Sends one request; a status of 400 or more is an error carrying the API's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Answer> {
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| anyhow::anyhow!("timed out"))
        .and_then(|r| r.map_err(anyhow::Error::from))
        .with_context(|| {
            format!(
                "cannot reach the broker's admin API at {}: is the broker running, and is \
                 --url (FERRYMQ_URL) its listeners.http address?",
                self.url
            )
        })?;
        let what = format!("{method} {}{path}", self.url);
        tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(stream, method, path, body))
            .await
            .map_err(|_| anyhow::anyhow!("{what}: no answer within {REQUEST_TIMEOUT:?}"))?
            .with_context(|| what.clone())
            .and_then(|a| check(a, &what, self.token.is_some()))
    }

    async fn exchange(
        &self,
        stream: tokio::net::TcpStream,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Answer> {
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        let bytes = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
        let mut request = Request::builder();
        if let Some(token) = &self.token {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .method(method)
            .uri(format!("{}{path}", self.prefix))
            .header(hyper::header::HOST, format!("{}:{}", self.host, self.port))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "application/json")
            .body(Full::new(bytes))?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let raw = response.into_body().collect().await?.to_bytes();
        let body = if raw.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&raw)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&raw).into_owned()))
        };
        Ok(Answer { status, body })
    }
}

/// An answer of 400 or more as an error: the API's `error` (and `field`), or the status;
/// a 401 says what to do about the token (`sent_token`: whether one was sent).
fn check(a: Answer, what: &str, sent_token: bool) -> anyhow::Result<Answer> {
    if a.status < 400 {
        return Ok(a);
    }
    if a.status == 401 {
        if sent_token {
            bail!(
                "{what}: 401: the broker refused the admin API token: check --token, \
                 --token-file or FERRYMQ_ADMIN_TOKEN against its [admin] token"
            );
        }
        bail!(
            "{what}: 401: the broker's admin API requires a token: pass --token or \
             --token-file, or set FERRYMQ_ADMIN_TOKEN (its [admin] token)"
        );
    }
    let message = a.body["error"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| a.body.to_string());
    match a.body["field"].as_str().filter(|f| !f.is_empty()) {
        Some(field) => bail!("{what}: {} (field {field}): {message}", a.status),
        None => bail!("{what}: {}: {message}", a.status),
    }
}

/// A path segment or query value, percent-encoded.
pub fn escape(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}
