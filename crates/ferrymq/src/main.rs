//! `ferrymq`: the broker (`serve`), command-line clients (`pub`, `sub`), `check-config`,
//! `recover` (salvage a damaged log), and work-queue administration over the admin API
//! (`queue`, `dlq`).

// mimalloc: fewer cycles per allocation than glibc malloc on the publish path (see
// docs/performance.md), and it returns freed memory to the OS promptly.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin_client;
mod bench;
mod cli_client;
mod passwd_cli;
mod queue_cli;
mod transport_args;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferrymq_server::config::{Fsync, ListenAddrs, LogFormat};
use ferrymq_server::{Config, Server};

#[derive(Parser)]
#[command(
    name = "ferrymq",
    version,
    about = "FerryMQ: an MQTT 3.1.1/5.0 broker with work queues"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker. Without a config file it uses the embedded defaults.
    Serve(ServeArgs),
    /// Publish messages (in the spirit of mosquitto_pub).
    #[command(disable_help_flag = true)]
    Pub(cli_client::PubArgs),
    /// Subscribe and print messages (in the spirit of mosquitto_sub).
    #[command(disable_help_flag = true)]
    Sub(cli_client::SubArgs),
    /// Benchmark a broker (this one or any other MQTT broker) and verify every message.
    Bench(bench::BenchArgs),
    /// Validate a configuration file and print the effective configuration.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Salvage a damaged log (the broker refuses to start on one): move DIR/log aside to
    /// DIR/log.damaged-<unix time>, never deleting it, and write a new log from every batch
    /// that checks. The broker must be stopped.
    Recover(RecoverArgs),
    /// Work queues on a running broker: list, create, show, delete (over its admin API).
    Queue(queue_cli::QueueArgs),
    /// A queue's dead letters on a running broker: list, show, redrive, discard, purge.
    Dlq(queue_cli::DlqArgs),
    /// Add, update (prompting for the password) or delete (-D) a user of a password file
    /// (`[auth] password_file`), as mosquitto_passwd does.
    Passwd(passwd_cli::PasswdArgs),
}

#[derive(clap::Args)]
struct RecoverArgs {
    /// The broker's data directory (the one `serve --data-dir` uses).
    #[arg(long, env = "FERRYMQ_DATA_DIR")]
    data_dir: PathBuf,
}

#[derive(clap::Args, Clone)]
struct ServeArgs {
    /// TOML configuration file; flags and environment variables override it.
    #[arg(long, short = 'c', env = "FERRYMQ_CONFIG")]
    config: Option<PathBuf>,
    /// MQTT (TCP) listener addresses, comma-separated, e.g. 0.0.0.0:1883; "" turns it off.
    #[arg(long, env = "FERRYMQ_MQTT")]
    mqtt: Option<ListenAddrs>,
    /// MQTT over WebSocket listener addresses (default: port 8083 on the MQTT addresses);
    /// "" turns it off.
    #[arg(long, env = "FERRYMQ_WS")]
    ws: Option<ListenAddrs>,
    /// Admin HTTP listener addresses; "" turns it off.
    #[arg(long, env = "FERRYMQ_HTTP")]
    http: Option<ListenAddrs>,
    /// Data directory.
    #[arg(long, env = "FERRYMQ_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Run without persistence (a pure in-memory broker; nothing survives a restart).
    #[arg(long, env = "FERRYMQ_IN_MEMORY")]
    in_memory: bool,
    /// When acknowledged messages are on disk: always (fdatasync, group commit), interval, os.
    #[arg(long, env = "FERRYMQ_FSYNC", value_enum)]
    fsync: Option<FsyncArg>,
    /// Log filter: error, warn, info, debug, trace, or a tracing directive list.
    #[arg(long, env = "FERRYMQ_LOG_LEVEL")]
    log_level: Option<String>,
    /// Log format.
    #[arg(long, env = "FERRYMQ_LOG_FORMAT", value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// Do not reload when the config file changes (SIGHUP and POST /api/v1/reload still do):
    /// for tools that write a configuration in several steps and then signal.
    #[arg(long, env = "FERRYMQ_NO_WATCH_CONFIG")]
    no_watch_config: bool,
}

