//! Property tests of the untrusted path: raw MQTT bytes → `Shared::process` (verify, route,
//! map, report packing). Whatever the bytes, `process` must not panic, and its result must be
//! consistent:
//!
//! * every `Work::Done` report goes to a non-empty topic ending in `/problem-report` (no
//!   Response Topic is set here) and its body is JSON;
//! * a `Work::Store` attributed to a sender only comes from an input that is, as JSON, an
//!   unmodified genuine signed or authcrypt post by that sender, on a route that accepts it;
//!   a `Work::Store` without a sender only comes from a `require = "any"` route that does not
//!   restrict senders to the registry.
//!
//! The hub config and the TEST-ONLY identities are the fuzz target's (`fuzz/`), so a failure
//! here can be replayed there: prefix the payload with the topic byte (`TOPICS` index).

use std::sync::{Arc, OnceLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use didhub::config::Config;
use didhub::did::Identity;
use didhub::pipeline::{Inbound, Shared, Stats, Work};
use didhub::verify::{pack_post, Envelope, POST_TYPE, REPORT_TYPE};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::{json, Map, Value};

const HUB_IDENTITY: &str = include_str!("../fuzz/hub-identity.json");
const DEVICE_KEY: &str = include_str!("../fuzz/test-device-key-identity.json");
const DEVICE_PEER: &str = include_str!("../fuzz/test-device-peer-identity.json");
const HUB_TOML: &str = include_str!("../fuzz/fuzz-hub.toml");

/// The fuzz target's topics (fuzz/src/lib.rs, same order), plus one no route matches.
const TOPICS: [&str; 9] = [
    "auth/dev1/t",              // require authenticated
    "open/dev1",                // require any
    "reg/dev1/t",               // require authenticated, registry senders
    "signed/dev1/t",            // require signed
    "authcrypt/dev1/t",         // require authcrypt
    "open/dev1/problem-report", // the hub's own report topic
    "opents/dev1/x",            // require any, tags + payload timestamp
    "regany/dev1",              // require any, registry senders
    "nowhere/dev1",             // no route
];

struct Seed {
    bytes: Vec<u8>,
    json: Value,
    envelope: Envelope,
    device: String,
}

struct Fixture {
    shared: Shared,
    hub: String,
    registered: String,
    other: String,
    seeds: Vec<Seed>,
}

fn signed(e: Envelope) -> bool {
    matches!(
        e,
        Envelope::Signed | Envelope::AnoncryptSigned | Envelope::AuthcryptSigned
    )
}

fn authcrypt(e: Envelope) -> bool {
    matches!(e, Envelope::Authcrypt | Envelope::AuthcryptSigned)
}

fn authenticated(e: Envelope) -> bool {
    signed(e) || authcrypt(e)
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let id = |s: &str| -> Identity { serde_json::from_str(s).expect("test identity") };
        let (hub, key, peer) = (id(HUB_IDENTITY), id(DEVICE_KEY), id(DEVICE_PEER));
        let cfg = Config::from_toml(HUB_TOML, "fuzz-hub.toml", &[]).expect("fuzz-hub.toml");
        assert!(cfg.devices.iter().any(|d| d.did == key.did));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut seeds = Vec::new();
        for dev in [&key, &peer] {
            for envelope in Envelope::ALL {
                let packed = futures::executor::block_on(pack_post(
                    dev,
                    &hub.did,
                    &format!("prop-{}", envelope.as_str()),
                    json!({"ts": now, "v": 1.5, "s": "x", "n": {"a": [1, 2]}}),
                    envelope,
                    now,
                ))
                .expect("pack seed");
                seeds.push(Seed {
                    json: serde_json::from_str(&packed).unwrap(),
                    bytes: packed.into_bytes(),
                    envelope,
                    device: dev.did.clone(),
                });
            }
        }
        Fixture {
            hub: hub.did.clone(),
            registered: key.did.clone(),
            other: peer.did.clone(),
            shared: Shared::from_config(&cfg, hub, Arc::new(Stats::default())),
            seeds,
        }
    })
}

