//! The device-side and operator commands: `send`, `query`.

use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::Value;

use crate::config::{parse_broker_url, Config, MqttConfig, MqttProtocol, Secret, TlsConfig};
use crate::did::Identity;
use crate::mapping::{FieldValue, Point};
use crate::store;
use crate::verify::{pack_post, Envelope};

/// What `send` does.
#[derive(Debug, Clone)]
pub struct SendPlan {
    /// The device identity.
    pub device: Identity,
    /// The hub DID.
    pub to: String,
    /// `mqtt://host:port`.
    pub broker: String,
    /// Topic.
    pub topic: String,
    /// The payload.
    pub payload: Value,
    /// Envelope.
    pub mode: Envelope,
    /// How many.
    pub count: u64,
    /// Messages per second (None: as fast as possible).
    pub rate: Option<f64>,
    /// Publish QoS.
    pub qos: u8,
    /// Put the message number into this payload member (object payloads).
    pub seq_field: Option<String>,
    /// The first message number.
    pub seq_start: u64,
    /// Print progress on stderr.
    pub progress: bool,
    /// Give up when the broker makes no progress for this long (see [`send_with`]; the CLI's
    /// default, 60 s, was the acknowledgement wait before there was a flag).
    pub timeout: Duration,
    /// The MQTT version to speak.
    pub protocol: MqttProtocol,
    /// MQTT 5: the Response Topic of every publish (the hub sends its problem reports there),
    /// with the post's message id as Correlation Data.
    pub response_topic: Option<String>,
}

