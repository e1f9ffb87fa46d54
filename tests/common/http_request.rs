//! Reading one HTTP/1.1 request, for the scripted stores that stand in for InfluxDB where a
//! real server cannot be made to fail on demand. Shared by `tests/faults.rs` (through
//! `common`) and the shipper's unit tests in `src/ship.rs` (through `#[path]`).
#![allow(dead_code)]

use std::io::{BufRead, Read};

/// One request: its request line and its body, gunzipped if it came with
/// `Content-Encoding: gzip`.
pub struct Request {
    /// `POST /api/v2/write?… HTTP/1.1`.
    pub line: String,
    /// The body as text (lossy UTF-8).
    pub body: String,
    /// Whether it came gzipped.
    pub gzip: bool,
}

/// Reads the next request from a keep-alive connection; `None` when the client closed it or
/// the request is cut short.
pub fn read_request(reader: &mut impl BufRead) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return None;
    }
    let (mut len, mut gzip) = (0usize, false);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        let h = h.to_ascii_lowercase();
        if let Some(v) = h.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if let Some(v) = h.strip_prefix("content-encoding:") {
            gzip = v.trim() == "gzip";
        }
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).ok()?;
    if gzip {
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut plain)
            .expect("a gzip body");
        body = plain;
    }
    Some(Request {
        line,
        body: String::from_utf8_lossy(&body).into_owned(),
        gzip,
    })
}
