//! `run`: wires the stages together and stops them in order (decide, tell, wait).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, StoreKind};
use crate::did::{DidMethod, Identity};
use crate::mqtt::{self, Backoff, Link};
use crate::pipeline::{self, Committer, Shared, Stats};
use crate::reload::Reload;
use crate::ship::{ShipStats, Shipper};
use crate::store::{self, Sink};

/// A start-up failure.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad configuration (exit 78).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The state directory or identity cannot be used.
    #[error("{0}")]
    State(String),
    /// The store cannot be opened.
    #[error("store {path}: {source}")]
    Store {
        /// The database file.
        path: String,
        /// Why.
        #[source]
        source: store::StoreError,
    },
    /// The embedded broker did not start.
    #[error("{0}")]
    Broker(String),
}

/// Loads the hub identity from `state_dir`, creating it on first start.
pub fn load_or_create_identity(cfg: &Config) -> Result<(Identity, bool), RunError> {
    let path = cfg.identity_path();
    let (id, created) = if path.exists() {
        let id = Identity::load(&path).map_err(|e| {
            RunError::State(format!(
                "hub identity: {e}; restore it from backup (devices encrypt to this DID)"
            ))
        })?;
        (id, false)
    } else {
        create_state_dir(cfg)?;
        let id = Identity::generate(cfg.identity.method);
        id.save(&path)
            .map_err(|e| RunError::State(format!("cannot write {}: {e}", path.display())))?;
        (id, true)
    };
    // The public DID, readable by `didhub send` and by people; the secrets stay 0600.
    let did_file = cfg.state_dir.join("hub.did");
    if let Err(e) = std::fs::write(&did_file, format!("{}\n", id.did)) {
        tracing::warn!(path = %did_file.display(), error = %e, "cannot write the hub DID file");
    }
    Ok((id, created))
}

fn create_state_dir(cfg: &Config) -> Result<(), RunError> {
    use std::os::unix::fs::DirBuilderExt;
    // 0700: the store holds every device's telemetry, the identity the hub's secrets.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.state_dir)
        .map_err(|e| {
            RunError::State(format!(
                "state_dir {}: {e}; create it or set state_dir in hub.toml",
                cfg.state_dir.display()
            ))
        })
}

/// The hub, running until `shutdown` is cancelled; then it drains within
/// `pipeline.shutdown_timeout`. `stats` is filled as it runs.
pub async fn run(
    cfg: Config,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
) -> Result<(), RunError> {
    run_with(cfg, shutdown, stats, None).await
}

