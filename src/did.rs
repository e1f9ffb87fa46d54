//! DIDs, identities and secrets for DIDComm v2.
//!
//! * [`resolve_local`] turns a `did:key` (Ed25519, or X25519 for key agreement
//!   only) or a `did:peer:2` into a [`DIDDoc`] without touching the network.
//! * [`LocalResolver`] wraps it in a bounded LRU cache plus a set of static
//!   documents and implements the `didcomm` crate's [`DIDResolver`].
//! * [`Identity`] is a DID together with its private keys, stored as a JSON
//!   file readable by its owner only; [`StaticSecrets`] serves the keys of one
//!   or more identities to the `didcomm` crate as a [`SecretsResolver`].
//!
//! Every verification method is a `JsonWebKey2020` with an OKP
//! `publicKeyJwk`, and every id is an absolute DID URL (`did#fragment`):
//! the `didcomm` crate compares key ids as plain strings.
//!
//! Key ids:
//! * `did:key:z6Mk…` — `did:key:z6Mk…#z6Mk…` for the Ed25519 key
//!   (authentication) and `did:key:z6Mk…#z6LS…` for the X25519 key derived
//!   from it (key agreement), as the did:key specification does.
//! * `did:peer:2…` — `did:peer:2…#key-1`, `#key-2`, … numbered from 1 in the
//!   order the keys appear in the DID, services not counted, as the current
//!   ("clarified") did:peer specification requires.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use didcomm::did::{
    DIDCommMessagingService, DIDDoc, DIDResolver, Service, ServiceKind, VerificationMaterial,
    VerificationMethod, VerificationMethodType,
};
use didcomm::secrets::{Secret, SecretMaterial, SecretType, SecretsResolver};
use ed25519_dalek::{SigningKey, VerifyingKey};
use rand::rngs::OsRng;
use serde_json::{json, Map, Value};
use x25519_dalek::{PublicKey as X25519PublicKey, StaticSecret};

/// Longest DID [`resolve_local`] accepts, in bytes. A `did:peer:2` with two
/// keys and a couple of services is well under 1 KiB.
pub const MAX_DID_LEN: usize = 8 * 1024;

/// Longest multibase key accepted inside a DID. A 2-byte multicodec prefix
/// plus a 32-byte key is 48 base58btc characters; anything much longer is
/// rejected before the (quadratic) base58 decoder sees it.
const MAX_MULTIKEY_LEN: usize = 64;

/// Largest identity file [`Identity::load`] reads.
const MAX_IDENTITY_FILE_LEN: u64 = 1024 * 1024;

/// How much of an offending DID an error message repeats.
const MAX_DID_IN_ERROR: usize = 120;

/// Multicodec `ed25519-pub` (0xed) as an unsigned varint.
const MULTICODEC_ED25519_PUB: [u8; 2] = [0xed, 0x01];
/// Multicodec `x25519-pub` (0xec) as an unsigned varint.
const MULTICODEC_X25519_PUB: [u8; 2] = [0xec, 0x01];

/// Which DID method a new identity uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DidMethod {
    /// `did:key` with an Ed25519 key; its X25519 key is derived from it.
    Key,
    /// `did:peer:2` with an independent X25519 key (`E`) and Ed25519 key (`V`).
    Peer,
}

impl DidMethod {
    /// The method a DID string uses, if it is one of ours.
    pub fn of_did(did: &str) -> Option<DidMethod> {
        if did.starts_with("did:key:") {
            Some(DidMethod::Key)
        } else if did.starts_with("did:peer:") {
            Some(DidMethod::Peer)
        } else {
            None
        }
    }
}

impl fmt::Display for DidMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DidMethod::Key => "key",
            DidMethod::Peer => "peer",
        })
    }
}

/// Why a DID could not be resolved locally, or an identity file not loaded.
///
/// Callers map [`UnsupportedMethod`](DidError::UnsupportedMethod),
/// [`Malformed`](DidError::Malformed) and [`NoKey`](DidError::NoKey) to a
/// "not-authenticated" reject. DIDs quoted in these errors are truncated
/// and escaped, so they are safe to log but are not meant to be parsed.
#[derive(Debug, thiserror::Error)]
pub enum DidError {
    /// The DID uses a method (or `did:peer` numalgo) this hub cannot resolve
    /// locally; holds its name, e.g. `web` or `peer:4`.
    #[error("unsupported DID method `{0}`")]
    UnsupportedMethod(String),
    /// The DID is syntactically or cryptographically invalid.
    #[error("malformed DID `{did}`: {reason}")]
    Malformed {
        /// The offending DID (possibly truncated, escaped).
        did: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The DID is well formed but has neither an authentication nor a
    /// key-agreement key, so nothing it sends can be authenticated.
    #[error("DID `{did}` has no authentication or key-agreement key")]
    NoKey {
        /// The DID (possibly truncated, escaped).
        did: String,
    },
    /// An identity file could not be read.
    #[error("cannot read identity file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An identity file was read but is not a usable identity.
    #[error("invalid identity file {}: {reason}", path.display())]
    InvalidIdentity {
        /// The file.
        path: PathBuf,
        /// What is wrong with it (never contains key material).
        reason: String,
    },
}

/// Shortens and escapes attacker-supplied text before it goes into an error.
fn for_display(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(MAX_DID_IN_ERROR)
        .flat_map(char::escape_debug)
        .collect();
    if s.chars().nth(MAX_DID_IN_ERROR).is_some() {
        out.push('…');
    }
    out
}

fn malformed(did: &str, reason: impl Into<String>) -> DidError {
    DidError::Malformed {
        did: for_display(did),
        reason: reason.into(),
    }
}

/// A public key decoded from a multibase/multicodec string.
#[derive(Clone, Copy)]
enum PublicKey {
    Ed25519(VerifyingKey),
    X25519([u8; 32]),
}

impl PublicKey {
    fn jwk(&self) -> Value {
        match self {
            PublicKey::Ed25519(key) => okp_jwk("Ed25519", key.as_bytes()),
            PublicKey::X25519(key) => okp_jwk("X25519", key),
        }
    }
}

fn okp_jwk(crv: &str, x: &[u8]) -> Value {
    json!({ "kty": "OKP", "crv": crv, "x": URL_SAFE_NO_PAD.encode(x) })
}

/// `z` + base58btc(multicodec prefix ‖ key), the form used by did:key and did:peer.
fn multikey(prefix: [u8; 2], key: &[u8; 32]) -> String {
    let mut bytes = Vec::with_capacity(34);
    bytes.extend_from_slice(&prefix);
    bytes.extend_from_slice(key);
    multibase::encode(multibase::Base::Base58Btc, bytes)
}

fn ed25519_multikey(key: &VerifyingKey) -> String {
    multikey(MULTICODEC_ED25519_PUB, key.as_bytes())
}

fn x25519_multikey(key: &[u8; 32]) -> String {
    multikey(MULTICODEC_X25519_PUB, key)
}

/// Decodes a multibase (base58btc), multicodec-prefixed Ed25519 or X25519 public key.
fn decode_multikey(did: &str, encoded: &str) -> Result<PublicKey, DidError> {
    if encoded.len() > MAX_MULTIKEY_LEN {
        return Err(malformed(
            did,
            format!(
                "encoded key is {} characters long, too long for an Ed25519 or X25519 key",
                encoded.len()
            ),
        ));
    }
    if !encoded.starts_with('z') {
        return Err(malformed(
            did,
            "key is not multibase base58btc (must start with `z`)",
        ));
    }
    let (base, bytes) = multibase::decode(encoded)
        .map_err(|e| malformed(did, format!("key is not valid base58btc: {e}")))?;
    if base != multibase::Base::Base58Btc {
        return Err(malformed(did, "key is not multibase base58btc"));
    }
    let key = |rest: &[u8], what: &str| -> Result<[u8; 32], DidError> {
        <[u8; 32]>::try_from(rest).map_err(|_| {
            malformed(
                did,
                format!("{what} key must be 32 bytes, found {}", rest.len()),
            )
        })
    };
    if let Some(rest) = bytes.strip_prefix(&MULTICODEC_ED25519_PUB) {
        let key = VerifyingKey::from_bytes(&key(rest, "Ed25519")?)
            .map_err(|_| malformed(did, "Ed25519 key is not a valid curve point"))?;
        if key.is_weak() {
            return Err(malformed(did, "Ed25519 key has small order"));
        }
        Ok(PublicKey::Ed25519(key))
    } else if let Some(rest) = bytes.strip_prefix(&MULTICODEC_X25519_PUB) {
        let key = key(rest, "X25519")?;
        // A small-order point makes every shared secret with it all-zero.
        // The scalar is clamped to a multiple of the cofactor, so the
        // product is the identity exactly when the point has small order.
        let probe = StaticSecret::from([0x55; 32]).diffie_hellman(&X25519PublicKey::from(key));
        if !probe.was_contributory() {
            return Err(malformed(did, "X25519 key has small order"));
        }
        Ok(PublicKey::X25519(key))
    } else if let [a, b, ..] = bytes[..] {
        Err(malformed(
            did,
            format!(
                "unsupported multicodec key type (prefix 0x{a:02x}{b:02x}); only ed25519-pub and x25519-pub are supported"
            ),
        ))
    } else {
        Err(malformed(
            did,
            "key is too short to carry a multicodec prefix",
        ))
    }
}

fn jwk_method(did: &str, id: String, key: &PublicKey) -> VerificationMethod {
    VerificationMethod {
        id,
        type_: VerificationMethodType::JsonWebKey2020,
        controller: did.to_owned(),
        verification_material: VerificationMaterial::JWK {
            public_key_jwk: key.jwk(),
        },
    }
}

fn empty_doc(did: &str) -> DIDDoc {
    DIDDoc {
        id: did.to_owned(),
        key_agreement: Vec::new(),
        authentication: Vec::new(),
        verification_method: Vec::new(),
        service: Vec::new(),
    }
}

/// Resolves a `did:key` or `did:peer:2` to a DID document, without any I/O.
///
/// * `did:key:z6Mk…` (Ed25519): the Ed25519 key is the authentication key
///   (`did#z6Mk…`) and the X25519 key derived from it (birational map to
///   Montgomery form) is the key-agreement key (`did#z6LS…`), as the did:key
///   specification says. A `did:key:z6LS…` (X25519) yields a key-agreement
///   key only.
/// * `did:peer:2.<elements>` (numalgo 2, per the current did:peer spec):
///   purpose `E` keys (X25519) go to `keyAgreement`, `V` keys (Ed25519) to
///   `authentication`, `A`/`I`/`D` keys only to `verificationMethod`, and
///   `S` elements (base64url JSON with abbreviated names) become services.
///   Keys get ids `did#key-1`, `did#key-2`, … in order of appearance;
///   services without an id get `did#service`, `did#service-1`, ….
///
/// Verification methods are `JsonWebKey2020` with an OKP `publicKeyJwk`,
/// ids are absolute DID URLs and `authentication` / `keyAgreement` list
/// exactly those ids. Never panics, whatever the input.
pub fn resolve_local(did: &str) -> Result<DIDDoc, DidError> {
    if did.len() > MAX_DID_LEN {
        return Err(malformed(did, format!("longer than {MAX_DID_LEN} bytes")));
    }
    let rest = did
        .strip_prefix("did:")
        .ok_or_else(|| malformed(did, "does not start with `did:`"))?;
    let (method, msid) = rest
        .split_once(':')
        .ok_or_else(|| malformed(did, "has no method-specific identifier"))?;
    if method.is_empty()
        || !method
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(malformed(
            did,
            "method name must be lowercase letters and digits",
        ));
    }
    if let Some(c) = did.chars().find(|c| matches!(c, '#' | '?' | '/')) {
        return Err(malformed(
            did,
            format!("contains `{c}`: a DID URL was given where a bare DID was expected"),
        ));
    }
    match method {
        "key" => resolve_key(did, msid),
        "peer" => resolve_peer(did, msid),
        other => Err(DidError::UnsupportedMethod(for_display(other))),
    }
}

