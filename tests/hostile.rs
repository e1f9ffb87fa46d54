//! Hostile input, in process: every case goes through the whole untrusted path
//! (`Shared::process`, exactly what a verify worker runs on a publish) and is checked against
//! PROTOCOL.md:
//!
//! 1. it settles at once with a problem report on `{topic}/problem-report`;
//! 2. the report unpacks, is signed by the hub, has the problem-report type, exactly the code of
//!    the PROTOCOL.md table, and is linked (`pthid` = thread, `ack` = [id]) exactly when the
//!    rejected message's id could be read; it is encrypted exactly when the sender was verified;
//! 3. exactly one rejection counter went up by one, and nothing else was counted;
//! 4. the very next good message is accepted at once.
//!
//! Problem reports sent to the hub and anything on the hub's own report topics are never
//! answered; a replayed id with different content is caught by the store.
//!
//! One `#[test]` per case (the `reject!` and `ignored!` macros), so failures are isolated.
//! `HOSTILE_PRINT=1 cargo test --test hostile -- --nocapture` prints each case's code and args.
//! Every case states the expected behaviour; bugs it found in src were fixed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[path = "common/routes.rs"]
mod routes;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use didhub::config::Config;
use didhub::did::{DidMethod, Identity};
use didhub::pipeline::{Inbound, Settled, Shared, Stats, Work};
use didhub::store::{self, CommitResult};
use didhub::verify::{
    pack_message, pack_post, unpack_report, Code, Envelope, POST_TYPE, REPORT_TYPE,
};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Codes (the strings of the PROTOCOL.md table, deliberately not taken from `Code::as_str`)
// ---------------------------------------------------------------------------------------------

const INVALID: &str = "e.p.msg.invalid-message";
const UNSUPPORTED: &str = "e.p.msg.unsupported-message";
const NOT_AUTHN: &str = "e.p.msg.trust.not-authenticated";
const NOT_SIGNED: &str = "e.p.msg.trust.not-signed";
const NOT_SENDER_AUTHN: &str = "e.p.msg.trust.not-sender-authenticated";
const CRYPTO: &str = "e.p.msg.trust.crypto";
const NOT_AUTHORISED: &str = "e.p.msg.trust.not-authorised";
const TIME: &str = "e.p.req.time";
const REJECT: &str = "e.p.msg.iota.post.reject-post";

const PLAIN_TYP: &str = "application/didcomm-plain+json";

// Topics of the routes below.
const AUTH: &str = "auth/a/t";
const SIGNED: &str = "signed/a/t";
const AC: &str = "ac/a/t";
const OPEN: &str = "open/x";
const REG: &str = "reg/b/t";

fn code_of(s: &str) -> Code {
    *Code::ALL
        .iter()
        .find(|c| c.as_str() == s)
        .unwrap_or_else(|| panic!("`{s}` is not a code of didhub::verify::Code"))
}

// ---------------------------------------------------------------------------------------------
// The fixture: a hub with five routes and one registered device
// ---------------------------------------------------------------------------------------------

struct Fx {
    shared: Shared,
    hub: String,
    /// did:key device, in the registry.
    a: Identity,
    /// did:key device, not in the registry.
    b: Identity,
    /// did:peer:2 device.
    p: Identity,
    /// Reads reports that are only signed.
    stranger: Identity,
    seq: AtomicU64,
}

/// Whom the report must be encrypted to (`Anyone`: only signed, readable by anyone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reader {
    Anyone,
    A,
    B,
    P,
}

/// Counters `process` may touch.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Counters {
    rejected: Vec<u64>,
    ignored: u64,
    suppressed: u64,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn uid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn block<F: std::future::Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

impl Fx {
    fn new() -> Fx {
        let a = Identity::generate(DidMethod::Key);
        let b = Identity::generate(DidMethod::Key);
        let p = Identity::generate(DidMethod::Peer);
        let stranger = Identity::generate(DidMethod::Key);
        let toml = format!(
            r#"
[reports]
per_sender_per_second = 1000.0
per_sender_burst = 1000.0
global_per_second = 1000.0
global_burst = 1000.0

{}
[[devices]]
did = "{}"
name = "device-a"
"#,
            routes::ENVELOPE_ROUTES,
            a.did
        );
        let cfg = Config::from_toml(&toml, "hostile.toml", &[]).expect("test config");
        assert_eq!(cfg.limits.max_message_bytes, 65536);
        assert_eq!(cfg.limits.max_json_depth, 16);
        assert_eq!(cfg.limits.max_fields, 256);
        assert_eq!(cfg.limits.clock_skew.as_secs(), 300);
        let hub = Identity::generate(DidMethod::Key);
        let hub_did = hub.did.clone();
        let shared = Shared::from_config(&cfg, hub, Arc::new(Stats::default()));
        Fx {
            shared,
            hub: hub_did,
            a,
            b,
            p,
            stranger,
            seq: AtomicU64::new(0),
        }
    }

    fn process(&self, topic: &str, bytes: impl Into<Vec<u8>>) -> Work {
        self.shared.process(Inbound {
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            topic: topic.to_string(),
            payload: Bytes::from(bytes.into()),
            response_topic: None,
            correlation_data: None,
            ack: None,
            received_ns: didhub::now_ns(),
        })
    }

    fn counters(&self) -> Counters {
        let s = &self.shared.stats;
        Counters {
            rejected: Code::ALL.iter().map(|c| s.rejected_of(*c)).collect(),
            ignored: s.ignored.load(Ordering::Relaxed),
            suppressed: s.reports_suppressed.load(Ordering::Relaxed),
        }
    }

    fn reader(&self, r: Reader) -> &Identity {
        match r {
            Reader::Anyone => &self.stranger,
            Reader::A => &self.a,
            Reader::B => &self.b,
            Reader::P => &self.p,
        }
    }

    /// A fresh signed post from `a`: `(packed, id)`.
    fn post(&self, dev: &Identity, mode: Envelope, payload: Value) -> (String, String) {
        let id = uid();
        let packed = block(pack_post(dev, &self.hub, &id, payload, mode, now())).unwrap();
        (packed, id)
    }

    /// The next good message is accepted at once.
    fn assert_good_accepted(&self, after: &str) {
        let before = self.counters();
        let (packed, id) = self.post(&self.a, Envelope::Signed, json!({"ok": 1}));
        match self.process(AUTH, packed) {
            Work::Store { commit, .. } => assert_eq!(commit.msg_id, id),
            other => panic!(
                "{after}: the next good message was not accepted: {}",
                describe(&other)
            ),
        }
        assert_eq!(
            self.counters(),
            before,
            "{after}: a good message changed the counters"
        );
    }

