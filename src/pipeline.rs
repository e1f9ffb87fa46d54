//! The stages between MQTT ingest and the MQTT ack:
//!
//! ```text
//! ingest ──(bounded, blocks)──▶ verify workers (threads, one per core)
//!        ──(bounded, blocks)──▶ committer (one SQLite transaction per batch)
//!        ──(bounded, blocks)──▶ acker (reports out, then acks in receive order)
//! ```
//!
//! Every edge blocks when full, so a slow store slows ingest (the broker holds the backlog)
//! instead of losing anything.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::config::{Config, Device, Require, Route, Senders};
use crate::mapping::{map_payload, MapInput, MapLimits, TopicPattern};
use crate::store::{self, Commit, CommitResult, Sink};
use crate::verify::{Code, Rejection, Verdict, Verifier};

/// One message from the broker.
#[derive(Debug)]
pub struct Inbound {
    /// Receive order; acks are sent in this order.
    pub seq: u64,
    /// The topic it arrived on.
    pub topic: String,
    /// The raw bytes (untrusted).
    pub payload: Bytes,
    /// The MQTT 5 Response Topic, if any.
    pub response_topic: Option<String>,
    /// The MQTT 5 Correlation Data, if any: echoed on a report sent to the Response Topic.
    pub correlation_data: Option<bytes::Bytes>,
    /// What to acknowledge once the message is settled (QoS 1).
    pub ack: Option<rumqttc::Publish>,
    /// Hub receive time, ns since the epoch.
    pub received_ns: i64,
}

/// A report to publish.
#[derive(Debug, Clone)]
pub struct Report {
    /// Topic.
    pub topic: String,
    /// Packed DIDComm message.
    pub body: String,
    /// MQTT 5 Correlation Data to publish it with (the rejected publish's, when the report goes
    /// to that publish's Response Topic).
    pub correlation_data: Option<bytes::Bytes>,
}

impl Report {
    /// The report with `data` as its MQTT 5 Correlation Data (the rejected publish's: the poll
    /// task keeps it only when that publish named a Response Topic, where the report then goes).
    pub fn with_correlation_data(self, data: Option<bytes::Bytes>) -> Report {
        Report {
            correlation_data: data,
            ..self
        }
    }
}

/// A settled message on its way to the acker.
#[derive(Debug)]
pub struct Settled {
    /// Receive order.
    pub seq: u64,
    /// The publish to acknowledge.
    pub ack: Option<rumqttc::Publish>,
    /// A report to send first.
    pub report: Option<Report>,
}

/// Hub counters (bounded labels only).
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages received from the broker.
    pub received: AtomicU64,
    /// Messages whose points were committed.
    pub accepted: AtomicU64,
    /// Points committed.
    pub points: AtomicU64,
    /// Redeliveries acked and dropped.
    pub duplicates: AtomicU64,
    /// Rejections by code (index of `Code::ALL`).
    pub rejected: [AtomicU64; 9],
    /// Problem reports published.
    pub reports_sent: AtomicU64,
    /// Problem reports not sent (rate limit or full queue).
    pub reports_suppressed: AtomicU64,
    /// Reports sent to the hub and messages on its own report topics.
    pub ignored: AtomicU64,
    /// Messages acknowledged.
    pub acked: AtomicU64,
    /// Time spent verifying, ns.
    pub verify_nanos: AtomicU64,
    /// Messages verified.
    pub verify_count: AtomicU64,
    /// Per-message verification time.
    pub verify_seconds: crate::metrics::SecondsHistogram,
    /// Messages per commit transaction.
    pub commit_batch_size: crate::metrics::SizeHistogram,
    /// Messages per verify batch (taken off the queue together).
    pub verify_batch_size: crate::metrics::SizeHistogram,
    /// Committer loop turns (batches, heartbeats, budget waits): the systemd watchdog pings
    /// only while this advances.
    pub heartbeats: AtomicU64,
}

