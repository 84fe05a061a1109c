//! Conversions at the edge: Python objects → borrowed observations (copied
//! once into an arena so the merge can run without the GIL), and values
//! back to Python objects.

use std::os::raw::c_char;

use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::once_cell::GILOnceCell;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyList, PyLong, PyString, PyTuple};
use pyo3::AsPyPointer;

use crate::core::engine::Obs;
use crate::core::merge::Kind;
use crate::core::obs::{canonical_json, MAX_DEPTH};
use crate::core::value::{Value, ValueRef};

extern "C" {
    // Part of CPython's ABI on every 3.x (in the limited API from 3.10);
    // unlike PyUnicode_AsUTF8String it returns the cached UTF-8 buffer
    // without allocating a bytes object per string.
    fn PyUnicode_AsUTF8AndSize(
        unicode: *mut ffi::PyObject,
        size: *mut ffi::Py_ssize_t,
    ) -> *const c_char;
}

/// The UTF-8 text of a Python str, borrowed for as long as the object lives.
pub fn str_of(s: &PyString) -> Result<&str, String> {
    let mut size: ffi::Py_ssize_t = 0;
    // SAFETY: `s` is a live str object (the GIL is held, as `'py` proves)
    // and the returned buffer lives as long as the object.
    let data = unsafe { PyUnicode_AsUTF8AndSize(s.as_ptr(), &mut size) };
    if data.is_null() {
        // clear the UnicodeEncodeError
        let _ = PyErr::take(s.py());
        return Err("string is not valid UTF-8 (lone surrogate?)".into());
    }
    // SAFETY: CPython guarantees `size` valid UTF-8 bytes at `data`.
    let bytes = unsafe { std::slice::from_raw_parts(data as *const u8, size as usize) };
    std::str::from_utf8(bytes).map_err(|_| "string is not valid UTF-8".to_string())
}

#[derive(Clone, Copy, Debug)]
pub struct Span(u32, u32);

/// A value whose text lives in an [`Arena`].
#[derive(Clone, Copy, Debug)]
pub enum VSlot {
    Null,
    Bool(bool),
    Int(i64),
    Big(Span),
    Float(f64),
    Str(Span),
    Json(Span),
}

/// Strings of a batch, copied once.
#[derive(Default)]
pub struct Arena {
    buf: String,
}

impl Arena {
    pub fn push(&mut self, s: &str) -> Result<Span, String> {
        let start =
            u32::try_from(self.buf.len()).map_err(|_| "batch text above 4 GiB".to_string())?;
        self.buf.push_str(s);
        let len = u32::try_from(s.len()).map_err(|_| "string above 4 GiB".to_string())?;
        Ok(Span(start, len))
    }

    pub fn get(&self, sp: Span) -> &str {
        &self.buf[sp.0 as usize..(sp.0 + sp.1) as usize]
    }

    pub fn value(&self, v: VSlot) -> ValueRef<'_> {
        match v {
            VSlot::Null => ValueRef::Null,
            VSlot::Bool(b) => ValueRef::Bool(b),
            VSlot::Int(i) => ValueRef::Int(i),
            VSlot::Big(s) => ValueRef::BigInt(self.get(s)),
            VSlot::Float(f) => ValueRef::Float(f),
            VSlot::Str(s) => ValueRef::Str(self.get(s)),
            VSlot::Json(s) => ValueRef::Json(self.get(s)),
        }
    }
}

/// One extracted observation (engine input).
#[derive(Clone, Copy, Debug)]
pub struct Item {
    pub identity: Span,
    pub primitive: Span,
    pub value: VSlot,
    pub ts: f64,
    pub kind: Option<Kind>,
}

impl Item {
    pub fn obs<'a>(&self, arena: &'a Arena) -> Obs<'a> {
        Obs {
            identity: arena.get(self.identity),
            primitive: arena.get(self.primitive),
            value: arena.value(self.value),
            ts: self.ts,
            kind: self.kind,
        }
    }
}

fn type_name(obj: &PyAny) -> String {
    obj.get_type()
        .name()
        .map(str::to_owned)
        .unwrap_or_else(|_| "?".into())
}