fn process(f: &Fixture, topic: &str, payload: &[u8]) -> Work {
    f.shared.process(Inbound {
        seq: 7,
        topic: topic.to_string(),
        payload: Bytes::copy_from_slice(payload),
        response_topic: None,
        correlation_data: None,
        ack: None,
        received_ns: 1_700_000_000_000_000_000,
    })
}

/// Whether the route of `topic` accepts a genuine post in `envelope` from `device`.
fn route_accepts(f: &Fixture, topic: &str, envelope: Envelope, device: &str) -> bool {
    let registered = device == f.registered;
    match topic {
        "auth/dev1/t" => authenticated(envelope),
        "open/dev1" | "opents/dev1/x" => true,
        "reg/dev1/t" => authenticated(envelope) && registered,
        "signed/dev1/t" => signed(envelope),
        "authcrypt/dev1/t" => authcrypt(envelope),
        "regany/dev1" => authenticated(envelope) && registered,
        _ => false,
    }
}

/// Processes `payload` on `topic` and checks the result (see the module docs).
fn check(f: &Fixture, topic: &str, payload: &[u8]) -> Result<(), TestCaseError> {
    let shown = || String::from_utf8_lossy(&payload[..payload.len().min(600)]).into_owned();
    match process(f, topic, payload) {
        Work::Done(s) => {
            prop_assert_eq!(s.seq, 7);
            if let Some(r) = s.report {
                prop_assert!(
                    r.topic.len() > "/problem-report".len() && r.topic.ends_with("/problem-report"),
                    "report topic {:?} on {} for {}",
                    r.topic,
                    topic,
                    shown()
                );
                prop_assert!(
                    serde_json::from_str::<Value>(&r.body).is_ok(),
                    "report body is not JSON"
                );
            }
        }
        Work::Store {
            seq,
            commit,
            report_topic,
            ..
        } => {
            prop_assert_eq!(seq, 7);
            prop_assert!(!commit.rows.is_empty());
            prop_assert!(report_topic.ends_with("/problem-report"));
            if commit.sender.is_empty() {
                prop_assert!(
                    matches!(topic, "open/dev1" | "opents/dev1/x"),
                    "stored without a verified sender on {}: {}",
                    topic,
                    shown()
                );
            } else {
                let parsed: Option<Value> = serde_json::from_slice(payload).ok();
                let genuine = f.seeds.iter().find(|s| Some(&s.json) == parsed.as_ref());
                prop_assert!(
                    genuine.is_some_and(|s| authenticated(s.envelope)
                        && s.device == commit.sender
                        && route_accepts(f, topic, s.envelope, &s.device)),
                    "stored as {} on {} but the input is not a genuine post it accepts: {}",
                    commit.sender,
                    topic,
                    shown()
                );
            }
        }
        #[allow(unreachable_patterns)]
        other => prop_assert!(false, "process returned {:?}", other),
    }
    Ok(())
}

// ----------------------------------------------------------------------------------------------
// Strategies
// ----------------------------------------------------------------------------------------------

fn topic() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&TOPICS[..])
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(&[
            "id", "typ", "type", "from", "to", "body", "payload", "thid", "pthid",
            "created_time", "expires_time", "from_prior", "attachments", "ciphertext",
            "protected", "signatures", "signature", "header", "recipients", "encrypted_key",
            "kid", "skid", "alg", "enc", "epk", "apu", "apv", "iv", "tag", "ts",
        ][..])
        .prop_map(str::to_string),
        1 => "[a-z_]{0,8}",
    ]
}

