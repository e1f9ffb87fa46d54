//! Integration-test harness: real servers and the real `didhub` binary, started by the test.
//!
//! Every server binds 127.0.0.1 on a port found free just before, keeps its files in a
//! `tempfile` directory and is owned by a guard that stops it by PID when dropped, also when the
//! test panics (SIGTERM, a short grace, then SIGKILL, then `wait`, so nothing is left behind).
//! Readiness is polled with a bounded timeout, never slept for; a timeout panics with the tail of
//! the server's own log. Quirks of the servers are in `/work/shared/TESTING.md`.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

pub mod http_request;
pub mod routes;

/// How long a server may take to accept connections after it was spawned.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a dropped guard waits after SIGTERM before it sends SIGKILL.
pub const DROP_GRACE: Duration = Duration::from_secs(5);
/// How long `stop()` waits after SIGTERM: long enough for a clean shutdown that writes state.
pub const STOP_GRACE: Duration = Duration::from_secs(15);
/// How long `Hub::terminate` waits after SIGTERM before it sends SIGKILL.
pub const HUB_TERM_GRACE: Duration = Duration::from_secs(20);
/// How long `didhub()` lets a CLI subcommand run before it is killed.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval of every readiness and result poll.
pub const POLL: Duration = Duration::from_millis(250);
/// Lines of a captured log shown in a panic message.
const TAIL: usize = 60;
/// Start attempts when a port found free was taken before the server bound it.
const PORT_ATTEMPTS: usize = 5;

// ---------------------------------------------------------------------------------------------
// Ports, binaries, signals
// ---------------------------------------------------------------------------------------------

/// A port on 127.0.0.1 that was free a moment ago and that this test process never handed out.
///
/// Binds 127.0.0.1:0, reads the port and drops the listener. Ports already returned are skipped,
/// so parallel tests in one binary never get the same one; a port taken by someone else between
/// this call and the server's bind is handled by the servers' start retry.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(|| Mutex::new(HashSet::new()));
    for _ in 0..100 {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        if lock(given).insert(port) {
            return port;
        }
    }
    panic!("free_port: no new free port on 127.0.0.1 after 100 tries");
}

/// Whether a process with this PID exists (`kill -0`). A child reaped by its guard does not.
pub fn pid_alive(pid: u32) -> bool {
    signal(pid, "0")
}

/// Whether the effective user is root (mosquitto then needs `user root` to keep file access).
pub fn running_as_root() -> bool {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
            // Uid: real effective saved fs
            return line.split_whitespace().nth(2) == Some("0");
        }
    }
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Sends `-SIG` to `pid` with the `kill` program (or the shell builtin where `kill` is not
/// installed, as in slim images). Returns whether the signal was delivered.
fn signal(pid: u32, sig: &str) -> bool {
    let pid = pid.to_string();
    let flag = format!("-{sig}");
    let quiet = |cmd: &mut Command| {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
    };
    match quiet(Command::new("kill").args([flag.as_str(), pid.as_str()])) {
        Ok(status) => status.success(),
        Err(_) => quiet(Command::new("sh").args([
            "-c",
            "kill \"$1\" \"$2\"",
            "sh",
            flag.as_str(),
            pid.as_str(),
        ]))
        .map(|s| s.success())
        .unwrap_or(false),
    }
}

/// Path of an external program: `$PATH` first, then the given fallbacks (mosquitto lives in
/// /usr/sbin, which is not on a normal user's `$PATH`). Panics with what to install.
pub fn find_program(name: &str, fallbacks: &[&str], package: &str) -> PathBuf {
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    for fallback in fallbacks {
        if Path::new(fallback).is_file() {
            return PathBuf::from(fallback);
        }
    }
    panic!(
        "`{name}` not found on $PATH or in {fallbacks:?}: install the Debian package `{package}` \
         (scripts/test.sh does this when run as root)"
    );
}

fn mosquitto_bin() -> PathBuf {
    find_program(
        "mosquitto",
        &["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"],
        "mosquitto",
    )
}

fn mosquitto_client(name: &str) -> PathBuf {
    find_program(
        name,
        &[
            &format!("/usr/bin/{name}"),
            &format!("/usr/local/bin/{name}"),
        ],
        "mosquitto-clients",
    )
}

fn victoria_bin() -> PathBuf {
    find_program(
        "victoria-metrics",
        &[
            "/usr/bin/victoria-metrics",
            "/usr/local/bin/victoria-metrics",
        ],
        "victoria-metrics",
    )
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A reader thread never panics while holding the lock, but a failed test might: keep going.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Captured logs and owned child processes
// ---------------------------------------------------------------------------------------------

/// Lines a child wrote to stdout and stderr, in arrival order, shared with the reader threads.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    /// A copy of every line so far.
    pub fn lines(&self) -> Vec<String> {
        lock(&self.0).clone()
    }

    /// Appends a line (used for markers such as restarts).
    pub fn push(&self, line: impl Into<String>) {
        lock(&self.0).push(line.into());
    }

    /// The first line at or after index `from` that contains `needle`, with its index.
    pub fn find_from(&self, from: usize, needle: &str) -> Option<(usize, String)> {
        let lines = lock(&self.0);
        lines
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, l)| l.contains(needle))
            .map(|(i, l)| (i, l.clone()))
    }

    /// How many lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        lock(&self.0).iter().filter(|l| l.contains(needle)).count()
    }

    /// The last lines, numbered, for a panic message.
    pub fn tail(&self) -> String {
        let lines = lock(&self.0);
        let skip = lines.len().saturating_sub(TAIL);
        let mut out = String::new();
        if skip > 0 {
            let _ = writeln!(out, "  [... {skip} earlier lines]");
        }
        for line in lines.iter().skip(skip) {
            let _ = writeln!(out, "  | {line}");
        }
        if lines.is_empty() {
            out.push_str("  (no output)\n");
        }
        out
    }
}

/// Removes ANSI escape sequences (colours) so that needles match plain text.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // CSI: parameters and intermediates, then one final byte in '@'..='~'.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Reads `src` line by line (lossy UTF-8, colours stripped) and hands each line to `sink`.
fn spawn_reader<R, F>(src: R, mut sink: F) -> JoinHandle<()>
where
    R: Read + Send + 'static,
    F: FnMut(String) + Send + 'static,
{
    thread::spawn(move || {
        let mut reader = BufReader::new(src);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                        buf.pop();
                    }
                    sink(strip_ansi(&String::from_utf8_lossy(&buf)));
                }
            }
        }
    })
}