fn py_to_json(obj: &PyAny, depth: usize) -> Result<serde_json::Value, String> {
    use serde_json::Value as J;
    if depth > MAX_DEPTH {
        return Err(format!("value nests deeper than {MAX_DEPTH} levels"));
    }
    if obj.is_none() {
        return Ok(J::Null);
    }
    if let Ok(b) = obj.downcast::<PyBool>() {
        return Ok(J::Bool(b.is_true()));
    }
    if obj.is_instance_of::<PyLong>().unwrap_or(false) {
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(J::from(i));
        }
        if let Ok(u) = obj.extract::<u64>() {
            return Ok(J::from(u));
        }
        return Err("an integer inside a list or object must fit in 64 bits".into());
    }
    if let Ok(f) = obj.downcast::<PyFloat>() {
        let v = f.value();
        return serde_json::Number::from_f64(v)
            .map(J::Number)
            .ok_or_else(|| "value must be finite".to_string());
    }
    if let Ok(s) = obj.downcast::<PyString>() {
        return Ok(J::String(str_of(s)?.to_owned()));
    }
    if let Ok(l) = obj.downcast::<PyList>() {
        return l
            .iter()
            .map(|x| py_to_json(x, depth + 1))
            .collect::<Result<Vec<_>, _>>()
            .map(J::Array);
    }
    if let Ok(t) = obj.downcast::<PyTuple>() {
        return t
            .iter()
            .map(|x| py_to_json(x, depth + 1))
            .collect::<Result<Vec<_>, _>>()
            .map(J::Array);
    }
    if let Ok(d) = obj.downcast::<PyDict>() {
        let mut m = serde_json::Map::new();
        for (k, v) in d.iter() {
            let key = k
                .downcast::<PyString>()
                .map_err(|_| format!("object keys must be strings, got {}", type_name(k)))?;
            m.insert(str_of(key)?.to_owned(), py_to_json(v, depth + 1)?);
        }
        return Ok(J::Object(m));
    }
    Err(format!("unsupported value type {}", type_name(obj)))
}

/// A Python value → a value slot.
pub fn extract_value(obj: &PyAny, arena: &mut Arena) -> Result<VSlot, String> {
    if let Ok(s) = obj.downcast::<PyString>() {
        return Ok(VSlot::Str(arena.push(str_of(s)?)?));
    }
    if obj.is_none() {
        return Ok(VSlot::Null);
    }
    if let Ok(b) = obj.downcast::<PyBool>() {
        return Ok(VSlot::Bool(b.is_true()));
    }
    if let Ok(f) = obj.downcast::<PyFloat>() {
        let v = f.value();
        if !v.is_finite() {
            return Err("value must be finite".into());
        }
        return Ok(VSlot::Float(v));
    }
    if obj.is_instance_of::<PyLong>().unwrap_or(false) {
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(VSlot::Int(i));
        }
        let digits = obj.str().map_err(|e| e.to_string())?;
        return Ok(VSlot::Big(arena.push(str_of(digits)?)?));
    }
    let j = py_to_json(obj, 1)?;
    if !j.is_array() && !j.is_object() {
        return Err(format!("unsupported value type {}", type_name(obj)));
    }
    Ok(VSlot::Json(arena.push(&canonical_json(&j)?)?))
}

/// A finite number that is not a bool (ts, confidence).
pub fn extract_number(obj: &PyAny) -> Option<f64> {
    if obj.downcast::<PyBool>().is_ok() {
        return None;
    }
    if let Ok(f) = obj.downcast::<PyFloat>() {
        return Some(f.value());
    }
    if obj.is_instance_of::<PyLong>().unwrap_or(false) {
        return obj.extract::<f64>().ok();
    }
    None
}

pub fn parse_kind_obj(obj: Option<&PyAny>) -> Result<Option<Kind>, String> {
    match obj {
        None => Ok(None),
        Some(o) if o.is_none() => Ok(None),
        Some(o) => {
            let s = o
                .downcast::<PyString>()
                .map_err(|_| format!("value_kind must be a string, got {}", type_name(o)))?;
            let s = str_of(s)?;
            Kind::parse(s).map(Some).ok_or_else(|| {
                format!("value_kind must be categorical, numeric or hash, got {s:?}")
            })
        }
    }
}

fn string_field<'py>(d: &'py PyDict, key: &PyString, name: &str) -> Result<&'py str, String> {
    match d.get_item(key) {
        Some(v) => match v.downcast::<PyString>() {
            Ok(s) => str_of(s),
            Err(_) => Err(format!("{name} must be a string, got {}", type_name(v))),
        },
        None => Err(format!("missing field {name}")),
    }
}

/// Interned dict keys.
pub struct Keys<'py> {
    identity: &'py PyString,
    primitive: &'py PyString,
    value: &'py PyString,
    ts: &'py PyString,
    confidence: &'py PyString,
    value_kind: &'py PyString,
}