fn resolve_key(did: &str, msid: &str) -> Result<DIDDoc, DidError> {
    let mut doc = empty_doc(did);
    match decode_multikey(did, msid)? {
        key @ PublicKey::Ed25519(ed) => {
            let auth_id = format!("{did}#{msid}");
            let x25519 = ed.to_montgomery().to_bytes();
            let agreement_id = format!("{did}#{}", x25519_multikey(&x25519));
            doc.verification_method
                .push(jwk_method(did, auth_id.clone(), &key));
            doc.verification_method.push(jwk_method(
                did,
                agreement_id.clone(),
                &PublicKey::X25519(x25519),
            ));
            doc.authentication.push(auth_id);
            doc.key_agreement.push(agreement_id);
        }
        key @ PublicKey::X25519(_) => {
            let id = format!("{did}#{msid}");
            doc.verification_method
                .push(jwk_method(did, id.clone(), &key));
            doc.key_agreement.push(id);
        }
    }
    Ok(doc)
}

fn resolve_peer(did: &str, msid: &str) -> Result<DIDDoc, DidError> {
    let mut chars = msid.chars();
    match chars.next() {
        Some('2') => resolve_peer2(did, chars.as_str()),
        Some(n @ ('0' | '1' | '3' | '4')) => Err(DidError::UnsupportedMethod(format!("peer:{n}"))),
        _ => Err(malformed(did, "unknown did:peer numalgo")),
    }
}

fn resolve_peer2(did: &str, elements: &str) -> Result<DIDDoc, DidError> {
    let elements = elements
        .strip_prefix('.')
        .ok_or_else(|| malformed(did, "did:peer:2 must be followed by `.`-separated elements"))?;
    let mut doc = empty_doc(did);
    let mut keys = 0usize;
    let mut unnamed_services = 0usize;
    for element in elements.split('.') {
        let mut chars = element.chars();
        let purpose = chars
            .next()
            .ok_or_else(|| malformed(did, "empty did:peer:2 element"))?;
        let value = chars.as_str();
        match purpose {
            'A' | 'E' | 'V' | 'I' | 'D' => {
                keys += 1;
                let key = decode_multikey(did, value)?;
                let id = format!("{did}#key-{keys}");
                match (purpose, key) {
                    ('E', PublicKey::X25519(_)) => doc.key_agreement.push(id.clone()),
                    ('E', _) => {
                        return Err(malformed(
                            did,
                            format!(
                                "key-{keys} has purpose E (key agreement) but is not an X25519 key"
                            ),
                        ))
                    }
                    ('V', PublicKey::Ed25519(_)) => doc.authentication.push(id.clone()),
                    ('V', _) => {
                        return Err(malformed(
                            did,
                            format!(
                            "key-{keys} has purpose V (authentication) but is not an Ed25519 key"
                        ),
                        ))
                    }
                    // Assertion and capability keys have no place in a
                    // didcomm DIDDoc beyond the verification method list.
                    _ => {}
                }
                doc.verification_method.push(jwk_method(did, id, &key));
            }
            'S' => doc
                .service
                .push(decode_peer2_service(did, value, &mut unnamed_services)?),
            other => {
                return Err(malformed(
                    did,
                    format!("unknown did:peer:2 purpose code `{}`", other.escape_debug()),
                ))
            }
        }
    }
    if doc.authentication.is_empty() && doc.key_agreement.is_empty() {
        return Err(DidError::NoKey {
            did: for_display(did),
        });
    }
    Ok(doc)
}

/// Expands the did:peer:2 service abbreviations (recursively, in key names,
/// and `dm` as the value of `type`).
fn expand_abbreviations(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let k = match k.as_str() {
                        "t" => "type".to_owned(),
                        "s" => "serviceEndpoint".to_owned(),
                        "r" => "routingKeys".to_owned(),
                        "a" => "accept".to_owned(),
                        _ => k,
                    };
                    let v = match (k.as_str(), v) {
                        ("type", Value::String(t)) if t == "dm" => {
                            Value::String("DIDCommMessaging".to_owned())
                        }
                        (_, v) => expand_abbreviations(v),
                    };
                    (k, v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(expand_abbreviations).collect()),
        other => other,
    }
}

fn decode_peer2_service(
    did: &str,
    encoded: &str,
    unnamed: &mut usize,
) -> Result<Service, DidError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|e| malformed(did, format!("service is not unpadded base64url: {e}")))?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| malformed(did, format!("service is not JSON: {e}")))?;
    let Value::Object(service) = expand_abbreviations(value) else {
        return Err(malformed(did, "service is not a JSON object"));
    };
    let id = match service.get("id") {
        Some(Value::String(id)) => id.clone(),
        Some(_) => return Err(malformed(did, "service id is not a string")),
        None => {
            let id = match *unnamed {
                0 => "#service".to_owned(),
                n => format!("#service-{n}"),
            };
            *unnamed += 1;
            id
        }
    };
    let id = if id.starts_with('#') {
        format!("{did}{id}")
    } else {
        id
    };
    let service_endpoint = match service.get("type").and_then(Value::as_str) {
        Some("DIDCommMessaging") => didcomm_messaging(&service),
        _ => None,
    }
    .unwrap_or_else(|| ServiceKind::Other {
        value: service
            .get("serviceEndpoint")
            .cloned()
            .unwrap_or(Value::Null),
    });
    Ok(Service {
        id,
        service_endpoint,
    })
}

/// A `DIDCommMessaging` service endpoint in any of its published shapes: an
/// object `{uri, accept, routingKeys}` (DIDComm v2.1), a list of such
/// objects (v2.0; the first is used) or a bare URI with `accept` and
/// `routingKeys` beside it (the original did:peer:2 encoding).
fn didcomm_messaging(service: &Map<String, Value>) -> Option<ServiceKind> {
    let strings = |v: Option<&Value>| -> Option<Vec<String>> {
        match v {
            None => Some(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|i| i.as_str().map(str::to_owned))
                .collect(),
            Some(_) => None,
        }
    };
    let endpoint = match service.get("serviceEndpoint")? {
        Value::Array(items) => items.first()?,
        other => other,
    };
    let (uri, fields) = match endpoint {
        Value::String(uri) => (uri.as_str(), service),
        Value::Object(fields) => (fields.get("uri")?.as_str()?, fields),
        _ => return None,
    };
    let accept = strings(fields.get("accept"))?;
    Some(ServiceKind::DIDCommMessaging {
        value: DIDCommMessagingService {
            uri: uri.to_owned(),
            accept: (!accept.is_empty()).then_some(accept),
            routing_keys: strings(fields.get("routingKeys"))?,
        },
    })
}

/// A small LRU map from DID to resolved document.
struct Lru {
    capacity: usize,
    tick: u64,
    entries: HashMap<Arc<str>, (Arc<DIDDoc>, u64)>,
    order: BTreeMap<u64, Arc<str>>,
}

