//! didhub: verified DIDComm posts from IoT devices over MQTT, committed durably, stored as time
//! series, and answered with problem reports when rejected.
//!
//! ```text
//!  broker ─▶ mqtt (poll task) ─▶ pipeline: verify workers ─▶ committer (SQLite) ─▶ acker ─▶ broker
//!                                  │  verify (didcomm façade)   │ points + replay window     │ reports, then
//!                                  │  mapping (payload→points)  │ in one transaction         │ acks in order
//!                                                               └─▶ ship (outbox → InfluxDB)
//! ```
//!
//! - [`config`]: `hub.toml`, strict and validated; exit 78 on errors.
//! - [`did`]: did:key and did:peer:2 resolution, identities and their secrets.
//! - [`verify`]: the only user of the `didcomm` crate; owns the trust policy and builds reports.
//! - [`mapping`]: pure payload → point mapping and line protocol.
//! - [`pipeline`]: the stages between ingest and ack, counters, report rate limits.
//! - [`store`]: SQLite (WAL) with group commit and the replay window.
//! - [`mqtt`]: rumqttc poll task (MQTT 3.1.1 or 5, TLS/mTLS) with backoff, and the in-order acker.
//! - [`ship`]: outbox → InfluxDB `/api/v2/write`, delete only after acceptance.
//! - [`stats`]: the hub's own counters as `didhub_stats` points.
//! - [`metrics`]: Prometheus metrics (names in one place) and readiness, read at scrape time.
//! - [`http`]: the `/metrics`, `/healthz`, `/readyz` listener.
//! - [`systemd`]: `Type=notify`: READY, STATUS, a watchdog fed by the committer's heartbeat.
//! - [`reload`]: SIGHUP: new routes and device registry without a restart.
//! - [`app`]: `run()`: wiring and ordered shutdown.
//! - [`cli`]: the device-side `send` and the operator's `query`.
//! - [`bench`]: `didhub bench`, the load generator and in-process pipeline benchmark.
//! - [`bench_ship`]: `didhub bench --ship-to URL`, the shipper alone against a real store.
//! - `broker`: the embedded rumqttd broker (feature `embedded-broker`).

pub mod app;
pub mod bench;
pub mod bench_ship;
#[cfg(feature = "embedded-broker")]
pub mod broker;
pub mod cli;
pub mod config;
pub mod did;
pub mod http;
pub mod mapping;
pub mod metrics;
pub mod mqtt;
pub mod pipeline;
pub mod reload;
pub mod ship;
pub mod stats;
pub mod store;
pub mod systemd;
pub mod verify;

/// Now, in nanoseconds since the Unix epoch.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}
