//! Secured broker connections against a real mosquitto: TLS with a CA file, client
//! certificates (mTLS), a password file, and MQTT 5 (Response Topic, session expiry).
//!
//! The PKI is made here with the `openssl` CLI (Debian package `openssl`) in a temporary
//! directory: a CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a
//! second, unrelated CA. mosquitto started as root drops privileges before it reads its CA, key
//! and password files; the harness puts `user root` in its config when the tests run as root.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use didhub::did::Identity;
use didhub::verify::{pack_post, unpack_report, Envelope, REPORT_TYPE};
use serde_json::json;
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// A throwaway PKI
// ---------------------------------------------------------------------------------------------

/// PEM files of a test PKI.
struct Pki {
    _dir: TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    /// A CA that signed none of the above.
    other_ca: PathBuf,
    /// A server certificate for `broker.test` only (no IP address).
    named_cert: PathBuf,
    named_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let bin = find_program("openssl", &["/usr/bin/openssl"], "openssl");
    let out = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed P-256 CA: `name.crt`, `name.key`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-sha256",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

/// A leaf `name.crt`/`name.key` (PKCS#8) signed by `ca`, with `ext` (x509v3 lines).
fn make_leaf(dir: &Path, ca: &str, name: &str, ext: &str) {
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-sha256",
            "-days",
            "2",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.crt"),
        ],
    );
}

impl Pki {
    fn generate() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("didhub-pki-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        make_ca(d, "ca");
        make_ca(d, "other-ca");
        make_leaf(
            d,
            "ca",
            "server",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        );
        make_leaf(
            d,
            "ca",
            "named",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=DNS:broker.test\n",
        );
        make_leaf(
            d,
            "ca",
            "client",
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=clientAuth\n",
        );
        Pki {
            ca: d.join("ca.crt"),
            server_cert: d.join("server.crt"),
            server_key: d.join("server.key"),
            client_cert: d.join("client.crt"),
            client_key: d.join("client.key"),
            other_ca: d.join("other-ca.crt"),
            named_cert: d.join("named.crt"),
            named_key: d.join("named.key"),
            _dir: dir,
        }
    }
}

/// A throwaway PKI and a mosquitto whose listener is TLS with a certificate of it.
struct TlsBroker {
    /// Stopped before the PKI directory is removed (fields drop in order).
    mq: Mosquitto,
    pki: Pki,
}

impl TlsBroker {
    /// The server certificate for 127.0.0.1 and localhost; client certificates required or not.
    fn start(require_certificate: bool) -> TlsBroker {
        Self::launch(false, require_certificate)
    }

    /// The server certificate that names only `broker.test`.
    fn start_named() -> TlsBroker {
        Self::launch(true, false)
    }

    fn launch(named: bool, require_certificate: bool) -> TlsBroker {
        let pki = Pki::generate();
        let (cert, key) = if named {
            (&pki.named_cert, &pki.named_key)
        } else {
            (&pki.server_cert, &pki.server_key)
        };
        // These lines apply to the harness's listener.
        let mut conf = format!(
            "cafile {}\ncertfile {}\nkeyfile {}\n",
            p(&pki.ca),
            p(cert),
            p(key)
        );
        if require_certificate {
            conf.push_str("require_certificate true\n");
        }
        let mq = Mosquitto::start_with(&conf);
        TlsBroker { mq, pki }
    }

    /// `mqtts://127.0.0.1:PORT`.
    fn url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.mq.port)
    }
}

