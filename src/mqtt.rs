//! MQTT ingest (rumqttc): a task that only polls, and the acker.
//!
//! The poll task forwards each publish into the bounded pipeline channel and never awaits a
//! publish or an ack of its own (rumqttc's request channel is bounded: that would deadlock).
//! Acks are manual: the acker sends them in receive order after the commit. After a connection
//! error the task backs off (capped exponential with jitter) and re-subscribes when the broker
//! reports no saved session.
//!
//! MQTT 3.1.1 and MQTT 5 are rumqttc's two client types; [`Client`] and [`EventLoop`] wrap
//! either, and the poll task sees one reduced event type, so the acker, the reloader and the
//! app are protocol-agnostic. MQTT 5 adds the publish's Response Topic (reports go there) and
//! session expiry. TLS (rustls) is a transport of either, built from `[mqtt.tls]`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;
use rumqttc::tokio_rustls::rustls;
use rumqttc::{v5, AsyncClient, ConnectionError, MqttOptions, Publish, QoS, Transport};

use crate::config::{ConfigError, MqttConfig, MqttProtocol};
use crate::pipeline::{Inbound, Reorder, Settled, Stats};

/// rumqttc's request channel: acks and reports wait here for the poll task. Larger than any
/// broker's in-flight window, so an ack never waits for long.
const REQUEST_CAPACITY: usize = 8192;

/// An oversize publish must reach the verifier (and get its report): a client-side limit
/// would drop the connection and the broker would redeliver it forever.
const MAX_PACKET: u32 = 256 * 1024 * 1024;

/// The transport for `cfg.url`: TCP, or TLS with the `[mqtt.tls]` files.
pub fn transport(cfg: &MqttConfig) -> Result<Transport, ConfigError> {
    Ok(match cfg.tls_client_config()? {
        Some(tls) => Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls)),
        None => Transport::tcp(),
    })
}

/// Builds the MQTT 3.1.1 client options from config.
pub fn options(cfg: &MqttConfig) -> Result<MqttOptions, ConfigError> {
    let (host, port) = cfg.host_port()?;
    let mut o = MqttOptions::new(cfg.client_id.clone(), host, port);
    o.set_keep_alive(cfg.keep_alive)
        .set_clean_session(cfg.clean_session)
        .set_manual_acks(true)
        .set_inflight(cfg.inflight)
        .set_max_packet_size(MAX_PACKET as usize, MAX_PACKET as usize)
        .set_transport(transport(cfg)?);
    if let Some((user, password)) = credentials(cfg)? {
        o.set_credentials(user, password);
    }
    Ok(o)
}

/// `mqtt.username` with its password (`password_file` or `password`; empty if neither), for
/// either protocol's options.
fn credentials(cfg: &MqttConfig) -> Result<Option<(String, String)>, ConfigError> {
    let Some(user) = &cfg.username else {
        return Ok(None);
    };
    let password = cfg.resolved_password()?;
    Ok(Some((
        user.clone(),
        password.map(|p| p.expose().to_string()).unwrap_or_default(),
    )))
}

/// Builds the MQTT 5 client options from config.
pub fn options_v5(cfg: &MqttConfig) -> Result<v5::MqttOptions, ConfigError> {
    let (host, port) = cfg.host_port()?;
    let mut o = v5::MqttOptions::new(cfg.client_id.clone(), host, port);
    let expiry = if cfg.clean_session {
        None
    } else {
        // validate() keeps it within u32 seconds.
        Some(cfg.session_expiry.as_secs().min(u64::from(u32::MAX)) as u32)
    };
    o.set_keep_alive(cfg.keep_alive)
        .set_clean_start(cfg.clean_session)
        .set_session_expiry_interval(expiry)
        .set_manual_acks(true)
        .set_outgoing_inflight_upper_limit(cfg.inflight)
        .set_max_packet_size(Some(MAX_PACKET))
        .set_transport(transport(cfg)?);
    if let Some((user, password)) = credentials(cfg)? {
        o.set_credentials(user, password);
    }
    Ok(o)
}