    /// A plaintext post from `dev` with `overrides` applied (a `null` override removes the key).
    fn msg(&self, dev: &Identity, overrides: Value) -> Value {
        let mut m = json!({
            "id": uid(),
            "typ": PLAIN_TYP,
            "type": POST_TYPE,
            "from": dev.did,
            "to": [self.hub],
            "created_time": now(),
            "body": {"payload": {"x": 1}},
        });
        for (k, v) in overrides.as_object().expect("overrides is an object") {
            if v.is_null() {
                m.as_object_mut().unwrap().remove(k);
            } else {
                m[k] = v.clone();
            }
        }
        m
    }

    /// `msg` packed by `dev` as `mode`, linked to its id (and `thid`, if any).
    fn custom(&self, dev: &Identity, mode: Envelope, overrides: Value) -> Built {
        let m = self.msg(dev, overrides);
        let packed = block(pack_message(dev, &self.hub, m.clone(), mode)).unwrap();
        Built::of_msg(packed, &m)
    }

    /// `msg` as raw JSON bytes (a plaintext the packer would refuse), linked when `id` is a string.
    fn raw(&self, overrides: Value) -> Built {
        let m = self.msg(&self.a, overrides);
        Built::of_msg(m.to_string(), &m)
    }

    /// A valid JWS by `dev` over arbitrary payload bytes (the packer only signs `Message`s).
    fn sign_raw(&self, dev: &Identity, payload: &[u8]) -> String {
        let (template, _) = self.post(dev, Envelope::Signed, json!(1));
        resign(dev, &template, payload)
    }
}

fn describe(w: &Work) -> String {
    match w {
        Work::Store { commit, .. } => format!("accepted for storage (id {})", commit.msg_id),
        Work::Done(Settled { report: None, .. }) => "settled without a report".into(),
        Work::Done(Settled {
            report: Some(r), ..
        }) => format!("settled with a report on {}", r.topic),
        // Anything new the pipeline learns to return is not what a hostile input may get.
        #[allow(unreachable_patterns)]
        _ => "something other than a settle or a store".into(),
    }
}

/// Input bytes and the linking the report must have.
struct Built {
    bytes: Vec<u8>,
    /// `(id, thid)` of the rejected message, when it can be read.
    link: Option<(String, String)>,
    /// Whether a report without any linking is also right (the id is only readable after
    /// decryption, or the hub's reading of it may differ from didcomm's).
    link_optional: bool,
    /// The longest `body.args` element the report may have (attacker text must not be echoed
    /// in full into a report the hub signs).
    max_arg_chars: Option<usize>,
}

impl Built {
    fn unlinked(bytes: impl Into<Vec<u8>>) -> Built {
        Built {
            bytes: bytes.into(),
            link: None,
            link_optional: false,
            max_arg_chars: None,
        }
    }

    fn linked(bytes: impl Into<Vec<u8>>, id: &str) -> Built {
        Built {
            bytes: bytes.into(),
            link: Some((id.to_string(), id.to_string())),
            link_optional: false,
            max_arg_chars: None,
        }
    }

    /// Linking read from the plaintext `m`, as PROTOCOL.md says: only a string `id` can be acked.
    fn of_msg(bytes: impl Into<Vec<u8>>, m: &Value) -> Built {
        let link = m["id"].as_str().map(|id| {
            let thid = m["thid"].as_str().unwrap_or(id);
            (id.to_string(), thid.to_string())
        });
        Built {
            bytes: bytes.into(),
            link,
            link_optional: false,
            max_arg_chars: None,
        }
    }

    /// Requires every element of `body.args` to be at most `n` characters.
    fn args_at_most(mut self, n: usize) -> Built {
        self.max_arg_chars = Some(n);
        self
    }

    /// Also accepts a report without `pthid` and `ack`.
    fn or_unlinked(mut self) -> Built {
        self.link_optional = true;
        self
    }
}

// ---------------------------------------------------------------------------------------------
// Envelope surgery
// ---------------------------------------------------------------------------------------------

fn b64d(s: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .expect("base64url")
}

fn b64e(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

fn parse(s: &str) -> Value {
    serde_json::from_str(s).expect("packed JSON")
}

/// Flips one bit of the decoded bytes of a base64url string.
fn flip_b64(s: &Value) -> Value {
    let mut b = b64d(s.as_str().expect("a base64url string"));
    let i = b.len() / 2;
    b[i] ^= 0x01;
    json!(b64e(&b))
}

/// Decodes a base64url JSON part, edits it, encodes it again.
fn edit_b64_json(s: &Value, f: impl FnOnce(&mut Value)) -> Value {
    let mut v: Value = serde_json::from_slice(&b64d(s.as_str().unwrap())).unwrap();
    f(&mut v);
    json!(b64e(v.to_string().as_bytes()))
}

/// Applies `f` to the JSON of a packed message.
fn edit(packed: &str, f: impl FnOnce(&mut Value)) -> String {
    let mut j = parse(packed);
    f(&mut j);
    j.to_string()
}

/// The Ed25519 signing key of an identity.
fn signing_key(dev: &Identity) -> ed25519_dalek::SigningKey {
    let kid = dev.signing_kid();
    let secret = dev
        .secrets
        .iter()
        .find(|s| s.id == kid)
        .expect("signing secret");
    let didcomm::secrets::SecretMaterial::JWK { private_key_jwk } = &secret.secret_material else {
        panic!("signing secret is not a JWK")
    };
    let d = b64d(private_key_jwk["d"].as_str().unwrap());
    ed25519_dalek::SigningKey::from_bytes(&d.try_into().expect("32-byte Ed25519 seed"))
}

/// Replaces the payload of the JWS `template` (signed by `dev`) and signs it again, validly.
fn resign(dev: &Identity, template: &str, payload: &[u8]) -> String {
    use ed25519_dalek::Signer as _;
    let mut j = parse(template);
    let payload = b64e(payload);
    let protected = j["signatures"][0]["protected"]
        .as_str()
        .unwrap()
        .to_string();
    let sig = signing_key(dev).sign(format!("{protected}.{payload}").as_bytes());
    j["payload"] = json!(payload);
    j["signatures"][0]["signature"] = json!(b64e(&sig.to_bytes()));
    j.to_string()
}

/// A signed post from `a` whose signature `kid` is replaced by `kid` (signature unchanged).
fn signed_with_kid(fx: &Fx, kid: &str) -> Built {
    let (s, id) = fx.post(&fx.a, Envelope::Signed, json!({"x": 1}));
    let s = edit(&s, |j| j["signatures"][0]["header"]["kid"] = json!(kid));
    Built::linked(s, &id)
}

/// An authcrypt post from `a` with one top-level JWE member changed.
fn authcrypt_edited(fx: &Fx, f: impl FnOnce(&mut Value)) -> Built {
    let (s, _) = fx.post(&fx.a, Envelope::Authcrypt, json!({"x": 1}));
    Built::unlinked(edit(&s, f))
}

/// `{"a":{"a":…1…}}` nested `n` deep.
fn nested_objects(n: usize) -> String {
    format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n))
}

