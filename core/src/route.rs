//! The shape of a JSON payload routed into a table: which rows it makes and which keys each
//! row has. PostgreSQL converts the values (`jsonb_populate_record`); this only decides, before
//! any SQL runs, whether the payload can be a row at all, and which columns each row fills, so
//! that a column the payload does not mention keeps its DEFAULT.

use std::collections::HashMap;

use serde_json::value::RawValue;

/// One object of a payload: its exact JSON text (numbers are passed on as written, never
/// through a float) and its keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonRow<'a> {
    pub text: &'a str,
    pub keys: Vec<String>,
}

fn keys_of(text: &str) -> Result<Vec<String>, serde_json::Error> {
    let map: HashMap<String, &RawValue> = serde_json::from_str(text)?;
    Ok(map.into_keys().collect())
}

/// The rows a payload makes: a JSON object is one, an array of objects one each (an empty
/// array none). Anything else is refused with the reason, which ends up in `mqtt_dead_letter`.
pub fn json_rows(payload: &[u8]) -> Result<Vec<JsonRow<'_>>, String> {
    let text = std::str::from_utf8(payload)
        .map_err(|_| "the payload is not UTF-8 text, so it is not JSON".to_string())?;
    let raw: &RawValue =
        serde_json::from_str(text).map_err(|e| format!("the payload is not JSON: {e}"))?;
    let body = raw.get().trim_start();
    let object = |t: &'_ str| keys_of(t).map_err(|e| format!("the payload is not JSON: {e}"));
    match body.as_bytes().first() {
        Some(b'{') => Ok(vec![JsonRow {
            text: raw.get(),
            keys: object(raw.get())?,
        }]),
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_str(raw.get())
                .map_err(|e| format!("the payload is not JSON: {e}"))?;
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    if !item.get().trim_start().starts_with('{') {
                        return Err(format!(
                            "element {i} of the payload's array is not a JSON object (a target table takes an object or an array of objects)"
                        ));
                    }
                    Ok(JsonRow {
                        text: item.get(),
                        keys: object(item.get())?,
                    })
                })
                .collect()
        }
        _ => Err(
            "the payload is JSON but not an object or an array of objects, which a target table needs"
                .to_string(),
        ),
    }
}

/// Which of `columns` (the target's insertable columns, in order) a row fills: those named by
/// one of its keys or by one of the `extra` keys (level names, `topic`, `received_at`).
pub fn filled_columns(columns: &[String], keys: &[String], extra: &[&str]) -> Vec<usize> {
    columns
        .iter()
        .enumerate()
        .filter(|(_, c)| keys.iter().any(|k| k == *c) || extra.contains(&c.as_str()))
        .map(|(i, _)| i)
        .collect()
}

