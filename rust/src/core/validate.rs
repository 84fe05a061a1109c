//! The one validator of observation events.
//!
//! Every observation that enters the service — a sensor's HTTP body, a
//! batch handed over by the API, a DECNET-style event on the bus — goes
//! through [`validate`]. It returns the accepted items in a canonical form
//! (what is stored and merged) and one [`Rejection`] per refused item, with
//! a stable [`Reason`] code and a message. It accepts nothing that the
//! engine would refuse later, so an accepted item always merges.
//!
//! The rules (also the README's table):
//!
//! | field | rule | code |
//! |---|---|---|
//! | item | a JSON object with only the known fields | `invalid_json`, `not_object`, `unknown_field` |
//! | `attacker_uuid` | 1–64 characters of `[A-Za-z0-9-]` | `bad_attacker_uuid` |
//! | `primitive` | a registered primitive; equal to the topic's, when there is a topic | `bad_primitive`, `unknown_primitive`, `topic_mismatch` |
//! | `value` | present; compact JSON ≤ `max_value_bytes`; nesting ≤ 32; a finite number (or numeric string, bool, null) for numeric primitives | `missing_value`, `value_too_large`, `value_too_deep`, `value_not_numeric` |
//! | `ts` | a finite number inside the accepted range | `bad_ts`, `ts_out_of_range` |
//! | `confidence` | null or a number in [0, 1] | `bad_confidence` |
//! | `id` | 1–128 characters of `[A-Za-z0-9_.:-]`; unique in the batch | `bad_id`, `duplicate` |
//! | `window` | `{start_ts, end_ts}`, finite, `end_ts ≥ start_ts` | `bad_window` |
//! | `source`, `evidence_ref` | non-empty strings of ≤ 512 characters | `bad_source`, `bad_evidence_ref` |
//! | `identity_ref` | null or a non-empty string of ≤ 128 characters | `bad_identity_ref` |
//! | `attacker_ip` | an IPv4/IPv6 address (stored normalised) | `bad_attacker_ip` |
//! | `v` | 1 | `bad_version` |
//! | any text | no NUL character | `nul_character` |

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::hash::BuildHasher;
use std::net::IpAddr;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value as J};

use super::merge::Kind;
use super::obs::{canonical_json, ValueIn};
use super::registry::Registry;
use super::value::{write_float, write_json_str};

pub const MAX_ID: usize = 128;
/// Attacker uuids: 1–64 characters of `[A-Za-z0-9-]` (a UUID in any usual
/// spelling; nothing a log line, URL path or HTML page would interpret).
pub const MAX_ATTACKER_UUID: usize = 64;
pub const ATTACKER_UUID_ALPHABET: &str = "[A-Za-z0-9-]";
pub const MAX_TEXT: usize = 512;
pub const MAX_IDENTITY_REF: usize = 128;
pub const MAX_IP: usize = 64;
pub const ID_ALPHABET: &str = "[A-Za-z0-9_.:-]";

/// Why an item was refused: a stable code (the API and dead letters carry
/// it) plus a message for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    InvalidJson,
    NotObject,
    UnknownField,
    BadAttackerUuid,
    BadPrimitive,
    UnknownPrimitive,
    TopicMismatch,
    MissingValue,
    ValueTooLarge,
    ValueTooDeep,
    ValueNotNumeric,
    BadTs,
    TsOutOfRange,
    BadConfidence,
    BadId,
    Duplicate,
    BadWindow,
    BadSource,
    BadEvidenceRef,
    BadIdentityRef,
    BadAttackerIp,
    BadVersion,
    NulCharacter,
}

