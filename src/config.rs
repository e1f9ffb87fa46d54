//! `hub.toml`: typed, strict (`deny_unknown_fields`), validated before anything connects.
//!
//! Every key has a default so that a minimal file works; `HUB__SECTION__KEY` environment
//! variables override file values. Secrets live in [`Secret`], whose `Debug` prints `***`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::tokio_rustls::rustls;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;

use crate::did::DidMethod;
use crate::mapping::{TimestampFormat, TopicPattern};

/// The exit code for a configuration error (sysexits EX_CONFIG); systemd's
/// `RestartPreventExitStatus=78` stops a restart loop on it.
pub const EX_CONFIG: i32 = 78;

/// The shipped, fully commented configuration.
pub const SHIPPED_HUB_TOML: &str = include_str!("../hub.toml");

/// A configuration problem: names the key and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed, or a key is unknown or of the wrong type.
    #[error("{path}: {message}")]
    Load {
        /// The config file.
        path: String,
        /// What the parser said.
        message: String,
    },
    /// A value parsed but makes no sense.
    #[error("{key}: {message}")]
    Invalid {
        /// The dotted key, e.g. `routes[0].topics`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// A secret string (token, password): never printed, not even by `Debug`.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself; call only where it is sent, never where it is logged.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Whether the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Wraps a string.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the hub keeps its identity and its SQLite store.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The hub's identity.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// The MQTT connection the hub subscribes on.
    #[serde(default)]
    pub mqtt: MqttConfig,
    /// The embedded MQTT broker.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// Where points go.
    #[serde(default)]
    pub store: StoreConfig,
    /// The local outbox that holds points until InfluxDB accepts them.
    #[serde(default)]
    pub outbox: OutboxConfig,
    /// How often the hub writes its own counters as `didhub_stats` points (0s = never).
    #[serde(default = "default_stats_interval", with = "humantime_serde")]
    pub stats_interval: Duration,
    /// Limits applied to every message.
    #[serde(default)]
    pub limits: Limits,
    /// Verification workers and batching.
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// Problem reports.
    #[serde(default)]
    pub reports: ReportsConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// The HTTP listener for `/metrics`, `/healthz` and `/readyz`.
    #[serde(default)]
    pub http: HttpConfig,
    /// Routes: which topics, which trust, how to map.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// The device registry.
    #[serde(default)]
    pub devices: Vec<Device>,
}

fn default_stats_interval() -> Duration {
    Duration::from_secs(10)
}

/// `[outbox]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// Disk budget of points waiting for InfluxDB; at the budget the hub stops acknowledging
    /// (the broker holds the backlog) until the shipper drains it.
    #[serde(default = "default_outbox_max_bytes")]
    pub max_bytes: u64,
}

fn default_outbox_max_bytes() -> u64 {
    1 << 30
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            max_bytes: default_outbox_max_bytes(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("state")
}

/// `[identity]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// DID method of the identity created on first start.
    #[serde(default = "default_method")]
    pub method: DidMethod,
}

fn default_method() -> DidMethod {
    DidMethod::Key
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            method: default_method(),
        }
    }
}

/// `[mqtt]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// `mqtt://host:port`, or `mqtts://host:port` for TLS (see `tls`).
    #[serde(default = "default_mqtt_url")]
    pub url: String,
    /// `v3.1.1` or `v5` (MQTT 5 adds the Response Topic and session expiry).
    #[serde(default)]
    pub protocol: MqttProtocol,
    /// MQTT 5: how long the broker keeps the hub's session after a disconnect.
    #[serde(default = "default_session_expiry", with = "humantime_serde")]
    pub session_expiry: Duration,
    /// `[mqtt.tls]`: CA, client certificate and server name for `mqtts://` URLs.
    #[serde(default)]
    pub tls: TlsConfig,
    /// Stable client id: the broker keeps the hub's session under it.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// Username, if the broker wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// Password (prefer `password_file`).
    #[serde(default)]
    pub password: Option<Secret>,
    /// File holding the password (first line).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Keep-alive interval.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// `false` keeps a persistent session so unacknowledged messages are redelivered.
    #[serde(default)]
    pub clean_session: bool,
    /// Outgoing in-flight window for reports.
    #[serde(default = "default_inflight")]
    pub inflight: u16,
    /// First reconnect delay.
    #[serde(default = "default_backoff_min", with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
}

fn default_mqtt_url() -> String {
    "mqtt://127.0.0.1:1883".into()
}
fn default_client_id() -> String {
    "didhub".into()
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_session_expiry() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_inflight() -> u16 {
    100
}
fn default_backoff_min() -> Duration {
    Duration::from_millis(200)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(30)
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            url: default_mqtt_url(),
            protocol: MqttProtocol::default(),
            session_expiry: default_session_expiry(),
            tls: TlsConfig::default(),
            client_id: default_client_id(),
            username: None,
            password: None,
            password_file: None,
            keep_alive: default_keep_alive(),
            clean_session: false,
            inflight: default_inflight(),
            reconnect_min: default_backoff_min(),
            reconnect_max: default_backoff_max(),
        }
    }
}

