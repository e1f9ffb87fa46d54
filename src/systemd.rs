//! systemd `Type=notify` (crate `sd-notify`); everything here is a no-op when `NOTIFY_SOCKET`
//! is unset.
//!
//! - `READY=1` once the broker has connected (first ConnAck); the local store is open before
//!   the hub connects. With `store.kind = "influxdb"`, READY does not wait for InfluxDB: points
//!   wait in the outbox, and `STATUS=` says whether InfluxDB accepts writes.
//! - `STATUS=` every `stats_interval` (10 s when that is 0): rates, backlog, broker, store.
//! - `WATCHDOG=1` every half `WatchdogSec`, and only while the committer's heartbeat advanced
//!   since the last ping: a `Work::Heartbeat` goes through the committer's own queue, so a
//!   stuck committer (or a pipeline blocked behind it) stops the pings and systemd restarts the
//!   hub. An outbox at its budget is waiting by design and keeps the heartbeat going.
//! - `RELOADING=1` … `READY=1` around a SIGHUP reload, `STOPPING=1` on shutdown.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::config::StoreKind;
use crate::metrics::Sources;
use crate::pipeline::Work;

/// `READY=1` went out (process-wide, like `NOTIFY_SOCKET`): reloads report only after it.
static READY_SENT: AtomicBool = AtomicBool::new(false);

/// Whether a service manager listens.
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

/// A reload begins.
pub fn reloading() {
    if !enabled() || !READY_SENT.load(Ordering::Relaxed) {
        return;
    }
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// A reload ended (applied or refused); `status` says which.
pub fn reloaded(status: &str) {
    if !enabled() || !READY_SENT.load(Ordering::Relaxed) {
        return;
    }
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The `STATUS=` text from two counter snapshots `dt` apart (pure).
pub fn status_line(
    prev: &BTreeMap<&'static str, f64>,
    now: &BTreeMap<&'static str, f64>,
    dt: Duration,
    store: StoreKind,
    store_ok: bool,
    outbox_full: bool,
) -> String {
    let secs = dt.as_secs_f64().max(1e-3);
    let rate = |k: &str| {
        (now.get(k).copied().unwrap_or(0.0) - prev.get(k).copied().unwrap_or(0.0)).max(0.0) / secs
    };
    let get = |k: &str| now.get(k).copied().unwrap_or(0.0);
    let mut s = format!(
        "accepted {:.1}/s, rejected {:.1}/s, outbox {} rows",
        rate("accepted"),
        rate("rejected"),
        get("outbox_rows") as i64
    );
    if outbox_full {
        s.push_str(" (full: not acknowledging)");
    }
    s.push_str(if get("mqtt_connected") > 0.0 {
        ", broker connected"
    } else {
        ", broker disconnected"
    });
    s.push_str(match (store, store_ok) {
        (StoreKind::Embedded, _) => ", store embedded",
        (StoreKind::Influxdb, true) => ", influxdb ok",
        (StoreKind::Influxdb, false) => ", influxdb failing (points wait in the outbox)",
    });
    s
}

/// Runs until `shutdown`, then sends `STOPPING=1`. `heartbeat` is a sender into the
/// committer's queue: the caller awaits this task before it drains the pipeline, so that the
/// queue can close.
pub async fn supervise(
    sources: Sources,
    heartbeat: flume::Sender<Work>,
    status_every: Duration,
    shutdown: CancellationToken,
) {
    if !enabled() {
        return;
    }
    let watchdog = sd_notify::watchdog_enabled().filter(|d| !d.is_zero());
    // Ping at half the timeout; feed the heartbeat twice per ping.
    let ping_every = watchdog.map(|d| d / 2).unwrap_or(Duration::from_secs(3600));
    let start = tokio::time::Instant::now();
    let mut ping = tokio::time::interval_at(start + ping_every, ping_every);
    let mut beat = tokio::time::interval((ping_every / 2).max(Duration::from_millis(10)));
    let status_every = if status_every.is_zero() {
        Duration::from_secs(10)
    } else {
        status_every
    };
    let mut status = tokio::time::interval_at(start + status_every, status_every);
    let mut ready_check = tokio::time::interval(Duration::from_millis(50));
    for t in [&mut ping, &mut beat, &mut status, &mut ready_check] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    }
    let snapshot = || crate::stats::snapshot(&sources.stats, &sources.ship, &sources.link);
    let line = |prev: &BTreeMap<&'static str, f64>, dt: Duration| {
        status_line(
            prev,
            &snapshot(),
            dt,
            sources.store,
            sources.ship.store_ok.load(Ordering::Relaxed),
            sources.outbox_full.load(Ordering::Relaxed),
        )
    };
    let (mut prev, mut prev_at) = (snapshot(), Instant::now());
    let mut last_beats = sources.stats.heartbeats.load(Ordering::Relaxed);
    let mut stalled = false;
    let mut ready = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ready_check.tick(), if !ready => {
                if sources.link.connected.load(Ordering::Relaxed) {
                    ready = true;
                    send(&[NotifyState::Ready, NotifyState::Status(&line(&prev, prev_at.elapsed()))]);
                    READY_SENT.store(true, Ordering::Relaxed);
                    tracing::debug!("told systemd READY=1");
                }
            }
            _ = status.tick() => {
                let now = Instant::now();
                send(&[NotifyState::Status(&line(&prev, now - prev_at))]);
                (prev, prev_at) = (snapshot(), now);
            }
            _ = beat.tick(), if watchdog.is_some() => {
                // Full queue: the committer is busy, and its turns advance the heartbeat anyway.
                let _ = heartbeat.try_send(Work::Heartbeat);
            }
            _ = ping.tick(), if watchdog.is_some() => {
                let beats = sources.stats.heartbeats.load(Ordering::Relaxed);
                if beats != last_beats {
                    send(&[NotifyState::Watchdog]);
                    if stalled {
                        tracing::info!("the pipeline's heartbeat advances again; systemd watchdog pings resume");
                        stalled = false;
                    }
                } else if !stalled {
                    tracing::warn!("the committer has not turned for {ping_every:?}: systemd watchdog pings stop; systemd restarts the hub if it stays stuck");
                    stalled = true;
                }
                last_beats = beats;
            }
        }
    }
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: draining the pipeline"),
    ]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_has_rates_backlog_broker_and_store() {
        let mut a = BTreeMap::new();
        a.insert("accepted", 100.0);
        a.insert("rejected", 10.0);
        let mut b = a.clone();
        b.insert("accepted", 150.0);
        b.insert("rejected", 12.0);
        b.insert("outbox_rows", 7.0);
        b.insert("mqtt_connected", 1.0);
        let s = status_line(
            &a,
            &b,
            Duration::from_secs(10),
            StoreKind::Influxdb,
            true,
            false,
        );
        assert_eq!(
            s,
            "accepted 5.0/s, rejected 0.2/s, outbox 7 rows, broker connected, influxdb ok"
        );
        b.insert("mqtt_connected", 0.0);
        let s = status_line(
            &a,
            &b,
            Duration::from_secs(1),
            StoreKind::Embedded,
            true,
            true,
        );
        assert!(
            s.contains("(full: not acknowledging)")
                && s.ends_with("broker disconnected, store embedded"),
            "{s}"
        );
    }
}
