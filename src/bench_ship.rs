//! `didhub bench --ship-to URL`: the shipper alone against a real store (issue 5, target 5).
//!
//! ```text
//!  fill a temp outbox with N lines (one transaction, before timing)
//!    └─▶ a real Shipper (batch_size, gzip or identity) ─▶ URL/api/v2/write   (timed: until empty)
//!          └─▶ /internal/force_flush, then poll /api/v1/query until N samples of one field show
//! ```
//!
//! The lines go through the hub's own path (`mapping::map_payload` → `Point::to_line` →
//! `store::insert_point(.., Sink::Outbox, ..)`), so they look like what devices produce: measurement
//! `telemetry`, tags `device`, `did` and `run`, eight numeric fields and the `thid` string the hub
//! adds, distinct timestamps 1 ms apart (VictoriaMetrics keeps milliseconds, and with
//! `-dedup.minScrapeInterval=1ms` two samples of a series in one millisecond would be one).
//! Nothing here asserts on time: it measures and prints.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

use crate::bench::{load_average, proc_cpu_secs, BenchArgs};
use crate::config::{ContentEncoding, InfluxConfig, Secret};
use crate::did::{DidMethod, Identity};
use crate::mapping::{self, MapInput, MapLimits, TimestampFormat};
use crate::ship::{ShipStats, Shipper};
use crate::store::{self, Sink};

/// The field whose samples are counted in the store afterwards.
const CHECK_FIELD: &str = "temperature_c";

/// The ship benchmark's flags (flattened into `didhub bench`).
#[derive(Debug, Clone, clap::Args)]
pub struct ShipArgs {
    /// Ship benchmark: fill a temporary outbox with `-n` points from `--devices` devices, then
    /// time a real shipper draining it to this InfluxDB-compatible base URL
    /// (e.g. a VictoriaMetrics at http://127.0.0.1:8428).
    #[arg(long)]
    pub ship_to: Option<String>,
    /// Ship benchmark: lines per write request (`store.influxdb.batch_size`).
    #[arg(long, default_value_t = 5000)]
    pub ship_batch: usize,
    /// Ship benchmark: `gzip` or `identity` (`store.influxdb.content_encoding`).
    #[arg(long, default_value = "gzip", value_parser = parse_encoding)]
    pub ship_encoding: ContentEncoding,
    /// Ship benchmark: most write requests on the wire at once
    /// (`store.influxdb.requests_in_flight`).
    #[arg(long, default_value_t = 2)]
    pub ship_in_flight: usize,
    /// Ship benchmark: the store's PID, to read its CPU seconds during the drain from /proc.
    #[arg(long)]
    pub ship_store_pid: Option<u32>,
    /// Ship benchmark: how long to poll the store for the shipped samples, seconds (0: skip).
    #[arg(long, default_value_t = 120)]
    pub ship_check_secs: u64,
}

impl Default for ShipArgs {
    fn default() -> Self {
        Self {
            ship_to: None,
            ship_batch: 5000,
            ship_encoding: ContentEncoding::Gzip,
            ship_in_flight: 2,
            ship_store_pid: None,
            ship_check_secs: 120,
        }
    }
}

fn parse_encoding(s: &str) -> Result<ContentEncoding, String> {
    ContentEncoding::try_from(s.to_string())
}

