//! `didhub bench`: the benchmark harness (issue 5).
//!
//! ```text
//!  generate N posts from M devices (before timing)
//!    ├─▶ --in-process: W verify workers ─▶ committer (temp SQLite) ─▶ settled count + row count
//!    ├─▶ --broker:     K MQTT connections ─▶ broker ─▶ running hub (its /proc and its store)
//!    └─▶ bare `Message::unpack` loop on one thread: the floor of the efficiency ratio
//! ```
//!
//! CPU time comes from `/proc` (process: `utime + stime`; one thread: `schedstat`), peak RSS
//! from `VmHWM`, reset through `clear_refs` when the kernel allows it. Nothing here asserts on
//! time: it measures and prints.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::{Config, Require};
use crate::did::{DidMethod, Identity, LocalResolver, StaticSecrets};
use crate::pipeline::{self, Committer, Inbound, Shared, Stats};
use crate::store;
use crate::verify::{self, Envelope};

/// Linux reports `utime`/`stime` in `USER_HZ` ticks, 100 on every mainstream architecture.
const USER_HZ: f64 = 100.0;

/// `didhub bench` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// How many posts to generate (before timing).
    #[arg(long, short = 'n', default_value_t = 100_000)]
    pub count: usize,
    /// From how many device identities (generated in memory).
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// signed, authcrypt, anoncrypt, anoncrypt-signed, authcrypt-signed or plaintext.
    #[arg(long, default_value = "signed", value_parser = parse_mode)]
    pub mode: Envelope,
    /// DID method of the generated devices: `key` or `peer`.
    #[arg(long, default_value = "key", value_parser = parse_method)]
    pub did_method: DidMethod,
    /// Approximate size of each JSON payload, bytes.
    #[arg(long, default_value_t = 200)]
    pub payload_bytes: usize,
    /// The hub identity file the posts are addressed to (a running hub's
    /// `state_dir/identity.json`); default: a new identity in memory.
    #[arg(long)]
    pub hub_identity: Option<PathBuf>,
    /// Topic of each device; `{device}` is replaced by the device number.
    #[arg(long, default_value = "devices/bench-{device}/telemetry")]
    pub topic: String,
    /// Feed the posts straight into the hub's pipeline in this process.
    #[arg(long)]
    pub in_process: bool,
    /// Verification workers in process (default: one per core).
    #[arg(long)]
    pub workers: Option<usize>,
    /// The route's `require` in process (default: what the mode satisfies:
    /// signed → signed, authcrypt → authcrypt, authcrypt-signed → authenticated,
    /// anoncrypt-signed → signed, anoncrypt and plaintext → any).
    #[arg(long, value_parser = parse_require)]
    pub require: Option<Require>,
    /// `store.max_batch` in process.
    #[arg(long, default_value_t = 1024)]
    pub max_batch: usize,
    /// In process: how long the committer lets a batch gather under load, ms
    /// (the hub uses `pipeline::COMMIT_LINGER`).
    #[arg(long, default_value_t = crate::pipeline::COMMIT_LINGER.as_secs_f64() * 1e3)]
    pub linger_ms: f64,
    /// In process: `pipeline.verify_linger`, ms (how long a verify worker may wait for a batch
    /// to grow at moderate rates; 0: never).
    #[arg(long, default_value_t = 1.0)]
    pub verify_linger_ms: f64,
    /// Message ids at random (`{prefix}-{UUIDv4}-{index}`) instead of in order
    /// (`{prefix}-{index:09}`, increasing like UUIDv7 or ULID ids).
    #[arg(long, conflicts_with = "id_clock_skew_ms")]
    pub random_ids: bool,
    /// Message ids ordered by each device's clock, as UUIDv7 ids are, with the devices' clocks
    /// up to ±this many ms apart (`{prefix}-{device time, µs}-{index}`; the device time is when
    /// the post is due at `--rate`, default 10k/s, plus its device's fixed offset).
    #[arg(long)]
    pub id_clock_skew_ms: Option<f64>,
    /// `pipeline.queue` in process.
    #[arg(long, default_value_t = 1024)]
    pub queue: usize,
    /// In process: send every post through `Message::unpack`, without the hub's fast paths
    /// (signed, authcrypt, plaintext; to measure what they save).
    #[arg(long)]
    pub no_fast_path: bool,
    /// In process: check each signature alone (`verify_strict`), not in batches.
    #[arg(long)]
    pub no_batch_verify: bool,
    /// At most this many posts in the bare `Message::unpack` loop (0: skip it).
    #[arg(long, default_value_t = 50_000)]
    pub bare_limit: usize,
    /// End to end: publish to this broker (`mqtt://host:port`) that a running hub reads.
    #[arg(long)]
    pub broker: Option<String>,
    /// MQTT connections to publish on.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Posts per second (default: as fast as possible). End to end, over all connections, due
    /// at even intervals (the timer's 1 ms ticks send them in small bursts); in process, at
    /// random intervals (Poisson arrivals, as from many independent devices).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Unacknowledged QoS 1 publishes per connection.
    #[arg(long, default_value_t = 256)]
    pub inflight: u16,
    /// The hub's PID: its CPU seconds and peak RSS are read from /proc.
    #[arg(long)]
    pub hub_pid: Option<u32>,
    /// The hub's `/metrics` URL: its DID-document and signer-key cache hit rates and commit
    /// batch sizes are read from it after the run.
    #[arg(long)]
    pub hub_metrics: Option<String>,
    /// The hub's SQLite store (read-only): commit latency and the exactly-once check.
    #[arg(long)]
    pub hub_db: Option<PathBuf>,
    /// How often the hub's store is polled for new rows, milliseconds.
    #[arg(long, default_value_t = 2)]
    pub commit_poll_ms: u64,
    /// Give up waiting for acks and commits after this long without progress, seconds.
    #[arg(long, default_value_t = 30)]
    pub stall_secs: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The ship benchmark (`--ship-to URL`, in `bench_ship`).
    #[command(flatten)]
    pub ship: crate::bench_ship::ShipArgs,
}

fn parse_mode(s: &str) -> Result<Envelope, String> {
    Envelope::parse(s).ok_or_else(|| {
        format!("`{s}`: use signed, authcrypt, anoncrypt, anoncrypt-signed, authcrypt-signed or plaintext")
    })
}

fn parse_method(s: &str) -> Result<DidMethod, String> {
    match s {
        "key" => Ok(DidMethod::Key),
        "peer" => Ok(DidMethod::Peer),
        _ => Err(format!("`{s}`: use `key` or `peer`")),
    }
}

fn parse_require(s: &str) -> Result<Require, String> {
    match s {
        "signed" => Ok(Require::Signed),
        "authcrypt" => Ok(Require::Authcrypt),
        "authenticated" => Ok(Require::Authenticated),
        "any" => Ok(Require::Any),
        _ => Err(format!(
            "`{s}`: use signed, authcrypt, authenticated or any"
        )),
    }
}

fn require_str(r: Require) -> &'static str {
    match r {
        Require::Signed => "signed",
        Require::Authcrypt => "authcrypt",
        Require::Authenticated => "authenticated",
        Require::Any => "any",
    }
}

/// The weakest `require` a mode satisfies.
pub fn default_require(mode: Envelope) -> Require {
    match mode {
        Envelope::Signed | Envelope::AnoncryptSigned => Require::Signed,
        Envelope::Authcrypt => Require::Authcrypt,
        Envelope::AuthcryptSigned => Require::Authenticated,
        Envelope::Anoncrypt | Envelope::Plaintext => Require::Any,
    }
}

// ---------------------------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------------------------

