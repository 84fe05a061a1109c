//! JSON input: a batch of observations as a JSON array or NDJSON, parsed in
//! one pass with borrowed strings, and exported windows.
//!
//! Element types are checked by us, not by serde, so one bad element (a
//! number where an object should be, a string `ts`) becomes a per-item
//! error and the rest of the batch still applies. Only a syntax error in a
//! JSON array rejects the whole array (there is no way to know where its
//! elements are); NDJSON lines fail one by one.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::engine::WindowIn;
use super::fastjson;
use super::merge::Kind;
use super::obs::{check_fields, value_in, AnyIn, Fields, ParsedObs, ValueIn};

struct AnyVisitor;

impl<'de> Visitor<'de> for AnyVisitor {
    type Value = AnyIn<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(AnyIn::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(AnyIn::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(AnyIn::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(AnyIn::I64(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(AnyIn::U64(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(AnyIn::F64(v))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(AnyIn::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(AnyIn::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(AnyIn::Str(Cow::Owned(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element::<serde_json::Value>()? {
            out.push(v);
        }
        Ok(AnyIn::Complex(serde_json::Value::Array(out)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
            out.insert(k, v);
        }
        Ok(AnyIn::Complex(serde_json::Value::Object(out)))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for AnyIn<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(AnyVisitor)
    }
}

/// The observation fields we read; anything else is skipped unparsed.
enum Field {
    Identity,
    Primitive,
    Value,
    Ts,
    Confidence,
    ValueKind,
    Other,
}

struct FieldVisitor;

impl<'de> Visitor<'de> for FieldVisitor {
    type Value = Field;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Field, E> {
        Ok(match v {
            "identity_uuid" => Field::Identity,
            "primitive" => Field::Primitive,
            "value" => Field::Value,
            "ts" => Field::Ts,
            "confidence" => Field::Confidence,
            "value_kind" => Field::ValueKind,
            _ => Field::Other,
        })
    }
}

struct FieldSeed;

impl<'de> DeserializeSeed<'de> for FieldSeed {
    type Value = Field;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Field, D::Error> {
        // deserialize_str hands us borrowed or escaped text: no allocation.
        d.deserialize_str(FieldVisitor)
    }
}

/// One element of a batch, already type-checked: the `Err` is a per-item
/// rejection, not a parse failure.
struct Item<'de>(Result<ParsedObs<'de>, String>);

struct ItemVisitor;

impl<'de> Visitor<'de> for ItemVisitor {
    type Value = Item<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an observation object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Fields::default();
        while let Some(key) = map.next_key_seed(FieldSeed)? {
            let slot = match key {
                Field::Identity => &mut fields.identity,
                Field::Primitive => &mut fields.primitive,
                Field::Value => &mut fields.value,
                Field::Ts => &mut fields.ts,
                Field::Confidence => &mut fields.confidence,
                Field::ValueKind => &mut fields.value_kind,
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            *slot = Some(map.next_value::<AnyIn<'de>>()?);
        }
        Ok(Item(check_fields(fields)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(not_object("an array"))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(not_object("a string"))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(not_object("a boolean"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(not_object("a number"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(not_object("a number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(not_object("a number"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(not_object("null"))
    }
}

fn not_object<'a>(what: &str) -> Item<'a> {
    Item(Err(format!("observation must be an object, got {what}")))
}

impl<'de> Deserialize<'de> for Item<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ItemVisitor)
    }
}

/// Pushes the elements of a JSON array straight into `out`.
struct ArraySeed<'v, 'de> {
    out: &'v mut Vec<Result<ParsedObs<'de>, String>>,
}

impl<'v, 'de> Visitor<'de> for ArraySeed<'v, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON array of observations")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(item) = seq.next_element::<Item<'de>>()? {
            self.out.push(item.0);
        }
        Ok(())
    }
}

impl<'v, 'de> DeserializeSeed<'de> for ArraySeed<'v, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

fn first_byte(data: &[u8]) -> Option<u8> {
    data.iter().copied().find(|b| !b.is_ascii_whitespace())
}

fn strip_bom(data: &[u8]) -> &[u8] {
    data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data)
}

/// Parse a batch: a JSON array, or NDJSON (one object per line, blank
/// lines skipped). Items come back in order; an `Err` for the whole input
/// only when a JSON array is not valid JSON (or not UTF-8).
pub fn parse_batch(data: &[u8]) -> Result<Vec<Result<ParsedObs<'_>, String>>, String> {
    let data = strip_bom(data);
    if first_byte(data) == Some(b'[') {
        let s = std::str::from_utf8(data).map_err(|e| {
            format!(
                "invalid JSON array: invalid UTF-8 at byte {}",
                e.valid_up_to()
            )
        })?;
        return fastjson::parse_array(s).map_err(|e| {
            let (line, col) = fastjson::line_col(data, e.offset);
            format!("invalid JSON array: {} at line {line} column {col}", e.msg)
        });
    }
    let mut out = Vec::with_capacity(data.len() / 96 + 1);
    parse_ndjson_chunks(data, usize::MAX, |part| {
        out.extend(part);
        true
    });
    Ok(out)
}

/// NDJSON [`parse_batch`] delivered in parts of `chunk` items to `sink`
/// (for a caller that merges while this parses, on another thread). Lines
/// fail one by one, as in `parse_batch`. `None` when `data` is a JSON
/// array: an array is all-or-nothing, so it is parsed whole first.
pub fn parse_ndjson_chunks<'a>(
    data: &'a [u8],
    chunk: usize,
    mut sink: impl FnMut(Vec<Result<ParsedObs<'a>, String>>) -> bool,
) -> Option<()> {
    let chunk = chunk.max(1);
    let data = strip_bom(data);
    if first_byte(data) == Some(b'[') {
        return None;
    }
    let mut part = Vec::with_capacity(chunk.min(data.len() / 96 + 1));
    for (lineno, line) in data.split(|&b| b == b'\n').enumerate() {
        if first_byte(line).is_none() {
            continue;
        }
        let item = match std::str::from_utf8(line).ok() {
            None => Err(format!("line {}: invalid UTF-8", lineno + 1)),
            Some(t) => fastjson::parse_line(t).unwrap_or_else(|e| {
                Err(format!(
                    "line {}: invalid JSON: {} at column {}",
                    lineno + 1,
                    e.msg,
                    e.offset + 1
                ))
            }),
        };
        part.push(item);
        if part.len() == chunk && !sink(std::mem::replace(&mut part, Vec::with_capacity(chunk))) {
            return Some(());
        }
    }
    if !part.is_empty() {
        sink(part);
    }
    Some(())
}

/// [`parse_batch`] written with serde_json: the reference the fast reader
/// is tested against (same results on every input), and a fallback.
pub fn parse_batch_serde(data: &[u8]) -> Result<Vec<Result<ParsedObs<'_>, String>>, String> {
    let data = strip_bom(data);
    // ~100 bytes per observation is typical; avoid regrowing a large vector
    let mut out = Vec::with_capacity(data.len() / 96 + 1);
    if first_byte(data) == Some(b'[') {
        let mut de = serde_json::Deserializer::from_slice(data);
        ArraySeed { out: &mut out }
            .deserialize(&mut de)
            .and_then(|_| de.end())
            .map_err(|e| format!("invalid JSON array: {e}"))?;
        return Ok(out);
    }
    for (lineno, line) in data.split(|&b| b == b'\n').enumerate() {
        if first_byte(line).is_none() {
            continue;
        }
        let mut de = serde_json::Deserializer::from_slice(line);
        let parsed = Item::deserialize(&mut de)
            .and_then(|item| de.end().map(|_| item.0))
            .unwrap_or_else(|e| Err(format!("line {}: invalid JSON: {e}", lineno + 1)));
        out.push(parsed);
    }
    Ok(out)
}

#[derive(Deserialize)]
struct WindowDoc<'a> {
    #[serde(default)]
    v: u32,
    #[serde(borrow)]
    identity_uuid: Cow<'a, str>,
    #[serde(borrow)]
    primitive: Cow<'a, str>,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    count: u64,
    #[serde(borrow)]
    window: Vec<(f64, AnyIn<'a>)>,
    #[serde(default, borrow)]
    hash_window: Vec<(AnyIn<'a>, f64)>,
}

/// A parsed exported window; `as_window` borrows it for `Engine::import`.
pub struct ParsedWindow<'a> {
    identity: Cow<'a, str>,
    primitive: Cow<'a, str>,
    kind: Kind,
    count: u64,
    window: Vec<(f64, ValueIn<'a>)>,
    hash_window: Vec<(ValueIn<'a>, f64)>,
}

impl<'a> ParsedWindow<'a> {
    pub fn as_window(&self) -> WindowIn<'_> {
        WindowIn {
            identity: &self.identity,
            primitive: &self.primitive,
            kind: self.kind,
            count: self.count,
            window: self.window.iter().map(|(t, v)| (*t, v.as_ref())).collect(),
            hash_window: self
                .hash_window
                .iter()
                .map(|(v, t)| (v.as_ref(), *t))
                .collect(),
        }
    }
}

pub fn parse_window(data: &[u8]) -> Result<ParsedWindow<'_>, String> {
    let doc: WindowDoc<'_> =
        serde_json::from_slice(data).map_err(|e| format!("invalid window JSON: {e}"))?;
    if doc.v != 1 {
        return Err(format!("unsupported window format version {}", doc.v));
    }
    let kind = Kind::parse(&doc.kind).ok_or_else(|| format!("unknown kind {:?}", doc.kind))?;
    let window = doc
        .window
        .into_iter()
        .map(|(t, v)| value_in(v).map(|v| (t, v)))
        .collect::<Result<Vec<_>, _>>()?;
    let hash_window = doc
        .hash_window
        .into_iter()
        .map(|(v, t)| value_in(v).map(|v| (v, t)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ParsedWindow {
        identity: doc.identity_uuid,
        primitive: doc.primitive,
        kind,
        count: doc.count,
        window,
        hash_window,
    })
}

/// Parse a single JSON value (tests).
#[cfg(test)]
fn parse_value(data: &[u8]) -> Result<ValueIn<'_>, String> {
    let mut de = serde_json::Deserializer::from_slice(data);
    let v = AnyIn::deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    value_in(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::value::ValueRef;

    #[test]
    fn array_and_ndjson_agree() {
        let arr = br#"[{"identity_uuid":"i","primitive":"p","value":"a","ts":1},
                       {"identity_uuid":"i","primitive":"p","value":[2,1],"ts":2.5,"extra":{"x":1}}]"#;
        let nd = b"{\"identity_uuid\":\"i\",\"primitive\":\"p\",\"value\":\"a\",\"ts\":1}\n\n\
                   {\"identity_uuid\":\"i\",\"primitive\":\"p\",\"value\":[2,1],\"ts\":2.5}\n";
        let a = parse_batch(arr).unwrap();
        let n = parse_batch(nd).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(n.len(), 2);
        for (x, y) in a.iter().zip(n.iter()) {
            let (x, y) = (x.as_ref().unwrap(), y.as_ref().unwrap());
            assert_eq!(x.value.as_ref(), y.value.as_ref());
            assert_eq!(x.ts, y.ts);
        }
    }

    #[test]
    fn bad_items_are_per_item() {
        let arr = br#"[1, {"identity_uuid":"i","primitive":"p","ts":"x","value":1},
                       {"identity_uuid":"i","primitive":"p","value":1},
                       {"identity_uuid":"i","primitive":"p","value":1,"ts":1,"confidence":2},
                       {"identity_uuid":"i","primitive":"p","value":{"b":1,"a":[1.0,true]},"ts":1}]"#;
        let items = parse_batch(arr).unwrap();
        assert!(items[0].as_ref().unwrap_err().contains("must be an object"));
        assert!(items[1]
            .as_ref()
            .unwrap_err()
            .contains("ts must be a number"));
        assert!(items[2].as_ref().unwrap_err().contains("missing field ts"));
        assert!(items[3].as_ref().unwrap_err().contains("confidence"));
        let ok = items[4].as_ref().unwrap();
        assert_eq!(
            ok.value.as_ref(),
            ValueRef::Json(r#"{"a":[1.0,true],"b":1}"#)
        );
    }

    #[test]
    fn ndjson_bad_line_does_not_stop_the_rest() {
        let nd = b"{bad\n{\"identity_uuid\":\"i\",\"primitive\":\"p\",\"value\":1,\"ts\":1}\n";
        let items = parse_batch(nd).unwrap();
        assert!(items[0].as_ref().unwrap_err().starts_with("line 1"));
        assert!(items[1].is_ok());
        assert!(parse_batch(b"[1,").is_err());
    }

    #[test]
    fn big_and_deep_values() {
        assert_eq!(
            parse_value(b"18446744073709551615").unwrap().as_ref(),
            ValueRef::BigInt("18446744073709551615")
        );
        let deep = format!("{}{}", "[".repeat(40), "]".repeat(40));
        assert!(parse_value(deep.as_bytes()).is_err());
    }
}