/// A hub's `[mqtt.tls]` table: `ca_file` and `more` lines.
fn mqtt_tls(ca_file: &Path, more: &str) -> String {
    format!("[mqtt.tls]\nca_file = \"{}\"\n{more}", p(ca_file))
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Hub and device
// ---------------------------------------------------------------------------------------------

/// The route of every hub here.
const ROUTE: &str = "[[routes]]\ntopics = [\"devices/+/telemetry\"]\n\
                     measurement = \"telemetry\"\n";

/// A hub started on a config of its own in its own temporary directory.
struct TestHub {
    /// Stopped before its directory is removed (fields drop in order).
    hub: Hub,
    cfg: PathBuf,
    dir: TempDir,
}

impl TestHub {
    /// Writes `dir/hub.toml` (the broker at `url`, `mqtt` as more `[mqtt]` lines, `ROUTE`),
    /// validates it and starts the hub on it; waits for nothing.
    fn start(dir: TempDir, url: &str, mqtt: &str) -> TestHub {
        let cfg = HubConfig::new(dir.path(), url)
            .reconnect_max("1s")
            .workers(2)
            .mqtt(mqtt)
            .routes(ROUTE)
            .write();
        let hub = Hub::start(&cfg);
        TestHub { hub, cfg, dir }
    }

    /// Like `start`, then waits until the hub is connected and ready.
    fn ready(dir: TempDir, url: &str, mqtt: &str) -> TestHub {
        let t = Self::start(dir, url, mqtt);
        t.hub.wait_for_log("connected to the broker", WAIT);
        t.hub.wait_for_log("didhub ready", WAIT);
        t
    }
}

fn tempdir() -> TempDir {
    tempfile::tempdir().unwrap()
}

fn stored(dir: &Path) -> usize {
    didhub::cli::query(
        &dir.join("state/didhub.db"),
        Some("telemetry"),
        Duration::from_secs(3600),
        100_000,
    )
    .map(|v| v.len())
    .unwrap_or(0)
}

fn keygen(dir: &Path) -> PathBuf {
    let path = dir.join(format!("device-{}.json", uuid::Uuid::new_v4().simple()));
    let out = didhub(&["keygen", "--out", p(&path)]);
    assert!(out.status.success(), "keygen: {out:?}");
    path
}

/// `didhub send` of one signed post with `extra` flags; returns the output.
fn send(dir: &Path, broker: &str, extra: &[&str]) -> std::process::Output {
    let device = keygen(dir);
    let to = hub_did(dir);
    let mut args = vec![
        "send",
        "--identity",
        p(&device),
        "--to",
        &to,
        "--broker",
        broker,
        "--topic",
        "devices/d1/telemetry",
        "--payload",
        r#"{"temp": 21.5}"#,
    ];
    args.extend_from_slice(extra);
    didhub(&args)
}

fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "didhub send failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// (a) TLS with a CA file
// ---------------------------------------------------------------------------------------------

#[test]
fn tls_with_ca_file_stores_a_post_sent_over_mqtts() {
    let tls = TlsBroker::start(false);
    let t = TestHub::ready(tempdir(), &tls.url(), &mqtt_tls(&tls.pki.ca, ""));
    let (d, cfg) = (t.dir.path(), &t.cfg);

    let out = send(d, &tls.url(), &["--ca-file", p(&tls.pki.ca)]);
    assert_ok(&out);
    wait_until("the post stored", WAIT, || stored(d) == 1);

    // Without --broker, send takes url and [mqtt.tls] from hub.toml.
    let device = keygen(d);
    let out = didhub(&[
        "--config",
        p(cfg),
        "send",
        "--identity",
        p(&device),
        "--topic",
        "devices/d2/telemetry",
        "--payload",
        r#"{"temp": 22}"#,
    ]);
    assert_ok(&out);
    wait_until("the second post stored", WAIT, || stored(d) == 2);

    // A plain-TCP send to the TLS port fails clearly.
    let out = send(d, &tls.mq.url(), &[]);
    assert!(!out.status.success(), "plain MQTT to a TLS listener");
}

#[test]
fn tls_with_the_wrong_ca_is_refused_and_logged() {
    let tls = TlsBroker::start(false);
    let t = TestHub::start(tempdir(), &tls.url(), &mqtt_tls(&tls.pki.other_ca, ""));
    let (d, hub) = (t.dir.path(), &t.hub);
    let line = hub.wait_for_log("TLS with the broker", WAIT);
    eprintln!("wrong CA: {line}");
    assert!(line.contains("ERROR"), "{line}");
    assert!(
        line.contains(&tls.url()) && line.contains("mqtt.tls.ca_file"),
        "names the broker and the key: {line}"
    );
    assert!(
        line.contains("UnknownIssuer") && line.contains("not signed by a CA in mqtt.tls.ca_file"),
        "says why: {line}"
    );
    // Retries with backoff, never connects.
    wait_until("a second attempt", WAIT, || {
        hub.log().count("TLS with the broker") >= 2
    });
    assert_eq!(hub.log().count("connected to the broker"), 0);

    // send with the wrong CA: a clear error, non-zero exit.
    let out = send(d, &tls.url(), &["--ca-file", p(&tls.pki.other_ca)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("send with the wrong CA: {err}");
    assert!(err.contains("TLS with the broker"), "{err}");
}

#[test]
fn tls_config_errors_exit_78_naming_key_and_path() {
    let pki = Pki::generate();
    let dir = tempdir();
    let d = dir.path();
    let validate = |mqtt: &str| {
        let path = d.join("bad.toml");
        std::fs::write(
            &path,
            format!(
                "state_dir = \"{}\"\n[mqtt]\n{mqtt}\n[[routes]]\ntopics = [\"a/+\"]\n",
                d.join("state").display()
            ),
        )
        .unwrap();
        let out = didhub(&["--config", p(&path), "validate"]);
        assert_eq!(out.status.code(), Some(78), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let missing = d.join("nope.pem");
    let err = validate(&format!(
        "url = \"mqtts://127.0.0.1\"\n[mqtt.tls]\nca_file = \"{}\"\n",
        p(&missing)
    ));
    assert!(
        err.contains("mqtt.tls.ca_file") && err.contains(p(&missing)),
        "{err}"
    );
    let not_pem = d.join("not.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let err = validate(&format!(
        "url = \"mqtts://127.0.0.1\"\n[mqtt.tls]\nca_file = \"{}\"\n",
        p(&not_pem)
    ));
    assert!(
        err.contains("mqtt.tls.ca_file") && err.contains("no PEM certificate"),
        "{err}"
    );
    let err = validate(&format!(
        "url = \"mqtts://127.0.0.1\"\n[mqtt.tls]\nca_file = \"{}\"\ncert_file = \"{}\"\n",
        p(&pki.ca),
        p(&pki.client_cert)
    ));
    assert!(
        err.contains("mqtt.tls.key_file") && err.contains("needs its private key"),
        "{err}"
    );
    let err = validate(&format!(
        "url = \"mqtts://127.0.0.1\"\n[mqtt.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        p(&pki.client_cert),
        p(&pki.client_cert)
    ));
    assert!(
        err.contains("mqtt.tls.key_file") && err.contains("no PEM private key"),
        "{err}"
    );
    let err = validate(&format!(
        "url = \"mqtt://127.0.0.1\"\n[mqtt.tls]\nca_file = \"{}\"\n",
        p(&pki.ca)
    ));
    assert!(
        err.contains("mqtt.tls") && err.contains("mqtts://"),
        "{err}"
    );
    let err = validate("protocol = \"v4\"\n");
    assert!(err.contains("protocol"), "{err}");
}

#[test]
fn tls_server_name_override_checks_the_certificate_against_that_name() {
    let tls = TlsBroker::start_named();
    // Reached by IP address, the certificate names only broker.test: refused, with the hint.
    let t = TestHub::start(tempdir(), &tls.url(), &mqtt_tls(&tls.pki.ca, ""));
    let line = t.hub.wait_for_log("TLS with the broker", WAIT);
    assert!(
        line.contains("mqtt.tls.server_name") && line.contains("does not name the host"),
        "{line}"
    );
    drop(t);
    // With server_name = "broker.test" it connects and stores.
    let name = "server_name = \"broker.test\"\n";
    let t2 = TestHub::ready(tempdir(), &tls.url(), &mqtt_tls(&tls.pki.ca, name));
    let d2 = t2.dir.path();
    let device = keygen(d2);
    let out = didhub(&[
        "--config",
        p(&t2.cfg),
        "send",
        "--identity",
        p(&device),
        "--topic",
        "devices/d1/telemetry",
        "--payload",
        r#"{"temp": 20}"#,
    ]);
    assert_ok(&out);
    wait_until("the post stored", WAIT, || stored(d2) == 1);
}

// ---------------------------------------------------------------------------------------------
// (b) Client certificates
// ---------------------------------------------------------------------------------------------

#[test]
fn mtls_client_certificate_connects_and_no_certificate_is_refused() {
    let tls = TlsBroker::start(true);
    let pki = &tls.pki;
    let client = format!(
        "cert_file = \"{}\"\nkey_file = \"{}\"\n",
        p(&pki.client_cert),
        p(&pki.client_key)
    );
    let t = TestHub::ready(tempdir(), &tls.url(), &mqtt_tls(&pki.ca, &client));
    let d = t.dir.path();
    let out = send(
        d,
        &tls.url(),
        &[
            "--ca-file",
            p(&pki.ca),
            "--cert-file",
            p(&pki.client_cert),
            "--key-file",
            p(&pki.client_key),
        ],
    );
    assert_ok(&out);
    wait_until("the post stored", WAIT, || stored(d) == 1);

    // A second hub without a client certificate: refused, and the log says so.
    let t2 = TestHub::start(tempdir(), &tls.url(), &mqtt_tls(&pki.ca, ""));
    let (d2, hub2) = (t2.dir.path(), &t2.hub);
    let line = hub2.wait_for_log("TLS with the broker", WAIT);
    eprintln!("no client certificate: {line}");
    assert!(line.contains("ERROR"), "{line}");
    assert!(
        line.contains("CertificateRequired")
            && line.contains("requires a client certificate: set mqtt.tls.cert_file"),
        "says a certificate is missing and which key: {line}"
    );
    assert_eq!(hub2.log().count("connected to the broker"), 0);

    // send without --cert-file: refused too.
    let out = send(d2, &tls.url(), &["--ca-file", p(&pki.ca)]);
    assert!(!out.status.success(), "no client certificate must fail");
}

// ---------------------------------------------------------------------------------------------
// (c) Password file
// ---------------------------------------------------------------------------------------------

fn password_broker() -> (Mosquitto, TempDir) {
    let auth = tempfile::tempdir().unwrap();
    let passwd = auth.path().join("passwd");
    let bin = find_program(
        "mosquitto_passwd",
        &["/usr/bin/mosquitto_passwd"],
        "mosquitto",
    );
    let out = Command::new(bin)
        .args(["-b", "-c", p(&passwd), "hub", "s3cret"])
        .output()
        .expect("run mosquitto_passwd");
    assert!(out.status.success(), "mosquitto_passwd: {out:?}");
    let mq = Mosquitto::start_with(&format!(
        "allow_anonymous false\npassword_file {}\n",
        passwd.display()
    ));
    (mq, auth)
}

#[test]
fn password_file_right_password_stores_wrong_password_is_a_clear_error() {
    let (mq, _auth) = password_broker();
    let credentials =
        |file: &Path| format!("username = \"hub\"\npassword_file = \"{}\"\n", p(file));
    let dir = tempdir();
    let pw = dir.path().join("mqtt.password");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let t = TestHub::ready(dir, &mq.url(), &credentials(&pw));
    let d = t.dir.path();
    let out = send(
        d,
        &mq.url(),
        &["--username", "hub", "--password-file", p(&pw)],
    );
    assert_ok(&out);
    wait_until("the post stored", WAIT, || stored(d) == 1);

    // Anonymous send: refused with the clear message.
    let out = send(d, &mq.url(), &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("anonymous send: {err}");
    assert!(err.contains("refused the credentials"), "{err}");

    // A hub with the wrong password: ERROR naming the broker, retried with backoff.
    let dir2 = tempdir();
    let wrong = dir2.path().join("mqtt.password");
    std::fs::write(&wrong, "wrong\n").unwrap();
    let t2 = TestHub::start(dir2, &mq.url(), &credentials(&wrong));
    let hub2 = &t2.hub;
    let line = hub2.wait_for_log("refused the credentials", WAIT);
    eprintln!("wrong password: {line}");
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains(&mq.url()), "names the broker: {line}");
    assert!(line.contains("mqtt.password_file"), "names the key: {line}");
    let first = Instant::now();
    wait_until("a retry", WAIT, || {
        hub2.log().count("refused the credentials") >= 3
    });
    std::thread::sleep(Duration::from_secs(3));
    let attempts = hub2.log().count("refused the credentials");
    let secs = first.elapsed().as_secs_f64();
    eprintln!("wrong password: {attempts} attempts in {secs:.1} s");
    // reconnect_min 50ms doubling to reconnect_max 1s: a handful per second at most, not a
    // tight loop (hundreds).
    assert!(
        (attempts as f64) < 4.0 + 2.0 * secs,
        "{attempts} refused attempts in {secs:.1} s: not backing off"
    );
    assert_eq!(hub2.log().count("connected to the broker"), 0);
}

// ---------------------------------------------------------------------------------------------
// (d) MQTT 5
// ---------------------------------------------------------------------------------------------

fn mosquitto_pub_v5(
    port: u16,
    topic: &str,
    payload: &str,
    response_topic: &str,
    correlation_data: &str,
) {
    let bin = find_program(
        "mosquitto_pub",
        &["/usr/bin/mosquitto_pub"],
        "mosquitto-clients",
    );
    let out = Command::new(bin)
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-V", "mqttv5", "-q", "1", "-t", topic, "-m", payload])
        .args(["-D", "publish", "response-topic", response_topic])
        .args(["-D", "publish", "correlation-data", correlation_data])
        .output()
        .expect("run mosquitto_pub");
    assert!(out.status.success(), "mosquitto_pub: {out:?}");
}

/// An MQTT 5 subscriber to the Response Topics used here and to the route's report topic.
fn v5_replies(port: u16) -> Collector {
    Collector::start(
        port,
        &["replies/#", "devices/+/telemetry/problem-report"],
        &SubOptions {
            protocol: "mqttv5",
            ..Default::default()
        },
    )
}

#[test]
fn v5_report_goes_to_the_response_topic_and_the_session_survives_a_restart() {
    let mq = Mosquitto::start();
    let v5 = "protocol = \"v5\"\nsession_expiry = \"1h\"\n";
    let mut t = TestHub::ready(tempdir(), &mq.url(), v5);
    let (d, hub) = (t.dir.path(), &mut t.hub);
    let to = hub_did(d);
    let device = Identity::load(&keygen(d)).unwrap();

    let replies = v5_replies(mq.port);
    // Accepted (stored, acked), and rejected (plaintext on an authenticated route).
    let good = block(pack_post(
        &device,
        &to,
        "v5-good",
        json!({"temp": 1}),
        Envelope::Signed,
        now(),
    ))
    .unwrap();
    mosquitto_pub_v5(
        mq.port,
        "devices/d1/telemetry",
        &good,
        "replies/d1",
        "req-good",
    );
    let bad = block(pack_post(
        &device,
        &to,
        "v5-bad",
        json!({"temp": 2}),
        Envelope::Plaintext,
        now(),
    ))
    .unwrap();
    mosquitto_pub_v5(
        mq.port,
        "devices/d1/telemetry",
        &bad,
        "replies/d1",
        "req-17",
    );
    wait_until("the signed post stored", WAIT, || stored(d) == 1);
    let got = replies.wait_for_messages(1, WAIT);
    assert_eq!(got[0].topic, "replies/d1", "the publish's Response Topic");
    assert_eq!(
        got[0].correlation_data, "req-17",
        "the rejected publish's Correlation Data"
    );
    let (report, signer) = block(unpack_report(&device, &got[0].text())).unwrap();
    assert_eq!(signer.as_deref(), Some(to.as_str()));
    assert_eq!(report["type"], REPORT_TYPE);
    assert_eq!(report["pthid"], "v5-bad", "{report}");

    // Session expiry keeps the session while the hub is down: a post published meanwhile is
    // delivered after the restart.
    hub.terminate();
    let later = block(pack_post(
        &device,
        &to,
        "v5-later",
        json!({"temp": 3}),
        Envelope::Signed,
        now(),
    ))
    .unwrap();
    mosquitto_pub_v5(
        mq.port,
        "devices/d1/telemetry",
        &later,
        "replies/d1",
        "req-later",
    );
    let from = hub.logs().len();
    hub.start_again();
    let (_, line) = hub.wait_for_log_from(from, "connected to the broker", WAIT);
    assert!(line.contains("session_present=true"), "{line}");
    wait_until("the post sent while down stored", WAIT, || stored(d) == 2);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(replies.messages().len(), 1, "only the one report");
    // The first run's manual acks reached the broker: nothing it had stored came again.
    assert_eq!(
        hub.log().count("redelivery: acked and dropped"),
        0,
        "{}",
        hub.log().tail()
    );
}

/// `didhub send --protocol v5 --response-topic`: the post goes out over MQTT 5, and the hub's
/// problem report for a rejected one comes back on that topic, with the post's message id as
/// Correlation Data. Without `--protocol v5` the flag is refused with what to do.
#[test]
fn send_over_mqtt5_gets_its_reports_on_its_response_topic() {
    let mq = Mosquitto::start();
    let t = TestHub::ready(tempdir(), &mq.url(), "protocol = \"v5\"\n");
    let d = t.dir.path();
    let replies = v5_replies(mq.port);
    let v5 = ["--protocol", "v5", "--response-topic", "replies/d1"];
    assert_ok(&send(d, &mq.url(), &v5));
    wait_until("the signed post stored", WAIT, || stored(d) == 1);

    // Plaintext on an authenticated route: rejected, reported to the Response Topic.
    let out = send(d, &mq.url(), &[&v5[..], &["--mode", "plaintext"]].concat());
    assert_ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let id = stderr
        .split_whitespace()
        .skip_while(|w| *w != "post")
        .nth(1)
        .unwrap_or_else(|| panic!("no message id in: {stderr}"))
        .to_string();
    let got = replies.wait_for_messages(1, WAIT);
    assert_eq!(got[0].topic, "replies/d1", "the Response Topic");
    assert_eq!(
        got[0].correlation_data, id,
        "the post's id as Correlation Data"
    );
    let report: serde_json::Value = serde_json::from_str(&got[0].text()).unwrap();
    assert!(
        report.get("signatures").is_some(),
        "a signed report: {report}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(replies.messages().len(), 1, "only the one report");
    assert_eq!(stored(d), 1);

    let out = send(d, &mq.url(), &["--response-topic", "replies/d1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--protocol v5"), "{stderr}");
}