/// The hub's side of the broker connection, whichever protocol it speaks: everything the
/// acker, the reloader and shutdown need, none of it waiting on rumqttc's request channel
/// except `disconnect`.
#[derive(Clone)]
pub enum Client {
    /// MQTT 3.1.1.
    V4(AsyncClient),
    /// MQTT 5.
    V5(v5::AsyncClient),
}

/// The event loop matching a [`Client`].
pub enum EventLoop {
    /// MQTT 3.1.1.
    V4(Box<rumqttc::EventLoop>),
    /// MQTT 5.
    V5(Box<v5::EventLoop>),
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryError {
    /// rumqttc's request channel is full: try again shortly.
    Full,
    /// The event loop is gone (stopping), or the request is invalid.
    Closed,
}

fn try_v4(r: Result<(), rumqttc::ClientError>) -> Result<(), TryError> {
    match r {
        Ok(()) => Ok(()),
        Err(rumqttc::ClientError::TryRequest(_)) => Err(TryError::Full),
        Err(_) => Err(TryError::Closed),
    }
}

fn try_v5(r: Result<(), v5::ClientError>) -> Result<(), TryError> {
    match r {
        Ok(()) => Ok(()),
        Err(v5::ClientError::TryRequest(_)) => Err(TryError::Full),
        Err(_) => Err(TryError::Closed),
    }
}

fn qos(q: u8) -> QoS {
    if q == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// QoS `q` (0, or 1 for anything else) in MQTT 5's type.
pub fn qos_v5(q: u8) -> v5::mqttbytes::QoS {
    if q == 0 {
        v5::mqttbytes::QoS::AtMostOnce
    } else {
        v5::mqttbytes::QoS::AtLeastOnce
    }
}

impl Client {
    /// Acknowledges a publish. `p` is the ack token the poll task put in [`Inbound::ack`]: only
    /// its packet id and QoS matter (an MQTT 5 publish is carried in the same type).
    pub fn try_ack(&self, p: &Publish) -> Result<(), TryError> {
        match self {
            Client::V4(c) => try_v4(c.try_ack(p)),
            Client::V5(c) => {
                let mut a = v5::mqttbytes::v5::Publish::new(
                    "",
                    qos_v5(u8::from(p.qos != QoS::AtMostOnce)),
                    Bytes::new(),
                    None,
                );
                a.pkid = p.pkid;
                try_v5(c.try_ack(&a))
            }
        }
    }

    /// Publishes at QoS 1 without waiting; with MQTT 5, with `correlation_data` if given.
    pub fn try_publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        correlation_data: Option<Bytes>,
    ) -> Result<(), TryError> {
        match self {
            Client::V4(c) => try_v4(c.try_publish(topic, QoS::AtLeastOnce, false, payload)),
            Client::V5(c) => match correlation_data {
                None => {
                    try_v5(c.try_publish(topic, v5::mqttbytes::QoS::AtLeastOnce, false, payload))
                }
                Some(data) => try_v5(c.try_publish_with_properties(
                    topic,
                    v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    payload,
                    v5::mqttbytes::v5::PublishProperties {
                        correlation_data: Some(data),
                        ..Default::default()
                    },
                )),
            },
        }
    }

    /// Subscribes without waiting.
    pub fn try_subscribe(&self, filter: &str, q: u8) -> Result<(), TryError> {
        match self {
            Client::V4(c) => try_v4(c.try_subscribe(filter, qos(q))),
            Client::V5(c) => try_v5(c.try_subscribe(filter, qos_v5(q))),
        }
    }

    /// Unsubscribes without waiting.
    pub fn try_unsubscribe(&self, filter: &str) -> Result<(), TryError> {
        match self {
            Client::V4(c) => try_v4(c.try_unsubscribe(filter)),
            Client::V5(c) => try_v5(c.try_unsubscribe(filter)),
        }
    }

    /// Queues a DISCONNECT behind everything already queued (acks go out first).
    pub async fn disconnect(&self) {
        let _ = match self {
            Client::V4(c) => c.disconnect().await.map_err(|_| ()),
            Client::V5(c) => c.disconnect().await.map_err(|_| ()),
        };
    }
}

/// Creates the client and its event loop for `cfg.protocol`.
pub fn connect(cfg: &MqttConfig) -> Result<(Client, EventLoop), ConfigError> {
    Ok(match cfg.protocol {
        MqttProtocol::V311 => {
            let (c, e) = AsyncClient::new(options(cfg)?, REQUEST_CAPACITY);
            (Client::V4(c), EventLoop::V4(Box::new(e)))
        }
        MqttProtocol::V5 => {
            let (c, e) = v5::AsyncClient::new(options_v5(cfg)?, REQUEST_CAPACITY);
            (Client::V5(c), EventLoop::V5(Box::new(e)))
        }
    })
}

/// What a connection failure means for an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The client was told to stop (all clients dropped): not a failure.
    Done,
    /// The broker refused the user name or password (or the client is not authorised).
    Credentials(String),
    /// The broker refused the connection for another reason (CONNACK code).
    Refused(String),
    /// The TLS handshake failed or the broker ended the TLS session.
    Tls {
        /// What rustls said.
        error: String,
        /// What to check.
        hint: &'static str,
    },
    /// Anything else (network, timeout, protocol).
    Other(String),
}

