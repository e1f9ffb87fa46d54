//! Fault tests: nothing acknowledged is ever lost or doubled. Real mosquitto (persistence on),
//! real VictoriaMetrics (dedup on, so a re-sent point would show), the real hub, SIGKILLs,
//! broker restarts, store outages, a scripted store that refuses, graceful stops, a full disk
//! budget and a flood of bad input. Every test is bounded in time and size and prints its
//! figures (sent / stored / doubled) for the record.

mod common;

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use didhub::did::Identity;
use didhub::mapping::FieldValue;
use didhub::verify::{pack_post, Envelope};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Where a test's hub puts its points.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Embedded,
    Influx,
}

/// The hub config of these tests: embedded store unless `influxdb` is added to it.
fn hub_config(dir: &Path, mqtt_url: &str) -> HubConfig {
    // In InfluxDB mode the point time is the payload's `seq` in ms: senders give each device its
    // own range, so every sample has its own millisecond (VictoriaMetrics keeps ms and dedups).
    HubConfig::new(dir, mqtt_url)
        .stats_interval("0s")
        .shutdown_timeout("5s")
        .routes(
            r#"[[routes]]
topics = ["devices/+/telemetry"]
require = "signed"
measurement = "telemetry"
topic_tags = "devices/+device/telemetry"
timestamp = "seq"
timestamp_format = "unix_ms"
"#,
        )
}

/// Device k numbers its posts from `base + k * 10_000_000`.
fn seq_base(k: usize) -> u64 {
    // About a day ago: inside VictoriaMetrics' retention, and distinct per device.
    (now_ms() - 86_400_000) / 100_000_000 * 100_000_000 + k as u64 * 10_000_000
}

/// How long `join_senders` waits for all senders together.
const SENDERS_TIMEOUT: Duration = Duration::from_secs(600);

/// Starts `devices` `didhub send` processes of `per_device` QoS 1 signed posts each. Each is
/// owned by a guard that kills it if the test fails before `join_senders`.
fn start_senders(
    dir: &Path,
    cfg: &Path,
    devices: usize,
    per_device: u64,
    rate: Option<u64>,
    offset: u64,
) -> Vec<ChildGuard> {
    (0..devices)
        .map(|k| {
            let key = dir.join(format!("dev{k}.json"));
            if !key.exists() {
                assert!(didhub(&["keygen", "--out", key.to_str().unwrap()])
                    .status
                    .success());
            }
            let mut args: Vec<String> = vec![
                "--config".into(),
                cfg.to_str().unwrap().into(),
                "send".into(),
                "--identity".into(),
                key.to_str().unwrap().into(),
                "--topic".into(),
                format!("devices/d{k}/telemetry"),
                "--count".into(),
                per_device.to_string(),
                "--seq-field".into(),
                "seq".into(),
                "--seq-start".into(),
                (seq_base(k) + offset).to_string(),
                "--payload".into(),
                "{\"v\":1}".into(),
            ];
            if let Some(r) = rate {
                args.push("--rate".into());
                args.push(r.to_string());
            }
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            didhub_spawn(&a, &[])
        })
        .collect()
}

