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
//!
//! While a write is on the wire, the blocking pool deletes the batch accepted before it and
//! reads and encodes (gzip by default, `store.influxdb.content_encoding`) the batch after it,
//! so the shipper mostly waits for the store (measured with `scripts/bench-ship.sh`).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{ContentEncoding, InfluxConfig, Secret};
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
    /// Write requests sent (answered or not).
    pub requests: AtomicU64,
    /// Line protocol bytes in those requests, before encoding.
    pub body_bytes_raw: AtomicU64,
    /// Body bytes sent (after gzip, when on).
    pub body_bytes_sent: AtomicU64,
    /// Time spent waiting for write answers, ns.
    pub request_ns: AtomicU64,
}

impl ShipStats {
    /// Records rows added by a commit.
    pub fn added(&self, rows: i64, bytes: i64) {
        self.outbox_rows.fetch_add(rows, Ordering::Relaxed);
        self.outbox_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn removed(&self, rows: i64, bytes: i64) {
        self.outbox_rows.fetch_sub(rows, Ordering::Relaxed);
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

/// Outbox rows for one write request: their lines back to back, each ended by `\n`.
#[derive(Debug, Default, Clone, PartialEq)]
struct Batch {
    /// Outbox sequence numbers, ascending.
    seqs: Vec<i64>,
    /// Where each line ends in `lines` (just after its `\n`).
    ends: Vec<usize>,
    /// The lines.
    lines: String,
}

impl Batch {
    fn push(&mut self, seq: i64, line: &str) {
        self.seqs.push(seq);
        self.lines.push_str(line);
        self.lines.push('\n');
        self.ends.push(self.lines.len());
    }

    fn len(&self) -> usize {
        self.seqs.len()
    }

    fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Line `i`, without its newline.
    fn line(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.lines[start..self.ends[i] - 1]
    }

    /// Bytes these rows count for in the outbox gauge (their lines, without newlines).
    fn outbox_bytes(&self) -> i64 {
        (self.lines.len() - self.len()) as i64
    }

    /// Splits into two halves (at least one line each when `len() >= 2`).
    fn split(self) -> (Batch, Batch) {
        let mid = self.len() / 2;
        let cut = self.ends[mid - 1];
        let second = Batch {
            seqs: self.seqs[mid..].to_vec(),
            ends: self.ends[mid..].iter().map(|e| e - cut).collect(),
            lines: self.lines[cut..].to_string(),
        };
        let mut first = self;
        first.seqs.truncate(mid);
        first.ends.truncate(mid);
        first.lines.truncate(cut);
        (first, second)
    }
}

/// Up to `limit` outbox rows with `seq > after`, oldest first, straight into one buffer.
///
/// The cursor lets the next batch be read while the previous one is still on the wire (its
/// rows are still in the outbox until the store accepts them).
fn read_batch(
    conn: &rusqlite::Connection,
    after: i64,
    limit: usize,
) -> Result<Batch, store::StoreError> {
    let mut batch = Batch {
        seqs: Vec::with_capacity(limit.min(100_000)),
        ends: Vec::with_capacity(limit.min(100_000)),
        lines: String::new(),
    };
    store::outbox_scan_after(conn, after, limit, |seq, line| {
        if batch.lines.is_empty() {
            // Lines are alike: size the buffer once from the first.
            batch
                .lines
                .reserve((line.len() + 1) * limit.min(100_000) * 9 / 8);
        }
        batch.push(seq, line);
    })?;
    Ok(batch)
}

/// A write request body: the lines as they are, or gzipped in one pass over the whole buffer
/// (line by line costs half as much CPU again: flate2 prepares its output buffer per call).
fn encode(lines: &str, encoding: ContentEncoding) -> Vec<u8> {
    match encoding {
        ContentEncoding::Identity => lines.as_bytes().to_vec(),
        ContentEncoding::Gzip => {
            use std::io::Write as _;
            // Level 1: the hub's lines (a random thid each) shrink 3.3x for 0.7 µs/line;
            // level 6 gets 5.6x for 2.3 µs/line: three times the CPU for 40% fewer bytes.
            let mut gz = flate2::write::GzEncoder::new(
                Vec::with_capacity(lines.len() / 3 + 64),
                flate2::Compression::fast(),
            );
            // Writing into a Vec cannot fail.
            let _ = gz.write_all(lines.as_bytes());
            gz.finish().unwrap_or_default()
        }
    }
}

/// Rows the store accepted whose delete is still to come.
#[derive(Debug, Default)]
struct Accepted {
    seqs: Vec<i64>,
    bytes: i64,
}

impl Accepted {
    fn add(&mut self, b: &Batch) {
        self.seqs.extend_from_slice(&b.seqs);
        self.bytes += b.outbox_bytes();
    }

    fn append(&mut self, other: Accepted) {
        self.seqs.extend(other.seqs);
        self.bytes += other.bytes;
    }
}

/// Why a drain stopped early.
#[derive(Debug)]
enum Stop {
    /// The outbox could not be read or cleaned up.
    Outbox(store::StoreError),
    /// The store did not take a write: try again after the delay (if the server named one).
    Write(String, Option<Duration>),
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

    async fn write(&self, raw_len: usize, body: Vec<u8>) -> Answer {
        self.stats
            .body_bytes_raw
            .fetch_add(raw_len as u64, Ordering::Relaxed);
        self.stats
            .body_bytes_sent
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        let mut req = self
            .http
            .post(self.write_url())
            .query(&[
                ("org", self.cfg.organization.as_str()),
                ("bucket", self.cfg.bucket.as_str()),
                ("precision", "ns"),
            ])
            .header("Content-Type", "text/plain; charset=utf-8")
            .timeout(Duration::from_secs(30));
        if self.cfg.content_encoding == ContentEncoding::Gzip {
            req = req.header("Content-Encoding", "gzip");
        }
        req = req.body(body);
        if !self.token.is_empty() {
            req = req.header("Authorization", format!("Token {}", self.token.expose()));
        }
        let started = std::time::Instant::now();
        let sent = req.send().await;
        let took = started.elapsed();
        self.stats.ship_seconds.observe(took);
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats
            .request_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
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

    /// One step on the blocking pool: delete the rows the store accepted, then (unless `limit`
    /// is 0) read and encode the batch after `after`.
    fn step(
        &self,
        accepted: Accepted,
        after: i64,
        limit: usize,
    ) -> tokio::task::JoinHandle<Result<(Batch, Vec<u8>), store::StoreError>> {
        let (conn, stats, encoding) = (
            self.conn.clone(),
            self.stats.clone(),
            self.cfg.content_encoding,
        );
        tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().unwrap_or_else(|e| e.into_inner());
            if !accepted.seqs.is_empty() {
                store::outbox_delete(&mut c, &accepted.seqs)?;
                let n = accepted.seqs.len();
                stats.removed(n as i64, accepted.bytes);
                stats.shipped.fetch_add(n as u64, Ordering::Relaxed);
            }
            if limit == 0 {
                return Ok((Batch::default(), Vec::new()));
            }
            let batch = read_batch(&c, after, limit)?;
            drop(c);
            let body = if batch.is_empty() {
                Vec::new()
            } else {
                encode(&batch.lines, encoding)
            };
            Ok((batch, body))
        })
    }

    /// Ships a batch, splitting too-large or refused batches. The rows the store accepted are
    /// added to `accepted` (deleted later); refused single lines go to dead letters now. No
    /// request is sent once `halted()` says so (another request failed, or the drain is
    /// stopping): `Ok(false)`, and the rows not sent stay in the outbox.
    async fn ship(
        &self,
        batch: Batch,
        body: Vec<u8>,
        accepted: &mut Accepted,
        halted: &(dyn Fn() -> bool + Sync),
    ) -> Result<bool, (String, Option<Duration>)> {
        let mut stack = vec![(batch, Some(body))];
        while let Some((rows, body)) = stack.pop() {
            if halted() {
                return Ok(false);
            }
            // Halves after a split are encoded here: a rare path, a few ms.
            let body = body.unwrap_or_else(|| encode(&rows.lines, self.cfg.content_encoding));
            let answer = self.write(rows.lines.len(), body).await;
            match answer {
                Answer::Ok => {
                    self.stats.store_ok.store(true, Ordering::Relaxed);
                    accepted.add(&rows);
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
                        let line = rows.line(0).to_string();
                        tracing::warn!(reason = %reason, line = %line, "the store refused a point; moved to dead letters (`didhub query --dead-letters`)");
                        self.stats.dead.fetch_add(1, Ordering::Relaxed);
                        let moved = vec![(rows.seqs[0], line)];
                        self.blocking(move |c| {
                            store::outbox_dead_letter(c, &moved, &reason, crate::now_ns())
                        })
                        .await
                        .map_err(|e| (e.to_string(), None))?;
                        self.stats.removed(1, rows.outbox_bytes());
                    } else {
                        let (first, second) = rows.split();
                        stack.push((second, None));
                        stack.push((first, None));
                    }
                }
            }
        }
        Ok(true)
    }

    /// Ships until the outbox is empty (`Ok`), the first failure, or `stop` (`Ok`, after the
    /// requests on the wire). Up to `requests_in_flight` batches are on the wire at once; while
    /// they are, the next one is read and encoded and the accepted ones deleted, on the
    /// blocking pool. Rows leave the outbox only after a 2xx for them. Once a request fails
    /// (or `stop` is cancelled) no other is sent: those on the wire finish, what was accepted
    /// is deleted, and the failure is returned.
    async fn drain(
        &self,
        stop: Option<&CancellationToken>,
        mut on_accepted: impl FnMut(),
    ) -> Result<(), Stop> {
        use futures::StreamExt as _;
        let limit = self.cfg.batch_size;
        let in_flight = self.cfg.requests_in_flight.max(1);
        // Rows up to `after` are on the wire, or accepted and not yet deleted.
        let mut after = 0i64;
        let mut accepted = Accepted::default();
        // The read (and encode) of the batch after `after`, with the deletes before it.
        let mut next = None;
        let mut failed: Option<Stop> = None;
        let failing = std::sync::atomic::AtomicBool::new(false);
        let halted = || failing.load(Ordering::Relaxed) || stop.is_some_and(|s| s.is_cancelled());
        // Declared after what its futures borrow.
        let mut wire = futures::stream::FuturesUnordered::new();
        // The last read found nothing after `after`.
        let mut exhausted = false;
        loop {
            failing.store(failed.is_some(), Ordering::Relaxed);
            if !halted() && !exhausted && next.is_none() {
                next = Some(self.step(std::mem::take(&mut accepted), after, limit));
            }
            let room = !halted() && wire.len() < in_flight && next.is_some();
            if wire.is_empty() && !room {
                if !halted() && exhausted && !accepted.seqs.is_empty() {
                    // Delete the last accepted batches, and look again.
                    exhausted = false;
                    continue;
                }
                break;
            }
            tokio::select! {
                Some((shipped, taken)) = wire.next(), if !wire.is_empty() => {
                    accepted.append(taken);
                    match shipped {
                        Ok(true) => on_accepted(),
                        Ok(false) => {}
                        Err((reason, after)) => {
                            failed.get_or_insert(Stop::Write(reason, after));
                        }
                    }
                }
                read = async { next.as_mut().expect("room means a read").await }, if room => {
                    next = None;
                    match read.unwrap_or_else(|e| panic!("shipper database task panicked: {e}")) {
                        Err(e) => {
                            failed.get_or_insert(Stop::Outbox(e));
                        }
                        Ok((batch, _)) if batch.is_empty() => exhausted = true,
                        Ok((batch, body)) => {
                            after = batch.seqs[batch.len() - 1];
                            let halted = &halted;
                            wire.push(async move {
                                let mut taken = Accepted::default();
                                let shipped = self.ship(batch, body, &mut taken, halted).await;
                                (shipped, taken)
                            });
                        }
                    }
                }
            }
        }
        // Let the read in flight finish its deletes; its batch is read again later.
        if let Some(h) = next.take() {
            let read = h
                .await
                .unwrap_or_else(|e| panic!("shipper database task panicked: {e}"));
            if let Err(e) = read {
                failed.get_or_insert(Stop::Outbox(e));
            }
        }
        self.step(std::mem::take(&mut accepted), after, 0)
            .await
            .unwrap_or_else(|e| panic!("shipper database task panicked: {e}"))
            .map_err(Stop::Outbox)?;
        match failed {
            Some(stop) => Err(stop),
            None => Ok(()),
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.cfg.retry_min, self.cfg.retry_max);
        let mut failing = false;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let drained = self
                .drain(Some(&shutdown), || {
                    if failing {
                        tracing::info!(
                            backlog = self.stats.outbox_rows.load(Ordering::Relaxed),
                            "the store accepts writes again; draining the outbox"
                        );
                        failing = false;
                    }
                    backoff.reset();
                })
                .await;
            match drained {
                Ok(()) => {
                    if shutdown.is_cancelled() {
                        return;
                    }
                    tokio::select! {
                        _ = self.notify.notified() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
                Err(Stop::Outbox(e)) => {
                    tracing::error!(error = %e, "cannot read or clean up the outbox");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
                Err(Stop::Write(reason, after)) => {
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
        match self.drain(None, || {}).await {
            Ok(()) => {}
            Err(Stop::Outbox(e)) => {
                tracing::warn!(error = %e, "outbox not fully flushed at shutdown; it is shipped after the next start");
            }
            Err(Stop::Write(reason, _)) => {
                tracing::warn!(reason = %reason, "outbox not fully flushed at shutdown; it is shipped after the next start");
            }
        }
    }
}

/// The HTTP request reader of the tests' scripted stores (shared with `tests/faults.rs`).
#[cfg(test)]
#[path = "../tests/common/http_request.rs"]
mod test_http_request;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufReader, Read, Write};
    use test_http_request as http_request;

    fn batch(lines: &[&str]) -> Batch {
        let mut b = Batch::default();
        for (i, l) in lines.iter().enumerate() {
            b.push(i as i64 + 1, l);
        }
        b
    }

    #[test]
    fn batches_split_and_encode() {
        let b = batch(&["m v=1 1", "m v=22 2", "m v=333 3"]);
        assert_eq!((b.len(), b.line(1), b.outbox_bytes()), (3, "m v=22 2", 24));
        let (first, second) = b.clone().split();
        assert_eq!(first, batch(&["m v=1 1"]));
        assert_eq!(
            (second.seqs.clone(), second.line(0)),
            (vec![2, 3], "m v=22 2")
        );
        assert_eq!(second.line(1), "m v=333 3");
        assert_eq!(second.lines, "m v=22 2\nm v=333 3\n");
        assert_eq!(
            encode(&b.lines, ContentEncoding::Identity),
            b.lines.as_bytes()
        );
        let gz = encode(&b.lines, ContentEncoding::Gzip);
        let mut plain = String::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_string(&mut plain)
            .unwrap();
        assert_eq!(plain, b.lines);
    }

    #[test]
    fn deletes_exactly_the_accepted_rows_in_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = store::open(&dir.path().join("t.db")).unwrap();
        for i in 0..10 {
            c.execute(
                "INSERT INTO outbox (line) VALUES (?1)",
                [format!("m v={i}")],
            )
            .unwrap();
        }
        store::outbox_delete(&mut c, &[1, 2, 3, 5, 6, 9, 7]).unwrap();
        let left: Vec<i64> = read_batch(&c, 0, 100).unwrap().seqs;
        assert_eq!(left, vec![4, 8, 10]);
        assert_eq!(read_batch(&c, 4, 1).unwrap().seqs, vec![8]);
        store::outbox_delete(&mut c, &[]).unwrap();
        assert_eq!(store::outbox_len(&c).unwrap(), 3);
    }

    /// What a test store has seen.
    #[derive(Default)]
    struct Seen {
        /// Requests that came.
        came: std::sync::atomic::AtomicUsize,
        /// Requests being answered now, and the most there were at once.
        open: std::sync::atomic::AtomicUsize,
        most: std::sync::atomic::AtomicUsize,
        /// The lines of the requests it accepted.
        accepted: Mutex<Vec<String>>,
        /// Requests so far per first-line timestamp.
        times: Mutex<std::collections::HashMap<i64, usize>>,
    }

    /// A store that answers each request as `answer` says from its first line's timestamp and
    /// how many requests began with that line so far (1 for the first): the status, and how
    /// long to wait before answering.
    fn answering_store(answer: fn(i64, usize) -> (u16, Duration)) -> (u16, Arc<Seen>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Arc<Seen> = Arc::default();
        let store = seen.clone();
        std::thread::spawn(move || {
            // A thread per connection: requests in flight each have their own.
            for stream in listener.incoming() {
                let seen = store.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.unwrap());
                    while let Some(req) = http_request::read_request(&mut reader) {
                        seen.came.fetch_add(1, Ordering::SeqCst);
                        let open = seen.open.fetch_add(1, Ordering::SeqCst) + 1;
                        seen.most.fetch_max(open, Ordering::SeqCst);
                        let first: i64 = req
                            .body
                            .lines()
                            .next()
                            .and_then(|l| l.rsplit(' ').next())
                            .and_then(|t| t.parse().ok())
                            .unwrap_or(-1);
                        let times = {
                            let mut t = seen.times.lock().unwrap();
                            let n = t.entry(first).or_default();
                            *n += 1;
                            *n
                        };
                        let (status, delay) = answer(first, times);
                        std::thread::sleep(delay);
                        if status == 204 {
                            seen.accepted
                                .lock()
                                .unwrap()
                                .extend(req.body.lines().map(String::from));
                        }
                        seen.open.fetch_sub(1, Ordering::SeqCst);
                        let resp = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
                        reader.get_mut().write_all(resp.as_bytes()).unwrap();
                    }
                });
            }
        });
        (port, seen)
    }

