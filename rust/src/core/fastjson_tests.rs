//! The fast reader must agree with serde_json (the reference
//! `parse_batch_serde`) on valid input and on corrupted input.

use proptest::prelude::*;

use super::json::{parse_batch, parse_batch_serde};
use super::obs::ParsedObs;
use super::value::ValueRef;

fn json_string() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        r#""steady""#,
        r#""""#,
        r#""a\"b""#,
        r#""tab\there""#,
        r#""\u00e9t\u00E9""#,
        r#""\ud83d\ude00""#,
        r#""日本""#,
        r#""\/slash\\""#,
        r#""motor.input_modality""#,
    ])
    .prop_map(str::to_owned)
}

fn json_scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        json_string(),
        prop::sample::select(vec![
            "0",
            "1",
            "-1",
            "12.5",
            "1e3",
            "1E-3",
            "-2.5e+2",
            "1.0",
            "9223372036854775807",
            "9223372036854775808",
            "18446744073709551616",
            "-9223372036854775809",
            "true",
            "false",
            "null",
            "0.1",
            "123456789.123456789",
        ])
        .prop_map(str::to_owned),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:?}")),
        any::<i64>().prop_map(|i| i.to_string()),
    ]
}

pub(super) fn json_value() -> impl Strategy<Value = String> {
    json_scalar().prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec((json_string(), inner), 0..4).prop_map(|v| {
                format!(
                    "{{{}}}",
                    v.iter()
                        .map(|(k, x)| format!("{k}:{x}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }),
        ]
    })
}

fn observation() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec![r#""id-1""#, r#""a\u0062c""#, "5", "null"]),
        prop::sample::select(vec![r#""motor.input_modality""#, r#""p""#, "[1]"]),
        json_value(),
        prop_oneof![json_scalar(), Just("1700000000.25".to_string())],
        prop::option::of(prop::sample::select(vec![
            "1.0", "0", "0.5", "2", "null", r#""x""#,
        ])),
        prop::option::of(prop::sample::select(vec![
            r#""numeric""#,
            r#""hash""#,
            r#""x""#,
            "null",
        ])),
        prop::collection::vec((json_string(), json_value()), 0..3),
        any::<u64>(),
        prop::sample::select(vec!["", " ", "\t", "\r"]),
    )
        .prop_map(|(i, p, v, ts, conf, kind, extra, order, ws)| {
            let mut fields = vec![
                format!(r#""identity_uuid":{i}"#),
                format!(r#""primitive":{p}"#),
                format!(r#""value":{v}"#),
                format!(r#""ts":{ts}"#),
            ];
            if let Some(c) = conf {
                fields.push(format!(r#""confidence":{c}"#));
            }
            if let Some(k) = kind {
                fields.push(format!(r#""value_kind":{k}"#));
            }
            for (k, x) in extra {
                fields.push(format!("{k}:{x}"));
            }
            // a cheap deterministic shuffle
            let n = fields.len();
            for j in 0..n {
                let k = ((order >> (j % 16 * 4)) as usize) % n;
                fields.swap(j, k);
            }
            format!("{ws}{{{ws}{}}}{ws}", fields.join(&format!(",{ws}")))
        })
}

fn same_obs(a: &ParsedObs<'_>, b: &ParsedObs<'_>) -> bool {
    let value_same = match (a.value.as_ref(), b.value.as_ref()) {
        // "-0": serde_json says -0.0, we say 0 (as Python's json does)
        (ValueRef::Int(0), ValueRef::Float(f)) | (ValueRef::Float(f), ValueRef::Int(0)) => f == 0.0,
        (x, y) => x == y,
    };
    a.identity == b.identity
        && a.primitive == b.primitive
        && value_same
        && a.ts.to_bits() == b.ts.to_bits()
        && a.kind == b.kind
}

fn agree(input: &[u8]) -> Result<(), TestCaseError> {
    let fast = parse_batch(input);
    let slow = parse_batch_serde(input);
    // serde_json does not validate UTF-8 inside strings it skips; we reject
    // any input that is not UTF-8, as RFC 8259 (and Python's json) do.
    let utf8 = std::str::from_utf8(input).is_ok();
    match (&fast, &slow) {
        (Err(_), Err(_)) => Ok(()),
        (Err(e), Ok(_)) if !utf8 && e.contains("UTF-8") => Ok(()),
        (Ok(f), Ok(s)) => {
            prop_assert_eq!(f.len(), s.len());
            for (x, y) in f.iter().zip(s.iter()) {
                match (x, y) {
                    (Ok(a), Ok(b)) => prop_assert!(same_obs(a, b), "{:?} vs {:?}", a, b),
                    (Err(_), Err(_)) => {}
                    (Err(e), Ok(_)) if !utf8 && e.contains("UTF-8") => {}
                    _ => prop_assert!(false, "item disagrees: {:?} vs {:?}", x, y),
                }
            }
            Ok(())
        }
        _ => {
            prop_assert!(
                false,
                "batch disagrees: {:?} vs {:?}",
                fast.is_ok(),
                slow.is_ok()
            );
            Ok(())
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn ndjson_agrees(lines in prop::collection::vec(observation(), 1..5)) {
        agree(lines.join("\n").as_bytes())?;
    }

    #[test]
    fn array_agrees(lines in prop::collection::vec(prop_oneof![observation(), json_value()], 0..5)) {
        agree(format!("[{}]", lines.join(",")).as_bytes())?;
    }

    #[test]
    fn corrupted_input_agrees(
        lines in prop::collection::vec(observation(), 1..3),
        array in any::<bool>(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..3),
    ) {
        let text = if array { format!("[{}]", lines.join(",")) } else { lines.join("\n") };
        let mut bytes = text.into_bytes();
        for (pos, byte, op) in edits {
            if bytes.is_empty() { break; }
            let p = pos % bytes.len();
            let byte = if byte.is_ascii() { byte } else { b'"' };
            match op {
                0 => bytes[p] = byte,
                1 => { bytes.remove(p); }
                _ => bytes.insert(p, byte),
            }
        }
        agree(&bytes)?;
    }
}

#[test]
fn hand_picked_edge_cases() {
    for case in [
        &b"[]"[..],
        b"  [ ]  ",
        b"[1,]",
        b"[,1]",
        b"[\"a\"] x",
        b"{\"identity_uuid\":\"i\",\"primitive\":\"p\",\"value\":1,\"ts\":1,}",
        b"{\"identity_uuid\":\"i\",\"identity_uuid\":\"j\",\"primitive\":\"p\",\"value\":01,\"ts\":1}",
        b"{\"identity_uuid\":\"i\",\"primitive\":\"p\",\"value\":\"\\ud800\",\"ts\":1}",
        b"{\"identity_uuid\":\"i\",\"primitive\":\"p\",\"value\":\"a\x01b\",\"ts\":1}",
        b"{\"identity_uuid\":\"i\",\"primitive\":\"p\",\"value\":1e400,\"ts\":1}",
        b"{\"identity_uuid\":\"i\",\"primitive\":\"p\",\"value\":-,\"ts\":1}",
        b"{\"identity_uuid\":\"i\",\"primitive\":\"p\",\"value\":[1,{\"a\":[]}],\"ts\":1e2}",
        b"{\"identity_uuid\":\"i\",\"primitive\":\"p\",\"value\":tru,\"ts\":1}",
        b"{\"x\":{\"y\":[1,2,{\"z\":\"\\u00e9\"}]},\"identity_uuid\":\"i\",\"primitive\":\"p\",\"value\":null,\"ts\":-0.0}",
        b"\xEF\xBB\xBF[{\"identity_uuid\":\"i\",\"primitive\":\"p\",\"value\":1,\"ts\":1}]",
    ] {
        agree(case).unwrap();
    }
    let deep = format!("[{}1{}]", "[".repeat(200), "]".repeat(200));
    // we refuse nesting deeper than 128 even in skipped values
    assert!(parse_batch(deep.as_bytes()).is_err());
}
