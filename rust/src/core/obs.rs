//! One observation as the JSON readers see it: the six fields as read
//! (`Fields`), any JSON value with its scalars borrowed (`AnyIn`), and the
//! type checks that turn them into a `ParsedObs` for the engine. Both
//! readers fill `Fields` (`json`: serde, `fastjson`: the single-pass reader),
//! so both depend on this module and neither on the other's internals.

use std::borrow::Cow;

use super::engine::Obs;
use super::merge::Kind;
use super::value::ValueRef;

/// Deepest list/object nesting accepted in a value.
pub const MAX_DEPTH: usize = 32;

/// Any JSON value, scalars borrowed where possible.
#[derive(Debug)]
pub enum AnyIn<'a> {
    Null,
    Bool(bool),
    I64(i64),
    U64(u64),
    F64(f64),
    Str(Cow<'a, str>),
    Complex(serde_json::Value),
}

impl<'a> AnyIn<'a> {
    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            AnyIn::Null => "null",
            AnyIn::Bool(_) => "a boolean",
            AnyIn::I64(_) | AnyIn::U64(_) | AnyIn::F64(_) => "a number",
            AnyIn::Str(_) => "a string",
            AnyIn::Complex(serde_json::Value::Array(_)) => "an array",
            AnyIn::Complex(_) => "an object",
        }
    }

    pub(crate) fn as_number(&self) -> Option<f64> {
        match self {
            AnyIn::I64(i) => Some(*i as f64),
            AnyIn::U64(u) => Some(*u as f64),
            AnyIn::F64(f) => Some(*f),
            _ => None,
        }
    }
}

/// A value ready for the engine; owns what could not be borrowed.
#[derive(Debug, Clone)]
pub enum ValueIn<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Big(String),
    Float(f64),
    Str(Cow<'a, str>),
    Json(String),
}

impl<'a> ValueIn<'a> {
    pub fn as_ref(&self) -> ValueRef<'_> {
        match self {
            ValueIn::Null => ValueRef::Null,
            ValueIn::Bool(b) => ValueRef::Bool(*b),
            ValueIn::Int(i) => ValueRef::Int(*i),
            ValueIn::Big(s) => ValueRef::BigInt(s),
            ValueIn::Float(f) => ValueRef::Float(*f),
            ValueIn::Str(s) => ValueRef::Str(s),
            ValueIn::Json(s) => ValueRef::Json(s),
        }
    }
}

fn depth(v: &serde_json::Value) -> usize {
    match v {
        serde_json::Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        serde_json::Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Canonical JSON of a list/object: sorted keys (serde_json's map is
/// ordered), compact separators.
pub fn canonical_json(v: &serde_json::Value) -> Result<String, String> {
    if depth(v) > MAX_DEPTH {
        return Err(format!("value nests deeper than {MAX_DEPTH} levels"));
    }
    serde_json::to_string(v).map_err(|e| e.to_string())
}

pub fn value_in(v: AnyIn<'_>) -> Result<ValueIn<'_>, String> {
    Ok(match v {
        AnyIn::Null => ValueIn::Null,
        AnyIn::Bool(b) => ValueIn::Bool(b),
        AnyIn::I64(i) => ValueIn::Int(i),
        AnyIn::U64(u) => match i64::try_from(u) {
            Ok(i) => ValueIn::Int(i),
            Err(_) => ValueIn::Big(u.to_string()),
        },
        AnyIn::F64(f) => {
            if !f.is_finite() {
                return Err("value must be finite".into());
            }
            ValueIn::Float(f)
        }
        AnyIn::Str(s) => ValueIn::Str(s),
        AnyIn::Complex(c) => ValueIn::Json(canonical_json(&c)?),
    })
}

/// The six fields of an observation, as read (shared by both readers).
#[derive(Default)]
pub(crate) struct Fields<'a> {
    pub identity: Option<AnyIn<'a>>,
    pub primitive: Option<AnyIn<'a>>,
    pub value: Option<AnyIn<'a>>,
    pub ts: Option<AnyIn<'a>>,
    pub confidence: Option<AnyIn<'a>>,
    pub value_kind: Option<AnyIn<'a>>,
}

/// A type-checked observation that owns what it could not borrow.
#[derive(Debug)]
pub struct ParsedObs<'a> {
    pub identity: Cow<'a, str>,
    pub primitive: Cow<'a, str>,
    pub value: ValueIn<'a>,
    pub ts: f64,
    pub kind: Option<Kind>,
}

impl<'a> ParsedObs<'a> {
    pub fn as_obs(&self) -> Obs<'_> {
        Obs {
            identity: &self.identity,
            primitive: &self.primitive,
            value: self.value.as_ref(),
            ts: self.ts,
            kind: self.kind,
        }
    }
}

fn string_field<'a>(name: &str, v: Option<AnyIn<'a>>) -> Result<Cow<'a, str>, String> {
    match v {
        Some(AnyIn::Str(s)) => Ok(s),
        Some(other) => Err(format!(
            "{name} must be a string, got {}",
            other.type_name()
        )),
        None => Err(format!("missing field {name}")),
    }
}

/// Parse a JSON `kind` name (`value_kind` fields).
pub fn parse_kind(v: Option<AnyIn<'_>>) -> Result<Option<Kind>, String> {
    match v {
        None | Some(AnyIn::Null) => Ok(None),
        Some(AnyIn::Str(s)) => Kind::parse(&s)
            .map(Some)
            .ok_or_else(|| format!("value_kind must be categorical, numeric or hash, got {s:?}")),
        Some(other) => Err(format!(
            "value_kind must be a string, got {}",
            other.type_name()
        )),
    }
}

/// Type-check the fields of one observation (per-item errors).
pub(crate) fn check_fields(f: Fields<'_>) -> Result<ParsedObs<'_>, String> {
    let identity = string_field("identity_uuid", f.identity)?;
    let primitive = string_field("primitive", f.primitive)?;
    let ts = match f.ts {
        Some(t) => t
            .as_number()
            .ok_or_else(|| format!("ts must be a number, got {}", t.type_name()))?,
        None => return Err("missing field ts".into()),
    };
    if !ts.is_finite() {
        return Err("ts must be a finite number".into());
    }
    match f.confidence {
        None | Some(AnyIn::Null) => {}
        Some(c) => match c.as_number() {
            Some(x) if (0.0..=1.0).contains(&x) => {}
            Some(x) => return Err(format!("confidence must be in [0, 1], got {x}")),
            None => {
                return Err(format!(
                    "confidence must be a number, got {}",
                    c.type_name()
                ))
            }
        },
    }
    let kind = parse_kind(f.value_kind)?;
    let value = match f.value {
        Some(v) => value_in(v)?,
        None => return Err("missing field value".into()),
    };
    Ok(ParsedObs {
        identity,
        primitive,
        value,
        ts,
        kind,
    })
}