/// A child process owned by a test: stopped by PID and reaped when dropped.
struct Proc {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    readers: Vec<JoinHandle<()>>,
    stdin: Option<ChildStdin>,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr captured line by line: stderr into `log`, stdout to
    /// `on_stdout` (or also into `log`).
    fn spawn(
        name: &str,
        cmd: &mut Command,
        log: &Log,
        on_stdout: Option<Box<dyn FnMut(String) + Send>>,
    ) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Self::spawn_piped(name, cmd, log, on_stdout)
    }

    fn spawn_piped(
        name: &str,
        cmd: &mut Command,
        log: &Log,
        on_stdout: Option<Box<dyn FnMut(String) + Send>>,
    ) -> Proc {
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {name} ({cmd:?}): {e}"));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(match on_stdout {
                Some(sink) => spawn_reader(out, sink),
                None => {
                    let log = log.clone();
                    spawn_reader(out, move |l| log.push(l))
                }
            });
        }
        if let Some(err) = child.stderr.take() {
            let log = log.clone();
            readers.push(spawn_reader(err, move |l| log.push(l)));
        }
        let stdin = child.stdin.take();
        Proc {
            name: name.to_owned(),
            child,
            status: None,
            readers,
            stdin,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the child has exited (and reaps it).
    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits up to `timeout` for the child to exit by itself.
    fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; always reaps the child and joins its readers.
    fn stop(&mut self, grace: Duration) -> ExitStatus {
        if self.try_status().is_none() {
            // Not reaped yet, so the PID still names our child (a zombie at worst).
            signal(self.pid(), "TERM");
            if self.wait_timeout(grace).is_none() {
                eprintln!(
                    "[harness] {} (pid {}) ignored SIGTERM for {grace:?}: SIGKILL",
                    self.name,
                    self.pid()
                );
            }
        }
        self.kill9()
    }

    /// SIGKILL (unless already exited), reap, join the readers.
    fn kill9(&mut self) -> ExitStatus {
        let status = match self.try_status() {
            Some(status) => status,
            None => {
                let _ = self.child.kill();
                let status = self.child.wait().expect("wait for killed child");
                self.status = Some(status);
                status
            }
        };
        self.stdin = None;
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(DROP_GRACE);
    }
}

/// Polls `ready` every few milliseconds until it is true; panics with `what`, the exit status if
/// the process died, and the log tail on timeout.
fn wait_ready(
    what: &str,
    proc: &mut Proc,
    log: &Log,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), ExitStatus> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if ready() {
            return Ok(());
        }
        if let Some(status) = proc.try_status() {
            // Give the reader threads a moment to collect the last words.
            thread::sleep(Duration::from_millis(50));
            return Err(status);
        }
        if Instant::now() >= deadline {
            panic!(
                "{what} (pid {}) not ready within {timeout:?}; its log:\n{}",
                proc.pid(),
                log.tail()
            );
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

fn tcp_accepts(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Whether the last run (the lines after the last "[harness] starting" marker) failed to bind.
fn address_in_use(log: &Log) -> bool {
    let lines = log.lines();
    let from = lines
        .iter()
        .rposition(|l| l.starts_with("[harness] starting"))
        .unwrap_or(0);
    lines[from..]
        .iter()
        .any(|l| l.to_ascii_lowercase().contains("address already in use"))
}

// ---------------------------------------------------------------------------------------------
// Servers the tests start (mosquitto here, VictoriaMetrics below)
// ---------------------------------------------------------------------------------------------

/// What sets one kind of test server apart: its name, how it starts on a port with its files in
/// a directory, and how to tell that it serves.
pub trait ServerKind {
    /// For logs and panics.
    const NAME: &'static str;
    /// The command that starts it on `port` with its files in `dir` (it may write them there).
    fn command(&self, port: u16, dir: &Path) -> Command;
    /// Whether the server on `port` serves.
    fn ready(port: u16) -> bool;
}

/// A server of kind `K` started by a test on a free 127.0.0.1 port, its files in a temporary
/// directory of its own. Stopped by PID (SIGTERM, then SIGKILL) by `stop`, and when dropped,
/// before its directory is removed.
pub struct Server<K: ServerKind> {
    /// The port it listens on.
    pub port: u16,
    dir: TempDir,
    kind: K,
    log: Log,
    proc: Option<Proc>,
}

impl<K: ServerKind> Server<K> {
    /// Starts it and waits until it serves; if another process took the port meanwhile, starts
    /// it again on another.
    fn launch(kind: K) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("didhub-{}-", K::NAME))
            .tempdir()
            .unwrap_or_else(|e| panic!("temp dir for {}: {e}", K::NAME));
        let mut server = Server {
            port: 0,
            dir,
            kind,
            log: Log::default(),
            proc: None,
        };
        for attempt in 1..=PORT_ATTEMPTS {
            server.port = free_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(status) if attempt < PORT_ATTEMPTS && address_in_use(&server.log) => {
                    server.log.push(format!(
                        "[harness] port {} taken ({status}), retrying on another",
                        server.port
                    ));
                }
                Err(status) => server.died(status),
            }
        }
        unreachable!()
    }

    fn spawn(&mut self) -> Result<(), ExitStatus> {
        self.log.push(format!(
            "[harness] starting {} on port {}",
            K::NAME,
            self.port
        ));
        let mut cmd = self.kind.command(self.port, self.dir.path());
        cmd.current_dir(self.dir.path());
        let mut proc = Proc::spawn(K::NAME, &mut cmd, &self.log, None);
        let port = self.port;
        let result = wait_ready(K::NAME, &mut proc, &self.log, START_TIMEOUT, || {
            K::ready(port)
        });
        if result.is_ok() {
            self.proc = Some(proc);
        }
        result
    }

    fn died(&self, status: ExitStatus) -> ! {
        panic!(
            "{} on port {} exited during start-up ({status}); its log:\n{}",
            K::NAME,
            self.port,
            self.log.tail()
        );
    }

    /// The temporary directory with its files (config, persistence, data).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// PID of the running server, `None` when stopped.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Everything the server logged, over all its runs.
    pub fn logs(&self) -> Vec<String> {
        self.log.lines()
    }

    /// The server's log handle (for `count`, `find_from`, `tail`).
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// SIGTERM and wait (mosquitto writes its persistence file, VictoriaMetrics flushes to
    /// disk); SIGKILL after 15 s.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let status = self.proc.take().map(|mut p| p.stop(STOP_GRACE));
        self.log
            .push(format!("[harness] {} stopped: {status:?}", K::NAME));
        status
    }

    /// SIGKILL: a crash, nothing is saved since the server's last write to disk.
    pub fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
        self.log
            .push(format!("[harness] {} killed (SIGKILL)", K::NAME));
    }

    /// Starts it again on the same port with the same directory (mosquitto keeps its persisted
    /// sessions, VictoriaMetrics its data). Stops it first if it is running.
    pub fn start_again(&mut self) {
        if self.proc.is_some() {
            self.stop();
        }
        if let Err(status) = self.spawn() {
            self.died(status);
        }
    }
}

