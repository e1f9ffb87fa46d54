//! The local durable store: SQLite (WAL) with group commit.
//!
//! One transaction per batch of messages writes their points (the `points` table in embedded
//! mode, the `outbox` in InfluxDB mode) and their replay-window entries, so a message is either
//! fully committed with its id recorded, or not at all. Only after the commit are the messages
//! acknowledged to the broker.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};

use crate::mapping::Point;

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A row could not be (de)serialised.
    #[error("row encoding: {0}")]
    Encoding(#[from] serde_json::Error),
}

/// Where committed points go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    /// The `points` table is the store.
    Embedded,
    /// The `outbox` table feeds the shipper.
    Outbox,
}

/// One message to commit.
#[derive(Debug, Clone)]
pub struct Commit {
    /// Replay key: the verified sender DID, or "" when anonymous.
    pub sender: String,
    /// The message id.
    pub msg_id: String,
    /// SHA-256 of the raw message bytes.
    pub hash: [u8; 32],
    /// Receive time (ns), kept with the row.
    pub received_ns: i64,
    /// The points, encoded for their table.
    pub rows: Vec<Row>,
}

/// A point encoded for its table. The verify workers encode (in parallel), so the committer,
/// the one serial stage, only inserts.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// A `points` row (embedded store): tags and fields as JSON objects.
    Point {
        /// Measurement name.
        measurement: String,
        /// Nanoseconds since the Unix epoch.
        ts_ns: i64,
        /// Tags, a JSON object.
        tags: String,
        /// Fields, a JSON object.
        fields: String,
    },
    /// An `outbox` row: the point in line protocol.
    Line(String),
}

impl Row {
    /// Encodes `p` for `sink`.
    pub fn encode(p: Point, sink: Sink) -> Result<Row, StoreError> {
        Ok(match sink {
            Sink::Embedded => Row::Point {
                tags: serde_json::to_string(&p.tags)?,
                fields: serde_json::to_string(&p.fields)?,
                measurement: p.measurement,
                ts_ns: p.timestamp_ns,
            },
            Sink::Outbox => Row::Line(p.to_line()),
        })
    }
}

/// What happened to one message in a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitResult {
    /// New: its points are committed.
    Stored,
    /// Same sender, id and bytes as a committed message: a redelivery.
    Duplicate,
    /// Same sender and id, different bytes: a replay.
    ReplayMismatch,
}

/// Opens (creating) the store.
pub fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // The replay index is keyed by message id first: when devices use time-ordered ids (UUIDv7,
    // ULID), a commit's new entries land together at the end of the index instead of one
    // per sender across it, and the commit writes a few pages instead of one per message.
    // Measured in process, signed, Poisson arrivals at 5k/s: the committer's CPU fell from
    // 33-36 to 23-24 µs/post with ordered ids; with random ids (UUIDv4) it is 35 either way.
    // Stores made before this keep (sender, msg_id): the statements work on both.
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS seen (
             sender TEXT NOT NULL,
             msg_id TEXT NOT NULL,
             hash BLOB NOT NULL,
             received_ns INTEGER NOT NULL,
             PRIMARY KEY (msg_id, sender)
         ) WITHOUT ROWID;
         CREATE INDEX IF NOT EXISTS seen_age ON seen(received_ns);
         CREATE TABLE IF NOT EXISTS points (
             seq INTEGER PRIMARY KEY,
             measurement TEXT NOT NULL,
             ts_ns INTEGER NOT NULL,
             tags TEXT NOT NULL,
             fields TEXT NOT NULL,
             msg_id TEXT NOT NULL
         );
         CREATE INDEX IF NOT EXISTS points_m_ts ON points(measurement, ts_ns);
         CREATE TABLE IF NOT EXISTS outbox (
             seq INTEGER PRIMARY KEY AUTOINCREMENT,
             line TEXT NOT NULL
         );
         CREATE TABLE IF NOT EXISTS dead_letters (
             seq INTEGER PRIMARY KEY AUTOINCREMENT,
             line TEXT NOT NULL,
             reason TEXT NOT NULL,
             at_ns INTEGER NOT NULL
         );",
    )?;
    Ok(conn)
}

