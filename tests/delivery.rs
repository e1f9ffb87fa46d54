//! Delivery: what the broker saw acknowledged is stored exactly once, across SIGKILLs of the hub.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use didhub::mapping::FieldValue;

fn stored(dir: &Path) -> Vec<didhub::mapping::Point> {
    didhub::cli::query(
        &dir.join("state/didhub.db"),
        Some("telemetry"),
        Duration::from_secs(3600),
        1_000_000,
    )
    .unwrap_or_default()
}

/// (did, seq) → how many times stored.
fn tally(points: &[didhub::mapping::Point]) -> HashMap<(String, i64), usize> {
    let mut m = HashMap::new();
    for p in points {
        let seq = match p.fields.get("seq") {
            Some(FieldValue::Float(f)) => *f as i64,
            other => panic!("point without seq: {other:?}"),
        };
        *m.entry((p.tags["did"].clone(), seq)).or_insert(0) += 1;
    }
    m
}

#[test]
fn sigkill_while_receiving_loses_and_doubles_nothing() {
    const DEVICES: usize = 3;
    const PER_DEVICE: u64 = 1500;
    let total = DEVICES * PER_DEVICE as usize;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mq = Mosquitto::start();
    // A small queue: under this load it is full again and again, and the MQTT task waits for
    // the workers to take half of it before it tops it up (`pipeline::backlogged`).
    let cfg = HubConfig::new(d, &mq.url())
        .queue(8)
        .routes(
            "[[routes]]\ntopics = [\"devices/+/telemetry\"]\nrequire = \"signed\"\n\
             measurement = \"telemetry\"\n",
        )
        .write();
    let mut hub = Hub::start(&cfg);
    hub.wait_for_log("connected to the broker", Duration::from_secs(30));

    // Several devices publish QoS 1 at full speed, in their own processes.
    let mut senders = Vec::new();
    for k in 0..DEVICES {
        let key = d.join(format!("dev{k}.json"));
        assert!(didhub(&["keygen", "--out", key.to_str().unwrap()])
            .status
            .success());
        let count = PER_DEVICE.to_string();
        let args: Vec<String> = [
            "--config",
            cfg.to_str().unwrap(),
            "send",
            "--identity",
            key.to_str().unwrap(),
            "--topic",
            &format!("devices/d{k}/telemetry"),
            "--count",
            &count,
            "--seq-field",
            "seq",
            "--payload",
            "{\"v\":1}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        senders.push(std::thread::spawn(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            didhub_with(&a, &[], None, Duration::from_secs(300))
        }));
    }

    // Kill the hub with SIGKILL whenever another slice of the stream has been committed.
    let mut kills = 0;
    for threshold in [total / 6, total / 3, total / 2] {
        let deadline = Instant::now() + Duration::from_secs(120);
        while stored(d).len() < threshold {
            assert!(
                Instant::now() < deadline,
                "stalled below {threshold}: {}",
                hub.log().tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        hub.kill9();
        kills += 1;
        let from = hub.logs().len();
        hub.start_again();
        hub.wait_for_log_from(from, "connected to the broker", Duration::from_secs(30));
    }
    for s in senders {
        let out = s.join().unwrap();
        assert!(
            out.status.success(),
            "sender: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = stored(d).len();
        if n >= total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {n} of {total} stored: {}",
            hub.log().tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Let any late redelivery land before counting.
    std::thread::sleep(Duration::from_secs(1));
    let points = stored(d);
    let t = tally(&points);
    let doubled: Vec<_> = t.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "doubled: {doubled:?}");
    assert_eq!(t.len(), total, "every (device, seq) stored");
    assert_eq!(points.len(), total, "exactly once");
    let status = hub.terminate();
    assert!(status.success());
    eprintln!(
        "sent {total}, stored {}, doubled 0, kills {kills}",
        points.len()
    );
}
