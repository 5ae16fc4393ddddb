//! MQTT 5 publish properties as mqtt_pg keeps them: a JSON object in `properties jsonb` columns
//! (outbox, history, dead letters) and the argument of `mqtt_publish(..., properties)`.
//!
//! The JSON shape is the public contract (API.md, "MQTT 5"):
//! `{"content_type": text, "payload_format": "bytes"|"utf8", "message_expiry": seconds,
//!   "response_topic": topic, "correlation_data": hex, "user_properties": [[name, value], ...]}`.
//! Every key is optional. Unknown keys are refused rather than ignored, so a misspelt
//! `"corelation_data"` is an error at `mqtt_publish` instead of a reply that never matches.

use serde_json::{Map, Value};

/// The longest UTF-8 string or binary field MQTT can carry (a two-byte length prefix).
pub const MAX_FIELD: usize = 65_535;

/// How the payload is to be read (MQTT 5, 3.3.2.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    Bytes,
    Utf8,
}

/// The publish properties mqtt_pg sends, stores and compares. Topic aliases and subscription
/// identifiers are connection details, not properties of the message, and are not kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageProperties {
    pub content_type: Option<String>,
    pub payload_format: Option<PayloadFormat>,
    /// Seconds the message stays valid; on the way out, what is left of it.
    pub message_expiry: Option<u32>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Vec<u8>>,
    pub user_properties: Vec<(String, String)>,
}

const KEYS: [&str; 6] = [
    "content_type",
    "payload_format",
    "message_expiry",
    "response_topic",
    "correlation_data",
    "user_properties",
];

impl MessageProperties {
    /// True when nothing is set: such a message is stored with `properties` NULL.
    pub fn is_empty(&self) -> bool {
        *self == MessageProperties::default()
    }