/// Moves WAL frames into the database file on a thread of its own ("checkpoint"), so the
/// connection it is started for never checkpoints inside a commit: its `wal_autocheckpoint` is
/// set to 0 while the checkpointer runs. The writer calls [`Checkpointer::committed`] after
/// writing; the thread then checkpoints at most every [`CHECKPOINT_EVERY`], and sleeps while
/// nothing is written (an idle hub is not woken). PASSIVE checkpoints never block the writer or
/// readers. Stops (after a last checkpoint, if anything was written since the one before) when
/// dropped.
///
/// The WAL starts again from its beginning only when a transaction begins after a checkpoint
/// that copied *every* frame. Under sustained load the writer appends frames while the thread
/// copies, so the thread's checkpoints never complete and the WAL would grow for as long as the
/// load lasts (measured: 2.2 GB after a million posts). So when the thread finds the WAL over
/// [`WAL_RESTART_FRAMES`], [`Checkpointer::committed`] has the writer copy the last frames
/// itself, between two of its commits: nothing is appended meanwhile, that checkpoint
/// completes, and the next commit restarts the WAL.
pub struct Checkpointer {
    state: std::sync::Arc<(std::sync::Mutex<CheckpointState>, std::sync::Condvar)>,
    handle: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct CheckpointState {
    /// Written since the last checkpoint.
    dirty: bool,
    stop: bool,
    /// The WAL is long (it has not restarted for a while): the writer should complete a
    /// checkpoint.
    writer_finishes: bool,
}

/// How often the checkpointer runs at most. A page written by several commits in between is
/// copied once, so a longer period copies less: A/B at 5k signed posts/s, 3 pairs, hub CPU
/// 88.2 µs/post (mean) at 50 ms against 82.7 at 250 ms, publish → committed p99 the same; at
/// 15k/s 59.0 against 56.2. The WAL grows by at most one period's commits in between.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// WAL length (frames of one page, 4 KiB by default) beyond which the writer completes a
/// checkpoint itself so that the WAL restarts (16 MiB).
pub const WAL_RESTART_FRAMES: i64 = 4096;

/// Runs a PASSIVE checkpoint on `conn`: (frames in the WAL, frames copied), or `None` if it
/// could not run (another checkpoint in progress).
fn checkpoint(conn: &Connection) -> Result<Option<(i64, i64)>, rusqlite::Error> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        let busy: i64 = r.get(0)?;
        Ok((busy == 0).then_some((r.get(1)?, r.get(2)?)))
    })
}

impl Checkpointer {
    /// Starts checkpointing for `writer`'s database; `None` (and `writer` unchanged) for an
    /// in-memory database or if the second connection cannot be opened.
    pub fn start(writer: &Connection) -> Option<Checkpointer> {
        Self::start_with(writer, WAL_RESTART_FRAMES, CHECKPOINT_EVERY)
    }