impl Reason {
    pub const ALL: [Reason; 23] = [
        Reason::InvalidJson,
        Reason::NotObject,
        Reason::UnknownField,
        Reason::BadAttackerUuid,
        Reason::BadPrimitive,
        Reason::UnknownPrimitive,
        Reason::TopicMismatch,
        Reason::MissingValue,
        Reason::ValueTooLarge,
        Reason::ValueTooDeep,
        Reason::ValueNotNumeric,
        Reason::BadTs,
        Reason::TsOutOfRange,
        Reason::BadConfidence,
        Reason::BadId,
        Reason::Duplicate,
        Reason::BadWindow,
        Reason::BadSource,
        Reason::BadEvidenceRef,
        Reason::BadIdentityRef,
        Reason::BadAttackerIp,
        Reason::BadVersion,
        Reason::NulCharacter,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Reason::InvalidJson => "invalid_json",
            Reason::NotObject => "not_object",
            Reason::UnknownField => "unknown_field",
            Reason::BadAttackerUuid => "bad_attacker_uuid",
            Reason::BadPrimitive => "bad_primitive",
            Reason::UnknownPrimitive => "unknown_primitive",
            Reason::TopicMismatch => "topic_mismatch",
            Reason::MissingValue => "missing_value",
            Reason::ValueTooLarge => "value_too_large",
            Reason::ValueTooDeep => "value_too_deep",
            Reason::ValueNotNumeric => "value_not_numeric",
            Reason::BadTs => "bad_ts",
            Reason::TsOutOfRange => "ts_out_of_range",
            Reason::BadConfidence => "bad_confidence",
            Reason::BadId => "bad_id",
            Reason::Duplicate => "duplicate",
            Reason::BadWindow => "bad_window",
            Reason::BadSource => "bad_source",
            Reason::BadEvidenceRef => "bad_evidence_ref",
            Reason::BadIdentityRef => "bad_identity_ref",
            Reason::BadAttackerIp => "bad_attacker_ip",
            Reason::BadVersion => "bad_version",
            Reason::NulCharacter => "nul_character",
        }
    }
}

/// One refused item.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    pub index: usize,
    pub reason: Reason,
    pub message: String,
}

/// One accepted observation, canonical and owned.
#[derive(Clone, Debug)]
pub struct Valid {
    pub index: usize,
    pub id: String,
    pub attacker_uuid: String,
    pub primitive: String,
    pub kind: Kind,
    pub value: ValueIn<'static>,
    pub value_json: String,
    pub ts: f64,
    pub confidence: Option<f64>,
    pub window: Option<(f64, f64)>,
    pub source: Option<String>,
    pub evidence_ref: String,
    pub identity_ref: Option<String>,
    pub attacker_ip: Option<String>,
}

/// What [`validate`] needs besides the items.
#[derive(Clone, Debug)]
pub struct Options {
    pub max_value_bytes: usize,
    /// Accepted `ts` range (inclusive).
    pub ts_min: f64,
    pub ts_max: f64,
    /// Ids for items without one: `{id_prefix}{index:08x}`; `None`: the
    /// item needs an id (or a fallback id, below).
    pub id_prefix: Option<String>,
    /// `evidence_ref` for items without one: this prefix plus the id.
    pub evidence_prefix: String,
    /// `source` for items without one.
    pub default_source: Option<String>,
    /// Fill `confidence` (1.0) and `window` (`{ts, ts}`) when absent, as the
    /// HTTP API publishes them.
    pub fill_defaults: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_value_bytes: 8192,
            ts_min: f64::NEG_INFINITY,
            ts_max: f64::INFINITY,
            id_prefix: None,
            evidence_prefix: "obs:".into(),
            default_source: None,
            fill_defaults: false,
        }
    }
}

/// Per-item context from the transport: the topic's primitive and the
/// envelope id (used when the payload has no id).
#[derive(Clone, Debug, Default)]
pub struct Envelope {
    pub primitive: Option<String>,
    pub event_id: Option<String>,
}

#[derive(Debug, Default)]
pub struct Validated {
    pub valid: Vec<Valid>,
    pub rejected: Vec<Rejection>,
    /// Items refused as `duplicate` (an id seen earlier in the batch) are
    /// also in `rejected`; this is their count.
    pub duplicates: usize,
    pub items: usize,
}

/// The fields an item may have, each with its slot in [`Fields`].
const FIELDS: [&str; 12] = [
    "attacker_uuid",
    "primitive",
    "value",
    "ts",
    "attacker_ip",
    "confidence",
    "evidence_ref",
    "id",
    "window",
    "source",
    "identity_ref",
    "v",
];

fn slot(name: &str) -> Option<usize> {
    FIELDS.iter().position(|f| *f == name)
}

/// An item's fields as the validator reads them: each known field's JSON
/// in its slot (a repeated key keeps its last value, as a JSON object
/// parsed whole would), and the names of the others. Read straight from a
/// line, no map is built and no known key is copied: an item used to cost a
/// JSON tree (an allocation per key and per node), and the allocator's time
/// was most of the validator's.
#[derive(Debug, Default, PartialEq)]
pub struct Fields {
    slots: [Option<J>; FIELDS.len()],
    unknown: Vec<String>,
}

impl Fields {
    fn get(&self, name: &str) -> Option<&J> {
        slot(name).and_then(|i| self.slots[i].as_ref())
    }