/// A payload of `n` numeric fields.
fn fields(n: usize) -> Value {
    Value::Object((0..n).map(|i| (format!("f{i}"), json!(i))).collect())
}

// ---------------------------------------------------------------------------------------------
// The runners
// ---------------------------------------------------------------------------------------------

fn run_reject(
    name: &str,
    topic: &str,
    code: &str,
    reader: Reader,
    build: impl FnOnce(&Fx) -> Built,
) {
    let fx = Fx::new();
    let built = build(&fx);
    let before = fx.counters();
    let in_len = built.bytes.len();
    let work = fx.process(topic, built.bytes);

    // (1) Settled at once, with a report on the route's report topic.
    let report = match work {
        Work::Done(Settled {
            report: Some(r), ..
        }) => r,
        other => panic!(
            "{name}: expected a problem report, got: {}",
            describe(&other)
        ),
    };
    assert_eq!(
        report.topic,
        format!("{topic}/problem-report"),
        "{name}: report topic"
    );

    // (2) The report itself.
    let encrypted = parse(&report.body).get("ciphertext").is_some();
    assert_eq!(
        encrypted,
        reader != Reader::Anyone,
        "{name}: the report must be encrypted exactly when the sender is verified (expected reader {reader:?})"
    );
    let (m, signer) = block(unpack_report(fx.reader(reader), &report.body))
        .unwrap_or_else(|e| panic!("{name}: the report does not unpack for {reader:?}: {e}"));
    assert_eq!(
        signer.as_deref(),
        Some(fx.hub.as_str()),
        "{name}: signed by the hub: {m}"
    );
    assert_eq!(m["type"], REPORT_TYPE, "{name}: {m}");
    assert_eq!(m["from"], fx.hub.as_str(), "{name}: {m}");
    if std::env::var_os("HOSTILE_PRINT").is_some() {
        eprintln!(
            "CASE {name} => {} in={} report={} {}",
            m["body"]["code"],
            in_len,
            report.body.len(),
            m["body"]["args"]
        );
    }
    assert_eq!(
        m["body"]["code"], code,
        "{name}: wrong code; report body: {}",
        m["body"]
    );
    if let Some(max) = built.max_arg_chars {
        for a in m["body"]["args"].as_array().expect("args") {
            let n = a.as_str().map_or(0, |s| s.chars().count());
            assert!(
                n <= max,
                "{name}: a report arg of {n} characters (limit {max})"
            );
        }
    }
    let unlinked = m.get("pthid").is_none() && m.get("ack").is_none();
    match &built.link {
        Some(_) if built.link_optional && unlinked => {}
        Some((id, thid)) => {
            assert_eq!(m["pthid"], thid.as_str(), "{name}: pthid: {m}");
            assert_eq!(m["ack"], json!([id]), "{name}: ack: {m}");
        }
        None => {
            assert!(m.get("pthid").is_none(), "{name}: unexpected pthid: {m}");
            assert!(m.get("ack").is_none(), "{name}: unexpected ack: {m}");
        }
    }
    if reader != Reader::Anyone {
        assert_eq!(m["to"], json!([fx.reader(reader).did]), "{name}: to: {m}");
    }

    // (3) Exactly one counter moved, by one.
    let after = fx.counters();
    let mut expected = before.clone();
    let i = Code::ALL.iter().position(|c| *c == code_of(code)).unwrap();
    expected.rejected[i] += 1;
    assert_eq!(after, expected, "{name}: counters (order of Code::ALL)");

    // (4) The next good message goes through.
    fx.assert_good_accepted(name);
}

fn run_ignored(name: &str, topic: &str, build: impl FnOnce(&Fx) -> Vec<u8>) {
    let fx = Fx::new();
    let bytes = build(&fx);
    let before = fx.counters();
    match fx.process(topic, bytes) {
        Work::Done(Settled { report: None, .. }) => {}
        other => panic!(
            "{name}: must be settled without a report, got: {}",
            describe(&other)
        ),
    }
    let mut expected = before;
    expected.ignored += 1;
    assert_eq!(fx.counters(), expected, "{name}: only `ignored` counts it");
    fx.assert_good_accepted(name);
}