/// The MQTT protocol version the hub speaks.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum MqttProtocol {
    /// MQTT 3.1.1.
    #[default]
    #[serde(rename = "v3.1.1")]
    V311,
    /// MQTT 5.
    #[serde(rename = "v5")]
    V5,
}

/// `[mqtt.tls]`: used with `mqtts://` URLs.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM bundle of the CAs that may sign the broker's certificate (default: the system's).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) for brokers that require one (mTLS).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The name the broker's certificate must carry, when it is not the URL's host.
    #[serde(default)]
    pub server_name: Option<String>,
}

impl TlsConfig {
    /// Whether any key is set.
    pub fn is_set(&self) -> bool {
        *self != TlsConfig::default()
    }

    /// Reads and checks the files and builds the rustls client configuration; errors name the
    /// key (`prefix` + `.ca_file`, …) and the path.
    pub fn client_config(&self, prefix: &str) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
        self.client_config_named(&|k| format!("{prefix}.{k}"))
    }

    /// Like [`client_config`](Self::client_config), with errors naming the setting `key(name)`
    /// (command-line flags, say).
    pub fn client_config_named(
        &self,
        key: &dyn Fn(&str) -> String,
    ) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                let certs = read_pem_certs(path, &key("ca_file"))?;
                let (_, bad) = roots.add_parsable_certificates(certs);
                if roots.is_empty() {
                    return Err(invalid(
                        key("ca_file"),
                        format!(
                            "{}: none of its {bad} certificate(s) is a usable CA certificate",
                            path.display()
                        ),
                    ));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    return Err(invalid(
                        key("ca_file"),
                        "not set, and no system CA certificates were found (Debian package \
                         `ca-certificates`): set it to the PEM file of the CA that signed the \
                         broker's certificate",
                    ));
                }
            }
        }
        let server_name = match &self.server_name {
            None => None,
            Some(name) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|_| {
                        invalid(
                            key("server_name"),
                            format!("`{name}` is not a DNS name or an IP address"),
                        )
                    })?
                    .to_owned(),
            ),
        };
        let roots = Arc::new(roots);
        let builder = match server_name {
            None => rustls::ClientConfig::builder().with_root_certificates(roots),
            Some(name) => {
                let inner = rustls::client::WebPkiServerVerifier::builder(roots)
                    .build()
                    .map_err(|e| invalid(key("ca_file"), e.to_string()))?;
                rustls::ClientConfig::builder()
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(FixedServerName { inner, name }))
            }
        };
        let config = match (&self.cert_file, &self.key_file) {
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) => {
                return Err(invalid(
                    key("key_file"),
                    format!(
                        "{} is set but {} is not: a client certificate needs its private key",
                        key("cert_file"),
                        key("key_file")
                    ),
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    key("cert_file"),
                    format!(
                        "{} is set but {} is not: a private key needs its client certificate",
                        key("key_file"),
                        key("cert_file")
                    ),
                ))
            }
            (Some(cert), Some(pkey)) => {
                let chain = read_pem_certs(cert, &key("cert_file"))?;
                let private = read_pem_key(pkey, &key("key_file"))?;
                builder.with_client_auth_cert(chain, private).map_err(|e| {
                    invalid(
                        key("key_file"),
                        format!("{} does not fit {}: {e}", pkey.display(), cert.display()),
                    )
                })?
            }
        };
        Ok(Arc::new(config))
    }
}

fn read_pem(path: &Path, key: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| {
        invalid(
            key,
            format!(
                "cannot read {}: {e}; check the path and its permissions",
                path.display()
            ),
        )
    })
}

fn read_pem_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let bytes = read_pem(path, key)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(key, format!("{} is not valid PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(
            key,
            format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

fn read_pem_key(path: &Path, key: &str) -> Result<PrivateKeyDer<'static>, ConfigError> {
    let bytes = read_pem(path, key)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        invalid(
            key,
            format!(
                "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}",
                path.display()
            ),
        )
    })
}

/// Checks the broker's certificate against `server_name` instead of the URL's host (a broker
/// reached by IP address or through a tunnel whose certificate names its DNS name).
#[derive(Debug)]
struct FixedServerName {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl rustls::client::danger::ServerCertVerifier for FixedServerName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

impl MqttConfig {
    /// Host and port of `url`.
    pub fn host_port(&self) -> Result<(String, u16), ConfigError> {
        self.broker_url().map(|u| (u.host, u.port))
    }

    /// `url`, parsed.
    pub fn broker_url(&self) -> Result<BrokerUrl, ConfigError> {
        parse_broker_url(&self.url).map_err(|m| invalid("mqtt.url", m))
    }

    /// The password from `password` or `password_file`.
    pub fn resolved_password(&self) -> Result<Option<Secret>, ConfigError> {
        if let Some(p) = &self.password {
            return Ok(Some(p.clone()));
        }
        match &self.password_file {
            None => Ok(None),
            Some(path) => read_secret_file(path, "mqtt.password_file").map(Some),
        }
    }

    /// The rustls configuration for an `mqtts://` URL (reads the `[mqtt.tls]` files), `None`
    /// for `mqtt://`.
    pub fn tls_client_config(&self) -> Result<Option<Arc<rustls::ClientConfig>>, ConfigError> {
        if self.broker_url()?.tls {
            self.tls.client_config("mqtt.tls").map(Some)
        } else {
            Ok(None)
        }
    }
}

/// A parsed broker URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// `mqtts://`: TLS.
    pub tls: bool,
}

