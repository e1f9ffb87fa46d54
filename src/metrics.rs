//! Prometheus metrics and readiness, read at scrape time from the counters the stages already
//! keep (the atomics in [`Stats`], [`ShipStats`] and [`Link`] stay the source of truth; only
//! the histograms live here).
//!
//! Every name is a constant below; the text encoder appends `_total` to counters, so
//! [`RECEIVED`] is scraped as `didhub_received_total`. Labels are bounded by construction: a
//! problem-report code (`code`, one of nine) or an HTTP status number or `connect` (`status`).
//! Never a DID or a topic.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::config::StoreKind;
use crate::mqtt::Link;
use crate::pipeline::{Shared, Stats};
use crate::ship::ShipStats;
use crate::verify::Code;

/// Messages received from the broker (counter).
pub const RECEIVED: &str = "didhub_received";
/// Messages whose points were committed (counter).
pub const ACCEPTED: &str = "didhub_accepted";
/// Points committed (counter).
pub const POINTS: &str = "didhub_points";
/// Redeliveries acknowledged and dropped (counter).
pub const DUPLICATES: &str = "didhub_duplicates";
/// Messages on no route or on the hub's own report topics (counter).
pub const IGNORED: &str = "didhub_ignored";
/// Rejections, label `code` (counter).
pub const REJECTED: &str = "didhub_rejected";
/// Problem reports published (counter).
pub const REPORTS_SENT: &str = "didhub_reports_sent";
/// Problem reports not sent: rate limit or full queue (counter).
pub const REPORTS_SUPPRESSED: &str = "didhub_reports_suppressed";
/// Seconds spent verifying one message (histogram).
pub const VERIFY_SECONDS: &str = "didhub_verify_seconds";
/// Messages per SQLite transaction (histogram).
pub const COMMIT_BATCH_SIZE: &str = "didhub_commit_batch_size";
/// Messages a verify worker took off the queue together (histogram).
pub const VERIFY_BATCH_SIZE: &str = "didhub_verify_batch_size";
/// Rows waiting in the outbox for InfluxDB (gauge).
pub const OUTBOX_ROWS: &str = "didhub_outbox_rows";
/// Bytes of line protocol waiting in the outbox (gauge).
pub const OUTBOX_BYTES: &str = "didhub_outbox_bytes";
/// 1 while the outbox is at `outbox.max_bytes` and acknowledging has stopped (gauge).
pub const OUTBOX_FULL: &str = "didhub_outbox_full";
/// Points InfluxDB accepted (counter).
pub const SHIPPED_POINTS: &str = "didhub_shipped_points";
/// Points InfluxDB refused for good, moved to dead letters (counter).
pub const DEAD_LETTERS: &str = "didhub_dead_letters";
/// Seconds per InfluxDB write request (histogram).
pub const SHIP_SECONDS: &str = "didhub_ship_seconds";
/// Failed InfluxDB write requests, label `status` (counter).
pub const SHIP_ERRORS: &str = "didhub_ship_errors";
/// Reconnects to the broker (counter).
pub const MQTT_RECONNECTS: &str = "didhub_mqtt_reconnects";
/// 1 while connected to the broker (gauge).
pub const MQTT_CONNECTED: &str = "didhub_mqtt_connected";
/// DID documents served from the resolver cache (counter).
pub const DID_CACHE_HITS: &str = "didhub_did_cache_hits";
/// DID documents decoded because they were not cached (counter).
pub const DID_CACHE_MISSES: &str = "didhub_did_cache_misses";
/// Counter: device keys served already parsed (the signed and authcrypt fast paths).
pub const KEY_CACHE_HITS: &str = "didhub_key_cache_hits";
/// Counter: device keys looked up in a DID document and parsed.
pub const KEY_CACHE_MISSES: &str = "didhub_key_cache_misses";

/// Latency buckets, 50 µs to 30 s: verification is sub-millisecond to a few ms, writes to
/// InfluxDB milliseconds to the 30 s request timeout.
const SECONDS_BUCKETS: [f64; 18] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Batch size buckets, 1 to 4096 (`store.max_batch` defaults to 1024).
const SIZE_BUCKETS: [f64; 13] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// A histogram of durations in seconds.
#[derive(Debug, Clone)]
pub struct SecondsHistogram(Histogram);

