//! Topic templates (`mqtt_publish_trigger`'s `orders/{state}/{id}`) and filters that name their
//! levels (`mqtt_subscribe('plant/{line}/temperature')`).
//!
//! A template is filled from row data, which nobody vetted: a value must never add a level, a
//! wildcard or a `$` topic. So every value is percent-encoded for one level (see
//! [`encode_level`]), and what comes out is a valid topic whatever the data.

use std::borrow::Cow;
use std::fmt;

use crate::topic::{self, TopicError};

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Literal(String),
    /// `{name}`: filled with the value of `name`.
    Placeholder(String),
}

/// A parsed topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// Why a template or a named filter is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateError {
    /// A `{` without its `}`.
    Unclosed,
    /// `{}`.
    EmptyName,
    /// A name holding `{`, `/`, `+` or `#`.
    BadName(String),
    /// A level of a filter with braces that is not exactly `{name}`.
    NotWholeLevel(String),
    /// The same level name twice in one filter.
    DuplicateName(String),
    /// The literal text (or the filter) is not a valid topic.
    Topic(TopicError),
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateError::Unclosed => write!(f, "a \"{{\" has no closing \"}}\""),
            TemplateError::EmptyName => write!(f, "\"{{}}\" names nothing"),
            TemplateError::BadName(n) => write!(
                f,
                "placeholder \"{{{n}}}\" may not hold \"{{\", \"/\", \"+\" or \"#\""
            ),
            TemplateError::NotWholeLevel(l) => write!(
                f,
                "level \"{l}\" has braces but is not a whole {{name}} level"
            ),
            TemplateError::DuplicateName(n) => write!(f, "level name \"{n}\" is used twice"),
            TemplateError::Topic(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for TemplateError {}

fn check_name(name: &str) -> Result<(), TemplateError> {
    if name.is_empty() {
        return Err(TemplateError::EmptyName);
    }
    if name.contains(['{', '/', '+', '#', '\0']) {
        return Err(TemplateError::BadName(name.to_string()));
    }
    Ok(())
}

impl Template {
    /// Parse `text`. The literal parts must make a valid topic name on their own (no `+`,
    /// `#` or NUL); the length is checked once filled, by [`Template::fill`]'s caller.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or(TemplateError::Unclosed)?;
            let name = &after[..close];
            check_name(name)?;
            parts.push(Part::Placeholder(name.to_string()));
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        // A template of placeholders only is fine; check what the literals contribute with
        // every placeholder standing for a harmless level value.
        let probe: String = parts
            .iter()
            .map(|p| match p {
                Part::Literal(l) => l.as_str(),
                Part::Placeholder(_) => "x",
            })
            .collect();
        topic::validate_topic(&probe).map_err(TemplateError::Topic)?;
        Ok(Template { parts })
    }

    /// The placeholder names, in order (repeats included).
    pub fn placeholders(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Placeholder(n) => Some(n.as_str()),
            Part::Literal(_) => None,
        })
    }

    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// Fill the template: `value(name)` gives a placeholder's raw value (None for NULL), which
    /// is encoded for one level. Validate the result with `topic::validate_topic` (its length
    /// depends on the data).
    pub fn fill<'a>(&'a self, mut value: impl FnMut(&'a str) -> Option<String>) -> String {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Literal(l) => out.push_str(l),
                Part::Placeholder(n) => out.push_str(&encode_level(value(n).as_deref())),
            }
        }
        out
    }
}

/// What a NULL or empty value becomes: MQTT allows empty levels, but `orders//new` reads as a
/// mistake and a `+` subscriber cannot tell it from a missing level.
pub const EMPTY_LEVEL: &str = "_";