/// Parses `mqtt://host:port` (port defaults to 1883).
pub fn parse_mqtt_url(url: &str) -> Result<(String, u16), String> {
    parse_broker_url(url).map(|u| (u.host, u.port))
}

/// Parses `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` (TLS, default
/// port 8883).
pub fn parse_broker_url(url: &str) -> Result<BrokerUrl, String> {
    let (rest, tls) = if let Some(r) = url
        .strip_prefix("mqtts://")
        .or_else(|| url.strip_prefix("ssl://"))
    {
        (r, true)
    } else if let Some(r) = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
    {
        (r, false)
    } else {
        return Err(format!(
            "`{url}` is not an MQTT URL: write it as mqtt://host:port, or mqtts://host:port for TLS"
        ));
    };
    let rest = rest.trim_end_matches('/');
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("`{p}` in `{url}` is not a port number"))?,
        ),
        None => (rest, default_port),
    };
    if host.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    Ok(BrokerUrl {
        host: host.to_string(),
        port,
        tls,
    })
}

/// Reads the first line of a secret file (password, token); errors name `key` and the path.
pub fn read_secret_file(path: &Path, key: &str) -> Result<Secret, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        invalid(
            key,
            format!(
                "cannot read {}: {e}; check the path and its permissions",
                path.display()
            ),
        )
    })?;
    let line = text.lines().next().unwrap_or("").trim().to_string();
    if line.is_empty() {
        return Err(invalid(key, format!("{} is empty", path.display())));
    }
    Ok(Secret(line))
}

/// `[broker]`: the embedded broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// Start the embedded broker (needs the `embedded-broker` feature).
    #[serde(default)]
    pub embedded: bool,
    /// Where it listens; loopback only by default.
    #[serde(default = "default_broker_listen")]
    pub listen: std::net::SocketAddr,
}

fn default_broker_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 1883))
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            embedded: false,
            listen: default_broker_listen(),
        }
    }
}

/// Which store the points go to.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// The committed rows in `state_dir/didhub.db` are the store.
    Embedded,
    /// Committed points are shipped to InfluxDB's `/api/v2/write`.
    Influxdb,
}

impl StoreKind {
    /// Where committed points go for this kind of store.
    pub fn sink(self) -> crate::store::Sink {
        match self {
            StoreKind::Embedded => crate::store::Sink::Embedded,
            StoreKind::Influxdb => crate::store::Sink::Outbox,
        }
    }
}

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `embedded` or `influxdb`.
    #[serde(default = "default_store_kind")]
    pub kind: StoreKind,
    /// Keep replay-window entries this long.
    #[serde(default = "default_replay_window", with = "humantime_serde")]
    pub replay_window: Duration,
    /// Most messages committed in one transaction.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// `[store.influxdb]`
    #[serde(default)]
    pub influxdb: Option<InfluxConfig>,
}

fn default_store_kind() -> StoreKind {
    StoreKind::Embedded
}
fn default_replay_window() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_max_batch() -> usize {
    1024
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            kind: default_store_kind(),
            replay_window: default_replay_window(),
            max_batch: default_max_batch(),
            influxdb: None,
        }
    }
}

/// `[store.influxdb]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InfluxConfig {
    /// Base URL, e.g. `http://127.0.0.1:8086`.
    pub url: String,
    /// Organization name.
    #[serde(default)]
    pub organization: String,
    /// Bucket name.
    #[serde(default)]
    pub bucket: String,
    /// API token (prefer `token_file`).
    #[serde(default)]
    pub token: Option<Secret>,
    /// File holding the token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Most lines per write request.
    #[serde(default = "default_ship_batch")]
    pub batch_size: usize,
    /// First retry delay after a failed write.
    #[serde(default = "default_ship_backoff_min", with = "humantime_serde")]
    pub retry_min: Duration,
    /// Longest retry delay.
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// How write request bodies are encoded: `gzip` (default) or `identity`.
    #[serde(default)]
    pub content_encoding: ContentEncoding,
    /// Most write requests on the wire at once (each its own batch and connection).
    #[serde(default = "default_ship_in_flight")]
    pub requests_in_flight: usize,
}

/// `store.influxdb.content_encoding`: the `Content-Encoding` of write requests.
///
/// gzip is the default, as in Telegraf's `influxdb_v2` output: line protocol shrinks about
/// tenfold, and InfluxDB and VictoriaMetrics both accept it.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(try_from = "String")]
pub enum ContentEncoding {
    /// Compressed with gzip at a fast level.
    #[default]
    Gzip,
    /// Sent as it is.
    Identity,
}

impl ContentEncoding {
    /// The name used in `hub.toml` and in the `Content-Encoding` header.
    pub fn as_str(self) -> &'static str {
        match self {
            ContentEncoding::Gzip => "gzip",
            ContentEncoding::Identity => "identity",
        }
    }
}

// Through a string, so that a bad value is named with the choices (a plain enum only says
// "does not have variant constructor").
impl TryFrom<String> for ContentEncoding {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "gzip" => Ok(ContentEncoding::Gzip),
            "identity" => Ok(ContentEncoding::Identity),
            _ => Err(format!("`{s}` is not `gzip` or `identity`")),
        }
    }
}

