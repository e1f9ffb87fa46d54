//! Writes the fuzz seed corpus (and, once, the fixed test-only identities).
//!
//! ```text
//! cargo run --bin gen_seeds -- identities   # only if the identity files are missing
//! cargo run --bin gen_seeds -- seeds [DIR]  # default DIR: seeds (relative to fuzz/)
//! ```
//!
//! Each seed is one fuzz input: a topic byte (see `didhub_fuzz::TOPICS`) followed by a packed
//! DIDComm message. Posts are packed with `created_time` = now and no `expires_time`, so they
//! stay valid; replays do not matter because `Shared::process` never touches the store.

use std::path::{Path, PathBuf};

use didhub::did::{DidMethod, Identity};
use didhub::verify::{pack_message, pack_post, Envelope, POST_TYPE, REPORT_TYPE};
use didhub_fuzz::{
    identity, topic_byte, DEVICE_KEY_IDENTITY_JSON, DEVICE_PEER_IDENTITY_JSON, HUB_IDENTITY_JSON,
};
use futures::executor::block_on;
use serde_json::{json, Value};

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn write_identities() {
    for (file, method) in [
        ("hub-identity.json", DidMethod::Key),
        ("test-device-key-identity.json", DidMethod::Key),
        ("test-device-peer-identity.json", DidMethod::Peer),
    ] {
        let path = fuzz_dir().join(file);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() > 0) {
            eprintln!("{} exists; not overwritten", path.display());
            continue;
        }
        let id = Identity::generate(method);
        id.save(&path).expect("save identity");
        // Validate through the real loader.
        let back = Identity::load(&path).expect("load identity back");
        println!("{file}: {}", back.did);
    }
}

fn put(dir: &Path, name: &str, topic: &str, body: &[u8]) {
    let mut data = vec![topic_byte(topic)];
    data.extend_from_slice(body);
    std::fs::write(dir.join(format!("{name}.bin")), data).expect("write seed");
}

