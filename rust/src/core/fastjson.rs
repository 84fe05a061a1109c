//! A single-pass JSON reader specialised for observation batches.
//!
//! serde_json costs ~3 ns/byte here; sensors send ~150-byte observations by
//! the hundred thousand, so parsing dominated `ingest_json`. This reader
//! knows the six fields it needs, borrows every string that has no escape,
//! skips unknown fields with a validating scanner, and hands lists/objects
//! (rare: ARRAY primitives) to serde_json. It accepts exactly RFC 8259
//! JSON; the property tests check it against serde_json on valid and
//! mutated input.

use std::borrow::Cow;

use super::obs::{check_fields, AnyIn, Fields, ParsedObs};

/// Nesting allowed while skipping unknown fields (serde_json's default).
const MAX_SKIP_DEPTH: usize = 128;

#[derive(Debug)]
pub struct SyntaxError {
    pub offset: usize,
    pub msg: &'static str,
}

type R<T> = Result<T, SyntaxError>;

struct P<'a> {
    b: &'a [u8],
    s: &'a str,
    i: usize,
}

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// The index of the first byte at or after `i` that ends a plain run inside
/// a JSON string: a quote, a backslash or a control character. Eight bytes
/// at a time (SWAR); the lowest flagged byte is exact.
#[inline]
fn plain_run(b: &[u8], mut i: usize) -> usize {
    while let Some(chunk) = b.get(i..i + 8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        let v = u64::from_le_bytes(w);
        let quote = v ^ (LO * u64::from(b'"'));
        let bslash = v ^ (LO * u64::from(b'\\'));
        let zero_q = quote.wrapping_sub(LO) & !quote;
        let zero_b = bslash.wrapping_sub(LO) & !bslash;
        let ctrl = v.wrapping_sub(LO * 0x20) & !v;
        let mask = (zero_q | zero_b | ctrl) & HI;
        if mask != 0 {
            return i + (mask.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&c) = b.get(i) {
        if c == b'"' || c == b'\\' || c < 0x20 {
            break;
        }
        i += 1;
    }
    i
}

/// Exact powers of ten representable in an f64.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// Clinger's fast path for plain decimals (`-123.456`, no exponent): when
/// the digits as an integer `m` are below 2^53 and there are at most 22
/// fraction digits `k`, `m / 10^k` is one correctly rounded division of two
/// exact doubles, so it equals the full parser's result. Anything else
/// returns None (the caller uses `str::parse`).
#[inline]
fn fast_decimal(text: &str) -> Option<f64> {
    let b = text.as_bytes();
    let (neg, digits) = match b.first() {
        Some(b'-') => (true, &b[1..]),
        _ => (false, b),
    };
    let mut m: u64 = 0;
    let mut frac: usize = 0;
    let mut seen_dot = false;
    for &c in digits {
        match c {
            b'0'..=b'9' => {
                m = m.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
                if seen_dot {
                    frac += 1;
                }
            }
            b'.' if !seen_dot => seen_dot = true,
            _ => return None,
        }
    }
    if m >= (1u64 << 53) || frac >= POW10.len() {
        return None;
    }
    let v = m as f64 / POW10[frac];
    Some(if neg { -v } else { v })
}

#[inline]
fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

impl<'a> P<'a> {
    fn err<T>(&self, msg: &'static str) -> R<T> {
        Err(SyntaxError {
            offset: self.i,
            msg,
        })
    }

    #[inline]
    fn ws(&mut self) {
        while self.i < self.b.len() && is_ws(self.b[self.i]) {
            self.i += 1;
        }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    fn expect(&mut self, c: u8, msg: &'static str) -> R<()> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            self.err(msg)
        }
    }

    /// A string starting at the opening quote. Borrowed when it has no
    /// escape.
    fn string(&mut self) -> R<Cow<'a, str>> {
        self.i += 1; // opening quote
        let start = self.i;
        let b = self.b;
        self.i = plain_run(b, self.i);
        loop {
            match b.get(self.i) {
                None => return self.err("EOF while parsing a string"),
                Some(b'"') => {
                    let s = &self.s[start..self.i];
                    self.i += 1;
                    return Ok(Cow::Borrowed(s));
                }
                Some(b'\\') => break,
                Some(&c) if c < 0x20 => return self.err("control character in string"),
                Some(_) => self.i += 1,
            }
        }
        let mut out = String::with_capacity(self.i - start + 16);
        out.push_str(&self.s[start..self.i]);
        loop {
            match b.get(self.i) {
                None => return self.err("EOF while parsing a string"),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(Cow::Owned(out));
                }
                Some(b'\\') => {
                    self.i += 1;
                    let Some(&e) = b.get(self.i) else {
                        return self.err("EOF while parsing a string");
                    };
                    self.i += 1;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let hi = self.hex4()?;
                            let c = if (0xD800..0xDC00).contains(&hi) {
                                if b.get(self.i) != Some(&b'\\') || b.get(self.i + 1) != Some(&b'u')
                                {
                                    return self.err("lone leading surrogate in hex escape");
                                }
                                self.i += 2;
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return self.err("invalid low surrogate in hex escape");
                                }
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else if (0xDC00..0xE000).contains(&hi) {
                                return self.err("lone trailing surrogate in hex escape");
                            } else {
                                hi
                            };
                            match char::from_u32(c) {
                                Some(ch) => out.push(ch),
                                None => return self.err("invalid unicode escape"),
                            }
                        }
                        _ => return self.err("invalid escape"),
                    }
                }
                Some(&c) if c < 0x20 => return self.err("control character in string"),
                Some(_) => {
                    // copy a run of plain bytes (valid UTF-8: the input was
                    // validated, and runs stop only at ASCII bytes)
                    let run = self.i;
                    while let Some(&c) = b.get(self.i) {
                        if c == b'"' || c == b'\\' || c < 0x20 {
                            break;
                        }
                        self.i += 1;
                    }
                    out.push_str(&self.s[run..self.i]);
                }
            }
        }
    }

    /// Skip a string starting at the opening quote, checking only its
    /// syntax (like serde_json and Python's json, lone surrogates in
    /// fields we do not read are accepted).
    fn skip_string(&mut self) -> R<()> {
        self.i += 1;
        let b = self.b;
        loop {
            self.i = plain_run(b, self.i);
            match b.get(self.i) {
                None => return self.err("EOF while parsing a string"),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(());
                }
                Some(b'\\') => {
                    self.i += 1;
                    match b.get(self.i) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 1,
                        Some(b'u') => {
                            self.i += 1;
                            self.hex4()?;
                        }
                        None => return self.err("EOF while parsing a string"),
                        _ => return self.err("invalid escape"),
                    }
                }
                Some(&c) if c < 0x20 => return self.err("control character in string"),
                Some(_) => self.i += 1,
            }
        }
    }

    fn hex4(&mut self) -> R<u32> {
        let Some(h) = self.b.get(self.i..self.i + 4) else {
            return self.err("EOF while parsing a string");
        };
        let mut v = 0u32;
        for &c in h {
            let d = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                b'A'..=b'F' => c - b'A' + 10,
                _ => return self.err("invalid hex escape"),
            };
            v = v * 16 + u32::from(d);
        }
        self.i += 4;
        Ok(v)
    }

    /// The extent of a number, validated against the JSON grammar.
    fn number_span(&mut self) -> R<(usize, bool)> {
        let start = self.i;
        let b = self.b;
        if b.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        match b.get(self.i) {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                while matches!(b.get(self.i), Some(b'0'..=b'9')) {
                    self.i += 1;
                }
            }
            _ => return self.err("invalid number"),
        }
        let mut integral = true;
        if b.get(self.i) == Some(&b'.') {
            integral = false;
            self.i += 1;
            if !matches!(b.get(self.i), Some(b'0'..=b'9')) {
                return self.err("invalid number");
            }
            while matches!(b.get(self.i), Some(b'0'..=b'9')) {
                self.i += 1;
            }
        }
        if matches!(b.get(self.i), Some(b'e' | b'E')) {
            integral = false;
            self.i += 1;
            if matches!(b.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if !matches!(b.get(self.i), Some(b'0'..=b'9')) {
                return self.err("invalid number");
            }
            while matches!(b.get(self.i), Some(b'0'..=b'9')) {
                self.i += 1;
            }
        }
        Ok((start, integral))
    }

    /// A number as serde_json would give it: i64, else u64, else f64
    /// (correctly rounded; std's parser, like serde_json's float_roundtrip).
    fn number(&mut self) -> R<AnyIn<'a>> {
        let (start, integral) = self.number_span()?;
        let text = &self.s[start..self.i];
        if integral {
            if let Ok(i) = text.parse::<i64>() {
                return Ok(AnyIn::I64(i));
            }
            if let Ok(u) = text.parse::<u64>() {
                return Ok(AnyIn::U64(u));
            }
        }
        if let Some(f) = fast_decimal(text) {
            return Ok(AnyIn::F64(f));
        }
        match text.parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(AnyIn::F64(f)),
            _ => {
                self.i = start;
                self.err("number out of range")
            }
        }
    }

    fn literal(&mut self, word: &'static [u8]) -> R<()> {
        if self.b.get(self.i..self.i + word.len()) == Some(word) {
            self.i += word.len();
            Ok(())
        } else {
            self.err("expected value")
        }
    }

    /// Skip one value, validating it.
    fn skip_value(&mut self, depth: usize) -> R<()> {
        if depth > MAX_SKIP_DEPTH {
            return self.err("recursion limit exceeded");
        }
        match self.peek() {
            Some(b'"') => self.skip_string(),
            Some(b'{') => {
                self.i += 1;
                self.ws();
                if self.peek() == Some(b'}') {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    self.ws();
                    if self.peek() != Some(b'"') {
                        return self.err("key must be a string");
                    }
                    self.skip_string()?;
                    self.ws();
                    self.expect(b':', "expected `:`")?;
                    self.ws();
                    self.skip_value(depth + 1)?;
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(());
                        }
                        _ => return self.err("expected `,` or `}`"),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                self.ws();
                if self.peek() == Some(b']') {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    self.ws();
                    self.skip_value(depth + 1)?;
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(());
                        }
                        _ => return self.err("expected `,` or `]`"),
                    }
                }
            }
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number_span().map(|_| ()),
            _ => self.err("expected value"),
        }
    }

    /// One value of a field we read.
    fn any(&mut self) -> R<AnyIn<'a>> {
        match self.peek() {
            Some(b'"') => self.string().map(AnyIn::Str),
            Some(b't') => self.literal(b"true").map(|_| AnyIn::Bool(true)),
            Some(b'f') => self.literal(b"false").map(|_| AnyIn::Bool(false)),
            Some(b'n') => self.literal(b"null").map(|_| AnyIn::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b'[' | b'{') => {
                let start = self.i;
                self.skip_value(1)?;
                match serde_json::from_slice::<serde_json::Value>(&self.b[start..self.i]) {
                    Ok(v) => Ok(AnyIn::Complex(v)),
                    Err(_) => {
                        self.i = start;
                        self.err("invalid value")
                    }
                }
            }
            _ => self.err("expected value"),
        }
    }

    /// An object key at the opening quote: which of the six fields we read
    /// it names (`None`: another key). The common keys are matched on their
    /// raw bytes, quote included; anything else (or an escape) goes through
    /// the general string reader.
    #[inline]
    fn field_key(&mut self) -> R<Option<usize>> {
        const KEYS: [(&[u8], usize); 6] = [
            (b"\"identity_uuid\"", 0),
            (b"\"primitive\"", 1),
            (b"\"value\"", 2),
            (b"\"ts\"", 3),
            (b"\"confidence\"", 4),
            (b"\"value_kind\"", 5),
        ];
        let rest = &self.b[self.i..];
        for (k, slot) in KEYS {
            if rest.starts_with(k) {
                self.i += k.len();
                return Ok(Some(slot));
            }
        }
        let key = self.string()?;
        Ok(match key.as_ref() {
            "identity_uuid" => Some(0),
            "primitive" => Some(1),
            "value" => Some(2),
            "ts" => Some(3),
            "confidence" => Some(4),
            "value_kind" => Some(5),
            _ => None,
        })
    }

    /// One batch element: an observation object (type-checked), or any
    /// other JSON value (rejected per item).
    fn item(&mut self) -> R<Result<ParsedObs<'a>, String>> {
        if self.peek() != Some(b'{') {
            let what = match self.peek() {
                Some(b'[') => "an array",
                Some(b'"') => "a string",
                Some(b't' | b'f') => "a boolean",
                Some(b'n') => "null",
                _ => "a number",
            };
            self.skip_value(1)?;
            return Ok(Err(format!("observation must be an object, got {what}")));
        }
        self.i += 1;
        let mut f: [Option<AnyIn<'a>>; 6] = Default::default();
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
        } else {
            loop {
                self.ws();
                if self.peek() != Some(b'"') {
                    return self.err("key must be a string");
                }
                let slot = self.field_key()?;
                self.ws();
                self.expect(b':', "expected `:`")?;
                self.ws();
                match slot {
                    Some(k) => f[k] = Some(self.any()?),
                    None => self.skip_value(1)?,
                }
                self.ws();
                match self.peek() {
                    Some(b',') => self.i += 1,
                    Some(b'}') => {
                        self.i += 1;
                        break;
                    }
                    _ => return self.err("expected `,` or `}`"),
                }
            }
        }
        let [identity, primitive, value, ts, confidence, value_kind] = f;
        Ok(check_fields(Fields {
            identity,
            primitive,
            value,
            ts,
            confidence,
            value_kind,
        }))
    }
}