    /// Read the JSON form. `null` and `{}` give empty properties. Err: a sentence naming the
    /// key at fault, for a 22023 error.
    pub fn from_json(v: &Value) -> Result<MessageProperties, String> {
        let obj = match v {
            Value::Null => return Ok(MessageProperties::default()),
            Value::Object(o) => o,
            other => {
                return Err(format!(
                    "properties must be a JSON object, not {}",
                    kind(other)
                ))
            }
        };
        if let Some(k) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(format!(
                "unknown property {}; the properties are {}",
                shown(k),
                KEYS.join(", ")
            ));
        }
        let mut p = MessageProperties {
            content_type: string(obj, "content_type")?,
            ..Default::default()
        };
        p.payload_format = match string(obj, "payload_format")?.as_deref() {
            None => None,
            Some("bytes") => Some(PayloadFormat::Bytes),
            Some("utf8") => Some(PayloadFormat::Utf8),
            Some(other) => {
                return Err(format!(
                    "payload_format must be \"bytes\" or \"utf8\", not {}",
                    shown(other)
                ))
            }
        };
        p.message_expiry = match obj.get("message_expiry") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(s) if (1..=u32::MAX as u64).contains(&s) => Some(s as u32),
                _ => {
                    return Err(format!(
                        "message_expiry must be a whole number of seconds from 1 to {}, not {n}",
                        u32::MAX
                    ))
                }
            },
            Some(other) => {
                return Err(format!(
                    "message_expiry must be a number of seconds, not {}",
                    kind(other)
                ))
            }
        };
        p.response_topic = string(obj, "response_topic")?;
        if let Some(t) = &p.response_topic {
            crate::topic::validate_topic(t).map_err(|e| format!("invalid response_topic: {e}"))?;
        }
        // Not `string`: its limit is on the text, and the hex of the longest correlation data
        // MQTT allows is twice that long. The decoded length is what is checked.
        p.correlation_data = match obj.get("correlation_data") {
            None | Some(Value::Null) => None,
            Some(Value::String(hex)) => Some(from_hex(hex).ok_or_else(|| {
                "correlation_data must be a hex string of whole bytes, such as \"0a1b\"".to_string()
            })?),
            Some(other) => {
                return Err(format!(
                    "correlation_data must be a string, not {}",
                    kind(other)
                ))
            }
        };
        if p.correlation_data.as_ref().is_some_and(Vec::is_empty) {
            // mqtt_wait_for_reply refuses empty correlation data: a request carrying it could
            // never be matched to its reply.
            return Err("correlation_data must not be empty".to_string());
        }
        if p.correlation_data
            .as_ref()
            .is_some_and(|c| c.len() > MAX_FIELD)
        {
            return Err(format!(
                "correlation_data is longer than MQTT allows ({MAX_FIELD} bytes)"
            ));
        }
        p.user_properties = match obj.get("user_properties") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => {
                items.iter().map(user_property).collect::<Result<_, _>>()?
            }
            Some(other) => {
                return Err(format!(
                    "user_properties must be an array of [name, value] pairs, not {}",
                    kind(other)
                ))
            }
        };
        Ok(p)
    }

    /// Parse the text of a JSON value (as `properties::text` gives it).
    pub fn from_json_text(text: &str) -> Result<MessageProperties, String> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| format!("properties are not JSON: {e}"))?;
        Self::from_json(&v)
    }

    /// The JSON form, keys in a fixed order; `None` when empty.
    pub fn to_json(&self) -> Option<Value> {
        if self.is_empty() {
            return None;
        }
        let mut o = Map::new();
        if let Some(c) = &self.content_type {
            o.insert("content_type".into(), Value::String(c.clone()));
        }
        if let Some(f) = self.payload_format {
            let name = match f {
                PayloadFormat::Bytes => "bytes",
                PayloadFormat::Utf8 => "utf8",
            };
            o.insert("payload_format".into(), Value::String(name.into()));
        }
        if let Some(e) = self.message_expiry {
            o.insert("message_expiry".into(), Value::from(e));
        }
        if let Some(t) = &self.response_topic {
            o.insert("response_topic".into(), Value::String(t.clone()));
        }
        if let Some(c) = &self.correlation_data {
            o.insert("correlation_data".into(), Value::String(to_hex(c)));
        }
        if !self.user_properties.is_empty() {
            let pairs = self
                .user_properties
                .iter()
                .map(|(k, v)| {
                    Value::Array(vec![Value::String(k.clone()), Value::String(v.clone())])
                })
                .collect();
            o.insert("user_properties".into(), Value::Array(pairs));
        }
        Some(Value::Object(o))
    }

    /// The JSON text, `None` when empty.
    pub fn to_json_text(&self) -> Option<String> {
        self.to_json().map(|v| v.to_string())
    }

    /// The JSON text for a `jsonb` column, `None` when empty. jsonb cannot hold NUL
    /// characters: MQTT forbids them in strings, but a broker may still pass one on, and a
    /// received message must be storable (else it is never acknowledged and comes back for
    /// ever), so each becomes U+FFFD, as in a stored topic.
    pub fn to_jsonb_text(&self) -> Option<String> {
        let has_nul = |s: &str| s.contains('\0');
        let dirty = self.content_type.as_deref().is_some_and(has_nul)
            || self.response_topic.as_deref().is_some_and(has_nul)
            || self
                .user_properties
                .iter()
                .any(|(k, v)| has_nul(k) || has_nul(v));
        if !dirty {
            return self.to_json_text();
        }
        let clean = |s: &String| s.replace('\0', "\u{FFFD}");
        MessageProperties {
            content_type: self.content_type.as_ref().map(clean),
            response_topic: self.response_topic.as_ref().map(clean),
            user_properties: self
                .user_properties
                .iter()
                .map(|(k, v)| (clean(k), clean(v)))
                .collect(),
            ..self.clone()
        }
        .to_json_text()
    }

    /// Bytes these properties add to a PUBLISH packet (identifiers, length prefixes and the
    /// property-length field included), to check a message against a packet limit before it
    /// reaches the connection.
    pub fn encoded_len(&self) -> usize {
        let mut n = 0;
        n += self.content_type.as_ref().map_or(0, |s| 3 + s.len());
        n += self.payload_format.map_or(0, |_| 2);
        n += self.message_expiry.map_or(0, |_| 5);
        n += self.response_topic.as_ref().map_or(0, |s| 3 + s.len());
        n += self.correlation_data.as_ref().map_or(0, |s| 3 + s.len());
        n += self
            .user_properties
            .iter()
            .map(|(k, v)| 5 + k.len() + v.len())
            .sum::<usize>();
        n + varint_len(n)
    }
}