fn default_ship_batch() -> usize {
    5000
}
fn default_ship_in_flight() -> usize {
    2
}
fn default_ship_backoff_min() -> Duration {
    Duration::from_millis(500)
}

impl InfluxConfig {
    /// The token from `token` or `token_file` (empty when neither is set).
    pub fn resolved_token(&self) -> Result<Secret, ConfigError> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        match &self.token_file {
            Some(p) => read_secret_file(p, "store.influxdb.token_file"),
            None => Ok(Secret::default()),
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest accepted message, in bytes.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Deepest accepted payload nesting.
    #[serde(default = "default_max_depth")]
    pub max_json_depth: usize,
    /// Most fields one point may have.
    #[serde(default = "default_max_fields")]
    pub max_fields: usize,
    /// How far in the future `created_time` may be.
    #[serde(default = "default_skew", with = "humantime_serde")]
    pub clock_skew: Duration,
    /// DID documents kept resolved (LRU; 0 = none). Authcrypt and a device's first signed post
    /// need the document; a few KiB each.
    #[serde(default = "default_did_document_cache")]
    pub did_document_cache: usize,
    /// Parsed device keys kept, per kind (Ed25519 signing keys for the signed fast path; X25519
    /// agreement keys and the hub's static agreements with them for the authcrypt fast path);
    /// a few hundred bytes each.
    #[serde(default = "default_signer_key_cache")]
    pub signer_key_cache: usize,
}

fn default_max_message_bytes() -> usize {
    64 * 1024
}
fn default_max_depth() -> usize {
    16
}
fn default_max_fields() -> usize {
    256
}
fn default_skew() -> Duration {
    Duration::from_secs(300)
}
fn default_did_document_cache() -> usize {
    4096
}
fn default_signer_key_cache() -> usize {
    131_072
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: default_max_message_bytes(),
            max_json_depth: default_max_depth(),
            max_fields: default_max_fields(),
            clock_skew: default_skew(),
            did_document_cache: default_did_document_cache(),
            signer_key_cache: default_signer_key_cache(),
        }
    }
}

/// `[pipeline]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Verification threads; 0 means one per core.
    #[serde(default)]
    pub workers: usize,
    /// Messages buffered between stages.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// How long a stop may take before the hub exits anyway.
    #[serde(default = "default_shutdown", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Check the Ed25519 signatures of messages verified together in one batch
    /// (`Verifier::verify_many`); `false`: each alone.
    #[serde(default = "default_batch_verify")]
    pub batch_verify: bool,
    /// With `batch_verify`, at rates where a few signed messages arrive within this time, a
    /// verify worker waits up to this long for them to make a batch (`pipeline::Gather`);
    /// `0s`: never waits.
    #[serde(default = "default_verify_linger", with = "humantime_serde")]
    pub verify_linger: Duration,
}

fn default_batch_verify() -> bool {
    true
}
fn default_verify_linger() -> Duration {
    Duration::from_millis(1)
}
fn default_queue() -> usize {
    1024
}
fn default_shutdown() -> Duration {
    Duration::from_secs(10)
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            workers: 0,
            queue: default_queue(),
            shutdown_timeout: default_shutdown(),
            batch_verify: default_batch_verify(),
            verify_linger: default_verify_linger(),
        }
    }
}

/// `[reports]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportsConfig {
    /// Send problem reports at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Reports per second per sender (token bucket refill).
    #[serde(default = "default_per_sender_rate")]
    pub per_sender_per_second: f64,
    /// Burst per sender.
    #[serde(default = "default_per_sender_burst")]
    pub per_sender_burst: f64,
    /// Reports per second across all senders.
    #[serde(default = "default_global_rate")]
    pub global_per_second: f64,
    /// Global burst.
    #[serde(default = "default_global_burst")]
    pub global_burst: f64,
    /// Answer bytes that cannot be parsed at all (no sender, no id) with a report.
    #[serde(default = "yes")]
    pub report_unparseable: bool,
    /// `escalate_to` put in every report body, e.g. `mailto:ops@example.com`.
    #[serde(default)]
    pub escalate_to: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_per_sender_rate() -> f64 {
    1.0
}
fn default_per_sender_burst() -> f64 {
    10.0
}
fn default_global_rate() -> f64 {
    100.0
}
fn default_global_burst() -> f64 {
    200.0
}

impl Default for ReportsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            per_sender_per_second: default_per_sender_rate(),
            per_sender_burst: default_per_sender_burst(),
            global_per_second: default_global_rate(),
            global_burst: default_global_burst(),
            report_unparseable: true,
            escalate_to: None,
        }
    }
}

/// `[http]`: metrics and health.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// `ip:port` of the listener; an empty string turns it off.
    #[serde(default = "default_http_listen")]
    pub listen: String,
}

fn default_http_listen() -> String {
    "127.0.0.1:9184".into()
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_http_listen(),
        }
    }
}

