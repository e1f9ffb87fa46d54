//! End to end: the real daemon, a real mosquitto, a real VictoriaMetrics, started here.
//!
//! Every envelope accepted under the right route; every row of the PROTOCOL.md code table
//! provoked, its report received on the right topic, unpacked, signature checked, linked;
//! redelivery not duplicated; embedded mode and InfluxDB mode; the shipped hub.toml runs.

mod common;

use std::path::Path;
use std::time::Duration;

use common::routes::ENVELOPE_ROUTES as ROUTES;
use common::*;
use didhub::did::Identity;
use didhub::verify::{pack_message, pack_post, unpack_report, Envelope, REPORT_TYPE};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

/// Report limits high enough for every case below, and the `escalate_to` the reports carry.
const REPORTS: &str = r#"[reports]
per_sender_per_second = 100.0
per_sender_burst = 1000.0
global_per_second = 1000.0
global_burst = 1000.0
escalate_to = "mailto:ops@example.com"
"#;

/// The hub config of the tests below: an external broker, two workers, `REPORTS`.
fn hub_config(dir: &Path, mqtt_url: &str) -> HubConfig {
    HubConfig::new(dir, mqtt_url)
        .reconnect_max("1s")
        .workers(2)
        .tables(REPORTS)
}

fn points(dir: &Path, measurement: &str) -> Vec<didhub::mapping::Point> {
    didhub::cli::query(
        &dir.join("state/didhub.db"),
        Some(measurement),
        Duration::from_secs(3600),
        100_000,
    )
    .unwrap_or_default()
}

