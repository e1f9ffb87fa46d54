//! Route: a verified payload becomes time-series points. Pure functions, no I/O.
//!
//! Fields are the payload flattened with `_` (`{"a":{"b":1}}` → `a_b`), arrays by index
//! (`v_0`), numbers as floats, bools, strings; a scalar payload is the field `value`; nulls are
//! skipped. Tags: `did`, topic tags, registry tags. Every point carries the string field `thid`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A field value as InfluxDB knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FieldValue {
    /// Every JSON number is stored as a float.
    Float(f64),
    /// A JSON bool.
    Bool(bool),
    /// A JSON string.
    Str(String),
}

/// One time-series point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Measurement name.
    pub measurement: String,
    /// Tags (sorted, so line protocol is canonical and re-sent points are identical).
    pub tags: BTreeMap<String, String>,
    /// Fields.
    pub fields: BTreeMap<String, FieldValue>,
    /// Nanoseconds since the Unix epoch.
    pub timestamp_ns: i64,
}

/// Why a payload cannot be stored (all map to `e.p.msg.iota.post.reject-post`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MapError {
    /// Nothing storable: null, empty object or array, or only nulls.
    #[error("the payload has nothing storable (null, empty, or only nulls)")]
    Empty,
    /// Nesting deeper than the limit.
    #[error("the payload nests deeper than {0} levels")]
    TooDeep(usize),
    /// More fields than the limit.
    #[error("the payload has more than {0} fields")]
    TooManyFields(usize),
    /// A number that is not finite as a float.
    #[error("field `{0}` is a number that does not fit a 64-bit float")]
    BadNumber(String),
    /// The timestamp path is missing or unreadable.
    #[error("timestamp `{path}`: {reason}")]
    Timestamp {
        /// The configured payload path.
        path: String,
        /// What was wrong.
        reason: String,
    },
}

/// How the payload timestamp is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestampFormat {
    /// Strings as RFC 3339; numbers by magnitude (s, ms, µs or ns).
    #[default]
    Auto,
    /// RFC 3339 string.
    Rfc3339,
    /// Epoch seconds (may be fractional).
    Unix,
    /// Epoch milliseconds.
    UnixMs,
    /// Epoch microseconds.
    UnixUs,
    /// Epoch nanoseconds.
    UnixNs,
}

/// Limits of the mapper.
#[derive(Debug, Clone, Copy)]
pub struct MapLimits {
    /// Deepest nesting.
    pub max_depth: usize,
    /// Most fields.
    pub max_fields: usize,
}

/// Flattens a payload into fields.
pub fn flatten_payload(
    payload: &Value,
    limits: MapLimits,
    skip_path: Option<&str>,
) -> Result<BTreeMap<String, FieldValue>, MapError> {
    let mut out = BTreeMap::new();
    match payload {
        Value::Object(_) | Value::Array(_) => {
            let mut prefix = String::new();
            walk(payload, &mut prefix, 0, limits, skip_path, &mut out)?;
        }
        scalar => {
            if let Some(v) = scalar_value(scalar, "value")? {
                out.insert("value".to_string(), v);
            }
        }
    }
    if out.is_empty() {
        return Err(MapError::Empty);
    }
    Ok(out)
}

fn scalar_value(v: &Value, name: &str) -> Result<Option<FieldValue>, MapError> {
    Ok(match v {
        Value::Null => None,
        Value::Bool(b) => Some(FieldValue::Bool(*b)),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.is_finite() => Some(FieldValue::Float(f)),
            _ => return Err(MapError::BadNumber(name.to_string())),
        },
        Value::String(s) => Some(FieldValue::Str(s.clone())),
        Value::Array(_) | Value::Object(_) => None,
    })
}