/// `send`'s client, whichever protocol it speaks.
enum SendClient {
    V4(AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl SendClient {
    /// Publishes `payload`; with MQTT 5 and a `response`, that Response Topic and `id` as the
    /// Correlation Data.
    async fn publish(
        &self,
        topic: &str,
        qos: QoS,
        payload: Vec<u8>,
        response: Option<(&str, &str)>,
    ) -> Result<(), String> {
        match self {
            SendClient::V4(c) => c
                .publish(topic, qos, false, payload)
                .await
                .map_err(|e| e.to_string()),
            SendClient::V5(c) => {
                use rumqttc::v5::mqttbytes::v5::PublishProperties;
                let qos = crate::mqtt::qos_v5(u8::from(qos != QoS::AtMostOnce));
                let r = match response {
                    Some((rt, id)) => {
                        let props = PublishProperties {
                            response_topic: Some(rt.to_string()),
                            correlation_data: Some(bytes::Bytes::copy_from_slice(id.as_bytes())),
                            ..Default::default()
                        };
                        c.publish_with_properties(topic, qos, false, payload, props)
                            .await
                    }
                    None => c.publish(topic, qos, false, payload).await,
                };
                r.map_err(|e| e.to_string())
            }
        }
    }

    async fn disconnect(&self) {
        // With QoS 0 and the broker gone the request queue may be full: do not wait for room.
        let wait = Duration::from_secs(2);
        let _ = match self {
            SendClient::V4(c) => tokio::time::timeout(wait, c.disconnect()).await.map(|_| ()),
            SendClient::V5(c) => tokio::time::timeout(wait, c.disconnect()).await.map(|_| ()),
        };
    }
}

/// How `send` authenticates to the broker and secures the connection (`mqtts://` URLs).
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// User name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<Secret>,
    /// CA file, client certificate and key, server name.
    pub tls: TlsConfig,
}

impl Connection {
    /// The connection settings of the hub's `[mqtt]` section (password file read now).
    pub fn from_mqtt(m: &MqttConfig) -> Result<Connection, String> {
        Ok(Connection {
            username: m.username.clone(),
            password: m.resolved_password().map_err(|e| e.to_string())?,
            tls: m.tls.clone(),
        })
    }
}

/// The result of `send`.
#[derive(Debug, Clone, Copy)]
pub struct SendSummary {
    /// Published.
    pub sent: u64,
    /// Acknowledged by the broker (QoS 1).
    pub acked: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// The default topic for a device: the first route's first filter, wildcards filled in.
pub fn default_topic(cfg: &Config, device_did: &str) -> String {
    let filter = cfg
        .routes
        .first()
        .and_then(|r| r.topics.first())
        .cloned()
        .unwrap_or_else(|| "devices/+/telemetry".into());
    let short: String = device_did
        .chars()
        .rev()
        .take(8)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    filter
        .split('/')
        .map(|l| match l {
            "+" => short.as_str(),
            "#" => "post",
            other => other,
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The hub DID from `state_dir/hub.did` (written by the hub on start).
pub fn hub_did_from_state(cfg: &Config) -> Result<String, String> {
    let p = cfg.state_dir.join("hub.did");
    std::fs::read_to_string(&p)
        .map(|s| s.trim().to_string())
        .map_err(|e| {
            format!(
                "cannot read the hub DID from {}: {e}; start the hub once (`didhub run`) or pass --to DID",
                p.display()
            )
        })
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Packs and publishes posts over a plain, anonymous connection.
pub async fn send(plan: SendPlan) -> Result<SendSummary, String> {
    send_with(plan, &Connection::default()).await
}

/// Packs and publishes posts, with credentials and TLS from `conn`.
///
/// `plan.timeout` bounds every wait on the broker, so a broker that disappears mid-run ends the
/// run with an error instead of a hang: the connection (at most 10 s), each publish (the client's
/// request queue fills while the broker is away) and, with QoS 1, the time without an
/// acknowledgement while a post waits for one. Waits for `--rate` are not waits on the broker.
pub async fn send_with(plan: SendPlan, conn: &Connection) -> Result<SendSummary, String> {
    let url = parse_broker_url(&plan.broker)?;
    let (host, port) = (url.host.clone(), url.port);
    let transport = if url.tls {
        let flag = |k: &str| format!("--{}", k.replace('_', "-"));
        let tls = conn
            .tls
            .client_config_named(&flag)
            .map_err(|e| e.to_string())?;
        rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls))
    } else if conn.tls.is_set() {
        return Err(format!(
            "--ca-file, --cert-file and --key-file need a TLS broker URL, mqtts://host:port (got {})",
            plan.broker
        ));
    } else {
        rumqttc::Transport::tcp()
    };
    let client_id = format!(
        "didhub-send-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let credentials = conn.username.as_ref().map(|user| {
        let password = conn.password.as_ref().map(|p| p.expose().to_string());
        (user.clone(), password.unwrap_or_default())
    });
    let (client, mut eventloop) = match plan.protocol {
        MqttProtocol::V311 => {
            let mut opts = MqttOptions::new(client_id, host, port);
            opts.set_keep_alive(Duration::from_secs(30))
                .set_clean_session(true)
                .set_inflight(200)
                .set_max_packet_size(256 * 1024 * 1024, 256 * 1024 * 1024)
                .set_transport(transport);
            if let Some((user, password)) = credentials {
                opts.set_credentials(user, password);
            }
            let (c, e) = AsyncClient::new(opts, 1000);
            (SendClient::V4(c), crate::mqtt::EventLoop::V4(Box::new(e)))
        }
        MqttProtocol::V5 => {
            let mut opts = rumqttc::v5::MqttOptions::new(client_id, host, port);
            opts.set_keep_alive(Duration::from_secs(30))
                .set_clean_start(true)
                .set_outgoing_inflight_upper_limit(200)
                .set_max_packet_size(Some(256 * 1024 * 1024))
                .set_transport(transport);
            if let Some((user, password)) = credentials {
                opts.set_credentials(user, password);
            }
            let (c, e) = rumqttc::v5::AsyncClient::new(opts, 1000);
            (SendClient::V5(c), crate::mqtt::EventLoop::V5(Box::new(e)))
        }
    };
    let broker = plan.broker.clone();
    let acked = Arc::new(AtomicU64::new(0));
    let (conn_tx, mut conn_rx) = tokio::sync::watch::channel(None::<Result<(), String>>);
    let acked2 = acked.clone();
    let poll = tokio::spawn(async move {
        use crate::mqtt::Ev;
        loop {
            match eventloop.next().await {
                Ev::Connected { .. } => {
                    let _ = conn_tx.send(Some(Ok(())));
                }
                Ev::Acked => {
                    acked2.fetch_add(1, Ordering::Relaxed);
                }
                Ev::Disconnected => return,
                Ev::Failed(f) => {
                    let _ = conn_tx.send(Some(Err(f.describe(&broker))));
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                // `send` subscribes to nothing.
                Ev::SubscriptionRefused | Ev::Publish(_) | Ev::Other => {}
            }
        }
    });
    // Wait for the connection so a wrong broker address fails fast and clearly.
    let connect_wait = plan.timeout.min(Duration::from_secs(10));
    let connected = tokio::time::timeout(connect_wait, async {
        loop {
            if conn_rx.changed().await.is_err() {
                return Err("connection task ended".to_string());
            }
            if let Some(r) = conn_rx.borrow().clone() {
                return r;
            }
        }
    })
    .await
    .map_err(|_| {
        poll.abort();
        format!(
            "no answer from the broker {} within {}",
            plan.broker,
            humantime::format_duration(connect_wait)
        )
    })?;
    if let Err(e) = connected {
        poll.abort();
        return Err(format!("cannot connect: {e}"));
    }

    let qos = if plan.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    // Ends the run when the broker made no progress for `plan.timeout`: names the broker and
    // says how far the run got, so a script can tell a dead broker from a slow one.
    let give_up = |published: u64| -> String {
        if plan.progress {
            eprintln!();
        }
        poll.abort();
        let last_error = match conn_rx.borrow().clone() {
            Some(Err(why)) => format!("; last error: {why}"),
            _ => String::new(),
        };
        let acks = if qos == QoS::AtLeastOnce {
            format!("{} acknowledged", acked.load(Ordering::Relaxed))
        } else {
            "none acknowledged (QoS 0)".to_string()
        };
        format!(
            "gave up on the broker {}: no progress for {} (--timeout); {published} of {} posts \
             handed to the MQTT client, {acks}{last_error}",
            plan.broker,
            humantime::format_duration(plan.timeout),
            plan.count,
        )
    };
    // QoS 1: the broker's progress is its acknowledgements. The clock runs only while a post
    // waits for one, so a slow --rate is not a stall.
    let (mut ack_seen, mut ack_since) = (0u64, Instant::now());
    let mut ack_stalled = |published: u64| -> bool {
        let now_acked = acked.load(Ordering::Relaxed);
        if now_acked > ack_seen || now_acked >= published {
            (ack_seen, ack_since) = (now_acked, Instant::now());
            return false;
        }
        ack_since.elapsed() >= plan.timeout
    };
    let start = Instant::now();
    let mut last_progress = Instant::now();
    for i in 0..plan.count {
        if let Some(rate) = plan.rate {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        if qos == QoS::AtLeastOnce && ack_stalled(i) {
            return Err(give_up(i));
        }
        let mut payload = plan.payload.clone();
        if let (Some(f), Value::Object(m)) = (&plan.seq_field, &mut payload) {
            m.insert(f.clone(), Value::from(plan.seq_start + i));
        }
        // Time-ordered ids (UUIDv7): the hub's replay index appends them (README, "Message ids").
        let id = uuid::Uuid::now_v7().to_string();
        let packed = pack_post(&plan.device, &plan.to, &id, payload, plan.mode, now_secs()).await?;
        // The request queue is bounded: while the broker is away it fills and publish waits.
        let response = plan.response_topic.as_deref().map(|t| (t, id.as_str()));
        match tokio::time::timeout(
            plan.timeout,
            client.publish(&plan.topic, qos, packed.into_bytes(), response),
        )
        .await
        {
            Ok(r) => r.map_err(|e| format!("publish failed: {e}"))?,
            Err(_) => return Err(give_up(i)),
        }
        if plan.count == 1 {
            eprintln!(
                "sent post {id} ({}) to {} on {}",
                plan.mode.as_str(),
                plan.to,
                plan.topic
            );
        }
        if plan.progress && last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            let el = start.elapsed().as_secs_f64();
            eprint!(
                "\rsent {}/{}  acked {}  {:.0} msg/s   ",
                i + 1,
                plan.count,
                acked.load(Ordering::Relaxed),
                (i + 1) as f64 / el
            );
            let _ = std::io::stderr().flush();
        }
    }
    if qos == QoS::AtLeastOnce {
        while acked.load(Ordering::Relaxed) < plan.count {
            if ack_stalled(plan.count) {
                return Err(give_up(plan.count));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let elapsed = start.elapsed();
    client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), poll).await;
    let summary = SendSummary {
        sent: plan.count,
        acked: if qos == QoS::AtLeastOnce {
            acked.load(Ordering::Relaxed)
        } else {
            0
        },
        elapsed,
    };
    if plan.progress {
        eprintln!();
    }
    Ok(summary)
}

/// Output formats of `query`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// One JSON object per line.
    Json,
    /// CSV with a header.
    Csv,
    /// InfluxDB line protocol.
    Line,
}

fn fmt_field(v: &FieldValue) -> String {
    match v {
        FieldValue::Float(f) => format!("{f}"),
        FieldValue::Bool(b) => b.to_string(),
        FieldValue::Str(s) => s.clone(),
    }
}

fn rfc3339(ns: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_nanos(t).to_string()
}

fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Renders points.
pub fn render(points: &[Point], format: Format) -> String {
    let mut out = String::new();
    match format {
        Format::Line => {
            for p in points {
                out.push_str(&p.to_line());
                out.push('\n');
            }
        }
        Format::Json => {
            for p in points {
                let v = serde_json::json!({
                    "time": rfc3339(p.timestamp_ns),
                    "timestamp_ns": p.timestamp_ns,
                    "measurement": p.measurement,
                    "tags": p.tags,
                    "fields": p.fields,
                });
                out.push_str(&v.to_string());
                out.push('\n');
            }
        }
        Format::Csv | Format::Table if points.is_empty() => {}
        Format::Csv | Format::Table => {
            let mut tag_keys: Vec<&String> = points.iter().flat_map(|p| p.tags.keys()).collect();
            tag_keys.sort();
            tag_keys.dedup();
            let mut field_keys: Vec<&String> =
                points.iter().flat_map(|p| p.fields.keys()).collect();
            field_keys.sort();
            field_keys.dedup();
            let mut rows: Vec<Vec<String>> = Vec::new();
            let mut header = vec!["time".to_string(), "measurement".to_string()];
            header.extend(tag_keys.iter().map(|k| k.to_string()));
            header.extend(field_keys.iter().map(|k| k.to_string()));
            rows.push(header);
            for p in points {
                let mut r = vec![rfc3339(p.timestamp_ns), p.measurement.clone()];
                r.extend(
                    tag_keys
                        .iter()
                        .map(|k| p.tags.get(*k).cloned().unwrap_or_default()),
                );
                r.extend(
                    field_keys
                        .iter()
                        .map(|k| p.fields.get(*k).map(fmt_field).unwrap_or_default()),
                );
                rows.push(r);
            }
            if format == Format::Csv {
                for r in rows {
                    let cells: Vec<String> = r.iter().map(|c| csv_cell(c)).collect();
                    out.push_str(&cells.join(","));
                    out.push('\n');
                }
            } else {
                let widths: Vec<usize> = (0..rows[0].len())
                    .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
                    .collect();
                for r in rows {
                    let cells: Vec<String> = r
                        .iter()
                        .zip(&widths)
                        .map(|(c, w)| format!("{c:<w$}"))
                        .collect();
                    out.push_str(cells.join("  ").trim_end());
                    out.push('\n');
                }
            }
        }
    }
    out
}

/// Opens the store read-only for queries.
pub fn open_for_query(db: &Path) -> Result<rusqlite::Connection, String> {
    if !db.exists() {
        return Err(format!(
            "no store at {}: start the hub first (`didhub run`), or check state_dir in hub.toml",
            db.display()
        ));
    }
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("{}: {e}", db.display()))?;
    c.busy_timeout(Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    Ok(c)
}

/// Reads points from the embedded store.
pub fn query(
    db: &Path,
    measurement: Option<&str>,
    since: Duration,
    limit: usize,
) -> Result<Vec<Point>, String> {
    let c = open_for_query(db)?;
    let since_ns = crate::now_ns() - since.as_nanos().min(i64::MAX as u128) as i64;
    store::query_points(&c, measurement, since_ns, limit).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn renders_every_format() {
        let mut tags = BTreeMap::new();
        tags.insert("did".to_string(), "did:key:z6Mk".to_string());
        let mut fields = BTreeMap::new();
        fields.insert("temp".to_string(), FieldValue::Float(21.5));
        fields.insert("note".to_string(), FieldValue::Str("a,b".into()));
        let p = Point {
            measurement: "telemetry".into(),
            tags,
            fields,
            timestamp_ns: 1_700_000_000_000_000_000,
        };
        let t = render(std::slice::from_ref(&p), Format::Table);
        assert!(t.starts_with("time"), "{t}");
        assert!(
            t.contains("21.5") && t.contains("2023-11-14T22:13:20"),
            "{t}"
        );
        let c = render(std::slice::from_ref(&p), Format::Csv);
        assert!(c.contains("\"a,b\""), "{c}");
        let j = render(std::slice::from_ref(&p), Format::Json);
        let v: Value = serde_json::from_str(j.trim()).unwrap();
        assert_eq!(v["fields"]["temp"], 21.5);
        let l = render(std::slice::from_ref(&p), Format::Line);
        assert_eq!(
            l.trim(),
            "telemetry,did=did:key:z6Mk note=\"a,b\",temp=21.5 1700000000000000000"
        );
    }

    /// A broker that accepts the connection and then never acknowledges a publish: the
    /// acknowledgement wait must end at --timeout with the broker and the counts named.
    #[tokio::test]
    async fn send_gives_up_when_the_broker_stops_acknowledging() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let broker = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            let _ = sock.read(&mut buf).await;
            // CONNACK, session not present, accepted; then swallow everything.
            sock.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
            while sock.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        });
        let device = Identity::generate(crate::did::DidMethod::Key);
        let hub = Identity::generate(crate::did::DidMethod::Key);
        let plan = SendPlan {
            device,
            to: hub.did,
            broker: format!("mqtt://127.0.0.1:{port}"),
            topic: "devices/x/telemetry".into(),
            payload: serde_json::json!({"v": 1}),
            mode: Envelope::Signed,
            count: 3,
            rate: None,
            qos: 1,
            seq_field: None,
            seq_start: 0,
            progress: false,
            timeout: Duration::from_millis(300),
            protocol: MqttProtocol::V311,
            response_topic: None,
        };
        let started = Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(30), send(plan))
            .await
            .expect("send returned")
            .expect_err("no acknowledgement: an error");
        assert!(started.elapsed() >= Duration::from_millis(300), "{err}");
        assert!(
            err.contains(&format!("mqtt://127.0.0.1:{port}")),
            "names the broker: {err}"
        );
        assert!(err.contains("3 of 3 posts"), "{err}");
        assert!(err.contains("0 acknowledged"), "{err}");
        broker.abort();
    }
}