    /// The field's JSON, moved out (each field is checked once).
    fn take(&mut self, name: &str) -> Option<J> {
        slot(name).and_then(|i| self.slots[i].take())
    }

    fn from_map(map: Map<String, J>) -> Self {
        let mut out = Fields::default();
        for (k, v) in map {
            match slot(&k) {
                Some(i) => out.slots[i] = Some(v),
                None => out.unknown.push(k),
            }
        }
        out
    }
}

/// One item of a body: an object's [`Fields`], or a JSON value that is
/// not an object.
// An item is made, checked and dropped one at a time (never held in bulk),
// so its size costs a copy, where a box would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, PartialEq)]
pub enum Item {
    Object(Fields),
    NotObject,
}

impl From<J> for Item {
    fn from(v: J) -> Self {
        match v {
            J::Object(map) => Item::Object(Fields::from_map(map)),
            _ => Item::NotObject,
        }
    }
}

enum Key {
    Known(usize),
    Unknown(String),
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, k: &str) -> Result<Key, E> {
                Ok(slot(k).map_or_else(|| Key::Unknown(k.to_owned()), Key::Known))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Item;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Item, A::Error> {
                let mut out = Fields::default();
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::Known(i) => out.slots[i] = Some(map.next_value::<J>()?),
                        Key::Unknown(name) => {
                            // read as JSON all the same: a number out of
                            // range stays `invalid_json` wherever it is
                            map.next_value::<J>()?;
                            out.unknown.push(name);
                        }
                    }
                }
                Ok(Item::Object(out))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Item, A::Error> {
                while seq.next_element::<J>()?.is_some() {}
                Ok(Item::NotObject)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Item, E> {
                Ok(Item::NotObject)
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Item, E> {
                Ok(Item::NotObject)
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Item, E> {
                Ok(Item::NotObject)
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Item, E> {
                Ok(Item::NotObject)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Item, E> {
                Ok(Item::NotObject)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Item, E> {
                Ok(Item::NotObject)
            }
        }
        d.deserialize_any(V)
    }
}

type Res<T> = Result<T, (Reason, String)>;

fn fail<T>(reason: Reason, msg: impl Into<String>) -> Res<T> {
    Err((reason, msg.into()))
}

fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// The ingest partition of an attacker: FNV-1a (64-bit) of its uuid, modulo
/// `partitions`. Stable across processes and releases: every API process
/// must send an attacker's observations to the same partition.
pub fn partition_of(attacker_uuid: &str, partitions: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in attacker_uuid.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(partitions.max(1))) as u32
}

/// The one attacker-uuid rule (registration and ingest).
pub fn is_attacker_uuid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ATTACKER_UUID
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn finite(v: Option<&J>) -> Option<f64> {
    match v {
        Some(J::Number(n)) => n.as_f64().filter(|f| f.is_finite()),
        _ => None,
    }
}

fn chars(s: &str) -> usize {
    s.chars().count()
}

fn opt_text(obj: &mut Fields, name: &str, max: usize, reason: Reason) -> Res<Option<String>> {
    match obj.take(name) {
        None | Some(J::Null) => Ok(None),
        Some(J::String(s)) if !s.is_empty() && chars(&s) <= max => Ok(Some(s)),
        Some(_) => fail(
            reason,
            format!("{name} must be a non-empty string of at most {max} characters"),
        ),
    }
}

/// `s` as one stored IP address: IPv4-mapped IPv6 as IPv4, no zone id.
pub fn normalise_ip(s: &str) -> Option<String> {
    let s = s.trim();
    // a zone id names the sensor's interface, not the attacker (IPv6 only)
    let bare = if s.contains(':') {
        s.split('%').next().unwrap_or(s)
    } else {
        s
    };
    let ip: IpAddr = bare.parse().ok()?;
    Some(match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => v6.to_string(),
        },
        IpAddr::V4(v4) => v4.to_string(),
    })
}