impl Lru {
    fn new(capacity: usize) -> Self {
        Lru {
            capacity,
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    fn get(&mut self, did: &str) -> Option<Arc<DIDDoc>> {
        let tick = self.next_tick();
        let (key, (doc, used)) = self.entries.get_key_value(did)?;
        let (key, doc, old) = (key.clone(), doc.clone(), *used);
        self.order.remove(&old);
        self.order.insert(tick, key.clone());
        if let Some(entry) = self.entries.get_mut(&key) {
            entry.1 = tick;
        }
        Some(doc)
    }

    fn insert(&mut self, did: &str, doc: Arc<DIDDoc>) {
        if self.capacity == 0 {
            return;
        }
        let tick = self.next_tick();
        let key: Arc<str> = Arc::from(did);
        if let Some((_, old)) = self.entries.insert(key.clone(), (doc, tick)) {
            self.order.remove(&old);
        }
        self.order.insert(tick, key);
        while self.entries.len() > self.capacity {
            match self.order.pop_first() {
                Some((_, oldest)) => {
                    self.entries.remove(&oldest);
                }
                None => break,
            }
        }
    }
}

/// A [`DIDResolver`] for the `didcomm` crate: [`resolve_local`] behind a
/// bounded LRU cache, plus static documents (e.g. for DIDs of other methods)
/// that take precedence over local resolution.
///
/// Through the [`DIDResolver`] trait an unknown or malformed DID resolves
/// to `Ok(None)`, which `didcomm` reports as `DIDNotResolved`; use
/// [`resolve_checked`](LocalResolver::resolve_checked) to learn why.
pub struct LocalResolver {
    cache: Mutex<Lru>,
    statics: RwLock<HashMap<String, Arc<DIDDoc>>>,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Parsed Ed25519 authentication keys by kid (the signed fast path): a sharded, bounded
    /// cache, so verify workers do not queue on one lock and no key is decoded twice.
    keys: quick_cache::sync::Cache<String, VerifyingKey>,
    /// Parsed X25519 key-agreement keys by kid (the authcrypt fast path), likewise.
    agreement_keys: quick_cache::sync::Cache<String, [u8; 32]>,
    key_capacity: usize,
    key_hits: AtomicU64,
    key_misses: AtomicU64,
}

impl LocalResolver {
    /// A resolver caching up to `cache_capacity` documents (0 disables the cache) and as many
    /// parsed signer keys.
    pub fn new(cache_capacity: usize) -> Self {
        Self::with_capacities(cache_capacity, cache_capacity)
    }

    /// A resolver caching up to `documents` DID documents and `keys` parsed signer keys.
    /// A cached document costs a few KiB (measured: 100 000 of them with their keys took the hub
    /// to 410 MB), a parsed key a few hundred bytes; signed posts need only the key once it is
    /// cached, so a small document cache serves a large fleet.
    pub fn with_capacities(documents: usize, keys: usize) -> Self {
        LocalResolver {
            cache: Mutex::new(Lru::new(documents)),
            statics: RwLock::new(HashMap::new()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            keys: quick_cache::sync::Cache::new(keys.max(1)),
            agreement_keys: quick_cache::sync::Cache::new(keys.max(1)),
            key_capacity: keys.max(1),
            key_hits: AtomicU64::new(0),
            key_misses: AtomicU64::new(0),
        }
    }

    /// Adds (or replaces) a static document, served for `doc.id`.
    pub fn add_static_doc(&self, doc: DIDDoc) {
        let mut statics = self.statics.write().unwrap_or_else(|e| e.into_inner());
        // Keys parsed from an earlier document for this DID must not outlive it.
        self.keys.clear();
        self.agreement_keys.clear();
        statics.insert(doc.id.clone(), Arc::new(doc));
    }

    /// Builder form of [`add_static_doc`](LocalResolver::add_static_doc).
    pub fn with_static_doc(self, doc: DIDDoc) -> Self {
        self.add_static_doc(doc);
        self
    }

    fn cache(&self) -> MutexGuard<'_, Lru> {
        // Nothing panics while the lock is held; recover rather than propagate.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves `did` from the static documents, the cache or
    /// [`resolve_local`] (caching the result), saying why if it cannot.
    pub fn resolve_checked(&self, did: &str) -> Result<Arc<DIDDoc>, DidError> {
        if let Some(doc) = self
            .statics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(did)
        {
            return Ok(doc.clone());
        }
        if let Some(doc) = self.cache().get(did) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(doc);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        // Decode outside the lock; two racing misses both decode, harmlessly.
        let doc = Arc::new(resolve_local(did)?);
        self.cache().insert(did, doc.clone());
        Ok(doc)
    }

    /// `(hits, misses)` of the cache since creation. Static documents count
    /// as neither; failed resolutions count as misses.
    pub fn cache_stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Number of documents currently cached.
    pub fn cache_len(&self) -> usize {
        self.cache().entries.len()
    }

    /// The Ed25519 key that `kid` (a DID URL) names, if the signer's document lists `kid` under
    /// `authentication` and its verification method is a `JsonWebKey2020` OKP Ed25519 JWK: the
    /// exact conditions under which `didcomm` would verify an EdDSA signature with it.
    /// `None` for anything else (the caller then lets `didcomm` decide and explain).
    /// Keys are parsed once and cached; see [`key_cache_stats`](LocalResolver::key_cache_stats).
    pub fn signing_key(&self, kid: &str) -> Option<VerifyingKey> {
        if let Some(key) = self.keys.get(kid) {
            self.key_hits.fetch_add(1, Ordering::Relaxed);
            return Some(key);
        }
        self.key_misses.fetch_add(1, Ordering::Relaxed);
        let x = self.okp_key(kid, |doc| &doc.authentication, "Ed25519")?;
        let key = VerifyingKey::from_bytes(&x).ok()?;
        // Small-order keys (which `verify_strict` refuses) and mixed-order ones (which no key
        // generator makes, and with which batch and single verification could disagree) are
        // left to `Message::unpack`.
        if key.is_weak() || !key.to_edwards().is_torsion_free() {
            return None;
        }
        self.keys.insert(kid.to_owned(), key);
        Some(key)
    }

    /// The X25519 public key that `kid` (a DID URL) names, if the sender's document lists
    /// `kid` under `keyAgreement` and its verification method is a `JsonWebKey2020` OKP X25519
    /// JWK: the conditions under which `didcomm` would use it as an authcrypt sender key.
    /// `None` for anything else. Cached like [`signing_key`](LocalResolver::signing_key).
    pub fn agreement_key(&self, kid: &str) -> Option<[u8; 32]> {
        if let Some(key) = self.agreement_keys.get(kid) {
            self.key_hits.fetch_add(1, Ordering::Relaxed);
            return Some(key);
        }
        self.key_misses.fetch_add(1, Ordering::Relaxed);
        let key = self.okp_key(kid, |doc| &doc.key_agreement, "X25519")?;
        self.agreement_keys.insert(kid.to_owned(), key);
        Some(key)
    }

    /// The 32-byte `x` of the key `kid` names: `kid` is a DID URL with a fragment, its DID
    /// resolves, `listed` (a verification relationship of the document) names `kid`, and its
    /// verification method is a `JsonWebKey2020` OKP JWK on curve `crv`.
    fn okp_key(
        &self,
        kid: &str,
        listed: fn(&DIDDoc) -> &Vec<String>,
        crv: &str,
    ) -> Option<[u8; 32]> {
        let (did, fragment) = kid.split_once('#')?;
        if fragment.is_empty() {
            return None;
        }
        let doc = self.resolve_checked(did).ok()?;
        if !listed(&doc).iter().any(|k| k == kid) {
            return None;
        }
        let vm = doc.verification_method.iter().find(|vm| vm.id == kid)?;
        let VerificationMaterial::JWK {
            public_key_jwk: jwk,
        } = &vm.verification_material
        else {
            return None;
        };
        if !matches!(vm.type_, VerificationMethodType::JsonWebKey2020)
            || jwk.get("kty").and_then(Value::as_str) != Some("OKP")
            || jwk.get("crv").and_then(Value::as_str) != Some(crv)
        {
            return None;
        }
        decode_b64_32(jwk.get("x"))
    }

    /// How many parsed keys of each kind the caches hold at most.
    pub fn key_capacity(&self) -> usize {
        self.key_capacity
    }

    /// `(hits, misses, cached)` of the parsed-key caches (signing and agreement keys) since
    /// creation.
    pub fn key_cache_stats(&self) -> (u64, u64, usize) {
        (
            self.key_hits.load(Ordering::Relaxed),
            self.key_misses.load(Ordering::Relaxed),
            self.keys.len() + self.agreement_keys.len(),
        )
    }
}

impl fmt::Debug for LocalResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (hits, misses) = self.cache_stats();
        f.debug_struct("LocalResolver")
            .field("cached", &self.cache_len())
            .field("hits", &hits)
            .field("misses", &misses)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl DIDResolver for LocalResolver {
    async fn resolve(&self, did: &str) -> didcomm::error::Result<Option<DIDDoc>> {
        match self.resolve_checked(did) {
            Ok(doc) => Ok(Some(DIDDoc::clone(&doc))),
            Err(error) => {
                tracing::debug!(%error, "DID not resolved");
                Ok(None)
            }
        }
    }
}

/// An identity with its secrets, stored as a JSON file:
/// `{"did": "...", "method": "key", "secrets": [{"id": "did#frag",
/// "type": "JsonWebKey2020", "privateKeyJwk": {"kty": "OKP", "crv":
/// "Ed25519"|"X25519", "x": ..., "d": ...}}]}`.
///
/// Secrets are JWKs (the `didcomm` crate rebuilds the key for every message
/// and a JWK is about twice as fast to parse as a multibase key). The
/// X25519 `d` is the 32-byte scalar as generated, unclamped; X25519 clamps
/// it on use. `Debug` shows only the DID and method.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    /// The DID.
    pub did: String,
    /// Its method.
    pub method: DidMethod,
    /// Private keys, one per verification method of the DID.
    pub secrets: Vec<Secret>,
}

fn jwk_secret(id: String, crv: &str, x: &[u8; 32], d: &[u8; 32]) -> Secret {
    Secret {
        id,
        type_: SecretType::JsonWebKey2020,
        secret_material: SecretMaterial::JWK {
            private_key_jwk: json!({
                "kty": "OKP",
                "crv": crv,
                "x": URL_SAFE_NO_PAD.encode(x),
                "d": URL_SAFE_NO_PAD.encode(d),
            }),
        },
    }
}

fn secret_jwk(secret: &Secret) -> Option<&Value> {
    match &secret.secret_material {
        SecretMaterial::JWK { private_key_jwk } => Some(private_key_jwk),
        _ => None,
    }
}

fn decode_b64_32(value: Option<&Value>) -> Option<[u8; 32]> {
    let bytes = URL_SAFE_NO_PAD.decode(value?.as_str()?).ok()?;
    <[u8; 32]>::try_from(bytes.as_slice()).ok()
}

impl Identity {
    /// Creates a new identity with fresh keys from the OS RNG.
    ///
    /// * [`DidMethod::Key`]: an Ed25519 key; the X25519 secret is derived
    ///   from it (the first half of SHA-512 of the seed), matching the
    ///   X25519 key did:key derives from the public key.
    /// * [`DidMethod::Peer`]: `did:peer:2.E<x25519>.V<ed25519>` with an
    ///   independent X25519 key (`#key-1`) and the Ed25519 key (`#key-2`),
    ///   no service.
    pub fn generate(method: DidMethod) -> Identity {
        Self::from_keys(method, SigningKey::generate(&mut OsRng), || {
            StaticSecret::random_from_rng(OsRng)
        })
    }

    /// Builds an identity from an Ed25519 signing key; `agreement` supplies
    /// the X25519 secret for `did:peer:2` (unused for `did:key`).
    fn from_keys(
        method: DidMethod,
        signing: SigningKey,
        agreement: impl FnOnce() -> StaticSecret,
    ) -> Identity {
        let verifying = signing.verifying_key();
        let ed_multikey = ed25519_multikey(&verifying);
        let (did, x_secret, signing_kid, agreement_kid);
        match method {
            DidMethod::Key => {
                x_secret = StaticSecret::from(signing.to_scalar_bytes());
                let x_public = X25519PublicKey::from(&x_secret);
                did = format!("did:key:{ed_multikey}");
                signing_kid = format!("{did}#{ed_multikey}");
                agreement_kid = format!("{did}#{}", x25519_multikey(x_public.as_bytes()));
            }
            DidMethod::Peer => {
                x_secret = agreement();
                let x_public = X25519PublicKey::from(&x_secret);
                did = format!(
                    "did:peer:2.E{}.V{ed_multikey}",
                    x25519_multikey(x_public.as_bytes())
                );
                agreement_kid = format!("{did}#key-1");
                signing_kid = format!("{did}#key-2");
            }
        }
        let x_public = X25519PublicKey::from(&x_secret);
        let secrets = vec![
            jwk_secret(
                signing_kid,
                "Ed25519",
                verifying.as_bytes(),
                signing.as_bytes(),
            ),
            jwk_secret(
                agreement_kid,
                "X25519",
                x_public.as_bytes(),
                x_secret.as_bytes(),
            ),
        ];
        Identity {
            did,
            method,
            secrets,
        }
    }

    fn kid_for_curve(&self, crv: &str) -> String {
        self.secrets
            .iter()
            .find(|s| secret_jwk(s).and_then(|jwk| jwk["crv"].as_str()) == Some(crv))
            .map(|s| s.id.clone())
            // A bare DID tells didcomm to use any suitable key it holds.
            .unwrap_or_else(|| self.did.clone())
    }

    /// Key id of the Ed25519 signing key (falls back to the bare DID if
    /// the identity holds none, which `didcomm` reads as "any key").
    pub fn signing_kid(&self) -> String {
        self.kid_for_curve("Ed25519")
    }

    /// Key id of the X25519 key-agreement key (falls back to the bare DID
    /// if the identity holds none).
    pub fn agreement_kid(&self) -> String {
        self.kid_for_curve("X25519")
    }

    /// The X25519 key-agreement secret and its kid, if the identity holds one.
    pub fn agreement_secret(&self) -> Option<(String, StaticSecret)> {
        self.secrets.iter().find_map(|s| {
            let jwk = secret_jwk(s)?;
            if jwk.get("crv").and_then(Value::as_str) != Some("X25519") {
                return None;
            }
            Some((
                s.id.clone(),
                StaticSecret::from(decode_b64_32(jwk.get("d"))?),
            ))
        })
    }

    /// Writes the identity as JSON to `path`, atomically (a temporary file
    /// in the same directory, fsynced, then renamed over `path`). The file
    /// is created with mode 0600 and is never readable by others, not even
    /// briefly; errors name the path.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        write_private_file(path, &json).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot write identity file {}: {e}", path.display()),
            )
        })
    }

    /// Reads and validates an identity file (see
    /// [`load_with_mode`](Identity::load_with_mode)), logging a warning if
    /// the file is accessible to group or others.
    pub fn load(path: &Path) -> Result<Identity, DidError> {
        let (identity, mode) = Self::load_with_mode(path)?;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:04o}", mode & 0o7777),
                "identity file is readable by group or others; run chmod 600 on it"
            );
        }
        Ok(identity)
    }

    /// Reads and validates an identity file, returning it with the file's
    /// permission bits so the caller can refuse or warn about a file that
    /// group or others can access (`mode & 0o077 != 0`).
    ///
    /// Validation: the DID resolves locally and matches `method`; every
    /// secret is an OKP JWK whose `d` yields its `x`, and that public key is
    /// the verification method with the secret's id; there is at least one
    /// authentication and one key-agreement secret.
    pub fn load_with_mode(path: &Path) -> Result<(Identity, u32), DidError> {
        let io_err = |source| DidError::Io {
            path: path.to_owned(),
            source,
        };
        let invalid = |reason: String| DidError::InvalidIdentity {
            path: path.to_owned(),
            reason,
        };
        let file = File::open(path).map_err(io_err)?;
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Err(invalid("not a regular file".to_owned()));
        }
        let mut data = Vec::new();
        file.take(MAX_IDENTITY_FILE_LEN + 1)
            .read_to_end(&mut data)
            .map_err(io_err)?;
        if data.len() as u64 > MAX_IDENTITY_FILE_LEN {
            return Err(invalid(format!(
                "larger than {MAX_IDENTITY_FILE_LEN} bytes"
            )));
        }
        let identity: Identity = serde_json::from_slice(&data)
            .map_err(|e| invalid(format!("not an identity JSON document: {e}")))?;
        identity.validate().map_err(invalid)?;
        Ok((identity, meta.permissions().mode() & 0o7777))
    }

    /// Checks the invariants [`load_with_mode`](Identity::load_with_mode)
    /// documents. Error text never contains key material.
    fn validate(&self) -> Result<(), String> {
        let doc = resolve_local(&self.did).map_err(|e| format!("DID does not resolve: {e}"))?;
        if DidMethod::of_did(&self.did) != Some(self.method) {
            return Err(format!("DID does not use method `{}`", self.method));
        }
        let mut seen = HashSet::new();
        for secret in &self.secrets {
            let id = &secret.id;
            if !seen.insert(id.as_str()) {
                return Err(format!("secret `{id}` appears twice"));
            }
            let method = doc
                .verification_method
                .iter()
                .find(|vm| &vm.id == id)
                .ok_or_else(|| format!("secret `{id}` is not a key of the DID"))?;
            let VerificationMaterial::JWK { public_key_jwk } = &method.verification_material else {
                return Err(format!("secret `{id}`: DID key is not a JWK"));
            };
            let jwk = match (&secret.type_, secret_jwk(secret)) {
                (SecretType::JsonWebKey2020, Some(jwk)) => jwk,
                _ => {
                    return Err(format!(
                        "secret `{id}` is not a JsonWebKey2020 privateKeyJwk"
                    ))
                }
            };
            if jwk["kty"] != "OKP" || jwk["crv"] != public_key_jwk["crv"] {
                return Err(format!("secret `{id}` has the wrong key type or curve"));
            }
            let d = decode_b64_32(jwk.get("d"))
                .ok_or_else(|| format!("secret `{id}`: `d` is not 32 bytes of base64url"))?;
            let x = match jwk["crv"].as_str() {
                Some("Ed25519") => SigningKey::from_bytes(&d).verifying_key().to_bytes(),
                Some("X25519") => X25519PublicKey::from(&StaticSecret::from(d)).to_bytes(),
                _ => return Err(format!("secret `{id}` has an unsupported curve")),
            };
            if decode_b64_32(jwk.get("x")) != Some(x)
                || decode_b64_32(public_key_jwk.get("x")) != Some(x)
            {
                return Err(format!("secret `{id}` does not match the DID's public key"));
            }
        }
        if !doc.authentication.iter().any(|k| seen.contains(k.as_str())) {
            return Err("no secret for an authentication key".to_owned());
        }
        if !doc.key_agreement.iter().any(|k| seen.contains(k.as_str())) {
            return Err("no secret for a key-agreement key".to_owned());
        }
        Ok(())
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("did", &self.did)
            .field("method", &self.method)
            .finish_non_exhaustive()
    }
}