    fn shipper(
        dir: &std::path::Path,
        port: u16,
        rows: usize,
        batch_size: usize,
        requests_in_flight: usize,
    ) -> Shipper {
        let db = dir.join("t.db");
        let c = store::open(&db).unwrap();
        let stats = Arc::new(ShipStats::default());
        for i in 0..rows {
            let p = crate::mapping::Point {
                measurement: "m".into(),
                tags: Default::default(),
                fields: [("v".to_string(), crate::mapping::FieldValue::Float(1.0))].into(),
                timestamp_ns: i as i64,
            };
            let bytes = store::insert_point(&c, store::Sink::Outbox, p).unwrap();
            stats.added(1, bytes);
        }
        Shipper {
            http: reqwest::Client::new(),
            cfg: InfluxConfig {
                url: format!("http://127.0.0.1:{port}"),
                organization: "o".into(),
                bucket: "b".into(),
                token: None,
                token_file: None,
                batch_size,
                retry_min: Duration::from_millis(10),
                retry_max: Duration::from_millis(10),
                content_encoding: ContentEncoding::Gzip,
                requests_in_flight,
            },
            token: Secret::default(),
            conn: Arc::new(Mutex::new(store::open(&db).unwrap())),
            notify: Arc::default(),
            stats,
        }
    }