/// `name: topic => code, reader, |fx| builder;` — one `#[test]` per case.
macro_rules! reject {
    ($($(#[$meta:meta])* $name:ident: $topic:expr => $code:expr, $reader:ident, $build:expr;)+) => {
        $(
            #[test]
            $(#[$meta])*
            fn $name() {
                run_reject(stringify!($name), $topic, $code, Reader::$reader, $build);
            }
        )+
    };
}

/// `name: topic, |fx| bytes;` — never answered.
macro_rules! ignored {
    ($($name:ident: $topic:expr, $build:expr;)+) => {
        $(
            #[test]
            fn $name() {
                run_ignored(stringify!($name), $topic, $build);
            }
        )+
    };
}

// ---------------------------------------------------------------------------------------------
// Bytes that are not a DIDComm message at all: invalid-message, no linking
// ---------------------------------------------------------------------------------------------

reject! {
    not_json: AUTH => INVALID, Anyone, |_| Built::unlinked("not json");
    empty_bytes: AUTH => INVALID, Anyone, |_| Built::unlinked("");
    json_array: AUTH => INVALID, Anyone, |_| Built::unlinked("[1,2,3]");
    json_string: AUTH => INVALID, Anyone, |_| Built::unlinked("\"hello\"");
    json_number: AUTH => INVALID, Anyone, |_| Built::unlinked("42");
    json_null: AUTH => INVALID, Anyone, |_| Built::unlinked("null");
    truncated_json: OPEN => INVALID, Anyone, |fx| {
        let s = fx.msg(&fx.a, json!({})).to_string();
        Built::unlinked(&s.as_bytes()[..s.len() / 2])
    };
    invalid_utf8: AUTH => INVALID, Anyone, |_| Built::unlinked(vec![0xff, 0xfe, 0xfd]);
    invalid_utf8_inside_a_json_string: OPEN => INVALID, Anyone, |fx| {
        let s = fx.msg(&fx.a, json!({"body": {"payload": "AAAA"}})).to_string();
        let mut b = s.into_bytes();
        let at = b.windows(4).position(|w| w == b"AAAA").unwrap();
        b[at] = 0xc3; // a UTF-8 lead byte followed by ASCII
        Built::unlinked(b)
    };
    utf8_bom_before_json: OPEN => INVALID, Anyone, |fx| {
        Built::unlinked(format!("\u{feff}{}", fx.msg(&fx.a, json!({}))))
    };
    lone_surrogate_escape: OPEN => INVALID, Anyone, |fx| {
        let s = fx.msg(&fx.a, json!({"body": {"payload": "SURROGATE"}})).to_string();
        Built::unlinked(s.replace("SURROGATE", "\\ud800"))
    };
    // 10,000 levels: far beyond serde_json's recursion limit; must not overflow the stack.
    nested_10000_arrays: AUTH => INVALID, Anyone, |_| {
        Built::unlinked(format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)))
    };
    nested_10000_objects_in_a_plaintext_payload: OPEN => INVALID, Anyone, |fx| {
        let s = fx.msg(&fx.a, json!({"body": {"payload": "DEEP"}})).to_string();
        let b = s.replace("\"DEEP\"", &nested_objects(10_000));
        assert!(b.len() < 65536, "under the size limit: {}", b.len());
        Built::unlinked(b)
    };
    // serde_json (without arbitrary_precision) refuses numbers outside f64 at parse time.
    number_1e400_in_a_plaintext_payload: OPEN => INVALID, Anyone, |fx| {
        let s = fx.msg(&fx.a, json!({"body": {"payload": {"x": "HUGE"}}})).to_string();
        Built::unlinked(s.replace("\"HUGE\"", "1e400"))
    };
    negative_number_1e400_in_a_plaintext_payload: OPEN => INVALID, Anyone, |fx| {
        let s = fx.msg(&fx.a, json!({"body": {"payload": {"x": "HUGE"}}})).to_string();
        Built::unlinked(s.replace("\"HUGE\"", "-1e400"))
    };
    integer_of_400_digits_in_a_plaintext_payload: OPEN => INVALID, Anyone, |fx| {
        let s = fx.msg(&fx.a, json!({"body": {"payload": {"x": "HUGE"}}})).to_string();
        Built::unlinked(s.replace("\"HUGE\"", &format!("1{}", "0".repeat(400))))
    };
    number_1e400_in_a_validly_signed_payload: AUTH => INVALID, Anyone, |fx| {
        let inner = fx.msg(&fx.a, json!({"body": {"payload": {"x": "HUGE"}}})).to_string();
        Built::unlinked(fx.sign_raw(&fx.a, inner.replace("\"HUGE\"", "1e400").as_bytes()))
    };
    jws_payload_not_base64url: AUTH => INVALID, Anyone, |fx| {
        let (s, _) = fx.post(&fx.a, Envelope::Signed, json!(1));
        Built::unlinked(edit(&s, |j| j["payload"] = json!("!!not base64!!")))
    };
    jwe_protected_header_not_base64url: AUTH => INVALID, Anyone, |fx| {
        authcrypt_edited(fx, |j| j["protected"] = json!("%%%"))
    };
    jwe_unsupported_key_management_alg: AUTH => INVALID, Anyone, |fx| {
        authcrypt_edited(fx, |j| {
            j["protected"] = edit_b64_json(&j["protected"], |p| p["alg"] = json!("RSA-OAEP"))
        })
    };
}

// ---------------------------------------------------------------------------------------------
// DIDComm plaintexts with missing or mistyped members (on the `any` route, so that the trust
// policy does not answer first): invalid-message, linked when `id` is a string
// ---------------------------------------------------------------------------------------------

reject! {
    plaintext_missing_id: OPEN => INVALID, Anyone, |fx| fx.raw(json!({"id": null}));
    plaintext_id_is_a_number: OPEN => INVALID, Anyone, |fx| fx.raw(json!({"id": 12345}));
    plaintext_id_is_an_object: OPEN => INVALID, Anyone, |fx| fx.raw(json!({"id": {"x": 1}}));
    plaintext_missing_type: OPEN => INVALID, Anyone, |fx| fx.raw(json!({"type": null}));
    plaintext_type_is_a_number: OPEN => INVALID, Anyone, |fx| fx.raw(json!({"type": 7}));
    plaintext_missing_body: OPEN => INVALID, Anyone, |fx| fx.raw(json!({"body": null}));
    plaintext_body_is_a_string: OPEN => INVALID, Anyone, |fx| fx.raw(json!({"body": "payload"}));
    plaintext_body_is_an_array: OPEN => INVALID, Anyone, |fx| fx.raw(json!({"body": [{"payload": 1}]}));
    plaintext_body_without_payload: OPEN => INVALID, Anyone, |fx| fx.raw(json!({"body": {"value": 1}}));
    plaintext_wrong_typ: OPEN => INVALID, Anyone, |fx| fx.raw(json!({"typ": "application/json"}));
    plaintext_created_time_is_a_string: OPEN => INVALID, Anyone, |fx| fx.raw(json!({"created_time": "yesterday"}));
    plaintext_expires_time_negative: OPEN => INVALID, Anyone, |fx| fx.raw(json!({"expires_time": -1}));
    // Parser differential: serde_json's `Value` keeps the last duplicate, didcomm's derive
    // refuses duplicates.
    plaintext_with_duplicate_id_keys: OPEN => INVALID, Anyone, |fx| {
        let m = fx.msg(&fx.a, json!({}));
        let id = m["id"].as_str().unwrap().to_string();
        let s = m.to_string().replacen("\"id\":", "\"id\":\"first\",\"id\":", 1);
        Built::linked(s, &id).or_unlinked()
    };
    validly_signed_payload_with_duplicate_from_keys: AUTH => INVALID, Anyone, |fx| {
        let m = fx.msg(&fx.a, json!({}));
        let id = m["id"].as_str().unwrap().to_string();
        let from = format!("\"from\":\"{}\",", fx.b.did);
        let s = m.to_string().replacen("\"from\":", &format!("{from}\"from\":"), 1);
        Built::linked(fx.sign_raw(&fx.a, s.as_bytes()), &id).or_unlinked()
    };
    plaintext_to_is_a_string: OPEN => INVALID, Anyone, |fx| {
        let hub = fx.hub.clone();
        fx.raw(json!({"to": hub}))
    };
    signed_body_without_payload: AUTH => INVALID, A, |fx| {
        fx.custom(&fx.a, Envelope::Signed, json!({"body": {"other": 1}}))
    };
    signed_body_is_a_number: AUTH => INVALID, A, |fx| {
        fx.custom(&fx.a, Envelope::Signed, json!({"body": 5}))
    };
    // A valid signature over something that is not a DIDComm message.
    validly_signed_payload_without_id: AUTH => INVALID, Anyone, |fx| {
        let inner = fx.msg(&fx.a, json!({"id": null})).to_string();
        Built::unlinked(fx.sign_raw(&fx.a, inner.as_bytes()))
    };
    validly_signed_payload_not_an_object: AUTH => INVALID, Anyone, |fx| {
        Built::unlinked(fx.sign_raw(&fx.a, b"[1,2,3]"))
    };
    // The signature is fine; the signed plaintext has the wrong `typ`: the message is malformed,
    // nothing cryptographic failed. The façade maps every unpack error of a non-plaintext
    // envelope that is not "not a valid JWE, JWS or JWM" to crypto, and didcomm's `typ` check
    // is such an error.
    validly_signed_plaintext_with_wrong_typ: AUTH => INVALID, Anyone, |fx| {
        fx.custom(&fx.a, Envelope::Signed, json!({"typ": "application/json"}))
    };
    anoncrypted_plaintext_with_wrong_typ: OPEN => INVALID, Anyone, |fx| {
        let hub = fx.hub.clone();
        let m = fx.msg(&fx.a, json!({"typ": "application/json", "from": null, "to": [hub]}));
        let id = m["id"].as_str().unwrap().to_string();
        Built::linked(block(pack_message(&fx.a, &fx.hub, m, Envelope::Anoncrypt)).unwrap(), &id)
            .or_unlinked()
    };
    validly_signed_plaintext_with_mistyped_created_time: AUTH => INVALID, Anyone, |fx| {
        let inner = fx.msg(&fx.a, json!({"created_time": "now"}));
        let id = inner["id"].as_str().unwrap().to_string();
        Built::linked(fx.sign_raw(&fx.a, inner.to_string().as_bytes()), &id)
    };
}

// ---------------------------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------------------------

reject! {
    unknown_type_signed: AUTH => UNSUPPORTED, A, |fx| {
        fx.custom(&fx.a, Envelope::Signed, json!({"type": "https://didcomm.org/basicmessage/2.0/message"}))
    };
    unknown_type_of_30_kib_is_not_echoed_in_full: AUTH => UNSUPPORTED, A, |fx| {
        fx.custom(&fx.a, Envelope::Signed, json!({"type": "t".repeat(30 * 1024)}))
            .args_at_most(1024)
    };
    unknown_type_plaintext_on_open_route: OPEN => UNSUPPORTED, Anyone, |fx| {
        fx.raw(json!({"type": "iota/post/9.9/post"}))
    };
    post_type_with_different_case: AUTH => UNSUPPORTED, A, |fx| {
        fx.custom(&fx.a, Envelope::Authcrypt, json!({"type": "IOTA/post/0.1/post"}))
    };
}

// ---------------------------------------------------------------------------------------------
// Signatures: crypto
// ---------------------------------------------------------------------------------------------

reject! {
    jws_tampered_payload: AUTH => CRYPTO, Anyone, |fx| {
        let (s, id) = fx.post(&fx.a, Envelope::Signed, json!({"x": 1}));
        let s = edit(&s, |j| {
            j["payload"] = edit_b64_json(&j["payload"], |m| m["body"]["payload"] = json!({"x": 999}))
        });
        Built::linked(s, &id)
    };
    jws_tampered_protected_header: AUTH => CRYPTO, Anyone, |fx| {
        let (s, id) = fx.post(&fx.a, Envelope::Signed, json!({"x": 1}));
        let s = edit(&s, |j| {
            let p = &mut j["signatures"][0]["protected"];
            *p = edit_b64_json(p, |h| h["cty"] = json!("evil"));
        });
        Built::linked(s, &id)
    };
    jws_tampered_signature: AUTH => CRYPTO, Anyone, |fx| {
        let (s, id) = fx.post(&fx.a, Envelope::Signed, json!({"x": 1}));
        let s = edit(&s, |j| {
            let sig = &mut j["signatures"][0]["signature"];
            *sig = flip_b64(sig);
        });
        Built::linked(s, &id)
    };
    jws_truncated_signature: AUTH => CRYPTO, Anyone, |fx| {
        let (s, id) = fx.post(&fx.a, Envelope::Signed, json!({"x": 1}));
        let s = edit(&s, |j| {
            let sig = b64d(j["signatures"][0]["signature"].as_str().unwrap());
            j["signatures"][0]["signature"] = json!(b64e(&sig[..32]));
        });
        Built::linked(s, &id)
    };
    jws_signed_by_a_did_other_than_from: AUTH => CRYPTO, Anyone, |fx| {
        let other = fx.b.did.clone();
        fx.custom(&fx.a, Envelope::Signed, json!({"from": other}))
    };
    jws_without_from: AUTH => CRYPTO, Anyone, |fx| {
        fx.custom(&fx.a, Envelope::Signed, json!({"from": null}))
    };
    jws_kid_of_another_device: AUTH => CRYPTO, Anyone, |fx| signed_with_kid(fx, &fx.b.signing_kid());
    anoncrypt_signed_by_a_did_other_than_from: AUTH => CRYPTO, Anyone, |fx| {
        let other = fx.b.did.clone();
        fx.custom(&fx.a, Envelope::AnoncryptSigned, json!({"from": other}))
    };
}

// ---------------------------------------------------------------------------------------------
// Sender DIDs that cannot be resolved, or lack the key: not-authenticated
// ---------------------------------------------------------------------------------------------

reject! {
    kid_with_unknown_did_method: AUTH => NOT_AUTHN, Anyone, |fx| {
        signed_with_kid(fx, "did:web:example.com#key-1")
    };
    kid_with_unsupported_did_peer_numalgo: AUTH => NOT_AUTHN, Anyone, |fx| {
        signed_with_kid(fx, "did:peer:4zQmd8CpeFPci817KDsbSAKWcXAE2mjvCQSasRewvbSF54Bd#key-1")
    };
    kid_with_malformed_did_key_multibase: AUTH => NOT_AUTHN, Anyone, |fx| {
        signed_with_kid(fx, "did:key:z0OIl0OIl0OIl#z0OIl0OIl0OIl")
    };
    kid_with_did_key_not_base58btc: AUTH => NOT_AUTHN, Anyone, |fx| {
        signed_with_kid(fx, "did:key:f0123456789abcdef#f0123456789abcdef")
    };
    kid_with_malformed_did_peer_2: AUTH => NOT_AUTHN, Anyone, |fx| {
        signed_with_kid(fx, "did:peer:2.Vz0OIl.Ezzz#key-1")
    };
    kid_with_9_kib_did: AUTH => NOT_AUTHN, Anyone, |fx| {
        signed_with_kid(fx, &format!("did:key:z{}#k", "1".repeat(9 * 1024)))
    };
    kid_fragment_not_in_the_did_document: AUTH => NOT_AUTHN, Anyone, |fx| {
        signed_with_kid(fx, &format!("{}#key-99", fx.a.did))
    };
    kid_is_the_key_agreement_key: AUTH => NOT_AUTHN, Anyone, |fx| {
        signed_with_kid(fx, &fx.a.agreement_kid())
    };
    // did.rs quotes DIDs in its errors truncated to 120 characters and escaped ("safe to
    // log"); verify.rs puts the raw DID in front of that error.
    kid_with_a_50_kib_did_is_not_echoed_in_full: AUTH => NOT_AUTHN, Anyone, |fx| {
        signed_with_kid(fx, &format!("did:evil:{}\nforged log line#k", "x".repeat(50 * 1024)))
            .args_at_most(1024)
    };
    kid_of_a_did_without_an_authentication_key: AUTH => NOT_AUTHN, Anyone, |fx| {
        // did:key of an X25519 key: resolvable, but it has only a key-agreement key.
        let x = fx.a.agreement_kid();
        let frag = x.split('#').nth(1).unwrap().to_string();
        assert!(frag.starts_with("z6LS"), "{frag}");
        signed_with_kid(fx, &format!("did:key:{frag}#{frag}"))
    };
    authcrypt_skid_with_unknown_did_method: AUTH => NOT_AUTHN, Anyone, |fx| {
        let kid = "did:web:example.com#key-x25519";
        authcrypt_edited(fx, |j| {
            j["protected"] = edit_b64_json(&j["protected"], |p| {
                p["skid"] = json!(kid);
                p["apu"] = json!(b64e(kid.as_bytes()));
            })
        })
    };
}

// ---------------------------------------------------------------------------------------------
// Encryption: crypto (nothing inside can be read, so no linking)
// ---------------------------------------------------------------------------------------------

reject! {
    authcrypt_skid_rewritten_to_another_device: AUTH => CRYPTO, Anyone, |fx| {
        let kid = fx.b.agreement_kid();
        authcrypt_edited(fx, |j| {
            j["protected"] = edit_b64_json(&j["protected"], |p| {
                p["skid"] = json!(kid);
                p["apu"] = json!(b64e(kid.as_bytes()));
            })
        })
    };
    jwe_tampered_ciphertext: AUTH => CRYPTO, Anyone, |fx| {
        authcrypt_edited(fx, |j| j["ciphertext"] = flip_b64(&j["ciphertext"]))
    };
    jwe_tampered_tag: AUTH => CRYPTO, Anyone, |fx| {
        authcrypt_edited(fx, |j| j["tag"] = flip_b64(&j["tag"]))
    };
    jwe_tampered_iv: AUTH => CRYPTO, Anyone, |fx| {
        authcrypt_edited(fx, |j| j["iv"] = flip_b64(&j["iv"]))
    };
    jwe_tampered_encrypted_key: AUTH => CRYPTO, Anyone, |fx| {
        authcrypt_edited(fx, |j| {
            let k = &mut j["recipients"][0]["encrypted_key"];
            *k = flip_b64(k);
        })
    };
    anoncrypt_tampered_ciphertext: OPEN => CRYPTO, Anyone, |fx| {
        let (s, _) = fx.post(&fx.a, Envelope::Anoncrypt, json!({"x": 1}));
        Built::unlinked(edit(&s, |j| j["ciphertext"] = flip_b64(&j["ciphertext"])))
    };
    anoncrypt_for_another_recipient: OPEN => CRYPTO, Anyone, |fx| {
        let other = fx.stranger.did.clone();
        let m = fx.msg(&fx.a, json!({"to": [other], "from": null}));
        Built::unlinked(block(pack_message(&fx.a, &other, m, Envelope::Anoncrypt)).unwrap())
    };
    authcrypt_for_another_recipient: AUTH => CRYPTO, Anyone, |fx| {
        let other = fx.stranger.did.clone();
        let m = fx.msg(&fx.a, json!({"to": [other]}));
        Built::unlinked(block(pack_message(&fx.a, &other, m, Envelope::Authcrypt)).unwrap())
    };
}

// ---------------------------------------------------------------------------------------------
// Time: e.p.req.time
// ---------------------------------------------------------------------------------------------

reject! {
    expired: AUTH => TIME, A, |fx| {
        fx.custom(&fx.a, Envelope::Signed, json!({"expires_time": now() - 10}))
    };
    expires_exactly_now: AUTH => TIME, A, |fx| {
        fx.custom(&fx.a, Envelope::Signed, json!({"expires_time": now()}))
    };
    expired_in_a_thread_links_to_the_thread: AUTH => TIME, A, |fx| {
        fx.custom(&fx.a, Envelope::Signed, json!({"expires_time": 1, "thid": "thread-7"}))
    };
    expired_authcrypt_from_did_peer: AUTH => TIME, P, |fx| {
        fx.custom(&fx.p, Envelope::Authcrypt, json!({"expires_time": now() - 3600}))
    };
    created_an_hour_in_the_future: AUTH => TIME, A, |fx| {
        fx.custom(&fx.a, Envelope::Signed, json!({"created_time": now() + 3600}))
    };
    created_at_the_end_of_time: AUTH => TIME, A, |fx| {
        fx.custom(&fx.a, Envelope::AuthcryptSigned, json!({"created_time": u64::MAX}))
    };
}

// ---------------------------------------------------------------------------------------------
// Recipients, storability, limits: reject-post
// ---------------------------------------------------------------------------------------------

reject! {
    to_without_the_hub: AUTH => REJECT, A, |fx| {
        let other = fx.b.did.clone();
        fx.custom(&fx.a, Envelope::Signed, json!({"to": [other]}))
    };
    to_empty: AUTH => REJECT, A, |fx| fx.custom(&fx.a, Envelope::Signed, json!({"to": []}));
    oversize_signed_post: AUTH => REJECT, Anyone, |fx| {
        let (s, _) = fx.post(&fx.a, Envelope::Signed, json!({"blob": "x".repeat(70_000)}));
        assert!(s.len() > 65536);
        Built::unlinked(s)
    };
    oversize_by_one_byte: AUTH => REJECT, Anyone, |_| {
        let s = format!("{{\"pad\":\"{}\"}}", "x".repeat(65537 - 10));
        assert_eq!(s.len(), 65537);
        Built::unlinked(s)
    };
    // 100,000 fields cannot fit in 64 KiB: the size limit answers before the field limit.
    payload_of_100000_fields_is_oversize: AUTH => REJECT, Anyone, |fx| {
        let (s, _) = fx.post(&fx.a, Envelope::Signed, fields(100_000));
        assert!(s.len() > 65536);
        Built::unlinked(s)
    };
    payload_of_300_fields_exceeds_the_field_limit: AUTH => REJECT, A, |fx| {
        let (s, id) = fx.post(&fx.a, Envelope::Signed, fields(300));
        assert!(s.len() < 65536);
        Built::linked(s, &id)
    };
    payload_nested_100_deep: AUTH => REJECT, A, |fx| {
        let deep: Value = serde_json::from_str(&nested_objects(100)).unwrap();
        let (s, id) = fx.post(&fx.a, Envelope::Signed, deep);
        Built::linked(s, &id)
    };
    payload_nested_17_deep: AUTH => REJECT, A, |fx| {
        let deep: Value = serde_json::from_str(&nested_objects(17)).unwrap();
        let (s, id) = fx.post(&fx.a, Envelope::Signed, deep);
        Built::linked(s, &id)
    };
    payload_null: AUTH => REJECT, A, |fx| {
        let (s, id) = fx.post(&fx.a, Envelope::Signed, json!(null));
        Built::linked(s, &id)
    };
    payload_empty_object: AUTH => REJECT, A, |fx| {
        let (s, id) = fx.post(&fx.a, Envelope::Signed, json!({}));
        Built::linked(s, &id)
    };
    payload_empty_array: AUTH => REJECT, A, |fx| {
        let (s, id) = fx.post(&fx.a, Envelope::Signed, json!([]));
        Built::linked(s, &id)
    };
    payload_only_nulls: AUTH => REJECT, A, |fx| {
        let (s, id) = fx.post(&fx.a, Envelope::Signed, json!({"a": null}));
        Built::linked(s, &id)
    };
    payload_only_empty_containers: AUTH => REJECT, P, |fx| {
        let (s, id) = fx.post(&fx.p, Envelope::Authcrypt, json!({"a": {}, "b": [[], {}], "c": null}));
        Built::linked(s, &id)
    };
}

// A payload nested beyond serde_json's recursion limit (128) inside a signed post: the hub cannot
// parse the signed plaintext at all, so this is invalid-message, unlinked (not reject-post).
reject! {
    payload_nested_200_deep_in_a_signed_post: AUTH => INVALID, Anyone, |fx| {
        let inner = fx.msg(&fx.a, json!({"body": {"payload": "DEEP"}})).to_string();
        let inner = inner.replace("\"DEEP\"", &nested_objects(200));
        Built::unlinked(fx.sign_raw(&fx.a, inner.as_bytes()))
    };
}

// ---------------------------------------------------------------------------------------------
// Trust policy of the route
// ---------------------------------------------------------------------------------------------

reject! {
    plaintext_on_authenticated_route: AUTH => NOT_AUTHN, Anyone, |fx| {
        let (s, id) = fx.post(&fx.a, Envelope::Plaintext, json!({"x": 1}));
        Built::linked(s, &id)
    };
    anoncrypt_on_authenticated_route: AUTH => NOT_AUTHN, Anyone, |fx| {
        let (s, id) = fx.post(&fx.a, Envelope::Anoncrypt, json!({"x": 1}));
        Built::linked(s, &id)
    };
    plaintext_on_signed_route: SIGNED => NOT_SIGNED, Anyone, |fx| {
        let (s, id) = fx.post(&fx.a, Envelope::Plaintext, json!({"x": 1}));
        Built::linked(s, &id)
    };
    authcrypt_on_signed_route: SIGNED => NOT_SIGNED, A, |fx| {
        let (s, id) = fx.post(&fx.a, Envelope::Authcrypt, json!({"x": 1}));
        Built::linked(s, &id)
    };
    anoncrypt_on_signed_route: SIGNED => NOT_SIGNED, Anyone, |fx| {
        let (s, id) = fx.post(&fx.a, Envelope::Anoncrypt, json!({"x": 1}));
        Built::linked(s, &id)
    };
    signed_on_authcrypt_route: AC => NOT_SENDER_AUTHN, Anyone, |fx| {
        let (s, id) = fx.post(&fx.a, Envelope::Signed, json!({"x": 1}));
        Built::linked(s, &id)
    };
    plaintext_on_authcrypt_route: AC => NOT_SENDER_AUTHN, Anyone, |fx| {
        let (s, id) = fx.post(&fx.a, Envelope::Plaintext, json!({"x": 1}));
        Built::linked(s, &id)
    };
    // Refused before decryption ("no crypto for what the route refuses anyway"): the id inside
    // is never read, so the report cannot be linked.
    anoncrypt_signed_on_authcrypt_route: AC => NOT_SENDER_AUTHN, Anyone, |fx| {
        let (s, _) = fx.post(&fx.a, Envelope::AnoncryptSigned, json!({"x": 1}));
        Built::unlinked(s)
    };
    verified_did_not_in_the_registry: REG => NOT_AUTHORISED, B, |fx| {
        let (s, id) = fx.post(&fx.b, Envelope::Signed, json!({"x": 1}));
        Built::linked(s, &id)
    };
    verified_did_peer_not_in_the_registry: REG => NOT_AUTHORISED, P, |fx| {
        let (s, id) = fx.post(&fx.p, Envelope::AuthcryptSigned, json!({"x": 1}));
        Built::linked(s, &id)
    };
}

// ---------------------------------------------------------------------------------------------
// Never answered: problem reports to the hub, the hub's own report topics, unrouted topics
// ---------------------------------------------------------------------------------------------

fn report_to_hub(fx: &Fx, mode: Envelope) -> String {
    let m = fx.msg(
        &fx.a,
        json!({
            "type": REPORT_TYPE,
            "pthid": uid(),
            "body": {"code": "e.p.msg.trust.crypto", "comment": "your report is wrong"},
        }),
    );
    block(pack_message(&fx.a, &fx.hub, m, mode)).unwrap()
}

ignored! {
    problem_report_to_hub_signed: AUTH, |fx| report_to_hub(fx, Envelope::Signed).into_bytes();
    problem_report_to_hub_authcrypt: AC, |fx| report_to_hub(fx, Envelope::Authcrypt).into_bytes();
    // Plaintext on a route that requires authentication: still not answered.
    problem_report_to_hub_plaintext: AUTH, |fx| report_to_hub(fx, Envelope::Plaintext).into_bytes();
    problem_report_to_hub_with_tampered_signature: AUTH, |fx| {
        let s = report_to_hub(fx, Envelope::Signed);
        edit(&s, |j| {
            let sig = &mut j["signatures"][0]["signature"];
            *sig = flip_b64(sig);
        })
        .into_bytes()
    };
    problem_report_to_hub_without_id_or_body: AUTH, |_| {
        json!({"type": REPORT_TYPE}).to_string().into_bytes()
    };
    good_post_on_the_hubs_own_report_topic: "open/x/problem-report", |fx| {
        fx.post(&fx.a, Envelope::Signed, json!({"x": 1})).0.into_bytes()
    };
    garbage_on_the_hubs_own_report_topic: "open/x/problem-report", |_| b"not json".to_vec();
    garbage_on_an_unrouted_topic: "nowhere/x", |_| b"not json".to_vec();
}

// ---------------------------------------------------------------------------------------------
// Replay: same sender, same id, different content
// ---------------------------------------------------------------------------------------------

fn stored(name: &str, w: Work) -> (store::Commit, didhub::verify::Rejection, String) {
    match w {
        Work::Store {
            commit,
            thid,
            report_topic,
            ..
        } => {
            let rejection = Work::replay_rejection(&commit, &thid);
            (commit, rejection, report_topic)
        }
        other => panic!("{name}: expected Work::Store, got: {}", describe(&other)),
    }
}

#[test]
fn replayed_id_with_different_content_is_caught_by_the_store() {
    let fx = Fx::new();
    let id = uid();
    let pack = |payload: Value| {
        block(pack_post(
            &fx.a,
            &fx.hub,
            &id,
            payload,
            Envelope::Signed,
            now(),
        ))
        .unwrap()
    };
    let first = pack(json!({"v": 1}));
    let second = pack(json!({"v": 2}));
    assert_ne!(first, second);
    // The verifier cannot know: both verify and map.
    let (c1, _, _) = stored("first", fx.process(AUTH, first.clone()));
    let (c2, rej, report_topic) = stored("replay", fx.process(AUTH, second));
    let (c3, _, _) = stored("redelivery", fx.process(AUTH, first));
    // The same id from another device is its own message.
    let other = block(pack_post(
        &fx.b,
        &fx.hub,
        &id,
        json!({"v": 1}),
        Envelope::Signed,
        now(),
    ))
    .unwrap();
    let (c4, _, _) = stored("other sender", fx.process(AUTH, other));
    assert_eq!(c1.sender, fx.a.did);
    assert_eq!(
        (c1.msg_id.as_str(), c2.msg_id.as_str()),
        (id.as_str(), id.as_str())
    );

    let dir = tempfile::tempdir().unwrap();
    let mut conn = store::open(&dir.path().join("hub.db")).unwrap();
    let commit = |conn: &mut rusqlite::Connection, c: &store::Commit| {
        store::commit_batch(conn, &[c]).unwrap().results
    };
    assert_eq!(commit(&mut conn, &c1), vec![CommitResult::Stored]);
    assert_eq!(commit(&mut conn, &c2), vec![CommitResult::ReplayMismatch]);
    assert_eq!(commit(&mut conn, &c3), vec![CommitResult::Duplicate]);
    assert_eq!(commit(&mut conn, &c4), vec![CommitResult::Stored]);

    // All in one batch, on a fresh store: the same answers.
    let mut conn2 = store::open(&dir.path().join("hub2.db")).unwrap();
    assert_eq!(
        store::commit_batch(&mut conn2, &[&c1, &c2, &c3, &c4])
            .unwrap()
            .results,
        vec![
            CommitResult::Stored,
            CommitResult::ReplayMismatch,
            CommitResult::Duplicate,
            CommitResult::Stored
        ]
    );

    // The replay's report: reject-post, linked to the id, encrypted to the verified sender.
    assert_eq!(rej.code, Code::RejectPost);
    assert!(
        rej.comment().contains(&format!(
            "message id {id} was already used for a different message"
        )),
        "{}",
        rej.comment()
    );
    assert_eq!(
        (
            rej.sender.as_deref(),
            rej.sender_verified,
            rej.id.as_deref()
        ),
        (Some(fx.a.did.as_str()), true, Some(id.as_str()))
    );
    assert_eq!(report_topic, format!("{AUTH}/problem-report"));
    let before = fx.shared.stats.rejected_of(Code::RejectPost);
    let report = fx
        .shared
        .reject(&rej, report_topic.clone(), "store")
        .expect("a report for the replay");
    assert_eq!(fx.shared.stats.rejected_of(Code::RejectPost), before + 1);
    assert_eq!(report.topic, report_topic);
    let (m, signer) = block(unpack_report(&fx.a, &report.body)).unwrap();
    assert_eq!(signer.as_deref(), Some(fx.hub.as_str()));
    assert_eq!(m["type"], REPORT_TYPE);
    assert_eq!(m["body"]["code"], REJECT);
    assert_eq!(m["pthid"], id.as_str());
    assert_eq!(m["ack"], json!([id]));
    fx.assert_good_accepted("replay");
}