fn write_seeds(dir: &Path) {
    // The identity files must load through the real validator, not just parse.
    for f in [
        "hub-identity.json",
        "test-device-key-identity.json",
        "test-device-peer-identity.json",
    ] {
        Identity::load(&fuzz_dir().join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    std::fs::create_dir_all(dir).expect("create seed dir");
    for e in std::fs::read_dir(dir).expect("read seed dir") {
        let p = e.expect("dir entry").path();
        if p.extension().is_some_and(|x| x == "bin") {
            std::fs::remove_file(p).expect("remove old seed");
        }
    }
    let hub = identity(HUB_IDENTITY_JSON);
    let devices = [
        ("key", identity(DEVICE_KEY_IDENTITY_JSON)),
        ("peer", identity(DEVICE_PEER_IDENTITY_JSON)),
    ];
    let now = now();
    let payload = json!({
        "ts": now,
        "temp": 21.5,
        "ok": true,
        "state": "run",
        "nested": {"a": 1, "b": [1, 2, null]},
    });
    let mut n = 0;

    // Every envelope from both devices on every route (the differential check verifies every
    // payload under all four requirements anyway; the topic decides what `run_one` sees).
    // Signed posts take the verifier's signed fast path (not under authcrypt), authcrypt posts
    // to the hub's key its authcrypt fast path (under every requirement), plaintext posts its
    // plaintext fast path (under `any`: the open, opents and regany routes).
    for (dname, dev) in &devices {
        for mode in Envelope::ALL {
            for (tname, topic) in [
                ("auth", "auth/dev1/t"),
                ("signed", "signed/dev1/t"),
                ("authcrypt", "authcrypt/dev1/t"),
                ("open", "open/dev1"),
                ("opents", "opents/dev1/x"),
                ("reg", "reg/dev1/t"),
                ("regany", "regany/dev1"),
            ] {
                let id = format!("{dname}-{}-{tname}", mode.as_str());
                let packed = block_on(pack_post(dev, &hub.did, &id, payload.clone(), mode, now))
                    .unwrap_or_else(|e| panic!("{id}: {e}"));
                put(dir, &format!("post-{id}"), topic, packed.as_bytes());
                n += 1;
            }
        }
    }

    // Messages with headers a post would not carry (key device unless noted).
    let (_, dev) = &devices[0];
    let (_, peer) = &devices[1];
    let base = |id: &str, body: Value| {
        json!({
            "id": id,
            "typ": "application/didcomm-plain+json",
            "type": POST_TYPE,
            "from": dev.did,
            "to": [hub.did],
            "created_time": now,
            "body": body,
        })
    };
    let mut special: Vec<(&str, &str, Value, Envelope)> = Vec::new();
    let mut expired = base("expired", json!({"payload": 1}));
    expired["expires_time"] = json!(now - 10);
    special.push(("expired-signed", "signed/dev1/t", expired, Envelope::Signed));
    let mut future = base("future", json!({"payload": 1}));
    future["created_time"] = json!(now + 86_400);
    special.push((
        "future-authcrypt",
        "authcrypt/dev1/t",
        future,
        Envelope::Authcrypt,
    ));
    let mut report = base("report", json!({"code": "e.p.x", "comment": "x"}));
    report["type"] = json!(REPORT_TYPE);
    special.push((
        "report-signed",
        "auth/dev1/t",
        report.clone(),
        Envelope::Signed,
    ));
    special.push((
        "report-authcrypt",
        "auth/dev1/t",
        report,
        Envelope::Authcrypt,
    ));
    let mut other_type = base("other-type", json!({"payload": 1}));
    other_type["type"] = json!("https://didcomm.org/trust-ping/2.0/ping");
    special.push((
        "other-type-signed",
        "auth/dev1/t",
        other_type,
        Envelope::Signed,
    ));
    let mut wrong_to = base("wrong-to", json!({"payload": 1}));
    wrong_to["to"] = json!([peer.did]);
    special.push(("wrong-to-signed", "auth/dev1/t", wrong_to, Envelope::Signed));
    special.push((
        "no-payload-authcrypt",
        "auth/dev1/t",
        base("no-payload", json!({"x": 1})),
        Envelope::Authcrypt,
    ));
    special.push((
        "body-not-object-signed",
        "auth/dev1/t",
        base("body-array", json!([1])),
        Envelope::Signed,
    ));
    let mut deep = json!(1);
    for _ in 0..20 {
        deep = json!({ "d": deep });
    }
    special.push((
        "too-deep-signed",
        "opents/dev1/x",
        base("deep", json!({"payload": deep})),
        Envelope::Signed,
    ));
    let many: serde_json::Map<String, Value> =
        (0..257).map(|i| (format!("{i}"), json!(i))).collect();
    special.push((
        "too-many-fields-signed",
        "open/dev1",
        base("many", json!({"payload": many})),
        Envelope::Signed,
    ));
    special.push((
        "ts-rfc3339-signed",
        "auth/dev1/t",
        base(
            "ts-str",
            json!({"payload": {"ts": "2024-01-02T03:04:05Z", "v": 1}}),
        ),
        Envelope::Signed,
    ));
    special.push((
        "ts-missing-signed",
        "auth/dev1/t",
        base("ts-missing", json!({"payload": {"v": 1}})),
        Envelope::Signed,
    ));
    for (name, ts) in [
        (
            "ts-rfc3339-plaintext",
            json!("2024-01-02T03:04:05.123456789+02:00"),
        ),
        ("ts-rfc3339-weak-plaintext", json!("2024-01-02 03:04:05")),
        ("ts-float-plaintext", json!(1.7e9)),
        ("ts-ns-plaintext", json!(1_700_000_000_000_000_000u64)),
        ("ts-negative-plaintext", json!(-5)),
        ("ts-object-plaintext", json!({"a": 1})),
    ] {
        special.push((
            name,
            "opents/dev1/x",
            base(
                name,
                json!({"payload": {"ts": ts, "v": [1, true, "s", null]}}),
            ),
            Envelope::Plaintext,
        ));
    }
    special.push((
        "ts-ms-authcrypt",
        "auth/dev1/t",
        base(
            "ts-ms",
            json!({"payload": {"ts": 1_700_000_000_123u64, "v": "x"}}),
        ),
        Envelope::Authcrypt,
    ));
    let mut threaded = base("threaded", json!({"payload": 7}));
    threaded["thid"] = json!("thread-1");
    threaded["pthid"] = json!("parent-1");
    threaded["x-extra"] = json!({"k": [1, 2]});
    special.push((
        "threaded-authcrypt-signed",
        "regany/dev1",
        threaded,
        Envelope::AuthcryptSigned,
    ));
    let mut plain_prior = base("prior", json!({"payload": 1}));
    plain_prior["from_prior"] = json!("eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2ln");
    // A from_prior JWT cannot be packed unless it verifies: written as plaintext JSON directly.
    put(
        dir,
        "hdr-from-prior-plaintext",
        "open/dev1",
        plain_prior.to_string().as_bytes(),
    );
    n += 1;
    let mut anon_plain = base("anon-any", json!({"payload": {"v": 1}}));
    anon_plain.as_object_mut().unwrap().remove("from");
    special.push((
        "anonymous-plaintext-regany",
        "regany/dev1",
        anon_plain,
        Envelope::Plaintext,
    ));
    // For the authcrypt and plaintext fast paths: what they hand to `Message::unpack` (a
    // `signatures` or `ciphertext` member beside the message's, another `typ`) and what they
    // accept but the policy then judges (a report, two `to`, expired).
    let mut report_plain = base("report-plain", json!({"code": "e.p.x", "comment": "x"}));
    report_plain["type"] = json!(REPORT_TYPE);
    special.push((
        "report-plaintext",
        "open/dev1",
        report_plain,
        Envelope::Plaintext,
    ));
    // (`to` without the hub cannot be packed as authcrypt to the hub: a second `to` instead.)
    let mut two_to = base("two-to-ac", json!({"payload": 1}));
    two_to["to"] = json!([peer.did, hub.did]);
    special.push((
        "two-to-authcrypt",
        "authcrypt/dev1/t",
        two_to,
        Envelope::Authcrypt,
    ));
    let mut expired = base("expired-plain", json!({"payload": 1}));
    expired["expires_time"] = json!(now - 10);
    special.push((
        "expired-plaintext",
        "open/dev1",
        expired,
        Envelope::Plaintext,
    ));
    let mut with_sigs = base("with-signatures", json!({"payload": 1}));
    with_sigs["signatures"] = json!([{"header": {"kid": dev.signing_kid()}, "signature": "x"}]);
    special.push((
        "member-signatures-authcrypt",
        "authcrypt/dev1/t",
        with_sigs.clone(),
        Envelope::Authcrypt,
    ));
    special.push((
        "member-signatures-plaintext",
        "open/dev1",
        with_sigs,
        Envelope::Plaintext,
    ));
    let mut with_ct = base("with-ciphertext", json!({"payload": 1}));
    with_ct["ciphertext"] = json!("AAAA");
    special.push((
        "member-ciphertext-authcrypt",
        "auth/dev1/t",
        with_ct.clone(),
        Envelope::Authcrypt,
    ));
    special.push((
        "member-ciphertext-plaintext",
        "regany/dev1",
        with_ct,
        Envelope::Plaintext,
    ));
    let mut other_typ = base("other-typ", json!({"payload": 1}));
    other_typ["typ"] = json!("application/didcomm-signed+json");
    special.push((
        "other-typ-authcrypt",
        "authcrypt/dev1/t",
        other_typ.clone(),
        Envelope::Authcrypt,
    ));
    special.push((
        "other-typ-plaintext",
        "open/dev1",
        other_typ,
        Envelope::Plaintext,
    ));
    for (name, topic, msg, mode) in special {
        let packed = block_on(pack_message(dev, &hub.did, msg, mode))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        put(dir, &format!("hdr-{name}"), topic, packed.as_bytes());
        n += 1;
    }

    // Forged: `from` claims the peer device, signed by the key device.
    let mut forged = base("forged", json!({"payload": 1}));
    forged["from"] = json!(peer.did);
    let packed = block_on(pack_message(dev, &hub.did, forged, Envelope::Signed)).expect("forged");
    put(
        dir,
        "bad-forged-from-signed",
        "auth/dev1/t",
        packed.as_bytes(),
    );
    n += 1;

    // Malformed: not UTF-8, not JSON, wrong shapes, truncated and tampered envelopes.
    let signed = block_on(pack_post(
        dev,
        &hub.did,
        "tamper",
        json!(1),
        Envelope::Signed,
        now,
    ))
    .unwrap();
    let authcrypt = block_on(pack_post(
        dev,
        &hub.did,
        "tamper",
        json!(1),
        Envelope::Authcrypt,
        now,
    ))
    .unwrap();
    let mut tampered: Value = serde_json::from_str(&signed).unwrap();
    let sig = tampered["signatures"][0]["signature"]
        .as_str()
        .unwrap()
        .to_string();
    let mut bad = sig.into_bytes();
    bad[5] = if bad[5] == b'A' { b'B' } else { b'A' };
    tampered["signatures"][0]["signature"] = json!(String::from_utf8(bad).unwrap());
    let mut no_tag: Value = serde_json::from_str(&authcrypt).unwrap();
    no_tag.as_object_mut().unwrap().remove("tag");
    // Authcrypt to the hub, changed after packing: the fast path must fail (or leave it to
    // `Message::unpack`) on each, and the verdicts must still agree.
    let ac: Value = serde_json::from_str(&authcrypt).unwrap();
    let flip_at = |v: &Value, pointer: &str| {
        let mut v = v.clone();
        let mut s = v
            .pointer(pointer)
            .unwrap()
            .as_str()
            .unwrap()
            .as_bytes()
            .to_vec();
        let i = s.len() / 2;
        s[i] = if s[i] == b'A' { b'B' } else { b'A' };
        *v.pointer_mut(pointer).unwrap() = json!(String::from_utf8(s).unwrap());
        v
    };
    let ac_bad_ciphertext = flip_at(&ac, "/ciphertext");
    let ac_bad_key = flip_at(&ac, "/recipients/0/encrypted_key");
    let ac_bad_iv = flip_at(&ac, "/iv");
    let mut ac_two_recipients = ac.clone();
    let r0 = ac["recipients"][0].clone();
    ac_two_recipients["recipients"] = json!([r0.clone(), r0]);
    let mut ac_padded = ac.clone();
    let tag = ac["tag"].as_str().unwrap();
    ac_padded["tag"] = json!(format!("{tag}="));
    let mut ac_extra_member = ac.clone();
    ac_extra_member["x-extra"] = json!(1);
    let b64 = |s: &str| {
        use std::fmt::Write as _;
        // base64url without padding, by hand (no extra dependency).
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let b = s.as_bytes();
        let mut out = String::new();
        for c in b.chunks(3) {
            let v = (c[0] as u32) << 16
                | (*c.get(1).unwrap_or(&0) as u32) << 8
                | *c.get(2).unwrap_or(&0) as u32;
            for i in 0..=c.len() {
                let _ = out.write_char(A[((v >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    };
    let malformed: Vec<(&str, &str, Vec<u8>)> = vec![
        ("empty", "auth/dev1/t", vec![]),
        ("not-utf8", "open/dev1", vec![0xff, 0xfe, b'{', b'}']),
        ("not-json", "open/dev1", b"not json".to_vec()),
        ("array", "auth/dev1/t", b"[1,2]".to_vec()),
        ("empty-object", "open/dev1", b"{}".to_vec()),
        ("jwe-garbage", "auth/dev1/t", br#"{"ciphertext":"x","protected":"e30"}"#.to_vec()),
        (
            "jwe-1pu-unresolvable-skid",
            "authcrypt/dev1/t",
            json!({"ciphertext": "AAAA", "iv": "AAAA", "tag": "AAAA", "recipients": [],
                   "protected": b64(r#"{"alg":"ECDH-1PU+A256KW","enc":"A256CBC-HS512","skid":"did:web:example.com#k"}"#)})
            .to_string()
            .into_bytes(),
        ),
        ("jws-empty", "signed/dev1/t", format!(r#"{{"signatures":[],"payload":"{}"}}"#, b64(r#"{"id":"x"}"#)).into_bytes()),
        ("signed-truncated", "auth/dev1/t", signed.as_bytes()[..signed.len() / 2].to_vec()),
        ("signed-bad-signature", "auth/dev1/t", tampered.to_string().into_bytes()),
        ("authcrypt-no-tag", "authcrypt/dev1/t", no_tag.to_string().into_bytes()),
        ("authcrypt-bad-ciphertext", "authcrypt/dev1/t", ac_bad_ciphertext.to_string().into_bytes()),
        ("authcrypt-bad-encrypted-key", "auth/dev1/t", ac_bad_key.to_string().into_bytes()),
        ("authcrypt-bad-iv", "open/dev1", ac_bad_iv.to_string().into_bytes()),
        ("authcrypt-two-recipients", "authcrypt/dev1/t", ac_two_recipients.to_string().into_bytes()),
        ("authcrypt-padded-tag", "authcrypt/dev1/t", ac_padded.to_string().into_bytes()),
        ("authcrypt-extra-member", "authcrypt/dev1/t", ac_extra_member.to_string().into_bytes()),
        ("authcrypt-truncated", "authcrypt/dev1/t", authcrypt.as_bytes()[..authcrypt.len() / 2].to_vec()),
        // Plaintext text variants for the plaintext fast path: escaped member names (an escaped
        // `ciphertext` misses the cheap member test), a duplicate member, another `typ`.
        (
            "plaintext-escaped-names",
            "open/dev1",
            format!(
                r#"{{"id":"esc","typ":"application/didcomm-plain+json","type":"{POST_TYPE}","from":"{}","to":["{}"],"created_time":{now},"body":{{"payload":{{"v":1}}}}}}"#,
                dev.did, hub.did
            )
            .into_bytes(),
        ),
        (
            "plaintext-escaped-ciphertext",
            "open/dev1",
            format!(
                r#"{{"id":"esc-ct","typ":"application/didcomm-plain+json","type":"{POST_TYPE}","created_time":{now},"body":{{"payload":1}},"ciphertext":"AAAA"}}"#
            )
            .into_bytes(),
        ),
        (
            "plaintext-duplicate-member",
            "regany/dev1",
            format!(
                r#"{{"id":"dup","id":"dup2","typ":"application/didcomm-plain+json","type":"{POST_TYPE}","from":"{}","created_time":{now},"body":{{"payload":1}}}}"#,
                dev.did
            )
            .into_bytes(),
        ),
        (
            "plaintext-no-typ",
            "opents/dev1/x",
            format!(r#"{{"id":"no-typ","type":"{POST_TYPE}","body":{{"payload":{{"ts":{now}}}}}}}"#)
                .into_bytes(),
        ),
    ];
    for (name, topic, bytes) in malformed {
        put(dir, &format!("bad-{name}"), topic, &bytes);
        n += 1;
    }
    // Two with the Response Topic bit, for the report-topic override.
    let mut data = vec![topic_byte("open/dev1") | 0x40];
    data.extend_from_slice(br#"{"id":"x","type":"iota/post/0.1/post","body":{"payload":1}}"#);
    std::fs::write(dir.join("bad-no-route.bin"), data).unwrap();
    n += 1;
    let mut data = vec![topic_byte("auth/dev1/t") | 0x80];
    data.extend_from_slice(b"{}");
    std::fs::write(dir.join("bad-empty-object-response-topic.bin"), data).unwrap();
    let mut data = vec![topic_byte("reg/dev1/t") | 0x80];
    data.extend_from_slice(
        block_on(pack_post(
            peer,
            &hub.did,
            "unreg",
            json!(1),
            Envelope::Signed,
            now,
        ))
        .unwrap()
        .as_bytes(),
    );
    std::fs::write(dir.join("post-peer-signed-reg-response-topic.bin"), data).unwrap();
    n += 2;
    println!("wrote {n} seeds to {}", dir.display());
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("identities") => write_identities(),
        Some("seeds") => {
            let dir = args
                .get(1)
                .map(PathBuf::from)
                .unwrap_or_else(|| fuzz_dir().join("seeds"));
            write_seeds(&dir)
        }
        _ => {
            eprintln!("usage: gen_seeds identities | gen_seeds seeds [DIR]");
            std::process::exit(2)
        }
    }
}