/// Parse a whole JSON array of observations. `s` must be the full input.
pub fn parse_array(s: &str) -> R<Vec<Result<ParsedObs<'_>, String>>> {
    let mut p = P {
        b: s.as_bytes(),
        s,
        i: 0,
    };
    let mut out = Vec::with_capacity(s.len() / 96 + 1);
    p.ws();
    p.expect(b'[', "expected `[`")?;
    p.ws();
    if p.peek() == Some(b']') {
        p.i += 1;
    } else {
        loop {
            p.ws();
            out.push(p.item()?);
            p.ws();
            match p.peek() {
                Some(b',') => p.i += 1,
                Some(b']') => {
                    p.i += 1;
                    break;
                }
                _ => return p.err("expected `,` or `]`"),
            }
        }
    }
    p.ws();
    if p.i != p.b.len() {
        return p.err("trailing characters");
    }
    Ok(out)
}

/// Parse one NDJSON line holding one observation.
pub fn parse_line(s: &str) -> R<Result<ParsedObs<'_>, String>> {
    let mut p = P {
        b: s.as_bytes(),
        s,
        i: 0,
    };
    p.ws();
    let item = p.item()?;
    p.ws();
    if p.i != p.b.len() {
        return p.err("trailing characters");
    }
    Ok(item)
}