    /// [`Checkpointer::start`] with another WAL restart limit and period (tests).
    fn start_with(
        writer: &Connection,
        restart_frames: i64,
        every: Duration,
    ) -> Option<Checkpointer> {
        let path = writer.path().filter(|p| !p.is_empty())?.to_string();
        let conn = Connection::open(&path).ok()?;
        conn.busy_timeout(Duration::from_secs(10)).ok()?;
        conn.pragma_update(None, "synchronous", "FULL").ok()?;
        writer.pragma_update(None, "wal_autocheckpoint", 0).ok()?;
        let state: std::sync::Arc<(std::sync::Mutex<CheckpointState>, std::sync::Condvar)> =
            std::sync::Arc::default();
        let shared = state.clone();
        let handle = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                let (lock, wake) = &*shared;
                loop {
                    let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
                    // Asleep until something is written (or the writer stops).
                    while !st.dirty && !st.stop {
                        st = wake.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                    if !st.dirty {
                        return;
                    }
                    // Let commits gather for a while; only stopping cuts that short.
                    st = wake
                        .wait_timeout_while(st, every, |s| !s.stop)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    st.dirty = false;
                    let stop = st.stop;
                    drop(st);
                    match checkpoint(&conn) {
                        // "Copied" counts only the frames there were when it began: a long WAL
                        // means that it has not restarted for a while.
                        Ok(Some((log, _))) => {
                            let long = log > restart_frames;
                            lock.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .writer_finishes = long;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
                            lock.lock().unwrap_or_else(|e| e.into_inner()).dirty = true;
                        }
                    }
                    if stop {
                        return;
                    }
                }
            })
            .ok();
        let Some(handle) = handle else {
            let _ = writer.pragma_update(None, "wal_autocheckpoint", 1000);
            return None;
        };
        Some(Checkpointer {
            state,
            handle: Some(handle),
        })
    }

    /// Tells the checkpointer that `writer` has written (cheap: a lock and a wake-up). When the
    /// WAL is long and not restarting, `writer` first completes a checkpoint itself (see
    /// [`Checkpointer`]): the frames the thread has not copied yet, and an fsync.
    pub fn committed(&self, writer: &Connection) {
        let (lock, wake) = &*self.state;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        // Only a thread waiting for something to be written needs waking. While it lets
        // commits gather it wakes by itself, and a wake-up then would only put it back to
        // sleep: one futex wake and two context switches per commit for nothing.
        let asleep = !std::mem::replace(&mut st.dirty, true);
        let finish = std::mem::take(&mut st.writer_finishes);
        drop(st);
        if asleep {
            wake.notify_one();
        }
        // If it cannot complete (the thread is checkpointing), the thread asks again.
        if finish {
            if let Err(e) = checkpoint(writer) {
                tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
            }
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let (lock, wake) = &*self.state;
        lock.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        wake.notify_one();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// What a commit did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committed {
    /// One result per message, in order.
    pub results: Vec<CommitResult>,
    /// Outbox rows added.
    pub outbox_rows: i64,
    /// Outbox bytes added.
    pub outbox_bytes: i64,
}

/// The two statements that insert [`Row`]s, prepared once for many rows.
struct RowInserts<'c> {
    point: rusqlite::CachedStatement<'c>,
    outbox: rusqlite::CachedStatement<'c>,
}