/// CPU seconds (user + system) of a process, `"self"` or a PID.
pub fn proc_cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: count fields after the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is f[0]; utime is field 14, stime field 15.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// A `kB` line of `/proc/<pid>/status` (`VmHWM`, `VmRSS`).
pub fn proc_status_kb(pid: &str, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Resets the peak RSS (`VmHWM`) of a process; false when the kernel refuses.
pub fn reset_peak_rss(pid: &str) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// CPU time of the calling thread, ns (`schedstat`; `stat` ticks when that is missing).
pub fn thread_cpu_ns() -> u64 {
    if let Some(ns) = std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
    {
        return ns;
    }
    proc_cpu_secs("thread-self")
        .map(|s| (s * 1e9) as u64)
        .unwrap_or(0)
}

/// CPU time so far of this process's live threads, ns, in three groups by thread name:
/// `(verify-*, committer, everything else)`.
pub fn thread_cpu_groups() -> (u64, u64, u64) {
    let (mut verify, mut committer, mut other) = (0, 0, 0);
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return (0, 0, 0);
    };
    for t in tasks.flatten() {
        let dir = t.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let ns: u64 = std::fs::read_to_string(dir.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        match name.trim() {
            n if n.starts_with("verify-") => verify += ns,
            "committer" => committer += ns,
            _ => other += ns,
        }
    }
    (verify, committer, other)
}

/// The 1-minute load average.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| {
            let f: Vec<&str> = s.split_whitespace().take(3).collect();
            (f.len() == 3).then(|| f.join(" "))
        })
        .unwrap_or_else(|| "?".into())
}

// ---------------------------------------------------------------------------------------------
// The corpus
// ---------------------------------------------------------------------------------------------

/// One generated post.
#[derive(Debug, Clone)]
pub struct Post {
    /// Which device sent it (index into the topics).
    pub device: usize,
    /// The packed message.
    pub body: Bytes,
}

/// Posts generated before timing.
#[derive(Debug)]
pub struct Corpus {
    /// Message ids are `{prefix}-{index:09}` (`{prefix}-{UUIDv4}-{index}` with `--random-ids`,
    /// `{prefix}-{device time µs:016}-{index}` with `--id-clock-skew-ms`): unique to this run.
    pub prefix: String,
    /// The posts, in publish order.
    pub posts: Vec<Post>,
    /// One topic per device.
    pub topics: Vec<String>,
    /// The hub they are addressed to (its secrets decrypt in the bare loop).
    pub hub: Identity,
    /// Total packed bytes.
    pub bytes: usize,
    /// Generation wall time.
    pub gen_secs: f64,
}

/// A ~`bytes`-byte telemetry payload (JSON) for post `i`.
pub fn payload(i: usize, bytes: usize) -> Value {
    let mut v = json!({
        "seq": i,
        "temperature": 18.0 + (i % 97) as f64 / 10.0,
        "humidity": 40.0 + (i % 53) as f64 / 4.0,
        "pressure": 1013.25 - (i % 17) as f64,
        "battery": 3.7 - (i % 7) as f64 / 100.0,
        "rssi": -40 - (i % 50) as i64,
        "status": "ok",
        "firmware": "1.4.2",
    });
    let len = v.to_string().len();
    // `,"note":""` is 10 bytes.
    if bytes > len + 10 {
        v["note"] = json!("x".repeat(bytes - len - 10));
    }
    v
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Device `d`'s clock offset, µs: spread evenly (by a fixed permutation) over ±`skew`.
fn clock_offset(d: usize, skew: f64) -> f64 {
    // Knuth's multiplicative hash: a fixed, well-spread fraction in [0, 1) per device.
    let u = (d as u32).wrapping_mul(2_654_435_761) as f64 / 2f64.powi(32);
    (2.0 * u - 1.0) * skew
}

/// Generates the posts on every core, with a progress line on stderr.
pub fn generate(args: &BenchArgs, hub: Identity) -> Result<Corpus, String> {
    let started = Instant::now();
    let devices: Vec<Identity> = (0..args.devices.max(1))
        .map(|_| Identity::generate(args.did_method))
        .collect();
    let topics: Vec<String> = (0..devices.len())
        .map(|d| args.topic.replace("{device}", &d.to_string()))
        .collect();
    let prefix = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let n = args.count;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(n.max(1));
    let done = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let now = now_secs();
    let chunk = n.div_ceil(threads);
    let mut parts: Vec<Result<Vec<Post>, String>> = Vec::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (devices, hub, prefix, done, failed) =
                    (&devices, &hub, &prefix, &done, &failed);
                let range = (t * chunk).min(n)..((t + 1) * chunk).min(n);
                let payload_bytes = args.payload_bytes;
                let random_ids = args.random_ids;
                let skew_us = args.id_clock_skew_ms.map(|ms| ms * 1e3);
                let rate = args.rate.unwrap_or(10_000.0);
                let mode = args.mode;
                s.spawn(move || -> Result<Vec<Post>, String> {
                    let mut out = Vec::with_capacity(range.len());
                    for i in range {
                        if failed.load(Ordering::Relaxed) {
                            return Err("stopped".into());
                        }
                        let device = i % devices.len();
                        let id = if random_ids {
                            // Random first, the index last (the harness reads it back).
                            format!("{prefix}-{}-{i}", uuid::Uuid::new_v4().simple())
                        } else if let Some(skew) = skew_us {
                            let at = i as f64 / rate * 1e6 + clock_offset(device, skew);
                            // Fixed width and positive, so that text order is time order.
                            format!("{prefix}-{:016}-{i}", (at + 1e12) as u64)
                        } else {
                            format!("{prefix}-{i:09}")
                        };
                        let packed = futures::executor::block_on(verify::pack_post(
                            &devices[device],
                            &hub.did,
                            &id,
                            payload(i, payload_bytes),
                            mode,
                            now,
                        ))
                        .inspect_err(|_| failed.store(true, Ordering::Relaxed))?;
                        out.push(Post {
                            device,
                            body: Bytes::from(packed.into_bytes()),
                        });
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(out)
                })
            })
            .collect();
        while handles.iter().any(|h| !h.is_finished()) {
            std::thread::sleep(Duration::from_millis(200));
            progress(&format!(
                "generating {n} {} posts from {} devices: {} ({:.1} s)",
                args.mode.as_str(),
                devices.len(),
                done.load(Ordering::Relaxed),
                started.elapsed().as_secs_f64()
            ));
        }
        parts = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a generator panicked".into()))
            })
            .collect();
    });
    let mut posts = Vec::with_capacity(n);
    for p in parts {
        posts.extend(p?);
    }
    let bytes = posts.iter().map(|p| p.body.len()).sum();
    let gen_secs = started.elapsed().as_secs_f64();
    progress_done(&format!(
        "generated {n} {} posts ({:.0} bytes each) from {} devices in {gen_secs:.1} s",
        args.mode.as_str(),
        bytes as f64 / n.max(1) as f64,
        devices.len()
    ));
    Ok(Corpus {
        prefix,
        posts,
        topics,
        hub,
        bytes,
        gen_secs,
    })
}

fn progress(line: &str) {
    use std::io::Write as _;
    eprint!("\r{line}   ");
    let _ = std::io::stderr().flush();
}

fn progress_done(line: &str) {
    eprintln!("\r{line}   ");
}

// ---------------------------------------------------------------------------------------------
// The bare unpack loop
// ---------------------------------------------------------------------------------------------

/// `Message::unpack` alone over the first posts of the corpus, on this thread.
#[derive(Debug, Clone, Serialize)]
pub struct BareReport {
    /// Posts unpacked.
    pub count: usize,
    /// Of which failed (should be 0).
    pub failed: usize,
    /// Wall time per post, µs.
    pub wall_us_per_msg: f64,
    /// Thread CPU per post, µs (the ratio's denominator).
    pub cpu_us_per_msg: f64,
    /// Posts per second on one core (by CPU time).
    pub per_core_per_sec: f64,
    /// Thread CPU per post of each run of the loop, µs: before and after the measurement. The
    /// figures above are the fastest run's (the ratio's denominator is never inflated by a busy
    /// or throttled machine).
    pub runs_cpu_us_per_msg: Vec<f64>,
}

