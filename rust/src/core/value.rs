//! Observation values: the raw value as it arrived, and the canonical key the
//! mergers count and compare.
//!
//! DECNET counts values with Python equality and hashing, so `1`, `1.0` and
//! `True` are one category, while lists and dicts crash its mergers. Here a
//! value is kept raw (so `current_value` comes back exactly as it was sent)
//! and mapped to a [`Canon`] key that reproduces Python's equality for
//! scalars and compares lists and objects by canonical JSON (sorted keys,
//! compact separators).

use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// A raw observation value. Floats are always finite.
#[derive(Clone, Debug)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    /// An integer outside the i64 range, as normalised decimal digits.
    BigInt(Arc<str>),
    Float(f64),
    Str(Arc<str>),
    /// A list or an object, as canonical JSON text.
    Json(Arc<str>),
}

/// A borrowed [`Value`], used to look values up without allocating.
#[derive(Clone, Copy, Debug)]
pub enum ValueRef<'a> {
    Null,
    Bool(bool),
    Int(i64),
    BigInt(&'a str),
    Float(f64),
    Str(&'a str),
    Json(&'a str),
}

/// The equality class of a value (Python `==` for scalars, canonical JSON
/// for lists and objects).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Canon {
    Null,
    Int(i64),
    Big(Arc<str>),
    /// A finite, non-integral float, by its bits.
    Float(u64),
    Str(Arc<str>),
    Json(Arc<str>),
}

impl Value {
    pub fn as_ref(&self) -> ValueRef<'_> {
        match self {
            Value::Null => ValueRef::Null,
            Value::Bool(b) => ValueRef::Bool(*b),
            Value::Int(i) => ValueRef::Int(*i),
            Value::BigInt(s) => ValueRef::BigInt(s),
            Value::Float(f) => ValueRef::Float(*f),
            Value::Str(s) => ValueRef::Str(s),
            Value::Json(s) => ValueRef::Json(s),
        }
    }

    /// Size used for the per-value limit: string bytes, or JSON text bytes.
    pub fn byte_len(&self) -> usize {
        self.as_ref().byte_len()
    }

    /// JSON text of the value.
    pub fn to_json(&self) -> String {
        let mut out = String::new();
        self.as_ref().write_json(&mut out);
        out
    }
}

impl<'a> ValueRef<'a> {
    pub fn to_owned(self) -> Value {
        match self {
            ValueRef::Null => Value::Null,
            ValueRef::Bool(b) => Value::Bool(b),
            ValueRef::Int(i) => Value::Int(i),
            ValueRef::BigInt(s) => Value::BigInt(Arc::from(s)),
            ValueRef::Float(f) => Value::Float(f),
            ValueRef::Str(s) => Value::Str(Arc::from(s)),
            ValueRef::Json(s) => Value::Json(Arc::from(s)),
        }
    }

    pub fn byte_len(self) -> usize {
        match self {
            ValueRef::Str(s) | ValueRef::Json(s) | ValueRef::BigInt(s) => s.len(),
            _ => 8,
        }
    }

    pub fn is_null(self) -> bool {
        matches!(self, ValueRef::Null)
    }

    /// The canonical key (equality class) of this value.
    pub fn canon(self) -> Canon {
        match self {
            ValueRef::Null => Canon::Null,
            ValueRef::Bool(b) => Canon::Int(b as i64),
            ValueRef::Int(i) => Canon::Int(i),
            ValueRef::BigInt(s) => Canon::Big(Arc::from(s)),
            ValueRef::Float(f) => float_canon(f),
            ValueRef::Str(s) => Canon::Str(Arc::from(s)),
            ValueRef::Json(s) => Canon::Json(Arc::from(s)),
        }
    }