fn send_cli(cfg: &Path, identity: &Path, mode: &str, topic: &str, payload: &str) {
    let out = didhub(&[
        "--config",
        cfg.to_str().unwrap(),
        "send",
        "--identity",
        identity.to_str().unwrap(),
        "--mode",
        mode,
        "--topic",
        topic,
        "--payload",
        payload,
    ]);
    assert!(
        out.status.success(),
        "send {mode} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn envelopes_codes_reports_and_redelivery_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let mq = Mosquitto::start();
    let d = dir.path();

    // Devices: dev1 is registered, dev2 is not; dev3 is a did:peer:2 device.
    let (k1, k2, k3) = (
        d.join("dev1.json"),
        d.join("dev2.json"),
        d.join("dev3.json"),
    );
    for (k, m) in [(&k1, "key"), (&k2, "key"), (&k3, "peer")] {
        let out = didhub(&["keygen", "--out", k.to_str().unwrap(), "--method", m]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dev1 = Identity::load(&k1).unwrap();
    let dev2 = Identity::load(&k2).unwrap();
    let dev3 = Identity::load(&k3).unwrap();
    assert!(dev3.did.starts_with("did:peer:2"));
    let registry = format!(
        "[[devices]]\ndid = \"{}\"\nname = \"boiler-1\"\ntags = {{ site = \"lab\" }}\n",
        dev1.did
    );
    let cfg = hub_config(d, &mq.url())
        .routes(&format!("{ROUTES}{registry}"))
        .write();
    let mut hub = Hub::start(&cfg);
    hub.wait_for_log("connected to the broker", WAIT);
    let hub_did = hub_did(d);
    let reports = Collector::start(
        mq.port,
        &["+/+/t/problem-report", "open/+/problem-report"],
        &SubOptions::default(),
    );

    // --- Every envelope is accepted under a route that allows it (through the CLI). ---
    for mode in [
        "signed",
        "authcrypt",
        "anoncrypt-signed",
        "authcrypt-signed",
    ] {
        send_cli(
            &cfg,
            &k1,
            mode,
            "auth/d1/t",
            &format!(r#"{{"mode":"{mode}","v":1}}"#),
        );
    }
    send_cli(&cfg, &k3, "authcrypt", "auth/peer/t", r#"{"peer":true}"#);
    send_cli(&cfg, &k3, "signed", "auth/peer/t", r#"{"peer":true}"#);
    for mode in ["plaintext", "anoncrypt"] {
        send_cli(&cfg, &k1, mode, "open/x", "42");
    }
    for mode in ["signed", "anoncrypt-signed", "authcrypt-signed"] {
        send_cli(&cfg, &k1, mode, "signed/d1/t", r#"{"s":1}"#);
    }
    for mode in ["authcrypt", "authcrypt-signed"] {
        send_cli(&cfg, &k1, mode, "ac/d1/t", r#"{"a":1}"#);
    }
    send_cli(&cfg, &k1, "signed", "reg/d1/t", r#"{"r":1}"#);
    wait_until("all accepted points", WAIT, || {
        points(d, "auth").len() == 6
            && points(d, "open").len() == 2
            && points(d, "signed").len() == 3
            && points(d, "ac").len() == 2
            && points(d, "reg").len() == 1
    });
    let auth = points(d, "auth");
    let p = auth
        .iter()
        .find(|p| {
            p.fields.get("mode") == Some(&didhub::mapping::FieldValue::Str("authcrypt".into()))
        })
        .expect("the authcrypt point");
    assert_eq!(p.tags["did"], dev1.did);
    assert_eq!(p.tags["device"], "d1");
    assert!(p.fields.contains_key("thid"));
    assert_eq!(p.fields["v"], didhub::mapping::FieldValue::Float(1.0));
    assert!(
        auth.iter().any(|p| p.tags["did"] == dev3.did),
        "did:peer:2 sender stored"
    );
    let open = points(d, "open");
    assert!(
        open.iter().all(|p| !p.tags.contains_key("did")),
        "anonymous: no did tag"
    );
    assert_eq!(
        open[0].fields["value"],
        didhub::mapping::FieldValue::Float(42.0)
    );
    let reg = &points(d, "reg")[0];
    assert_eq!(reg.tags["device_name"], "boiler-1");
    assert_eq!(reg.tags["site"], "lab");
    assert!(
        reports.messages().is_empty(),
        "no report for accepted posts: {:?}",
        reports.lines()
    );

    // --- Every row of the code table, with its report. ---
    let post = |dev: &Identity, mode: Envelope, payload: Value| {
        let id = uuid::Uuid::new_v4().to_string();
        (
            block(pack_post(dev, &hub_did, &id, payload, mode, now())).unwrap(),
            id,
        )
    };
    let custom = |dev: &Identity, mode: Envelope, extra: Value| {
        let id = uuid::Uuid::new_v4().to_string();
        let mut m = json!({
            "id": id, "typ": "application/didcomm-plain+json", "type": "iota/post/0.1/post",
            "from": dev.did, "to": [hub_did], "body": {"payload": {"x": 1}},
        });
        for (k, v) in extra.as_object().unwrap() {
            if v.is_null() {
                m.as_object_mut().unwrap().remove(k);
            } else {
                m[k] = v.clone();
            }
        }
        (block(pack_message(dev, &hub_did, m, mode)).unwrap(), id)
    };
    let tampered = {
        let (s, id) = post(&dev1, Envelope::Signed, json!({"x": 1}));
        let mut j: Value = serde_json::from_str(&s).unwrap();
        let sig = j["signatures"][0]["signature"]
            .as_str()
            .unwrap()
            .to_string();
        let mut b = sig.into_bytes();
        b[10] = if b[10] == b'A' { b'B' } else { b'A' };
        j["signatures"][0]["signature"] = json!(String::from_utf8(b).unwrap());
        (j.to_string(), id)
    };
    let unknown_did = {
        let (s, id) = post(&dev1, Envelope::Signed, json!({"x": 1}));
        let mut j: Value = serde_json::from_str(&s).unwrap();
        j["signatures"][0]["header"]["kid"] = json!("did:example:123#key-1");
        (j.to_string(), id)
    };

    struct Case {
        name: &'static str,
        topic: &'static str,
        bytes: String,
        id: Option<String>,
        code: &'static str,
        encrypted: bool,
    }
    let case = |name, topic, (bytes, id): (String, String), code, enc| Case {
        name,
        topic,
        bytes,
        id: Some(id),
        code,
        encrypted: enc,
    };
    let cases = vec![
        Case {
            name: "not json",
            topic: "auth/d1/t",
            bytes: "not json".into(),
            id: None,
            code: "e.p.msg.invalid-message",
            encrypted: false,
        },
        case(
            "body without payload",
            "auth/d1/t",
            custom(&dev1, Envelope::Signed, json!({"body": {"other": 1}})),
            "e.p.msg.invalid-message",
            true,
        ),
        case(
            "unsupported type",
            "auth/d1/t",
            custom(
                &dev1,
                Envelope::Signed,
                json!({"type": "https://didcomm.org/basicmessage/2.0/message"}),
            ),
            "e.p.msg.unsupported-message",
            true,
        ),
        case(
            "plaintext on authenticated route",
            "auth/d1/t",
            post(&dev1, Envelope::Plaintext, json!({"x": 1})),
            "e.p.msg.trust.not-authenticated",
            false,
        ),
        case(
            "anoncrypt on authenticated route",
            "auth/d1/t",
            post(&dev1, Envelope::Anoncrypt, json!({"x": 1})),
            "e.p.msg.trust.not-authenticated",
            false,
        ),
        case(
            "authcrypt on signed route",
            "signed/d1/t",
            post(&dev1, Envelope::Authcrypt, json!({"x": 1})),
            "e.p.msg.trust.not-signed",
            true,
        ),
        case(
            "signed on authcrypt route",
            "ac/d1/t",
            post(&dev1, Envelope::Signed, json!({"x": 1})),
            "e.p.msg.trust.not-sender-authenticated",
            false,
        ),
        case(
            "tampered signature",
            "auth/d1/t",
            tampered,
            "e.p.msg.trust.crypto",
            false,
        ),
        case(
            "from is not the signer",
            "auth/d1/t",
            custom(&dev1, Envelope::Signed, json!({"from": dev2.did})),
            "e.p.msg.trust.crypto",
            false,
        ),
        case(
            "unresolvable sender DID",
            "auth/d1/t",
            unknown_did,
            "e.p.msg.trust.not-authenticated",
            false,
        ),
        case(
            "verified but not in the registry",
            "reg/d2/t",
            post(&dev2, Envelope::Signed, json!({"x": 1})),
            "e.p.msg.trust.not-authorised",
            true,
        ),
        case(
            "expired",
            "auth/d1/t",
            custom(&dev1, Envelope::Signed, json!({"expires_time": now() - 10})),
            "e.p.req.time",
            true,
        ),
        case(
            "created in the future",
            "auth/d1/t",
            custom(
                &dev1,
                Envelope::Signed,
                json!({"created_time": now() + 3600}),
            ),
            "e.p.req.time",
            true,
        ),
        case(
            "to without the hub",
            "auth/d1/t",
            custom(&dev1, Envelope::Signed, json!({"to": [dev2.did]})),
            "e.p.msg.iota.post.reject-post",
            true,
        ),
        case(
            "nothing storable",
            "auth/d1/t",
            post(&dev1, Envelope::Signed, json!({"a": null})),
            "e.p.msg.iota.post.reject-post",
            true,
        ),
        Case {
            name: "oversize",
            topic: "auth/d1/t",
            bytes: format!("{{\"pad\":\"{}\"}}", "x".repeat(70_000)),
            id: None,
            code: "e.p.msg.iota.post.reject-post",
            encrypted: false,
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        mqtt_publish(mq.port, c.topic, c.bytes.as_bytes(), 1, false);
        let got = reports.wait_for_messages(i + 1, WAIT);
        let m = &got[i];
        assert_eq!(m.topic, format!("{}/problem-report", c.topic), "{}", c.name);
        let body = m.text();
        assert_eq!(
            body.contains("ciphertext"),
            c.encrypted,
            "{}: encryption",
            c.name
        );
        // Reports are encrypted to the verified sender: the registry case is dev2's.
        let reader = if c.topic.starts_with("reg/") {
            &dev2
        } else {
            &dev1
        };
        let (report, signer) = block(unpack_report(reader, &body))
            .unwrap_or_else(|e| panic!("{}: report does not unpack: {e}", c.name));
        assert_eq!(
            signer.as_deref(),
            Some(hub_did.as_str()),
            "{}: signed by the hub",
            c.name
        );
        assert_eq!(report["type"], REPORT_TYPE, "{}", c.name);
        assert_eq!(report["from"], hub_did.as_str(), "{}", c.name);
        assert_eq!(report["body"]["code"], c.code, "{}: {report}", c.name);
        assert_eq!(report["body"]["escalate_to"], "mailto:ops@example.com");
        assert!(report["body"]["comment"].as_str().unwrap().contains("{1}"));
        match &c.id {
            Some(id) => {
                assert_eq!(report["pthid"], id.as_str(), "{}: pthid", c.name);
                assert_eq!(report["ack"], json!([id]), "{}: ack", c.name);
            }
            None => assert!(report.get("pthid").is_none(), "{}: unlinked", c.name),
        }
    }

    // --- Redelivery: the same message twice is stored once, without a report. ---
    let before = points(d, "auth").len();
    let (bytes, id) = post(&dev1, Envelope::Signed, json!({"dup": 1}));
    mqtt_publish(mq.port, "auth/d1/t", bytes.as_bytes(), 1, false);
    mqtt_publish(mq.port, "auth/d1/t", bytes.as_bytes(), 1, false);
    // A problem report sent to the hub, and a post on the hub's own report topic: never answered.
    let report_to_hub = custom(
        &dev1,
        Envelope::Signed,
        json!({"type": REPORT_TYPE, "body": {"code": "e.p.msg.invalid-message"}}),
    );
    mqtt_publish(mq.port, "auth/d1/t", report_to_hub.0.as_bytes(), 1, false);
    let (own, _) = post(&dev1, Envelope::Plaintext, json!({"own": 1}));
    // (open/y/z/… is not watched by the collector, so only the hub could react to it.)
    mqtt_publish(mq.port, "open/y/z/problem-report", own.as_bytes(), 1, false);
    // A replayed id with different content is a reject.
    let (replay, _) = custom(
        &dev1,
        Envelope::Signed,
        json!({"id": id, "body": {"payload": {"dup": 2}}}),
    );
    mqtt_publish(mq.port, "auth/d1/t", replay.as_bytes(), 1, false);
    let got = reports.wait_for_messages(cases.len() + 1, WAIT);
    let (last, _) = block(unpack_report(&dev1, &got[cases.len()].text())).unwrap();
    assert_eq!(
        last["body"]["code"], "e.p.msg.iota.post.reject-post",
        "{last}"
    );
    assert_eq!(
        last["pthid"],
        id.as_str(),
        "the replay's report; nothing came before it"
    );
    let auth = points(d, "auth");
    assert_eq!(auth.len(), before + 1, "stored exactly once");
    assert_eq!(points(d, "open").len(), 2, "own report topic not stored");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        reports.messages().len(),
        cases.len() + 1,
        "{:?}",
        reports.lines()
    );

    let status = hub.terminate();
    assert!(
        status.success(),
        "clean exit: {status:?}\n{}",
        hub.log().tail()
    );
    let logs = hub.logs().join("\n");
    assert!(
        logs.contains("duplicates=1"),
        "summary counts the redelivery:\n{logs}"
    );
    assert!(logs.contains("ignored=2"), "{logs}");
}

#[test]
fn influxdb_mode_ships_to_victoriametrics_and_survives_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mq = Mosquitto::start();
    let mut vm = Victoria::start();
    let cfg = hub_config(d, &mq.url())
        .influxdb(&vm.url())
        .influxdb_retry_min("100ms")
        .routes(
            r#"[[routes]]
topics = ["devices/+/telemetry"]
measurement = "telemetry"
topic_tags = "devices/+device/telemetry"
timestamp = "ts"
timestamp_format = "unix_ms"
"#,
        )
        .write();
    let key = d.join("dev.json");
    assert!(didhub(&["keygen", "--out", key.to_str().unwrap()])
        .status
        .success());
    let mut hub = Hub::start(&cfg);
    hub.wait_for_log("connected to the broker", WAIT);
    // VictoriaMetrics keeps milliseconds and its dedup flag merges samples of one series within
    // a millisecond, so each post carries its own time (`ts`, 1 ms apart) instead of relying on
    // receive times being a millisecond apart.
    let dev = Identity::load(&key).unwrap();
    let hub_did = hub_did(d);
    let base_ms = now() * 1000 - 120_000;
    let send = |from: u64, to: u64| {
        for i in from..to {
            let id = uuid::Uuid::new_v4().to_string();
            let payload = json!({"seq": i, "temp": 21.5, "ts": base_ms + i});
            let bytes = block(pack_post(
                &dev,
                &hub_did,
                &id,
                payload,
                Envelope::Signed,
                now(),
            ))
            .unwrap();
            mqtt_publish(mq.port, "devices/d1/telemetry", bytes.as_bytes(), 1, false);
        }
    };
    send(0, 30);
    let series = vm.wait_for_samples("telemetry_seq", 30, WAIT);
    let mut seqs: Vec<f64> = series.iter().flat_map(|s| s.values.clone()).collect();
    seqs.sort_by(f64::total_cmp);
    assert_eq!(
        seqs,
        (0..30).map(f64::from).collect::<Vec<_>>(),
        "each once"
    );
    assert!(series[0].label("did").unwrap().starts_with("did:key:"));
    assert_eq!(series[0].label("device"), Some("d1"));
    let ts: Vec<i64> = series.iter().flat_map(|s| s.timestamps.clone()).collect();
    assert!(
        ts.contains(&(base_ms as i64 + 7)),
        "the payload time is the point time"
    );

    // The store goes away: points wait in the outbox and arrive when it is back.
    vm.stop();
    send(30, 50);
    hub.wait_for_log("store write failed", WAIT);
    vm.start_again();
    let series = vm.wait_for_samples("telemetry_seq", 50, Duration::from_secs(60));
    let mut seqs: Vec<f64> = series.iter().flat_map(|s| s.values.clone()).collect();
    seqs.sort_by(f64::total_cmp);
    assert_eq!(
        seqs,
        (0..50).map(f64::from).collect::<Vec<_>>(),
        "0 lost, 0 doubled"
    );
    vm.assert_sample_count_stays("telemetry_seq", 50, Duration::from_secs(2));
    let logs = hub.logs().join("\n");
    assert!(!logs.contains("secret-token"), "the token is never logged");
    let status = hub.terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn shipped_hub_toml_with_embedded_broker_walkthrough() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/hub.toml")).unwrap();
    let text = shipped
        .replace("127.0.0.1:1883", &format!("127.0.0.1:{port}"))
        .replace(
            "state_dir = \"state\"",
            &format!("state_dir = \"{}\"", d.join("state").display()),
        );
    let cfg = d.join("hub.toml");
    std::fs::write(&cfg, text).unwrap();
    let c = cfg.to_str().unwrap();
    let out = didhub(&["--config", c, "validate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut hub = Hub::start(&cfg);
    let ready = hub.wait_for_log("didhub ready", WAIT);
    assert!(ready.contains("devices/+/telemetry"), "{ready}");
    hub.wait_for_log("connected to the broker", WAIT);
    let created = hub.wait_for_log("created the hub identity", WAIT);
    let id_out = didhub(&["--config", c, "identity", "--doc"]);
    let id_text = String::from_utf8_lossy(&id_out.stdout).to_string();
    let did = id_text.lines().next().unwrap().to_string();
    assert!(created.contains(&did), "{created}");
    let doc: Value = serde_json::from_str(&id_text[did.len()..]).unwrap();
    assert_eq!(doc["id"], did.as_str());
    assert!(!doc["keyAgreement"].as_array().unwrap().is_empty());
    let mode = std::fs::metadata(d.join("state/identity.json")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);

    let key = d.join("dev1.json");
    assert!(didhub(&["keygen", "--out", key.to_str().unwrap()])
        .status
        .success());
    let out = didhub(&[
        "--config",
        c,
        "send",
        "--identity",
        key.to_str().unwrap(),
        "--payload",
        r#"{"temp":21.5}"#,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut rows = Vec::new();
    wait_until("the point", WAIT, || {
        let q = didhub(&[
            "--config",
            c,
            "query",
            "--measurement",
            "telemetry",
            "--since",
            "10m",
            "--format",
            "json",
        ]);
        rows = String::from_utf8_lossy(&q.stdout)
            .lines()
            .map(String::from)
            .collect();
        !rows.is_empty()
    });
    let p: Value = serde_json::from_str(&rows[0]).unwrap();
    assert_eq!(p["fields"]["temp"], 21.5);
    let q = didhub(&[
        "--config",
        c,
        "query",
        "--measurement",
        "telemetry",
        "--format",
        "line",
    ]);
    let line = String::from_utf8_lossy(&q.stdout).to_string();
    assert!(line.starts_with("telemetry,device="), "{line}");
    assert!(line.contains("temp=21.5"), "{line}");
    let status = hub.terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn validate_names_the_key_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    for (text, key) in [
        ("[[routes]]\ntopics = [\"a/#/b\"]\n", "routes[0].topics"),
        (
            "[[routes]]\ntopics = [\"a\"]\n[mqtt]\nurll = \"x\"\n",
            "urll",
        ),
        (
            "[[routes]]\ntopics = [\"a\"]\n[store]\nkind = \"influxdb\"\n",
            "store.influxdb",
        ),
    ] {
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, text).unwrap();
        let out = didhub(&["--config", p.to_str().unwrap(), "validate"]);
        assert_eq!(out.status.code(), Some(78), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{err}");
    }
    let out = didhub_with(
        &[
            "--config",
            dir.path().join("bad.toml").to_str().unwrap(),
            "validate",
        ],
        &[("HUB__STORE__KIND", "embedded")],
        None,
        CLI_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "env override fixes it: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hub_writes_its_own_stats_points_to_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mq = Mosquitto::start();
    let cfg = HubConfig::new(d, &mq.url()).stats_interval("200ms").write();
    let mut hub = Hub::start(&cfg);
    hub.wait_for_log("connected to the broker", WAIT);
    mqtt_publish(mq.port, "devices/x/telemetry", b"not json", 1, false);
    let mut stats = Vec::new();
    wait_until("a didhub_stats point counting the reject", WAIT, || {
        stats = points(d, didhub::stats::STATS_MEASUREMENT);
        stats.iter().any(|p| {
            p.fields.get("rejected_invalid_message")
                == Some(&didhub::mapping::FieldValue::Float(1.0))
        })
    });
    let p = stats.last().unwrap();
    assert_eq!(p.tags["hub"], hub_did(d));
    for f in didhub::stats::STATS_FIELDS {
        assert!(p.fields.contains_key(*f), "field {f} missing: {p:?}");
    }
    assert!(hub.terminate().success());
}