impl HttpConfig {
    /// The address to listen on, `None` when off.
    pub fn addr(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        let listen = self.listen.trim();
        if listen.is_empty() {
            return Ok(None);
        }
        listen.parse().map(Some).map_err(|_| {
            invalid(
                "http.listen",
                format!(
                    "`{listen}` is not ip:port, e.g. \"127.0.0.1:9184\" (or \"\" to turn the listener off)"
                ),
            )
        })
    }
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    #[serde(default = "default_log_format")]
    pub format: String,
    /// Filter when `RUST_LOG` is unset.
    #[serde(default = "default_log_level")]
    pub level: String,
}

fn default_log_format() -> String {
    "text".into()
}
fn default_log_level() -> String {
    "info".into()
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

/// The trust a route requires.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Require {
    /// A JWS by the `from` DID.
    Signed,
    /// Sender-authenticated encryption.
    Authcrypt,
    /// Either one.
    Authenticated,
    /// Anything, plaintext included (trusted networks only).
    Any,
}

/// Which verified senders a route accepts.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Senders {
    /// Only DIDs listed in `[[devices]]`.
    Registry,
    /// Any DID whose signature or authcrypt verified.
    AnyVerified,
}

/// `[[routes]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// A name for logs; defaults to `route-N`.
    #[serde(default)]
    pub name: Option<String>,
    /// MQTT filters (`+`, `#`).
    pub topics: Vec<String>,
    /// Subscription QoS (0 or 1).
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Required trust.
    #[serde(default = "default_require")]
    pub require: Require,
    /// Allowed senders.
    #[serde(default = "default_senders")]
    pub senders: Senders,
    /// Measurement name of the points.
    #[serde(default = "default_measurement")]
    pub measurement: String,
    /// Topic parsing into tags: a pattern like `devices/+device/telemetry`.
    #[serde(default)]
    pub topic_tags: Option<String>,
    /// Payload path (dot-separated) of the point timestamp.
    #[serde(default)]
    pub timestamp: Option<String>,
    /// `auto`, `rfc3339`, `unix`, `unix_ms`, `unix_us`, `unix_ns`.
    #[serde(default)]
    pub timestamp_format: TimestampFormat,
    /// Where reports go when the publish had no Response Topic: `{topic}`, `{did}` placeholders.
    #[serde(default = "default_report_topic")]
    pub report_topic: String,
}

fn default_qos() -> u8 {
    1
}
fn default_require() -> Require {
    Require::Authenticated
}
fn default_senders() -> Senders {
    Senders::AnyVerified
}
fn default_measurement() -> String {
    "post".into()
}
fn default_report_topic() -> String {
    "{topic}/problem-report".into()
}

impl Route {
    /// The route's name for logs.
    pub fn display_name(&self, index: usize) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("route-{index}"))
    }
}

/// `[[devices]]`: the registry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    /// The device DID.
    pub did: String,
    /// A human name, added as tag `device_name`.
    #[serde(default)]
    pub name: Option<String>,
    /// Extra tags on every point of this device.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