impl Failure {
    /// A sentence that names the broker and the keys to check.
    pub fn describe(&self, broker: &str) -> String {
        match self {
            Failure::Done => "the MQTT client stopped".into(),
            Failure::Credentials(code) => format!(
                "the broker {broker} refused the credentials ({code}): check mqtt.username and \
                 mqtt.password / mqtt.password_file (and the broker's password file and ACL)"
            ),
            Failure::Refused(code) => {
                format!("the broker {broker} refused the connection ({code})")
            }
            Failure::Tls { error, hint } => {
                format!("TLS with the broker {broker} failed: {error}; {hint}")
            }
            Failure::Other(e) => format!("MQTT connection failed: {e} (broker {broker})"),
        }
    }
}

/// The rustls error somewhere in `e`'s chain: a failed handshake, or a fatal alert from the
/// broker's TLS stack after it (e.g. `CertificateRequired` when a broker with
/// `require_certificate` gets no client certificate, which arrives when the CONNECT is read).
/// `io::Error` hides a wrapped error from `source()`, so it is unwrapped by hand.
fn rustls_cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(t) = inner.downcast_ref::<rustls::Error>() {
                return Some(t);
            }
        }
        cur = err.source();
    }
    None
}

/// A TLS failure, with what to check for the common causes.
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Failure {
    use rustls::{AlertDescription as A, CertificateError as C};
    let cause = rustls_cause(e);
    let hint = match cause {
        Some(rustls::Error::AlertReceived(A::CertificateRequired)) => {
            "the broker requires a client certificate: set mqtt.tls.cert_file and mqtt.tls.key_file"
        }
        Some(rustls::Error::AlertReceived(
            A::BadCertificate | A::UnknownCA | A::CertificateUnknown | A::AccessDenied,
        )) => {
            "the broker did not accept the client certificate: check mqtt.tls.cert_file and \
             key_file (signed by a CA in the broker's cafile, and not expired)"
        }
        Some(rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature)) => {
            "the broker's certificate is not signed by a CA in mqtt.tls.ca_file (or, when it is \
             unset, the system's CAs)"
        }
        Some(rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        )) => {
            "the broker's certificate does not name the host in mqtt.url: use the name it carries \
             or set mqtt.tls.server_name"
        }
        Some(rustls::Error::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        )) => "the broker's certificate is expired or not yet valid (check both clocks)",
        _ => {
            "check mqtt.tls.ca_file (the CA that signed the broker's certificate), \
             mqtt.tls.server_name, and whether the broker requires a client certificate \
             (mqtt.tls.cert_file and key_file)"
        }
    };
    Failure::Tls {
        error: cause.map_or_else(|| e.to_string(), |c| c.to_string()),
        hint,
    }
}

