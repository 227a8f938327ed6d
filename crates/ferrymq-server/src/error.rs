//! Errors of the server crate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration file could not be read.
    #[error("cannot read config file {path}: {source}")]
    ConfigRead {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML for our schema.
    #[error("invalid config: {0}")]
    ConfigSyntax(String),
    /// The configuration file is wrong: its path, the line where toml or the key shows it,
    /// the key (dotted path) when known, and why. What `ferrymq check-config`, a refused
    /// reload and a refused start all print.
    #[error("{}", crate::config::located(path, *line, key.as_deref(), message))]
    ConfigAt {
        path: PathBuf,
        line: Option<usize>,
        key: Option<String>,
        message: String,
    },
    /// A reload was asked of a server started without a configuration file.
    #[error("this server was started without a configuration file: nothing to reload")]
    NoConfigFile,
    /// A reloaded value that applies live does not fit one that waits for a restart.
    #[error(
        "{0} (with the values that need a restart kept as they run): restart to apply them together"
    )]
    ReloadConflict(Box<ServerError>),
    /// The server is stopping (its router or a task it needed is gone).
    #[error("the server is stopping")]
    Stopping,
    /// A configuration value is out of range; `key` is its dotted path.
    #[error("invalid config value for `{key}`: {message}")]
    Config { key: String, message: String },
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// A TLS certificate, key or CA file could not be read or used.
    #[error("TLS: {path}: {message}")]
    Tls { path: PathBuf, message: String },
    /// The data directory could not be opened or locked.
    #[error("data directory {path}: {message}")]
    DataDir { path: PathBuf, message: String },
    /// The router's thread or runtime could not be started.
    #[error("cannot start the router thread: {0}")]
    Router(std::io::Error),
    /// The log could not be opened or replayed.
    #[error("recovering from {path} failed: {message}")]
    Recovery { path: PathBuf, message: String },
    /// The operating system gave no random bytes (for assigned client ids).
    #[error("no randomness from the operating system: {0}")]
    Random(String),
    /// A thread the server needs (log commit, background fsync) could not be started.
    #[error("cannot start thread {name}: {source}")]
    Thread {
        name: &'static str,
        source: std::io::Error,
    },
}