/// `object` (the JSON text of one object, as [`json_rows`] gives it) with `extra` keys laid
/// over it, as JSON text: the pairs are appended, and PostgreSQL's jsonb keeps the last value
/// of a repeated key, so they win over the payload's own. Building the text here spares the
/// database a parse and two concatenations of jsonb per routed row.
pub fn overlay(object: &str, extra: &[(&str, &str)]) -> String {
    let body = object.trim_end();
    let Some(inner) = body.strip_suffix('}') else {
        return object.to_string(); // not an object: json_rows never hands one out
    };
    let empty = inner
        .trim_start()
        .strip_prefix('{')
        .is_some_and(|rest| rest.trim().is_empty());
    let mut out = String::with_capacity(body.len() + extra.len() * 32);
    out.push_str(inner);
    for (i, (key, value)) in extra.iter().enumerate() {
        if !(empty && i == 0) {
            out.push_str(", ");
        }
        out.push_str(&serde_json::Value::String((*key).to_string()).to_string());
        out.push_str(": ");
        out.push_str(&serde_json::Value::String((*value).to_string()).to_string());
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys(rows: &[JsonRow<'_>]) -> Vec<Vec<String>> {
        rows.iter()
            .map(|r| {
                let mut k = r.keys.clone();
                k.sort();
                k
            })
            .collect()
    }

    #[test]
    fn overlay_appends_so_the_extra_keys_win() {
        let v: serde_json::Value = serde_json::from_str(&overlay(
            r#" {"a": 1, "topic": "x"} "#,
            &[("topic", "t/1"), ("line", "l\"2")],
        ))
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a": 1, "topic": "t/1", "line": "l\"2"})
        );
        assert_eq!(overlay("{}", &[("k", "v")]), r#"{"k": "v"}"#);
        assert_eq!(
            overlay("{ \n }", &[("k", "v"), ("j", "w")]),
            "{ \n \"k\": \"v\", \"j\": \"w\"}"
        );
        assert_eq!(overlay(r#"{"a":[1,{"b":2}]}"#, &[]), r#"{"a":[1,{"b":2}]}"#);
    }

    #[test]
    fn objects_and_arrays() {
        let rows = json_rows(br#" {"device": "d1", "value": 21.50000000000000001} "#).unwrap();
        assert_eq!(keys(&rows), [["device", "value"]]);
        // The number's text is kept, not rounded through a float.
        assert!(rows[0].text.contains("21.50000000000000001"));
        let rows = json_rows(br#"[{"a": 1}, {"b": [1, {"c": 2}]}, {}]"#).unwrap();
        assert_eq!(keys(&rows), vec![vec!["a"], vec!["b"], vec![]]);
        assert_eq!(rows[1].text, r#"{"b": [1, {"c": 2}]}"#);
        assert_eq!(json_rows(b"[]").unwrap(), []);
        let rows = json_rows(br#"{"k\u00e9y": 1}"#).unwrap();
        assert_eq!(rows[0].keys, ["k\u{e9}y"]);
    }

    #[test]
    fn refusals() {
        assert!(json_rows(b"\xff").unwrap_err().contains("not UTF-8"));
        assert!(json_rows(b"not json").unwrap_err().contains("not JSON"));
        assert!(json_rows(b"{\"a\": 1").unwrap_err().contains("not JSON"));
        assert!(json_rows(b"42").unwrap_err().contains("not an object"));
        assert!(json_rows(b"\"s\"").unwrap_err().contains("not an object"));
        assert!(json_rows(br#"[{"a": 1}, 2]"#)
            .unwrap_err()
            .contains("element 1"));
        assert!(json_rows(b"").unwrap_err().contains("not JSON"));
    }

    #[test]
    fn columns_filled() {
        let cols: Vec<String> = ["id", "device", "value", "topic", "received_at", "line"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let got = filled_columns(
            &cols,
            &["value".into(), "device".into(), "junk".into()],
            &["line", "topic", "received_at"],
        );
        assert_eq!(got, [1, 2, 3, 4, 5]);
    }

    proptest! {
        /// Any JSON object's keys are found, and arbitrary bytes never panic.
        #[test]
        fn keys_found(map in proptest::collection::hash_map("[a-z\"\\\\é]{1,6}", any::<i32>(), 0..6)) {
            let text = serde_json::to_string(&map).unwrap();
            let rows = json_rows(text.as_bytes()).unwrap();
            let mut got = rows[0].keys.clone();
            got.sort();
            let mut want: Vec<String> = map.keys().cloned().collect();
            want.sort();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = json_rows(&bytes);
        }
    }

    proptest! {
        #[test]
        fn overlay_is_the_object_with_the_extra_keys_set(
            base in proptest::collection::btree_map("[a-z\"\\\\ ]{0,4}", 0i64..100, 0..5),
            extra in proptest::collection::vec(("[a-z\"\\\\/+# ]{0,4}", "[ -~é]{0,6}"), 0..4),
            pad in "[ \n]{0,2}",
        ) {
            let text = format!("{pad}{}{pad}", serde_json::to_string(&base).unwrap());
            let pairs: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let got: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&overlay(&text, &pairs)).unwrap();
            let mut want: serde_json::Map<String, serde_json::Value> =
                base.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect();
            for (k, v) in &extra {
                want.insert(k.clone(), serde_json::json!(v));
            }
            prop_assert_eq!(got, want);
        }
    }
}