/// What an MQTT 3.1.1 connection error means.
fn classify_v4(e: &ConnectionError) -> Failure {
    use rumqttc::ConnectReturnCode as C;
    match e {
        ConnectionError::RequestsDone => Failure::Done,
        ConnectionError::ConnectionRefused(c @ (C::BadUserNamePassword | C::NotAuthorized)) => {
            Failure::Credentials(format!("{c:?}"))
        }
        ConnectionError::ConnectionRefused(c) => Failure::Refused(format!("{c:?}")),
        ConnectionError::Tls(_) => tls_failure(e),
        other if rustls_cause(other).is_some() => tls_failure(other),
        other => Failure::Other(other.to_string()),
    }
}

/// What an MQTT 5 connection error means.
fn classify_v5(e: &v5::ConnectionError) -> Failure {
    use v5::mqttbytes::v5::ConnectReturnCode as C;
    use v5::ConnectionError as E;
    match e {
        E::RequestsDone => Failure::Done,
        E::ConnectionRefused(
            c @ (C::BadUserNamePassword | C::NotAuthorized | C::BadAuthenticationMethod),
        ) => Failure::Credentials(format!("{c:?}")),
        E::ConnectionRefused(c) => Failure::Refused(format!("{c:?}")),
        E::Tls(_) => tls_failure(e),
        other if rustls_cause(other).is_some() => tls_failure(other),
        other => Failure::Other(other.to_string()),
    }
}

/// One event of either protocol, reduced to what the hub's poll task and `didhub send` act on.
pub(crate) enum Ev {
    Connected {
        session_present: bool,
    },
    SubscriptionRefused,
    Publish(Received),
    /// A PUBACK for one of our own publishes.
    Acked,
    Disconnected,
    Failed(Failure),
    Other,
}

pub(crate) struct Received {
    topic: String,
    payload: Bytes,
    response_topic: Option<String>,
    correlation_data: Option<Bytes>,
    ack: Option<Publish>,
}

impl EventLoop {
    pub(crate) async fn next(&mut self) -> Ev {
        match self {
            EventLoop::V4(el) => {
                use rumqttc::{Event, Packet};
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a))) => Ev::Connected {
                        session_present: a.session_present,
                    },
                    Ok(Event::Incoming(Packet::SubAck(s))) => {
                        if s.return_codes
                            .iter()
                            .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                        {
                            Ev::SubscriptionRefused
                        } else {
                            Ev::Other
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        // The ack needs only the packet id and QoS: do not hold the payload twice.
                        let ack = (p.qos != QoS::AtMostOnce).then(|| {
                            let mut a = p.clone();
                            a.payload = Bytes::new();
                            a
                        });
                        Ev::Publish(Received {
                            topic: p.topic,
                            payload: p.payload,
                            response_topic: None,
                            correlation_data: None,
                            ack,
                        })
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => Ev::Acked,
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => Ev::Disconnected,
                    Ok(_) => Ev::Other,
                    Err(e) => Ev::Failed(classify_v4(&e)),
                }
            }
            EventLoop::V5(el) => {
                use v5::mqttbytes::v5::Packet;
                use v5::Event;
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a))) => Ev::Connected {
                        session_present: a.session_present,
                    },
                    Ok(Event::Incoming(Packet::SubAck(s))) => {
                        if s.return_codes.iter().any(|c| {
                            !matches!(c, v5::mqttbytes::v5::SubscribeReasonCode::Success(_))
                        }) {
                            Ev::SubscriptionRefused
                        } else {
                            Ev::Other
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let at_least_once = p.qos != v5::mqttbytes::QoS::AtMostOnce;
                        let ack = at_least_once.then(|| {
                            let mut a = Publish::new("", QoS::AtLeastOnce, Vec::new());
                            a.pkid = p.pkid;
                            a
                        });
                        let (response_topic, correlation_data) = p
                            .properties
                            .map(|props| (props.response_topic, props.correlation_data))
                            .unwrap_or_default();
                        let response_topic = response_topic.filter(|t| !t.is_empty());
                        Ev::Publish(Received {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            // Correlation Data means something only with a Response Topic.
                            correlation_data: correlation_data.filter(|_| response_topic.is_some()),
                            response_topic,
                            payload: p.payload,
                            ack,
                        })
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => Ev::Acked,
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => Ev::Disconnected,
                    Ok(_) => Ev::Other,
                    Err(e) => Ev::Failed(classify_v5(&e)),
                }
            }
        }
    }
}