/// Line and column (1-based) of a byte offset, for error messages.
pub fn line_col(s: &[u8], offset: usize) -> (usize, usize) {
    let before = &s[..offset.min(s.len())];
    let line = before.iter().filter(|&&c| c == b'\n').count() + 1;
    let col = offset
        - before
            .iter()
            .rposition(|&c| c == b'\n')
            .map_or(0, |p| p + 1)
        + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::fast_decimal;

    #[test]
    fn fast_path_matches_std() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let int = x % 10_000_000_000;
            let frac = (x >> 40) % 100_000;
            let digits = ((x >> 20) % 6) as usize;
            let text = if digits == 0 {
                format!("{int}.0")
            } else {
                format!(
                    "{int}.{:0width$}",
                    frac % 10u64.pow(digits as u32),
                    width = digits
                )
            };
            let neg = if x & 1 == 1 { format!("-{text}") } else { text };
            if let Some(f) = fast_decimal(&neg) {
                assert_eq!(f.to_bits(), neg.parse::<f64>().unwrap().to_bits(), "{neg}");
            }
        }
        assert_eq!(fast_decimal("1800000000.123"), Some(1800000000.123));
        assert_eq!(fast_decimal("0.1"), Some(0.1));
        assert_eq!(
            fast_decimal("-0.0").map(f64::to_bits),
            Some((-0.0f64).to_bits())
        );
        assert_eq!(fast_decimal("1e5"), None);
        assert_eq!(fast_decimal("123456789012345678.5"), None);
    }
}