/// What one ship benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct ShipReport {
    /// The store's base URL.
    pub url: String,
    /// `gzip` or `identity`.
    pub content_encoding: String,
    /// Lines per write request.
    pub batch_size: usize,
    /// Most write requests on the wire at once.
    pub requests_in_flight: usize,
    /// Points put in the outbox.
    pub points: usize,
    /// Devices (series per field).
    pub devices: usize,
    /// Numeric fields per point (plus the `thid` string).
    pub numeric_fields: usize,
    /// Mean JSON payload the points were mapped from, bytes.
    pub mean_payload_bytes: f64,
    /// Mean line protocol line, bytes (without the newline).
    pub mean_line_bytes: f64,
    /// Filling the outbox, seconds (not timed below).
    pub fill_secs: f64,
    /// Points the store accepted (the shipper's counter).
    pub shipped: u64,
    /// Rows left in the outbox afterwards (0 unless a write failed).
    pub outbox_left: i64,
    /// Write requests.
    pub requests: u64,
    /// Failed write requests.
    pub errors: u64,
    /// Draining the outbox, seconds.
    pub wall_secs: f64,
    /// Points per second.
    pub points_per_sec: f64,
    /// Line protocol megabytes per second (before encoding).
    pub raw_mb_per_sec: f64,
    /// This process's CPU (user + system) during the drain, seconds.
    pub cpu_secs: f64,
    /// That CPU per point, µs.
    pub cpu_us_per_point: f64,
    /// Share of the wall time spent waiting for write answers.
    pub request_share: f64,
    /// Mean write request round trip, ms.
    pub mean_request_ms: f64,
    /// The store's CPU during the drain, seconds (with `--ship-store-pid`).
    pub store_cpu_secs: Option<f64>,
    /// Line protocol sent, bytes (before encoding).
    pub bytes_raw: u64,
    /// Request bodies sent, bytes (after gzip when on).
    pub bytes_sent: u64,
    /// `bytes_raw / bytes_sent`.
    pub compression_ratio: f64,
    /// Samples of `telemetry_<CHECK_FIELD>` of this run found in the store.
    pub arrived: Option<u64>,
    /// Which field was counted.
    pub checked_field: String,
    /// From the end of the drain until the count stopped changing or reached N, seconds.
    pub check_secs: Option<f64>,
    /// Why the store could not be checked, if it could not.
    pub check_error: Option<String>,
    /// The load average (1, 5, 15 min) before the drain.
    pub load_before: String,
    /// … and after it.
    pub load_after: String,
}

/// A device's telemetry payload with eight numeric fields (about 200 bytes of JSON with the
/// envelope's usual member names).
fn payload(i: usize) -> Value {
    let r = |x: f64| (x * 100.0).round() / 100.0;
    let h = (i as u64).wrapping_mul(2_654_435_761) % 10_000;
    json!({
        "seq": i,
        "temperature_c": r(18.0 + h as f64 / 731.0),
        "humidity_pct": r(35.0 + (h % 977) as f64 / 23.0),
        "pressure_hpa": r(990.0 + (h % 613) as f64 / 17.0),
        "battery_v": r(3.3 + (h % 89) as f64 / 97.0),
        "rssi_dbm": -40 - (h % 57) as i64,
        "co2_ppm": 400 + (h % 1200) as i64,
        "uptime_s": 86_400 + i as u64 * 10,
    })
}

/// Fills the outbox of a new store at `db` through the hub's own path, in one transaction.
/// Returns (mean payload bytes, mean line bytes).
fn fill(
    db: &Path,
    n: usize,
    devices: usize,
    run: &str,
    start_ns: i64,
) -> Result<(f64, f64), String> {
    let mut conn = store::open(db).map_err(|e| e.to_string())?;
    let dids: Vec<String> = (0..devices)
        .map(|_| Identity::generate(DidMethod::Key).did)
        .collect();
    let tags: Vec<Vec<(String, String)>> = (0..devices)
        .map(|k| {
            vec![
                ("device".to_string(), format!("bench-{k}")),
                ("run".to_string(), run.to_string()),
            ]
        })
        .collect();
    let limits = MapLimits {
        max_depth: 16,
        max_fields: 256,
    };
    let (mut payload_bytes, mut line_bytes) = (0usize, 0usize);
    let tx = conn.transaction().map_err(|e| e.to_string())?;
    let started = Instant::now();
    for i in 0..n {
        let k = i % devices;
        let p = payload(i);
        payload_bytes += p.to_string().len();
        let thid = uuid::Uuid::new_v4().to_string();
        let point = mapping::map_payload(
            &p,
            &MapInput {
                measurement: "telemetry",
                did: Some(&dids[k]),
                thid: &thid,
                extra_tags: &tags[k],
                timestamp_path: None,
                timestamp_format: TimestampFormat::default(),
                // 1 ms apart: distinct for every point, and for every series after the
                // store's millisecond rounding.
                received_ns: start_ns + i as i64 * 1_000_000,
                limits,
            },
        )
        .map_err(|e| e.to_string())?;
        line_bytes +=
            store::insert_point(&tx, Sink::Outbox, point).map_err(|e| e.to_string())? as usize;
        if i % 20_000 == 0 || i + 1 == n {
            progress(&format!(
                "filling the outbox: {}/{n} points ({:.0}/s)",
                i + 1,
                (i + 1) as f64 / started.elapsed().as_secs_f64().max(1e-9)
            ));
        }
    }
    tx.commit().map_err(|e| e.to_string())?;
    eprintln!();
    Ok((
        payload_bytes as f64 / n as f64,
        line_bytes as f64 / n as f64,
    ))
}