impl BareReport {
    /// The faster of two runs, with both runs' CPU per post.
    pub fn fastest(a: BareReport, b: BareReport) -> BareReport {
        let runs = vec![a.cpu_us_per_msg, b.cpu_us_per_msg];
        let best = if b.cpu_us_per_msg < a.cpu_us_per_msg {
            b
        } else {
            a
        };
        BareReport {
            runs_cpu_us_per_msg: runs,
            ..best
        }
    }
}

/// Runs the bare loop over at most `limit` posts.
pub fn bare_unpack(corpus: &Corpus, limit: usize) -> BareReport {
    let resolver = LocalResolver::new(100_000);
    let secrets = StaticSecrets::new(std::slice::from_ref(&corpus.hub));
    let texts: Vec<&str> = corpus
        .posts
        .iter()
        .take(limit)
        .filter_map(|p| std::str::from_utf8(&p.body).ok())
        .collect();
    let cpu0 = thread_cpu_ns();
    let t0 = Instant::now();
    let failed = futures::executor::block_on(async {
        let mut failed = 0;
        for t in &texts {
            if verify::bare_unpack(t, &resolver, &secrets).await.is_err() {
                failed += 1;
            }
        }
        failed
    });
    let wall = t0.elapsed().as_secs_f64();
    let cpu = thread_cpu_ns().saturating_sub(cpu0) as f64 / 1e9;
    let n = texts.len().max(1) as f64;
    BareReport {
        count: texts.len(),
        failed,
        wall_us_per_msg: wall / n * 1e6,
        cpu_us_per_msg: cpu / n * 1e6,
        per_core_per_sec: n / cpu.max(1e-9),
        runs_cpu_us_per_msg: vec![cpu / n * 1e6],
    }
}

// ---------------------------------------------------------------------------------------------
// In process
// ---------------------------------------------------------------------------------------------

/// The in-process run.
#[derive(Debug, Clone, Serialize)]
pub struct InProcessReport {
    /// Verification workers.
    pub workers: usize,
    /// The route's `require`.
    pub require: String,
    /// Posts fed.
    pub count: usize,
    /// Posts settled (committed or rejected).
    pub settled: u64,
    /// Posts whose points were committed.
    pub accepted: u64,
    /// Rejected posts (should be 0).
    pub rejected: u64,
    /// Wall time, first feed to last settle, s.
    pub wall_secs: f64,
    /// Settled posts per second.
    pub throughput: f64,
    /// Process CPU (user + system) during the run, s.
    pub cpu_secs: f64,
    /// Process CPU per post, µs.
    pub cpu_us_per_msg: f64,
    /// Average cores busy.
    pub cores_busy: f64,
    /// Mean time inside `Verifier::verify` per post (per worker), µs.
    pub verify_us_per_msg: f64,
    /// CPU of the verify worker threads per post, µs.
    pub workers_cpu_us_per_msg: f64,
    /// CPU of the committer thread per post, µs.
    pub committer_cpu_us_per_msg: f64,
    /// Commit transactions.
    pub batches: u64,
    /// Mean posts per commit.
    pub mean_batch: f64,
    /// Posts per second fed (Poisson arrivals), or `None`: as fast as possible.
    pub rate: Option<f64>,
    /// Mean posts per verify batch.
    pub verify_batch_mean: f64,
    /// DID cache hits and misses.
    pub did_cache_hits: u64,
    /// DID cache misses.
    pub did_cache_misses: u64,
    /// Whether the fast paths were on.
    pub fast_path: bool,
    /// Whether signatures were checked in batches (the fast paths on, batching not turned off).
    pub batch_verify: bool,
    /// Parsed-key cache hits (the signed and authcrypt fast paths).
    pub key_cache_hits: u64,
    /// Parsed-key cache misses.
    pub key_cache_misses: u64,
    /// RSS before the run (the corpus is resident), kB.
    pub rss_before_kb: u64,
    /// Peak RSS of the process during the run (`VmHWM` after a reset), kB.
    pub peak_rss_kb: u64,
    /// Whether the peak was reset before the run (otherwise it includes generation).
    pub peak_rss_reset: bool,
    /// Rows of this run in the store.
    pub rows: u64,
    /// Distinct message ids among them.
    pub distinct_ids: u64,
    /// Every post committed exactly once.
    pub exactly_once: bool,
    /// Load average (1, 5, 15 min) at the start.
    pub load_before: String,
    /// Load average at the end.
    pub load_after: String,
}

fn bench_config(dir: &Path, args: &BenchArgs, workers: usize, require: Require) -> String {
    let filter = args
        .topic
        .split('/')
        .map(|l| if l.contains("{device}") { "+" } else { l })
        .collect::<Vec<_>>()
        .join("/");
    format!(
        r#"state_dir = {dir:?}
stats_interval = "0s"
[mqtt]
url = "mqtt://127.0.0.1:1"
[store]
kind = "embedded"
max_batch = {max_batch}
[pipeline]
workers = {workers}
queue = {queue}
verify_linger = "{verify_linger_us}us"
[http]
listen = ""
[[routes]]
name = "bench"
topics = [{filter:?}]
require = "{require}"
senders = "any-verified"
measurement = "bench"
"#,
        dir = dir.display().to_string(),
        max_batch = args.max_batch,
        queue = args.queue,
        verify_linger_us = (args.verify_linger_ms.max(0.0) * 1e3).round() as u64,
        require = require_str(require),
    )
}

/// Rows of this run in a store: (rows, distinct ids).
pub fn count_rows(conn: &rusqlite::Connection, prefix: &str) -> Result<(u64, u64), String> {
    // Ids are `{prefix}-…`: a range on the text compares the prefix exactly.
    conn.query_row(
        "SELECT COUNT(*), COUNT(DISTINCT msg_id) FROM points WHERE msg_id > ?1 AND msg_id < ?2",
        rusqlite::params![format!("{prefix}-"), format!("{prefix}.")],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )
    .map_err(|e| format!("counting rows: {e}"))
}

