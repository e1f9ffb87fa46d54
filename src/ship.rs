//! The shipper: committed outbox rows → InfluxDB `/api/v2/write`, in batches.
//!
//! Rows leave the outbox only after InfluxDB accepted them, so a crash re-sends them; a re-sent
//! point has the same series and timestamp, so InfluxDB overwrites it instead of doubling it.
//!
//! | answer | what the shipper does |
//! |---|---|
//! | 2xx | delete the rows |
//! | connection error, 5xx, 429 | keep the rows, retry after `Retry-After` or capped backoff |
//! | 401, 403 | keep the rows, log at ERROR (the token must be fixed), retry with backoff |
//! | 413 | split the batch and send the halves |
//! | 400, 422 | split until the refused lines are alone; those go to `dead_letters` with the reason |
//!
//! Writes go through `reqwest` (the client the `influxdb2` crate wraps): the crate's error type
//! drops response headers, and `Retry-After` must be honoured. `influxdb2` still answers the
//! start-up health check.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{InfluxConfig, Secret};
use crate::mqtt::Backoff;
use crate::store;

/// Shipper counters and the outbox gauges.
#[derive(Debug, Default)]
pub struct ShipStats {
    /// Points InfluxDB accepted.
    pub shipped: AtomicU64,
    /// Failed write requests.
    pub errors: AtomicU64,
    /// Points moved to dead letters.
    pub dead: AtomicU64,
    /// Rows waiting in the outbox.
    pub outbox_rows: AtomicI64,
    /// Bytes of line protocol waiting in the outbox.
    pub outbox_bytes: AtomicI64,
    /// The store answered the start-up health check or accepted the last write.
    pub store_ok: AtomicBool,
    /// Seconds per write request.
    pub ship_seconds: crate::metrics::SecondsHistogram,
    /// Failed write requests by HTTP status (or no answer).
    pub ship_errors: crate::metrics::ErrorsByStatus,
}

impl ShipStats {
    /// Records rows added by a commit.
    pub fn added(&self, rows: i64, bytes: i64) {
        self.outbox_rows.fetch_add(rows, Ordering::Relaxed);
        self.outbox_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn removed(&self, rows: &[(i64, String)]) {
        let bytes: i64 = rows.iter().map(|r| r.1.len() as i64).sum();
        self.outbox_rows
            .fetch_sub(rows.len() as i64, Ordering::Relaxed);
        self.outbox_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// What one write request said about the batch.
#[derive(Debug, PartialEq)]
enum Answer {
    Ok,
    /// Transient: try again after the delay (if the server named one).
    Retry(String, Option<Duration>),
    /// The token or permissions are wrong: an operator must act.
    Denied(String),
    /// Too large: split.
    TooLarge(String),
    /// The data itself is refused.
    Refused(String),
}

/// Parses `Retry-After` (delay-seconds or an HTTP date).
fn retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(3600)));
    }
    let when = httpdate_to_system_time(v)?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(3600)),
    )
}