fn short(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

fn py_repr(s: &str) -> String {
    // how the messages quote user text: single quotes, like Python's repr
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

fn value_of(v: J) -> Res<ValueIn<'static>> {
    Ok(match v {
        J::Null => ValueIn::Null,
        J::Bool(b) => ValueIn::Bool(b),
        J::Number(n) => {
            if let Some(i) = n.as_i64() {
                ValueIn::Int(i)
            } else if let Some(u) = n.as_u64() {
                ValueIn::Big(u.to_string())
            } else {
                match n.as_f64() {
                    Some(f) if f.is_finite() => ValueIn::Float(f),
                    _ => return fail(Reason::ValueNotNumeric, "value must be a finite number"),
                }
            }
        }
        J::String(s) => ValueIn::Str(Cow::Owned(s)),
        J::Array(_) | J::Object(_) => match canonical_json(&v) {
            Ok(s) => ValueIn::Json(s),
            Err(e) => return fail(Reason::ValueTooDeep, e),
        },
    })
}

fn value_json(v: &ValueIn<'_>) -> String {
    let mut out = String::new();
    match v {
        ValueIn::Json(s) => out.push_str(s),
        other => other.as_ref().write_json(&mut out),
    }
    out
}

fn check_one(
    index: usize,
    item: Item,
    env: Option<&Envelope>,
    opts: &Options,
    reg: &Registry,
) -> Res<Valid> {
    let mut obj = match item {
        Item::Object(o) => o,
        Item::NotObject => return fail(Reason::NotObject, "item must be a JSON object"),
    };
    if !obj.unknown.is_empty() {
        let mut unknown: Vec<&str> = obj.unknown.iter().map(String::as_str).collect();
        unknown.sort_unstable();
        unknown.dedup();
        let names: Vec<String> = unknown.iter().take(5).map(|k| short(k, 40)).collect();
        return fail(
            Reason::UnknownField,
            format!("unknown field(s): {}", names.join(", ")),
        );
    }
    let attacker = match obj.take("attacker_uuid") {
        Some(J::String(s)) if is_attacker_uuid(&s) => s,
        _ => {
            return fail(
                Reason::BadAttackerUuid,
                format!(
                    "attacker_uuid must be 1-{MAX_ATTACKER_UUID} characters of \
                     {ATTACKER_UUID_ALPHABET}"
                ),
            )
        }
    };
    let topic_primitive = env.and_then(|e| e.primitive.as_deref());
    let primitive = match (obj.take("primitive"), topic_primitive) {
        (Some(J::String(s)), _) if !s.is_empty() && s.len() <= 200 => s,
        (None, Some(t)) => t.to_owned(),
        _ => {
            return fail(
                Reason::BadPrimitive,
                "primitive must be a non-empty dotted name",
            )
        }
    };
    if let Some(t) = topic_primitive {
        if t != primitive {
            return fail(
                Reason::TopicMismatch,
                format!(
                    "payload primitive {} does not match topic primitive {}",
                    py_repr(&short(&primitive, 200)),
                    py_repr(t)
                ),
            );
        }
    }
    let kind = match reg.kind(&primitive) {
        Some(k) => k,
        None => {
            return fail(
                Reason::UnknownPrimitive,
                format!("unknown primitive {}", py_repr(&short(&primitive, 200))),
            )
        }
    };
    let raw_value = match obj.take("value") {
        Some(v) => v,
        None => return fail(Reason::MissingValue, "missing field value"),
    };
    let value = value_of(raw_value)?;
    let vjson = value_json(&value);
    if vjson.len() > opts.max_value_bytes {
        return fail(
            Reason::ValueTooLarge,
            format!(
                "value is {} bytes, above the limit of {}",
                vjson.len(),
                opts.max_value_bytes
            ),
        );
    }
    if kind == Kind::Numeric && value.as_ref().to_float().is_none() {
        return fail(
            Reason::ValueNotNumeric,
            format!(
                "{primitive} is numeric but the value {} is not a finite number",
                short(&vjson, 80)
            ),
        );
    }
    let ts = match finite(obj.get("ts")) {
        Some(t) => t,
        None => return fail(Reason::BadTs, "ts must be a finite number"),
    };
    if ts < opts.ts_min || ts > opts.ts_max {
        let mut msg = String::from("ts ");
        write_float(&mut msg, ts);
        msg.push_str(" is outside the accepted range [");
        write_float(&mut msg, opts.ts_min);
        msg.push_str(", ");
        write_float(&mut msg, opts.ts_max);
        msg.push(']');
        return fail(Reason::TsOutOfRange, msg);
    }
    let confidence = match obj.get("confidence") {
        None | Some(J::Null) => None,
        c => match finite(c) {
            Some(x) if (0.0..=1.0).contains(&x) => Some(x),
            _ => {
                return fail(
                    Reason::BadConfidence,
                    "confidence must be null or a number in [0, 1]",
                )
            }
        },
    };
    let id_msg = || format!("id must be 1-{MAX_ID} characters of {ID_ALPHABET}");
    let id = match obj.take("id") {
        Some(J::String(s)) if is_id(&s) => s,
        None | Some(J::Null) => match (env.and_then(|e| e.event_id.as_deref()), &opts.id_prefix) {
            (Some(e), _) if is_id(e) => e.to_owned(),
            (_, Some(p)) => format!("{p}{index:08x}"),
            _ => return fail(Reason::BadId, id_msg()),
        },
        Some(_) => return fail(Reason::BadId, id_msg()),
    };
    let window = match obj.get("window") {
        None | Some(J::Null) => None,
        Some(J::Object(w)) => {
            let ok = w.len() == 2;
            match (ok, finite(w.get("start_ts")), finite(w.get("end_ts"))) {
                (true, Some(s), Some(e)) => {
                    if e < s {
                        return fail(Reason::BadWindow, "window end_ts is before start_ts");
                    }
                    Some((s, e))
                }
                _ => {
                    return fail(
                        Reason::BadWindow,
                        "window must be {start_ts, end_ts} with finite numbers",
                    )
                }
            }
        }
        Some(_) => {
            return fail(
                Reason::BadWindow,
                "window must be {start_ts, end_ts} with finite numbers",
            )
        }
    };
    let source = opt_text(&mut obj, "source", MAX_TEXT, Reason::BadSource)?
        .or_else(|| opts.default_source.clone());
    let evidence_ref = opt_text(&mut obj, "evidence_ref", MAX_TEXT, Reason::BadEvidenceRef)?
        .unwrap_or_else(|| format!("{}{id}", opts.evidence_prefix));
    let identity_ref = opt_text(
        &mut obj,
        "identity_ref",
        MAX_IDENTITY_REF,
        Reason::BadIdentityRef,
    )?;
    match obj.get("v") {
        None => {}
        Some(J::Number(n)) if n.as_i64() == Some(1) => {}
        Some(_) => return fail(Reason::BadVersion, "v must be 1"),
    }
    let attacker_ip = match obj.get("attacker_ip") {
        None | Some(J::Null) => None,
        Some(J::String(s)) if chars(s) <= MAX_IP => match normalise_ip(s) {
            Some(ip) => Some(ip),
            None => {
                return fail(
                    Reason::BadAttackerIp,
                    format!(
                        "attacker_ip is not a valid IP address: {}",
                        py_repr(&short(s, 64))
                    ),
                )
            }
        },
        Some(_) => return fail(Reason::BadAttackerIp, "attacker_ip must be an IP address"),
    };
    for (name, text) in [
        ("source", source.as_deref()),
        ("evidence_ref", Some(evidence_ref.as_str())),
        ("identity_ref", identity_ref.as_deref()),
    ] {
        if text.is_some_and(|t| t.contains('\0')) {
            return fail(
                Reason::NulCharacter,
                format!("{name} contains a NUL character"),
            );
        }
    }
    let (confidence, window) = if opts.fill_defaults {
        (Some(confidence.unwrap_or(1.0)), window.or(Some((ts, ts))))
    } else {
        (confidence, window)
    };
    Ok(Valid {
        index,
        id,
        attacker_uuid: attacker,
        primitive,
        kind,
        value,
        value_json: vjson,
        ts,
        confidence,
        window,
        source,
        evidence_ref,
        identity_ref,
        attacker_ip,
    })
}

/// The lines of an NDJSON body that are items, in order: a leading UTF-8
/// BOM dropped, blank lines (ASCII whitespace only) skipped.
pub fn ndjson_lines(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let data = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data);
    data.split(|b| *b == b'\n')
        .filter(|line| !line.iter().all(|b| b.is_ascii_whitespace()))
}