impl MessageProperties {
    /// These properties after `waited_secs` whole seconds in the outbox: `message_expiry`
    /// reduced by the wait (MQTT 5, 3.3.2.3.3: a message is forwarded with what is left of
    /// its expiry). Err once nothing is left, in words for the dead letter's error. Whole
    /// seconds round the wait down, so a message is never dropped before its time.
    pub fn aged(mut self, waited_secs: u64) -> Result<MessageProperties, String> {
        if let Some(expiry) = self.message_expiry {
            match u64::from(expiry).checked_sub(waited_secs) {
                Some(left) if left > 0 => self.message_expiry = Some(left as u32),
                _ => {
                    return Err(format!(
                        "message expired in the outbox: message_expiry {expiry} s, waited {waited_secs} s"
                    ))
                }
            }
        }
        Ok(self)
    }
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// A caller's string quoted for an error message: escaped (a newline in it cannot start a
/// forged log line) and cut short (a megabyte of key is not worth logging).
fn shown(s: &str) -> String {
    const MAX: usize = 60;
    let mut out: String = s.chars().take(MAX).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    format!("{out:?}")
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A UTF-8 string field as MQTT allows it: no NUL, at most 65,535 bytes.
fn mqtt_string(key: &str, s: &str) -> Result<(), String> {
    if s.contains('\0') {
        return Err(format!("{key} must not contain NUL characters"));
    }
    if s.len() > MAX_FIELD {
        return Err(format!(
            "{key} is longer than MQTT allows ({MAX_FIELD} bytes)"
        ));
    }
    Ok(())
}

fn string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            mqtt_string(key, s)?;
            Ok(Some(s.clone()))
        }
        Some(other) => Err(format!("{key} must be a string, not {}", kind(other))),
    }
}

fn user_property(v: &Value) -> Result<(String, String), String> {
    let pair = match v {
        Value::Array(a) if a.len() == 2 => a,
        _ => {
            return Err(format!(
                "each user property must be a [name, value] pair of strings, not {}",
                shown(&v.to_string())
            ))
        }
    };
    match (&pair[0], &pair[1]) {
        (Value::String(k), Value::String(v)) => {
            mqtt_string("a user property name", k)?;
            mqtt_string("a user property value", v)?;
            Ok((k.clone(), v.clone()))
        }
        _ => Err(format!(
            "each user property must be a [name, value] pair of strings, not {}",
            shown(&v.to_string())
        )),
    }
}

/// Lower-case hex, as `encode(bytes, 'hex')` writes it.
pub fn to_hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for byte in b {
        s.push(DIGITS[(byte >> 4) as usize] as char);
        s.push(DIGITS[(byte & 15) as usize] as char);
    }
    s
}