fn progress(line: &str) {
    use std::io::Write as _;
    eprint!("\r{line}   ");
    let _ = std::io::stderr().flush();
}

/// Samples of `telemetry_<field>{run="…"}` in the store between `from_ns` and `to_ns`.
async fn count_samples(
    http: &reqwest::Client,
    base: &str,
    run: &str,
    from_ns: i64,
    to_ns: i64,
) -> Result<u64, String> {
    let at = to_ns / 1_000_000_000 + 1;
    let window = at - from_ns / 1_000_000_000 + 1;
    let q = format!("sum(count_over_time(telemetry_{CHECK_FIELD}{{run=\"{run}\"}}[{window}s]))");
    let v: Value = http
        .get(format!("{base}/api/v1/query"))
        .query(&[("query", q.as_str()), ("time", &at.to_string())])
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| format!("query: {e}"))?
        .error_for_status()
        .map_err(|e| format!("query: {e}"))?
        .json()
        .await
        .map_err(|e| format!("query answer: {e}"))?;
    // An empty result: nothing visible yet.
    let Some(value) = v["data"]["result"].get(0) else {
        return Ok(0);
    };
    value["value"][1]
        .as_str()
        .and_then(|s| s.parse::<f64>().ok())
        .map(|f| f as u64)
        .ok_or_else(|| format!("unexpected query answer: {v}"))
}