/// Make a value safe as (part of) one topic level: `%` `/` `+` `#` `$` and NUL are
/// percent-encoded (`%25` `%2F` `%2B` `%23` `%24` `%00`), NULL and '' become `_`, and a value
/// that is exactly `_` becomes `%5F`, so every encoded value decodes to exactly one original.
pub fn encode_level(value: Option<&str>) -> Cow<'_, str> {
    let value = match value {
        None | Some("") => return Cow::Borrowed(EMPTY_LEVEL),
        Some(EMPTY_LEVEL) => return Cow::Borrowed("%5F"),
        Some(v) => v,
    };
    if !value.contains(['%', '/', '+', '#', '$', '\0']) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            '+' => out.push_str("%2B"),
            '#' => out.push_str("%23"),
            '$' => out.push_str("%24"),
            '\0' => out.push_str("%00"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The inverse of [`encode_level`] (None for `_`), for subscribers and tests.
pub fn decode_level(level: &str) -> Option<String> {
    if level == EMPTY_LEVEL {
        return None;
    }
    let bytes = level.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// A subscription filter whose levels may be named: `plant/{line}/temperature` is subscribed
/// as `plant/+/temperature`, and each message's second level is its `line`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedFilter {
    /// What the broker is asked for.
    pub filter: String,
    /// (level index in the topic, name), in level order.
    pub names: Vec<(usize, String)>,
}

impl NamedFilter {
    /// Parse a filter as written in `mqtt_topic.name`. A level with a brace must be exactly
    /// `{name}`; the filter with those levels as `+` must be a valid MQTT filter.
    pub fn parse(text: &str) -> Result<NamedFilter, TemplateError> {
        // Levels of a shared subscription's filter start after `$share/GROUP/`.
        let inner = text
            .strip_prefix("$share/")
            .and_then(|rest| rest.split_once('/'))
            .map_or(text, |(_, inner)| inner);
        let prefix = text.len() - inner.len();
        let mut filter = String::with_capacity(text.len());
        filter.push_str(&text[..prefix]);
        let mut names: Vec<(usize, String)> = Vec::new();
        for (i, level) in inner.split('/').enumerate() {
            if i > 0 {
                filter.push('/');
            }
            if !level.contains(['{', '}']) {
                filter.push_str(level);
                continue;
            }
            let name = level
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .filter(|n| !n.contains(['{', '}']))
                .ok_or_else(|| {
                    if level.starts_with('{') && !level.contains('}') {
                        TemplateError::Unclosed
                    } else {
                        TemplateError::NotWholeLevel(level.to_string())
                    }
                })?;
            check_name(name)?;
            if names.iter().any(|(_, n)| n == name) {
                return Err(TemplateError::DuplicateName(name.to_string()));
            }
            names.push((i, name.to_string()));
            filter.push('+');
        }
        topic::validate_filter(&filter).map_err(TemplateError::Topic)?;
        Ok(NamedFilter { filter, names })
    }

    /// The named levels' values in `topic` (a topic the filter matched).
    pub fn values<'t>(&self, topic: &'t str) -> Vec<(&str, &'t str)> {
        let levels: Vec<&str> = topic.split('/').collect();
        self.names
            .iter()
            .filter_map(|(i, n)| levels.get(*i).map(|v| (n.as_str(), *v)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_fills() {
        let t = Template::parse("erp/{schema}/{table}/{op}/{id}").unwrap();
        assert_eq!(
            t.placeholders().collect::<Vec<_>>(),
            ["schema", "table", "op", "id"]
        );
        let topic = t.fill(|n| match n {
            "schema" => Some("public".into()),
            "table" => Some("sale_order".into()),
            "op" => Some("update".into()),
            _ => Some("a/b+#$%".into()),
        });
        assert_eq!(topic, "erp/public/sale_order/update/a%2Fb%2B%23%24%25");
    }

    #[test]
    fn refuses_bad_templates() {
        assert_eq!(Template::parse("a/{id"), Err(TemplateError::Unclosed));
        assert_eq!(Template::parse("a/{}"), Err(TemplateError::EmptyName));
        assert!(matches!(
            Template::parse("a/+/{id}"),
            Err(TemplateError::Topic(_))
        ));
        assert!(matches!(
            Template::parse("a/#"),
            Err(TemplateError::Topic(_))
        ));
        assert!(matches!(Template::parse(""), Err(TemplateError::Topic(_))));
        assert!(matches!(
            Template::parse("{a/b}"),
            Err(TemplateError::BadName(_))
        ));
        assert!(Template::parse("{Name}").is_ok());
        assert!(Template::parse("a/x}y").is_ok());
    }

    #[test]
    fn empty_and_underscore() {
        assert_eq!(encode_level(None), "_");
        assert_eq!(encode_level(Some("")), "_");
        assert_eq!(encode_level(Some("_")), "%5F");
        assert_eq!(encode_level(Some("stock_move")), "stock_move");
        assert_eq!(decode_level("_"), None);
        assert_eq!(decode_level("%5F").as_deref(), Some("_"));
    }

    #[test]
    fn named_filters() {
        let f = NamedFilter::parse("plant/{line}/temperature").unwrap();
        assert_eq!(f.filter, "plant/+/temperature");
        assert_eq!(f.names, [(1, "line".to_string())]);
        assert_eq!(f.values("plant/l7/temperature"), [("line", "l7")]);
        let s = NamedFilter::parse("$share/g/plant/{line}/{sensor}").unwrap();
        assert_eq!(s.filter, "$share/g/plant/+/+");
        assert_eq!(s.values("plant/a/b"), [("line", "a"), ("sensor", "b")]);
        assert_eq!(NamedFilter::parse("a/#").unwrap().names, []);
        assert_eq!(NamedFilter::parse("a/{x"), Err(TemplateError::Unclosed));
        assert_eq!(NamedFilter::parse("a/{}"), Err(TemplateError::EmptyName));
        assert!(matches!(
            NamedFilter::parse("a/{x}y"),
            Err(TemplateError::NotWholeLevel(_))
        ));
        assert!(matches!(
            NamedFilter::parse("a/{x}/{x}"),
            Err(TemplateError::DuplicateName(_))
        ));
        assert!(matches!(
            NamedFilter::parse("a/{b/c}"),
            Err(TemplateError::Unclosed)
        ));
        assert!(matches!(
            NamedFilter::parse("a/#/{x}"),
            Err(TemplateError::Topic(_))
        ));
    }

    proptest! {
        /// Whatever the data, a filled template is a valid topic with exactly the template's
        /// levels, and each value decodes back to itself.
        #[test]
        fn data_never_adds_levels(values in proptest::collection::vec(any::<Option<String>>(), 3)) {
            let t = Template::parse("t/{a}/{b}/x{c}").unwrap();
            let topic = t.fill(|n| match n {
                "a" => values[0].clone(),
                "b" => values[1].clone(),
                _ => values[2].clone(),
            });
            let levels: Vec<&str> = topic.split('/').collect();
            prop_assert_eq!(levels.len(), 4);
            prop_assert!(!topic.contains(['+', '#', '\0']));
            prop_assert!(!topic.contains('$'));
            if topic.len() <= 65_535 {
                prop_assert!(crate::topic::validate_topic(&topic).is_ok());
            }
            for (level, v) in levels[1..3].iter().zip(&values) {
                let expect = v.clone().filter(|s| !s.is_empty());
                prop_assert_eq!(decode_level(level), expect);
            }
        }

        #[test]
        fn encoding_is_injective(a in any::<String>(), b in any::<String>()) {
            prop_assume!(a != b && !a.is_empty() && !b.is_empty());
            prop_assert_ne!(encode_level(Some(&a)), encode_level(Some(&b)));
        }
    }
}
