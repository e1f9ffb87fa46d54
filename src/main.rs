//! The `didhub` command: parses arguments, loads config, installs tracing, calls the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use didhub::config::{Config, MqttProtocol, EX_CONFIG, SHIPPED_HUB_TOML};
use didhub::did::DidMethod;
use didhub::verify::Envelope;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(
    name = "didhub",
    version,
    about = "Verified DIDComm telemetry from MQTT devices into time-series storage"
)]
struct Cli {
    /// The configuration file.
    #[arg(
        long,
        short,
        global = true,
        env = "DIDHUB_CONFIG",
        default_value = "hub.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the hub.
    Run,
    /// Check the configuration: exit 0, or 78 with the key and the fix.
    Validate,
    /// Print the hub DID (created on first `run`).
    Identity {
        /// Print the DID document too.
        #[arg(long)]
        doc: bool,
    },
    /// Make a device identity file (secrets, mode 0600).
    Keygen {
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
        /// `key` (did:key Ed25519) or `peer` (did:peer:2).
        #[arg(long, default_value = "key", value_parser = parse_method)]
        method: DidMethod,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Pack a post as a device and publish it.
    Send {
        /// The device identity file (from `keygen`).
        #[arg(long)]
        identity: PathBuf,
        /// The payload, any JSON.
        #[arg(long)]
        payload: String,
        /// The hub DID (default: from the hub's state_dir).
        #[arg(long)]
        to: Option<String>,
        /// `mqtt://host:port` or `mqtts://host:port` (default: mqtt.url of hub.toml, with its
        /// user name, password and [mqtt.tls] files).
        #[arg(long)]
        broker: Option<String>,
        /// User name for the broker.
        #[arg(long)]
        username: Option<String>,
        /// File whose first line is the broker password.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// PEM CA bundle for an mqtts:// broker (default: the system's CAs).
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// PEM client certificate, for brokers that require one.
        #[arg(long, requires = "key_file")]
        cert_file: Option<PathBuf>,
        /// PEM private key of --cert-file.
        #[arg(long, requires = "cert_file")]
        key_file: Option<PathBuf>,
        /// signed, authcrypt, anoncrypt, anoncrypt-signed, authcrypt-signed or plaintext.
        #[arg(long, default_value = "signed", value_parser = parse_mode)]
        mode: Envelope,
        /// Topic (default: the first route's filter with the wildcards filled in).
        #[arg(long)]
        topic: Option<String>,
        /// How many posts.
        #[arg(long, default_value_t = 1)]
        count: u64,
        /// Posts per second (default: as fast as possible).
        #[arg(long)]
        rate: Option<f64>,
        /// Publish QoS (0 or 1).
        #[arg(long, default_value_t = 1)]
        qos: u8,
        /// Put the post's number into this payload member (object payloads).
        #[arg(long)]
        seq_field: Option<String>,
        /// The first number for --seq-field.
        #[arg(long, default_value_t = 0)]
        seq_start: u64,
        /// Give up (exit 1, naming the broker and the posts acknowledged so far) when the broker
        /// makes no progress for this long: no connection (at most 10 s), no room to publish, or
        /// (QoS 1) no acknowledgement while posts wait for one. E.g. 30s, 2m.
        #[arg(long, default_value = "60s", value_parser = parse_timeout)]
        timeout: Duration,
        /// MQTT version, `v3.1.1` or `v5` (default: mqtt.protocol of hub.toml when it is read,
        /// else v3.1.1).
        #[arg(long, value_parser = parse_protocol)]
        protocol: Option<MqttProtocol>,
        /// MQTT 5: ask the hub to send its problem reports to this topic (the Response Topic),
        /// with the post's message id as Correlation Data.
        #[arg(long)]
        response_topic: Option<String>,
    },
    /// Show stored points from the embedded store.
    Query {
        /// Only this measurement.
        #[arg(long)]
        measurement: Option<String>,
        /// How far back, e.g. 10m, 2h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        since: Duration,
        /// table, json, csv or line (InfluxDB line protocol).
        #[arg(long, value_enum, default_value = "table")]
        format: didhub::cli::Format,
        /// At most this many points.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        /// Show points the store refused for good instead.
        #[arg(long)]
        dead_letters: bool,
    },
    /// Print the shipped, fully commented hub.toml.
    ExampleConfig,
    /// Measure: posts generated first, then through the pipeline in process and/or end to
    /// end through a broker and a running hub (BENCHMARKS.md).
    Bench(didhub::bench::BenchArgs),
}

fn parse_method(s: &str) -> Result<DidMethod, String> {
    match s {
        "key" => Ok(DidMethod::Key),
        "peer" => Ok(DidMethod::Peer),
        _ => Err(format!("`{s}`: use `key` or `peer`")),
    }
}

fn parse_protocol(s: &str) -> Result<MqttProtocol, String> {
    match s {
        "v3.1.1" | "3.1.1" | "v311" => Ok(MqttProtocol::V311),
        "v5" | "5" => Ok(MqttProtocol::V5),
        _ => Err(format!("`{s}`: use v3.1.1 or v5")),
    }
}

fn parse_mode(s: &str) -> Result<Envelope, String> {
    Envelope::parse(s).ok_or_else(|| {
        format!("`{s}`: use signed, authcrypt, anoncrypt, anoncrypt-signed, authcrypt-signed or plaintext")
    })
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be more than 0, e.g. 30s".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("`{s}`: {e}; use e.g. 30s, 2m")),
    }
}