/// Feeds the corpus through verify workers and the committer into a temp store.
pub fn run_in_process(args: &BenchArgs, corpus: &Corpus) -> Result<InProcessReport, String> {
    let workers = args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let require = args.require.unwrap_or_else(|| default_require(args.mode));
    let dir = std::env::temp_dir().join(format!("didhub-{}", corpus.prefix));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = run_in_dir(args, corpus, &dir, workers, require);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in_dir(
    args: &BenchArgs,
    corpus: &Corpus,
    dir: &Path,
    workers: usize,
    require: Require,
) -> Result<InProcessReport, String> {
    let cfg = Config::from_toml(&bench_config(dir, args, workers, require), "bench", &[])
        .map_err(|e| e.to_string())?;
    let stats = Arc::new(Stats::default());
    let mut shared = Shared::from_config(&cfg, corpus.hub.clone(), stats.clone());
    shared.verifier.set_fast_path(!args.no_fast_path);
    shared.verifier.set_batch_verify(!args.no_batch_verify);
    let shared = Arc::new(shared);
    let db = cfg.db_path();
    let conn = store::open(&db).map_err(|e| format!("{}: {e}", db.display()))?;

    let (in_tx, in_rx) = flume::bounded(cfg.pipeline.queue);
    let (work_tx, work_rx) = flume::bounded(cfg.pipeline.queue);
    // Whole commit batches: a few are enough to keep the acker busy.
    let (settled_tx, settled_rx) = flume::bounded(8);
    let committer = Committer {
        conn,
        sink: shared.sink,
        max_batch: cfg.store.max_batch,
        linger: Duration::from_secs_f64(args.linger_ms.max(0.0) / 1e3),
        replay_window_ns: i64::MAX,
        shared: shared.clone(),
        outbox_notify: None,
        ship_stats: Arc::new(crate::ship::ShipStats::default()),
        outbox_max_bytes: u64::MAX,
        outbox_full: Arc::new(AtomicBool::new(false)),
        stop: Arc::new(AtomicBool::new(false)),
    };

    let load_before = load_average();
    let peak_rss_reset = reset_peak_rss("self");
    let rss_before_kb = proc_status_kb("self", "VmRSS").unwrap_or(0);
    let cpu0 = proc_cpu_secs("self").unwrap_or(0.0);
    let t0 = Instant::now();

    let worker_handles = pipeline::spawn_workers(
        workers,
        shared.clone(),
        in_rx,
        cfg.pipeline.verify_linger,
        work_tx,
    );
    let committer_handle = std::thread::Builder::new()
        .name("committer".into())
        .spawn(move || committer.run(work_rx, settled_tx))
        .map_err(|e| format!("cannot start the committer: {e}"))?;
    let mut settled = 0u64;
    let n = corpus.posts.len();
    // Held until the threads' CPU is read, so the workers and the committer are still alive.
    let keep_open = in_tx.clone();
    let threads0 = thread_cpu_groups();
    std::thread::scope(|s| {
        s.spawn(|| {
            // The ingest side: what the MQTT poll task does per message. With a rate, the
            // posts come at random intervals (exponential gaps: Poisson arrivals).
            let mut due = Instant::now();
            let mut rng = rand::thread_rng();
            for (i, p) in corpus.posts.iter().enumerate() {
                if let Some(rate) = args.rate {
                    let u: f64 = rand::Rng::gen(&mut rng);
                    due += Duration::from_secs_f64(-(1.0 - u).ln() / rate);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                let m = Inbound {
                    seq: i as u64,
                    topic: corpus.topics[p.device].clone(),
                    payload: p.body.clone(),
                    response_topic: None,
                    correlation_data: None,
                    ack: None,
                    received_ns: crate::now_ns(),
                };
                if in_tx.is_full() {
                    // As the MQTT task does: top the queue up in bursts (see
                    // `pipeline::backlogged`).
                    while pipeline::backlogged(&in_tx) {
                        std::thread::sleep(Duration::from_micros(100));
                    }
                }
                if in_tx.send(m).is_err() {
                    break;
                }
            }
            drop(in_tx);
        });
        let mut last = Instant::now();
        for batch in settled_rx.iter() {
            settled += batch.len() as u64;
            if settled as usize >= n {
                break;
            }
            if last.elapsed() >= Duration::from_millis(500) {
                last = Instant::now();
                progress(&format!(
                    "in process, {workers} worker(s): {settled}/{n} settled ({:.1} s)",
                    t0.elapsed().as_secs_f64()
                ));
            }
        }
    });
    let wall = t0.elapsed().as_secs_f64();
    let cpu = proc_cpu_secs("self").unwrap_or(0.0) - cpu0;
    let threads1 = thread_cpu_groups();
    drop(keep_open);
    let per_msg = |a: u64, b: u64| a.saturating_sub(b) as f64 / n.max(1) as f64 / 1e3;
    let workers_us = per_msg(threads1.0, threads0.0);
    let committer_us = per_msg(threads1.1, threads0.1);
    let peak_rss_kb = proc_status_kb("self", "VmHWM").unwrap_or(0);
    let load_after = load_average();
    for h in worker_handles {
        let _ = h.join();
    }
    match committer_handle.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("the committer failed: {e}")),
        Err(_) => return Err("the committer panicked".into()),
    }
    progress_done(&format!(
        "in process, {workers} worker(s): {settled}/{n} settled in {wall:.2} s"
    ));

    let check = store::open(&db).map_err(|e| e.to_string())?;
    let (rows, distinct_ids) = count_rows(&check, &corpus.prefix)?;
    let rejected: u64 = stats
        .rejected
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .sum();
    let accepted = stats.accepted.load(Ordering::Relaxed);
    let verify_count = stats.verify_count.load(Ordering::Relaxed).max(1);
    let (hits, misses) = shared.verifier.resolver().cache_stats();
    let (key_hits, key_misses, _) = shared.verifier.resolver().key_cache_stats();
    Ok(InProcessReport {
        workers,
        require: require_str(require).into(),
        count: n,
        settled,
        accepted,
        rejected,
        wall_secs: wall,
        throughput: settled as f64 / wall.max(1e-9),
        cpu_secs: cpu,
        cpu_us_per_msg: cpu / n.max(1) as f64 * 1e6,
        cores_busy: cpu / wall.max(1e-9),
        workers_cpu_us_per_msg: workers_us,
        committer_cpu_us_per_msg: committer_us,
        verify_us_per_msg: stats.verify_nanos.load(Ordering::Relaxed) as f64
            / verify_count as f64
            / 1e3,
        batches: stats.commit_batch_size.count(),
        mean_batch: stats.commit_batch_size.mean(),
        rate: args.rate,
        verify_batch_mean: stats.verify_batch_size.mean(),
        did_cache_hits: hits,
        did_cache_misses: misses,
        fast_path: !args.no_fast_path,
        // Only the signed fast path batches.
        batch_verify: !args.no_batch_verify && !args.no_fast_path,
        key_cache_hits: key_hits,
        key_cache_misses: key_misses,
        rss_before_kb,
        peak_rss_kb,
        peak_rss_reset,
        rows,
        distinct_ids,
        exactly_once: rows == n as u64 && distinct_ids == n as u64,
        load_before,
        load_after,
    })
}

// ---------------------------------------------------------------------------------------------
// End to end
// ---------------------------------------------------------------------------------------------

/// Latency percentiles, ms.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl Latency {
    fn of(mut us: Vec<u64>) -> Option<Latency> {
        if us.is_empty() {
            return None;
        }
        us.sort_unstable();
        let at = |q: f64| us[((us.len() - 1) as f64 * q).round() as usize] as f64 / 1e3;
        Some(Latency {
            count: us.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            max_ms: at(1.0),
        })
    }
}

/// The end-to-end run.
#[derive(Debug, Clone, Serialize)]
pub struct EndToEndReport {
    /// The broker.
    pub broker: String,
    /// Connections.
    pub connections: usize,
    /// The requested rate, posts/s (None: full speed).
    pub rate: Option<f64>,
    /// Posts to publish.
    pub count: usize,
    /// Published.
    pub published: u64,
    /// PUBACKs received.
    pub acked: u64,
    /// Connection errors seen.
    pub connection_errors: u64,
    /// First publish to last publish, s.
    pub publish_secs: f64,
    /// Publish rate achieved, posts/s.
    pub publish_rate: f64,
    /// First publish to last PUBACK, s.
    pub ack_secs: f64,
    /// PUBACKs per second.
    pub ack_rate: f64,
    /// Publish → PUBACK (from the broker).
    pub puback_latency: Option<Latency>,
    /// First publish to the last commit seen in the hub's store, s.
    pub commit_secs: Option<f64>,
    /// Posts committed per second (needs --hub-db).
    pub commit_rate: Option<f64>,
    /// Publish → row visible in the hub's store (resolution: the poll interval).
    pub commit_latency: Option<Latency>,
    /// Hub receive → row visible (the hub's share of it).
    pub hub_latency: Option<Latency>,
    /// Hub CPU seconds during the run (needs --hub-pid).
    pub hub_cpu_secs: Option<f64>,
    /// Hub CPU per post, µs.
    pub hub_cpu_us_per_msg: Option<f64>,
    /// Hub peak RSS (`VmHWM`), kB.
    pub hub_peak_rss_kb: Option<u64>,
    /// Whether the hub's peak was reset before the run (otherwise: since it started).
    pub hub_peak_rss_reset: bool,
    /// Largest hub RSS sampled every 100 ms, kB.
    pub hub_rss_max_sampled_kb: Option<u64>,
    /// This process's CPU during the run, s (the generator shares the machine).
    pub generator_cpu_secs: f64,
    /// Counters read from the hub's `/metrics` after the run (cumulative since the hub started).
    pub hub_metrics: Option<HubMetrics>,
    /// Rows of this run in the hub's store.
    pub rows: Option<u64>,
    /// Distinct ids among them.
    pub distinct_ids: Option<u64>,
    /// Every post in the store exactly once.
    pub exactly_once: Option<bool>,
    /// Load average at the start.
    pub load_before: String,
    /// Load average at the end.
    pub load_after: String,
}