/// `--fsync`: parsed by clap, so a mistyped value is an error that lists the valid ones.
#[derive(Clone, Copy, clap::ValueEnum)]
enum FsyncArg {
    Always,
    Interval,
    Os,
}

impl From<FsyncArg> for Fsync {
    fn from(f: FsyncArg) -> Fsync {
        match f {
            FsyncArg::Always => Fsync::Always,
            FsyncArg::Interval => Fsync::Interval,
            FsyncArg::Os => Fsync::Os,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Pub(args) => runtime()?.block_on(cli_client::publish(args)),
        Command::Sub(args) => runtime()?.block_on(cli_client::subscribe(args)),
        Command::Bench(args) => runtime()?.block_on(bench::run(args)),
        Command::CheckConfig { file } => {
            let config = Config::load(&file)?;
            if let Some(tls) = &config.tls {
                ferrymq_server::check_tls(tls)?;
            }
            // What the start and every reload read besides: the password file and the JWT
            // key, and the log filter.
            ferrymq_server::check_auth(&config)?;
            log_filter(&config.log.level).map_err(|message| {
                ferrymq_server::ServerError::Config {
                    key: "log.level".into(),
                    message,
                }
            })?;
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = writeln!(
                std::io::stdout(),
                "{} is valid.\n\n{config:#?}",
                file.display()
            );
            Ok(())
        }
        Command::Recover(args) => recover(args),
        Command::Queue(args) => runtime()?.block_on(queue_cli::queue(args)),
        Command::Dlq(args) => runtime()?.block_on(queue_cli::dlq(args)),
        Command::Passwd(args) => passwd_cli::passwd(args),
    }
}

/// `ferrymq recover`: the work is `ferrymq_store::recover`; this takes the data directory's
/// lock first, as `serve` does (`LOCK` in ferrymq-server's persist.rs), so that it never
/// rewrites a log a running broker is using.
fn recover(args: RecoverArgs) -> anyhow::Result<()> {
    let dir = &args.data_dir;
    anyhow::ensure!(
        dir.is_dir(),
        "data directory {} does not exist",
        dir.display()
    );
    let lock_path = dir.join("LOCK");
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    lock.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "data directory {} is in use by another ferrymq process (LOCK is held): stop the \
             broker first",
            dir.display()
        )
    })?;
    let report = ferrymq_store::recover(&ferrymq_store::LogConfig {
        // The log's place in the data directory, as persist.rs has it.
        dir: dir.join("log"),
        segment_bytes: Config::default().storage.segment_bytes,
    })?;
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = write!(std::io::stdout(), "{report}");
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// The broker's runtime: connection tasks, listeners, admin HTTP (the router has its own
/// thread).
///
/// Without the LIFO slot, tasks woken together by the I/O driver run in the order their
/// sockets became readable. With it, the last one woken runs first: of two clients whose
/// packets arrive together, the later one's reached the router first in 27–49% of tries
/// (`scripts/reorder_probe.py`; see docs/architecture.md). The slot speeds up a task waking
/// another on the same worker, which the broker barely does: readers wake the router thread,
/// and the router wakes writers from its own thread.
///
/// `disable_lifo_slot` is a tokio unstable API; `.cargo/config.toml` builds with
/// `--cfg tokio_unstable`. A build without it (a `RUSTFLAGS` variable replaces that setting)
/// works, with the reordering.
fn serve_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    #[cfg(not(tokio_unstable))]
    tracing::warn!(
        "built without --cfg tokio_unstable (a RUSTFLAGS variable replaces .cargo/config.toml): \
         connections woken together run newest first; see docs/architecture.md, Order"
    );
    Ok(builder.enable_all().build()?)
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = load_config(&args)?;
    let log_level = init_logging(&config)?;
    log_panics();
    // A reload reads the file again and applies the same flags over it (flags win, as at start).
    let reloading = ferrymq_server::Reloading {
        load: args.config.is_some().then(|| {
            let args = args.clone();
            let load: ferrymq_server::ConfigLoader =
                std::sync::Arc::new(move || load_config(&args));
            load
        }),
        watch: args.config.clone().filter(|_| !args.no_watch_config),
        sighup: true,
        log_level: Some(log_level),
    };
    serve_runtime()?.block_on(async move {
        let server = Server::start_with(config, reloading).await?;
        let failure = tokio::select! {
            r = wait_for_signal() => { r?; None }
            reason = server.failed() => Some(reason),
            _ = test_hooks(&server) => None,
        };
        tracing::info!("shutting down");
        server.shutdown().await;
        match failure {
            // Exits non-zero, so that systemd or Docker restarts the broker.
            Some(reason) => Err(anyhow::anyhow!("stopped: {reason}")),
            None => Ok(()),
        }
    })
}