/// Polls the store until all `n` samples are visible or `limit` passes without the count
/// reaching `n`. Returns (count, seconds).
async fn check_store(
    base: &str,
    run: &str,
    n: u64,
    from_ns: i64,
    to_ns: i64,
    limit: Duration,
) -> Result<(u64, f64), String> {
    let http = reqwest::Client::new();
    let started = Instant::now();
    // VictoriaMetrics: make buffered samples searchable now (404 elsewhere: harmless).
    let _ = http
        .get(format!("{base}/internal/force_flush"))
        .timeout(Duration::from_secs(30))
        .send()
        .await;
    let mut last = 0;
    loop {
        last = count_samples(&http, base, run, from_ns, to_ns)
            .await
            .or_else(|e| if last > 0 { Ok(last) } else { Err(e) })?;
        if last >= n || started.elapsed() >= limit {
            return Ok((last, started.elapsed().as_secs_f64()));
        }
        progress(&format!(
            "waiting for the store: {last}/{n} samples of telemetry_{CHECK_FIELD} visible"
        ));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs the ship benchmark.
pub async fn run(args: &BenchArgs) -> Result<ShipReport, String> {
    let s = &args.ship;
    let url = s
        .ship_to
        .clone()
        .ok_or("--ship-to URL is needed")?
        .trim_end_matches('/')
        .to_string();
    let n = args.count;
    if n == 0 || s.ship_batch == 0 || s.ship_in_flight == 0 {
        return Err("--count, --ship-batch and --ship-in-flight must be at least 1".into());
    }
    let run = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
    let dir = std::env::temp_dir().join(format!("didhub-bench-ship-{run}"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = run_in_dir(args, &url, &dir.join("didhub.db"), &run).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in_dir(
    args: &BenchArgs,
    url: &str,
    db: &Path,
    run: &str,
) -> Result<ShipReport, String> {
    let s = &args.ship;
    let n = args.count;
    let devices = args.devices.max(1);
    let url = url.to_string();
    // In the past, so that the whole run sits before "now" in the store.
    let start_ns =
        (crate::now_ns() - n as i64 * 1_000_000 - 60_000_000_000) / 1_000_000 * 1_000_000;
    let end_ns = start_ns + (n as i64 - 1) * 1_000_000;

    let started = Instant::now();
    let (db2, run2) = (db.to_path_buf(), run.to_string());
    let (mean_payload_bytes, mean_line_bytes) =
        tokio::task::spawn_blocking(move || fill(&db2, n, devices, &run2, start_ns))
            .await
            .map_err(|e| e.to_string())??;
    let fill_secs = started.elapsed().as_secs_f64();

    let stats = Arc::new(ShipStats::default());
    let conn = store::open(db).map_err(|e| e.to_string())?;
    let (rows, bytes) = store::outbox_size(&conn).map_err(|e| e.to_string())?;
    stats.added(rows, bytes);
    let shipper = Shipper {
        http: reqwest::Client::builder()
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?,
        cfg: InfluxConfig {
            url: url.clone(),
            organization: "bench".into(),
            bucket: "bench".into(),
            token: None,
            token_file: None,
            batch_size: s.ship_batch,
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
            content_encoding: s.ship_encoding,
            requests_in_flight: s.ship_in_flight,
        },
        token: Secret::default(),
        conn: Arc::new(Mutex::new(conn)),
        notify: Arc::new(tokio::sync::Notify::new()),
        stats: stats.clone(),
    };
    eprintln!(
        "shipping {n} points to {url}/api/v2/write, {} lines per request, {} in flight, {}",
        s.ship_batch,
        s.ship_in_flight,
        s.ship_encoding.as_str()
    );

    let store_pid = s.ship_store_pid.map(|p| p.to_string());
    let store_cpu_before = store_pid.as_deref().and_then(proc_cpu_secs);
    let load_before = load_average();
    let cpu_before = proc_cpu_secs("self").unwrap_or(0.0);
    let started = Instant::now();
    shipper.flush().await;
    let wall_secs = started.elapsed().as_secs_f64();
    let cpu_secs = proc_cpu_secs("self").unwrap_or(0.0) - cpu_before;
    let store_cpu_secs = match (
        store_pid.as_deref().and_then(proc_cpu_secs),
        store_cpu_before,
    ) {
        (Some(after), Some(before)) => Some(after - before),
        _ => None,
    };
    let load_after = load_average();
    let outbox_left = {
        let c = shipper.conn.lock().unwrap_or_else(|e| e.into_inner());
        store::outbox_len(&c).map_err(|e| e.to_string())?
    };

    let shipped = stats.shipped.load(Ordering::Relaxed);
    let requests = stats.requests.load(Ordering::Relaxed);
    let bytes_raw = stats.body_bytes_raw.load(Ordering::Relaxed);
    let bytes_sent = stats.body_bytes_sent.load(Ordering::Relaxed);
    let request_secs = stats.request_ns.load(Ordering::Relaxed) as f64 / 1e9;

    let (mut arrived, mut check_secs, mut check_error) = (None, None, None);
    if s.ship_check_secs > 0 {
        match check_store(
            &url,
            run,
            shipped,
            start_ns,
            end_ns,
            Duration::from_secs(s.ship_check_secs),
        )
        .await
        {
            Ok((count, secs)) => {
                eprintln!();
                arrived = Some(count);
                check_secs = Some(secs);
            }
            Err(e) => check_error = Some(e),
        }
    }

    Ok(ShipReport {
        url,
        content_encoding: s.ship_encoding.as_str().into(),
        batch_size: s.ship_batch,
        requests_in_flight: s.ship_in_flight,
        points: n,
        devices,
        numeric_fields: 8,
        mean_payload_bytes,
        mean_line_bytes,
        fill_secs,
        shipped,
        outbox_left,
        requests,
        errors: stats.errors.load(Ordering::Relaxed),
        wall_secs,
        points_per_sec: shipped as f64 / wall_secs.max(1e-9),
        raw_mb_per_sec: bytes_raw as f64 / 1e6 / wall_secs.max(1e-9),
        cpu_secs,
        cpu_us_per_point: cpu_secs * 1e6 / shipped.max(1) as f64,
        request_share: request_secs / wall_secs.max(1e-9),
        mean_request_ms: request_secs * 1e3 / requests.max(1) as f64,
        store_cpu_secs,
        bytes_raw,
        bytes_sent,
        compression_ratio: bytes_raw as f64 / bytes_sent.max(1) as f64,
        arrived,
        checked_field: format!("telemetry_{CHECK_FIELD}"),
        check_secs,
        check_error,
        load_before,
        load_after,
    })
}

/// The report for people.
pub fn render_table(r: &ShipReport) -> String {
    let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
    let rows: Vec<(&str, String)> = vec![
        (
            "ship to",
            format!(
                "{}/api/v2/write, {} lines/request, {} in flight, {}",
                r.url, r.batch_size, r.requests_in_flight, r.content_encoding
            ),
        ),
        (
            "points",
            format!(
                "{} from {} devices, {} numeric fields + thid; {:.0} B JSON → {:.0} B line",
                r.points, r.devices, r.numeric_fields, r.mean_payload_bytes, r.mean_line_bytes
            ),
        ),
        ("outbox fill", format!("{:.2} s (not timed)", r.fill_secs)),
        (
            "shipped",
            format!(
                "{} in {} requests ({} failed), {} left in the outbox",
                r.shipped, r.requests, r.errors, r.outbox_left
            ),
        ),
        (
            "throughput",
            format!(
                "{:.0} points/s ({:.2} s wall, {:.1} MB/s of line protocol)",
                r.points_per_sec, r.wall_secs, r.raw_mb_per_sec
            ),
        ),
        (
            "shipper CPU",
            format!(
                "{:.2} s, {:.2} µs/point, {:.2} cores busy",
                r.cpu_secs,
                r.cpu_us_per_point,
                r.cpu_secs / r.wall_secs.max(1e-9)
            ),
        ),
        (
            "store CPU",
            match r.store_cpu_secs {
                Some(s) => format!(
                    "{s:.2} s, {:.2} µs/point, {:.2} cores busy",
                    s * 1e6 / r.shipped.max(1) as f64,
                    s / r.wall_secs.max(1e-9)
                ),
                None => "- (pass --ship-store-pid)".into(),
            },
        ),
        (
            "requests",
            format!(
                "{:.1} ms mean round trip, {:.0}% of the wall time",
                r.mean_request_ms,
                r.request_share * 100.0
            ),
        ),
        (
            "bytes",
            format!(
                "{} line protocol → {} sent ({:.1}×)",
                mb(r.bytes_raw),
                mb(r.bytes_sent),
                r.compression_ratio
            ),
        ),
        (
            "in the store",
            match (r.arrived, &r.check_error) {
                (Some(a), _) => format!(
                    "{a} of {} samples of {} ({}, {:.1} s after the drain)",
                    r.shipped,
                    r.checked_field,
                    if a == r.shipped { "all" } else { "NOT all" },
                    r.check_secs.unwrap_or(0.0)
                ),
                (None, Some(e)) => format!("cannot check: {e}"),
                (None, None) => "- (not checked)".into(),
            },
        ),
        ("load", format!("{} → {}", r.load_before, r.load_after)),
    ];
    crate::bench::align_rows(&rows)
}

/// `didhub bench --ship-to URL`: runs, prints, and fails when points were not all shipped or
/// did not all arrive.
pub async fn main(args: &BenchArgs) -> Result<(), String> {
    let r = run(args).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", render_table(&r));
    }
    if r.outbox_left > 0 || r.shipped < r.points as u64 {
        return Err(format!(
            "{} of {} points shipped; {} left in the outbox",
            r.shipped, r.points, r.outbox_left
        ));
    }
    if r.arrived.is_some_and(|a| a != r.shipped) {
        return Err("the store does not hold every shipped point exactly once (see above)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_have_eight_numeric_fields_and_lines_look_real() {
        let p = payload(123);
        let o = p.as_object().unwrap();
        assert_eq!(o.len(), 8);
        assert!(o.values().all(Value::is_number));
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        let (json_bytes, line_bytes) = fill(&db, 250, 10, "r1", 1_000_000_000).unwrap();
        assert!((100.0..300.0).contains(&json_bytes), "{json_bytes}");
        assert!(line_bytes > json_bytes, "{line_bytes}");
        let c = store::open(&db).unwrap();
        let rows = store::outbox_batch(&c, 1000).unwrap();
        assert_eq!(rows.len(), 250);
        let first = &rows[0].1;
        assert!(
            first.starts_with("telemetry,device=bench-0,did=did:key:")
                && first.contains(",run=r1 "),
            "{first}"
        );
        assert!(first.ends_with(" 1000000000"), "{first}");
        assert!(rows[1].1.ends_with(" 1001000000"), "{}", rows[1].1);
    }

    #[test]
    fn encodings_parse() {
        assert_eq!(parse_encoding("gzip"), Ok(ContentEncoding::Gzip));
        assert_eq!(parse_encoding("identity"), Ok(ContentEncoding::Identity));
        assert!(parse_encoding("br").is_err());
    }
}