impl Default for SecondsHistogram {
    fn default() -> Self {
        SecondsHistogram(Histogram::new(SECONDS_BUCKETS))
    }
}

impl SecondsHistogram {
    /// Records one duration.
    pub fn observe(&self, d: std::time::Duration) {
        self.0.observe(d.as_secs_f64());
    }
}

/// A histogram of sizes (counts of things), which also tells its mean in process (the
/// Prometheus histogram only exports it).
#[derive(Debug, Clone)]
pub struct SizeHistogram {
    hist: Histogram,
    /// Observations, and their sum.
    count_sum: Arc<(AtomicU64, AtomicU64)>,
}

impl Default for SizeHistogram {
    fn default() -> Self {
        SizeHistogram {
            hist: Histogram::new(SIZE_BUCKETS),
            count_sum: Arc::default(),
        }
    }
}

impl SizeHistogram {
    /// Records one size.
    pub fn observe(&self, n: usize) {
        self.hist.observe(n as f64);
        self.count_sum.0.fetch_add(1, Ordering::Relaxed);
        self.count_sum.1.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// How many sizes were observed.
    pub fn count(&self) -> u64 {
        self.count_sum.0.load(Ordering::Relaxed)
    }

    /// The mean of the sizes observed (0 before the first).
    pub fn mean(&self) -> f64 {
        self.count_sum.1.load(Ordering::Relaxed) as f64 / self.count().max(1) as f64
    }
}

/// Failures counted by HTTP status (or `connect` when no answer came): a bounded label.
#[derive(Debug, Clone, Default)]
pub struct ErrorsByStatus(Family<[(&'static str, String); 1], Counter>);

impl ErrorsByStatus {
    /// Counts a failed request answered with `status`.
    pub fn http(&self, status: u16) {
        self.0
            .get_or_create(&[("status", status.to_string())])
            .inc();
    }

    /// Counts a request that got no answer (refused, reset, timed out).
    pub fn connect(&self) {
        self.0.get_or_create(&[("status", "connect".into())]).inc();
    }
}

/// What the metrics, readiness and systemd status read.
#[derive(Clone)]
pub struct Sources {
    /// Pipeline counters.
    pub stats: Arc<Stats>,
    /// Shipper counters and outbox gauges.
    pub ship: Arc<ShipStats>,
    /// Broker link.
    pub link: Arc<Link>,
    /// For the DID resolver's cache counters.
    pub shared: Arc<Shared>,
    /// Set by the committer while the outbox is at its budget.
    pub outbox_full: Arc<AtomicBool>,
    /// Set once shutdown begins.
    pub stopping: Arc<AtomicBool>,
    /// Which store.
    pub store: StoreKind,
    /// The broker URL, for messages.
    pub broker: String,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources")
            .field("store", &self.store)
            .field("broker", &self.broker)
            .finish_non_exhaustive()
    }
}

/// Why the hub is not ready, from plain flags (pure, for tests).
pub fn not_ready_reasons(
    stopping: bool,
    broker_connected: bool,
    broker: &str,
    store: StoreKind,
    store_ok: bool,
    outbox_full: bool,
) -> Vec<String> {
    let mut why = Vec::new();
    if stopping {
        why.push("stopping".to_string());
    }
    if !broker_connected {
        why.push(format!("broker not connected ({broker})"));
    }
    if store == StoreKind::Influxdb && !store_ok {
        why.push(
            "store not reachable: InfluxDB did not accept the last write (points wait in the outbox)"
                .to_string(),
        );
    }
    if outbox_full {
        why.push(
            "outbox at its budget (outbox.max_bytes): new messages are not acknowledged"
                .to_string(),
        );
    }
    why
}

impl Sources {
    /// `Ok` when ready; otherwise every reason, joined.
    pub fn readiness(&self) -> Result<(), String> {
        let why = not_ready_reasons(
            self.stopping.load(Ordering::Relaxed),
            self.link.connected.load(Ordering::Relaxed),
            &self.broker,
            self.store,
            self.ship.store_ok.load(Ordering::Relaxed),
            self.outbox_full.load(Ordering::Relaxed),
        );
        if why.is_empty() {
            Ok(())
        } else {
            Err(why.join("; "))
        }
    }

    /// A registry with the histograms and a collector that reads the counters at scrape time.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::default();
        r.register(
            VERIFY_SECONDS,
            "Seconds spent verifying one message (messages verified together in one batch each count the batch's mean)",
            self.stats.verify_seconds.0.clone(),
        );
        r.register(
            VERIFY_BATCH_SIZE,
            "Messages a verify worker took off the queue and verified together",
            self.stats.verify_batch_size.hist.clone(),
        );
        r.register(
            COMMIT_BATCH_SIZE,
            "Messages committed in one SQLite transaction",
            self.stats.commit_batch_size.hist.clone(),
        );
        r.register(
            SHIP_SECONDS,
            "Seconds per InfluxDB write request",
            self.ship.ship_seconds.0.clone(),
        );
        r.register(
            SHIP_ERRORS,
            "Failed InfluxDB write requests by HTTP status, or connect when none came",
            self.ship.ship_errors.0.clone(),
        );
        r.register_collector(Box::new(Scrape(self.clone())));
        r
    }
}

/// Renders a registry in the Prometheus text format (0.0.4).
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, registry);
    out
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Reads the atomics on each scrape.
#[derive(Debug)]
struct Scrape(Sources);

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let st = &s.stats;
        counter(
            &mut e,
            RECEIVED,
            "Messages received from the broker.",
            l(&st.received),
        )?;
        counter(
            &mut e,
            ACCEPTED,
            "Messages whose points were committed.",
            l(&st.accepted),
        )?;
        counter(&mut e, POINTS, "Points committed.", l(&st.points))?;
        counter(
            &mut e,
            DUPLICATES,
            "Redeliveries acknowledged and dropped.",
            l(&st.duplicates),
        )?;
        counter(
            &mut e,
            IGNORED,
            "Messages on no route or on the hub's own report topics.",
            l(&st.ignored),
        )?;
        {
            let mut m = e.encode_descriptor(
                REJECTED,
                "Messages rejected, by problem-report code.",
                None,
                MetricType::Counter,
            )?;
            for code in Code::ALL {
                let labels = [("code", code.as_str())];
                ConstCounter::new(st.rejected_of(code)).encode(m.encode_family(&labels)?)?;
            }
        }
        counter(
            &mut e,
            REPORTS_SENT,
            "Problem reports published.",
            l(&st.reports_sent),
        )?;
        counter(
            &mut e,
            REPORTS_SUPPRESSED,
            "Problem reports not sent (rate limit or full queue).",
            l(&st.reports_suppressed),
        )?;
        let ship = &s.ship;
        gauge(
            &mut e,
            OUTBOX_ROWS,
            "Rows waiting in the outbox.",
            ship.outbox_rows.load(Ordering::Relaxed).max(0),
        )?;
        gauge(
            &mut e,
            OUTBOX_BYTES,
            "Bytes of line protocol waiting in the outbox.",
            ship.outbox_bytes.load(Ordering::Relaxed).max(0),
        )?;
        gauge(
            &mut e,
            OUTBOX_FULL,
            "1 while the outbox is at outbox.max_bytes and acknowledging has stopped.",
            i64::from(s.outbox_full.load(Ordering::Relaxed)),
        )?;
        counter(
            &mut e,
            SHIPPED_POINTS,
            "Points InfluxDB accepted.",
            l(&ship.shipped),
        )?;
        counter(
            &mut e,
            DEAD_LETTERS,
            "Points InfluxDB refused for good (dead letters).",
            l(&ship.dead),
        )?;
        counter(
            &mut e,
            MQTT_RECONNECTS,
            "Reconnects to the broker.",
            l(&s.link.reconnects),
        )?;
        gauge(
            &mut e,
            MQTT_CONNECTED,
            "1 while connected to the broker.",
            i64::from(s.link.connected.load(Ordering::Relaxed)),
        )?;
        let (hits, misses) = s.shared.verifier.resolver().cache_stats();
        counter(
            &mut e,
            DID_CACHE_HITS,
            "DID documents served from the cache.",
            hits,
        )?;
        counter(
            &mut e,
            DID_CACHE_MISSES,
            "DID documents resolved because they were not cached.",
            misses,
        )?;
        let (hits, misses, _) = s.shared.verifier.resolver().key_cache_stats();
        counter(
            &mut e,
            KEY_CACHE_HITS,
            "Device keys served already parsed (signed and authcrypt fast paths).",
            hits,
        )?;
        counter(
            &mut e,
            KEY_CACHE_MISSES,
            "Device keys looked up in a DID document and parsed.",
            misses,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> Sources {
        let cfg = crate::config::Config::from_toml(
            "[[routes]]\ntopics = [\"devices/+/telemetry\"]\n",
            "t",
            &[],
        )
        .unwrap();
        let stats = Arc::new(Stats::default());
        let id = crate::did::Identity::generate(crate::did::DidMethod::Key);
        Sources {
            stats: stats.clone(),
            ship: Arc::new(ShipStats::default()),
            link: Arc::new(Link::default()),
            shared: Arc::new(Shared::from_config(&cfg, id, stats)),
            outbox_full: Arc::new(AtomicBool::new(false)),
            stopping: Arc::new(AtomicBool::new(false)),
            store: StoreKind::Embedded,
            broker: "mqtt://127.0.0.1:1883".into(),
        }
    }

    #[test]
    fn a_size_histogram_tells_its_mean() {
        let h = SizeHistogram::default();
        assert_eq!((h.count(), h.mean()), (0, 0.0));
        h.observe(7);
        h.clone().observe(2);
        assert_eq!((h.count(), h.mean()), (2, 4.5));
    }

    #[test]
    fn renders_counters_labels_and_histograms() {
        let s = sources();
        s.stats.received.fetch_add(5, Ordering::Relaxed);
        s.stats.reject(Code::NotAuthorised);
        s.stats
            .verify_seconds
            .observe(std::time::Duration::from_millis(2));
        s.stats.commit_batch_size.observe(3);
        s.stats.verify_batch_size.observe(7);
        s.ship.ship_errors.http(429);
        s.ship.ship_errors.connect();
        s.link.connected.store(true, Ordering::Relaxed);
        let text = render(&s.registry());
        for want in [
            "didhub_received_total 5\n",
            "didhub_rejected_total{code=\"e.p.msg.trust.not-authorised\"} 1\n",
            "didhub_rejected_total{code=\"e.p.msg.trust.crypto\"} 0\n",
            "didhub_verify_seconds_count 1\n",
            "didhub_verify_seconds_bucket{le=\"0.0025\"} 1\n",
            "didhub_commit_batch_size_bucket{le=\"4\"} 1\n",
            "didhub_verify_batch_size_bucket{le=\"4\"} 0\n",
            "didhub_verify_batch_size_bucket{le=\"8\"} 1\n",
            "didhub_ship_errors_total{status=\"429\"} 1\n",
            "didhub_ship_errors_total{status=\"connect\"} 1\n",
            "didhub_mqtt_connected 1\n",
            "didhub_did_cache_hits_total 0\n",
            "# TYPE didhub_outbox_rows gauge\n",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        assert!(!text.contains("did:key"), "no DID as a label:\n{text}");
    }

    #[test]
    fn readiness_names_every_reason() {
        let s = sources();
        let e = s.readiness().unwrap_err();
        assert!(
            e.contains("broker not connected (mqtt://127.0.0.1:1883)"),
            "{e}"
        );
        s.link.connected.store(true, Ordering::Relaxed);
        assert_eq!(s.readiness(), Ok(()));
        let why = not_ready_reasons(true, true, "b", StoreKind::Influxdb, false, true);
        assert_eq!(why.len(), 3, "{why:?}");
        assert!(why[1].contains("InfluxDB") && why[2].contains("outbox.max_bytes"));
        assert!(not_ready_reasons(false, true, "b", StoreKind::Embedded, false, false).is_empty());
    }
}