    /// Every row is in the outbox or was accepted, none twice, and the gauges agree.
    fn assert_each_row_once(s: &Shipper, seen: &Seen, rows: i64) {
        let left = store::outbox_len(&s.conn.lock().unwrap()).unwrap();
        let accepted = seen.accepted.lock().unwrap();
        let taken = accepted.len() as i64;
        assert_eq!(left + taken, rows, "{left} left + {taken} accepted");
        assert_eq!(s.stats.shipped.load(Ordering::Relaxed) as i64, taken);
        assert_eq!(s.stats.outbox_rows.load(Ordering::Relaxed), left);
        let mut times: Vec<i64> = accepted
            .iter()
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        times.sort();
        times.dedup();
        assert_eq!(times.len() as i64, taken, "a row accepted twice");
    }

    fn requests(seen: &Seen) -> (usize, usize) {
        (
            seen.came.load(Ordering::SeqCst),
            seen.most.load(Ordering::SeqCst),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pipelined_drain_deletes_only_accepted_rows() {
        // One request at a time, batches of 10 (rows stamped 0..35): two accepted, the third
        // refused with 503 while the fourth is read ahead; the next pass re-sends from the
        // first row not accepted.
        let (port, seen) = answering_store(|first, times| match (first, times) {
            (20, 1) => (503, Duration::ZERO),
            _ => (204, Duration::from_millis(20)),
        });
        let dir = tempfile::tempdir().unwrap();
        let s = shipper(dir.path(), port, 35, 10, 1);
        s.flush().await;
        assert_eq!(store::outbox_len(&s.conn.lock().unwrap()).unwrap(), 15);
        assert_eq!(seen.accepted.lock().unwrap().len(), 20);
        assert_each_row_once(&s, &seen, 35);
        s.flush().await;
        assert_eq!(store::outbox_len(&s.conn.lock().unwrap()).unwrap(), 0);
        assert_eq!(s.stats.outbox_bytes.load(Ordering::Relaxed), 0);
        assert_each_row_once(&s, &seen, 35);
        assert_eq!(requests(&seen), (3 + 2, 1), "(requests, most at once)");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_requests_in_flight_and_a_failure_loses_and_doubles_nothing() {
        // Two on the wire at once. The first batch (rows 0..10) is accepted after 300 ms; the
        // second (10..20) refused with 503 after 400 ms. In between, the batches after them
        // (20..30, 30..35) go out and are accepted at once. The next pass ships 10..20.
        let (port, seen) = answering_store(|first, times| match (first, times) {
            (0, _) => (204, Duration::from_millis(300)),
            (10, 1) => (503, Duration::from_millis(400)),
            _ => (204, Duration::ZERO),
        });
        let dir = tempfile::tempdir().unwrap();
        let s = shipper(dir.path(), port, 35, 10, 2);
        let drained = s.drain(None, || {}).await;
        assert!(matches!(drained, Err(Stop::Write(..))), "{drained:?}");
        assert_eq!(requests(&seen), (4, 2), "(requests, most at once)");
        assert_eq!(store::outbox_len(&s.conn.lock().unwrap()).unwrap(), 10);
        assert_each_row_once(&s, &seen, 35);
        s.flush().await;
        assert_eq!(store::outbox_len(&s.conn.lock().unwrap()).unwrap(), 0);
        assert_eq!(s.stats.outbox_bytes.load(Ordering::Relaxed), 0);
        assert_each_row_once(&s, &seen, 35);
        assert_eq!(requests(&seen).0, 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_request_in_flight_is_one_at_a_time() {
        // Each request is answered after 100 ms: time enough for a second one to come.
        let (port, seen) = answering_store(|_, _| (204, Duration::from_millis(100)));
        let dir = tempfile::tempdir().unwrap();
        let s = shipper(dir.path(), port, 35, 10, 1);
        s.flush().await;
        assert_eq!(requests(&seen), (4, 1), "(requests, most at once)");
        assert_eq!(store::outbox_len(&s.conn.lock().unwrap()).unwrap(), 0);
        assert_each_row_once(&s, &seen, 35);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_failure_no_request_is_sent_not_even_half_a_split_batch() {
        // Two batches of 10 on the wire. The second is refused at once with 503; the first is
        // answered 413 (too large) 300 ms later. Its halves must not be sent: the drain has
        // failed, and every row stays in the outbox.
        let (port, seen) = answering_store(|first, _| match first {
            0 => (413, Duration::from_millis(300)),
            10 => (503, Duration::ZERO),
            _ => (204, Duration::ZERO),
        });
        let dir = tempfile::tempdir().unwrap();
        let s = shipper(dir.path(), port, 20, 10, 2);
        let drained = s.drain(None, || {}).await;
        assert!(
            matches!(&drained, Err(Stop::Write(reason, _)) if reason.contains("503")),
            "{drained:?}"
        );
        assert_eq!(requests(&seen).0, 2, "requests");
        assert_eq!(seen.accepted.lock().unwrap().len(), 0);
        assert_each_row_once(&s, &seen, 20);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_lets_the_requests_on_the_wire_finish_and_sends_no_more() {
        // Every request is answered 204 after 300 ms; the drain is stopped once two are on
        // the wire. Those two are accepted and deleted; the rest stays.
        let (port, seen) = answering_store(|_, _| (204, Duration::from_millis(300)));
        let dir = tempfile::tempdir().unwrap();
        let s = shipper(dir.path(), port, 35, 10, 2);
        let stop = CancellationToken::new();
        let (drained, ()) = tokio::join!(s.drain(Some(&stop), || {}), async {
            while seen.came.load(Ordering::SeqCst) < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            stop.cancel();
        });
        assert!(drained.is_ok(), "{drained:?}");
        assert_eq!(requests(&seen), (2, 2), "(requests, most at once)");
        assert_eq!(seen.accepted.lock().unwrap().len(), 20);
        assert_each_row_once(&s, &seen, 35);
    }

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