impl<K: ServerKind> Drop for Server<K> {
    /// Stops the server before its directory is removed (fields drop after this).
    fn drop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(DROP_GRACE);
        }
    }
}

/// mosquitto 2.0 with anonymous access, unlimited queues and persistence in its directory (so
/// `stop` + `start_again` keeps sessions and queued messages), and `extra_conf` appended.
pub struct MosquittoConf {
    extra_conf: String,
}

impl ServerKind for MosquittoConf {
    const NAME: &'static str = "mosquitto";

    fn command(&self, port: u16, dir: &Path) -> Command {
        let mut conf = format!(
            "# written by tests/common/mod.rs\n\
             listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             # default 1000 drops QoS 1 messages for a slow subscriber; 0 = unlimited\n\
             max_queued_messages 0\n\
             persistence true\n\
             persistence_location {dir}\n\
             log_dest stderr\n\
             log_type all\n\
             log_timestamp_format %H:%M:%S\n",
            dir = dir.display(),
        );
        if running_as_root() {
            // Started as root it drops to `mosquitto`, which cannot write our temp dir.
            conf.push_str("user root\n");
        }
        conf.push_str(&self.extra_conf);
        conf.push('\n');
        let conf_path = dir.join("mosquitto.conf");
        std::fs::write(&conf_path, conf).expect("write mosquitto.conf");
        let mut cmd = Command::new(mosquitto_bin());
        cmd.arg("-c").arg(&conf_path);
        cmd
    }

    fn ready(port: u16) -> bool {
        tcp_accepts(port)
    }
}

/// A mosquitto 2.0 broker on 127.0.0.1 (see [`MosquittoConf`]).
pub type Mosquitto = Server<MosquittoConf>;

impl Server<MosquittoConf> {
    /// Starts a broker with the default test config and waits until it accepts connections.
    pub fn start() -> Mosquitto {
        Self::start_with("")
    }

    /// Like `start`, with `extra_conf` appended to the config file (TLS, password files, ...).
    /// Files it names can be put in `dir()`.
    pub fn start_with(extra_conf: &str) -> Mosquitto {
        Server::launch(MosquittoConf {
            extra_conf: extra_conf.to_owned(),
        })
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

// ---------------------------------------------------------------------------------------------
// mosquitto_sub as an observer
// ---------------------------------------------------------------------------------------------

/// One message received by a `Collector`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The topic it was published on.
    pub topic: String,
    /// The payload bytes, exactly (transported as hex, so newlines and binary survive).
    pub payload: Vec<u8>,
    /// QoS it was delivered with.
    pub qos: u8,
    /// Whether it was delivered as a retained message.
    pub retain: bool,
    /// Its MQTT 5 Correlation Data (as text; empty if none or over MQTT 3.1.1).
    pub correlation_data: String,
}

impl Message {
    /// The payload as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// The payload parsed as JSON; panics with the payload if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "payload on {} is not JSON ({e}): {}",
                self.topic,
                self.text()
            )
        })
    }

    /// `topic payload`, the shape of `mosquitto_sub -v`.
    pub fn line(&self) -> String {
        format!("{} {}", self.topic, self.text())
    }
}

/// Options of a `Collector`'s subscription.
#[derive(Clone, Debug)]
pub struct SubOptions {
    /// Client id (`-i`); `None` lets the broker choose one.
    pub client_id: Option<String>,
    /// Persistent session (`-c`, clean session off); needs a `client_id`.
    pub persistent: bool,
    /// Subscription QoS (`-q`).
    pub qos: u8,
    /// Protocol version for `-V` (`mqttv311` or `mqttv5`).
    pub protocol: &'static str,
}

impl Default for SubOptions {
    fn default() -> Self {
        SubOptions {
            client_id: None,
            persistent: false,
            qos: 1,
            protocol: "mqttv311",
        }
    }
}

/// A `mosquitto_sub` process collecting every message on some topic filters into memory; it is
/// subscribed (SUBACK received) when `start` returns and killed when dropped.
pub struct Collector {
    /// Port of the broker it is connected to.
    pub port: u16,
    messages: Arc<Mutex<Vec<Message>>>,
    subacks: Arc<Mutex<Vec<String>>>,
    log: Log,
    proc: Option<Proc>,
}

/// Subscribes to `topic` (QoS 1, clean session) on the broker at 127.0.0.1:`port` and collects
/// what arrives; returns once the broker has acknowledged the subscription.
pub fn mqtt_subscribe_collect(port: u16, topic: &str) -> Collector {
    Collector::start(port, &[topic], &SubOptions::default())
}

/// Marks lines of the `-F` format so that `-d` debug lines can never be taken for a message.
const MSG_PREFIX: &str = "MSG\t";

