//! MQTT ingest (rumqttc): a task that only polls, and the acker.
//!
//! The poll task forwards each publish into the bounded pipeline channel and never awaits a
//! publish or an ack of its own (rumqttc's request channel is bounded: that would deadlock).
//! Acks are manual: the acker sends them in receive order after the commit. After a connection
//! error the task backs off (capped exponential with jitter) and re-subscribes when the broker
//! reports no saved session.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, Publish, QoS};

use crate::config::{ConfigError, MqttConfig};
use crate::pipeline::{Inbound, Reorder, Settled, Stats};

/// rumqttc's request channel: acks and reports wait here for the poll task. Larger than any
/// broker's in-flight window, so an ack never waits for long.
const REQUEST_CAPACITY: usize = 8192;

/// Builds the client options from config.
pub fn options(cfg: &MqttConfig) -> Result<MqttOptions, ConfigError> {
    let (host, port) = cfg.host_port()?;
    let mut o = MqttOptions::new(cfg.client_id.clone(), host, port);
    o.set_keep_alive(cfg.keep_alive)
        .set_clean_session(cfg.clean_session)
        .set_manual_acks(true)
        .set_inflight(cfg.inflight)
        // An oversize publish must reach the verifier (and get its report): a client-side
        // limit would drop the connection and the broker would redeliver it forever.
        .set_max_packet_size(256 * 1024 * 1024, 256 * 1024 * 1024);
    if let Some(user) = &cfg.username {
        let pw = cfg.resolved_password()?;
        o.set_credentials(
            user.clone(),
            pw.map(|p| p.expose().to_string()).unwrap_or_default(),
        );
    }
    Ok(o)
}

/// Creates the client and its event loop.
pub fn connect(cfg: &MqttConfig) -> Result<(AsyncClient, EventLoop), ConfigError> {
    Ok(AsyncClient::new(options(cfg)?, REQUEST_CAPACITY))
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
pub fn subscribe(client: &AsyncClient, filter: &str, qos: u8) {
    let q = if qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    if let Err(e) = client.try_subscribe(filter, q) {
        tracing::error!(filter = %filter, error = %e, "could not subscribe");
    }
}

/// The poll task. Stops forwarding when `input` is emptied (shutdown); returns when the
/// client disconnects.
#[allow(clippy::too_many_arguments)]
pub async fn poll_loop(
    mut eventloop: EventLoop,
    client: AsyncClient,
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
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff.reset();
                link.connected.store(true, Ordering::Relaxed);
                if ever_connected {
                    link.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(broker = %broker, session_present = ack.session_present, "reconnected to the broker");
                } else {
                    tracing::info!(broker = %broker, session_present = ack.session_present, "connected to the broker");
                }
                // Subscribe on this process's first connection (routes may have changed since
                // the session was made) and whenever the broker kept no session.
                let subscribe = !ever_connected || !ack.session_present;
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
            Ok(Event::Incoming(Packet::SubAck(s))) => {
                for code in &s.return_codes {
                    if matches!(code, rumqttc::SubscribeReasonCode::Failure) {
                        tracing::error!(
                            "the broker refused a subscription: check its ACL for the hub's user"
                        );
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                stats.received.fetch_add(1, Ordering::Relaxed);
                let sender = input.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let Some(sender) = sender else {
                    // Stopping: not acknowledged, so the broker redelivers it next session.
                    continue;
                };
                let topic = p.topic.clone();
                // The ack needs only the packet id and QoS: do not hold the payload twice.
                let ack = (p.qos != QoS::AtMostOnce).then(|| {
                    let mut a = p.clone();
                    a.payload = bytes::Bytes::new();
                    a
                });
                let inbound = Inbound {
                    seq,
                    topic,
                    payload: p.payload.clone(),
                    response_topic: None,
                    ack,
                    received_ns: crate::now_ns(),
                };
                seq += 1;
                if sender.send_async(inbound).await.is_err() {
                    tracing::debug!("pipeline closed; message left unacknowledged");
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                link.connected.store(false, Ordering::Relaxed);
                tracing::info!("disconnected from the broker");
                return;
            }
            Ok(_) => {}
            Err(e) => {
                link.connected.store(false, Ordering::Relaxed);
                if matches!(e, ConnectionError::RequestsDone) {
                    return;
                }
                let delay = backoff.next_delay();
                tracing::warn!(broker = %broker, error = %e, retry_in = ?delay, "MQTT connection failed");
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
pub async fn acker(rx: flume::Receiver<Settled>, client: AsyncClient, stats: Arc<Stats>) {
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
        let Some(s) = next else {
            open = false;
            for s in reorder.drain() {
                settle(&client, &stats, s, &mut waiting);
            }
            continue;
        };
        for s in reorder.push(s) {
            settle(&client, &stats, s, &mut waiting);
        }
    }
}

fn flush_acks(client: &AsyncClient, stats: &Stats, waiting: &mut VecDeque<Publish>) {
    while let Some(p) = waiting.front() {
        match client.try_ack(p) {
            Ok(()) => {
                stats.acked.fetch_add(1, Ordering::Relaxed);
                waiting.pop_front();
            }
            Err(rumqttc::ClientError::TryRequest(_)) => return,
            Err(_) => {
                // The event loop is gone (stopping): the broker redelivers what is unacked.
                waiting.clear();
                return;
            }
        }
    }
}

fn settle(client: &AsyncClient, stats: &Stats, s: Settled, waiting: &mut VecDeque<Publish>) {
    if let Some(r) = s.report {
        match client.try_publish(
            r.topic.clone(),
            QoS::AtLeastOnce,
            false,
            r.body.into_bytes(),
        ) {
            Ok(()) => {
                stats.reports_sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                stats.reports_suppressed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(topic = %r.topic, error = %e, "report not sent");
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