impl Stats {
    /// Counts a rejection.
    pub fn reject(&self, code: Code) {
        if let Some(i) = Code::ALL.iter().position(|c| *c == code) {
            self.rejected[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Rejections of `code` so far.
    pub fn rejected_of(&self, code: Code) -> u64 {
        Code::ALL
            .iter()
            .position(|c| *c == code)
            .map(|i| self.rejected[i].load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// A one-line summary for logs.
    pub fn summary(&self) -> String {
        let rejected: u64 = self
            .rejected
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .sum();
        format!(
            "received={} accepted={} points={} duplicates={} rejected={} reports_sent={} reports_suppressed={} ignored={}",
            self.received.load(Ordering::Relaxed),
            self.accepted.load(Ordering::Relaxed),
            self.points.load(Ordering::Relaxed),
            self.duplicates.load(Ordering::Relaxed),
            rejected,
            self.reports_sent.load(Ordering::Relaxed),
            self.reports_suppressed.load(Ordering::Relaxed),
            self.ignored.load(Ordering::Relaxed),
        )
    }
}

/// A token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Report rate limits: per sender (or topic when the sender is unknown) and global.
#[derive(Debug)]
pub struct RateLimiter {
    per_key_rate: f64,
    per_key_burst: f64,
    global_rate: f64,
    global_burst: f64,
    state: Mutex<(Bucket, HashMap<String, Bucket>)>,
}

const MAX_BUCKETS: usize = 10_000;

impl RateLimiter {
    /// A limiter with the given rates (per second) and bursts.
    pub fn new(per_key_rate: f64, per_key_burst: f64, global_rate: f64, global_burst: f64) -> Self {
        let now = Instant::now();
        RateLimiter {
            per_key_rate,
            per_key_burst,
            global_rate,
            global_burst,
            state: Mutex::new((
                Bucket {
                    tokens: global_burst,
                    at: now,
                },
                HashMap::new(),
            )),
        }
    }

    fn take(b: &mut Bucket, rate: f64, burst: f64, now: Instant) -> bool {
        let dt = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + dt * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether a report for `key` may be sent now.
    pub fn allow(&self, key: &str, now: Instant) -> bool {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (global, per) = &mut *guard;
        if per.len() >= MAX_BUCKETS && !per.contains_key(key) {
            // Forget full buckets: they behave exactly like new ones.
            let (rate, burst) = (self.per_key_rate, self.per_key_burst);
            per.retain(|_, b| {
                let dt = now.saturating_duration_since(b.at).as_secs_f64();
                b.tokens + dt * rate < burst
            });
            if per.len() >= MAX_BUCKETS {
                return false;
            }
        }
        let b = per.entry(key.to_string()).or_insert(Bucket {
            tokens: self.per_key_burst,
            at: now,
        });
        let mut trial = *b;
        if !Self::take(&mut trial, self.per_key_rate, self.per_key_burst, now) {
            *b = trial;
            return false;
        }
        if !Self::take(global, self.global_rate, self.global_burst, now) {
            return false;
        }
        *b = trial;
        true
    }
}

/// A compiled route.
#[derive(Debug)]
pub struct CompiledRoute {
    /// Its config.
    pub route: Route,
    /// Its name for logs.
    pub name: String,
    /// Topic tag pattern.
    pub pattern: Option<TopicPattern>,
}

/// Routes, the registry and the report topic templates: what the workers consult.
#[derive(Debug)]
pub struct Routing {
    routes: Vec<CompiledRoute>,
    devices: HashMap<String, Device>,
}

impl Routing {
    /// Compiles the config's routes and registry.
    pub fn new(cfg: &Config) -> Routing {
        let routes = cfg
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| CompiledRoute {
                route: r.clone(),
                name: r.display_name(i),
                pattern: r
                    .topic_tags
                    .as_deref()
                    .and_then(|p| TopicPattern::parse(p).ok()),
            })
            .collect();
        let devices = cfg
            .devices
            .iter()
            .map(|d| (d.did.clone(), d.clone()))
            .collect();
        Routing { routes, devices }
    }

    /// The first route whose filters match `topic`.
    pub fn route_for(&self, topic: &str) -> Option<&CompiledRoute> {
        self.routes.iter().find(|r| {
            r.route
                .topics
                .iter()
                .any(|f| crate::config::topic_matches(f, topic))
        })
    }

    /// Whether `topic` is one of the hub's own report topics.
    pub fn is_report_topic(&self, topic: &str) -> bool {
        self.routes
            .iter()
            .any(|r| template_matches(&r.route.report_topic, topic))
    }

    /// All subscriptions (filter, qos).
    pub fn subscriptions(&self) -> Vec<(String, u8)> {
        let mut out: Vec<(String, u8)> = Vec::new();
        for r in &self.routes {
            for t in &r.route.topics {
                if !out.iter().any(|(f, _)| f == t) {
                    out.push((t.clone(), r.route.qos));
                }
            }
        }
        out
    }
}

/// Whether a topic could have been produced by a report-topic template (`{topic}` matches one
/// or more characters, `{did}` one or more characters without `/`).
pub fn template_matches(template: &str, topic: &str) -> bool {
    enum Piece<'a> {
        Lit(&'a str),
        Any,
        Level,
    }
    let mut pieces = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        let (lit, after) = rest.split_at(start);
        if !lit.is_empty() {
            pieces.push(Piece::Lit(lit));
        }
        if let Some(a) = after.strip_prefix("{topic}") {
            pieces.push(Piece::Any);
            rest = a;
        } else if let Some(a) = after.strip_prefix("{did}") {
            pieces.push(Piece::Level);
            rest = a;
        } else {
            pieces.push(Piece::Lit("{"));
            rest = &after[1..];
        }
    }
    if !rest.is_empty() {
        pieces.push(Piece::Lit(rest));
    }
    fn go(pieces: &[Piece<'_>], s: &str) -> bool {
        match pieces.split_first() {
            None => s.is_empty(),
            Some((Piece::Lit(l), more)) => s.strip_prefix(l).is_some_and(|r| go(more, r)),
            // The usual `{topic}/problem-report`: one suffix test instead of every split.
            Some((Piece::Any, [Piece::Lit(l)])) => s.len() > l.len() && s.ends_with(l),
            Some((Piece::Any, more)) => (1..=s.len())
                .filter(|i| s.is_char_boundary(*i))
                .any(|i| go(more, &s[i..])),
            Some((Piece::Level, more)) => {
                let max = s.find('/').unwrap_or(s.len());
                (1..=max)
                    .filter(|i| s.is_char_boundary(*i))
                    .any(|i| go(more, &s[i..]))
            }
        }
    }
    go(&pieces, topic)
}

/// Fills a report topic template.
pub fn fill_template(template: &str, topic: &str, did: Option<&str>) -> String {
    template
        .replace("{topic}", topic)
        .replace("{did}", did.unwrap_or("anonymous"))
}

/// Everything a worker needs.
pub struct Shared {
    /// The façade.
    pub verifier: Verifier,
    /// Routes and registry; replaced whole on reload (see [`Shared::routing`]).
    routing: RwLock<Arc<Routing>>,
    /// Report limits.
    pub limiter: RateLimiter,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Mapper limits.
    pub map_limits: MapLimits,
    /// Reports on?
    pub reports_enabled: bool,
    /// Report unparseable input?
    pub report_unparseable: bool,
    /// `escalate_to` for reports.
    pub escalate_to: Option<String>,
    /// Where points go (the workers encode them for it).
    pub sink: Sink,
}

/// What a worker hands the committer.
#[derive(Debug)]
pub enum Work {
    /// Points to commit.
    Store {
        /// Receive order.
        seq: u64,
        /// Ack handle.
        ack: Option<rumqttc::Publish>,
        /// The commit.
        commit: Commit,
        /// The message's thread id, for a report if the commit finds a replay
        /// ([`Work::replay_rejection`]).
        thid: String,
        /// Where that report would go.
        report_topic: String,
        /// MQTT 5 Correlation Data for that report.
        correlation_data: Option<bytes::Bytes>,
    },
    /// Nothing to commit; settle at once.
    Done(Settled),
    /// A point of the hub's own (statistics): committed, nothing to acknowledge.
    Internal(crate::mapping::Point),
    /// Makes the committer turn once when idle, so its heartbeat advances (systemd watchdog).
    Heartbeat,
}

impl Work {
    /// For a `Work::Store` the commit found to reuse an id for different bytes: the rejection
    /// its report is made of (built only then; most messages never need one).
    pub fn replay_rejection(commit: &Commit, thid: &str) -> Rejection {
        let sender = Some(commit.sender.as_str()).filter(|s| !s.is_empty());
        Rejection::replayed_id(&commit.msg_id, thid, sender)
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Shared {
    /// Everything the workers need, from config and the hub identity.
    pub fn from_config(cfg: &Config, hub: crate::did::Identity, stats: Arc<Stats>) -> Shared {
        let mut verifier = Verifier::new(
            hub,
            // `limits.did_document_cache` / `signer_key_cache`: with the defaults (4 096 and
            // 131 072) a hub with 100 000 signing devices peaked at 100 MB (BENCHMARKS.md).
            Arc::new(crate::did::LocalResolver::with_capacities(
                cfg.limits.did_document_cache,
                cfg.limits.signer_key_cache,
            )),
            crate::verify::VerifyLimits {
                max_message_bytes: cfg.limits.max_message_bytes,
                clock_skew_secs: cfg.limits.clock_skew.as_secs(),
            },
        );
        verifier.set_batch_verify(cfg.pipeline.batch_verify);
        Shared {
            verifier,
            routing: RwLock::new(Arc::new(Routing::new(cfg))),
            limiter: RateLimiter::new(
                cfg.reports.per_sender_per_second,
                cfg.reports.per_sender_burst,
                cfg.reports.global_per_second,
                cfg.reports.global_burst,
            ),
            stats,
            map_limits: MapLimits {
                max_depth: cfg.limits.max_json_depth,
                max_fields: cfg.limits.max_fields,
            },
            reports_enabled: cfg.reports.enabled,
            report_unparseable: cfg.reports.report_unparseable,
            escalate_to: cfg.reports.escalate_to.clone(),
            sink: cfg.store.kind.sink(),
        }
    }

    /// The routing in force now. A message is processed wholly under the routing it started
    /// with, so a reload never splits one.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts `new` in force for every message processed from now on; returns the old one.
    pub fn replace_routing(&self, new: Routing) -> Arc<Routing> {
        let mut g = self.routing.write().unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *g, Arc::new(new))
    }

    /// Verifies and maps one message (runs on a worker thread).
    pub fn process(&self, m: Inbound) -> Work {
        let (mut work, _) = self.process_batch(vec![m]);
        work.pop().expect("one message in, one out")
    }

    /// Verifies and maps messages taken together off the queue (runs on a worker thread): one
    /// `Work` per message, in any order (settling follows `seq`). Their signatures are checked
    /// in one batch where possible ([`Verifier::verify_many`]). Also returns how many of them
    /// were candidates for batch verification.
    pub fn process_batch(&self, batch: Vec<Inbound>) -> (Vec<Work>, usize) {
        let routing = self.routing();
        let mut out = Vec::with_capacity(batch.len());
        let mut routed = Vec::with_capacity(batch.len());
        for m in batch {
            let span = tracing::debug_span!("msg", seq = m.seq, topic = %m.topic);
            let _g = span.enter();
            let ignored = if routing.is_report_topic(&m.topic) {
                "ignored: the hub's own report topic"
            } else if let Some(route) = routing.route_for(&m.topic) {
                routed.push((m, route));
                continue;
            } else {
                "ignored: no route matches"
            };
            self.stats.ignored.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("{ignored}");
            out.push(Work::Done(Settled {
                seq: m.seq,
                ack: m.ack,
                report: None,
            }));
        }
        if routed.is_empty() {
            return (out, 0);
        }
        let started = Instant::now();
        let items: Vec<(&[u8], Require)> = routed
            .iter()
            .map(|(m, route)| (&m.payload[..], route.route.require))
            .collect();
        let many = futures::executor::block_on(self.verifier.verify_many(&items, now_secs()));
        drop(items);
        let took = started.elapsed();
        let each = took / routed.len() as u32;
        self.stats
            .verify_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        self.stats
            .verify_count
            .fetch_add(routed.len() as u64, Ordering::Relaxed);
        for ((m, route), verdict) in routed.into_iter().zip(many.verdicts) {
            self.stats.verify_seconds.observe(each);
            let span = tracing::debug_span!("msg", seq = m.seq, topic = %m.topic);
            let _g = span.enter();
            out.push(self.settle(&routing, route, m, verdict));
        }
        (out, many.batchable)
    }

    /// What becomes of one message once verified: a report, or points to commit.
    fn settle(
        &self,
        routing: &Routing,
        route: &CompiledRoute,
        m: Inbound,
        verdict: Verdict,
    ) -> Work {
        let report_topic = |sender: Option<&str>| {
            m.response_topic
                .clone()
                .unwrap_or_else(|| fill_template(&route.route.report_topic, &m.topic, sender))
        };
        let accepted = match verdict {
            Verdict::IgnoreReport { id } => {
                self.stats.ignored.fetch_add(1, Ordering::Relaxed);
                tracing::info!(id = ?id, "a problem report was sent to the hub; not answered, not stored");
                return Work::Done(Settled {
                    seq: m.seq,
                    ack: m.ack,
                    report: None,
                });
            }
            Verdict::Reject(r) => {
                let topic = report_topic(r.sender.as_deref());
                let report = self
                    .reject(&r, topic, &route.name)
                    .map(|r| r.with_correlation_data(m.correlation_data.clone()));
                return Work::Done(Settled {
                    seq: m.seq,
                    ack: m.ack,
                    report,
                });
            }
            Verdict::Accept(a) => a,
        };
        let device = accepted
            .sender
            .as_deref()
            .and_then(|d| routing.devices.get(d));
        if route.route.senders == Senders::Registry && device.is_none() {
            let r = Rejection::of_accepted(
                &accepted,
                Code::NotAuthorised,
                vec![
                    accepted
                        .sender
                        .clone()
                        .unwrap_or_else(|| "an anonymous sender".into()),
                    m.topic.clone(),
                ],
            );
            let report = self
                .reject(&r, report_topic(r.sender.as_deref()), &route.name)
                .map(|r| r.with_correlation_data(m.correlation_data.clone()));
            return Work::Done(Settled {
                seq: m.seq,
                ack: m.ack,
                report,
            });
        }
        let mut tags: Vec<(String, String)> = Vec::new();
        if let Some(p) = &route.pattern {
            if let Some(t) = p.tags(&m.topic) {
                tags.extend(t);
            }
        }
        if let Some(d) = device {
            if let Some(n) = &d.name {
                tags.push(("device_name".into(), n.clone()));
            }
            tags.extend(d.tags.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let input = MapInput {
            measurement: &route.route.measurement,
            did: accepted.sender.as_deref(),
            thid: &accepted.thid,
            extra_tags: &tags,
            timestamp_path: route.route.timestamp.as_deref(),
            timestamp_format: route.route.timestamp_format,
            received_ns: m.received_ns,
            limits: self.map_limits,
        };
        let row = map_payload(&accepted.payload, &input)
            .map_err(|e| e.to_string())
            .and_then(|point| store::Row::encode(point, self.sink).map_err(|e| e.to_string()));
        match row {
            Err(e) => {
                let r = Rejection::of_accepted(&accepted, Code::RejectPost, vec![e]);
                let report = self
                    .reject(&r, report_topic(r.sender.as_deref()), &route.name)
                    .map(|r| r.with_correlation_data(m.correlation_data.clone()));
                Work::Done(Settled {
                    seq: m.seq,
                    ack: m.ack,
                    report,
                })
            }
            Ok(row) => {
                let hash: [u8; 32] = Sha256::digest(&m.payload).into();
                Work::Store {
                    seq: m.seq,
                    ack: m.ack,
                    report_topic: report_topic(accepted.sender.as_deref()),
                    correlation_data: m.correlation_data.clone(),
                    commit: Commit {
                        sender: accepted.sender.clone().unwrap_or_default(),
                        msg_id: accepted.id.clone(),
                        hash,
                        received_ns: m.received_ns,
                        rows: vec![row],
                    },
                    thid: accepted.thid.clone(),
                }
            }
        }
    }

    /// Counts and logs a rejection and packs its report, if allowed.
    pub fn reject(&self, r: &Rejection, topic: String, route: &str) -> Option<Report> {
        self.stats.reject(r.code);
        tracing::debug!(
            code = r.code.as_str(),
            id = ?r.id,
            sender = ?r.sender,
            route,
            reason = %r.comment(),
            "rejected"
        );
        if !self.reports_enabled || (r.id.is_none() && !self.report_unparseable) {
            return None;
        }
        let key = r.sender.clone().unwrap_or_else(|| format!("topic:{topic}"));
        if !self.limiter.allow(&key, Instant::now()) {
            self.stats
                .reports_suppressed
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        match futures::executor::block_on(self.verifier.pack_report(
            r,
            self.escalate_to.as_deref(),
            now_secs(),
        )) {
            Ok(body) => Some(Report {
                topic,
                body,
                correlation_data: None,
            }),
            Err(e) => {
                self.stats
                    .reports_suppressed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "could not pack a problem report");
                None
            }
        }
    }
}

/// Whether more than half of a full input queue is still waiting. A producer that finds the
/// queue full waits until this is false and then tops it up, instead of sending each message as
/// soon as a worker takes one: that would wake the producer (and it, in turn, the worker) once
/// per message while the hub is overloaded. False once the workers are gone.
pub fn backlogged<T>(tx: &flume::Sender<T>) -> bool {
    !tx.is_disconnected() && tx.capacity().is_some_and(|cap| tx.len() > cap / 2)
}

/// The most messages a verify worker takes off the queue at once. Ed25519 batch verification
/// measured here: 38 µs a signature alone, 25 µs in batches of 4, 18–19 µs in batches of 16
/// to 64; larger batches would leave the other workers idle while one works through them.
pub const VERIFY_BATCH: usize = 32;

/// A verify worker lingers (see [`Gather`]) only when, at the recent arrival rate, this many
/// messages would arrive while it does: below that, the batch saves too little to be worth
/// the wait.
const LINGER_MIN_EXPECTED: f64 = 4.0;

/// Hands the queue's messages to the verify workers in batches, one worker at a time.
///
/// Whatever is queued, up to [`VERIFY_BATCH`], goes in one batch. At moderate rates that is
/// usually one message: the queue is drained as fast as it fills, and each signature is then
/// checked alone at twice the CPU cost of a batched one. So when the signed messages come
/// quickly enough that at least [`LINGER_MIN_EXPECTED`] more would arrive within `linger`,
/// the worker waits up to `linger` for them. An idle or slow hub, or one that receives no
/// batchable signatures, verifies each message as it arrives, without waiting; under full
/// load the batch is full at once.
///
/// One worker gathers at a time, so that the messages that arrive during a wait join one batch
/// instead of being split among the workers. The others are spare: they sleep until the
/// gatherer leaves messages behind in the queue (the hub is busy: a spare worker gathers the
/// next batch while this one verifies). At moderate rates the queue is empty when a batch is
/// taken, the spare workers sleep, and the gatherer comes back for the next batch itself: no
/// worker is woken only to wait for the next message (measured in process at 5k signed
/// posts/s, W=2: the workers' CPU fell from 40–41 to 36–38 µs/post).
pub struct Gather {
    rx: flume::Receiver<Inbound>,
    linger: std::time::Duration,
    state: std::sync::Mutex<GatherState>,
    /// Where the spare workers sleep.
    spare: std::sync::Condvar,
    /// The last verified batch had signatures that could be checked in a batch.
    signed: std::sync::atomic::AtomicBool,
}

struct GatherState {
    /// The arrival rate (messages a second) over the last closed window.
    rate: f64,
    /// The current window: when it began, and the messages taken since.
    window_start: Instant,
    window_count: usize,
    /// A worker is gathering.
    gathering: bool,
    /// Workers waiting as spares.
    spares: usize,
}

/// How long [`Gather`] counts messages to estimate the arrival rate: a burst of a few
/// messages after a pause does not make it linger.
const RATE_WINDOW: std::time::Duration = std::time::Duration::from_millis(10);

impl GatherState {
    /// The arrival rate at `now`: the last closed window's, or that of the window `now`
    /// closes.
    fn rate(&mut self, now: Instant) -> f64 {
        let age = now.saturating_duration_since(self.window_start);
        if age >= RATE_WINDOW {
            self.rate = self.window_count as f64 / age.as_secs_f64();
            self.window_start = now;
            self.window_count = 0;
        }
        self.rate
    }
}

impl Gather {
    /// Batches from `rx`, waiting up to `linger` for a batch to grow (zero: never waits).
    pub fn new(rx: flume::Receiver<Inbound>, linger: std::time::Duration) -> Self {
        Gather {
            rx,
            linger,
            state: std::sync::Mutex::new(GatherState {
                rate: 0.0,
                window_start: Instant::now(),
                window_count: 0,
                gathering: false,
                spares: 0,
            }),
            spare: std::sync::Condvar::new(),
            signed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GatherState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next batch (blocks until there is a message, or while another worker gathers and
    /// this one is not needed); `None` once the queue is closed and empty. When the gatherer
    /// finds it so, it wakes every spare, and each of them then finds it so too.
    pub fn next(&self) -> Option<Vec<Inbound>> {
        let mut st = self.lock();
        while st.gathering {
            st.spares += 1;
            st = self.spare.wait(st).unwrap_or_else(|e| e.into_inner());
            st.spares -= 1;
        }
        st.gathering = true;
        drop(st);
        let batch = self.take();
        let mut st = self.lock();
        st.gathering = false;
        match batch {
            Some(batch) => {
                st.window_count += batch.len();
                if !self.rx.is_empty() {
                    self.spare.notify_one();
                }
                Some(batch)
            }
            None => {
                self.spare.notify_all();
                None
            }
        }
    }

    /// Takes what is queued (waiting for the first message), lingering when that pays.
    fn take(&self) -> Option<Vec<Inbound>> {
        let first = self.rx.recv().ok()?;
        let mut batch = Vec::with_capacity(VERIFY_BATCH);
        batch.push(first);
        batch.extend(self.rx.try_iter().take(VERIFY_BATCH - 1));
        if self.lingers(&mut self.lock(), batch.len(), Instant::now()) {
            // Sleep rather than wait on the channel: one timer wake per batch, not a futex
            // wake per message.
            std::thread::sleep(self.linger);
            batch.extend(self.rx.try_iter().take(VERIFY_BATCH - batch.len()));
        }
        Some(batch)
    }

    /// Wakes a spare worker: the one that called this will not gather again (it is ending).
    fn leaving(&self) {
        let _st = self.lock();
        self.spare.notify_one();
    }

    /// Whether a batch of `len` should wait for more messages at `now`.
    fn lingers(&self, st: &mut GatherState, len: usize, now: Instant) -> bool {
        len < VERIFY_BATCH
            && !self.linger.is_zero()
            && self.signed.load(Ordering::Relaxed)
            && st.rate(now) * self.linger.as_secs_f64() >= LINGER_MIN_EXPECTED
    }

    /// Reports how many of a verified batch's signatures could be checked in a batch.
    pub fn verified(&self, batchable: usize) {
        self.signed.store(batchable > 0, Ordering::Relaxed);
    }
}

/// Wakes a spare worker when dropped (see [`spawn_workers`]).
struct Leaving<'g>(&'g Gather);

impl Drop for Leaving<'_> {
    fn drop(&mut self) {
        self.0.leaving();
    }
}

/// Starts `n` verify workers reading `rx` (in batches, see [`Gather`]) and writing `tx`.
pub fn spawn_workers(
    n: usize,
    shared: Arc<Shared>,
    rx: flume::Receiver<Inbound>,
    linger: std::time::Duration,
    tx: flume::Sender<Work>,
) -> Vec<std::thread::JoinHandle<()>> {
    let gather = Arc::new(Gather::new(rx, linger));
    (0..n)
        .map(|i| {
            let (shared, gather, tx) = (shared.clone(), gather.clone(), tx.clone());
            std::thread::Builder::new()
                .name(format!("verify-{i}"))
                .spawn(move || {
                    // Should this worker end other than by a closed queue (a panic), a spare
                    // one takes over the gathering.
                    let _guard = Leaving(&gather);
                    while let Some(batch) = gather.next() {
                        shared.stats.verify_batch_size.observe(batch.len());
                        let (work, batchable) = shared.process_batch(batch);
                        gather.verified(batchable);
                        for w in work {
                            if tx.send(w).is_err() {
                                return;
                            }
                        }
                    }
                })
                .expect("spawning a verify thread")
        })
        .collect()
}

/// How long the committer lets a batch gather more messages under load. Every commit has a fixed
/// cost (WAL frames for the pages it touches, the fsync, sometimes a checkpoint); measured with
/// `didhub bench --in-process`, a signed post cost the committer ~32 µs in batches of 9 and
/// ~17 µs in batches of 60. It is only applied when the previous batch had more than one message,
/// so a lone message on an idle hub is committed at once.
pub const COMMIT_LINGER: std::time::Duration = std::time::Duration::from_millis(2);

/// The committer: group-commits `Work::Store` items and settles everything in batches.
pub struct Committer {
    /// The connection.
    pub conn: rusqlite::Connection,
    /// Embedded or outbox.
    pub sink: Sink,
    /// Largest batch.
    pub max_batch: usize,
    /// Under load, how long a batch may wait for more messages after its first one
    /// ([`COMMIT_LINGER`] in the hub; zero: commit whatever is queued at once).
    pub linger: std::time::Duration,
    /// Replay window in ns.
    pub replay_window_ns: i64,
    /// Shared state for reports and counters.
    pub shared: Arc<Shared>,
    /// Woken after each commit that added outbox rows.
    pub outbox_notify: Option<Arc<tokio::sync::Notify>>,
    /// Outbox gauges (shared with the shipper).
    pub ship_stats: Arc<crate::ship::ShipStats>,
    /// Outbox disk budget in bytes.
    pub outbox_max_bytes: u64,
    /// Set while the outbox is at its budget (readiness reports it).
    pub outbox_full: Arc<std::sync::atomic::AtomicBool>,
    /// Stop waiting for the outbox to drain (shutdown).
    pub stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Committer {
    /// Waits while the outbox is over its budget; `false` when told to stop meanwhile.
    fn wait_for_budget(&self) -> bool {
        if self.sink != Sink::Outbox {
            return true;
        }
        let over =
            || self.ship_stats.outbox_bytes.load(Ordering::Relaxed) as u64 >= self.outbox_max_bytes;
        if !over() {
            return true;
        }
        self.outbox_full.store(true, Ordering::Relaxed);
        tracing::warn!(
            outbox_bytes = self.ship_stats.outbox_bytes.load(Ordering::Relaxed),
            outbox_rows = self.ship_stats.outbox_rows.load(Ordering::Relaxed),
            max_bytes = self.outbox_max_bytes,
            "the outbox is at its disk budget (outbox.max_bytes): not acknowledging new messages; the broker holds them until the store drains the outbox"
        );
        while over() {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            // Waiting by design (backpressure), not stuck: keep the watchdog fed.
            self.shared.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        self.outbox_full.store(false, Ordering::Relaxed);
        tracing::info!(
            outbox_bytes = self.ship_stats.outbox_bytes.load(Ordering::Relaxed),
            "the outbox is below its disk budget again; acknowledging resumes"
        );
        true
    }

    fn commit_with_retry(&mut self, commits: &[&Commit]) -> Option<store::Committed> {
        // A commit failure (disk full, I/O error) is retried: nothing is acked meanwhile.
        let mut attempt = 0u32;
        loop {
            match store::commit_batch(&mut self.conn, commits) {
                Ok(r) => return Some(r),
                Err(e) => {
                    attempt += 1;
                    tracing::error!(error = %e, attempt, "commit failed; retrying (nothing is acknowledged until it succeeds)");
                    if self.stop.load(Ordering::Relaxed) {
                        return None;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(
                        (100u64 << attempt.min(6)).min(5000),
                    ));
                }
            }
        }
    }

    /// Runs until `rx` closes; returns the first fatal store error.
    /// Settled messages leave in one `Vec` per batch: one channel send (and at most one wake of
    /// the acker) per commit instead of one per message.
    pub fn run(
        mut self,
        rx: flume::Receiver<Work>,
        tx: flume::Sender<Vec<Settled>>,
    ) -> Result<(), store::StoreError> {
        // Checkpoints happen beside the commits, not inside one of them.
        let checkpointer = store::Checkpointer::start(&self.conn);
        let mut last_expiry = Instant::now();
        let mut last_len = 0usize;
        while let Ok(first) = rx.recv() {
            let deadline = Instant::now() + self.linger;
            let mut batch = vec![first];
            let mut lingered = last_len <= 1 || self.linger.is_zero();
            while batch.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(w) => batch.push(w),
                    Err(flume::TryRecvError::Empty) if !lingered => {
                        // Sleep rather than wait on the channel: waiting, every send would wake
                        // this thread (a futex wake per message); one timer wake per batch.
                        lingered = true;
                        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
                    }
                    Err(_) => break,
                }
            }
            last_len = batch.len();
            let commits: Vec<&Commit> = batch
                .iter()
                .filter_map(|w| match w {
                    Work::Store { commit, .. } => Some(commit),
                    _ => None,
                })
                .collect();
            let committed = if commits.is_empty() {
                store::Committed::default()
            } else {
                if !self.wait_for_budget() {
                    // Stopping with a full outbox: these stay unacknowledged and are
                    // redelivered by the broker.
                    return Ok(());
                }
                match self.commit_with_retry(&commits) {
                    Some(c) => c,
                    None => return Ok(()),
                }
            };
            let stats = self.shared.stats.clone();
            if !commits.is_empty() {
                stats.commit_batch_size.observe(commits.len());
            }
            self.ship_stats
                .added(committed.outbox_rows, committed.outbox_bytes);
            let mut results = committed.results.into_iter();
            let mut stored_any = committed.outbox_rows > 0;
            let mut wrote = !commits.is_empty();
            let mut out = Vec::with_capacity(batch.len());
            for w in batch {
                let settled = match w {
                    Work::Done(s) => s,
                    Work::Heartbeat => continue,
                    Work::Internal(p) => {
                        match store::insert_point(&self.conn, self.sink, p) {
                            Ok(bytes) if self.sink == Sink::Outbox => {
                                self.ship_stats.added(1, bytes);
                                stored_any = true;
                                wrote = true;
                            }
                            Ok(_) => wrote = true,
                            Err(e) => {
                                tracing::warn!(error = %e, "could not store the hub's statistics")
                            }
                        }
                        continue;
                    }
                    Work::Store {
                        seq,
                        ack,
                        commit,
                        thid,
                        report_topic,
                        correlation_data,
                    } => {
                        let report = match results.next() {
                            Some(CommitResult::Stored) => {
                                stats.accepted.fetch_add(1, Ordering::Relaxed);
                                stats
                                    .points
                                    .fetch_add(commit.rows.len() as u64, Ordering::Relaxed);
                                None
                            }
                            Some(CommitResult::Duplicate) => {
                                stats.duplicates.fetch_add(1, Ordering::Relaxed);
                                tracing::debug!(id = %commit.msg_id, "redelivery: acked and dropped");
                                None
                            }
                            Some(CommitResult::ReplayMismatch) | None => self
                                .shared
                                .reject(
                                    &Work::replay_rejection(&commit, &thid),
                                    report_topic,
                                    "store",
                                )
                                .map(|r| r.with_correlation_data(correlation_data)),
                        };
                        Settled { seq, ack, report }
                    }
                };
                out.push(settled);
            }
            if !out.is_empty() && tx.send(out).is_err() {
                return Ok(());
            }
            if stored_any {
                if let Some(n) = &self.outbox_notify {
                    n.notify_one();
                }
            }
            stats.heartbeats.fetch_add(1, Ordering::Relaxed);
            if last_expiry.elapsed() > std::time::Duration::from_secs(60) {
                last_expiry = Instant::now();
                let cutoff = crate::now_ns() - self.replay_window_ns;
                match store::expire_seen(&self.conn, cutoff) {
                    Ok(expired) => wrote |= expired > 0,
                    Err(e) => tracing::warn!(error = %e, "could not expire the replay window"),
                }
            }
            if let Some(c) = checkpointer.as_ref().filter(|_| wrote) {
                c.committed(&self.conn);
            }
        }
        Ok(())
    }
}

/// Releases settled messages in receive order.
#[derive(Debug, Default)]
pub struct Reorder {
    next: u64,
    pending: BTreeMap<u64, Settled>,
}

impl Reorder {
    /// Starts at sequence `first`.
    pub fn new(first: u64) -> Self {
        Reorder {
            next: first,
            pending: BTreeMap::new(),
        }
    }

    /// Adds one; returns those now releasable, in order.
    pub fn push(&mut self, s: Settled) -> Vec<Settled> {
        self.pending.insert(s.seq, s);
        let mut out = Vec::new();
        while let Some(s) = self.pending.remove(&self.next) {
            out.push(s);
            self.next += 1;
        }
        out
    }

    /// Whatever is still held (at shutdown), in order.
    pub fn drain(&mut self) -> Vec<Settled> {
        std::mem::take(&mut self.pending).into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbound(seq: u64) -> Inbound {
        Inbound {
            seq,
            topic: "devices/d/telemetry".into(),
            payload: Bytes::from_static(b"{}"),
            response_topic: None,
            correlation_data: None,
            ack: None,
            received_ns: 0,
        }
    }

    #[test]
    fn gather_lingers_only_for_batchable_signatures_at_a_high_rate() {
        let (_tx, rx) = flume::unbounded();
        let g = Gather::new(rx, std::time::Duration::from_millis(1));
        let t0 = Instant::now();
        let ms = std::time::Duration::from_millis;
        let state = |count| GatherState {
            rate: 0.0,
            window_start: t0,
            window_count: count,
            gathering: false,
            spares: 0,
        };
        // 50 messages in 10 ms: 5k/s, 5 expected within 1 ms.
        g.verified(3);
        assert!(g.lingers(&mut state(50), 1, t0 + ms(10)));
        // ... but not for a full batch, nor without linger or batchable signatures.
        assert!(!g.lingers(&mut state(50), VERIFY_BATCH, t0 + ms(10)));
        g.verified(0);
        assert!(!g.lingers(&mut state(50), 1, t0 + ms(10)));
        g.verified(3);
        let never = Gather::new(flume::unbounded().1, std::time::Duration::ZERO);
        never.verified(3);
        assert!(!never.lingers(&mut state(50), 1, t0 + ms(10)));
        // 2k/s (2 expected), a burst of two after a pause, an idle hub: no.
        assert!(!g.lingers(&mut state(20), 1, t0 + ms(10)));
        assert!(!g.lingers(&mut state(2), 1, t0 + ms(10)));
        assert!(!g.lingers(&mut state(0), 1, t0 + std::time::Duration::from_secs(60)));
        // The rate is that of the last closed window until the next one closes.
        let mut st = state(50);
        assert!(g.lingers(&mut st, 1, t0 + ms(10)));
        assert_eq!(st.window_count, 0);
        assert!(g.lingers(&mut st, 1, t0 + ms(15)));
        st.window_count = 3;
        assert!(!g.lingers(&mut st, 1, t0 + ms(25)));
    }

    #[test]
    fn a_lingering_worker_gathers_what_arrives_meanwhile() {
        let (tx, rx) = flume::unbounded();
        // A long linger, so that the late message arrives within it even on a loaded machine.
        let g = Gather::new(rx, std::time::Duration::from_millis(500));
        g.verified(1);
        g.state.lock().unwrap().rate = 1e6;
        tx.send(inbound(1)).unwrap();
        let late = {
            let tx = tx.clone();
            std::thread::spawn(move || {
                // Sent only once the worker has taken the first one: after its look at the
                // queue, so only waiting can put it in the same batch.
                while !tx.is_empty() {
                    std::thread::yield_now();
                }
                tx.send(inbound(2)).unwrap();
            })
        };
        let batch = g.next().unwrap();
        late.join().unwrap();
        let seqs: Vec<u64> = batch.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [1, 2]);
        // Not lingering (no batchable signatures): each message as it comes.
        g.verified(0);
        tx.send(inbound(3)).unwrap();
        assert_eq!(g.next().unwrap().len(), 1);
        drop(tx);
        assert!(g.next().is_none(), "a closed queue ends the worker");
    }

    #[test]
    fn a_spare_worker_gathers_only_when_messages_are_left_waiting() {
        let (tx, rx) = flume::unbounded();
        let g = Arc::new(Gather::new(rx, std::time::Duration::ZERO));
        let seqs = |b: Vec<Inbound>| b.iter().map(|m| m.seq).collect::<Vec<u64>>();
        // Worker A gathers (blocks on the empty queue); then worker B comes: spare.
        let a = {
            let g = g.clone();
            std::thread::spawn(move || g.next())
        };
        while !g.lock().gathering {
            std::thread::yield_now();
        }
        let b = {
            let g = g.clone();
            std::thread::spawn(move || g.next())
        };
        while g.lock().spares == 0 {
            std::thread::yield_now();
        }
        tx.send(inbound(1)).unwrap();
        assert_eq!(seqs(a.join().unwrap().unwrap()), [1]);
        // Nothing was left waiting: B sleeps on, and A (here the test thread) gathers again.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(
            !b.is_finished(),
            "a spare worker was woken with nothing to do"
        );
        tx.send(inbound(2)).unwrap();
        assert_eq!(seqs(g.next().unwrap()), [2]);
        assert!(!b.is_finished());
        // More than a batch waiting: the gatherer takes one and wakes B for the rest.
        for i in 0..(VERIFY_BATCH as u64 + 3) {
            tx.send(inbound(100 + i)).unwrap();
        }
        assert_eq!(g.next().unwrap().len(), VERIFY_BATCH);
        let rest = seqs(b.join().unwrap().unwrap());
        assert_eq!(rest, [132, 133, 134]);
        // A closed queue ends every worker, spare ones included.
        let spare = {
            let (g2, g3) = (g.clone(), g.clone());
            let gathering = std::thread::spawn(move || g2.next());
            while !g.lock().gathering {
                std::thread::yield_now();
            }
            let spare = std::thread::spawn(move || g3.next());
            while g.lock().spares == 0 {
                std::thread::yield_now();
            }
            (gathering, spare)
        };
        drop(tx);
        assert!(spare.0.join().unwrap().is_none());
        assert!(spare.1.join().unwrap().is_none());
        assert!(g.next().is_none());
    }

    #[test]
    fn a_full_queue_is_backlogged_until_half_of_it_is_taken() {
        let (tx, rx) = flume::bounded(4);
        assert!(!backlogged(&tx));
        for i in 0..4 {
            tx.send(i).unwrap();
        }
        assert!(backlogged(&tx));
        rx.recv().unwrap();
        assert!(backlogged(&tx), "3 of 4 still waiting");
        rx.recv().unwrap();
        assert!(!backlogged(&tx), "half taken: top it up");
        tx.send(9).unwrap();
        tx.send(9).unwrap();
        drop(rx);
        assert!(!backlogged(&tx), "nobody left to take them: do not wait");
    }

    #[test]
    fn report_templates_match_their_own_topics() {
        let t = "{topic}/problem-report";
        assert!(template_matches(t, "devices/d1/telemetry/problem-report"));
        assert!(!template_matches(t, "devices/d1/telemetry"));
        assert!(!template_matches(t, "/problem-report"));
        let t = "reports/{did}";
        assert!(template_matches(t, "reports/did:key:z6Mk"));
        assert!(!template_matches(t, "reports/a/b"));
        assert_eq!(
            fill_template("{topic}/pr/{did}", "a/b", Some("did:x")),
            "a/b/pr/did:x"
        );
    }

    #[test]
    fn rate_limiter_limits_per_key_and_globally() {
        let l = RateLimiter::new(1.0, 3.0, 100.0, 5.0);
        let now = Instant::now();
        let a: usize = (0..10).filter(|_| l.allow("a", now)).count();
        assert_eq!(a, 3);
        let b: usize = (0..10).filter(|_| l.allow("b", now)).count();
        assert_eq!(b, 2, "global burst of 5 is spent");
        let later = now + std::time::Duration::from_secs(2);
        assert!(l.allow("a", later));
    }

    #[test]
    fn reorder_releases_in_sequence() {
        let s = |seq| Settled {
            seq,
            ack: None,
            report: None,
        };
        let mut r = Reorder::new(0);
        assert!(r.push(s(1)).is_empty());
        assert!(r.push(s(2)).is_empty());
        let out: Vec<u64> = r.push(s(0)).iter().map(|s| s.seq).collect();
        assert_eq!(out, vec![0, 1, 2]);
        assert_eq!(r.push(s(3)).len(), 1);
    }
}
