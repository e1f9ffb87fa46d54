//! The hub's own counters as `didhub_stats` points, so that a Grafana that only knows InfluxDB
//! shows hub health too. Field names are fixed here; the dashboards are checked against them.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use crate::mapping::{FieldValue, Point};
use crate::mqtt::Link;
use crate::pipeline::Stats;
use crate::ship::ShipStats;
use crate::verify::Code;

/// Measurement of the hub's own points.
pub const STATS_MEASUREMENT: &str = "didhub_stats";

/// Every field of a `didhub_stats` point. Counters are cumulative since the hub started;
/// `outbox_rows`, `outbox_bytes` and `mqtt_connected` are gauges.
pub const STATS_FIELDS: &[&str] = &[
    "received",
    "accepted",
    "points",
    "duplicates",
    "ignored",
    "rejected",
    "rejected_invalid_message",
    "rejected_unsupported_message",
    "rejected_not_authenticated",
    "rejected_not_signed",
    "rejected_not_sender_authenticated",
    "rejected_crypto",
    "rejected_not_authorised",
    "rejected_req_time",
    "rejected_reject_post",
    "reports_sent",
    "reports_suppressed",
    "shipped",
    "ship_errors",
    "dead_letters",
    "mqtt_reconnects",
    "verify_seconds",
    "verify_count",
    "outbox_rows",
    "outbox_bytes",
    "mqtt_connected",
];

/// The field name of a code's rejection counter.
pub fn rejected_field(code: Code) -> &'static str {
    match code {
        Code::InvalidMessage => "rejected_invalid_message",
        Code::UnsupportedMessage => "rejected_unsupported_message",
        Code::NotAuthenticated => "rejected_not_authenticated",
        Code::NotSigned => "rejected_not_signed",
        Code::NotSenderAuthenticated => "rejected_not_sender_authenticated",
        Code::Crypto => "rejected_crypto",
        Code::NotAuthorised => "rejected_not_authorised",
        Code::ReqTime => "rejected_req_time",
        Code::RejectPost => "rejected_reject_post",
    }
}

/// A snapshot of every counter, by field name.
pub fn snapshot(stats: &Stats, ship: &ShipStats, link: &Link) -> BTreeMap<&'static str, f64> {
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    let mut m = BTreeMap::new();
    m.insert("received", l(&stats.received));
    m.insert("accepted", l(&stats.accepted));
    m.insert("points", l(&stats.points));
    m.insert("duplicates", l(&stats.duplicates));
    m.insert("ignored", l(&stats.ignored));
    let mut rejected = 0.0;
    for code in Code::ALL {
        let n = stats.rejected_of(code) as f64;
        rejected += n;
        m.insert(rejected_field(code), n);
    }
    m.insert("rejected", rejected);
    m.insert("reports_sent", l(&stats.reports_sent));
    m.insert("reports_suppressed", l(&stats.reports_suppressed));
    m.insert("shipped", l(&ship.shipped));
    m.insert("ship_errors", l(&ship.errors));
    m.insert("dead_letters", l(&ship.dead));
    m.insert("mqtt_reconnects", l(&link.reconnects));
    m.insert(
        "verify_seconds",
        stats.verify_nanos.load(Ordering::Relaxed) as f64 / 1e9,
    );
    m.insert("verify_count", l(&stats.verify_count));
    m.insert(
        "outbox_rows",
        ship.outbox_rows.load(Ordering::Relaxed).max(0) as f64,
    );
    m.insert(
        "outbox_bytes",
        ship.outbox_bytes.load(Ordering::Relaxed).max(0) as f64,
    );
    m.insert(
        "mqtt_connected",
        if link.connected.load(Ordering::Relaxed) {
            1.0
        } else {
            0.0
        },
    );
    m
}

/// The `didhub_stats` point of a snapshot.
pub fn stats_point(hub_did: &str, snap: &BTreeMap<&'static str, f64>, now_ns: i64) -> Point {
    let mut tags = BTreeMap::new();
    tags.insert("hub".to_string(), hub_did.to_string());
    Point {
        measurement: STATS_MEASUREMENT.to_string(),
        tags,
        fields: snap
            .iter()
            .map(|(k, v)| (k.to_string(), FieldValue::Float(*v)))
            .collect(),
        timestamp_ns: now_ns,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_has_exactly_the_published_fields() {
        let snap = snapshot(&Stats::default(), &ShipStats::default(), &Link::default());
        let mut names: Vec<&str> = snap.keys().copied().collect();
        let mut want = STATS_FIELDS.to_vec();
        names.sort();
        want.sort();
        assert_eq!(names, want);
        let p = stats_point("did:key:z6Mk", &snap, 1);
        assert!(p.to_line().starts_with("didhub_stats,hub=did:key:z6Mk "));
    }
}