/// The configuration file (or the defaults) with the command-line flags over it, validated:
/// what `serve` starts with and what every reload reads.
fn load_config(args: &ServeArgs) -> Result<Config, ferrymq_server::ServerError> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(a) = args.mqtt.clone() {
        config.listeners.mqtt = a;
    }
    if let Some(a) = args.ws.clone() {
        config.listeners.ws = Some(a);
    }
    if let Some(a) = args.http.clone() {
        config.listeners.http = a;
    }
    if let Some(d) = args.data_dir.clone() {
        config.data_dir = d;
    }
    if args.in_memory {
        config.storage.persistence = false;
    }
    if let Some(f) = args.fsync {
        config.storage.fsync = f.into();
    }
    if let Some(l) = args.log_level.clone() {
        config.log.level = l;
    }
    if let Some(f) = args.log_format.as_deref() {
        config.log.format = if f == "json" {
            LogFormat::Json
        } else {
            LogFormat::Text
        };
    }
    config.validate()?;
    Ok(config)
}

/// Sends every panic, from any thread, to the log (with its thread and location) instead of
/// bare stderr, so that it lands where the operator looks and JSON logs stay JSON. With
/// `RUST_BACKTRACE=1` the backtrace is logged too.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        let message = ferrymq_server::panic_message(info.payload());
        let location = info
            .location()
            .map_or_else(|| "unknown".to_string(), |l| l.to_string());
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            tracing::error!(thread, location, panic = message, %backtrace, "a thread panicked");
        } else {
            tracing::error!(thread, location, panic = message, "a thread panicked");
        }
    }));
}

/// Test hooks, in debug builds only (a release build has none): with
/// `FERRYMQ_TEST_PANIC_ROUTER_AFTER_MS` set, the router panics that long after start, so
/// that a test can watch the process log it and exit non-zero. Never resolves.
async fn test_hooks(server: &Server) {
    #[cfg(debug_assertions)]
    if let Some(ms) = std::env::var("FERRYMQ_TEST_PANIC_ROUTER_AFTER_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        tracing::warn!("FERRYMQ_TEST_PANIC_ROUTER_AFTER_MS: making the router panic");
        server.panic_router().await;
    }
    #[cfg(not(debug_assertions))]
    let _ = server;
    std::future::pending().await
}

/// Installs the subscriber; returns the hook that changes its level filter on a reload.
fn init_logging(config: &Config) -> anyhow::Result<ferrymq_server::LogLevelHook> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level).with_context(|| {
        format!(
            "invalid config value for `log.level`: {:?}",
            config.log.level
        )
    })?;
    // Colour only a terminal: in a file, a pipe or journald the escape codes are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    Ok(match config.log.format {
        LogFormat::Json => {
            let builder = builder.json().with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            level_hook(handle)
        }
        LogFormat::Text => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            level_hook(handle)
        }
    })
}

/// A `log.level` filter, or why it does not parse (a reload and `check-config` say the same).
fn log_filter(level: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())
}

/// Checks a `log.level` filter and returns what puts it in force.
fn level_hook<S: 'static>(
    handle: tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, S>,
) -> ferrymq_server::LogLevelHook {
    std::sync::Arc::new(move |level: &str| {
        let filter = log_filter(level)?;
        let handle = handle.clone();
        let apply: Box<dyn FnOnce() + Send> = Box::new(move || {
            if let Err(e) = handle.reload(filter) {
                tracing::warn!(error = %e, "log level not changed");
            }
        });
        Ok(apply)
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