fn leaf(f: &'static Fixture) -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|x| json!(x)),
        "\\PC{0,12}".prop_map(Value::String),
        prop::sample::select(vec![
            POST_TYPE.to_string(),
            REPORT_TYPE.to_string(),
            f.hub.clone(),
            f.registered.clone(),
            f.other.clone(),
            format!("{}#key-1", f.other),
            "did:key:z6Mk".to_string(),
            "did:peer:2.Ez6LS.Vz6Mk".to_string(),
            "did:web:example.com".to_string(),
            "ECDH-1PU+A256KW".to_string(),
            "ECDH-ES+A256KW".to_string(),
            "EdDSA".to_string(),
            "application/didcomm-plain+json".to_string(),
            "2024-01-02T03:04:05Z".to_string(),
            "e30".to_string(),
        ])
        .prop_map(Value::String),
    ]
}

fn json_value(f: &'static Fixture) -> impl Strategy<Value = Value> {
    leaf(f).prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Arbitrary JSON, often shaped like a DIDComm message (objects with DIDComm members, posts
/// with a body, envelopes with base64url-encoded JSON in `protected` / `payload`).
fn json_message(f: &'static Fixture) -> impl Strategy<Value = Value> {
    let any_json = json_value(f);
    let post = (
        json_value(f),
        json_value(f),
        prop::collection::vec((key(), json_value(f)), 0..4),
    )
        .prop_map(|(payload, from, extra)| {
            let mut m = json!({"id": "x", "type": POST_TYPE, "body": {"payload": payload}});
            if !from.is_null() {
                m["from"] = from;
            }
            for (k, v) in extra {
                m[k] = v;
            }
            m
        });
    let envelope = (
        prop::sample::select(&["protected", "payload"][..]),
        json_value(f),
        prop::collection::vec((key(), json_value(f)), 0..5),
    )
        .prop_map(|(which, inner, extra)| {
            let mut m = Map::new();
            m.insert(
                which.to_string(),
                Value::String(URL_SAFE_NO_PAD.encode(inner.to_string())),
            );
            if which == "protected" {
                m.insert("ciphertext".into(), json!("AAAA"));
            } else {
                m.insert(
                    "signatures".into(),
                    json!([{"header": {"kid": "did:web:x#1"}}]),
                );
            }
            for (k, v) in extra {
                m.insert(k, v);
            }
            Value::Object(m)
        });
    prop_oneof![2 => any_json, 1 => post, 1 => envelope]
}

/// The base64url alphabet.
const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Set(Index, u8),
    Insert(Index, u8),
    Delete(Index),
    DeleteRange(Index, usize),
    Truncate(Index),
    /// Replace one base64url-alphabet byte with another (keeps the JSON valid, so the
    /// envelope reaches the crypto).
    B64Char(Index, Index),
    /// Remove one member or array element (the `Index`-th in document order).
    JsonRemove(Index),
    /// Replace one member or array element with another value.
    JsonReplace(Index, Value),
    /// Decode a base64url JSON member (`protected`, `payload`), remove or replace one of its
    /// members, and re-encode it.
    B64Json(Index, Index, Option<Value>),
}

fn mutation(f: &'static Fixture) -> impl Strategy<Value = Mutation> {
    let interesting = prop::sample::select(&b"{}[]\",:\\ 0Aa-_=.\x00\xff"[..]);
    prop_oneof![
        3 => (any::<Index>(), any::<Index>()).prop_map(|(i, c)| Mutation::B64Char(i, c)),
        1 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        1 => (
            any::<Index>(),
            prop_oneof![any::<u8>(), interesting.clone()]
        )
            .prop_map(|(i, b)| Mutation::Set(i, b)),
        1 => (any::<Index>(), prop_oneof![any::<u8>(), interesting])
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => any::<Index>().prop_map(Mutation::Delete),
        1 => (any::<Index>(), 1usize..64).prop_map(|(i, n)| Mutation::DeleteRange(i, n)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        2 => any::<Index>().prop_map(Mutation::JsonRemove),
        2 => (any::<Index>(), leaf(f)).prop_map(|(i, v)| Mutation::JsonReplace(i, v)),
        3 => (any::<Index>(), any::<Index>(), prop::option::of(leaf(f)))
            .prop_map(|(i, j, v)| Mutation::B64Json(i, j, v)),
    ]
}

/// Paths (object keys / array indices) of every member and element, in document order.
fn paths(v: &Value, prefix: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                prefix.push(json!(k));
                out.push(prefix.clone());
                paths(c, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                prefix.push(json!(i));
                out.push(prefix.clone());
                paths(c, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

/// Removes (`None`) or replaces the value at `path`.
fn edit(v: &mut Value, path: &[Value], new: Option<Value>) {
    let Some((last, parent_path)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for p in parent_path {
        cur = match (cur, p) {
            (Value::Object(m), Value::String(k)) => m.get_mut(k).unwrap(),
            (Value::Array(a), Value::Number(i)) => &mut a[i.as_u64().unwrap() as usize],
            _ => return,
        };
    }
    match (cur, last, new) {
        (Value::Object(m), Value::String(k), None) => {
            m.remove(k);
        }
        (Value::Object(m), Value::String(k), Some(n)) => {
            m.insert(k.clone(), n);
        }
        (Value::Array(a), Value::Number(i), None) => {
            a.remove(i.as_u64().unwrap() as usize);
        }
        (Value::Array(a), Value::Number(i), Some(n)) => {
            a[i.as_u64().unwrap() as usize] = n;
        }
        _ => {}
    }
}

fn json_edit(bytes: &mut Vec<u8>, i: &Index, new: Option<Value>) {
    let Ok(mut v) = serde_json::from_slice::<Value>(bytes) else {
        return;
    };
    let mut all = Vec::new();
    paths(&v, &mut Vec::new(), &mut all);
    if all.is_empty() {
        return;
    }
    edit(&mut v, &all[i.index(all.len())], new);
    *bytes = serde_json::to_vec(&v).unwrap();
}

/// Edits one member inside a base64url-encoded JSON string anywhere in the message.
fn b64_edit(bytes: &mut Vec<u8>, i: &Index, j: &Index, new: Option<Value>) {
    let Ok(mut v) = serde_json::from_slice::<Value>(bytes) else {
        return;
    };
    let mut all = Vec::new();
    paths(&v, &mut Vec::new(), &mut all);
    // Members whose value is base64url JSON (`protected`, JWS `payload`, ...).
    let decodable: Vec<(Vec<Value>, Value)> = all
        .into_iter()
        .filter_map(|p| {
            let mut cur = &v;
            for s in &p {
                cur = match s {
                    Value::String(k) => cur.get(k.as_str())?,
                    Value::Number(n) => cur.get(n.as_u64()? as usize)?,
                    _ => return None,
                };
            }
            let raw = URL_SAFE_NO_PAD
                .decode(cur.as_str()?.trim_end_matches('='))
                .ok()?;
            let inner: Value = serde_json::from_slice(&raw).ok()?;
            inner.is_object().then_some((p, inner))
        })
        .collect();
    if decodable.is_empty() {
        return;
    }
    let (path, mut inner) = decodable[i.index(decodable.len())].clone();
    let mut inner_paths = Vec::new();
    paths(&inner, &mut Vec::new(), &mut inner_paths);
    if inner_paths.is_empty() {
        return;
    }
    let which = &inner_paths[j.index(inner_paths.len())];
    edit(&mut inner, which, new);
    let encoded = Value::String(URL_SAFE_NO_PAD.encode(serde_json::to_vec(&inner).unwrap()));
    edit(&mut v, &path, Some(encoded));
    *bytes = serde_json::to_vec(&v).unwrap();
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    match m {
        Mutation::Flip(i, bit) if len > 0 => bytes[i.index(len)] ^= 1 << bit,
        Mutation::Set(i, b) if len > 0 => bytes[i.index(len)] = *b,
        Mutation::Insert(i, b) => bytes.insert(i.index(len + 1), *b),
        Mutation::Delete(i) if len > 0 => {
            bytes.remove(i.index(len));
        }
        Mutation::DeleteRange(i, n) if len > 0 => {
            let at = i.index(len);
            bytes.drain(at..(at + n).min(len));
        }
        Mutation::Truncate(i) => bytes.truncate(i.index(len + 1)),
        Mutation::B64Char(i, c) => {
            let at: Vec<usize> = (0..len).filter(|&k| B64.contains(&bytes[k])).collect();
            if !at.is_empty() {
                bytes[at[i.index(at.len())]] = B64[c.index(B64.len())];
            }
        }
        Mutation::JsonRemove(i) => json_edit(bytes, i, None),
        Mutation::JsonReplace(i, v) => json_edit(bytes, i, Some(v.clone())),
        Mutation::B64Json(i, j, v) => b64_edit(bytes, i, j, v.clone()),
        _ => {}
    }
}

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig {
        cases: n,
        // Only this file may be written by the test suite: print failures instead of saving
        // them under tests/proptest-regressions/.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ----------------------------------------------------------------------------------------------
// Tests
// ----------------------------------------------------------------------------------------------

/// The oracle's premise: unmodified seeds are stored exactly where their route accepts them.
#[test]
fn unmodified_seeds_are_stored_exactly_where_accepted() {
    let f = fixture();
    for s in &f.seeds {
        for topic in TOPICS {
            let stored = match process(f, topic, &s.bytes) {
                Work::Store { commit, .. } => {
                    let expected = if authenticated(s.envelope) {
                        s.device.as_str()
                    } else {
                        ""
                    };
                    assert_eq!(commit.sender, expected, "{:?} on {topic}", s.envelope);
                    true
                }
                Work::Done(d) => {
                    let silent = matches!(topic, "open/dev1/problem-report" | "nowhere/dev1");
                    assert_eq!(d.report.is_none(), silent, "{:?} on {topic}", s.envelope);
                    false
                }
                #[allow(unreachable_patterns)]
                other => panic!("process returned {other:?}"),
            };
            let who = if s.device == f.registered {
                "key"
            } else {
                "peer"
            };
            assert_eq!(
                stored,
                route_accepts(f, topic, s.envelope, &s.device),
                "{who} {:?} on {topic}",
                s.envelope
            );
            check(f, topic, &s.bytes).unwrap();
        }
    }
}

proptest! {
    #![proptest_config(cases(512))]

    /// (a) Arbitrary bytes.
    #[test]
    fn arbitrary_bytes(topic in topic(), bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        check(fixture(), topic, &bytes)?;
    }

    /// (a') Arbitrary printable text, mostly JSON punctuation.
    #[test]
    fn arbitrary_text(topic in topic(), text in "[{}\\[\\]\":,a-z0-9 ]{0,256}") {
        check(fixture(), topic, text.as_bytes())?;
    }
}

proptest! {
    #![proptest_config(cases(512))]

    /// (b) Arbitrary JSON values, serialised.
    #[test]
    fn arbitrary_json(topic in topic(), v in json_message(fixture())) {
        check(fixture(), topic, v.to_string().as_bytes())?;
    }
}

proptest! {
    #![proptest_config(cases(512))]

    /// (c) Real packed posts with byte-level and JSON-level mutations.
    #[test]
    fn mutated_real_messages(
        topic in topic(),
        seed in any::<Index>(),
        muts in prop::collection::vec(mutation(fixture()), 1..3),
    ) {
        let f = fixture();
        let mut bytes = f.seeds[seed.index(f.seeds.len())].bytes.clone();
        for m in &muts {
            apply(&mut bytes, m);
        }
        check(f, topic, &bytes)?;
    }
}
