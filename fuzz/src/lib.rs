//! Shared by the `untrusted` fuzz target and the `gen_seeds` binary: the fixed test-only
//! identities, the fixed hub config, and how a fuzz input maps to an MQTT message.
//!
//! Input layout: byte 0 picks the topic (`TOPICS[b0 & 7]`); bit 6 of byte 0 prefixes the topic
//! with `nowhere/` (no route matches); bit 7 adds an MQTT 5 Response Topic (`RESPONSE_TOPIC`);
//! the remaining bytes are the payload.
//!
//! THE IDENTITIES HERE ARE TEST-ONLY: their private keys are committed to the repository.

use std::sync::Arc;

use bytes::Bytes;
use didhub::config::{Config, Require};
use didhub::did::Identity;
use didhub::pipeline::{Inbound, Shared, Stats, Work};

/// The fixed hub identity (did:key). TEST ONLY: its secret keys are public.
pub const HUB_IDENTITY_JSON: &str = include_str!("../hub-identity.json");
/// A fixed device (did:key), listed in the registry of `FUZZ_HUB_TOML`. TEST ONLY.
pub const DEVICE_KEY_IDENTITY_JSON: &str = include_str!("../test-device-key-identity.json");
/// A fixed device (did:peer:2), not in the registry. TEST ONLY.
pub const DEVICE_PEER_IDENTITY_JSON: &str = include_str!("../test-device-peer-identity.json");
/// The fixed hub configuration.
pub const FUZZ_HUB_TOML: &str = include_str!("../fuzz-hub.toml");

/// Topics selected by the low 3 bits of the first input byte.
pub const TOPICS: [&str; 8] = [
    "auth/dev1/t",      // 0: require authenticated, any verified sender, tags + timestamp
    "open/dev1",        // 1: require any
    "reg/dev1/t",       // 2: require authenticated, registry senders
    "signed/dev1/t",    // 3: require signed
    "authcrypt/dev1/t", // 4: require authcrypt
    "open/dev1/problem-report", // 5: the hub's own report topic: ignored
    "opents/dev1/x",    // 6: require any, tags + payload timestamp
    "regany/dev1",      // 7: require any, registry senders
];

/// The Response Topic used when bit 7 of the first byte is set.
pub const RESPONSE_TOPIC: &str = "resp/dev1";

/// Parses one of the identity files above (the same JSON `Identity::save` writes).
pub fn identity(json: &str) -> Identity {
    serde_json::from_str(json).expect("fixed test identity parses")
}

/// The fixed config.
pub fn config() -> Config {
    Config::from_toml(FUZZ_HUB_TOML, "fuzz-hub.toml", &[]).expect("fuzz-hub.toml is valid")
}

/// A `Shared` built from the fixed config and hub identity.
pub fn shared() -> Shared {
    Shared::from_config(
        &config(),
        identity(HUB_IDENTITY_JSON),
        Arc::new(Stats::default()),
    )
}

/// A `Shared` like [`shared`] with the verifier's fast paths off: every message goes
/// through `didcomm`'s `Message::unpack`. The oracle for [`check_fast_path`].
pub fn shared_slow() -> Shared {
    let mut s = shared();
    s.verifier.set_fast_path(false);
    s
}

/// Differential check of the fast paths (signed, authcrypt and, under `require = "any"`,
/// plaintext): for any payload, the verdict with the fast paths on (`fast`), alone and in a
/// batch (`Verifier::verify_many`), must be the same as with them off (`slow`, see
/// [`shared_slow`]), under every requirement. Panics (= a
/// finding) on a difference.
pub fn check_fast_path(fast: &Shared, slow: &Shared, data: &[u8]) {
    let (_, _, payload) = split_input(data);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for require in [
        Require::Any,
        Require::Signed,
        Require::Authenticated,
        Require::Authcrypt,
    ] {
        let a = futures::executor::block_on(fast.verifier.verify(payload, require, now));
        let b = futures::executor::block_on(slow.verifier.verify(payload, require, now));
        let (a, b) = (format!("{a:?}"), format!("{b:?}"));
        assert_eq!(
            a, b,
            "fast path verdict differs from didcomm's ({require:?})"
        );
        // Twice in one `verify_many`: a signed input is then checked in a batch of two.
        let items = [(payload, require), (payload, require)];
        for v in futures::executor::block_on(fast.verifier.verify_many(&items, now)).verdicts {
            assert_eq!(
                format!("{v:?}"),
                b,
                "batched verdict differs from didcomm's ({require:?})"
            );
        }
    }
}

/// The topic byte that selects `topic` (without a Response Topic).
pub fn topic_byte(topic: &str) -> u8 {
    TOPICS
        .iter()
        .position(|t| *t == topic)
        .expect("known topic") as u8
}

/// Splits a fuzz input into (topic, response topic, payload).
pub fn split_input(data: &[u8]) -> (String, Option<&'static str>, &[u8]) {
    match data.split_first() {
        None => (TOPICS[0].to_string(), None, &[]),
        Some((b, rest)) => {
            let topic = TOPICS[(b & 7) as usize];
            (
                if b & 0x40 != 0 {
                    format!("nowhere/{topic}")
                } else {
                    topic.to_string()
                },
                (b & 0x80 != 0).then_some(RESPONSE_TOPIC),
                rest,
            )
        }
    }
}

/// Builds the inbound message for a fuzz input.
pub fn inbound(data: &[u8]) -> Inbound {
    let (topic, response, payload) = split_input(data);
    Inbound {
        seq: 1,
        topic,
        payload: Bytes::copy_from_slice(payload),
        response_topic: response.map(str::to_string),
        correlation_data: None,
        ack: None,
        received_ns: 1_700_000_000_000_000_000,
    }
}

/// Processes one fuzz input and checks the result is consistent; panics (= a finding) if not.
pub fn run_one(shared: &Shared, registered_did: &str, data: &[u8]) {
    let m = inbound(data);
    let topic = m.topic.clone();
    let response = m.response_topic.clone();
    match shared.process(m) {
        Work::Done(s) => {
            if let Some(r) = s.report {
                match &response {
                    Some(rt) => assert_eq!(&r.topic, rt, "report not sent to the Response Topic"),
                    None => assert!(
                        r.topic.len() > "/problem-report".len()
                            && r.topic.ends_with("/problem-report"),
                        "bad report topic {:?}",
                        r.topic
                    ),
                }
                assert!(
                    serde_json::from_str::<serde_json::Value>(&r.body).is_ok(),
                    "report body is not JSON"
                );
            }
        }
        Work::Store {
            commit,
            report_topic,
            ..
        } => {
            assert!(!commit.rows.is_empty(), "a Store without points");
            assert!(!report_topic.is_empty());
            let authenticated_route = !matches!(
                topic.as_str(),
                "open/dev1" | "regany/dev1" | "opents/dev1/x"
            );
            if authenticated_route {
                assert!(
                    commit.sender.starts_with("did:"),
                    "stored on an authenticated route without a verified sender: {:?}",
                    commit.sender
                );
            }
            if topic.starts_with("reg") {
                assert_eq!(
                    commit.sender, registered_did,
                    "unregistered sender stored on a registry route"
                );
            }
        }
        #[allow(unreachable_patterns)]
        other => panic!("process returned {other:?}"),
    }
}