impl Config {
    /// Reads `path`, applies `HUB__…` overrides from `env`, and validates.
    pub fn load(path: &Path, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Load {
            path: path.display().to_string(),
            message: format!("cannot read: {e}; pass --config PATH or create hub.toml"),
        })?;
        Self::from_toml(&text, &path.display().to_string(), env)
    }

    /// Parses TOML text plus overrides; `origin` names the source in errors.
    pub fn from_toml(
        text: &str,
        origin: &str,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let env_map: std::collections::HashMap<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with("HUB__"))
            .cloned()
            .collect();
        let built = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("HUB")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env_map)),
            )
            .build()
            .map_err(|e| ConfigError::Load {
                path: origin.to_string(),
                message: e.to_string(),
            })?;
        let cfg: Config = built.try_deserialize().map_err(|e| ConfigError::Load {
            path: origin.to_string(),
            message: format!(
                "{e}; see the shipped hub.toml (`didhub example-config`) for every key"
            ),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Pure checks of everything rumqttc or the pipeline would otherwise fail on later.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = self.mqtt.broker_url()?;
        if url.tls {
            // Reads the CA, certificate and key now: a wrong path or a bad PEM is a config
            // error (exit 78), not a connection that keeps failing.
            self.mqtt.tls.client_config("mqtt.tls")?;
        } else if self.mqtt.tls.is_set() {
            return Err(invalid(
                "mqtt.tls",
                format!(
                    "is set but mqtt.url `{}` is not TLS: write it as mqtts://host:port (default port 8883)",
                    self.mqtt.url
                ),
            ));
        }
        if self.mqtt.protocol == MqttProtocol::V5 {
            if self.mqtt.session_expiry.as_secs() > u64::from(u32::MAX) {
                return Err(invalid(
                    "mqtt.session_expiry",
                    "must be at most 136y (MQTT 5 counts it in seconds, 32 bits)",
                ));
            }
            if !self.mqtt.clean_session && self.mqtt.session_expiry.as_secs() == 0 {
                return Err(invalid(
                    "mqtt.session_expiry",
                    "is 0 with clean_session = false: in MQTT 5 the broker would drop the hub's session (and its backlog) at each disconnect; set e.g. \"1d\"",
                ));
            }
        }
        if self.mqtt.client_id.trim().is_empty() {
            return Err(invalid(
                "mqtt.client_id",
                "must not be empty: the broker keeps the hub's persistent session under it",
            ));
        }
        if self.mqtt.keep_alive < Duration::from_secs(1) {
            return Err(invalid("mqtt.keep_alive", "must be at least 1s"));
        }
        if self.mqtt.inflight == 0 {
            return Err(invalid("mqtt.inflight", "must be at least 1"));
        }
        if self.mqtt.password.is_some() && self.mqtt.password_file.is_some() {
            return Err(invalid(
                "mqtt.password",
                "set either mqtt.password or mqtt.password_file, not both",
            ));
        }
        if self.mqtt.reconnect_min > self.mqtt.reconnect_max {
            return Err(invalid(
                "mqtt.reconnect_min",
                "must not exceed mqtt.reconnect_max",
            ));
        }
        if self.limits.signer_key_cache == 0 {
            return Err(invalid("limits.signer_key_cache", "must be at least 1"));
        }
        if self.store.max_batch == 0 {
            return Err(invalid("store.max_batch", "must be at least 1"));
        }
        match (self.store.kind, &self.store.influxdb) {
            (StoreKind::Influxdb, None) => {
                return Err(invalid(
                    "store.influxdb",
                    "store.kind = \"influxdb\" needs a [store.influxdb] table with url, organization, bucket and token or token_file",
                ))
            }
            (StoreKind::Influxdb, Some(i)) => {
                if !(i.url.starts_with("http://") || i.url.starts_with("https://")) {
                    return Err(invalid(
                        "store.influxdb.url",
                        format!("`{}` must start with http:// or https://", i.url),
                    ));
                }
                if i.bucket.is_empty() {
                    return Err(invalid("store.influxdb.bucket", "must not be empty"));
                }
                if i.token.is_some() && i.token_file.is_some() {
                    return Err(invalid(
                        "store.influxdb.token",
                        "set either token or token_file, not both",
                    ));
                }
                if i.batch_size == 0 {
                    return Err(invalid("store.influxdb.batch_size", "must be at least 1"));
                }
                if !(1..=16).contains(&i.requests_in_flight) {
                    return Err(invalid(
                        "store.influxdb.requests_in_flight",
                        "must be from 1 to 16",
                    ));
                }
            }
            _ => {}
        }
        if self.outbox.max_bytes < 4096 {
            return Err(invalid("outbox.max_bytes", "must be at least 4096"));
        }
        if self.limits.max_message_bytes < 256 {
            return Err(invalid("limits.max_message_bytes", "must be at least 256"));
        }
        if self.limits.max_json_depth == 0 || self.limits.max_json_depth > 100 {
            return Err(invalid(
                "limits.max_json_depth",
                "must be between 1 and 100",
            ));
        }
        if self.limits.max_fields == 0 {
            return Err(invalid("limits.max_fields", "must be at least 1"));
        }
        if self.pipeline.queue == 0 {
            return Err(invalid("pipeline.queue", "must be at least 1"));
        }
        self.http.addr()?;
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return Err(invalid(
                "log.format",
                format!("`{}` is not `text` or `json`", self.log.format),
            ));
        }
        if self.routes.is_empty() {
            return Err(invalid(
                "routes",
                "no [[routes]]: add at least one with `topics = [\"devices/+/telemetry\"]`",
            ));
        }
        for (i, r) in self.routes.iter().enumerate() {
            let key = |k: &str| format!("routes[{i}].{k}");
            if r.topics.is_empty() {
                return Err(invalid(key("topics"), "must list at least one MQTT filter"));
            }
            for t in &r.topics {
                validate_filter(t).map_err(|m| invalid(key("topics"), m))?;
            }
            if r.qos > 1 {
                return Err(invalid(
                    key("qos"),
                    "must be 0 or 1 (QoS 2 is not supported; QoS 1 with the replay window gives exactly-once storage)",
                ));
            }
            if r.measurement.is_empty() {
                return Err(invalid(key("measurement"), "must not be empty"));
            }
            if let Some(p) = &r.topic_tags {
                TopicPattern::parse(p).map_err(|m| invalid(key("topic_tags"), m))?;
            }
            if r.report_topic.is_empty()
                || r.report_topic.contains('+')
                || r.report_topic.contains('#')
            {
                return Err(invalid(
                    key("report_topic"),
                    "must be a topic name (no wildcards), e.g. \"{topic}/problem-report\"",
                ));
            }
        }
        for (i, d) in self.devices.iter().enumerate() {
            if !d.did.starts_with("did:") {
                return Err(invalid(
                    format!("devices[{i}].did"),
                    format!("`{}` is not a DID (did:key:… or did:peer:2…)", d.did),
                ));
            }
        }
        Ok(())
    }

    /// Path of the hub identity file.
    pub fn identity_path(&self) -> PathBuf {
        self.state_dir.join("identity.json")
    }

    /// Path of the SQLite store.
    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("didhub.db")
    }
}

/// Checks an MQTT subscription filter.
pub fn validate_filter(f: &str) -> Result<(), String> {
    if f.is_empty() {
        return Err("an empty topic filter".into());
    }
    let levels: Vec<&str> = f.split('/').collect();
    for (i, l) in levels.iter().enumerate() {
        if l.contains('#') && (*l != "#" || i != levels.len() - 1) {
            return Err(format!("`{f}`: `#` must be a whole last level"));
        }
        if l.contains('+') && *l != "+" {
            return Err(format!("`{f}`: `+` must be a whole level"));
        }
    }
    Ok(())
}