/// Waits for every sender (all within `SENDERS_TIMEOUT`) and checks that each succeeded; on a
/// failure the senders not yet waited for are killed as the vector drops.
fn join_senders(senders: Vec<ChildGuard>) {
    let deadline = Instant::now() + SENDERS_TIMEOUT;
    for s in senders {
        let out = s.wait_output(deadline.saturating_duration_since(Instant::now()));
        assert!(
            out.status.success(),
            "sender failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// (device tag, seq) → times stored, from the embedded store.
fn tally_embedded(dir: &Path) -> HashMap<(String, u64), usize> {
    let points = didhub::cli::query(
        &dir.join("state/didhub.db"),
        Some("telemetry"),
        Duration::from_secs(10 * 86_400),
        10_000_000,
    )
    .unwrap_or_default();
    let mut m = HashMap::new();
    for p in points {
        // The route takes the point time from `seq` (ms), so the time is the sequence number.
        assert_eq!(p.fields.get("v"), Some(&FieldValue::Float(1.0)), "{p:?}");
        let seq = (p.timestamp_ns / 1_000_000) as u64;
        *m.entry((p.tags["device"].clone(), seq)).or_insert(0) += 1;
    }
    m
}

/// (device tag, seq) → samples, from VictoriaMetrics.
fn tally_influx(vm: &Victoria) -> HashMap<(String, u64), usize> {
    vm.force_flush();
    let mut m = HashMap::new();
    for s in vm.series("telemetry_v") {
        let device = s.label("device").unwrap_or("").to_string();
        for t in &s.timestamps {
            *m.entry((device.clone(), *t as u64)).or_insert(0) += 1;
        }
    }
    m
}

fn total(t: &HashMap<(String, u64), usize>) -> usize {
    t.values().sum()
}

/// Waits until `expected` distinct posts are stored, then checks that each is stored once.
fn assert_exactly_once(
    name: &str,
    expected: usize,
    mut tally: impl FnMut() -> HashMap<(String, u64), usize>,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    let mut t = tally();
    while t.len() < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        t = tally();
    }
    // Late redeliveries would land now; give them a moment.
    std::thread::sleep(Duration::from_secs(1));
    let t = tally();
    let doubled = t.values().filter(|n| **n > 1).count();
    eprintln!(
        "[{name}] sent {expected}, stored {} distinct ({} rows), doubled {doubled}, lost {}",
        t.len(),
        total(&t),
        expected.saturating_sub(t.len())
    );
    assert_eq!(doubled, 0, "{name}: doubled posts");
    assert_eq!(t.len(), expected, "{name}: lost posts");
    assert_eq!(total(&t), expected, "{name}: exactly once");
}

fn sigkill_loop(mode: Mode) {
    const DEVICES: usize = 4;
    const PER_DEVICE: u64 = 5_000;
    const KILLS: usize = 6;
    let expected = DEVICES * PER_DEVICE as usize;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mq = Mosquitto::start();
    let vm = (mode == Mode::Influx).then(Victoria::start);
    let mut config = hub_config(d, &mq.url());
    if let Some(vm) = &vm {
        config = config.influxdb(&vm.url());
    }
    let cfg = config.write();
    let mut hub = Hub::start(&cfg);
    hub.wait_for_log("connected to the broker", WAIT);
    let senders = start_senders(d, &cfg, DEVICES, PER_DEVICE, None, 0);
    // SIGKILL at pseudo-random points while the stream flows.
    let mut rng_state = 0x9e37_79b9_u64 ^ now_ms();
    for _ in 0..KILLS {
        rng_state = rng_state.wrapping_mul(6364136223846793005).wrapping_add(1);
        let ms = 300 + (rng_state >> 33) % 900;
        std::thread::sleep(Duration::from_millis(ms));
        hub.kill9();
        let from = hub.logs().len();
        hub.start_again();
        hub.wait_for_log_from(from, "connected to the broker", WAIT);
    }
    join_senders(senders);
    let name = format!("sigkill x{KILLS}, {mode:?}");
    match &vm {
        None => assert_exactly_once(
            &name,
            expected,
            || tally_embedded(d),
            Duration::from_secs(180),
        ),
        Some(vm) => assert_exactly_once(
            &name,
            expected,
            || tally_influx(vm),
            Duration::from_secs(180),
        ),
    }
    assert!(hub.terminate().success());
}

#[test]
fn sigkill_loop_embedded_20000_posts_6_kills() {
    sigkill_loop(Mode::Embedded);
}

#[test]
fn sigkill_loop_influxdb_20000_posts_6_kills() {
    sigkill_loop(Mode::Influx);
}

#[test]
fn broker_restart_mid_stream_loses_and_doubles_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut mq = Mosquitto::start();
    let cfg = hub_config(d, &mq.url()).write();
    // The hub makes its persistent session, then is away while devices publish: the broker
    // queues a backlog of 6000 posts that it has acknowledged to the devices.
    let mut hub = Hub::start(&cfg);
    hub.wait_for_log("connected to the broker", WAIT);
    assert!(hub.terminate().success());
    join_senders(start_senders(d, &cfg, 2, 3_000, None, 0));
    let from = hub.logs().len();
    hub.start_again();
    hub.wait_for_log_from(from, "connected to the broker", WAIT);
    // Mid-stream (the hub is working through the backlog), the broker restarts.
    wait_until("a third of the backlog", Duration::from_secs(60), || {
        tally_embedded(d).len() >= 2_000
    });
    mq.stop();
    std::thread::sleep(Duration::from_millis(500));
    mq.start_again();
    hub.wait_for_log("reconnected to the broker", WAIT);
    assert!(
        hub.log().count("MQTT connection failed") >= 1,
        "the outage was noticed"
    );
    // Devices go on publishing after the restart.
    let more = start_senders(d, &cfg, 2, 1_000, None, 3_000);
    join_senders(more);
    assert_exactly_once(
        "broker restart",
        8_000,
        || tally_embedded(d),
        Duration::from_secs(120),
    );
    assert!(hub.terminate().success());
}

/// The outbox row count, read from the hub's SQLite store.
fn outbox_rows(dir: &Path) -> i64 {
    let Ok(c) = rusqlite::Connection::open_with_flags(
        dir.join("state/didhub.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    ) else {
        return 0;
    };
    c.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
        .unwrap_or(0)
}

#[test]
fn store_outage_of_30_s_under_load_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mq = Mosquitto::start();
    let mut vm = Victoria::start();
    let cfg = hub_config(d, &mq.url()).influxdb(&vm.url()).write();
    let mut hub = Hub::start(&cfg);
    hub.wait_for_log("connected to the broker", WAIT);
    // 2 devices × 4000 posts at 100/s each: ~40 s of load.
    let senders = start_senders(d, &cfg, 2, 4_000, Some(100), 0);
    std::thread::sleep(Duration::from_secs(4));
    vm.stop();
    let outage = Instant::now();
    hub.wait_for_log("store write failed", WAIT);
    // Ingest goes on while the store is down: the outbox grows (posts are committed and acked).
    let mut peak = 0;
    while outage.elapsed() < Duration::from_secs(30) {
        peak = peak.max(outbox_rows(d));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        peak > 1_000,
        "the outbox grew during the outage: peak {peak} rows"
    );
    vm.start_again();
    join_senders(senders);
    assert_exactly_once(
        "store outage 30 s",
        8_000,
        || tally_influx(&vm),
        Duration::from_secs(120),
    );
    wait_until("the outbox drains", WAIT, || outbox_rows(d) == 0);
    eprintln!("[store outage 30 s] outbox peak {peak} rows, drained to 0");
    assert!(hub.terminate().success());
}

/// A scripted InfluxDB: the one place a fake server is right, because real servers cannot be
/// made to answer 429/503 with Retry-After, 413 and 400 on demand.
struct Scripted {
    port: u16,
    accepted: Arc<Mutex<Vec<String>>>,
    log: Arc<Mutex<Vec<(Instant, u16, usize)>>>,
    /// Requests that came with `Content-Encoding: gzip`.
    gzips: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Scripted {
    fn start() -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted: Arc<Mutex<Vec<String>>> = Arc::default();
        let log: Arc<Mutex<Vec<(Instant, u16, usize)>>> = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gzipped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (acc, lg, st, gzips) = (accepted.clone(), log.clone(), stop.clone(), gzipped.clone());
        let thread = std::thread::spawn(move || {
            let mut n = 0usize;
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                let (stream, _) = match listener.accept() {
                    Ok(s) => s,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                stream.set_nonblocking(false).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let mut reader = BufReader::new(stream);
                // One request per connection is enough for the script, but serve keep-alive.
                while let Some(req) = common::http_request::read_request(&mut reader) {
                    // The shipper gzips by default (store.influxdb.content_encoding).
                    gzips.fetch_add(usize::from(req.gzip), std::sync::atomic::Ordering::Relaxed);
                    let (line, body) = (req.line, req.body);
                    if !line.starts_with("POST") {
                        // The start-up health check: not part of the script.
                        let ok = "HTTP/1.1 200 OK\r\nContent-Length: 15\r\nContent-Type: application/json\r\n\r\n{\"status\":\"pass\"}";
                        if reader.get_mut().write_all(ok.as_bytes()).is_err() {
                            break;
                        }
                        continue;
                    }
                    let lines: Vec<String> = body
                        .lines()
                        .filter(|l| !l.is_empty())
                        .map(String::from)
                        .collect();
                    n += 1;
                    let (status, extra, text) = if n == 1 {
                        (429, "Retry-After: 2\r\n", "slow down")
                    } else if n == 2 {
                        (503, "Retry-After: 1\r\n", "unavailable")
                    } else if lines.len() > 10 {
                        (413, "", "request too large")
                    } else if lines.iter().any(|l| l.contains("poison")) {
                        (400, "", "partial write: field type conflict: poison")
                    } else {
                        acc.lock().unwrap().extend(lines.iter().cloned());
                        (204, "", "")
                    };
                    lg.lock()
                        .unwrap()
                        .push((Instant::now(), status, lines.len()));
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\n{extra}Content-Length: {}\r\nContent-Type: text/plain\r\n\r\n{text}",
                        text.len()
                    );
                    if reader.get_mut().write_all(resp.as_bytes()).is_err() {
                        break;
                    }
                }
            }
        });
        Scripted {
            port,
            accepted,
            log,
            gzips: gzipped,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn store_refusals_retry_after_split_and_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mq = Mosquitto::start();
    let server = Scripted::start();
    let cfg = hub_config(d, &mq.url())
        .influxdb(&format!("http://127.0.0.1:{}", server.port))
        .influxdb_retry_min("10ms")
        .influxdb_batch_size(40)
        .write();
    let mut hub = Hub::start(&cfg);
    hub.wait_for_log("connected to the broker", WAIT);
    let hub_did = std::fs::read_to_string(d.join("state/hub.did")).unwrap();
    let key = d.join("dev.json");
    assert!(didhub(&["keygen", "--out", key.to_str().unwrap()])
        .status
        .success());
    let dev = Identity::load(&key).unwrap();
    // 40 posts, every 8th carries a field the scripted store refuses.
    let base = seq_base(0);
    let mut payloads = Vec::new();
    for i in 0..40u64 {
        let mut p = json!({"seq": base + i, "v": 1});
        if i % 8 == 0 {
            p["poison"] = json!(1);
        }
        let id = uuid::Uuid::new_v4().to_string();
        payloads.push(
            futures::executor::block_on(pack_post(
                &dev,
                hub_did.trim(),
                &id,
                p,
                Envelope::Signed,
                now_ms() / 1000,
            ))
            .unwrap(),
        );
    }
    let lines: String = payloads.iter().map(|p| format!("{p}\n")).collect();
    let out = mosquitto_pub_lines(mq.port, "devices/d0/telemetry", lines)
        .wait_output(Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("35 good points accepted", Duration::from_secs(60), || {
        server.accepted.lock().unwrap().len() >= 35
    });
    let c = d.join("hub.toml");
    let mut dead = Vec::new();
    wait_until("5 dead letters", WAIT, || {
        let q = didhub(&["--config", c.to_str().unwrap(), "query", "--dead-letters"]);
        dead = String::from_utf8_lossy(&q.stdout)
            .lines()
            .map(String::from)
            .collect();
        dead.len() >= 5
    });
    let accepted = server.accepted.lock().unwrap().clone();
    let mut seqs: Vec<&str> = accepted
        .iter()
        // The point time (the last column) is the post's sequence number.
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    seqs.sort();
    let before = seqs.len();
    seqs.dedup();
    assert_eq!(before, seqs.len(), "no good point accepted twice");
    assert_eq!(seqs.len(), 35, "every good point arrived");
    assert!(accepted.iter().all(|l| !l.contains("poison")));
    assert_eq!(dead.len(), 5, "{dead:?}");
    assert!(
        dead.iter()
            .all(|l| l.contains("HTTP 400") && l.contains("poison")),
        "{dead:?}"
    );
    let log = server.log.lock().unwrap().clone();
    assert_eq!(
        server.gzips.load(std::sync::atomic::Ordering::Relaxed),
        log.len(),
        "every write is gzipped by default"
    );
    assert_eq!((log[0].1, log[1].1), (429, 503));
    // Retry-After is honoured: retry_min is 10 ms, so only the header explains these gaps.
    assert!(
        log[1].0 - log[0].0 >= Duration::from_millis(1900),
        "{:?}",
        log[1].0 - log[0].0
    );
    assert!(
        log[2].0 - log[1].0 >= Duration::from_millis(900),
        "{:?}",
        log[2].0 - log[1].0
    );
    assert!(log.iter().any(|e| e.1 == 413), "a 413 was answered");
    let after_413 = log.iter().skip_while(|e| e.1 != 413).nth(1).unwrap();
    assert!(
        after_413.2 <= 20,
        "the batch was split after 413: {after_413:?}"
    );
    eprintln!(
        "[store refusals] requests {}, accepted {} points, dead letters {}",
        log.len(),
        accepted.len(),
        dead.len()
    );
    assert!(hub.terminate().success());
}

fn signal(pid: u32, sig: &str) {
    let st = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn graceful_stop_under_load_commits_or_leaves_unacked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mq = Mosquitto::start();
    let cfg = hub_config(d, &mq.url()).write();
    let mut hub = Hub::start(&cfg);
    hub.wait_for_log("connected to the broker", WAIT);
    let senders = start_senders(d, &cfg, 2, 3_000, Some(800), 0);
    wait_until("some of the stream", Duration::from_secs(60), || {
        tally_embedded(d).len() >= 1_000
    });
    // SIGTERM: ingest stops, what was received is committed or left unacked; exit 0 in time.
    let stopped = Instant::now();
    let status = hub.terminate();
    assert!(status.success(), "graceful stop exits 0: {status:?}");
    eprintln!(
        "[graceful stop] exited in {:?} (deadline 5 s)",
        stopped.elapsed()
    );
    assert!(
        hub.log().count("stopped: received=") == 1,
        "{}",
        hub.log().tail()
    );
    let from = hub.logs().len();
    hub.start_again();
    hub.wait_for_log_from(from, "connected to the broker", WAIT);
    wait_until("more of the stream", Duration::from_secs(60), || {
        tally_embedded(d).len() >= 3_000
    });
    join_senders(senders);
    assert_exactly_once(
        "graceful stop",
        6_000,
        || tally_embedded(d),
        Duration::from_secs(120),
    );
    assert!(hub.terminate().success());
}

#[test]
fn second_sigterm_exits_at_once_and_keeps_committed_rows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mq = Mosquitto::start();
    // A store that accepts connections and never answers: the graceful stop's outbox flush
    // waits for it (up to the 5 s deadline), which is when the second signal comes.
    let hole = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", hole.local_addr().unwrap());
    let held: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
    let h = held.clone();
    hole.set_nonblocking(true).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    let acceptor = std::thread::spawn(move || {
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((c, _)) = hole.accept() {
                h.lock().unwrap().push(c);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let cfg = hub_config(d, &mq.url()).influxdb(&url).write();
    let mut hub = Hub::start(&cfg);
    hub.wait_for_log("connected to the broker", WAIT);
    join_senders(start_senders(d, &cfg, 1, 50, None, 0));
    wait_until("50 committed rows", WAIT, || outbox_rows(d) == 50);
    let pid = hub.pid().unwrap();
    let from = hub.logs().len();
    signal(pid, "-TERM");
    hub.wait_for_log_from(from, "stopping:", WAIT);
    std::thread::sleep(Duration::from_millis(500));
    assert!(pid_alive(pid), "still draining (the store does not answer)");
    let t = Instant::now();
    signal(pid, "-TERM");
    let status = hub.wait_exit(Duration::from_secs(3));
    eprintln!(
        "[second signal] exited {:?} after the second SIGTERM: {status:?}",
        t.elapsed()
    );
    assert_eq!(
        status.code(),
        Some(130),
        "the second signal's exit, not the graceful one"
    );
    assert_eq!(outbox_rows(d), 50, "committed rows are kept");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    acceptor.join().unwrap();
}

#[test]
fn disk_budget_stops_acking_and_the_broker_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mq = Mosquitto::start();
    let mut vm = Victoria::start();
    let vm_url = vm.url();
    vm.stop();
    let cfg = hub_config(d, &mq.url())
        .influxdb(&vm_url)
        .tables("[outbox]\nmax_bytes = 8192\n")
        .write();
    let mut hub = Hub::start(&cfg);
    hub.wait_for_log("connected to the broker", WAIT);
    join_senders(start_senders(d, &cfg, 2, 300, None, 0));
    let warn = hub.wait_for_log("outbox is at its disk budget", WAIT);
    assert!(
        warn.contains("max_bytes=8192"),
        "the numbers are logged: {warn}"
    );
    // The hub holds at most the budget plus one batch: the rest waits, unacked, in the broker.
    std::thread::sleep(Duration::from_secs(1));
    let held = outbox_rows(d);
    assert!(
        held > 0 && held < 200,
        "outbox bounded by the budget: {held} rows"
    );
    vm.start_again();
    assert_exactly_once(
        "disk budget",
        600,
        || tally_influx(&vm),
        Duration::from_secs(120),
    );
    hub.wait_for_log("below its disk budget again", WAIT);
    eprintln!("[disk budget] outbox held {held} rows at the 8 KiB budget; 600 of 600 arrived");
    assert!(hub.terminate().success());
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn flood_of_10000_bad_messages_is_rate_limited_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mq = Mosquitto::start();
    let reports_cfg = "[reports]\nper_sender_per_second = 1.0\nper_sender_burst = 3.0\nglobal_per_second = 2.0\nglobal_burst = 20.0\n";
    let cfg = hub_config(d, &mq.url()).tables(reports_cfg).write();
    let mut hub = Hub::start(&cfg);
    hub.wait_for_log("connected to the broker", WAIT);
    let reports = Collector::start(
        mq.port,
        &["devices/+/telemetry/problem-report"],
        &SubOptions::default(),
    );
    let started = Instant::now();
    // 10 topics × 1000 messages of garbage, a message per line, published concurrently.
    let pubs: Vec<ChildGuard> = (0..10)
        .map(|k| {
            let lines: String = (0..1000).map(|i| format!("garbage {k} {i} {{\n")).collect();
            mosquitto_pub_lines(mq.port, &format!("devices/f{k}/telemetry"), lines)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    for p in pubs {
        let out = p.wait_output(deadline.saturating_duration_since(Instant::now()));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The next good post is stored at once after the flood.
    let key = d.join("good.json");
    assert!(didhub(&["keygen", "--out", key.to_str().unwrap()])
        .status
        .success());
    let out = didhub(&[
        "--config",
        cfg.to_str().unwrap(),
        "send",
        "--identity",
        key.to_str().unwrap(),
        "--topic",
        "devices/g/telemetry",
        "--seq-field",
        "seq",
        "--seq-start",
        &seq_base(0).to_string(),
        "--payload",
        "{\"v\":1}",
    ]);
    assert!(out.status.success());
    wait_until(
        "the good post after the flood",
        Duration::from_secs(60),
        || tally_embedded(d).len() == 1,
    );
    let elapsed = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let sent = reports.messages().len();
    let bound = 20.0 + 2.0 * (elapsed + 1.0);
    let rss = peak_rss_kib(hub.pid().unwrap());
    eprintln!(
        "[flood] 10000 bad messages in {elapsed:.1} s: {sent} reports (bound {bound:.0}), hub peak RSS {} MiB",
        rss / 1024
    );
    assert!(sent as f64 <= bound, "{sent} reports > {bound}");
    assert!(sent >= 20, "the burst was used: {sent}");
    assert!(hub.terminate().success());
    let summary = hub
        .logs()
        .into_iter()
        .find(|l| l.contains("stopped: received="))
        .unwrap();
    assert!(summary.contains("rejected=10000"), "{summary}");
    assert!(
        summary.contains(&format!("reports_sent={sent}")),
        "{summary}"
    );
}

#[test]
fn send_gives_up_when_the_broker_disappears_mid_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut mq = Mosquitto::start();
    let key = d.join("dev.json");
    assert!(didhub(&["keygen", "--out", key.to_str().unwrap()])
        .status
        .success());
    let hub_key = d.join("hub.json");
    let hub = didhub(&["keygen", "--out", hub_key.to_str().unwrap()]);
    assert!(hub.status.success());
    let hub_did = String::from_utf8_lossy(&hub.stdout).trim().to_string();
    let url = mq.url();
    // Far more posts than the run could publish: only the deadline can end it.
    let sender = didhub_spawn(
        &[
            "send",
            "--identity",
            key.to_str().unwrap(),
            "--to",
            &hub_did,
            "--broker",
            &url,
            "--topic",
            "devices/d0/telemetry",
            "--count",
            "100000000",
            "--timeout",
            "3s",
            "--payload",
            "{\"v\":1}",
        ],
        &[],
    );
    wait_until("the sender publishes", WAIT, || {
        mq.log().count("Received PUBLISH from didhub-send-") >= 100
    });
    mq.kill9();
    let gone = Instant::now();
    // Generous: the deadline is 3 s; the bound only catches a hang (the guard kills it then).
    let out = sender.wait_output(Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "[send deadline] exited {:?} after the broker vanished: {}",
        gone.elapsed(),
        stderr.lines().last().unwrap_or("")
    );
    assert!(!out.status.success(), "gave up with an error: {stderr}");
    assert!(stderr.contains("gave up on the broker"), "{stderr}");
    assert!(stderr.contains(&url), "names the broker: {stderr}");
    assert!(
        stderr.contains("acknowledged"),
        "says how far it got: {stderr}"
    );
}