impl<'py> Keys<'py> {
    pub fn new(py: Python<'py>) -> Keys<'py> {
        Keys {
            identity: pyo3::intern!(py, "identity_uuid"),
            primitive: pyo3::intern!(py, "primitive"),
            value: pyo3::intern!(py, "value"),
            ts: pyo3::intern!(py, "ts"),
            confidence: pyo3::intern!(py, "confidence"),
            value_kind: pyo3::intern!(py, "value_kind"),
        }
    }
}

pub fn extract_ts(d: &PyDict, keys: &Keys<'_>) -> Result<f64, String> {
    let ts = match d.get_item(keys.ts) {
        Some(t) => {
            extract_number(t).ok_or_else(|| format!("ts must be a number, got {}", type_name(t)))?
        }
        None => return Err("missing field ts".into()),
    };
    if !ts.is_finite() {
        return Err("ts must be a finite number".into());
    }
    Ok(ts)
}

/// One engine observation from a Python dict.
pub fn extract_item(obj: &PyAny, keys: &Keys<'_>, arena: &mut Arena) -> Result<Item, String> {
    let d = obj
        .downcast::<PyDict>()
        .map_err(|_| format!("observation must be a dict, got {}", type_name(obj)))?;
    let identity = arena.push(string_field(d, keys.identity, "identity_uuid")?)?;
    let primitive = arena.push(string_field(d, keys.primitive, "primitive")?)?;
    let ts = extract_ts(d, keys)?;
    if let Some(c) = d.get_item(keys.confidence) {
        if !c.is_none() {
            match extract_number(c) {
                Some(f) if (0.0..=1.0).contains(&f) => {}
                Some(f) => return Err(format!("confidence must be in [0, 1], got {f}")),
                None => return Err(format!("confidence must be a number, got {}", type_name(c))),
            }
        }
    }
    let kind = parse_kind_obj(d.get_item(keys.value_kind))?;
    let value = match d.get_item(keys.value) {
        Some(v) => extract_value(v, arena)?,
        None => return Err("missing field value".into()),
    };
    Ok(Item {
        identity,
        primitive,
        value,
        ts,
        kind,
    })
}

/// For `aggregate_observations`: (ts, value) of one dict.
pub fn extract_series_item(
    obj: &PyAny,
    keys: &Keys<'_>,
    arena: &mut Arena,
) -> Result<(f64, VSlot), String> {
    let d = obj
        .downcast::<PyDict>()
        .map_err(|_| format!("observation must be a dict, got {}", type_name(obj)))?;
    let ts = extract_ts(d, keys)?;
    let value = match d.get_item(keys.value) {
        Some(v) => extract_value(v, arena)?,
        None => return Err("missing field value".into()),
    };
    Ok((ts, value))
}

static JSON_LOADS: GILOnceCell<PyObject> = GILOnceCell::new();

/// A value as a Python object.
pub fn to_py(py: Python<'_>, v: &Value) -> PyResult<PyObject> {
    Ok(match v {
        Value::Null => py.None(),
        Value::Bool(b) => b.into_py(py),
        Value::Int(i) => i.into_py(py),
        Value::Float(f) => f.into_py(py),
        Value::Str(s) => PyString::new(py, s).into_py(py),
        Value::BigInt(s) => py.get_type::<PyLong>().call1((s.as_ref(),))?.into_py(py),
        Value::Json(s) => {
            let loads = match JSON_LOADS.get(py) {
                Some(f) => f.clone_ref(py),
                None => {
                    let f: PyObject = py.import("json")?.getattr("loads")?.into_py(py);
                    let _ = JSON_LOADS.set(py, f.clone_ref(py));
                    f
                }
            };
            loads.call1(py, (s.as_ref(),))?
        }
    })
}

/// Sequence input: a list fast path, else any iterable.
pub fn for_each_item<'py>(seq: &'py PyAny, mut f: impl FnMut(usize, &'py PyAny)) -> PyResult<()> {
    if let Ok(list) = seq.downcast::<PyList>() {
        for (i, obj) in list.iter().enumerate() {
            f(i, obj);
        }
        return Ok(());
    }
    if seq.downcast::<PyDict>().is_ok() || seq.downcast::<PyString>().is_ok() {
        return Err(PyTypeError::new_err("expected a list of observation dicts"));
    }
    for (i, obj) in seq.iter()?.enumerate() {
        f(i, obj?);
    }
    Ok(())
}