/// Whether `topic` matches the MQTT filter `filter`.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return !topic.starts_with('$') || filter.starts_with('$'),
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::from_toml(s, "test.toml", &[])
    }

    const MIN: &str = "[[routes]]\ntopics = [\"devices/+/telemetry\"]\n";

    #[test]
    fn shipped_config_parses() {
        let c = parse(SHIPPED_HUB_TOML).expect("shipped hub.toml must parse");
        assert!(!c.routes.is_empty());
    }

    #[test]
    fn minimal_config_has_defaults() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.routes[0].require, Require::Authenticated);
        assert_eq!(c.routes[0].measurement, "post");
        assert_eq!(c.limits.max_message_bytes, 65536);
        assert!(!c.mqtt.clean_session);
        assert!(c.pipeline.batch_verify);
        let c = parse(&format!("{MIN}[pipeline]\nbatch_verify = false\n")).unwrap();
        assert!(!c.pipeline.batch_verify);
        assert_eq!(c.pipeline.verify_linger, Duration::from_millis(1));
        let c = parse(&format!("{MIN}[pipeline]\nverify_linger = \"0s\"\n")).unwrap();
        assert!(c.pipeline.verify_linger.is_zero());
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let e = parse(&format!("{MIN}\n[mqtt]\nurll = \"x\"\n")).unwrap_err();
        assert!(e.to_string().contains("urll"), "{e}");
        let e = parse(&format!("bogus = 1\n{MIN}")).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = parse("[[routes]]\ntopics = [\"a/#/b\"]\n").unwrap_err();
        assert!(e.to_string().contains("routes[0].topics"), "{e}");
        let e = parse(&format!("{MIN}[store]\nkind = \"influxdb\"\n")).unwrap_err();
        assert!(e.to_string().contains("store.influxdb"), "{e}");
        let e = parse(&format!("{MIN}[mqtt]\nurl = \"http://x\"\n")).unwrap_err();
        assert!(e.to_string().contains("mqtt.url"), "{e}");
        let e = parse("").unwrap_err();
        assert!(e.to_string().contains("routes"), "{e}");
        let e = parse(&format!("{MIN}[mqtt]\nclient_id = \"\"\n")).unwrap_err();
        assert!(e.to_string().contains("mqtt.client_id"), "{e}");
    }

    #[test]
    fn http_listen_parses_or_turns_off() {
        let c = parse(MIN).unwrap();
        assert_eq!(
            c.http.addr().unwrap(),
            Some("127.0.0.1:9184".parse().unwrap())
        );
        let c = parse(&format!("{MIN}[http]\nlisten = \"\"\n")).unwrap();
        assert_eq!(c.http.addr().unwrap(), None);
        let c = parse(&format!("{MIN}[http]\nlisten = \"[::1]:9000\"\n")).unwrap();
        assert_eq!(c.http.addr().unwrap(), Some("[::1]:9000".parse().unwrap()));
        let e = parse(&format!("{MIN}[http]\nlisten = \"localhost\"\n")).unwrap_err();
        assert!(e.to_string().contains("http.listen"), "{e}");
        let e = parse(&format!("{MIN}[http]\nlisten_on = \"x\"\n")).unwrap_err();
        assert!(e.to_string().contains("listen_on"), "{e}");
    }

    #[test]
    fn env_overrides_nested_snake_case_keys() {
        let env = vec![
            ("HUB__MQTT__CLIENT_ID".to_string(), "hub-7".to_string()),
            ("HUB__LIMITS__MAX_FIELDS".to_string(), "9".to_string()),
            ("OTHER".to_string(), "x".to_string()),
        ];
        let c = Config::from_toml(MIN, "t", &env).unwrap();
        assert_eq!(c.mqtt.client_id, "hub-7");
        assert_eq!(c.limits.max_fields, 9);
    }

    #[test]
    fn secrets_never_debug_printed() {
        let c = parse(&format!(
            "{MIN}[mqtt]\npassword = \"hunter2\"\n[store]\nkind=\"influxdb\"\n[store.influxdb]\nurl=\"http://x\"\nbucket=\"b\"\ntoken=\"tok-secret\"\n"
        ))
        .unwrap();
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("hunter2") && !dbg.contains("tok-secret"),
            "{dbg}"
        );
        assert!(dbg.contains("***"));
    }

    #[test]
    fn broker_urls_and_tls_keys() {
        let u = parse_broker_url("mqtts://broker.example").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.tls),
            ("broker.example", 8883, true)
        );
        let u = parse_broker_url("mqtt://10.0.0.1").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.tls), ("10.0.0.1", 1883, false));
        let u = parse_broker_url("mqtts://h:9999/").unwrap();
        assert_eq!((u.port, u.tls), (9999, true));
        assert!(parse_broker_url("https://h").is_err());
        // [mqtt.tls] on a plain URL is a mistake worth stopping for.
        let e = parse(&format!(
            "{MIN}[mqtt]\nurl = \"mqtt://h\"\n[mqtt.tls]\nserver_name = \"h\"\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("mqtts://"), "{e}");
        let e = parse(&format!("{MIN}[mqtt.tls]\nca_flie = \"x\"\n")).unwrap_err();
        assert!(e.to_string().contains("ca_flie"), "{e}");
        let e = parse(&format!(
            "{MIN}[mqtt]\nurl = \"mqtts://h\"\n[mqtt.tls]\nca_file = \"/nonexistent/ca.pem\"\n"
        ))
        .unwrap_err();
        assert!(
            e.to_string().contains("mqtt.tls.ca_file")
                && e.to_string().contains("/nonexistent/ca.pem"),
            "{e}"
        );
    }

    #[test]
    fn protocol_and_session_expiry() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.mqtt.protocol, MqttProtocol::V311);
        assert_eq!(c.mqtt.session_expiry, Duration::from_secs(86400));
        let c = parse(&format!(
            "{MIN}[mqtt]\nprotocol = \"v5\"\nsession_expiry = \"2h\"\n"
        ))
        .unwrap();
        assert_eq!(c.mqtt.protocol, MqttProtocol::V5);
        assert_eq!(c.mqtt.session_expiry, Duration::from_secs(7200));
        let e = parse(&format!(
            "{MIN}[mqtt]\nprotocol = \"v5\"\nsession_expiry = \"0s\"\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("mqtt.session_expiry"), "{e}");
        // A clean session needs no expiry.
        parse(&format!(
            "{MIN}[mqtt]\nprotocol = \"v5\"\nclean_session = true\nsession_expiry = \"0s\"\n"
        ))
        .unwrap();
        let e = parse(&format!("{MIN}[mqtt]\nprotocol = \"5\"\n")).unwrap_err();
        assert!(e.to_string().contains("protocol"), "{e}");
    }

    #[test]
    fn influx_content_encoding_defaults_to_gzip_and_names_a_bad_value() {
        let influx = "[store]\nkind = \"influxdb\"\n[store.influxdb]\nurl = \"http://x\"\nbucket = \"b\"\ntoken = \"t\"\n";
        let c = parse(&format!("{MIN}{influx}")).unwrap();
        let i = c.store.influxdb.unwrap();
        assert_eq!(i.content_encoding, ContentEncoding::Gzip);
        assert_eq!(i.batch_size, 5000);
        let c = parse(&format!("{MIN}{influx}content_encoding = \"identity\"\n")).unwrap();
        assert_eq!(
            c.store.influxdb.unwrap().content_encoding,
            ContentEncoding::Identity
        );
        let e = parse(&format!("{MIN}{influx}content_encoding = \"br\"\n")).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("content_encoding") && e.contains("br") && e.contains("gzip"),
            "{e}"
        );
        let env = vec![(
            "HUB__STORE__INFLUXDB__CONTENT_ENCODING".to_string(),
            "identity".to_string(),
        )];
        let c = Config::from_toml(&format!("{MIN}{influx}"), "t", &env).unwrap();
        assert_eq!(
            c.store.influxdb.unwrap().content_encoding,
            ContentEncoding::Identity
        );
    }

    #[test]
    fn influx_requests_in_flight_defaults_to_two_and_is_bounded() {
        let influx = "[store]\nkind = \"influxdb\"\n[store.influxdb]\nurl = \"http://x\"\nbucket = \"b\"\ntoken = \"t\"\n";
        let c = parse(&format!("{MIN}{influx}")).unwrap();
        assert_eq!(c.store.influxdb.unwrap().requests_in_flight, 2);
        let c = parse(&format!("{MIN}{influx}requests_in_flight = 1\n")).unwrap();
        assert_eq!(c.store.influxdb.unwrap().requests_in_flight, 1);
        for bad in [0, 17] {
            let e = parse(&format!("{MIN}{influx}requests_in_flight = {bad}\n")).unwrap_err();
            assert!(
                e.to_string().contains("store.influxdb.requests_in_flight"),
                "{e}"
            );
        }
    }

    #[test]
    fn cache_sizes_default_and_a_zero_key_cache_is_refused() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.limits.did_document_cache, 4096);
        assert_eq!(c.limits.signer_key_cache, 131_072);
        let c = parse(&format!(
            "{MIN}[limits]\ndid_document_cache = 0\nsigner_key_cache = 10\n"
        ))
        .unwrap();
        assert_eq!(
            (c.limits.did_document_cache, c.limits.signer_key_cache),
            (0, 10)
        );
        let e = parse(&format!("{MIN}[limits]\nsigner_key_cache = 0\n")).unwrap_err();
        assert!(e.to_string().contains("limits.signer_key_cache"), "{e}");
    }

    #[test]
    fn filters_match_like_mqtt() {
        assert!(topic_matches("devices/+/telemetry", "devices/d1/telemetry"));
        assert!(!topic_matches(
            "devices/+/telemetry",
            "devices/d1/x/telemetry"
        ));
        assert!(topic_matches("devices/#", "devices/d1/x"));
        assert!(topic_matches("devices/#", "devices"));
        assert!(!topic_matches("#", "$SYS/x"));
        assert!(topic_matches("a/b", "a/b"));
        assert!(!topic_matches("a/b", "a/b/c"));
    }
}