/// [`run`], reloading routes and the device registry on each request of `reload` (SIGHUP).
pub async fn run_with(
    cfg: Config,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
    reload: Option<Reload>,
) -> Result<(), RunError> {
    let (identity, created) = load_or_create_identity(&cfg)?;
    if created {
        tracing::info!(did = %identity.did, path = %cfg.identity_path().display(), "created the hub identity");
    }
    let hub_did = identity.did.clone();

    #[cfg(feature = "embedded-broker")]
    if cfg.broker.embedded {
        crate::broker::start(cfg.broker.listen, cfg.limits.max_message_bytes * 4 + 1024)
            .map_err(RunError::Broker)?;
        tracing::info!(listen = %cfg.broker.listen, "embedded MQTT broker started");
    }
    #[cfg(not(feature = "embedded-broker"))]
    if cfg.broker.embedded {
        return Err(RunError::Broker(
            "broker.embedded = true, but this build has no `embedded-broker` feature; use an external broker".into(),
        ));
    }

    create_state_dir(&cfg)?;
    let db = cfg.db_path();
    let open = |p: &std::path::Path| {
        store::open(p).map_err(|source| RunError::Store {
            path: p.display().to_string(),
            source,
        })
    };
    let conn = open(&db)?;
    let sink = cfg.store.kind.sink();

    let shared = Arc::new(Shared::from_config(&cfg, identity, stats.clone()));
    let subscriptions: mqtt::Subscriptions = Arc::new(Mutex::new(shared.routing().subscriptions()));

    // Shipper (InfluxDB mode).
    let outbox_notify = Arc::new(tokio::sync::Notify::new());
    let ship_stats = Arc::new(ShipStats::default());
    if sink == Sink::Outbox {
        let (rows, bytes) = store::outbox_size(&conn).map_err(|source| RunError::Store {
            path: db.display().to_string(),
            source,
        })?;
        ship_stats.added(rows, bytes);
        if rows > 0 {
            tracing::info!(
                rows,
                bytes,
                "points from before the restart wait in the outbox"
            );
        }
    }
    let ship_stop = CancellationToken::new();
    let shipper = match (&cfg.store.kind, &cfg.store.influxdb) {
        (StoreKind::Influxdb, Some(icfg)) => {
            let token = icfg.resolved_token()?;
            let client = influxdb2::Client::new(
                icfg.url.clone(),
                icfg.organization.clone(),
                token.expose().to_string(),
            );
            match tokio::time::timeout(Duration::from_secs(5), client.health()).await {
                Ok(Ok(h)) => {
                    // Readiness and STATUS= report the store as reachable until a write fails.
                    ship_stats.store_ok.store(true, Ordering::Relaxed);
                    tracing::info!(url = %icfg.url, status = ?h.status, "InfluxDB answers")
                }
                Ok(Err(e)) => {
                    tracing::warn!(url = %icfg.url, error = %e, "InfluxDB health check failed; points wait in the outbox until it accepts writes")
                }
                Err(_) => {
                    tracing::warn!(url = %icfg.url, "InfluxDB health check timed out; points wait in the outbox until it accepts writes")
                }
            }
            let http = reqwest::Client::builder()
                .build()
                .map_err(|e| RunError::State(format!("cannot build the HTTP client: {e}")))?;
            let shipper = Arc::new(Shipper {
                http,
                cfg: icfg.clone(),
                token,
                conn: Arc::new(Mutex::new(open(&db)?)),
                notify: outbox_notify.clone(),
                stats: ship_stats.clone(),
            });
            let s = shipper.clone();
            let stop = ship_stop.clone();
            Some((shipper, tokio::spawn(async move { s.run(stop).await })))
        }
        _ => None,
    };

    // Stages.
    let workers = if cfg.pipeline.workers == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        cfg.pipeline.workers
    };
    let (in_tx, in_rx) = flume::bounded(cfg.pipeline.queue);
    let (work_tx, work_rx) = flume::bounded(cfg.pipeline.queue);
    // Whole commit batches: a few are enough to keep the acker busy.
    let (settled_tx, settled_rx) = flume::bounded(8);
    let stats_tx = work_tx.clone();
    let heartbeat_tx = work_tx.clone();
    let worker_handles = pipeline::spawn_workers(
        workers,
        shared.clone(),
        in_rx,
        cfg.pipeline.verify_linger,
        work_tx,
    );
    let outbox_full = Arc::new(AtomicBool::new(false));
    let committer_stop = Arc::new(AtomicBool::new(false));
    let committer = Committer {
        conn,
        sink,
        max_batch: cfg.store.max_batch,
        linger: crate::pipeline::COMMIT_LINGER,
        replay_window_ns: cfg.store.replay_window.as_nanos().min(i64::MAX as u128) as i64,
        shared: shared.clone(),
        outbox_notify: (sink == Sink::Outbox).then(|| outbox_notify.clone()),
        ship_stats: ship_stats.clone(),
        outbox_max_bytes: cfg.outbox.max_bytes,
        outbox_full: outbox_full.clone(),
        stop: committer_stop.clone(),
    };
    let committer_handle = std::thread::Builder::new()
        .name("committer".into())
        .spawn(move || committer.run(work_rx, settled_tx))
        .map_err(|e| RunError::State(format!("cannot start the committer thread: {e}")))?;

    let (client, eventloop) = mqtt::connect(&cfg.mqtt)?;
    let input = Arc::new(Mutex::new(Some(in_tx)));
    let link = Arc::new(Link::default());
    let poll = tokio::spawn(mqtt::poll_loop(
        eventloop,
        client.clone(),
        subscriptions.clone(),
        input.clone(),
        stats.clone(),
        link.clone(),
        Backoff::new(cfg.mqtt.reconnect_min, cfg.mqtt.reconnect_max),
        cfg.mqtt.url.clone(),
    ));
    let acker = tokio::spawn(mqtt::acker(settled_rx, client.clone(), stats.clone()));

    // Metrics, health and systemd read the same counters.
    let stopping = Arc::new(AtomicBool::new(false));
    let sources = crate::metrics::Sources {
        stats: stats.clone(),
        ship: ship_stats.clone(),
        link: link.clone(),
        shared: shared.clone(),
        outbox_full: outbox_full.clone(),
        stopping: stopping.clone(),
        store: cfg.store.kind,
        broker: cfg.mqtt.url.clone(),
    };
    let http_stop = CancellationToken::new();
    let http = match cfg.http.addr()? {
        Some(addr) => crate::http::start(addr, sources.clone(), http_stop.clone()),
        None => None,
    };
    let supervisor = tokio::spawn(crate::systemd::supervise(
        sources,
        heartbeat_tx,
        cfg.stats_interval,
        shutdown.clone(),
    ));
    let reloader = reload.map(|r| {
        tokio::spawn(crate::reload::watch(
            r,
            cfg.clone(),
            shared.clone(),
            client.clone(),
            subscriptions.clone(),
            shutdown.clone(),
        ))
    });

    let topics: Vec<String> = subscriptions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(t, _)| t.clone())
        .collect();
    tracing::info!(
        did = %hub_did,
        broker = %cfg.mqtt.url,
        protocol = ?cfg.mqtt.protocol,
        topics = ?topics,
        store = ?cfg.store.kind,
        workers,
        "didhub ready: devices publish DIDComm posts on `topics`, addressed to `did`"
    );

    // Periodic summary while running.
    let summary_stats = stats.clone();
    let summary_stop = shutdown.clone();
    let summary = tokio::spawn(async move {
        let mut last = String::new();
        loop {
            tokio::select! {
                _ = summary_stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
            let s = summary_stats.summary();
            if s != last {
                tracing::info!("{s}");
                last = s;
            }
        }
    });

    // The hub's own counters as points, through the committer (so they are durable too).
    let stats_task = {
        let (stats, ship_stats, link, stop) = (
            stats.clone(),
            ship_stats.clone(),
            link.clone(),
            shutdown.clone(),
        );
        let (interval, hub_did, full) = (cfg.stats_interval, hub_did.clone(), outbox_full.clone());
        tokio::spawn(async move {
            if interval.is_zero() {
                return;
            }
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
                if full.load(Ordering::Relaxed) {
                    continue;
                }
                let snap = crate::stats::snapshot(&stats, &ship_stats, &link);
                let point = crate::stats::stats_point(&hub_did, &snap, crate::now_ns());
                if stats_tx.try_send(pipeline::Work::Internal(point)).is_err() {
                    tracing::debug!("statistics point skipped: the pipeline is busy");
                }
            }
        })
    };

    shutdown.cancelled().await;
    stopping.store(true, Ordering::Relaxed);
    committer_stop.store(true, Ordering::Relaxed);
    let _ = stats_task.await;
    // Sends STOPPING=1 and drops its sender into the committer's queue.
    let _ = supervisor.await;
    if let Some(r) = reloader {
        let _ = r.await;
    }
    tracing::info!(timeout = ?cfg.pipeline.shutdown_timeout, "stopping: ingest closed, draining the pipeline");
    let deadline = tokio::time::Instant::now() + cfg.pipeline.shutdown_timeout;

    // Decide: stop forwarding. Tell: the channel closes once the poll task holds no sender.
    input.lock().unwrap_or_else(|e| e.into_inner()).take();
    // Wait: workers, committer and acker finish as their inputs close.
    let drained = async {
        let _ = tokio::task::spawn_blocking(move || {
            for h in worker_handles {
                let _ = h.join();
            }
            match committer_handle.join() {
                Ok(Err(e)) => tracing::error!(error = %e, "the committer stopped with an error"),
                Err(_) => tracing::error!("the committer panicked"),
                Ok(Ok(())) => {}
            }
        })
        .await;
        let _ = acker.await;
        if link.connected.load(Ordering::Relaxed) {
            // Acks are queued in rumqttc; the disconnect goes after them.
            client.disconnect().await;
            let _ = poll.await;
        } else {
            // No broker to flush acks to: unacked messages are redelivered next session.
            poll.abort();
        }
    };
    if tokio::time::timeout_at(deadline, drained).await.is_err() {
        tracing::warn!(
            "shutdown deadline reached; unacknowledged messages will be redelivered by the broker"
        );
    }
    summary.abort();
    if let Some((shipper, handle)) = shipper {
        ship_stop.cancel();
        // A write in flight is not cancel-aware: bound the wait by the deadline. A batch cut
        // off here is re-sent after the next start (same series and time: idempotent).
        let abort = handle.abort_handle();
        if tokio::time::timeout_at(deadline, handle).await.is_err() {
            abort.abort();
        }
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if tokio::time::timeout(remaining.max(Duration::from_secs(1)), shipper.flush())
            .await
            .is_err()
        {
            tracing::warn!(
                "outbox flush cut short by the shutdown deadline; it resumes on the next start"
            );
        }
        tracing::info!(
            shipped = ship_stats.shipped.load(Ordering::Relaxed),
            errors = ship_stats.errors.load(Ordering::Relaxed),
            dead_letters = ship_stats.dead.load(Ordering::Relaxed),
            "shipper stopped"
        );
    }
    http_stop.cancel();
    if let Some(h) = http {
        let _ = h.await;
    }
    tracing::info!("stopped: {}", stats.summary());
    Ok(())
}

/// Creates a device identity file (`keygen`).
pub fn keygen(path: &std::path::Path, method: DidMethod, force: bool) -> Result<Identity, String> {
    if path.exists() && !force {
        return Err(format!(
            "{} exists; pass --force to overwrite it (the old identity is lost)",
            path.display()
        ));
    }
    let id = Identity::generate(method);
    id.save(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(id)
}