/// One line of an NDJSON body as an item (a line that is not JSON is an
/// `invalid_json` item).
fn parse_line(line: &[u8]) -> Result<Item, String> {
    serde_json::from_slice::<Item>(line).map_err(|e| format!("invalid JSON: {e}"))
}

/// The items of a body, counted but not parsed yet where they are lines:
/// [`Items::parse`] parses them one at a time, so that each line's JSON
/// tree is dropped before the next is built (parsing a whole batch first
/// kept thousands of trees alive, and the allocator's time, not the
/// parse, was most of the validator's).
pub enum Items<'a> {
    /// A JSON array, parsed whole (it is all or nothing).
    Parsed(Vec<J>),
    /// NDJSON lines.
    Lines(Vec<&'a [u8]>),
}

impl<'a> Items<'a> {
    pub fn len(&self) -> usize {
        match self {
            Items::Parsed(v) => v.len(),
            Items::Lines(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The items in order, each parsed as it is reached.
    pub fn parse(self) -> Box<dyn Iterator<Item = Result<Item, String>> + 'a> {
        match self {
            Items::Parsed(v) => Box::new(v.into_iter().map(|j| Ok(Item::from(j)))),
            Items::Lines(v) => Box::new(v.into_iter().map(parse_line)),
        }
    }
}

/// The items of an NDJSON body, one per line of [`ndjson_lines`] (a line
/// that is not JSON is an `invalid_json` item, a JSON value that is not an
/// object a `not_object` one): what a bus batch holds, whatever it starts
/// with.
pub fn split_ndjson(data: &[u8]) -> Items<'_> {
    Items::Lines(ndjson_lines(data).collect())
}

/// The items of a body: a JSON array, one object, or NDJSON (see
/// [`split_ndjson`]). `Err` when the body as a whole is unusable (a broken
/// array, a scalar).
pub fn split_items(data: &[u8]) -> Result<Items<'_>, String> {
    let data = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data);
    let first = data.iter().copied().find(|b| !b.is_ascii_whitespace());
    if first == Some(b'[') {
        let doc: J = serde_json::from_slice(data).map_err(|e| format!("invalid JSON: {e}"))?;
        return match doc {
            J::Array(items) => Ok(Items::Parsed(items)),
            _ => Err("the body must be a JSON array of observations (or one observation)".into()),
        };
    }
    let out = split_ndjson(data);
    if let Items::Lines(lines) = &out {
        if let [line] = lines.as_slice() {
            // one object (or a scalar) on its own: a batch of one, or unusable
            if parse_line(line).is_ok_and(|v| matches!(v, Item::NotObject)) {
                return Err(
                    "the body must be a JSON array of observations (or one observation)".into(),
                );
            }
        }
    }
    Ok(out)
}