fn httpdate_to_system_time(v: &str) -> Option<std::time::SystemTime> {
    // IMF-fixdate, e.g. "Sun, 06 Nov 1994 08:49:37 GMT", read as RFC 3339.
    let parts: Vec<&str> = v.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    let month = match parts[2] {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let rfc = format!("{}-{:02}-{:0>2}T{}Z", parts[3], month, parts[1], parts[4]);
    humantime::parse_rfc3339(&rfc).ok()
}

/// The shipper task.
pub struct Shipper {
    /// HTTP client.
    pub http: reqwest::Client,
    /// Settings.
    pub cfg: InfluxConfig,
    /// The API token.
    pub token: Secret,
    /// Its own connection to the SQLite store.
    pub conn: Arc<Mutex<rusqlite::Connection>>,
    /// Woken by the committer.
    pub notify: Arc<tokio::sync::Notify>,
    /// Counters.
    pub stats: Arc<ShipStats>,
}

impl Shipper {
    fn write_url(&self) -> String {
        format!("{}/api/v2/write", self.cfg.url.trim_end_matches('/'))
    }

    async fn write(&self, lines: &[(i64, String)]) -> Answer {
        let mut body = String::with_capacity(lines.iter().map(|l| l.1.len() + 1).sum());
        for (_, l) in lines {
            body.push_str(l);
            body.push('\n');
        }
        let mut req = self
            .http
            .post(self.write_url())
            .query(&[
                ("org", self.cfg.organization.as_str()),
                ("bucket", self.cfg.bucket.as_str()),
                ("precision", "ns"),
            ])
            .header("Content-Type", "text/plain; charset=utf-8")
            .timeout(Duration::from_secs(30))
            .body(body);
        if !self.token.is_empty() {
            req = req.header("Authorization", format!("Token {}", self.token.expose()));
        }
        let started = std::time::Instant::now();
        let sent = req.send().await;
        self.stats.ship_seconds.observe(started.elapsed());
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                self.stats.ship_errors.connect();
                return Answer::Retry(format!("{e}"), None);
            }
        };
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Answer::Ok;
        }
        self.stats.ship_errors.http(status);
        let after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(retry_after);
        let text = resp.text().await.unwrap_or_default();
        let reason = format!(
            "HTTP {status}: {}",
            text.trim().chars().take(300).collect::<String>()
        );
        match status {
            400 | 422 => Answer::Refused(reason),
            413 => Answer::TooLarge(reason),
            401 | 403 => Answer::Denied(reason),
            _ => Answer::Retry(reason, after),
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

    /// Ships a batch, splitting too-large or refused batches. `Err` = try again later.
    async fn ship(&self, rows: Vec<(i64, String)>) -> Result<(), (String, Option<Duration>)> {
        let mut stack = vec![rows];
        while let Some(rows) = stack.pop() {
            let answer = self.write(&rows).await;
            match answer {
                Answer::Ok => {
                    self.stats.store_ok.store(true, Ordering::Relaxed);
                    let seqs: Vec<i64> = rows.iter().map(|r| r.0).collect();
                    self.blocking(move |c| store::outbox_delete(c, &seqs))
                        .await
                        .map_err(|e| (e.to_string(), None))?;
                    self.stats.removed(&rows);
                    self.stats
                        .shipped
                        .fetch_add(rows.len() as u64, Ordering::Relaxed);
                }
                Answer::Retry(reason, after) => {
                    self.stats.store_ok.store(false, Ordering::Relaxed);
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    return Err((reason, after));
                }
                Answer::Denied(reason) => {
                    self.stats.store_ok.store(false, Ordering::Relaxed);
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    return Err((
                        format!(
                            "{reason}; check store.influxdb.token and the bucket's permissions"
                        ),
                        None,
                    ));
                }
                Answer::TooLarge(reason) | Answer::Refused(reason) => {
                    self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    if rows.len() == 1 {
                        tracing::warn!(reason = %reason, line = %rows[0].1, "the store refused a point; moved to dead letters (`didhub query --dead-letters`)");
                        self.stats.dead.fetch_add(1, Ordering::Relaxed);
                        let moved = rows.clone();
                        self.blocking(move |c| {
                            store::outbox_dead_letter(c, &moved, &reason, crate::now_ns())
                        })
                        .await
                        .map_err(|e| (e.to_string(), None))?;
                        self.stats.removed(&rows);
                    } else {
                        let mut first = rows;
                        let second = first.split_off(first.len() / 2);
                        stack.push(second);
                        stack.push(first);
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs until `shutdown`.
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
                        tracing::info!(
                            backlog = self.stats.outbox_rows.load(Ordering::Relaxed),
                            "the store accepts writes again; draining the outbox"
                        );
                        failing = false;
                    }
                    backoff.reset();
                }
                Err((reason, after)) => {
                    let delay = after.unwrap_or_else(|| backoff.next_delay());
                    let denied = reason.contains("HTTP 401") || reason.contains("HTTP 403");
                    if !failing {
                        if denied {
                            tracing::error!(reason = %reason, retry_in = ?delay, "the store refuses the hub's credentials; points stay in the outbox");
                        } else {
                            tracing::warn!(reason = %reason, retry_in = ?delay, "store write failed; points stay in the outbox and are retried");
                        }
                        failing = true;
                    } else {
                        tracing::debug!(reason = %reason, retry_in = ?delay, "store write failed again");
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
            if let Err((reason, _)) = self.ship(rows).await {
                tracing::warn!(reason = %reason, "outbox not fully flushed at shutdown; it is shipped after the next start");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon"), None);
        assert!(httpdate_to_system_time("Wed, 25 Nov 2026 04:00:00 GMT").is_some());
    }
}