/// Capped exponential backoff with full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// From `min` up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            attempt: 0,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .min
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt += 1;
        let jitter = rand::thread_rng().gen_range(0.5..=1.0);
        exp.mul_f64(jitter)
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// State shared with the rest of the hub.
#[derive(Debug, Default)]
pub struct Link {
    /// Connected to the broker right now.
    pub connected: AtomicBool,
    /// Reconnects so far.
    pub reconnects: AtomicU64,
}

/// The subscriptions (filter, qos) the poll task makes on a fresh session; a reload
/// replaces them.
pub type Subscriptions = Arc<Mutex<Vec<(String, u8)>>>;

/// Subscribes to `filter` without waiting (the request goes out with the next poll).
pub fn subscribe(client: &Client, filter: &str, qos: u8) {
    if let Err(e) = client.try_subscribe(filter, qos) {
        tracing::error!(filter = %filter, error = ?e, "could not subscribe");
    }
}

/// The poll task. Stops forwarding when `input` is emptied (shutdown); returns when the
/// client disconnects.
#[allow(clippy::too_many_arguments)]
pub async fn poll_loop(
    mut eventloop: EventLoop,
    client: Client,
    subscriptions: Subscriptions,
    input: Arc<Mutex<Option<flume::Sender<Inbound>>>>,
    stats: Arc<Stats>,
    link: Arc<Link>,
    mut backoff: Backoff,
    broker: String,
) {
    let mut seq: u64 = 0;
    let mut ever_connected = false;
    loop {
        match eventloop.next().await {
            Ev::Connected { session_present } => {
                backoff.reset();
                link.connected.store(true, Ordering::Relaxed);
                if ever_connected {
                    link.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(broker = %broker, session_present, "reconnected to the broker");
                } else {
                    tracing::info!(broker = %broker, session_present, "connected to the broker");
                }
                // Subscribe on this process's first connection (routes may have changed since
                // the session was made) and whenever the broker kept no session.
                let subscribe = !ever_connected || !session_present;
                ever_connected = true;
                if subscribe {
                    let subs = subscriptions
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone();
                    for (filter, qos) in &subs {
                        self::subscribe(&client, filter, *qos);
                    }
                }
            }
            Ev::SubscriptionRefused => {
                tracing::error!(
                    broker = %broker,
                    "the broker refused a subscription: check its ACL for the hub's user"
                );
            }
            Ev::Publish(p) => {
                stats.received.fetch_add(1, Ordering::Relaxed);
                let sender = input.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let Some(sender) = sender else {
                    // Stopping: not acknowledged, so the broker redelivers it next session.
                    continue;
                };
                let inbound = Inbound {
                    seq,
                    topic: p.topic,
                    payload: p.payload,
                    response_topic: p.response_topic,
                    correlation_data: p.correlation_data,
                    ack: p.ack,
                    received_ns: crate::now_ns(),
                };
                seq += 1;
                if sender.is_full() {
                    // Overloaded: let the workers take half the queue, then top it up, rather
                    // than be woken for each message they take (see `pipeline::backlogged`).
                    // The broker holds the rest meanwhile.
                    while crate::pipeline::backlogged(&sender) {
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                    }
                }
                if sender.send_async(inbound).await.is_err() {
                    tracing::debug!("pipeline closed; message left unacknowledged");
                }
            }
            Ev::Disconnected => {
                link.connected.store(false, Ordering::Relaxed);
                tracing::info!("disconnected from the broker");
                return;
            }
            Ev::Acked | Ev::Other => {}
            Ev::Failed(Failure::Done) => {
                link.connected.store(false, Ordering::Relaxed);
                return;
            }
            Ev::Failed(f) => {
                link.connected.store(false, Ordering::Relaxed);
                let delay = backoff.next_delay();
                let message = f.describe(&broker);
                match f {
                    // An operator must act: the hub receives nothing until they do.
                    Failure::Credentials(_) | Failure::Tls { .. } | Failure::Refused(_) => {
                        tracing::error!(broker = %broker, retry_in = ?delay, "{message}")
                    }
                    _ => tracing::warn!(broker = %broker, retry_in = ?delay, "{message}"),
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The acker: publishes reports, then acknowledges, in receive order.
///
/// It never waits on rumqttc's request channel: the poll task may itself be waiting for room in
/// the pipeline, and the pipeline for this task (a cycle that deadlocks under a large
/// redelivered backlog). Acks that do not fit are kept, in order, and retried shortly.
pub async fn acker(rx: flume::Receiver<Vec<Settled>>, client: Client, stats: Arc<Stats>) {
    let mut reorder = Reorder::new(0);
    let mut waiting: VecDeque<Publish> = VecDeque::new();
    let mut open = true;
    while open || !waiting.is_empty() {
        flush_acks(&client, &stats, &mut waiting);
        let next = if waiting.is_empty() {
            rx.recv_async().await.ok()
        } else if open {
            tokio::select! {
                r = rx.recv_async() => r.ok(),
                _ = tokio::time::sleep(Duration::from_millis(2)) => continue,
            }
        } else {
            // Closed: only the held acks remain; the poll task is no longer blocked.
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        };
        let Some(next) = next else {
            open = false;
            for s in reorder.drain() {
                settle(&client, &stats, s, &mut waiting);
            }
            continue;
        };
        for s in next {
            for s in reorder.push(s) {
                settle(&client, &stats, s, &mut waiting);
            }
        }
    }
}

fn flush_acks(client: &Client, stats: &Stats, waiting: &mut VecDeque<Publish>) {
    while let Some(p) = waiting.front() {
        match client.try_ack(p) {
            Ok(()) => {
                stats.acked.fetch_add(1, Ordering::Relaxed);
                waiting.pop_front();
            }
            Err(TryError::Full) => return,
            Err(TryError::Closed) => {
                // The event loop is gone (stopping): the broker redelivers what is unacked.
                waiting.clear();
                return;
            }
        }
    }
}

fn settle(client: &Client, stats: &Stats, s: Settled, waiting: &mut VecDeque<Publish>) {
    if let Some(r) = s.report {
        match client.try_publish(r.topic.clone(), r.body.into_bytes(), r.correlation_data) {
            Ok(()) => {
                stats.reports_sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                stats.reports_suppressed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(topic = %r.topic, error = ?e, "report not sent");
            }
        }
    }
    if let Some(p) = s.ack {
        // In receive order: behind any ack still waiting.
        waiting.push_back(p);
        flush_acks(client, stats, waiting);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] <= Duration::from_millis(100) && d[0] >= Duration::from_millis(50));
        assert!(d.iter().all(|x| *x <= Duration::from_secs(1)));
        assert!(d[7] >= Duration::from_millis(500));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