/// Validate items (see the module docs; [`Items::parse`] gives them).
/// `envelopes`, when given, is parallel to `items`.
pub fn validate(
    items: impl IntoIterator<Item = Result<Item, String>>,
    envelopes: Option<&[Envelope]>,
    opts: &Options,
) -> Validated {
    let reg = Registry::get();
    let items = items.into_iter();
    let hint = items.size_hint().0;
    let mut out = Validated {
        valid: Vec::with_capacity(hint),
        ..Validated::default()
    };
    // the ids accepted so far, without a copy of each: a hash of the id
    // names the first accepted item with it, compared in full; an id whose
    // hash an earlier, different id has already taken goes to `others`
    let hasher = ahash::RandomState::new();
    let mut first: HashMap<u64, usize, ahash::RandomState> =
        HashMap::with_capacity_and_hasher(hint, ahash::RandomState::new());
    let mut others: HashSet<String, ahash::RandomState> = HashSet::default();
    for (index, item) in items.enumerate() {
        out.items = index + 1;
        let env = envelopes.and_then(|e| e.get(index));
        let res = match item {
            Ok(j) => check_one(index, j, env, opts, reg),
            Err(msg) => Err((Reason::InvalidJson, msg)),
        };
        match res {
            Ok(v) => {
                let fresh = match first.entry(hasher.hash_one(&v.id)) {
                    Entry::Vacant(e) => {
                        e.insert(out.valid.len());
                        true
                    }
                    Entry::Occupied(e) => {
                        out.valid[*e.get()].id != v.id && others.insert(v.id.clone())
                    }
                };
                if !fresh {
                    out.duplicates += 1;
                    out.rejected.push(Rejection {
                        index,
                        reason: Reason::Duplicate,
                        message: format!("duplicate id {} in this batch", py_repr(&v.id)),
                    });
                } else {
                    out.valid.push(v);
                }
            }
            Err((reason, message)) => out.rejected.push(Rejection {
                index,
                reason,
                message,
            }),
        }
    }
    out
}

/// One column value of an observation's stored row (see [`Valid::columns`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Column<'a> {
    Text(Option<&'a str>),
    Real(Option<f64>),
    Int(i32),
    Flag(bool),
}

/// How many columns [`Valid::columns`] gives.
pub const ROW_COLUMNS: usize = 14;