impl Collector {
    /// Subscribes to all `topics` in one SUBSCRIBE and waits for the SUBACK (panics if the broker
    /// refuses a filter).
    pub fn start(port: u16, topics: &[&str], opts: &SubOptions) -> Collector {
        assert!(!topics.is_empty(), "Collector needs at least one topic");
        assert!(
            !opts.persistent || opts.client_id.is_some(),
            "a persistent Collector needs a client_id"
        );
        let messages: Arc<Mutex<Vec<Message>>> = Arc::default();
        let subacks: Arc<Mutex<Vec<String>>> = Arc::default();
        let log = Log::default();

        // mosquitto_sub flushes stdout only after a message, so its "Subscribed" line would sit
        // in the pipe buffer: stdbuf (coreutils) makes stdout line-buffered; it execs, so the
        // PID stays mosquitto_sub's.
        let mut cmd = Command::new(find_program("stdbuf", &["/usr/bin/stdbuf"], "coreutils"));
        cmd.arg("-oL")
            .arg(mosquitto_client("mosquitto_sub"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-q", &opts.qos.to_string(), "-V", opts.protocol])
            // -d prints "Subscribed (mid: 1): <granted qos>" once the SUBACK is in.
            .arg("-d")
            // %x = payload as hex: payloads with newlines or binary stay one line; %D = MQTT 5
            // Correlation Data, last (tests use printable values without tabs).
            .args(["-F", "MSG\\t%t\\t%q\\t%r\\t%x\\t%D"]);
        for topic in topics {
            cmd.args(["-t", topic]);
        }
        if let Some(id) = &opts.client_id {
            cmd.args(["-i", id]);
        }
        if opts.persistent {
            cmd.arg("-c");
        }
        let on_stdout = {
            let messages = messages.clone();
            let subacks = subacks.clone();
            let log = log.clone();
            move |line: String| {
                if let Some(rest) = line.strip_prefix(MSG_PREFIX) {
                    match parse_message(rest) {
                        Some(msg) => lock(&messages).push(msg),
                        None => log.push(format!("[harness] unparsable: {line}")),
                    }
                } else {
                    if line.starts_with("Subscribed (mid:") {
                        lock(&subacks).push(line.clone());
                    }
                    log.push(line);
                }
            }
        };
        let mut proc = Proc::spawn("mosquitto_sub", &mut cmd, &log, Some(Box::new(on_stdout)));
        let acked = subacks.clone();
        if let Err(status) = wait_ready("mosquitto_sub", &mut proc, &log, START_TIMEOUT, || {
            !lock(&acked).is_empty()
        }) {
            panic!(
                "mosquitto_sub for {topics:?} on port {port} exited ({status}) before its \
                 SUBACK; its output:\n{}",
                log.tail()
            );
        }
        let suback = lock(&subacks)[0].clone();
        // Granted QoS list after the colon; 128 = refused.
        let granted = suback.rsplit(':').next().unwrap_or("").trim();
        assert!(
            granted.split(',').all(|q| q.trim() != "128"),
            "broker refused a subscription of {topics:?}: {suback}"
        );
        Collector {
            port,
            messages,
            subacks,
            log,
            proc: Some(proc),
        }
    }

    /// Every message received so far, in arrival order.
    pub fn messages(&self) -> Vec<Message> {
        lock(&self.messages).clone()
    }

    /// Every message so far as `topic payload` lines (like `mosquitto_sub -v`).
    pub fn lines(&self) -> Vec<String> {
        self.messages().iter().map(Message::line).collect()
    }

    /// Waits until at least `n` messages arrived; returns them all as `topic payload` lines.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<String> {
        self.wait_for_messages(n, timeout)
            .iter()
            .map(Message::line)
            .collect()
    }

    /// Waits until at least `n` messages arrived and returns them all; panics on timeout with
    /// what did arrive and the subscriber's output.
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Message> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.messages();
            if got.len() >= n {
                return got;
            }
            if Instant::now() >= deadline {
                panic!(
                    "expected {n} MQTT messages within {timeout:?}, got {}:\n{:#?}\n\
                     mosquitto_sub output:\n{}",
                    got.len(),
                    got.iter().map(Message::line).collect::<Vec<_>>(),
                    self.log.tail()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the broker has acknowledged `n` subscriptions in total: mosquitto_sub
    /// reconnects about a second after a broker restart and subscribes again, so `n = 2` after
    /// one restart means it listens again.
    pub fn wait_subscribed(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while lock(&self.subacks).len() < n {
            if Instant::now() >= deadline {
                panic!(
                    "mosquitto_sub has not subscribed {n} times within {timeout:?}; its output:\n{}",
                    self.log.tail()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// PID of the `mosquitto_sub` process, `None` once stopped.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Debug output of `mosquitto_sub` (connects, SUBACKs, errors).
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Stops the subscriber (its session stays on the broker if it is persistent).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(DROP_GRACE);
        }
    }
}

fn parse_message(rest: &str) -> Option<Message> {
    let mut parts = rest.splitn(5, '\t');
    let topic = parts.next()?.to_owned();
    let qos = parts.next()?.parse().ok()?;
    let retain = parts.next()? == "1";
    let payload = decode_hex(parts.next()?)?;
    let correlation_data = parts.next().unwrap_or("").to_owned();
    Some(Message {
        topic,
        payload,
        qos,
        retain,
        correlation_data,
    })
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Starts `mosquitto_pub -l` publishing each line of `lines` as one QoS 1 message to `topic`
/// on `port`, without waiting: `wait_output` on the guard collects it, dropping it kills it.
pub fn mosquitto_pub_lines(port: u16, topic: &str, lines: String) -> ChildGuard {
    let mut cmd = Command::new(mosquitto_client("mosquitto_pub"));
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-q",
        "1",
        "-t",
        topic,
        "-l",
    ]);
    ChildGuard::spawn("mosquitto_pub", &mut cmd, Some(lines.into_bytes()))
}

/// Publishes one message with `mosquitto_pub` (`-q qos`, `-r` if `retain`); panics if it fails.
pub fn mqtt_publish(port: u16, topic: &str, payload: &[u8], qos: u8, retain: bool) {
    let log = Log::default();
    let mut cmd = Command::new(mosquitto_client("mosquitto_pub"));
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", topic])
        .args(["-q", &qos.to_string()])
        // -s: payload from stdin, byte for byte; -n: a zero-length payload.
        .arg(if payload.is_empty() { "-n" } else { "-s" })
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if retain {
        cmd.arg("-r");
    }
    let mut proc = Proc::spawn_piped("mosquitto_pub", &mut cmd, &log, None);
    if let Some(mut stdin) = proc.stdin.take() {
        stdin.write_all(payload).expect("write mosquitto_pub stdin");
    }
    match proc.wait_timeout(Duration::from_secs(20)) {
        Some(status) if status.success() => {}
        other => panic!(
            "mosquitto_pub to {topic} on port {port} failed ({other:?}):\n{}",
            log.tail()
        ),
    }
    proc.kill9();
}

// ---------------------------------------------------------------------------------------------
// Minimal HTTP/1.1 client over std
// ---------------------------------------------------------------------------------------------

/// A complete HTTP response.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Header names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// Body, de-chunked.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The first header of that (lowercase) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One request to 127.0.0.1:`port` with `Connection: close`; `path` includes the query string.
pub fn http_request(
    method: &str,
    port: u16,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> io::Result<HttpResponse> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         User-Agent: didhub-tests\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(ct) = content_type {
        let _ = write!(head, "Content-Type: {ct}\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()?;
    let _ = stream.shutdown(Shutdown::Write);
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

/// `GET` on 127.0.0.1:`port`.
pub fn http_get(port: u16, path: &str) -> io::Result<HttpResponse> {
    http_request("GET", port, path, None, &[])
}

/// `POST` of a text body on 127.0.0.1:`port`.
pub fn http_post(port: u16, path: &str, body: &[u8]) -> io::Result<HttpResponse> {
    http_request("POST", port, path, Some("text/plain; charset=utf-8"), body)
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn parse_response(raw: &[u8]) -> io::Result<HttpResponse> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad(format!("no header end in {} bytes", raw.len())))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    if header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        body = dechunk(&body)?;
    } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.truncate(len);
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("truncated chunk size"))?;
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size_hex = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| bad(format!("bad chunk size {size_hex:?}")))?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err(bad("truncated chunk"));
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Percent-encodes a query-string component (everything but RFC 3986 unreserved characters).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// VictoriaMetrics
// ---------------------------------------------------------------------------------------------

/// Flags every test VictoriaMetrics gets besides its address and data path; see TESTING.md.
pub const VICTORIA_FLAGS: &[&str] = &[
    // Same series + same timestamp is kept once, as InfluxDB overwrites.
    "-dedup.minScrapeInterval=1ms",
    // Later samples of a known series visible after ~1 s instead of 30 s.
    "-search.latencyOffset=0s",
    // The default (1 month) silently drops older samples: tests use fixed old timestamps.
    "-retentionPeriod=100y",
    // No response cache between polls of /api/v1/query.
    "-search.disableCache",
];

/// One series from `/api/v1/export`, with the blocks of that series merged and sorted by time.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Labels, including `__name__` (`measurement_field` for InfluxDB line protocol).
    pub metric: serde_json::Map<String, Value>,
    /// Sample values (string fields come back as 0).
    pub values: Vec<f64>,
    /// Sample timestamps in milliseconds.
    pub timestamps: Vec<i64>,
}

impl Series {
    /// `__name__`.
    pub fn name(&self) -> &str {
        self.label("__name__").unwrap_or("")
    }

    /// A label value.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.metric.get(key).and_then(Value::as_str)
    }

    /// `(timestamp_ms, value)` pairs in time order.
    pub fn samples(&self) -> Vec<(i64, f64)> {
        self.timestamps
            .iter()
            .copied()
            .zip(self.values.iter().copied())
            .collect()
    }
}

/// A single-node VictoriaMetrics with `VICTORIA_FLAGS`, then `extra_flags` (a later flag
/// overrides an earlier one of the same name), its data in its directory.
pub struct VictoriaFlags {
    extra_flags: Vec<String>,
}

impl ServerKind for VictoriaFlags {
    const NAME: &'static str = "victoria-metrics";

    fn command(&self, port: u16, dir: &Path) -> Command {
        let mut cmd = Command::new(victoria_bin());
        cmd.arg(format!("-httpListenAddr=127.0.0.1:{port}"))
            .arg(format!("-storageDataPath={}", dir.join("data").display()))
            .args(VICTORIA_FLAGS)
            .args(&self.extra_flags);
        cmd
    }

    fn ready(port: u16) -> bool {
        http_get(port, "/health")
            .map(|r| r.status == 200 && r.text().trim() == "OK")
            .unwrap_or(false)
    }
}

/// A single-node VictoriaMetrics on 127.0.0.1, standing in for InfluxDB's `/api/v2/write`.
/// Rows it drops are only visible in its log (`logs`): writes still get 204.
pub type Victoria = Server<VictoriaFlags>;

impl Server<VictoriaFlags> {
    /// Starts VictoriaMetrics with `VICTORIA_FLAGS` and waits until `/health` answers OK.
    pub fn start() -> Victoria {
        Self::start_with(&[])
    }

    /// Like `start`, with more flags (a later flag overrides an earlier one of the same name).
    pub fn start_with(extra_flags: &[&str]) -> Victoria {
        Server::launch(VictoriaFlags {
            extra_flags: extra_flags.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// `http://127.0.0.1:PORT`, the base URL to give the hub as its InfluxDB URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn http(&self, method: &str, path: &str, body: &[u8]) -> HttpResponse {
        let ct = (!body.is_empty()).then_some("text/plain; charset=utf-8");
        http_request(method, self.port, path, ct, body).unwrap_or_else(|e| {
            panic!(
                "{method} {path} to victoria-metrics on port {} failed: {e}; its log:\n{}",
                self.port,
                self.log.tail()
            )
        })
    }

    /// POSTs InfluxDB line protocol (nanosecond timestamps) to `/api/v2/write?org=o&bucket=b`,
    /// the way the hub does; returns the status (204, even for lines it drops).
    pub fn write_lines(&self, lines: &str) -> u16 {
        self.http("POST", "/api/v2/write?org=o&bucket=b", lines.as_bytes())
            .status
    }

    /// `/internal/force_flush`: makes pending samples searchable (a new series in ~1 s instead of
    /// ~10 s).
    pub fn force_flush(&self) {
        let r = self.http("GET", "/internal/force_flush", &[]);
        assert_eq!(r.status, 200, "force_flush: {}", r.text());
    }

    /// Raw lines of `/api/v1/export?match[]=SELECTOR` (all time), each a JSON object with
    /// `metric`, `values`, `timestamps`. One series may span several lines.
    pub fn export(&self, match_selector: &str) -> Vec<Value> {
        let path = format!("/api/v1/export?match[]={}", url_encode(match_selector));
        let r = self.http("GET", &path, &[]);
        assert_eq!(
            r.status,
            200,
            "export {match_selector}: {} {}",
            r.status,
            r.text()
        );
        r.text()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("export line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// The export as series: lines of one series merged, samples sorted by time, series sorted by
    /// their labels.
    pub fn series(&self, match_selector: &str) -> Vec<Series> {
        let mut merged: BTreeMap<String, Series> = BTreeMap::new();
        for line in self.export(match_selector) {
            let metric = line["metric"].as_object().cloned().unwrap_or_default();
            let key = Value::Object(metric.clone()).to_string();
            let entry = merged.entry(key).or_insert_with(|| Series {
                metric,
                values: Vec::new(),
                timestamps: Vec::new(),
            });
            let values = line["values"].as_array().cloned().unwrap_or_default();
            let stamps = line["timestamps"].as_array().cloned().unwrap_or_default();
            for (v, t) in values.iter().zip(stamps.iter()) {
                entry.values.push(v.as_f64().unwrap_or(f64::NAN));
                entry.timestamps.push(t.as_i64().unwrap_or_default());
            }
        }
        merged
            .into_values()
            .map(|s| {
                let mut pairs = s.samples();
                pairs.sort_by_key(|(t, _)| *t);
                Series {
                    metric: s.metric,
                    timestamps: pairs.iter().map(|(t, _)| *t).collect(),
                    values: pairs.iter().map(|(_, v)| *v).collect(),
                }
            })
            .collect()
    }

    /// Polls (force_flush + export every 250 ms) until the series matching `selector` hold at
    /// least `expected` samples in total; returns them. Panics on timeout with what was seen.
    /// With the flush a new series shows up in about 1 s (about 10 s without); still give it a
    /// 20 s timeout on a loaded CI machine.
    pub fn wait_for_samples(
        &self,
        selector: &str,
        expected: usize,
        timeout: Duration,
    ) -> Vec<Series> {
        let deadline = Instant::now() + timeout;
        loop {
            self.force_flush();
            let series = self.series(selector);
            let total: usize = series.iter().map(|s| s.values.len()).sum();
            if total >= expected {
                return series;
            }
            if Instant::now() >= deadline {
                panic!(
                    "expected {expected} samples for {selector} within {timeout:?}, have \
                     {total}: {series:#?}\nvictoria-metrics log:\n{}",
                    self.log.tail()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Polls for `duration` that the samples matching `selector` stay exactly `expected` (a
    /// negative check: a duplicate or late write would show up within about a second).
    pub fn assert_sample_count_stays(&self, selector: &str, expected: usize, duration: Duration) {
        let deadline = Instant::now() + duration;
        loop {
            self.force_flush();
            let series = self.series(selector);
            let total: usize = series.iter().map(|s| s.values.len()).sum();
            assert_eq!(
                total, expected,
                "samples for {selector} changed: {series:#?}"
            );
            if Instant::now() >= deadline {
                return;
            }
            thread::sleep(POLL);
        }
    }

    /// An instant PromQL/MetricsQL query (`/api/v1/query`); returns the whole JSON answer.
    pub fn query(&self, promql: &str) -> Value {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let r = self.http("GET", &path, &[]);
        serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("query {promql}: {} is not JSON ({e})", r.text()))
    }
}

// ---------------------------------------------------------------------------------------------
// The didhub binary
// ---------------------------------------------------------------------------------------------

/// Path of the `didhub` binary cargo built for these tests.
pub fn didhub_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_didhub"))
}

/// Environment every didhub run gets, and the inherited `HUB__*` overrides it must not get.
fn didhub_command(args: &[impl AsRef<OsStr>], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(didhub_bin());
    cmd.args(args)
        .env("RUST_LOG", "didhub=debug")
        .env("RUST_LIB_BACKTRACE", "0")
        .env("NO_COLOR", "1");
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HUB__") {
            cmd.env_remove(key);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs a didhub CLI subcommand to completion (keygen, send, query, validate, ...) and returns
/// its output; killed after 60 s.
pub fn didhub(args: &[&str]) -> Output {
    didhub_with(args, &[], None, CLI_TIMEOUT)
}

/// Like `didhub`, with extra environment, optional stdin bytes and a timeout.
pub fn didhub_with(
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Output {
    ChildGuard::spawn(
        &format!("didhub {args:?}"),
        &mut didhub_command(args, env),
        stdin.map(<[u8]>::to_vec),
    )
    .wait_output(timeout)
}

/// A child a test starts and waits for itself (`didhub send`, `mosquitto_pub`), with its stdout
/// and stderr collected. Dropped before the child was reaped (the test panicked, or never
/// waited), it SIGKILLs the child by PID and reaps it: keep the guard in the test's own scope,
/// not only in a thread, so that unwinding drops it.
pub struct ChildGuard {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    stdin: Option<JoinHandle<()>>,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl ChildGuard {
    /// Spawns `cmd` with stdout and stderr collected. `stdin` bytes are written by a thread that
    /// owns only the pipe (so a child that reads slowly never blocks the test), then closed.
    pub fn spawn(name: &str, cmd: &mut Command, stdin: Option<Vec<u8>>) -> ChildGuard {
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {name} ({cmd:?}): {e}"));
        fn collect(r: Option<impl Read + Send + 'static>) -> Option<JoinHandle<Vec<u8>>> {
            r.map(|mut r| {
                thread::spawn(move || {
                    let mut buf = Vec::new();
                    let _ = r.read_to_end(&mut buf);
                    buf
                })
            })
        }
        let stdout = collect(child.stdout.take());
        let stderr = collect(child.stderr.take());
        let stdin = match (stdin, child.stdin.take()) {
            (Some(bytes), Some(mut pipe)) => Some(thread::spawn(move || {
                // A child that exits (or is killed) without reading closes the pipe: not ours.
                let _ = pipe.write_all(&bytes);
            })),
            _ => None,
        };
        ChildGuard {
            name: name.to_owned(),
            child,
            status: None,
            stdin,
            stdout,
            stderr,
        }
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the child has exited (and reaps it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits up to `timeout` for the child to exit and returns what it wrote; after `timeout`
    /// it is SIGKILLed and the test panics with its stderr.
    pub fn wait_output(mut self, timeout: Duration) -> Output {
        let deadline = Instant::now() + timeout;
        while self.try_status().is_none() {
            if Instant::now() >= deadline {
                let pid = self.pid();
                self.kill9();
                let stderr = self.take_output().1;
                panic!(
                    "{} (pid {pid}) still running after {timeout:?}; killed (SIGKILL). stderr:\n{}",
                    self.name,
                    String::from_utf8_lossy(&stderr)
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        let status = self.kill9();
        let (stdout, stderr) = self.take_output();
        Output {
            status,
            stdout,
            stderr,
        }
    }

    /// SIGKILL by PID unless already reaped, then reap; joins the stdin writer.
    fn kill9(&mut self) -> ExitStatus {
        let status = match self.try_status() {
            Some(status) => status,
            None => {
                // Not reaped yet, so the PID still names our child (a zombie at worst).
                let _ = self.child.kill();
                let status = self.child.wait().expect("wait for killed child");
                self.status = Some(status);
                status
            }
        };
        if let Some(writer) = self.stdin.take() {
            let _ = writer.join();
        }
        status
    }

    /// What the (reaped) child wrote to stdout and stderr.
    fn take_output(&mut self) -> (Vec<u8>, Vec<u8>) {
        let join =
            |h: Option<JoinHandle<Vec<u8>>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
        (join(self.stdout.take()), join(self.stderr.take()))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            eprintln!(
                "[harness] {} (pid {}) still running when its guard dropped: SIGKILL",
                self.name,
                self.pid()
            );
        }
        self.kill9();
        // Readers end once the child's pipes close; joining them leaves no thread behind.
        self.take_output();
    }
}

/// Starts a didhub CLI subcommand (e.g. a long `send`) without waiting: the guard kills it if
/// the test ends first; `wait_output` collects it.
pub fn didhub_spawn(args: &[&str], env: &[(&str, &str)]) -> ChildGuard {
    ChildGuard::spawn(
        &format!("didhub {args:?}"),
        &mut didhub_command(args, env),
        None,
    )
}

/// The daemon, `didhub --config PATH run`, with stdout and stderr captured line by line.
pub struct Hub {
    config: PathBuf,
    env: Vec<(String, String)>,
    log: Log,
    proc: Option<Proc>,
}

impl Hub {
    /// Starts `didhub --config CONFIG run` with `RUST_LOG=didhub=debug`; does not wait for
    /// anything (use `wait_for_log`).
    pub fn start(config_path: &Path) -> Hub {
        Self::start_with_env(config_path, &[])
    }

    /// Like `start`, with extra environment (e.g. `HUB__INFLUXDB__TOKEN`).
    pub fn start_with_env(config_path: &Path, env: &[(&str, &str)]) -> Hub {
        let mut hub = Hub {
            config: config_path.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log: Log::default(),
            proc: None,
        };
        hub.spawn();
        hub
    }

    fn spawn(&mut self) {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let args = [
            OsStr::new("--config"),
            self.config.as_os_str(),
            OsStr::new("run"),
        ];
        let mut cmd = didhub_command(&args, &env);
        self.log.push(format!("[harness] starting {cmd:?}"));
        self.proc = Some(Proc::spawn("didhub", &mut cmd, &self.log, None));
    }

    /// Starts the same command again (after `terminate` or `kill9`); the log continues.
    pub fn start_again(&mut self) {
        if self.proc.is_some() {
            self.terminate();
        }
        self.spawn();
    }

    /// PID of the running hub, `None` after `terminate`/`kill9`.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Every line the hub wrote to stdout or stderr so far.
    pub fn logs(&self) -> Vec<String> {
        self.log.lines()
    }

    /// The hub's log handle (for `count`, `find_from`, `tail`).
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// Waits for a log line containing `needle` and returns it. Panics with the log tail on
    /// timeout, or at once if the hub exits first.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_log_from(0, needle, timeout).1
    }

    /// Like `wait_for_log`, looking only at lines from index `from` on (`logs().len()` taken
    /// before an action); returns the line's index too.
    pub fn wait_for_log_from(
        &self,
        from: usize,
        needle: &str,
        timeout: Duration,
    ) -> (usize, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.log.find_from(from, needle) {
                return found;
            }
            let exited = match &self.proc {
                None => Some("not running".to_owned()),
                Some(_) if Instant::now() >= deadline => None,
                // `try_wait` needs `&mut`; look at /proc instead (a zombie has exited).
                Some(p) if has_exited(p.pid()) => Some("exited".to_owned()),
                Some(_) => None,
            };
            if let Some(why) = exited {
                thread::sleep(Duration::from_millis(100));
                if let Some(found) = self.log.find_from(from, needle) {
                    return found;
                }
                panic!(
                    "didhub {why} without logging {needle:?}; its log:\n{}",
                    self.log.tail()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "didhub did not log {needle:?} within {timeout:?}; its log:\n{}",
                    self.log.tail()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the hub to exit by itself (e.g. 78 on a bad config); panics with the log tail
    /// if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let proc = self.proc.as_mut().expect("hub is not running");
        match proc.wait_timeout(timeout) {
            Some(_) => {
                let status = proc.kill9();
                self.proc = None;
                status
            }
            None => panic!(
                "didhub still running after {timeout:?}; its log:\n{}",
                self.log.tail()
            ),
        }
    }

    /// SIGTERM, wait up to 20 s for a clean shutdown, then SIGKILL; returns the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut proc = self.proc.take().expect("hub is not running");
        let status = proc.stop(HUB_TERM_GRACE);
        self.log
            .push(format!("[harness] didhub terminated: {status}"));
        status
    }

    /// SIGKILL: a crash with no shutdown at all.
    pub fn kill9(&mut self) -> ExitStatus {
        let mut proc = self.proc.take().expect("hub is not running");
        let status = proc.kill9();
        self.log.push(format!("[harness] didhub killed: {status}"));
        status
    }
}

/// Whether our unreaped child `pid` has exited: gone from `/proc`, or a zombie there.
fn has_exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

// ---------------------------------------------------------------------------------------------
// hub.toml
// ---------------------------------------------------------------------------------------------

/// The route a `HubConfig` has unless `routes` replaces it: points go to measurement `post`.
pub const DEFAULT_ROUTE: &str = "[[routes]]\ntopics = [\"devices/+/telemetry\"]\n";

/// The hub.toml of a daemon under test that uses a broker the test started.
///
/// Unless an option says otherwise: `state_dir = "DIR/state"`, a random `client_id` (kept by
/// clones, so a rewritten config is the same client), reconnects from 50 ms up to 500 ms, no
/// embedded broker, no HTTP listener, the embedded store, `DEFAULT_ROUTE`, and the daemon's
/// defaults for every other key.
#[derive(Clone, Debug)]
pub struct HubConfig {
    dir: PathBuf,
    mqtt_url: String,
    client_id: String,
    reconnect_max: String,
    mqtt: String,
    stats_interval: Option<String>,
    http_listen: String,
    workers: Option<usize>,
    queue: Option<usize>,
    shutdown_timeout: Option<String>,
    influxdb_url: Option<String>,
    influxdb_retry_min: String,
    influxdb_batch_size: Option<usize>,
    tables: String,
    routes: String,
}

impl HubConfig {
    /// A config in `dir` (the hub's state goes to `dir/state`) for the broker at `mqtt_url`.
    pub fn new(dir: &Path, mqtt_url: &str) -> HubConfig {
        HubConfig {
            dir: dir.to_owned(),
            mqtt_url: mqtt_url.to_owned(),
            client_id: format!("hub-{}", uuid::Uuid::new_v4().simple()),
            reconnect_max: "500ms".into(),
            mqtt: String::new(),
            stats_interval: None,
            http_listen: String::new(),
            workers: None,
            queue: None,
            shutdown_timeout: None,
            influxdb_url: None,
            influxdb_retry_min: "50ms".into(),
            influxdb_batch_size: None,
            tables: String::new(),
            routes: DEFAULT_ROUTE.into(),
        }
    }

    /// `mqtt.reconnect_max` (default 500 ms).
    pub fn reconnect_max(mut self, duration: &str) -> Self {
        self.reconnect_max = duration.into();
        self
    }

    /// More `[mqtt]` lines: `protocol`, credentials, a `[mqtt.tls]` table last.
    pub fn mqtt(mut self, lines: &str) -> Self {
        self.mqtt = toml_lines(lines);
        self
    }

    /// `stats_interval` (the daemon's default otherwise).
    pub fn stats_interval(mut self, duration: &str) -> Self {
        self.stats_interval = Some(duration.into());
        self
    }

    /// `http.listen` (default off).
    pub fn http_listen(mut self, addr: &str) -> Self {
        self.http_listen = addr.into();
        self
    }

    /// `pipeline.workers` (one per core otherwise).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = Some(workers);
        self
    }

    /// `pipeline.queue`.
    pub fn queue(mut self, messages: usize) -> Self {
        self.queue = Some(messages);
        self
    }

    /// `pipeline.shutdown_timeout`.
    pub fn shutdown_timeout(mut self, duration: &str) -> Self {
        self.shutdown_timeout = Some(duration.into());
        self
    }

    /// Points go to InfluxDB at `url` (org `o`, bucket `b`, token `secret-token`, retries from
    /// 50 ms up to 1 s) instead of the embedded store.
    pub fn influxdb(mut self, url: &str) -> Self {
        self.influxdb_url = Some(url.into());
        self
    }

    /// `store.influxdb.retry_min` (default 50 ms).
    pub fn influxdb_retry_min(mut self, duration: &str) -> Self {
        self.influxdb_retry_min = duration.into();
        self
    }

    /// `store.influxdb.batch_size`.
    pub fn influxdb_batch_size(mut self, points: usize) -> Self {
        self.influxdb_batch_size = Some(points);
        self
    }

    /// More tables as TOML, each from its `[header]` on (`[reports]`, `[outbox]`).
    pub fn tables(mut self, toml: &str) -> Self {
        self.tables = toml_lines(toml);
        self
    }

    /// The `[[routes]]` (and `[[devices]]`) instead of `DEFAULT_ROUTE`.
    pub fn routes(mut self, toml: &str) -> Self {
        self.routes = toml_lines(toml);
        self
    }

    /// The TOML text (write it yourself for a file that is meant to fail).
    pub fn text(&self) -> String {
        let mut t = format!("state_dir = \"{}\"\n", self.dir.join("state").display());
        if let Some(interval) = &self.stats_interval {
            let _ = writeln!(t, "stats_interval = \"{interval}\"");
        }
        let _ = write!(
            t,
            "[mqtt]\nurl = \"{}\"\nclient_id = \"{}\"\nreconnect_min = \"50ms\"\n\
             reconnect_max = \"{}\"\n{}",
            self.mqtt_url, self.client_id, self.reconnect_max, self.mqtt
        );
        t.push_str("[broker]\nembedded = false\n");
        let _ = writeln!(t, "[http]\nlisten = \"{}\"", self.http_listen);
        if self.workers.is_some() || self.queue.is_some() || self.shutdown_timeout.is_some() {
            t.push_str("[pipeline]\n");
        }
        if let Some(workers) = self.workers {
            let _ = writeln!(t, "workers = {workers}");
        }
        if let Some(queue) = self.queue {
            let _ = writeln!(t, "queue = {queue}");
        }
        if let Some(timeout) = &self.shutdown_timeout {
            let _ = writeln!(t, "shutdown_timeout = \"{timeout}\"");
        }
        if let Some(url) = &self.influxdb_url {
            let _ = write!(
                t,
                "[store]\nkind = \"influxdb\"\n[store.influxdb]\nurl = \"{url}\"\n\
                 organization = \"o\"\nbucket = \"b\"\ntoken = \"secret-token\"\n\
                 retry_min = \"{}\"\nretry_max = \"1s\"\n",
                self.influxdb_retry_min
            );
            if let Some(n) = self.influxdb_batch_size {
                let _ = writeln!(t, "batch_size = {n}");
            }
        }
        t.push_str(&self.tables);
        t.push_str(&self.routes);
        t
    }

    /// Writes `DIR/hub.toml`, checks it with `didhub validate` and returns its path.
    pub fn write(&self) -> PathBuf {
        let path = self.dir.join("hub.toml");
        let text = self.text();
        std::fs::write(&path, &text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        let out = didhub(&["--config", &path.to_string_lossy(), "validate"]);
        assert!(
            out.status.success(),
            "{} must validate: {}\n{text}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        path
    }
}

/// `s` with a final newline unless it is empty.
fn toml_lines(s: &str) -> String {
    let mut s = s.to_owned();
    if !s.is_empty() && !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Small helpers every test file uses
// ---------------------------------------------------------------------------------------------

/// Runs a future to completion on this thread (packing and unpacking never really wait).
pub fn block<F: std::future::Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

/// Now, in seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Polls `f` every 50 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// The hub DID a hub with `state_dir = dir/state` wrote on start.
pub fn hub_did(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("state/hub.did"))
        .expect("state/hub.did: the hub writes it on start")
        .trim()
        .to_string()
}