/// Counters from the hub's `/metrics` (cumulative since it started).
#[derive(Debug, Clone, Default, Serialize)]
pub struct HubMetrics {
    /// `didhub_did_cache_hits_total`.
    pub did_cache_hits: f64,
    /// `didhub_did_cache_misses_total`.
    pub did_cache_misses: f64,
    /// `didhub_key_cache_hits_total`.
    pub key_cache_hits: f64,
    /// `didhub_key_cache_misses_total`.
    pub key_cache_misses: f64,
    /// `didhub_commit_batch_size_count`: commits.
    pub commits: f64,
    /// `didhub_commit_batch_size_sum`: messages committed.
    pub committed: f64,
    /// `didhub_verify_batch_size_count`: verify batches.
    pub verify_batches: f64,
    /// `didhub_verify_batch_size_sum`: messages verified in them.
    pub verified: f64,
}

/// Reads [`HubMetrics`] from a Prometheus text page.
pub async fn scrape_hub_metrics(url: &str) -> Result<HubMetrics, String> {
    let body = reqwest::get(url)
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| format!("{url}: {e}"))?
        .text()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let value = |name: &str| -> f64 {
        body.lines()
            .filter_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .next()
            .unwrap_or(0.0)
    };
    Ok(HubMetrics {
        did_cache_hits: value("didhub_did_cache_hits_total"),
        did_cache_misses: value("didhub_did_cache_misses_total"),
        key_cache_hits: value("didhub_key_cache_hits_total"),
        key_cache_misses: value("didhub_key_cache_misses_total"),
        commits: value("didhub_commit_batch_size_count"),
        committed: value("didhub_commit_batch_size_sum"),
        verify_batches: value("didhub_verify_batch_size_count"),
        verified: value("didhub_verify_batch_size_sum"),
    })
}

/// What one connection's poll task collected.
#[derive(Default)]
struct ConnResult {
    latencies_us: Vec<u64>,
    last_ack: Option<Instant>,
}