impl Valid {
    /// The observation's stored row, in the store's column order: id,
    /// identity_ref, primitive, value, confidence, window_start_ts,
    /// window_end_ts, source, evidence_ref, envelope_v, ts, attacker_uuid,
    /// identity_uuid (`identity`), merged. Every writer of rows (SQLite's,
    /// PostgreSQL's `COPY`, the Python tuples) takes them from here.
    pub fn columns<'a>(
        &'a self,
        identity: Option<&'a str>,
        merged: bool,
    ) -> [Column<'a>; ROW_COLUMNS] {
        [
            Column::Text(Some(&self.id)),
            Column::Text(self.identity_ref.as_deref()),
            Column::Text(Some(&self.primitive)),
            Column::Text(Some(&self.value_json)),
            Column::Real(self.confidence),
            Column::Real(self.window.map(|w| w.0)),
            Column::Real(self.window.map(|w| w.1)),
            Column::Text(self.source.as_deref()),
            Column::Text(Some(&self.evidence_ref)),
            Column::Int(1),
            Column::Real(Some(self.ts)),
            Column::Text(Some(&self.attacker_uuid)),
            Column::Text(identity),
            Column::Flag(merged),
        ]
    }
}

impl Valid {
    /// The observation as DECNET's profiler publishes it on
    /// `attacker.observation.<primitive>` (field order kept).
    pub fn write_payload(&self, out: &mut String) {
        out.push_str("{\"primitive\":");
        write_json_str(out, &self.primitive);
        out.push_str(",\"value\":");
        out.push_str(&self.value_json);
        out.push_str(",\"confidence\":");
        opt_float(out, self.confidence);
        out.push_str(",\"window\":");
        match self.window {
            Some((s, e)) => {
                out.push_str("{\"start_ts\":");
                write_float(out, s);
                out.push_str(",\"end_ts\":");
                write_float(out, e);
                out.push('}');
            }
            None => out.push_str("null"),
        }
        out.push_str(",\"source\":");
        opt_str(out, self.source.as_deref());
        out.push_str(",\"evidence_ref\":");
        write_json_str(out, &self.evidence_ref);
        out.push_str(",\"identity_ref\":");
        opt_str(out, self.identity_ref.as_deref());
        out.push_str(",\"id\":");
        write_json_str(out, &self.id);
        out.push_str(",\"ts\":");
        write_float(out, self.ts);
        out.push_str(",\"v\":1,\"attacker_uuid\":");
        write_json_str(out, &self.attacker_uuid);
        if let Some(ip) = &self.attacker_ip {
            out.push_str(",\"attacker_ip\":");
            write_json_str(out, ip);
        }
        out.push('}');
    }
}

fn opt_float(out: &mut String, v: Option<f64>) {
    match v {
        Some(f) => write_float(out, f),
        None => out.push_str("null"),
    }
}