    /// Python's `float(v)` for the numeric merger: `None` → 0.0, bools → 1.0
    /// / 0.0, numbers as themselves, numeric strings parsed. `None` means the
    /// value cannot be a number (lists, objects, other strings, overflow).
    pub fn to_float(self) -> Option<f64> {
        let f = match self {
            ValueRef::Null => 0.0,
            ValueRef::Bool(b) => {
                if b {
                    1.0
                } else {
                    0.0
                }
            }
            ValueRef::Int(i) => i as f64,
            ValueRef::BigInt(s) => s.parse::<f64>().ok()?,
            ValueRef::Float(f) => f,
            ValueRef::Str(s) => parse_python_float(s)?,
            ValueRef::Json(_) => return None,
        };
        if f.is_finite() {
            Some(f)
        } else {
            None
        }
    }

    pub fn write_json(self, out: &mut String) {
        match self {
            ValueRef::Null => out.push_str("null"),
            ValueRef::Bool(true) => out.push_str("true"),
            ValueRef::Bool(false) => out.push_str("false"),
            ValueRef::Int(i) => {
                let _ = write!(out, "{i}");
            }
            ValueRef::BigInt(s) | ValueRef::Json(s) => out.push_str(s),
            ValueRef::Float(f) => write_float(out, f),
            ValueRef::Str(s) => write_json_str(out, s),
        }
    }
}

fn discriminant(v: &ValueRef<'_>) -> u8 {
    match v {
        ValueRef::Null => 0,
        ValueRef::Bool(_) => 1,
        ValueRef::Int(_) => 2,
        ValueRef::BigInt(_) => 3,
        ValueRef::Float(_) => 4,
        ValueRef::Str(_) => 5,
        ValueRef::Json(_) => 6,
    }
}

impl PartialEq for ValueRef<'_> {
    /// Raw identity: same type and same content (floats by bits).
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (ValueRef::Null, ValueRef::Null) => true,
            (ValueRef::Bool(a), ValueRef::Bool(b)) => a == b,
            (ValueRef::Int(a), ValueRef::Int(b)) => a == b,
            (ValueRef::Float(a), ValueRef::Float(b)) => a.to_bits() == b.to_bits(),
            (ValueRef::BigInt(a), ValueRef::BigInt(b))
            | (ValueRef::Str(a), ValueRef::Str(b))
            | (ValueRef::Json(a), ValueRef::Json(b)) => a == b,
            _ => false,
        }
    }
}
impl Eq for ValueRef<'_> {}

impl Hash for ValueRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        discriminant(self).hash(state);
        match self {
            ValueRef::Null => {}
            ValueRef::Bool(b) => b.hash(state),
            ValueRef::Int(i) => i.hash(state),
            ValueRef::Float(f) => f.to_bits().hash(state),
            ValueRef::BigInt(s) | ValueRef::Str(s) | ValueRef::Json(s) => s.hash(state),
        }
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.as_ref() == other.as_ref()
    }
}
impl Eq for Value {}
impl Hash for Value {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_ref().hash(state)
    }
}

const I64_LOW: f64 = -9_223_372_036_854_775_808.0; // -2^63, exact
const I64_HIGH: f64 = 9_223_372_036_854_775_808.0; // 2^63, exact

/// Python equality for floats: an integral float equals the int of the same
/// value (so `1.0 == 1 == True` and `-0.0 == 0`).
fn float_canon(f: f64) -> Canon {
    if f.fract() == 0.0 {
        if (I64_LOW..I64_HIGH).contains(&f) {
            Canon::Int(f as i64)
        } else {
            // Rust prints the exact decimal value of an integral float.
            Canon::Big(Arc::from(format!("{f:.0}").as_str()))
        }
    } else {
        Canon::Float(f.to_bits())
    }
}

impl Canon {
    /// A value that belongs to this class (used when a hash window is
    /// exported: the window keeps classes, not raw values).
    pub fn to_value(&self) -> Value {
        match self {
            Canon::Null => Value::Null,
            Canon::Int(i) => Value::Int(*i),
            Canon::Big(s) => Value::BigInt(s.clone()),
            Canon::Float(bits) => Value::Float(f64::from_bits(*bits)),
            Canon::Str(s) => Value::Str(s.clone()),
            Canon::Json(s) => Value::Json(s.clone()),
        }
    }
}