/// Publishes the corpus over K connections and watches the hub.
pub async fn run_end_to_end(
    args: &BenchArgs,
    corpus: Arc<Corpus>,
    broker: &str,
) -> Result<EndToEndReport, String> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

    let (host, port) = crate::config::parse_mqtt_url(broker)?;
    let k = args.connections.max(1);
    let n = corpus.posts.len();
    let acked = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    let mut polls = Vec::new();
    let mut connected = Vec::new();
    for c in 0..k {
        let mut opts = MqttOptions::new(format!("{}-{c}", corpus.prefix), host.clone(), port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_inflight(args.inflight.max(1))
            .set_max_packet_size(256 * 1024 * 1024, 256 * 1024 * 1024);
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let (conn_tx, conn_rx) = tokio::sync::watch::channel(None::<Result<(), String>>);
        let (acked, errors) = (acked.clone(), errors.clone());
        polls.push(tokio::spawn(async move {
            let mut r = ConnResult::default();
            let mut sent: HashMap<u16, Instant> = HashMap::new();
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = conn_tx.send(Some(Ok(())));
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        sent.insert(pkid, Instant::now());
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        let now = Instant::now();
                        if let Some(t) = sent.remove(&a.pkid) {
                            r.latencies_us
                                .push(now.duration_since(t).as_micros() as u64);
                        }
                        r.last_ack = Some(now);
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => return r,
                    Ok(_) => {}
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        let _ = conn_tx.send(Some(Err(e.to_string())));
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        }));
        clients.push(client);
        connected.push(conn_rx);
    }
    for rx in &mut connected {
        let r = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(r) = rx.borrow_and_update().clone() {
                    return r;
                }
                if rx.changed().await.is_err() {
                    return Err("connection task ended".to_string());
                }
            }
        })
        .await
        .map_err(|_| format!("no answer from the broker {broker} within 10 s"))?;
        r.map_err(|e| format!("cannot connect to the broker {broker}: {e}"))?;
    }

    // Watch the hub's store: each poll reads the rows committed since the last one.
    let hub_db = match &args.hub_db {
        Some(p) => Some(crate::cli::open_for_query(p)?),
        None => None,
    };
    let first_seq: i64 = match &hub_db {
        Some(c) => c
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM points", [], |r| r.get(0))
            .map_err(|e| format!("hub store: {e}"))?,
        None => 0,
    };

    let hub_pid = args.hub_pid.map(|p| p.to_string());
    let hub_cpu0 = hub_pid.as_deref().and_then(proc_cpu_secs);
    let hub_peak_rss_reset = hub_pid.as_deref().is_some_and(reset_peak_rss);
    let load_before = load_average();
    let gen_cpu0 = proc_cpu_secs("self").unwrap_or(0.0);
    let start = Instant::now();
    let start_epoch_ns = crate::now_ns();
    let stop = Arc::new(AtomicBool::new(false));

    // Commit watcher (a blocking thread: SQLite).
    let committed = Arc::new(AtomicU64::new(0));
    let watcher = hub_db.map(|conn| {
        let (prefix, stop, committed) = (corpus.prefix.clone(), stop.clone(), committed.clone());
        let poll = Duration::from_millis(args.commit_poll_ms.max(1));
        tokio::task::spawn_blocking(move || -> Result<Vec<(usize, u64, i64)>, String> {
            let mut seen = Vec::with_capacity(n);
            let mut last = first_seq;
            let mut stmt = conn
                .prepare("SELECT seq, msg_id, ts_ns FROM points WHERE seq > ?1 ORDER BY seq")
                .map_err(|e| e.to_string())?;
            loop {
                let finished = stop.load(Ordering::Relaxed);
                let at = start.elapsed().as_micros() as u64;
                let rows = stmt
                    .query_map([last], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                        ))
                    })
                    .map_err(|e| e.to_string())?;
                for row in rows {
                    let (seq, id, ts) = row.map_err(|e| e.to_string())?;
                    last = last.max(seq);
                    let index = id
                        .strip_prefix(prefix.as_str())
                        .and_then(|r| r.strip_prefix('-'))
                        .and_then(|r| r.rsplit('-').next())
                        .and_then(|i| i.parse::<usize>().ok());
                    if let Some(i) = index {
                        seen.push((i, at, ts));
                        committed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if finished {
                    return Ok(seen);
                }
                std::thread::sleep(poll);
            }
        })
    });

    // Hub RSS sampler.
    let rss_max = Arc::new(AtomicU64::new(0));
    let sampler = hub_pid.clone().map(|pid| {
        let (stop, rss_max) = (stop.clone(), rss_max.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Some(kb) = proc_status_kb(&pid, "VmRSS") {
                    rss_max.fetch_max(kb, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });

    // Publishers: post i goes on connection i % K, due at i / rate.
    let published = Arc::new(AtomicU64::new(0));
    let publish_times: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(vec![0; n]));
    let mut publishers = Vec::new();
    for (c, client) in clients.iter().enumerate() {
        let (client, corpus, published, times) = (
            client.clone(),
            corpus.clone(),
            published.clone(),
            publish_times.clone(),
        );
        let rate = args.rate;
        publishers.push(tokio::spawn(async move {
            let mut mine = Vec::with_capacity(n / k + 1);
            for i in (c..n).step_by(k) {
                if let Some(rate) = rate {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let p = &corpus.posts[i];
                mine.push((i, start.elapsed().as_micros() as u64));
                client
                    .publish_bytes(
                        corpus.topics[p.device].clone(),
                        QoS::AtLeastOnce,
                        false,
                        p.body.clone(),
                    )
                    .await
                    .map_err(|e| format!("publish failed: {e}"))?;
                published.fetch_add(1, Ordering::Relaxed);
            }
            let mut t = times.lock().unwrap_or_else(|e| e.into_inner());
            for (i, at) in mine {
                t[i] = at;
            }
            Ok::<(), String>(())
        }));
    }

    // Progress, and the end: everything acked (and committed), or no progress for a while.
    let stall = Duration::from_secs(args.stall_secs.max(1));
    let mut last_change = Instant::now();
    let mut last_counts = (0, 0, 0);
    let watching = watcher.is_some();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let counts = (
            published.load(Ordering::Relaxed),
            acked.load(Ordering::Relaxed),
            committed.load(Ordering::Relaxed),
        );
        if counts != last_counts {
            last_counts = counts;
            last_change = Instant::now();
        }
        progress(&format!(
            "end to end: published {}  acked {}  committed {}  of {n} ({:.1} s)",
            counts.0,
            counts.1,
            if watching {
                counts.2.to_string()
            } else {
                "-".into()
            },
            start.elapsed().as_secs_f64()
        ));
        let all =
            counts.0 >= n as u64 && counts.1 >= n as u64 && (!watching || counts.2 >= n as u64);
        if all || last_change.elapsed() >= stall {
            break;
        }
    }
    let end = start.elapsed();
    let hub_cpu = hub_pid
        .as_deref()
        .and_then(proc_cpu_secs)
        .zip(hub_cpu0)
        .map(|(b, a)| b - a);
    let hub_peak = hub_pid.as_deref().and_then(|p| proc_status_kb(p, "VmHWM"));
    let gen_cpu = proc_cpu_secs("self").unwrap_or(0.0) - gen_cpu0;
    let load_after = load_average();
    stop.store(true, Ordering::Relaxed);
    progress_done(&format!(
        "end to end: published {}  acked {}  committed {}  of {n} ({:.1} s)",
        last_counts.0,
        last_counts.1,
        if watching {
            last_counts.2.to_string()
        } else {
            "-".into()
        },
        end.as_secs_f64()
    ));

    for p in publishers {
        match p.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(format!("a publisher failed: {e}")),
        }
    }
    for c in &clients {
        let _ = c.disconnect().await;
    }
    let mut latencies = Vec::with_capacity(n);
    let mut last_ack: Option<Instant> = None;
    for p in polls {
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(5), p).await {
            latencies.extend(r.latencies_us);
            last_ack = last_ack.max(r.last_ack);
        }
    }
    if let Some(s) = sampler {
        let _ = s.await;
    }
    let times = publish_times
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let publish_secs = times.iter().max().copied().unwrap_or(0) as f64 / 1e6;
    let published = published.load(Ordering::Relaxed);
    let acked = acked.load(Ordering::Relaxed);
    let ack_secs = last_ack
        .map(|t| t.duration_since(start).as_secs_f64())
        .unwrap_or(end.as_secs_f64());

    let mut commit_secs = None;
    let mut commit_latency = None;
    let mut hub_latency = None;
    let (mut rows, mut distinct_ids) = (None, None);
    if let Some(w) = watcher {
        let seen = w.await.map_err(|e| e.to_string())??;
        commit_secs = seen.iter().map(|s| s.1).max().map(|us| us as f64 / 1e6);
        commit_latency = Latency::of(
            seen.iter()
                .filter(|(i, _, _)| *i < n)
                .map(|(i, at, _)| at.saturating_sub(times[*i]))
                .collect(),
        );
        hub_latency = Latency::of(
            seen.iter()
                .map(|(_, at, ts)| {
                    let received_us = (ts - start_epoch_ns).max(0) as u64 / 1000;
                    at.saturating_sub(received_us)
                })
                .collect(),
        );
        if let Some(p) = &args.hub_db {
            let c = crate::cli::open_for_query(p)?;
            let (r, d) = count_rows(&c, &corpus.prefix)?;
            rows = Some(r);
            distinct_ids = Some(d);
        }
    }
    Ok(EndToEndReport {
        broker: broker.to_string(),
        connections: k,
        rate: args.rate,
        count: n,
        published,
        acked,
        connection_errors: errors.load(Ordering::Relaxed),
        publish_secs,
        publish_rate: published as f64 / publish_secs.max(1e-9),
        ack_secs,
        ack_rate: acked as f64 / ack_secs.max(1e-9),
        puback_latency: Latency::of(latencies),
        commit_secs,
        commit_rate: commit_secs.zip(rows).map(|(s, r)| r as f64 / s.max(1e-9)),
        commit_latency,
        hub_latency,
        hub_cpu_secs: hub_cpu,
        hub_cpu_us_per_msg: hub_cpu.map(|c| c / n.max(1) as f64 * 1e6),
        hub_peak_rss_kb: hub_peak,
        hub_peak_rss_reset,
        hub_rss_max_sampled_kb: hub_pid.is_some().then(|| rss_max.load(Ordering::Relaxed)),
        generator_cpu_secs: gen_cpu,
        hub_metrics: match &args.hub_metrics {
            Some(url) => match scrape_hub_metrics(url).await {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the hub's metrics");
                    None
                }
            },
            None => None,
        },
        rows,
        distinct_ids,
        exactly_once: rows
            .zip(distinct_ids)
            .map(|(r, d)| r == n as u64 && d == n as u64),
        load_before,
        load_after,
    })
}

// ---------------------------------------------------------------------------------------------
// The whole run
// ---------------------------------------------------------------------------------------------

/// Everything one `didhub bench` measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Envelope mode.
    pub mode: String,
    /// Posts.
    pub count: usize,
    /// Devices.
    pub devices: usize,
    /// Mean packed size, bytes.
    pub mean_message_bytes: f64,
    /// Cores (`available_parallelism`).
    pub cores: usize,
    /// The bare unpack loop.
    pub bare: Option<BareReport>,
    /// The in-process run.
    pub in_process: Option<InProcessReport>,
    /// In-process CPU per post ÷ bare unpack CPU per post.
    pub in_process_efficiency_ratio: Option<f64>,
    /// The end-to-end run.
    pub end_to_end: Option<EndToEndReport>,
    /// Hub CPU per post ÷ bare unpack CPU per post.
    pub end_to_end_efficiency_ratio: Option<f64>,
}