impl<'c> RowInserts<'c> {
    fn prepare(conn: &'c Connection) -> Result<Self, StoreError> {
        Ok(RowInserts {
            point: conn.prepare_cached(
                "INSERT INTO points (measurement, ts_ns, tags, fields, msg_id) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?,
            outbox: conn.prepare_cached("INSERT INTO outbox (line) VALUES (?1)")?,
        })
    }

    /// Inserts `row` (a points row with `msg_id`); the bytes of an outbox row, `None` for a
    /// points row.
    fn insert(&mut self, row: &Row, msg_id: &str) -> Result<Option<i64>, StoreError> {
        match row {
            Row::Point {
                measurement,
                ts_ns,
                tags,
                fields,
            } => {
                self.point
                    .execute(params![measurement, ts_ns, tags, fields, msg_id])?;
                Ok(None)
            }
            Row::Line(line) => {
                self.outbox.execute(params![line])?;
                Ok(Some(line.len() as i64))
            }
        }
    }
}

/// Commits a batch in one transaction.
pub fn commit_batch(conn: &mut Connection, batch: &[&Commit]) -> Result<Committed, StoreError> {
    let tx = conn.transaction()?;
    let mut results = Vec::with_capacity(batch.len());
    let (mut outbox_rows, mut outbox_bytes) = (0i64, 0i64);
    {
        let mut seen = tx.prepare_cached(
            "INSERT INTO seen (sender, msg_id, hash, received_ns) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT DO NOTHING",
        )?;
        let mut seen_hash =
            tx.prepare_cached("SELECT hash FROM seen WHERE sender = ?1 AND msg_id = ?2")?;
        let mut rows = RowInserts::prepare(&tx)?;
        for c in batch {
            let inserted = seen.execute(params![c.sender, c.msg_id, &c.hash[..], c.received_ns])?;
            if inserted == 0 {
                let prev: Option<Vec<u8>> = seen_hash
                    .query_row(params![c.sender, c.msg_id], |r| r.get(0))
                    .optional()?;
                results.push(if prev.as_deref() == Some(&c.hash[..]) {
                    CommitResult::Duplicate
                } else {
                    CommitResult::ReplayMismatch
                });
                continue;
            }
            for row in &c.rows {
                if let Some(bytes) = rows.insert(row, &c.msg_id)? {
                    outbox_rows += 1;
                    outbox_bytes += bytes;
                }
            }
            results.push(CommitResult::Stored);
        }
    }
    tx.commit()?;
    Ok(Committed {
        results,
        outbox_rows,
        outbox_bytes,
    })
}

/// Inserts one internal point (the hub's own statistics) outside the replay window; returns
/// the outbox bytes it added (0 in embedded mode).
pub fn insert_point(conn: &Connection, sink: Sink, p: Point) -> Result<i64, StoreError> {
    let row = Row::encode(p, sink)?;
    Ok(RowInserts::prepare(conn)?.insert(&row, "")?.unwrap_or(0))
}

/// Rows and bytes waiting in the outbox.
pub fn outbox_size(conn: &Connection) -> Result<(i64, i64), StoreError> {
    Ok(conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(LENGTH(line)), 0) FROM outbox",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?)
}

/// Forgets replay-window entries received before `cutoff_ns`.
pub fn expire_seen(conn: &Connection, cutoff_ns: i64) -> Result<usize, StoreError> {
    Ok(conn.execute(
        "DELETE FROM seen WHERE received_ns < ?1",
        params![cutoff_ns],
    )?)
}

/// Up to `limit` outbox rows, oldest first.
pub fn outbox_batch(conn: &Connection, limit: usize) -> Result<Vec<(i64, String)>, StoreError> {
    let mut st = conn.prepare_cached("SELECT seq, line FROM outbox ORDER BY seq LIMIT ?1")?;
    let rows = st
        .query_map(params![limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Hands up to `limit` outbox rows with `seq > after` to `row`, oldest first, without copying
/// the lines; returns how many. Seqs only grow (`AUTOINCREMENT`, one writer at a time), so a
/// cursor never misses a row that appears later.
pub fn outbox_scan_after(
    conn: &Connection,
    after: i64,
    limit: usize,
    mut row: impl FnMut(i64, &str),
) -> Result<usize, StoreError> {
    let mut st =
        conn.prepare_cached("SELECT seq, line FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
    let mut rows = st.query(params![after, limit as i64])?;
    let mut n = 0;
    while let Some(r) = rows.next()? {
        let line = r.get_ref(1)?.as_str().map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, e.into())
        })?;
        row(r.get(0)?, line);
        n += 1;
    }
    Ok(n)
}

/// Deletes the outbox rows `seqs` (after the store accepted them), in one transaction and one
/// statement per run of consecutive seqs: a shipped batch is one run unless dead letters cut it.
pub fn outbox_delete(conn: &mut Connection, seqs: &[i64]) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    {
        let mut st = tx.prepare_cached("DELETE FROM outbox WHERE seq BETWEEN ?1 AND ?2")?;
        let mut start = 0;
        for i in 1..=seqs.len() {
            if i == seqs.len() || seqs[i] != seqs[i - 1] + 1 {
                st.execute(params![seqs[start], seqs[i - 1]])?;
                start = i;
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// Moves outbox rows the store refused for good to `dead_letters`, with its reason.
pub fn outbox_dead_letter(
    conn: &mut Connection,
    rows: &[(i64, String)],
    reason: &str,
    now_ns: i64,
) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    {
        let mut ins = tx
            .prepare_cached("INSERT INTO dead_letters (line, reason, at_ns) VALUES (?1, ?2, ?3)")?;
        let mut del = tx.prepare_cached("DELETE FROM outbox WHERE seq = ?1")?;
        for (seq, line) in rows {
            ins.execute(params![line, reason, now_ns])?;
            del.execute(params![seq])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Number of rows waiting in the outbox.
pub fn outbox_len(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?)
}

/// A stored point read back.
pub fn query_points(
    conn: &Connection,
    measurement: Option<&str>,
    since_ns: i64,
    limit: usize,
) -> Result<Vec<Point>, StoreError> {
    let mut st = conn.prepare(
        "SELECT measurement, ts_ns, tags, fields FROM points
         WHERE (?1 IS NULL OR measurement = ?1) AND ts_ns >= ?2
         ORDER BY ts_ns, seq LIMIT ?3",
    )?;
    let rows = st.query_map(params![measurement, since_ns, limit as i64], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (measurement, ts, tags, fields) = row?;
        out.push(Point {
            measurement,
            tags: serde_json::from_str(&tags)?,
            fields: serde_json::from_str(&fields)?,
            timestamp_ns: ts,
        });
    }
    Ok(out)
}

/// Dead letters: (line, reason, at_ns).
pub fn dead_letters(conn: &Connection) -> Result<Vec<(String, String, i64)>, StoreError> {
    let mut st = conn.prepare("SELECT line, reason, at_ns FROM dead_letters ORDER BY seq")?;
    let rows = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapping::FieldValue;

    fn commit(id: &str, hash: u8, sink: Sink) -> Commit {
        let mut fields = std::collections::BTreeMap::new();
        fields.insert("v".to_string(), FieldValue::Float(1.0));
        Commit {
            sender: "did:key:z1".into(),
            msg_id: id.into(),
            hash: [hash; 32],
            received_ns: 10,
            rows: vec![Row::encode(
                Point {
                    measurement: "m".into(),
                    tags: Default::default(),
                    fields,
                    timestamp_ns: 10,
                },
                sink,
            )
            .unwrap()],
        }
    }

    /// Duplicates, replays and the same id from another sender, on the store at `path`.
    fn tells_apart(path: &Path) {
        let mut c = open(path).unwrap();
        let (a, b, a2, a3) = (
            commit("a", 1, Sink::Embedded),
            commit("b", 1, Sink::Embedded),
            commit("a", 1, Sink::Embedded),
            commit("a", 2, Sink::Embedded),
        );
        let other = Commit {
            sender: "did:key:z2".into(),
            ..commit("a", 1, Sink::Embedded)
        };
        let r = commit_batch(&mut c, &[&a, &b, &a2]).unwrap();
        assert_eq!(
            r.results,
            vec![
                CommitResult::Stored,
                CommitResult::Stored,
                CommitResult::Duplicate
            ]
        );
        let r = commit_batch(&mut c, &[&a3, &other]).unwrap();
        assert_eq!(
            r.results,
            vec![CommitResult::ReplayMismatch, CommitResult::Stored]
        );
        assert_eq!(query_points(&c, Some("m"), 0, 100).unwrap().len(), 3);
        assert_eq!(expire_seen(&c, 11).unwrap(), 3);
    }

    #[test]
    fn duplicates_and_replays_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        tells_apart(&dir.path().join("t.db"));
    }

    #[test]
    fn a_store_with_the_replay_index_keyed_by_sender_first_still_works() {
        // The layout of stores made before the index was keyed by message id first.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TABLE seen (
                     sender TEXT NOT NULL,
                     msg_id TEXT NOT NULL,
                     hash BLOB NOT NULL,
                     received_ns INTEGER NOT NULL,
                     PRIMARY KEY (sender, msg_id)
                 ) WITHOUT ROWID;",
            )
            .unwrap();
        tells_apart(&path);
        let sql: String = open(&path)
            .unwrap()
            .query_row(
                "SELECT sql FROM sqlite_master WHERE name = 'seen'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(sql.contains("PRIMARY KEY (sender, msg_id)"), "{sql}");
    }

    #[test]
    fn outbox_rows_leave_only_when_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open(&dir.path().join("t.db")).unwrap();
        let done = commit_batch(
            &mut c,
            &[&commit("a", 1, Sink::Outbox), &commit("b", 1, Sink::Outbox)],
        )
        .unwrap();
        assert_eq!((done.outbox_rows, done.outbox_bytes), (2, 20));
        assert_eq!(outbox_size(&c).unwrap(), (2, 20));
        let rows = outbox_batch(&c, 10).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].1, "m v=1.0 10");
        outbox_delete(&mut c, &[rows[0].0]).unwrap();
        outbox_dead_letter(&mut c, &rows[1..], "400: bad", 1).unwrap();
        assert_eq!(outbox_len(&c).unwrap(), 0);
        assert_eq!(dead_letters(&c).unwrap()[0].1, "400: bad");
    }

    #[test]
    fn the_checkpointer_moves_the_wal_into_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        let mut c = open(&db).unwrap();
        let checkpointer = Checkpointer::start(&c).expect("a file database");
        // The writer no longer checkpoints itself: only the checkpointer can grow the file.
        let auto: i64 = c
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .unwrap();
        assert_eq!(auto, 0);
        let before = std::fs::metadata(&db).unwrap().len();
        let commits: Vec<Commit> = (0..2000)
            .map(|i| commit(&format!("id-{i}"), 1, Sink::Embedded))
            .collect();
        for chunk in commits.chunks(100) {
            let refs: Vec<&Commit> = chunk.iter().collect();
            commit_batch(&mut c, &refs).unwrap();
            checkpointer.committed(&c);
        }
        // Wait (up to 20 s, normally one period) for the pages to reach the file.
        let grown = (0..400).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            std::fs::metadata(&db).unwrap().len() > before + 100 * 1024
        });
        drop(checkpointer);
        assert!(grown, "the database file stayed at {before} bytes");
        let rows: i64 = c
            .query_row("SELECT COUNT(*) FROM points", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 2000);
    }

    /// Under writes without a pause the WAL must still restart. Each commit here appends at
    /// least 100 frames (100 outbox rows of 4 KiB), 10 000 in all (40 MB); with a restart
    /// limit of 64 frames the WAL stays at what is written between two runs of the thread
    /// (50 ms, paced by a 5 ms pause between commits) and never nears that. Without the
    /// writer's checkpoint it grew to the whole 40 MB (checked).
    #[test]
    fn the_wal_restarts_under_sustained_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        let mut c = open(&db).unwrap();
        let checkpointer =
            Checkpointer::start_with(&c, 64, Duration::from_millis(50)).expect("a file database");
        let wal = dir.path().join("t.db-wal");
        let mut largest = 0u64;
        for round in 0..100 {
            let commits: Vec<Commit> = (0..100)
                .map(|i| Commit {
                    sender: String::new(),
                    msg_id: format!("{round}-{i}"),
                    hash: [0; 32],
                    received_ns: 0,
                    rows: vec![Row::Line("x".repeat(4096))],
                })
                .collect();
            let refs: Vec<&Commit> = commits.iter().collect();
            commit_batch(&mut c, &refs).unwrap();
            checkpointer.committed(&c);
            largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(checkpointer);
        println!("largest WAL: {largest} bytes");
        assert!(
            largest < 20_000_000,
            "the WAL grew to {largest} bytes of the 40 MB written"
        );
    }
}