fn opt_str(out: &mut String, v: Option<&str>) {
    match v {
        Some(s) => write_json_str(out, s),
        None => out.push_str("null"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(FIELDS.to_vec()).prop_map(|k| format!("\"{k}\"")),
            // escaped spellings of a known name, and names that are not fields
            prop::sample::select(vec![
                r#""\u0069d""#,
                r#""v\u0000""#,
                r#""extra""#,
                r#""Value""#,
                r#""""#,
                r#""\ud83d\ude00""#,
            ])
            .prop_map(str::to_owned),
        ]
    }

    fn line() -> impl Strategy<Value = String> {
        let object = prop::collection::vec(
            (
                key(),
                prop_oneof![
                    crate::core::fastjson_tests::json_value(),
                    Just("1e400".to_owned())
                ],
            ),
            0..8,
        )
        .prop_map(|kv| {
            let body: Vec<String> = kv.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            format!("{{{}}}", body.join(", "))
        });
        prop_oneof![
            4 => object,
            1 => crate::core::fastjson_tests::json_value(),
        ]
    }

    proptest! {
        /// A line read field by field is what the same line parsed whole
        /// as JSON gives (repeated keys, escaped names, numbers out of
        /// range, broken lines), with the same error.
        #[test]
        fn a_line_reads_as_its_json_object(
            text in line(),
            cut in any::<prop::sample::Index>(),
            junk in prop::sample::select(vec!["", "}", "x", ",", "\"", "\\"]),
        ) {
            let whole = |b: &[u8]| {
                serde_json::from_slice::<J>(b)
                    .map(|j| {
                        let mut item = Item::from(j);
                        if let Item::Object(f) = &mut item {
                            f.unknown.sort_unstable();
                            f.unknown.dedup();
                        }
                        item
                    })
                    .map_err(|e| format!("invalid JSON: {e}"))
            };
            let read = |b: &[u8]| {
                parse_line(b).map(|mut item| {
                    if let Item::Object(f) = &mut item {
                        f.unknown.sort_unstable();
                        f.unknown.dedup();
                    }
                    item
                })
            };
            prop_assert_eq!(read(text.as_bytes()), whole(text.as_bytes()));
            let mut broken = text.as_bytes()[..cut.index(text.len() + 1)].to_vec();
            broken.extend_from_slice(junk.as_bytes());
            prop_assert_eq!(read(&broken), whole(&broken));
        }
    }

    fn one(line: &str) -> Result<Valid, Rejection> {
        let items = split_items(line.as_bytes()).expect("usable body");
        let mut v = validate(items.parse(), None, &Options::default());
        match v.rejected.pop() {
            Some(r) => Err(r),
            None => Ok(v.valid.pop().expect("one item")),
        }
    }

    const OK: &str = r#"{"attacker_uuid":"a1","primitive":"environmental.shell_type","value":"bash","ts":1700000000,"id":"o1"}"#;

    #[test]
    fn accepts_a_minimal_item_and_fills_the_evidence_ref() {
        let v = one(OK).unwrap();
        assert_eq!(v.evidence_ref, "obs:o1");
        assert_eq!(v.value_json, "\"bash\"");
        assert_eq!(v.ts, 1.7e9);
    }

    #[test]
    fn nested_values_beyond_the_engine_limit_are_refused() {
        let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
        let line = OK.replace("\"bash\"", &deep);
        assert_eq!(one(&line).unwrap_err().reason, Reason::ValueTooDeep);
    }

    #[test]
    fn ip_addresses_are_normalised() {
        assert_eq!(
            normalise_ip("::ffff:203.0.113.7").as_deref(),
            Some("203.0.113.7")
        );
        assert_eq!(normalise_ip("fe80::1%eth0").as_deref(), Some("fe80::1"));
        assert_eq!(
            normalise_ip("2001:DB8:0::7").as_deref(),
            Some("2001:db8::7")
        );
        assert_eq!(normalise_ip("300.1.1.1"), None);
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        assert_eq!(partition_of("a", 1), 0);
        // pinned: a change here moves attackers between running workers
        assert_eq!(partition_of("att-1", 4), partition_of("att-1", 4));
        assert_eq!(partition_of("", 7), (0xcbf2_9ce4_8422_2325u64 % 7) as u32);
        let mut seen = [0usize; 4];
        for i in 0..4000 {
            seen[partition_of(&format!("attacker-{i}"), 4) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }

    #[test]
    fn ndjson_is_ndjson_whatever_it_starts_with() {
        let body = b"\xEF\xBB\xBF[1, 2]\n \t\x0c\n5\n\n{\"a\": 1}\r\nnot json";
        let lines: Vec<&[u8]> = ndjson_lines(body).collect();
        assert_eq!(
            lines,
            vec![&b"[1, 2]"[..], b"5", b"{\"a\": 1}\r", b"not json"]
        );
        let items: Vec<_> = split_ndjson(body).parse().collect();
        assert_eq!(items.len(), 4);
        assert!(matches!(&items[0], Ok(Item::NotObject)));
        assert!(matches!(&items[2], Ok(Item::Object(_))));
        assert!(items[3].is_err());
        // the same body read as an API body is one array, then unusable
        assert!(split_items(body).is_err());
    }

    #[test]
    fn codes_are_unique() {
        let codes: HashSet<&str> = Reason::ALL.iter().map(|r| r.code()).collect();
        assert_eq!(codes.len(), Reason::ALL.len());
    }

    #[test]
    fn duplicate_ids_in_a_batch_keep_the_first() {
        let body = format!("{OK}\n{OK}\n");
        let v = validate(
            split_items(body.as_bytes()).unwrap().parse(),
            None,
            &Options::default(),
        );
        assert_eq!(v.valid.len(), 1);
        assert_eq!(v.rejected[0].reason, Reason::Duplicate);
        assert_eq!(v.rejected[0].index, 1);
    }

    #[test]
    fn the_topic_decides_the_primitive() {
        let env = [Envelope {
            primitive: Some("motor.input_modality".into()),
            event_id: None,
        }];
        let v = validate(
            split_items(OK.as_bytes()).unwrap().parse(),
            Some(&env),
            &Options::default(),
        );
        assert_eq!(v.rejected[0].reason, Reason::TopicMismatch);
    }
}