/// Runs what `args` asks for.
pub async fn run(args: BenchArgs) -> Result<BenchReport, String> {
    if !args.in_process && args.broker.is_none() {
        return Err("say what to measure: --in-process, or --broker mqtt://HOST:PORT with a running hub (or both)".into());
    }
    if args.count == 0 {
        return Err("--count must be at least 1".into());
    }
    if args.rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
        return Err("--rate must be a positive number of posts per second".into());
    }
    let hub = match &args.hub_identity {
        Some(p) => Identity::load(p).map_err(|e| format!("{}: {e}", p.display()))?,
        None => Identity::generate(DidMethod::Key),
    };
    let a = args.clone();
    let corpus = tokio::task::spawn_blocking(move || generate(&a, hub))
        .await
        .map_err(|e| e.to_string())??;
    let corpus = Arc::new(corpus);

    let mut report = BenchReport {
        mode: args.mode.as_str().into(),
        count: args.count,
        devices: corpus.topics.len(),
        mean_message_bytes: corpus.bytes as f64 / args.count as f64,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        bare: None,
        in_process: None,
        in_process_efficiency_ratio: None,
        end_to_end: None,
        end_to_end_efficiency_ratio: None,
    };
    // The bare loop runs before and after the measurement; the faster run is the ratio's
    // denominator. Run-to-run speed on a shared VM moves by 10-50 % (after a long end-to-end
    // run, the kernel's writeback and the servers still settling); one run after could
    // flatter the ratio.
    let bare_run = |label: &'static str| {
        let (limit, c) = (args.bare_limit, corpus.clone());
        eprintln!(
            "bare Message::unpack loop over {} posts on one thread ({label})",
            limit.min(c.posts.len())
        );
        tokio::task::spawn_blocking(move || bare_unpack(&c, limit))
    };
    let bare_before = if args.bare_limit > 0 {
        Some(bare_run("before").await.map_err(|e| e.to_string())?)
    } else {
        None
    };
    if args.in_process {
        let (a, c) = (args.clone(), corpus.clone());
        report.in_process = Some(
            tokio::task::spawn_blocking(move || run_in_process(&a, &c))
                .await
                .map_err(|e| e.to_string())??,
        );
    }
    if let Some(broker) = &args.broker {
        report.end_to_end = Some(run_end_to_end(&args, corpus.clone(), broker).await?);
    }
    if let Some(before) = bare_before {
        let after = bare_run("after").await.map_err(|e| e.to_string())?;
        let bare = BareReport::fastest(before, after);
        report.in_process_efficiency_ratio = report
            .in_process
            .as_ref()
            .map(|r| r.cpu_us_per_msg / bare.cpu_us_per_msg.max(1e-9));
        report.end_to_end_efficiency_ratio = report
            .end_to_end
            .as_ref()
            .and_then(|r| r.hub_cpu_us_per_msg)
            .map(|c| c / bare.cpu_us_per_msg.max(1e-9));
        report.bare = Some(bare);
    }
    Ok(report)
}

fn mb(kb: u64) -> String {
    format!("{:.1} MB", kb as f64 / 1024.0)
}

fn lat(l: &Option<Latency>) -> String {
    match l {
        Some(l) => format!(
            "p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms  (n={})",
            l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms, l.count
        ),
        None => "-".into(),
    }
}

/// The report for people.
pub fn render_table(r: &BenchReport) -> String {
    let mut rows: Vec<(String, String)> = vec![
        ("mode".into(), r.mode.clone()),
        (
            "posts".into(),
            format!(
                "{} from {} devices, {:.0} bytes each",
                r.count, r.devices, r.mean_message_bytes
            ),
        ),
        ("cores".into(), r.cores.to_string()),
    ];
    if let Some(b) = &r.bare {
        rows.push((
            "bare unpack".into(),
            format!(
                "{:.1} µs CPU/post ({:.1} µs wall), {:.0} posts/s per core, {} posts, {} failed; runs before / after {}",
                b.cpu_us_per_msg,
                b.wall_us_per_msg,
                b.per_core_per_sec,
                b.count,
                b.failed,
                b.runs_cpu_us_per_msg
                    .iter()
                    .map(|c| format!("{c:.1}"))
                    .collect::<Vec<_>>()
                    .join(" / ")
            ),
        ));
    }
    if let Some(p) = &r.in_process {
        rows.extend([
            (
                "in process".into(),
                format!(
                    "{} worker(s), require = \"{}\", {}, {} settled, {} accepted, {} rejected",
                    p.workers,
                    p.require,
                    match p.rate {
                        Some(r) => format!("Poisson arrivals at {r:.0}/s"),
                        None => "full speed".into(),
                    },
                    p.settled,
                    p.accepted,
                    p.rejected
                ),
            ),
            (
                "  throughput".into(),
                format!("{:.0} posts/s ({:.2} s wall)", p.throughput, p.wall_secs),
            ),
            (
                "  CPU".into(),
                format!(
                    "{:.2} s, {:.1} µs/post, {:.2} cores busy; verify {:.1} µs/post",
                    p.cpu_secs, p.cpu_us_per_msg, p.cores_busy, p.verify_us_per_msg
                ),
            ),
            (
                "  CPU by thread".into(),
                format!(
                    "verify workers {:.1} µs/post, committer {:.1} µs/post, rest (feeder, drain) {:.1} µs/post",
                    p.workers_cpu_us_per_msg,
                    p.committer_cpu_us_per_msg,
                    (p.cpu_us_per_msg - p.workers_cpu_us_per_msg - p.committer_cpu_us_per_msg).max(0.0)
                ),
            ),
            (
                "  commits".into(),
                format!(
                    "{} batches, {:.0} posts/batch; {:.1} posts/verify batch",
                    p.batches, p.mean_batch, p.verify_batch_mean
                ),
            ),
            (
                "  DID cache".into(),
                format!(
                    "{} hits, {} misses; parsed keys {} hits, {} misses (fast path {}, batch verification {})",
                    p.did_cache_hits,
                    p.did_cache_misses,
                    p.key_cache_hits,
                    p.key_cache_misses,
                    if p.fast_path { "on" } else { "off" },
                    if p.batch_verify { "on" } else { "off" }
                ),
            ),
            (
                "  RSS".into(),
                format!(
                    "peak {}{} (corpus resident before: {})",
                    mb(p.peak_rss_kb),
                    if p.peak_rss_reset { "" } else { " since start" },
                    mb(p.rss_before_kb)
                ),
            ),
            (
                "  exactly once".into(),
                format!(
                    "{} ({} rows, {} distinct ids)",
                    if p.exactly_once { "yes" } else { "NO" },
                    p.rows,
                    p.distinct_ids
                ),
            ),
            (
                "  load".into(),
                format!("{} → {}", p.load_before, p.load_after),
            ),
        ]);
    }
    if let Some(x) = r.in_process_efficiency_ratio {
        rows.push(("efficiency (in process)".into(), format!("{x:.3}")));
    }
    if let Some(e) = &r.end_to_end {
        rows.extend([
            (
                "end to end".into(),
                format!(
                    "{} over {} connection(s), rate {}",
                    e.broker,
                    e.connections,
                    e.rate
                        .map(|r| format!("{r:.0}/s"))
                        .unwrap_or_else(|| "full speed".into())
                ),
            ),
            (
                "  published".into(),
                format!(
                    "{} in {:.2} s ({:.0}/s); {} connection errors",
                    e.published, e.publish_secs, e.publish_rate, e.connection_errors
                ),
            ),
            (
                "  PUBACKs".into(),
                format!("{} in {:.2} s ({:.0}/s)", e.acked, e.ack_secs, e.ack_rate),
            ),
            ("  publish → PUBACK".into(), lat(&e.puback_latency)),
            (
                "  committed".into(),
                match (e.rows, e.commit_secs, e.commit_rate) {
                    (Some(rows), Some(s), Some(rate)) => {
                        format!("{rows} rows by {s:.2} s ({rate:.0}/s)")
                    }
                    _ => "- (pass --hub-db)".into(),
                },
            ),
            ("  publish → committed".into(), lat(&e.commit_latency)),
            ("  hub receive → committed".into(), lat(&e.hub_latency)),
            (
                "  hub CPU".into(),
                match (e.hub_cpu_secs, e.hub_cpu_us_per_msg) {
                    (Some(s), Some(us)) => format!("{s:.2} s, {us:.1} µs/post"),
                    _ => "- (pass --hub-pid)".into(),
                },
            ),
            (
                "  hub RSS".into(),
                match (e.hub_peak_rss_kb, e.hub_rss_max_sampled_kb) {
                    (Some(p), Some(s)) => format!(
                        "peak {}{} (max sampled {})",
                        mb(p),
                        if e.hub_peak_rss_reset {
                            ""
                        } else {
                            " since start"
                        },
                        mb(s)
                    ),
                    _ => "-".into(),
                },
            ),
            (
                "  generator CPU".into(),
                format!("{:.2} s", e.generator_cpu_secs),
            ),
            (
                "  hub caches".into(),
                match &e.hub_metrics {
                    Some(m) => {
                        let rate = |h: f64, m: f64| 100.0 * h / (h + m).max(1.0);
                        format!(
                            "signer keys {:.0} hits / {:.0} misses ({:.1} % hits); DID documents {:.0} / {:.0} ({:.1} %); {:.0} commits, {:.0} posts/commit, {:.1} posts/verify batch (since the hub started)",
                            m.key_cache_hits,
                            m.key_cache_misses,
                            rate(m.key_cache_hits, m.key_cache_misses),
                            m.did_cache_hits,
                            m.did_cache_misses,
                            rate(m.did_cache_hits, m.did_cache_misses),
                            m.commits,
                            m.committed / m.commits.max(1.0),
                            m.verified / m.verify_batches.max(1.0)
                        )
                    }
                    None => "- (pass --hub-metrics)".into(),
                },
            ),
            (
                "  exactly once".into(),
                match (e.exactly_once, e.rows, e.distinct_ids) {
                    (Some(ok), Some(r), Some(d)) => format!(
                        "{} ({r} rows, {d} distinct ids)",
                        if ok { "yes" } else { "NO" }
                    ),
                    _ => "- (pass --hub-db)".into(),
                },
            ),
            (
                "  load".into(),
                format!("{} → {}", e.load_before, e.load_after),
            ),
        ]);
    }
    if let Some(x) = r.end_to_end_efficiency_ratio {
        rows.push(("efficiency (end to end)".into(), format!("{x:.3}")));
    }
    align_rows(&rows)
}

