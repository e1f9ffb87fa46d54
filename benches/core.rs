//! Criterion benches of the hub's pure parts and its commit path:
//! `cargo bench --bench core` (or `-- mapping`, `-- verify`, `-- report`, `-- commit`).
//!
//! The whole pipeline is measured by `didhub bench` (BENCHMARKS.md); these isolate one stage
//! each so a change to it shows up without the crypto around it.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use didhub::bench::payload;
use didhub::config::Require;
use didhub::did::{DidMethod, Identity, LocalResolver};
use didhub::mapping::{map_payload, MapInput, MapLimits, TimestampFormat};
use didhub::store::{self, Commit, Row, Sink};
use didhub::verify::{self, Code, Envelope, Rejection, Verdict, Verifier, VerifyLimits};

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

const LIMITS: MapLimits = MapLimits {
    max_depth: 16,
    max_fields: 256,
};

fn mapping(c: &mut Criterion) {
    let p = payload(42, 200);
    let tags = vec![("device".to_string(), "bench-7".to_string())];
    let input = MapInput {
        measurement: "telemetry",
        did: Some("did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"),
        thid: "bench-0000000042",
        extra_tags: &tags,
        timestamp_path: None,
        timestamp_format: TimestampFormat::Auto,
        received_ns: 1_700_000_000_000_000_000,
        limits: LIMITS,
    };
    let mut g = c.benchmark_group("mapping");
    g.throughput(Throughput::Elements(1));
    g.bench_function("map_payload_200B", |b| {
        b.iter(|| map_payload(black_box(&p), black_box(&input)).unwrap())
    });
    let point = map_payload(&p, &input).unwrap();
    g.bench_function("to_line", |b| b.iter(|| black_box(&point).to_line()));
    g.finish();
}

fn verifier() -> (Verifier, Identity) {
    let hub = Identity::generate(DidMethod::Key);
    let v = Verifier::new(
        hub.clone(),
        Arc::new(LocalResolver::new(1024)),
        VerifyLimits {
            max_message_bytes: 65536,
            clock_skew_secs: 300,
        },
    );
    (v, hub)
}

fn verification(c: &mut Criterion) {
    let (v, hub) = verifier();
    let device = Identity::generate(DidMethod::Key);
    let now = now_secs();
    let pack = |mode| {
        futures::executor::block_on(verify::pack_post(
            &device,
            &hub.did,
            "bench-1",
            payload(1, 200),
            mode,
            now,
        ))
        .unwrap()
    };
    let signed = pack(Envelope::Signed);
    let authcrypt = pack(Envelope::Authcrypt);
    let plaintext = pack(Envelope::Plaintext);
    let resolver = LocalResolver::new(1024);
    let secrets = didhub::did::StaticSecrets::new(std::slice::from_ref(&hub));

    let mut g = c.benchmark_group("verify");
    g.throughput(Throughput::Elements(1));
    for (name, msg, require) in [
        ("signed", &signed, Require::Signed),
        ("authcrypt", &authcrypt, Require::Authcrypt),
        ("plaintext_any", &plaintext, Require::Any),
    ] {
        // Warm the DID cache, and check the verdict once outside the timing.
        let verdict = futures::executor::block_on(v.verify(msg.as_bytes(), require, now));
        assert!(matches!(verdict, Verdict::Accept(_)), "{name}: {verdict:?}");
        g.bench_function(format!("Verifier::verify/{name}"), |b| {
            b.iter(|| {
                futures::executor::block_on(v.verify(black_box(msg.as_bytes()), require, now))
            })
        });
        g.bench_function(format!("bare_unpack/{name}"), |b| {
            b.iter(|| {
                futures::executor::block_on(verify::bare_unpack(
                    black_box(msg),
                    &resolver,
                    &secrets,
                ))
                .unwrap()
            })
        });
    }
    // The cheap policy path: plaintext on a `signed` route is refused before any crypto.
    g.bench_function("Verifier::verify/plaintext_refused_by_policy", |b| {
        b.iter(|| {
            futures::executor::block_on(v.verify(
                black_box(plaintext.as_bytes()),
                Require::Signed,
                now,
            ))
        })
    });
    g.finish();
}

fn report(c: &mut Criterion) {
    let (v, _) = verifier();
    let device = Identity::generate(DidMethod::Key);
    let r = Rejection {
        code: Code::NotAuthorised,
        args: vec![device.did.clone(), "devices/bench-7/telemetry".into()],
        id: Some("bench-0000000042".into()),
        thid: Some("bench-0000000042".into()),
        sender: Some(device.did.clone()),
        sender_verified: true,
    };
    let now = now_secs();
    let mut g = c.benchmark_group("report");
    g.throughput(Throughput::Elements(1));
    g.bench_function("build_report", |b| {
        b.iter(|| verify::build_report(black_box(v.hub_did()), black_box(&r), None, now))
    });
    // Packing (signed and authcrypted to the verified sender) is what a report really costs.
    g.bench_function("pack_report_authcrypt_signed", |b| {
        b.iter(|| futures::executor::block_on(v.pack_report(black_box(&r), None, now)).unwrap())
    });
    g.finish();
}

fn commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = store::open(&dir.path().join("bench.db")).unwrap();
    let p = payload(42, 200);
    let tags = vec![("device".to_string(), "bench-7".to_string())];
    let input = MapInput {
        measurement: "telemetry",
        did: Some("did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"),
        thid: "t",
        extra_tags: &tags,
        timestamp_path: None,
        timestamp_format: TimestampFormat::Auto,
        received_ns: 1_700_000_000_000_000_000,
        limits: LIMITS,
    };
    let point = map_payload(&p, &input).unwrap();
    let next = AtomicU64::new(0);
    let batch = |sink: Sink| -> Vec<Commit> {
        (0..100)
            .map(|_| {
                let i = next.fetch_add(1, Ordering::Relaxed);
                Commit {
                    sender: "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK".into(),
                    msg_id: format!("bench-{i:012}"),
                    hash: [7; 32],
                    received_ns: 1_700_000_000_000_000_000 + i as i64,
                    rows: vec![Row::encode(point.clone(), sink).unwrap()],
                }
            })
            .collect()
    };
    let mut g = c.benchmark_group("commit");
    // What the verify workers do before the committer (tags and fields to JSON, or a line).
    g.throughput(Throughput::Elements(1));
    for (name, sink) in [("embedded", Sink::Embedded), ("outbox", Sink::Outbox)] {
        g.bench_function(format!("encode_row/{name}"), |b| {
            b.iter_batched(
                || point.clone(),
                |p| Row::encode(p, sink).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    g.throughput(Throughput::Elements(100));
    for (name, sink) in [("embedded", Sink::Embedded), ("outbox", Sink::Outbox)] {
        g.bench_function(format!("commit_batch_100/{name}"), |b| {
            b.iter_batched(
                || batch(sink),
                |commits| {
                    let refs: Vec<&Commit> = commits.iter().collect();
                    store::commit_batch(&mut conn, &refs).unwrap()
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, mapping, verification, report, commit);

fn main() {
    // As `didhub` does: the didcomm crate builds errors while detecting the envelope, and with
    // library backtraces on each one captures a backtrace (plaintext unpack 4× slower).
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