fn env_pairs() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("HUB__"))
        .collect()
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path, &env_pairs()).map_err(|e| {
        eprintln!("didhub: configuration error: {e}");
        ExitCode::from(EX_CONFIG as u8)
    })
}

fn init_tracing(cfg: Option<&Config>) {
    use std::io::IsTerminal;
    let level = cfg.map(|c| c.log.level.as_str()).unwrap_or("info");
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},rumqttd=off")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A closed stderr must not panic the task that logs (it would stop the pipeline).
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal());
    if cfg.is_some_and(|c| c.log.format == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("didhub: {msg}");
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    // The didcomm crate builds errors while detecting envelopes; with library backtraces on,
    // each one captures a backtrace (3.5× slower). Set before any thread starts.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let cli = Cli::parse();
    // The hub's async tasks (MQTT, acks, shipping, HTTP) are light: verification and commits run
    // on their own threads. On one runtime thread those tasks wake each other without crossing
    // threads; `bench` and the other commands keep the multi-threaded runtime.
    let rt = if matches!(cli.command, Command::Run) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
    .enable_all()
    .build();
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    rt.block_on(real_main(cli))
}

async fn real_main(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Bench(args) => {
            init_tracing(None);
            match didhub::bench::main(args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Command::ExampleConfig => {
            print!("{SHIPPED_HUB_TOML}");
            ExitCode::SUCCESS
        }
        Command::Validate => match load(&cli.config) {
            Ok(cfg) => {
                println!(
                    "{}: ok ({} route(s), {} device(s), store {:?})",
                    cli.config.display(),
                    cfg.routes.len(),
                    cfg.devices.len(),
                    cfg.store.kind
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Keygen { out, method, force } => match didhub::app::keygen(&out, method, force) {
            Ok(id) => {
                println!("{}", id.did);
                eprintln!("wrote {} (mode 0600; keep it secret)", out.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Identity { doc } => {
            let cfg = match load(&cli.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let did = match didhub::cli::hub_did_from_state(&cfg) {
                Ok(d) => d,
                Err(_) => match didhub::app::load_or_create_identity(&cfg) {
                    Ok((id, _)) => id.did,
                    Err(e) => return fail(e),
                },
            };
            println!("{did}");
            if doc {
                match didhub::did::resolve_local(&did) {
                    Ok(d) => println!(
                        "{}",
                        serde_json::to_string_pretty(&d).unwrap_or_else(|e| e.to_string())
                    ),
                    Err(e) => return fail(e),
                }
            }
            ExitCode::SUCCESS
        }
        Command::Run => {
            let cfg = match load(&cli.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_tracing(Some(&cfg));
            let shutdown = CancellationToken::new();
            // Capacity 1: SIGHUPs that arrive during a reload coalesce into one more.
            let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
            tokio::spawn(signals(shutdown.clone(), reload_tx));
            let path = cli.config.clone();
            let reload = didhub::reload::Reload {
                requests: reload_rx,
                load: Box::new(move || Config::load(&path, &env_pairs())),
            };
            let stats = Arc::new(didhub::pipeline::Stats::default());
            match didhub::app::run_with(cfg, shutdown, stats, Some(reload)).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ didhub::app::RunError::Config(_)) => {
                    tracing::error!("{e}");
                    ExitCode::from(EX_CONFIG as u8)
                }
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Send {
            identity,
            payload,
            to,
            broker,
            username,
            password_file,
            ca_file,
            cert_file,
            key_file,
            mode,
            topic,
            count,
            rate,
            qos,
            seq_field,
            seq_start,
            timeout,
            protocol,
            response_topic,
        } => {
            let device = match didhub::did::Identity::load(&identity) {
                Ok(d) => d,
                Err(e) => return fail(format!("{}: {e}", identity.display())),
            };
            let payload: serde_json::Value = match serde_json::from_str(&payload) {
                Ok(v) => v,
                Err(e) => return fail(format!("--payload is not JSON: {e}")),
            };
            // hub.toml supplies defaults; it is optional when --to and --broker are given.
            let cfg = if to.is_some() && broker.is_some() && topic.is_some() {
                None
            } else {
                match load(&cli.config) {
                    Ok(c) => Some(c),
                    Err(code) => return code,
                }
            };
            let to = match to.map(Ok).unwrap_or_else(|| {
                didhub::cli::hub_did_from_state(cfg.as_ref().expect("loaded above"))
            }) {
                Ok(t) => t,
                Err(e) => return fail(e),
            };
            // Without --broker, hub.toml's [mqtt] also gives the credentials and TLS files;
            // each flag overrides its key.
            let mut conn = match (&broker, &cfg) {
                (None, Some(c)) => match didhub::cli::Connection::from_mqtt(&c.mqtt) {
                    Ok(conn) => conn,
                    Err(e) => return fail(e),
                },
                _ => didhub::cli::Connection::default(),
            };
            if username.is_some() {
                conn.username = username;
            }
            if let Some(p) = password_file {
                match didhub::config::read_secret_file(&p, "--password-file") {
                    Ok(pw) => conn.password = Some(pw),
                    Err(e) => return fail(e),
                }
            }
            if ca_file.is_some() {
                conn.tls.ca_file = ca_file;
            }
            if cert_file.is_some() {
                conn.tls.cert_file = cert_file;
                conn.tls.key_file = key_file;
            }
            let broker = broker
                .unwrap_or_else(|| cfg.as_ref().map(|c| c.mqtt.url.clone()).unwrap_or_default());
            let topic = topic.unwrap_or_else(|| {
                didhub::cli::default_topic(cfg.as_ref().expect("loaded above"), &device.did)
            });
            if qos > 1 {
                return fail("--qos must be 0 or 1");
            }
            if rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
                return fail("--rate must be a positive number of posts per second");
            }
            let protocol = protocol
                .or(cfg.as_ref().map(|c| c.mqtt.protocol))
                .unwrap_or_default();
            if response_topic.is_some() && protocol != MqttProtocol::V5 {
                return fail("--response-topic needs MQTT 5: add --protocol v5");
            }
            let plan = didhub::cli::SendPlan {
                device,
                to,
                broker: broker.clone(),
                topic: topic.clone(),
                payload,
                mode,
                count,
                rate,
                qos,
                seq_field,
                seq_start,
                progress: count > 1,
                timeout,
                protocol,
                response_topic,
            };
            match didhub::cli::send_with(plan, &conn).await {
                Ok(s) => {
                    if count > 1 {
                        let secs = s.elapsed.as_secs_f64().max(1e-9);
                        eprintln!(
                            "sent {} {} posts to {topic} in {:.2} s ({:.0} posts/s); broker acknowledged {}",
                            s.sent,
                            mode.as_str(),
                            secs,
                            s.sent as f64 / secs,
                            s.acked
                        );
                    }
                    if qos == 1 && s.acked < s.sent {
                        return fail(format!(
                            "only {} of {} posts were acknowledged by the broker {}",
                            s.acked, s.sent, broker
                        ));
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Command::Query {
            measurement,
            since,
            format,
            limit,
            dead_letters,
        } => {
            let cfg = match load(&cli.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if dead_letters {
                let c = match didhub::cli::open_for_query(&cfg.db_path()) {
                    Ok(c) => c,
                    Err(e) => return fail(e),
                };
                match didhub::store::dead_letters(&c) {
                    Ok(rows) => {
                        for (line, reason, _) in &rows {
                            println!("{reason}\t{line}");
                        }
                        eprintln!("{} dead letter(s)", rows.len());
                        return ExitCode::SUCCESS;
                    }
                    Err(e) => return fail(e),
                }
            }
            if cfg.store.kind == didhub::config::StoreKind::Influxdb {
                eprintln!(
                    "note: store.kind = \"influxdb\": points are in InfluxDB (query them there); showing the embedded store only"
                );
            }
            match didhub::cli::query(&cfg.db_path(), measurement.as_deref(), since, limit) {
                Ok(points) => {
                    use std::io::Write as _;
                    let text = didhub::cli::render(&points, format);
                    // A closed pipe (`| head`) is not an error worth a panic.
                    let _ = std::io::stdout().lock().write_all(text.as_bytes());
                    if points.len() == limit {
                        eprintln!("{} point(s) (the --limit; there may be more)", points.len());
                    } else if format == didhub::cli::Format::Table {
                        eprintln!("{} point(s)", points.len());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
    }
}

async fn signals(shutdown: CancellationToken, reload: tokio::sync::mpsc::Sender<()>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                // Full: a reload is already pending and will read the newest file.
                let _ = reload.try_send(());
            }
        }
    }
    tracing::info!("stop requested; a second signal exits at once");
    shutdown.cancel();
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    // Committed rows are durable (SQLite, synchronous=FULL); unacked messages are redelivered.
    tracing::warn!("second stop signal: exiting now");
    std::process::exit(130);
}
