//! The shipper: committed outbox rows → InfluxDB `/api/v2/write`, in batches.
//!
//! Rows leave the outbox only after InfluxDB accepted them, so a crash re-sends them; a re-sent
//! point has the same series and timestamp, so InfluxDB overwrites it instead of doubling it.
//! Transient failures (connection refused, 429, 5xx) are retried with backoff; a batch refused
//! as bad data (400, 422) is split until the bad lines are found and moved to `dead_letters`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::InfluxConfig;
use crate::mqtt::Backoff;
use crate::store;

/// Shipper counters.
#[derive(Debug, Default)]
pub struct ShipStats {
    /// Points InfluxDB accepted.
    pub shipped: AtomicU64,
    /// Failed write requests.
    pub errors: AtomicU64,
    /// Points moved to dead letters.
    pub dead: AtomicU64,
}

/// What a write attempt says about the batch.
enum Outcome {
    Ok,
    /// Try again later.
    Retry(String),
    /// The data itself is refused.
    Refused(String),
}

/// The shipper task.
pub struct Shipper {
    /// The InfluxDB client.
    pub client: influxdb2::Client,
    /// Settings.
    pub cfg: InfluxConfig,
    /// Its own connection to the SQLite store.
    pub conn: Arc<Mutex<rusqlite::Connection>>,
    /// Woken by the committer.
    pub notify: Arc<tokio::sync::Notify>,
    /// Counters.
    pub stats: Arc<ShipStats>,
}

impl Shipper {
    async fn write(&self, lines: &[(i64, String)]) -> Outcome {
        let mut body = String::with_capacity(lines.iter().map(|l| l.1.len() + 1).sum());
        for (_, l) in lines {
            body.push_str(l);
            body.push('\n');
        }
        match self
            .client
            .write_line_protocol(&self.cfg.organization, &self.cfg.bucket, body)
            .await
        {
            Ok(()) => Outcome::Ok,
            Err(influxdb2::RequestError::Http { status, text }) => {
                let code = status.as_u16();
                let reason = format!("HTTP {code}: {}", text.trim());
                if matches!(code, 400 | 422) {
                    Outcome::Refused(reason)
                } else {
                    Outcome::Retry(reason)
                }
            }
            Err(e) => Outcome::Retry(e.to_string()),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut rusqlite::Connection) -> Result<T, store::StoreError> + Send + 'static,
    ) -> Result<T, store::StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut c)
        })
        .await
        .unwrap_or_else(|e| panic!("shipper database task panicked: {e}"))
    }

    /// Ships a batch, splitting refused batches down to the bad lines. Returns an error string
    /// when InfluxDB is unavailable (retry later).
    async fn ship(&self, rows: Vec<(i64, String)>) -> Result<(), String> {
        let mut stack = vec![rows];
        while let Some(rows) = stack.pop() {
            match self.write(&rows).await {
                Outcome::Ok => {
                    let seqs: Vec<i64> = rows.iter().map(|r| r.0).collect();
                    let n = seqs.len() as u64;
                    self.blocking(move |c| store::outbox_delete(c, &seqs))
                        .await
                        .map_err(|e| e.to_string())?;
                    self.stats.shipped.fetch_add(n, Ordering::Relaxed);
                }
                Outcome::Retry(reason) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    return Err(reason);
                }
                Outcome::Refused(reason) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    if rows.len() == 1 {
                        tracing::warn!(reason = %reason, line = %rows[0].1, "InfluxDB refused a point; moved to dead letters (`didhub query --dead-letters`)");
                        self.stats.dead.fetch_add(1, Ordering::Relaxed);
                        self.blocking(move |c| {
                            store::outbox_dead_letter(c, &rows, &reason, crate::now_ns())
                        })
                        .await
                        .map_err(|e| e.to_string())?;
                    } else {
                        let mut rows = rows;
                        let tail = rows.split_off(rows.len() / 2);
                        stack.push(tail);
                        stack.push(rows);
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs until `shutdown`; then makes one last attempt to flush within `deadline`.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.cfg.retry_min, self.cfg.retry_max);
        let batch = self.cfg.batch_size;
        let mut failing = false;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let rows = match self.blocking(move |c| store::outbox_batch(c, batch)).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the outbox");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if rows.is_empty() {
                tokio::select! {
                    _ = self.notify.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return,
                }
                continue;
            }
            match self.ship(rows).await {
                Ok(()) => {
                    if failing {
                        tracing::info!("InfluxDB accepts writes again; draining the outbox");
                        failing = false;
                    }
                    backoff.reset();
                }
                Err(reason) => {
                    let delay = backoff.next_delay();
                    if !failing {
                        tracing::warn!(reason = %reason, retry_in = ?delay, "InfluxDB write failed; points stay in the outbox and are retried");
                        failing = true;
                    } else {
                        tracing::debug!(reason = %reason, retry_in = ?delay, "InfluxDB write failed again");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    /// One flush pass at shutdown: ship what is there, stop at the first failure.
    pub async fn flush(&self) {
        let batch = self.cfg.batch_size;
        loop {
            let rows = match self.blocking(move |c| store::outbox_batch(c, batch)).await {
                Ok(r) if !r.is_empty() => r,
                _ => return,
            };
            if let Err(reason) = self.ship(rows).await {
                tracing::warn!(reason = %reason, "outbox not fully flushed at shutdown; it is shipped after the next start");
                return;
            }
        }
    }
}