fn walk(
    v: &Value,
    prefix: &mut String,
    depth: usize,
    limits: MapLimits,
    skip_path: Option<&str>,
    out: &mut BTreeMap<String, FieldValue>,
) -> Result<(), MapError> {
    if depth >= limits.max_depth {
        return Err(MapError::TooDeep(limits.max_depth));
    }
    let mut visit = |key: &str, child: &Value, prefix: &mut String| -> Result<(), MapError> {
        let len = prefix.len();
        if !prefix.is_empty() {
            prefix.push('_');
        }
        prefix.push_str(key);
        let r = match child {
            Value::Object(_) | Value::Array(_) => {
                walk(child, prefix, depth + 1, limits, skip_path, out)
            }
            scalar => {
                if let Some(fv) = scalar_value(scalar, prefix)? {
                    if out.len() >= limits.max_fields {
                        return Err(MapError::TooManyFields(limits.max_fields));
                    }
                    out.insert(prefix.clone(), fv);
                }
                Ok(())
            }
        };
        prefix.truncate(len);
        r
    };
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                if depth == 0 && skip_path == Some(k.as_str()) {
                    continue;
                }
                visit(k, child, prefix)?;
            }
        }
        Value::Array(items) => {
            let mut idx = String::new();
            for (i, child) in items.iter().enumerate() {
                idx.clear();
                let _ = write!(idx, "{i}");
                visit(&idx, child, prefix)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Looks a dot-separated path up in a payload.
pub fn lookup<'a>(payload: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(payload, |v, seg| match v {
        Value::Object(m) => m.get(seg),
        Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

/// Reads a timestamp value as nanoseconds since the epoch.
pub fn parse_timestamp(v: &Value, format: TimestampFormat) -> Result<i64, String> {
    match (v, format) {
        (Value::String(s), TimestampFormat::Auto | TimestampFormat::Rfc3339) => {
            let t = humantime::parse_rfc3339_weak(s)
                .or_else(|_| humantime::parse_rfc3339(s))
                .map_err(|e| format!("`{s}` is not RFC 3339: {e}"))?;
            let d = t
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|_| format!("`{s}` is before 1970"))?;
            i64::try_from(d.as_nanos()).map_err(|_| format!("`{s}` is too far in the future"))
        }
        (Value::Number(n), f) if f != TimestampFormat::Rfc3339 => {
            let x = n.as_f64().ok_or("not a number")?;
            if !x.is_finite() || x < 0.0 {
                return Err(format!("{x} is not a valid epoch time"));
            }
            let scale: i64 = match f {
                TimestampFormat::Unix => 1_000_000_000,
                TimestampFormat::UnixMs => 1_000_000,
                TimestampFormat::UnixUs => 1_000,
                TimestampFormat::UnixNs => 1,
                // By magnitude: seconds until year 5138, then ms, µs, ns.
                _ if x < 1e11 => 1_000_000_000,
                _ if x < 1e14 => 1_000_000,
                _ if x < 1e17 => 1_000,
                _ => 1,
            };
            // Integers exactly; fractions through f64.
            if let Some(i) = n.as_i64() {
                return i
                    .checked_mul(scale)
                    .ok_or_else(|| format!("{x} is too far in the future"));
            }
            let ns = x * scale as f64;
            if ns >= i64::MAX as f64 {
                return Err(format!("{x} is too far in the future"));
            }
            Ok(ns as i64)
        }
        (other, f) => Err(format!("{other} cannot be read as a {f:?} timestamp")),
    }
}

/// A Telegraf-style topic pattern: `devices/+device/telemetry` names level 2 `device`;
/// `+` alone skips a level; `#` ends the pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPattern {
    levels: Vec<Level>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(String),
    Tag(String),
    Skip,
    Rest,
}

impl TopicPattern {
    /// Parses a pattern; the error says what is wrong.
    pub fn parse(p: &str) -> Result<TopicPattern, String> {
        let parts: Vec<&str> = p.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let level = if *part == "#" {
                if i != parts.len() - 1 {
                    return Err(format!("`{p}`: `#` must be the last level"));
                }
                Level::Rest
            } else if *part == "+" {
                Level::Skip
            } else if let Some(name) = part.strip_prefix('+') {
                if name.is_empty()
                    || !name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    return Err(format!(
                        "`{p}`: tag name `{name}` must be letters, digits, `_` or `-`"
                    ));
                }
                if matches!(name, "did" | "thid") {
                    return Err(format!("`{p}`: tag name `{name}` is reserved"));
                }
                Level::Tag(name.to_string())
            } else if part.contains('+') || part.contains('#') {
                return Err(format!("`{p}`: wildcards must be whole levels"));
            } else {
                Level::Literal(part.to_string())
            };
            levels.push(level);
        }
        Ok(TopicPattern { levels })
    }

    /// The tags of `topic`, or `None` when the topic does not fit the pattern.
    pub fn tags(&self, topic: &str) -> Option<Vec<(String, String)>> {
        let mut out = Vec::new();
        let mut segs = topic.split('/');
        for level in &self.levels {
            match level {
                Level::Rest => return Some(out),
                l => {
                    let seg = segs.next()?;
                    match l {
                        Level::Literal(s) if s != seg => return None,
                        Level::Tag(name) if !seg.is_empty() => {
                            out.push((name.clone(), seg.to_string()))
                        }
                        _ => {}
                    }
                }
            }
        }
        if segs.next().is_some() {
            return None;
        }
        Some(out)
    }
}

