//! Running as a service: systemd notifications (READY, STATUS, WATCHDOG, STOPPING) on a unix
//! datagram socket made here, the HTTP listener (/metrics, /healthz, /readyz) against a real
//! mosquitto that is then stopped, and SIGHUP reloads of the device registry and routes (a good
//! one takes effect, a bad one keeps the running configuration and says why).

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use didhub::did::Identity;

const WAIT: Duration = Duration::from_secs(30);

/// The hub config of these tests: an external broker, two workers.
fn hub_config(dir: &Path, mqtt_url: &str) -> HubConfig {
    HubConfig::new(dir, mqtt_url).workers(2)
}

fn keygen(dir: &Path, name: &str) -> (PathBuf, Identity) {
    let path = dir.join(format!("{name}.json"));
    let out = didhub(&["keygen", "--out", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = Identity::load(&path).unwrap();
    (path, id)
}

/// Publishes signed posts without reading hub.toml (it may be broken on purpose).
fn send(dir: &Path, broker: &str, identity: &Path, topic: &str, count: u64) {
    let out = didhub(&[
        "send",
        "--identity",
        identity.to_str().unwrap(),
        "--to",
        &hub_did(dir),
        "--broker",
        broker,
        "--topic",
        topic,
        "--count",
        &count.to_string(),
        "--payload",
        r#"{"temp":21.5}"#,
    ]);
    assert!(
        out.status.success(),
        "send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn points(dir: &Path, measurement: &str) -> usize {
    didhub::cli::query(
        &dir.join("state/didhub.db"),
        Some(measurement),
        Duration::from_secs(3600),
        100_000,
    )
    .map(|p| p.len())
    .unwrap_or(0)
}

/// Every datagram received on a unix socket, split into lines.
struct NotifySocket {
    path: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
}

impl NotifySocket {
    fn bind(path: PathBuf) -> NotifySocket {
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        // The thread ends with the test process; the socket file goes with the temp dir.
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) => {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        let mut l = sink.lock().unwrap();
                        l.extend(text.lines().map(str::to_string));
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => return,
                }
            }
        });
        NotifySocket { path, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn count(&self, exact: &str) -> usize {
        self.lines().iter().filter(|l| *l == exact).count()
    }

    fn wait_for(&self, what: &str, mut f: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| f(l)) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} on the notify socket; got {:?}",
                self.lines()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn systemd_notify_ready_status_watchdog_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mq = Mosquitto::start();
    let (key, _) = keygen(d, "dev1");
    let cfg = hub_config(d, &mq.url()).stats_interval("1s").write();
    let notify = NotifySocket::bind(d.join("notify.sock"));
    let path = notify.path.to_str().unwrap().to_string();
    // No WATCHDOG_PID: sd-notify then trusts WATCHDOG_USEC (systemd sets both; the PID is the
    // hub's, which the test cannot know before spawning it).
    let mut hub = Hub::start_with_env(
        &cfg,
        &[
            ("NOTIFY_SOCKET", path.as_str()),
            ("WATCHDOG_USEC", "2000000"),
        ],
    );

    notify.wait_for("READY=1", |l| l == "READY=1");
    hub.wait_for_log("connected to the broker", WAIT);
    assert_eq!(notify.count("STOPPING=1"), 0);

    // Some traffic, so that a STATUS= line shows a rate.
    send(d, &mq.url(), &key, "devices/d1/telemetry", 5);
    wait_until("5 points", WAIT, || points(d, "post") == 5);
    let status = notify.wait_for("a STATUS= line with a rate", |l| {
        l.starts_with("STATUS=accepted ") && !l.starts_with("STATUS=accepted 0.0/s")
    });
    println!("STATUS line seen: {status}");
    assert!(
        status.contains("broker connected") && status.contains("outbox 0 rows"),
        "{status}"
    );

    // Pings every WATCHDOG_USEC / 2 = 1 s while the committer turns.
    wait_until("three WATCHDOG=1", Duration::from_secs(10), || {
        notify.count("WATCHDOG=1") >= 3
    });
    assert_eq!(notify.count("READY=1"), 1, "READY=1 once");

    let status = hub.terminate();
    assert!(status.success(), "clean exit: {status}");
    notify.wait_for("STOPPING=1", |l| l == "STOPPING=1");
    let lines = notify.lines();
    let ready = lines.iter().position(|l| l == "READY=1").unwrap();
    let stopping = lines.iter().position(|l| l == "STOPPING=1").unwrap();
    assert!(ready < stopping, "{lines:?}");
    println!(
        "notify socket received {} lines, e.g. {:?}",
        lines.len(),
        &lines[..lines.len().min(6)]
    );
}