/// JSON number text for a finite float, always with a fraction or exponent
/// so that it reads back as a float (shortest round-trip digits).
/// (`null` for a non-finite one.)
pub fn write_float(out: &mut String, f: f64) {
    if !f.is_finite() {
        out.push_str("null");
        return;
    }
    let mut buf = ryu::Buffer::new();
    let s = buf.format_finite(f);
    out.push_str(s);
    if !s.contains(['.', 'e', 'E']) {
        out.push_str(".0");
    }
}

pub fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    if !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        // nothing to escape (ids, names, most values): as it is
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `float(str)`: surrounding whitespace allowed, an optional sign,
/// digits with single underscores between digits, a fraction and an
/// exponent; `inf`/`nan` spellings parse but are not finite, so they are
/// refused by the caller.
pub fn parse_python_float(s: &str) -> Option<f64> {
    let t = s.trim_matches(|c: char| c.is_whitespace());
    if t.is_empty() {
        return None;
    }
    let bytes = t.as_bytes();
    let mut cleaned = String::with_capacity(t.len());
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'_' {
            let prev = i.checked_sub(1).map(|j| bytes[j]);
            let next = bytes.get(i + 1).copied();
            match (prev, next) {
                (Some(p), Some(n)) if p.is_ascii_digit() && n.is_ascii_digit() => continue,
                _ => return None,
            }
        }
        if !(b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E')) {
            // Letters other than an exponent: only inf/nan spellings are
            // valid Python floats, and those are not finite anyway.
            return None;
        }
        cleaned.push(b as char);
    }
    cleaned.parse::<f64>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_equality_classes() {
        assert_eq!(ValueRef::Bool(true).canon(), ValueRef::Int(1).canon());
        assert_eq!(ValueRef::Float(1.0).canon(), ValueRef::Int(1).canon());
        assert_eq!(ValueRef::Float(-0.0).canon(), ValueRef::Int(0).canon());
        assert_ne!(ValueRef::Float(1.5).canon(), ValueRef::Int(1).canon());
        assert_ne!(ValueRef::Str("1").canon(), ValueRef::Int(1).canon());
        assert_ne!(ValueRef::Str("[1]").canon(), ValueRef::Json("[1]").canon());
        assert_eq!(
            ValueRef::Float(1e20).canon(),
            ValueRef::BigInt("100000000000000000000").canon()
        );
        assert_eq!(
            ValueRef::Float(-9.223_372_036_854_776e18).canon(),
            Canon::Int(i64::MIN)
        );
    }

    #[test]
    fn raw_identity_keeps_types_apart() {
        assert_ne!(ValueRef::Bool(true), ValueRef::Int(1));
        assert_ne!(ValueRef::Float(0.0), ValueRef::Float(-0.0));
        assert_eq!(ValueRef::Str("a"), ValueRef::Str("a"));
    }

    #[test]
    fn python_float_strings() {
        assert_eq!(parse_python_float(" 12.5 "), Some(12.5));
        assert_eq!(parse_python_float("1_000"), Some(1000.0));
        assert_eq!(parse_python_float("1e3"), Some(1000.0));
        assert_eq!(parse_python_float("-.5"), Some(-0.5));
        assert_eq!(parse_python_float("+5."), Some(5.0));
        assert_eq!(parse_python_float("1__0"), None);
        assert_eq!(parse_python_float("_1"), None);
        assert_eq!(parse_python_float("abc"), None);
        assert_eq!(parse_python_float(""), None);
        assert_eq!(ValueRef::Str("inf").to_float(), None);
        assert_eq!(ValueRef::Str("nan").to_float(), None);
        assert_eq!(ValueRef::Null.to_float(), Some(0.0));
        assert_eq!(ValueRef::Bool(true).to_float(), Some(1.0));
    }

    #[test]
    fn float_json_reads_back_as_float() {
        let mut s = String::new();
        write_float(&mut s, 1.0);
        assert_eq!(s, "1.0");
        s.clear();
        write_float(&mut s, 1e300);
        assert!(s.parse::<f64>().unwrap() == 1e300);
        assert!(s.contains('e') || s.contains('.'));
    }
}