/// What the mapper needs besides the payload.
#[derive(Debug, Clone)]
pub struct MapInput<'a> {
    /// Measurement name.
    pub measurement: &'a str,
    /// The verified sender DID (tag `did`), if any.
    pub did: Option<&'a str>,
    /// The thread id (field `thid`).
    pub thid: &'a str,
    /// Topic tags and registry tags.
    pub extra_tags: &'a [(String, String)],
    /// The payload path of the timestamp.
    pub timestamp_path: Option<&'a str>,
    /// How that timestamp is written.
    pub timestamp_format: TimestampFormat,
    /// The hub's receive time, used when there is no timestamp path.
    pub received_ns: i64,
    /// Limits.
    pub limits: MapLimits,
}

/// Maps one payload to its point.
pub fn map_payload(payload: &Value, input: &MapInput<'_>) -> Result<Point, MapError> {
    let timestamp_ns = match input.timestamp_path {
        None => input.received_ns,
        Some(path) => {
            let v = lookup(payload, path).ok_or_else(|| MapError::Timestamp {
                path: path.to_string(),
                reason: "not present in the payload".into(),
            })?;
            parse_timestamp(v, input.timestamp_format).map_err(|reason| MapError::Timestamp {
                path: path.to_string(),
                reason,
            })?
        }
    };
    // A top-level timestamp member is the point's time, not a field.
    let skip = input.timestamp_path.filter(|p| !p.contains('.'));
    let mut fields = flatten_payload(payload, input.limits, skip)?;
    fields.insert("thid".into(), FieldValue::Str(input.thid.to_string()));
    let mut tags = BTreeMap::new();
    for (k, v) in input.extra_tags {
        if !v.is_empty() {
            tags.insert(k.clone(), v.clone());
        }
    }
    if let Some(did) = input.did {
        tags.insert("did".into(), did.to_string());
    }
    Ok(Point {
        measurement: input.measurement.to_string(),
        tags,
        fields,
        timestamp_ns,
    })
}

fn escape(out: &mut String, s: &str, specials: &[char]) {
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if specials.contains(&c) || c == '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
}