/// Hex of either case to bytes; None for an odd length or a non-hex digit.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.as_bytes()
        .chunks(2)
        .map(|pair| {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            Some((hi * 16 + lo) as u8)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn full_round_trip() {
        let v = json!({
            "content_type": "application/json",
            "payload_format": "utf8",
            "message_expiry": 60,
            "response_topic": "replies/42",
            "correlation_data": "00ff10",
            "user_properties": [["a", "1"], ["a", "2"], ["b", ""]],
        });
        let p = MessageProperties::from_json(&v).unwrap();
        assert_eq!(p.correlation_data.as_deref(), Some(&[0u8, 255, 16][..]));
        assert_eq!(p.user_properties.len(), 3);
        assert_eq!(p.to_json().unwrap(), v);
    }

    #[test]
    fn empty_is_none() {
        for v in [json!(null), json!({}), json!({"content_type": null})] {
            let p = MessageProperties::from_json(&v).unwrap();
            assert!(p.is_empty());
            assert_eq!(p.to_json(), None);
        }
    }

    #[test]
    fn bad_input_names_the_key() {
        let cases = [
            (json!([]), "JSON object"),
            (
                json!({"corelation_data": "00"}),
                "unknown property \"corelation_data\"",
            ),
            (json!({"payload_format": "text"}), "payload_format"),
            (
                json!({"payload_format": 1}),
                "payload_format must be a string",
            ),
            (json!({"message_expiry": 0}), "message_expiry"),
            (json!({"message_expiry": -5}), "message_expiry"),
            (json!({"message_expiry": 4294967296u64}), "message_expiry"),
            (json!({"message_expiry": 1.5}), "message_expiry"),
            (json!({"message_expiry": "60"}), "message_expiry"),
            (json!({"response_topic": "a/+"}), "invalid response_topic"),
            (json!({"response_topic": ""}), "invalid response_topic"),
            (json!({"correlation_data": "abc"}), "correlation_data"),
            (json!({"correlation_data": "zz"}), "correlation_data"),
            (
                json!({"correlation_data": ""}),
                "correlation_data must not be empty",
            ),
            (json!({"content_type": "a\u{0}b"}), "NUL"),
            (json!({"user_properties": {"a": "b"}}), "user_properties"),
            (json!({"user_properties": [["a"]]}), "pair"),
            (json!({"user_properties": [["a", 1]]}), "pair"),
        ];
        for (v, want) in cases {
            let e = MessageProperties::from_json(&v).unwrap_err();
            assert!(e.contains(want), "{v}: {e}");
        }
        // correlation data is limited in bytes, not in hex digits
        let longest = "ab".repeat(MAX_FIELD);
        let p = MessageProperties::from_json(&json!({ "correlation_data": longest })).unwrap();
        assert_eq!(p.correlation_data.map(|c| c.len()), Some(MAX_FIELD));
        let over = "ab".repeat(MAX_FIELD + 1);
        assert!(
            MessageProperties::from_json(&json!({ "correlation_data": over }))
                .unwrap_err()
                .contains("longer than MQTT allows")
        );
        assert!(
            MessageProperties::from_json(&json!({ "correlation_data": 12 }))
                .unwrap_err()
                .contains("correlation_data must be a string")
        );
        let long = "x".repeat(MAX_FIELD + 1);
        assert!(
            MessageProperties::from_json(&json!({ "content_type": long }))
                .unwrap_err()
                .contains("longer")
        );
    }

    #[test]
    fn jsonb_text_has_no_nul() {
        let p = MessageProperties {
            content_type: Some("a\0b".into()),
            response_topic: Some("r\0".into()),
            user_properties: vec![("k\0".into(), "\0v".into()), ("ok".into(), "fine".into())],
            correlation_data: Some(vec![0, 0]),
            ..Default::default()
        };
        let text = p.to_jsonb_text().unwrap();
        assert!(!text.contains("\\u0000"), "{text}");
        let back = MessageProperties::from_json_text(&text).unwrap();
        assert_eq!(back.content_type.as_deref(), Some("a\u{FFFD}b"));
        assert_eq!(
            back.user_properties[0],
            ("k\u{FFFD}".into(), "\u{FFFD}v".into())
        );
        assert_eq!(back.user_properties[1], ("ok".into(), "fine".into()));
        assert_eq!(back.correlation_data, Some(vec![0, 0]));
        let plain = MessageProperties {
            content_type: Some("text/plain".into()),
            ..Default::default()
        };
        assert_eq!(plain.to_jsonb_text(), plain.to_json_text());
        assert_eq!(MessageProperties::default().to_jsonb_text(), None);
    }

    #[test]
    fn errors_quote_input_safely() {
        let forged = format!("x\n2026-12-08 LOG:  forged{}", "y".repeat(10_000));
        for v in [
            json!({ forged.clone(): 1 }),
            json!({ "payload_format": forged.clone() }),
            json!({ "user_properties": [[forged.clone()]] }),
            json!({ "user_properties": [[forged.clone(), 1]] }),
        ] {
            let e = MessageProperties::from_json(&v).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
            assert!(e.len() < 400, "{} bytes", e.len());
        }
    }

    #[test]
    fn aged_subtracts_the_wait() {
        let p = MessageProperties {
            message_expiry: Some(60),
            ..Default::default()
        };
        assert_eq!(p.clone().aged(0).unwrap().message_expiry, Some(60));
        assert_eq!(p.clone().aged(59).unwrap().message_expiry, Some(1));
        let e = p.clone().aged(60).unwrap_err();
        assert_eq!(
            e,
            "message expired in the outbox: message_expiry 60 s, waited 60 s"
        );
        assert!(p.aged(75).unwrap_err().contains("waited 75 s"));
        let none = MessageProperties {
            content_type: Some("text/plain".into()),
            ..Default::default()
        };
        assert_eq!(none.clone().aged(u64::MAX).unwrap(), none);
        let max = MessageProperties {
            message_expiry: Some(u32::MAX),
            ..Default::default()
        };
        assert_eq!(max.aged(1).unwrap().message_expiry, Some(u32::MAX - 1));
    }

    #[test]
    fn hex_matches_postgres() {
        assert_eq!(to_hex(&[0xde, 0xad, 0x01]), "dead01");
        assert_eq!(from_hex("DEad01"), Some(vec![0xde, 0xad, 0x01]));
        assert_eq!(from_hex(""), Some(vec![]));
        assert_eq!(from_hex("é0"), None);
    }

    proptest! {
        #[test]
        fn json_round_trips(
            ct in proptest::option::of("[a-z/]{1,20}"),
            exp in proptest::option::of(1u32..),
            corr in proptest::option::of(proptest::collection::vec(any::<u8>(), 1..40)),
            users in proptest::collection::vec(("[^\u{0}]{0,8}", "[^\u{0}]{0,8}"), 0..4),
            utf8 in any::<bool>(),
        ) {
            let p = MessageProperties {
                content_type: ct,
                payload_format: Some(if utf8 { PayloadFormat::Utf8 } else { PayloadFormat::Bytes }),
                message_expiry: exp,
                response_topic: Some("r/1".into()),
                correlation_data: corr,
                user_properties: users,
            };
            let text = p.to_json_text().unwrap();
            prop_assert_eq!(MessageProperties::from_json_text(&text).unwrap(), p);
        }

        #[test]
        fn hex_round_trips(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert_eq!(from_hex(&to_hex(&b)), Some(b));
        }
    }
}