/// The value of an unlabelled sample (or one with exactly these labels) in a /metrics page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_health_and_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut mq = Mosquitto::start();
    let port = free_port();
    let (key, _) = keygen(d, "dev1");
    let cfg = hub_config(d, &mq.url())
        .http_listen(&format!("127.0.0.1:{port}"))
        .write();
    let hub = Hub::start(&cfg);
    hub.wait_for_log("HTTP listener", WAIT);
    let get = |path: &str| http_get(port, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    wait_until("/readyz 200", WAIT, || get("/readyz").status == 200);
    let h = get("/healthz");
    assert_eq!((h.status, h.text().as_str()), (200, "ok\n"));

    send(d, &mq.url(), &key, "devices/d1/telemetry", 3);
    mqtt_publish(mq.port, "devices/d2/telemetry", b"not json", 1, false);
    mqtt_publish(mq.port, "devices/d2/telemetry", b"{\"x\":1}", 1, false);
    let invalid = "didhub_rejected_total{code=\"e.p.msg.invalid-message\"}";
    let unauthenticated = "didhub_rejected_total{code=\"e.p.msg.trust.not-authenticated\"}";
    let page = {
        let deadline = Instant::now() + WAIT;
        loop {
            let page = get("/metrics").text();
            if sample(&page, "didhub_accepted_total") == Some(3.0)
                && sample(&page, invalid) == Some(1.0)
                && sample(&page, unauthenticated) == Some(1.0)
            {
                break page;
            }
            assert!(Instant::now() < deadline, "counters not reached:\n{page}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let m = get("/metrics");
    assert_eq!(
        m.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    for (series, want) in [
        ("didhub_received_total", 5.0),
        ("didhub_points_total", 3.0),
        ("didhub_duplicates_total", 0.0),
        (
            "didhub_rejected_total{code=\"e.p.msg.trust.not-authorised\"}",
            0.0,
        ),
        ("didhub_mqtt_connected", 1.0),
        ("didhub_mqtt_reconnects_total", 0.0),
        ("didhub_outbox_rows", 0.0),
        ("didhub_outbox_bytes", 0.0),
        ("didhub_verify_seconds_count", 5.0),
    ] {
        assert_eq!(sample(&page, series), Some(want), "{series} in:\n{page}");
    }
    // Reports go out after the commit, in the acker: they may trail the counters above.
    wait_until("one report per reject", WAIT, || {
        let p = get("/metrics").text();
        sample(&p, "didhub_reports_sent_total").unwrap_or(0.0)
            + sample(&p, "didhub_reports_suppressed_total").unwrap_or(0.0)
            == 2.0
    });
    assert!(sample(&page, "didhub_commit_batch_size_count").unwrap() >= 1.0);
    assert!(sample(&page, "didhub_did_cache_misses_total").unwrap() >= 1.0);
    assert!(page.contains("# TYPE didhub_ship_seconds histogram"));
    assert!(!page.contains("did:key"), "no DID in any label");
    assert!(!page.contains("devices/d1"), "no topic in any label");
    println!("--- /metrics excerpt ---");
    for l in page.lines().filter(|l| {
        !l.starts_with('#')
            && (!l.contains("_bucket") || l.contains("verify_seconds_bucket{le=\"0.01\"}"))
            && !l.contains("ship_")
    }) {
        println!("{l}");
    }

    mq.stop();
    let mut not_ready = String::new();
    wait_until("/readyz 503", WAIT, || {
        let r = get("/readyz");
        not_ready = r.text();
        r.status == 503
    });
    println!("/readyz without a broker: 503 {not_ready}");
    assert!(
        not_ready.contains("broker not connected") && not_ready.contains(&mq.url()),
        "{not_ready}"
    );
    assert_eq!(get("/healthz").status, 200, "alive without a broker");
    assert_eq!(
        sample(&get("/metrics").text(), "didhub_mqtt_connected"),
        Some(0.0)
    );
    mq.start_again();
    wait_until("/readyz 200 again", WAIT, || get("/readyz").status == 200);
}

fn hup(hub: &Hub) {
    let pid = hub.pid().expect("hub running").to_string();
    let st = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn sighup_reloads_registry_and_routes_and_keeps_them_on_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mq = Mosquitto::start();
    let (key, dev) = keygen(d, "dev1");
    let registry_route = "[[routes]]\nname = \"reg\"\n\
                          topics = [\"reg/+/t\"]\nsenders = \"registry\"\nmeasurement = \"reg\"\n";
    // Rewritten below from clones of `config`: the same client_id, as a reload requires.
    let config = hub_config(d, &mq.url()).routes(registry_route);
    let cfg = config.write();
    let hub = Hub::start(&cfg);
    hub.wait_for_log("connected to the broker", WAIT);

    // Not registered yet.
    send(d, &mq.url(), &key, "reg/d1/t", 1);
    hub.wait_for_log("e.p.msg.trust.not-authorised", WAIT);
    assert_eq!(points(d, "reg"), 0);

    // Register it and add a route on a new filter; HUP.
    let good = format!(
        "{registry_route}[[routes]]\nname = \"extra\"\ntopics = [\"extra/+/t\"]\nmeasurement = \"extra\"\n\
         [[devices]]\ndid = \"{}\"\nname = \"boiler-1\"\n",
        dev.did
    );
    config.clone().routes(&good).write();
    let from = hub.logs().len();
    hup(&hub);
    let (_, line) = hub.wait_for_log_from(from, "configuration reloaded", WAIT);
    println!("reload log: {line}");
    assert!(
        line.contains("devices_added=1") && line.contains("extra/+/t"),
        "{line}"
    );
    assert!(
        hub.log()
            .find_from(from, "take effect only after a restart")
            .is_none(),
        "only routes and devices changed"
    );
    send(d, &mq.url(), &key, "reg/d1/t", 1);
    send(d, &mq.url(), &key, "extra/d1/t", 1);
    wait_until(
        "the registered device's post and the new route's",
        WAIT,
        || points(d, "reg") == 1 && points(d, "extra") == 1,
    );

    // A broken file: refused, logged with the key, the running configuration stays.
    let bad = config.routes(&format!("{good}[[routes]]\ntopics = [\"bad/#/x\"]\n"));
    std::fs::write(&cfg, bad.text()).unwrap();
    let from = hub.logs().len();
    hup(&hub);
    let (_, line) = hub.wait_for_log_from(from, "configuration reload failed", WAIT);
    println!("failed reload log: {line}");
    assert!(
        line.contains("ERROR") && line.contains("routes[2].topics") && line.contains("`#`"),
        "{line}"
    );
    send(d, &mq.url(), &key, "reg/d1/t", 1);
    send(d, &mq.url(), &key, "extra/d1/t", 1);
    wait_until("posts stored under the kept configuration", WAIT, || {
        points(d, "reg") == 2 && points(d, "extra") == 2
    });
    assert_eq!(
        hub.log().count("e.p.msg.trust.not-authorised"),
        1,
        "only the post before the reload was refused"
    );
}