/// Writes `data` to `path` via a 0600 temporary file and a rename.
fn write_private_file(path: &Path, data: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{:016x}",
        name.to_string_lossy(),
        std::process::id(),
        rand::random::<u64>()
    ));
    let written = (|| {
        // create_new + mode: the file never exists with wider permissions.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        // Pin the mode exactly, whatever the umask (it can only narrow it).
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(data)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    // Make the rename durable; not all filesystems allow fsync on a directory.
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// A [`SecretsResolver`] over the secrets of one or more identities (the
/// hub's own; in tests also devices'). `Debug` lists key ids only.
pub struct StaticSecrets {
    secrets: HashMap<String, Secret>,
}

impl StaticSecrets {
    /// Collects the secrets of `ids`, keyed by their exact key id.
    pub fn new(ids: &[Identity]) -> Self {
        StaticSecrets {
            secrets: ids
                .iter()
                .flat_map(|id| id.secrets.iter())
                .map(|s| (s.id.clone(), s.clone()))
                .collect(),
        }
    }

    /// Key ids held, in no particular order.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.secrets.keys().map(String::as_str)
    }
}

impl fmt::Debug for StaticSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticSecrets")
            .field("kids", &self.secrets.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[async_trait]
impl SecretsResolver for StaticSecrets {
    async fn get_secret(&self, secret_id: &str) -> didcomm::error::Result<Option<Secret>> {
        Ok(self.secrets.get(secret_id).cloned())
    }

    async fn find_secrets<'a>(
        &self,
        secret_ids: &'a [&'a str],
    ) -> didcomm::error::Result<Vec<&'a str>> {
        Ok(secret_ids
            .iter()
            .copied()
            .filter(|id| self.secrets.contains_key(*id))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use didcomm::{Message, PackEncryptedOptions, UnpackOptions};
    use proptest::prelude::*;

    fn b58(s: &str) -> Vec<u8> {
        multibase::Base::Base58Btc
            .decode(s)
            .expect("test vector is base58")
    }

    fn jwk_x(doc: &DIDDoc, id: &str) -> Vec<u8> {
        let vm = doc
            .verification_method
            .iter()
            .find(|vm| vm.id == id)
            .unwrap_or_else(|| panic!("no verification method {id}"));
        let VerificationMaterial::JWK { public_key_jwk } = &vm.verification_material else {
            panic!("not a JWK");
        };
        assert!(matches!(vm.type_, VerificationMethodType::JsonWebKey2020));
        assert_eq!(vm.controller, doc.id);
        assert_eq!(public_key_jwk["kty"], "OKP");
        URL_SAFE_NO_PAD
            .decode(public_key_jwk["x"].as_str().expect("x"))
            .expect("x is base64url")
    }

    /// The raw key inside a `z`-multibase multicodec key.
    fn multikey_bytes(s: &str) -> Vec<u8> {
        let (_, bytes) = multibase::decode(s).expect("multibase");
        bytes[2..].to_vec()
    }

    fn clamp(mut k: [u8; 32]) -> [u8; 32] {
        k[0] &= 248;
        k[31] &= 127;
        k[31] |= 64;
        k
    }

    // ---- did:key -------------------------------------------------------

    /// The did:key spec's Ed25519 example document
    /// (https://w3c-ccg.github.io/did-method-key/, also mirrored verbatim in
    /// e.g. digitalcredentials/did-method-key's README) lists keyAgreement
    /// `…#z6LSj72tK8brWgZja8NLRwPigth2T9QRiG1uH9oKZuKjdh9p`.
    #[test]
    fn did_key_spec_example_derives_x25519() {
        let did = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK";
        let doc = resolve_local(did).unwrap();
        assert_eq!(doc.id, did);
        assert_eq!(
            doc.authentication,
            vec![format!(
                "{did}#z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"
            )]
        );
        assert_eq!(
            doc.key_agreement,
            vec![format!(
                "{did}#z6LSj72tK8brWgZja8NLRwPigth2T9QRiG1uH9oKZuKjdh9p"
            )]
        );
        assert_eq!(doc.verification_method.len(), 2);
        assert_eq!(
            jwk_x(&doc, &doc.authentication[0]),
            multikey_bytes("z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK")
        );
        assert_eq!(
            jwk_x(&doc, &doc.key_agreement[0]),
            multikey_bytes("z6LSj72tK8brWgZja8NLRwPigth2T9QRiG1uH9oKZuKjdh9p")
        );
        assert!(doc.service.is_empty());
    }

    /// Test vectors from the did:key spec repository,
    /// w3c-ccg/did-method-key `test-vectors/ed25519-x25519.json`: seed ->
    /// DID, derived X25519 public key and X25519 private key (base58).
    #[test]
    fn did_key_spec_repo_vectors_from_seed() {
        let vectors = [
            (
                "0000000000000000000000000000000000000000000000000000000000000000",
                "did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp",
                "z6LShs9GGnqk85isEBzzshkuVWrVKsRp24GnDuHk8QWkARMW",
                "7By6kV2t2d188odEM4ExAve1UithKT6dLva4dwsDT3ak",
                "6QN8DfuN9hjgHgPvLXqgzqYE3jRRGRrmJQZkd5tL8paR",
            ),
            (
                "0000000000000000000000000000000000000000000000000000000000000001",
                "did:key:z6MkjchhfUsD6mmvni8mCdXHw216Xrm9bQe2mBH1P5RDjVJG",
                "z6LSrHyXiPBhUbvPUtyUCdf32sniiMGPTAesgHrtEa4FePtr",
                "FcoNC5NqP9CePWbhfz95iHaEsCjGkZUioK9Ck7Qiw286",
                "HBTcN2MrXNRj9xF9oi8QqYyuEPv3JLLjQKuEgW9oxVKP",
            ),
            (
                "0000000000000000000000000000000000000000000000000000000000000002",
                "did:key:z6MknGc3ocHs3zdPiJbnaaqDi58NGb4pk1Sp9WxWufuXSdxf",
                "z6LSkkqoZRC34AEpbkhZCqLDcHQVAxuLpQ7kC8XCXMVUfvjE",
                "A5fe37PAxhX5WNKngBpGHhC1KpNE7nwbK9oX2tqwxYxU",
                "ACa4PPJ1LnPNq1iwS33V3Akh7WtnC71WkKFZ9ccM6sX2",
            ),
        ];
        for (seed_hex, did, x_frag, x_pub, x_priv) in vectors {
            let mut seed = [0u8; 32];
            seed[31] = u8::from_str_radix(&seed_hex[62..], 16).unwrap();
            let id = Identity::from_keys(DidMethod::Key, SigningKey::from_bytes(&seed), || {
                unreachable!("did:key derives its X25519 key")
            });
            assert_eq!(id.did, did);
            assert_eq!(id.agreement_kid(), format!("{did}#{x_frag}"));
            let doc = resolve_local(did).unwrap();
            assert_eq!(doc.key_agreement, vec![id.agreement_kid()]);
            assert_eq!(jwk_x(&doc, &id.agreement_kid()), b58(x_pub));
            // Our X25519 secret is the unclamped scalar; it clamps to theirs.
            let secret = id
                .secrets
                .iter()
                .find(|s| s.id == id.agreement_kid())
                .unwrap();
            let d = decode_b64_32(secret_jwk(secret).unwrap().get("d")).unwrap();
            let theirs = <[u8; 32]>::try_from(b58(x_priv).as_slice()).unwrap();
            assert_eq!(clamp(d), clamp(theirs));
            id.validate().unwrap();
        }
    }

    /// More published Ed25519 -> X25519 pairs (openwallet-foundation/acapy
    /// `aries_cloudagent/did/tests/test_dids.py` and `vc/tests/dids.py`).
    #[test]
    fn did_key_other_published_derivations() {
        for (ed, x) in [
            (
                "z6MkmjY8GnV5i9YTDtPETC2uUAW6ejw3nk5mXF5yci5ab7th",
                "z6LShpNhGwSupbB7zjuivH156vhLJBDDzmQtA4BY9S94pe1K",
            ),
            (
                "z6Mkgg342Ycpuk263R9d8Aq6MUaxPn1DDeHyGo38EefXmgDL",
                "z6LSbkodSr6SU2trs8VUgnrnWtSm7BAPG245ggrBmSrxbv1R",
            ),
        ] {
            let did = format!("did:key:{ed}");
            let doc = resolve_local(&did).unwrap();
            assert_eq!(doc.key_agreement, vec![format!("{did}#{x}")]);
        }
    }

    #[test]
    fn did_key_x25519_is_key_agreement_only() {
        // w3c-ccg/did-method-key test-vectors/x25519.json
        let did = "did:key:z6LShLeXRTzevtwcfehaGEzCMyL3bNsAeKCwcqwJxyCo63yE";
        let doc = resolve_local(did).unwrap();
        assert!(doc.authentication.is_empty());
        assert_eq!(
            doc.key_agreement,
            vec![format!(
                "{did}#z6LShLeXRTzevtwcfehaGEzCMyL3bNsAeKCwcqwJxyCo63yE"
            )]
        );
    }

    #[test]
    fn did_key_generate_resolve_round_trip() {
        let id = Identity::generate(DidMethod::Key);
        assert!(id.did.starts_with("did:key:z6Mk"));
        let doc = resolve_local(&id.did).unwrap();
        assert_eq!(doc.authentication, vec![id.signing_kid()]);
        assert_eq!(doc.key_agreement, vec![id.agreement_kid()]);
        assert!(id.agreement_kid().contains("#z6LS"));
        id.validate().unwrap();
    }

    // ---- did:peer:2 ----------------------------------------------------

    /// The "Example Peer DID 2" of the did:peer spec
    /// (decentralized-identity/peer-did-method-spec, spec/core.md, method 2,
    /// "Resolving a did:peer:2"): V key = #key-1, E key = #key-2, two
    /// services without ids = #service and #service-1.
    const SPEC_PEER2: &str = "did:peer:2.Vz6Mkj3PUd1WjvaDhNZhhhXQdz5UnZXmS7ehtx8bsPpD47kKc.Ez6LSg8zQom395jKLrGiBNruB9MM6V8PWuf2FpEy4uRFiqQBR.SeyJ0IjoiZG0iLCJzIjp7InVyaSI6Imh0dHA6Ly9leGFtcGxlLmNvbS9kaWRjb21tIiwiYSI6WyJkaWRjb21tL3YyIl0sInIiOlsiZGlkOmV4YW1wbGU6MTIzNDU2Nzg5YWJjZGVmZ2hpI2tleS0xIl19fQ.SeyJ0IjoiZG0iLCJzIjp7InVyaSI6Imh0dHA6Ly9leGFtcGxlLmNvbS9hbm90aGVyIiwiYSI6WyJkaWRjb21tL3YyIl0sInIiOlsiZGlkOmV4YW1wbGU6MTIzNDU2Nzg5YWJjZGVmZ2hpI2tleS0yIl19fQ";

    fn didcomm_service(doc: &DIDDoc, i: usize) -> (&str, &DIDCommMessagingService) {
        let s = &doc.service[i];
        match &s.service_endpoint {
            ServiceKind::DIDCommMessaging { value } => (s.id.as_str(), value),
            ServiceKind::Other { .. } => panic!("service {i} is not DIDCommMessaging"),
        }
    }

    #[test]
    fn did_peer2_spec_example() {
        let d = SPEC_PEER2;
        let doc = resolve_local(d).unwrap();
        assert_eq!(doc.id, d);
        assert_eq!(doc.authentication, vec![format!("{d}#key-1")]);
        assert_eq!(doc.key_agreement, vec![format!("{d}#key-2")]);
        let ids: Vec<_> = doc
            .verification_method
            .iter()
            .map(|vm| vm.id.clone())
            .collect();
        assert_eq!(ids, vec![format!("{d}#key-1"), format!("{d}#key-2")]);
        assert_eq!(
            jwk_x(&doc, &format!("{d}#key-1")),
            multikey_bytes("z6Mkj3PUd1WjvaDhNZhhhXQdz5UnZXmS7ehtx8bsPpD47kKc")
        );
        assert_eq!(
            jwk_x(&doc, &format!("{d}#key-2")),
            multikey_bytes("z6LSg8zQom395jKLrGiBNruB9MM6V8PWuf2FpEy4uRFiqQBR")
        );
        assert_eq!(doc.service.len(), 2);
        let (id, svc) = didcomm_service(&doc, 0);
        assert_eq!(id, format!("{d}#service"));
        assert_eq!(svc.uri, "http://example.com/didcomm");
        assert_eq!(svc.accept, Some(vec!["didcomm/v2".to_owned()]));
        assert_eq!(
            svc.routing_keys,
            vec!["did:example:123456789abcdefghi#key-1"]
        );
        let (id, svc) = didcomm_service(&doc, 1);
        assert_eq!(id, format!("{d}#service-1"));
        assert_eq!(svc.uri, "http://example.com/another");
        assert_eq!(
            svc.routing_keys,
            vec!["did:example:123456789abcdefghi#key-2"]
        );
    }

    /// The method-2 DID used as input in the spec's "Method 3" section:
    /// E first, then two V keys, and a service in the original encoding
    /// (`s` is a bare URI, `r`/`a` beside it).
    #[test]
    fn did_peer2_spec_method3_input() {
        let d = "did:peer:2.Ez6LSbysY2xFMRpGMhb7tFTLMpeuPRaqaWM1yECx2AtzE3KCc.Vz6MkqRYqQiSgvZQdnBytw86Qbs2ZWUkGv22od935YF4s8M7V.Vz6MkgoLTnTypo3tDRwCkZXSccTPHRLhF4ZnjhueYAFpEX6vg.SeyJ0IjoiZG0iLCJzIjoiaHR0cHM6Ly9leGFtcGxlLmNvbS9lbmRwb2ludCIsInIiOlsiZGlkOmV4YW1wbGU6c29tZW1lZGlhdG9yI3NvbWVrZXkiXSwiYSI6WyJkaWRjb21tL3YyIiwiZGlkY29tbS9haXAyO2Vudj1yZmM1ODciXX0";
        let doc = resolve_local(d).unwrap();
        assert_eq!(doc.key_agreement, vec![format!("{d}#key-1")]);
        assert_eq!(
            doc.authentication,
            vec![format!("{d}#key-2"), format!("{d}#key-3")]
        );
        assert_eq!(
            jwk_x(&doc, &format!("{d}#key-3")),
            multikey_bytes("z6MkgoLTnTypo3tDRwCkZXSccTPHRLhF4ZnjhueYAFpEX6vg")
        );
        let (id, svc) = didcomm_service(&doc, 0);
        assert_eq!(id, format!("{d}#service"));
        assert_eq!(svc.uri, "https://example.com/endpoint");
        assert_eq!(svc.routing_keys, vec!["did:example:somemediator#somekey"]);
        assert_eq!(
            svc.accept,
            Some(vec![
                "didcomm/v2".to_owned(),
                "didcomm/aip2;env=rfc587".to_owned()
            ])
        );
    }

    #[test]
    fn did_peer2_service_with_id_and_unknown_type() {
        let x = x25519_multikey(&[9; 32]);
        let with_id =
            URL_SAFE_NO_PAD.encode(r##"{"id":"#mqtt","t":"dm","s":{"uri":"mqtt://hub"}}"##);
        let other = URL_SAFE_NO_PAD.encode(r#"{"t":"LinkedDomains","s":"https://example.com"}"#);
        let d = format!("did:peer:2.E{x}.S{with_id}.S{other}");
        let doc = resolve_local(&d).unwrap();
        let (id, svc) = didcomm_service(&doc, 0);
        assert_eq!(id, format!("{d}#mqtt"));
        assert_eq!(svc.uri, "mqtt://hub");
        assert_eq!(svc.accept, None);
        assert_eq!(doc.service[1].id, format!("{d}#service"));
        assert!(matches!(
            doc.service[1].service_endpoint,
            ServiceKind::Other { .. }
        ));
    }

    #[test]
    fn did_peer2_generate_resolve_round_trip() {
        let id = Identity::generate(DidMethod::Peer);
        assert!(id.did.starts_with("did:peer:2.Ez6LS"));
        assert_eq!(id.agreement_kid(), format!("{}#key-1", id.did));
        assert_eq!(id.signing_kid(), format!("{}#key-2", id.did));
        let doc = resolve_local(&id.did).unwrap();
        assert_eq!(doc.key_agreement, vec![id.agreement_kid()]);
        assert_eq!(doc.authentication, vec![id.signing_kid()]);
        id.validate().unwrap();
    }

    // ---- errors --------------------------------------------------------

    fn reason(did: &str) -> String {
        match resolve_local(did) {
            Err(DidError::Malformed { reason, .. }) => reason,
            other => panic!("{did}: expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn unsupported_methods_are_named() {
        for (did, method) in [
            ("did:web:example.com", "web"),
            ("did:example:123456789abcdefghi", "example"),
            (
                "did:peer:4zQmd8CpeFPci817KDsbSAKWcXAE2mjvCQSasRewvbSF54Bd",
                "peer:4",
            ),
            (
                "did:peer:0z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK",
                "peer:0",
            ),
        ] {
            match resolve_local(did) {
                Err(DidError::UnsupportedMethod(m)) => assert_eq!(m, method),
                other => panic!("{did}: {other:?}"),
            }
        }
        let e = resolve_local("did:web:example.com").unwrap_err();
        assert_eq!(e.to_string(), "unsupported DID method `web`");
    }

    #[test]
    fn malformed_dids_say_why() {
        let ed = "z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK";
        assert!(reason("").contains("did:"));
        assert!(reason("did:key").contains("method-specific"));
        assert!(reason("did:KEY:abc").contains("lowercase"));
        assert!(reason(&format!("did:key:{ed}#{ed}")).contains("DID URL"));
        assert!(reason("did:key:x6Mkabc").contains("base58btc"));
        assert!(reason(&format!("did:key:m{}", &ed[1..])).contains("base58btc"));
        // 0, O, I and l are not in the base58 alphabet.
        assert!(reason("did:key:z6Mk0OIl").contains("base58"));
        assert!(reason("did:key:z").contains("too short"));
        assert!(reason(&format!("did:key:{ed}{ed}")).contains("too long"));
        assert!(reason(&format!("did:key:{}", "z".repeat(MAX_DID_LEN))).contains("longer"));
        assert!(reason("did:peer:x").contains("numalgo"));
    }

    #[test]
    fn wrong_multicodec_is_rejected() {
        // secp256k1 and P-256 did:keys from the did:key spec test vectors.
        let secp = reason("did:key:zQ3shokFTS3brHcDQrn82RUDfCZESWL1ZdCEJwekUDPQiYBme");
        assert!(
            secp.contains("unsupported multicodec") && secp.contains("0xe701"),
            "{secp}"
        );
        let p256 = reason("did:key:zDnaerx9CtbPJ1q36T5Ln5wYt3MQYeGRG5ehnPAmxcf5mDZpv");
        assert!(p256.contains("unsupported multicodec"), "{p256}");
    }

    #[test]
    fn truncated_and_invalid_keys_are_rejected() {
        let mut short = MULTICODEC_ED25519_PUB.to_vec();
        short.extend_from_slice(&[7; 31]);
        let short = multibase::encode(multibase::Base::Base58Btc, short);
        assert!(reason(&format!("did:key:{short}")).contains("32 bytes, found 31"));
        // Dropping the last base58 digit of a real key divides the whole
        // number by 58, so even the multicodec prefix no longer matches.
        let ed = "z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK";
        let cut = reason(&format!("did:key:{}", &ed[..ed.len() - 1]));
        assert!(cut.contains("multicodec"), "{cut}");
        // A small-order point (the identity) and a y with no curve point.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        let weak = multikey(MULTICODEC_ED25519_PUB, &identity);
        assert!(reason(&format!("did:key:{weak}")).contains("small order"));
        let invalid = (0u8..=255)
            .map(|b| [b; 32])
            .find(|k| VerifyingKey::from_bytes(k).is_err())
            .expect("some byte pattern is off the curve");
        let invalid = multikey(MULTICODEC_ED25519_PUB, &invalid);
        assert!(reason(&format!("did:key:{invalid}")).contains("not a valid curve point"));
        let zero = x25519_multikey(&[0; 32]);
        assert!(reason(&format!("did:key:{zero}")).contains("small order"));
        assert!(reason(&format!("did:peer:2.E{zero}")).contains("small order"));
    }

    #[test]
    fn bad_did_peer2_is_rejected() {
        let x = x25519_multikey(&[9; 32]);
        let ed = "z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK";
        assert!(reason("did:peer:2").contains("elements"));
        assert!(reason("did:peer:2.").contains("empty"));
        assert!(reason(&format!("did:peer:2.E{x}..V{ed}")).contains("empty"));
        assert!(reason(&format!("did:peer:2.X{x}")).contains("purpose code `X`"));
        assert!(reason(&format!("did:peer:2.E{ed}")).contains("not an X25519 key"));
        assert!(reason(&format!("did:peer:2.V{x}")).contains("not an Ed25519 key"));
        assert!(reason(&format!("did:peer:2.E{x}.S!!")).contains("base64url"));
        let not_json = URL_SAFE_NO_PAD.encode("nope");
        assert!(reason(&format!("did:peer:2.E{x}.S{not_json}")).contains("JSON"));
        let array = URL_SAFE_NO_PAD.encode("[1]");
        assert!(reason(&format!("did:peer:2.E{x}.S{array}")).contains("object"));
        // Only a service, or only an assertion key: nothing to authenticate with.
        let svc = URL_SAFE_NO_PAD.encode(r#"{"t":"dm","s":{"uri":"https://example.com"}}"#);
        for did in [format!("did:peer:2.S{svc}"), format!("did:peer:2.A{ed}")] {
            assert!(
                matches!(resolve_local(&did), Err(DidError::NoKey { .. })),
                "{did}"
            );
        }
    }

    #[test]
    fn errors_truncate_and_escape_the_did() {
        let did = format!("did:key:z\n{}", "1".repeat(500));
        let message = resolve_local(&did).unwrap_err().to_string();
        assert!(!message.contains('\n'));
        assert!(message.len() < 400, "{message}");
    }

    fn mutations() -> Vec<String> {
        let seeds = [
            "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK",
            SPEC_PEER2,
        ];
        let mut out = Vec::new();
        for s in seeds {
            for i in 0..s.len() {
                // Truncations, deletions and substitutions at every position.
                out.push(s[..i].to_owned());
                out.push(format!("{}{}", &s[..i], &s[i + 1..]));
                for c in ['.', 'z', '0', 'S', 'E', 'V', '#', 'é', '\0'] {
                    out.push(format!("{}{c}{}", &s[..i], &s[i + 1..]));
                }
            }
        }
        out
    }

    #[test]
    fn mutated_dids_never_panic() {
        for did in mutations() {
            let _ = resolve_local(&did);
        }
    }

    proptest! {
        #[test]
        fn resolve_local_never_panics(s in "\\PC*") {
            let _ = resolve_local(&s);
        }

        #[test]
        fn resolve_local_never_panics_on_did_shapes(
            s in "did:(key|peer|web):[0-9a-zA-Z._\\-]{0,120}",
        ) {
            let _ = resolve_local(&s);
        }

        #[test]
        fn resolve_local_never_panics_on_peer2_shapes(
            s in "did:peer:2(\\.[AEVIDSX.][1-9A-HJ-NP-Za-km-z_\\-]{0,60}){0,5}",
        ) {
            let _ = resolve_local(&s);
        }

        #[test]
        fn resolve_local_never_panics_on_services(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let x = x25519_multikey(&[9; 32]);
            let _ = resolve_local(&format!("did:peer:2.E{x}.S{}", URL_SAFE_NO_PAD.encode(&bytes)));
        }
    }

    // ---- resolver and cache ---------------------------------------------

    #[test]
    fn resolver_caches_with_lru_eviction() {
        let resolver = LocalResolver::new(2);
        let [a, b, c] = [(); 3].map(|_| Identity::generate(DidMethod::Key).did);
        resolver.resolve_checked(&a).unwrap(); // miss
        resolver.resolve_checked(&b).unwrap(); // miss
        resolver.resolve_checked(&a).unwrap(); // hit; b is now least recent
        resolver.resolve_checked(&c).unwrap(); // miss; evicts b
        assert_eq!(resolver.cache_stats(), (1, 3));
        assert_eq!(resolver.cache_len(), 2);
        resolver.resolve_checked(&a).unwrap(); // hit
        resolver.resolve_checked(&b).unwrap(); // miss (evicted)
        assert_eq!(resolver.cache_stats(), (2, 4));
        assert_eq!(resolver.cache_len(), 2);
        assert!(resolver.resolve_checked("did:web:example.com").is_err());
        assert_eq!(resolver.cache_stats(), (2, 5));
        assert_eq!(resolver.cache_len(), 2);
    }

    #[test]
    fn resolver_with_zero_capacity_does_not_cache() {
        let resolver = LocalResolver::new(0);
        let did = Identity::generate(DidMethod::Peer).did;
        resolver.resolve_checked(&did).unwrap();
        resolver.resolve_checked(&did).unwrap();
        assert_eq!(resolver.cache_stats(), (0, 2));
        assert_eq!(resolver.cache_len(), 0);
    }

    #[test]
    fn signer_keys_are_parsed_once_and_the_caches_stay_bounded() {
        let resolver = LocalResolver::with_capacities(1, 4);
        let ids: Vec<Identity> = (0..12)
            .map(|i| {
                Identity::generate(if i % 2 == 0 {
                    DidMethod::Key
                } else {
                    DidMethod::Peer
                })
            })
            .collect();
        for round in 0..3 {
            for id in &ids {
                let key = resolver.signing_key(&id.signing_kid()).unwrap();
                assert_eq!(
                    URL_SAFE_NO_PAD.encode(key.as_bytes()),
                    resolve_local(&id.did).unwrap().verification_method[..]
                        .iter()
                        .find(|vm| vm.id == id.signing_kid())
                        .map(|vm| match &vm.verification_material {
                            VerificationMaterial::JWK { public_key_jwk } => {
                                public_key_jwk["x"].as_str().unwrap().to_string()
                            }
                            _ => panic!("JWK expected"),
                        })
                        .unwrap(),
                    "round {round}"
                );
                // Only authentication keys: not the key-agreement key, not a bare DID.
                assert!(resolver.signing_key(&id.agreement_kid()).is_none());
                assert!(resolver.signing_key(&id.did).is_none());
            }
            assert!(resolver.cache_len() <= 1);
            assert!(resolver.key_cache_stats().2 <= 4);
        }
        let (hits, misses, _) = resolver.key_cache_stats();
        assert_eq!(hits + misses, 3 * 12 * 3);
        // Twelve keys cycling through a cache of four are evicted and parsed again (a miss), but
        // a key looked up twice in a row is a hit.
        let one = ids[0].signing_kid();
        resolver.signing_key(&one).unwrap();
        let before = resolver.key_cache_stats().0;
        resolver.signing_key(&one).unwrap();
        assert_eq!(resolver.key_cache_stats().0, before + 1);
    }

    #[tokio::test]
    async fn resolver_trait_maps_errors_to_none_and_serves_statics() {
        let mut doc =
            resolve_local("did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK").unwrap();
        doc.id = "did:web:hub.example".to_owned();
        let resolver = LocalResolver::new(8).with_static_doc(doc);
        let dr: &dyn DIDResolver = &resolver;
        assert!(dr.resolve("did:web:other.example").await.unwrap().is_none());
        assert!(dr.resolve("did:key:zzz").await.unwrap().is_none());
        let found = dr.resolve("did:web:hub.example").await.unwrap().unwrap();
        assert_eq!(found.id, "did:web:hub.example");
        assert!(matches!(
            resolver.resolve_checked("did:peer:2"),
            Err(DidError::Malformed { .. })
        ));
    }

    #[test]
    fn resolver_and_secrets_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<LocalResolver>();
        assert_send_sync::<StaticSecrets>();
        assert_send_sync::<Identity>();
    }

    // ---- didcomm end to end ---------------------------------------------

    fn message(from: &Identity, to: &Identity) -> Message {
        Message::build(
            "1234".to_owned(),
            "https://example.com/protocols/telemetry/1.0/reading".to_owned(),
            json!({"temperature": 21.5}),
        )
        .from(from.did.clone())
        .to(to.did.clone())
        .finalize()
    }

    async fn round_trips(device: &Identity, hub: &Identity) {
        let resolver = LocalResolver::new(16);
        let device_secrets = StaticSecrets::new(std::slice::from_ref(device));
        let hub_secrets = StaticSecrets::new(std::slice::from_ref(hub));
        let no_forward = PackEncryptedOptions {
            forward: false,
            ..PackEncryptedOptions::default()
        };
        let msg = message(device, hub);

        // Signed (JWS): non-repudiable.
        let (signed, meta) = msg
            .pack_signed(&device.did, &resolver, &device_secrets)
            .await
            .unwrap();
        assert_eq!(meta.sign_by_kid, device.signing_kid());
        let (got, meta) =
            Message::unpack(&signed, &resolver, &hub_secrets, &UnpackOptions::default())
                .await
                .unwrap();
        assert_eq!(got.body, msg.body);
        assert!(meta.authenticated && meta.non_repudiation && !meta.encrypted);
        assert_eq!(meta.sign_from, Some(device.signing_kid()));

        // Authcrypt (ECDH-1PU): authenticated, repudiable.
        let (packed, meta) = msg
            .pack_encrypted(
                &hub.did,
                Some(&device.did),
                None,
                &resolver,
                &device_secrets,
                &no_forward,
            )
            .await
            .unwrap();
        assert_eq!(meta.from_kid, Some(device.agreement_kid()));
        assert_eq!(meta.to_kids, vec![hub.agreement_kid()]);
        let (got, meta) =
            Message::unpack(&packed, &resolver, &hub_secrets, &UnpackOptions::default())
                .await
                .unwrap();
        assert_eq!(got.body, msg.body);
        assert!(meta.encrypted && meta.authenticated && !meta.non_repudiation);
        assert_eq!(meta.encrypted_from_kid, Some(device.agreement_kid()));
        assert_eq!(meta.encrypted_to_kids, Some(vec![hub.agreement_kid()]));
        assert_eq!(meta.sign_from, None);

        // Authcrypt + signature: both.
        let (packed, _) = msg
            .pack_encrypted(
                &hub.did,
                Some(&device.did),
                Some(&device.did),
                &resolver,
                &device_secrets,
                &no_forward,
            )
            .await
            .unwrap();
        let (_, meta) =
            Message::unpack(&packed, &resolver, &hub_secrets, &UnpackOptions::default())
                .await
                .unwrap();
        assert!(meta.authenticated && meta.non_repudiation);
        assert_eq!(meta.sign_from, Some(device.signing_kid()));

        // Anoncrypt (ECDH-ES): encrypted but not authenticated.
        let anon = Message::build(
            "5678".to_owned(),
            "https://example.com/protocols/telemetry/1.0/reading".to_owned(),
            json!({"temperature": 22}),
        )
        .to(hub.did.clone())
        .finalize();
        let (packed, meta) = anon
            .pack_encrypted(
                &hub.did,
                None,
                None,
                &resolver,
                &device_secrets,
                &no_forward,
            )
            .await
            .unwrap();
        assert_eq!(meta.from_kid, None);
        let (got, meta) =
            Message::unpack(&packed, &resolver, &hub_secrets, &UnpackOptions::default())
                .await
                .unwrap();
        assert_eq!(got.body, anon.body);
        assert!(meta.encrypted && !meta.authenticated && !meta.non_repudiation);
        assert_eq!(meta.encrypted_from_kid, None);

        // The hub cannot decrypt with the wrong keys.
        let stranger = StaticSecrets::new(&[Identity::generate(DidMethod::Key)]);
        assert!(
            Message::unpack(&packed, &resolver, &stranger, &UnpackOptions::default())
                .await
                .is_err()
        );
        let (hits, misses) = resolver.cache_stats();
        assert!(hits > 0 && misses <= 2, "({hits}, {misses})");
    }

    #[tokio::test]
    async fn didcomm_round_trip_did_key() {
        round_trips(
            &Identity::generate(DidMethod::Key),
            &Identity::generate(DidMethod::Key),
        )
        .await;
    }

    #[tokio::test]
    async fn didcomm_round_trip_did_peer2() {
        round_trips(
            &Identity::generate(DidMethod::Peer),
            &Identity::generate(DidMethod::Peer),
        )
        .await;
    }

    #[tokio::test]
    async fn didcomm_round_trip_mixed_methods() {
        round_trips(
            &Identity::generate(DidMethod::Key),
            &Identity::generate(DidMethod::Peer),
        )
        .await;
        round_trips(
            &Identity::generate(DidMethod::Peer),
            &Identity::generate(DidMethod::Key),
        )
        .await;
    }

    #[tokio::test]
    async fn didcomm_futures_are_send() {
        fn assert_send<T: Send>(t: T) -> T {
            t
        }
        let id = Identity::generate(DidMethod::Key);
        let resolver = LocalResolver::new(4);
        let secrets = StaticSecrets::new(std::slice::from_ref(&id));
        let msg = message(&id, &id);
        let signed = tokio::spawn(async move {
            assert_send(msg.pack_signed(&id.did, &resolver, &secrets))
                .await
                .map(|(s, _)| s)
        });
        assert!(signed.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn static_secrets_lookups() {
        let a = Identity::generate(DidMethod::Key);
        let b = Identity::generate(DidMethod::Peer);
        let secrets = StaticSecrets::new(&[a.clone(), b.clone()]);
        assert_eq!(secrets.kids().count(), 4);
        let sa = a.signing_kid();
        let sb = b.agreement_kid();
        let wanted = [sa.as_str(), "did:key:nope#x", sb.as_str()];
        let found = secrets.find_secrets(&wanted).await.unwrap();
        assert_eq!(found, vec![sa.as_str(), sb.as_str()]);
        assert_eq!(secrets.get_secret(&sa).await.unwrap().unwrap().id, sa);
        assert!(secrets.get_secret(&a.did).await.unwrap().is_none());
        assert!(!format!("{secrets:?}").contains("\"d\""));
    }

    // ---- identity files -------------------------------------------------

    fn d_values(id: &Identity) -> Vec<String> {
        id.secrets
            .iter()
            .map(|s| secret_jwk(s).unwrap()["d"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn identity_save_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        for method in [DidMethod::Key, DidMethod::Peer] {
            let id = Identity::generate(method);
            let path = dir.path().join(format!("{method}.json"));
            id.save(&path).unwrap();
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, 0o600);
            let (loaded, mode) = Identity::load_with_mode(&path).unwrap();
            assert_eq!(mode, 0o600);
            assert_eq!(loaded.did, id.did);
            assert_eq!(loaded.method, method);
            assert_eq!(
                serde_json::to_value(&loaded.secrets).unwrap(),
                serde_json::to_value(&id.secrets).unwrap()
            );
            // The documented file layout.
            let raw: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
            assert_eq!(raw["method"], method.to_string());
            assert_eq!(raw["secrets"][0]["type"], "JsonWebKey2020");
            assert_eq!(raw["secrets"][0]["privateKeyJwk"]["kty"], "OKP");
            // Saving again replaces the file atomically and leaves no temp file.
            loaded.save(&path).unwrap();
            Identity::load(&path).unwrap();
        }
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn identity_save_tightens_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.json");
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        Identity::generate(DidMethod::Key).save(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn identity_load_reports_wide_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.json");
        Identity::generate(DidMethod::Peer).save(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let (_, mode) = Identity::load_with_mode(&path).unwrap();
        assert_eq!(mode, 0o640);
        Identity::load(&path).unwrap(); // warns, still loads
    }

    #[test]
    fn identity_debug_hides_secrets() {
        for method in [DidMethod::Key, DidMethod::Peer] {
            let id = Identity::generate(method);
            let debug = format!("{id:?}");
            assert!(debug.contains(&id.did));
            for d in d_values(&id) {
                assert!(!debug.contains(&d));
            }
            let pretty = format!("{id:#?}");
            assert!(!pretty.contains("privateKeyJwk") && !pretty.contains("secret"));
        }
    }

    #[test]
    fn identity_load_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.json");
        let e = Identity::load(&missing).unwrap_err();
        assert!(matches!(e, DidError::Io { .. }));
        assert!(e.to_string().contains("missing.json"), "{e}");

        let garbage = dir.path().join("garbage.json");
        fs::write(&garbage, "{not json").unwrap();
        let e = Identity::load(&garbage).unwrap_err();
        assert!(matches!(e, DidError::InvalidIdentity { .. }));
        assert!(e.to_string().contains("garbage.json"), "{e}");

        let e = Identity::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn identity_load_rejects_inconsistent_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.json");
        let check = |id: &Identity, expect: &str| {
            id.save(&path).unwrap();
            let e = Identity::load(&path).unwrap_err().to_string();
            assert!(e.contains(expect), "{e}");
            for d in d_values(id) {
                assert!(!e.contains(&d), "error leaks a secret: {e}");
            }
        };
        let a = Identity::generate(DidMethod::Key);
        let b = Identity::generate(DidMethod::Key);

        // Secrets of another DID under this DID's key ids.
        let mut swapped = a.clone();
        for (s, other) in swapped.secrets.iter_mut().zip(&b.secrets) {
            s.secret_material = other.secret_material.clone();
        }
        check(&swapped, "does not match");

        let mut wrong_method = a.clone();
        wrong_method.method = DidMethod::Peer;
        check(&wrong_method, "method `peer`");

        let mut no_agreement = a.clone();
        no_agreement.secrets.truncate(1);
        check(&no_agreement, "key-agreement");

        let mut foreign = a.clone();
        foreign.secrets.push(b.secrets[0].clone());
        check(&foreign, "not a key of the DID");

        let mut bad_did = a.clone();
        bad_did.did = "did:web:example.com".to_owned();
        check(&bad_did, "unsupported DID method");
    }
}