/// `key  value` lines with the values aligned in one column (every bench table).
pub fn align_rows<K: AsRef<str>, V: std::fmt::Display>(rows: &[(K, V)]) -> String {
    let w = rows
        .iter()
        .map(|(k, _)| k.as_ref().chars().count())
        .max()
        .unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{:<w$}  {v}\n", k.as_ref()))
        .collect()
}

/// `didhub bench`: runs, prints, and fails when a post was lost or duplicated.
pub async fn main(args: BenchArgs) -> Result<(), String> {
    if args.ship.ship_to.is_some() {
        return crate::bench_ship::main(&args).await;
    }
    let json = args.json;
    let r = run(args).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", render_table(&r));
    }
    let lost = r.in_process.as_ref().is_some_and(|p| !p.exactly_once)
        || r.end_to_end
            .as_ref()
            .is_some_and(|e| e.exactly_once == Some(false) || e.acked < e.count as u64);
    if lost {
        return Err("not every post was committed exactly once (see above)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_about_the_asked_size() {
        for (i, want) in [(0usize, 200usize), (123_456, 200), (7, 500)] {
            let len = payload(i, want).to_string().len();
            assert!(len.abs_diff(want) <= 2, "{len} vs {want}");
        }
    }

    #[test]
    fn proc_readers_work_on_self() {
        assert!(proc_cpu_secs("self").is_some());
        assert!(proc_status_kb("self", "VmRSS").unwrap() > 0);
        assert!(proc_status_kb("self", "VmHWM").unwrap() > 0);
        let _ = thread_cpu_ns();
    }

    #[test]
    fn device_clock_offsets_spread_over_the_skew() {
        let offsets: Vec<f64> = (0..100).map(|d| clock_offset(d, 1000.0)).collect();
        assert!(offsets.iter().all(|o| (-1000.0..1000.0).contains(o)));
        let (min, max) = offsets
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &o| (a.min(o), b.max(o)));
        assert!(min < -900.0 && max > 900.0, "{min} {max}");
        assert_eq!(clock_offset(7, 0.0), 0.0);
    }

    #[test]
    fn the_faster_bare_run_is_the_denominator() {
        let run = |cpu: f64| BareReport {
            count: 10,
            failed: 0,
            wall_us_per_msg: cpu + 1.0,
            cpu_us_per_msg: cpu,
            per_core_per_sec: 1e6 / cpu,
            runs_cpu_us_per_msg: vec![cpu],
        };
        for (before, after) in [(65.0, 97.8), (97.8, 65.0)] {
            let b = BareReport::fastest(run(before), run(after));
            assert_eq!(b.cpu_us_per_msg, 65.0);
            assert_eq!(b.wall_us_per_msg, 66.0);
            assert_eq!(b.runs_cpu_us_per_msg, [before, after]);
        }
    }

    #[test]
    fn latency_percentiles() {
        let l = Latency::of((1..=1000).collect()).unwrap();
        assert_eq!(l.count, 1000);
        assert!((l.p50_ms - 0.5).abs() < 0.002);
        assert!((l.p99_ms - 0.99).abs() < 0.002);
        assert_eq!(l.max_ms, 1.0);
        assert!(Latency::of(Vec::new()).is_none());
    }

    #[test]
    fn in_process_commits_every_post_once() {
        let args = BenchArgs {
            count: 40,
            devices: 3,
            mode: Envelope::Signed,
            did_method: DidMethod::Key,
            payload_bytes: 200,
            hub_identity: None,
            topic: "devices/bench-{device}/telemetry".into(),
            in_process: true,
            workers: Some(2),
            require: None,
            max_batch: 16,
            linger_ms: 2.0,
            verify_linger_ms: 1.0,
            random_ids: false,
            id_clock_skew_ms: None,
            queue: 8,
            no_fast_path: false,
            no_batch_verify: false,
            bare_limit: 10,
            broker: None,
            connections: 1,
            rate: None,
            inflight: 16,
            hub_pid: None,
            hub_metrics: None,
            hub_db: None,
            commit_poll_ms: 2,
            stall_secs: 5,
            json: false,
            ship: Default::default(),
        };
        let corpus = generate(&args, Identity::generate(DidMethod::Key)).unwrap();
        assert_eq!(corpus.posts.len(), 40);
        let r = run_in_process(&args, &corpus).unwrap();
        assert!(r.exactly_once, "{r:?}");
        assert_eq!((r.accepted, r.rejected), (40, 0));
        assert!(r.verify_batch_mean >= 1.0, "{r:?}");
        // Paced (Poisson arrivals), with random ids: committed once each.
        let paced = BenchArgs {
            rate: Some(2000.0),
            random_ids: true,
            ..args.clone()
        };
        let corpus = generate(&paced, Identity::generate(DidMethod::Key)).unwrap();
        assert!(corpus.posts.len() == 40);
        let p = run_in_process(&paced, &corpus).unwrap();
        assert!(p.exactly_once, "{p:?}");
        assert_eq!((p.accepted, p.rate), (40, Some(2000.0)));
        // Ids by skewed device clocks (UUIDv7-like): committed once each.
        let skewed = BenchArgs {
            id_clock_skew_ms: Some(50.0),
            ..args.clone()
        };
        let corpus = generate(&skewed, Identity::generate(DidMethod::Key)).unwrap();
        let s = run_in_process(&skewed, &corpus).unwrap();
        assert!(s.exactly_once && s.accepted == 40, "{s:?}");
        let b = bare_unpack(&corpus, args.bare_limit);
        assert_eq!((b.count, b.failed), (10, 0));
        assert!(render_table(&BenchReport {
            mode: "signed".into(),
            count: 40,
            devices: 3,
            mean_message_bytes: 1.0,
            cores: 2,
            bare: Some(b),
            in_process: Some(r),
            in_process_efficiency_ratio: Some(1.1),
            end_to_end: None,
            end_to_end_efficiency_ratio: None,
        })
        .contains("exactly once"));
    }
}