impl Point {
    /// InfluxDB line protocol, nanosecond precision.
    pub fn to_line(&self) -> String {
        let mut s = String::with_capacity(128);
        escape(&mut s, &self.measurement, &[',', ' ']);
        for (k, v) in &self.tags {
            s.push(',');
            escape(&mut s, k, &[',', '=', ' ']);
            s.push('=');
            escape(&mut s, v, &[',', '=', ' ']);
        }
        let mut first = true;
        for (k, v) in &self.fields {
            s.push(if first { ' ' } else { ',' });
            first = false;
            escape(&mut s, k, &[',', '=', ' ']);
            s.push('=');
            match v {
                FieldValue::Float(f) => {
                    let _ = write!(s, "{f:?}");
                }
                FieldValue::Bool(b) => s.push_str(if *b { "true" } else { "false" }),
                FieldValue::Str(v) => {
                    s.push('"');
                    for c in v.chars() {
                        if c == '"' || c == '\\' {
                            s.push('\\');
                        }
                        s.push(c);
                    }
                    s.push('"');
                }
            }
        }
        let _ = write!(s, " {}", self.timestamp_ns);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const L: MapLimits = MapLimits {
        max_depth: 16,
        max_fields: 256,
    };

    fn input<'a>(tags: &'a [(String, String)]) -> MapInput<'a> {
        MapInput {
            measurement: "telemetry",
            did: Some("did:key:z6Mk1"),
            thid: "t-1",
            extra_tags: tags,
            timestamp_path: None,
            timestamp_format: TimestampFormat::Auto,
            received_ns: 1_700_000_000_000_000_000,
            limits: L,
        }
    }

    #[test]
    fn flattens_objects_and_arrays() {
        let f = flatten_payload(
            &json!({"a":{"b":1},"v":[1,2],"ok":true,"s":"x","n":null}),
            L,
            None,
        )
        .unwrap();
        assert_eq!(f["a_b"], FieldValue::Float(1.0));
        assert_eq!(f["v_0"], FieldValue::Float(1.0));
        assert_eq!(f["v_1"], FieldValue::Float(2.0));
        assert_eq!(f["ok"], FieldValue::Bool(true));
        assert_eq!(f["s"], FieldValue::Str("x".into()));
        assert!(!f.contains_key("n"));
    }

    #[test]
    fn scalar_payload_is_value() {
        let f = flatten_payload(&json!(42), L, None).unwrap();
        assert_eq!(f["value"], FieldValue::Float(42.0));
        let f = flatten_payload(&json!("Hello, world"), L, None).unwrap();
        assert_eq!(f["value"], FieldValue::Str("Hello, world".into()));
    }

    #[test]
    fn nothing_storable_is_rejected() {
        for p in [json!(null), json!({}), json!([]), json!({"a":null,"b":{}})] {
            assert_eq!(flatten_payload(&p, L, None), Err(MapError::Empty), "{p}");
        }
    }

    #[test]
    fn limits_hold() {
        let mut deep = json!(1);
        for _ in 0..20 {
            deep = json!({ "a": deep });
        }
        assert_eq!(flatten_payload(&deep, L, None), Err(MapError::TooDeep(16)));
        let many: serde_json::Map<String, Value> =
            (0..300).map(|i| (format!("f{i}"), json!(i))).collect();
        assert_eq!(
            flatten_payload(&Value::Object(many), L, None),
            Err(MapError::TooManyFields(256))
        );
    }

    #[test]
    fn point_has_did_thid_and_tags() {
        let tags = vec![("device".to_string(), "d1".to_string())];
        let p = map_payload(&json!({"temp": 21.5}), &input(&tags)).unwrap();
        assert_eq!(p.tags["did"], "did:key:z6Mk1");
        assert_eq!(p.tags["device"], "d1");
        assert_eq!(p.fields["thid"], FieldValue::Str("t-1".into()));
        assert_eq!(p.timestamp_ns, 1_700_000_000_000_000_000);
        assert_eq!(
            p.to_line(),
            "telemetry,device=d1,did=did:key:z6Mk1 temp=21.5,thid=\"t-1\" 1700000000000000000"
        );
    }

    #[test]
    fn timestamps_from_payload() {
        let tags = vec![];
        let mut i = input(&tags);
        i.timestamp_path = Some("ts");
        for (ts, want) in [
            (json!(1_700_000_000), 1_700_000_000_000_000_000i64),
            (json!(1_700_000_000_123u64), 1_700_000_000_123_000_000),
            (json!(1_700_000_000_123_456u64), 1_700_000_000_123_456_000),
            (
                json!(1_700_000_000_123_456_789u64),
                1_700_000_000_123_456_789,
            ),
            (json!("2023-11-14T22:13:20Z"), 1_700_000_000_000_000_000),
            (json!("2023-11-14T22:13:20.5Z"), 1_700_000_000_500_000_000),
        ] {
            let p = map_payload(&json!({"ts": ts, "t": 1}), &i).unwrap();
            assert_eq!(p.timestamp_ns, want, "{ts}");
            assert!(!p.fields.contains_key("ts"));
        }
        let e = map_payload(&json!({"t": 1}), &i).unwrap_err();
        assert!(matches!(e, MapError::Timestamp { .. }));
        let e = map_payload(&json!({"ts": "yesterday", "t": 1}), &i).unwrap_err();
        assert!(matches!(e, MapError::Timestamp { .. }));
    }

    #[test]
    fn topic_patterns() {
        let p = TopicPattern::parse("devices/+device/+kind").unwrap();
        assert_eq!(
            p.tags("devices/d1/telemetry").unwrap(),
            vec![
                ("device".to_string(), "d1".to_string()),
                ("kind".to_string(), "telemetry".to_string())
            ]
        );
        assert_eq!(p.tags("devices/d1"), None);
        assert_eq!(p.tags("other/d1/x"), None);
        let p = TopicPattern::parse("site/+site/#").unwrap();
        assert_eq!(p.tags("site/lab/a/b").unwrap().len(), 1);
        assert!(TopicPattern::parse("a/+did").is_err());
        assert!(TopicPattern::parse("a/#/b").is_err());
        assert!(TopicPattern::parse("a/x+y").is_err());
    }

    #[test]
    fn line_protocol_escapes() {
        let mut tags = BTreeMap::new();
        tags.insert("a b".into(), "c,d=e".into());
        let mut fields = BTreeMap::new();
        fields.insert("s".into(), FieldValue::Str("q\"\\".into()));
        fields.insert("x".into(), FieldValue::Float(1.0));
        let p = Point {
            measurement: "m x".into(),
            tags,
            fields,
            timestamp_ns: 5,
        };
        assert_eq!(p.to_line(), r#"m\ x,a\ b=c\,d\=e s="q\"\\",x=1.0 5"#);
    }

    fn arb_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|i| json!(i)),
            any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
                .map(Value::Number)
                .unwrap_or(Value::Null)),
            ".{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(24, 512, 12, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..12).prop_map(Value::Array),
                proptest::collection::btree_map(".{0,6}", inner, 0..12)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn mapper_never_panics(v in arb_json(), depth in 1usize..30, fields in 1usize..64) {
            let tags = vec![("t".to_string(), "x".to_string())];
            let mut i = input(&tags);
            i.limits = MapLimits { max_depth: depth, max_fields: fields };
            if let Ok(p) = map_payload(&v, &i) {
                // One extra field: thid.
                proptest::prop_assert!(p.fields.len() <= fields + 1);
                let _ = p.to_line();
            }
            i.timestamp_path = Some("a.b");
            let _ = map_payload(&v, &i);
        }
    }
}
