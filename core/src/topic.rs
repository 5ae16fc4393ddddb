//! MQTT 3.1.1 / 5.0 topic-name and topic-filter rules.
//!
//! Why this exists: a malformed topic handed to the broker either gets the
//! whole connection dropped (MQTT servers disconnect on protocol errors) or,
//! worse, is silently accepted by one broker and rejected by another. Since
//! mqtt_pg publishes from inside transactions, it is far better to reject a
//! bad topic at SQL-call time with an actionable message than to discover it
//! later in the background worker's log. The same module implements filter
//! matching so incoming messages can be routed to the right subscription
//! without asking the broker.
//!
//! The rules implemented here are those of the MQTT 3.1.1 specification
//! (sections 4.7.1 - 4.7.3) and MQTT 5.0 (4.7 and 4.8.2 for shared
//! subscriptions):
//!
//! * topic names and filters are non-empty UTF-8 of at most 65,535 bytes and
//!   must not contain U+0000;
//! * topic names (used to publish) must not contain `+` or `#`;
//! * in filters, `#` must occupy a whole level and be the last level, `+`
//!   must occupy a whole level;
//! * a filter whose first level is a wildcard does not match topics that
//!   start with `$` (such as `$SYS/...`);
//! * `$share/{group}/{filter}` is a shared subscription: the group must be
//!   non-empty and free of `/`, `+` and `#`, and a filter must follow.

use std::fmt;

/// Largest topic name or filter, in bytes of UTF-8, that MQTT can carry.
///
/// MQTT encodes strings with a two-byte length prefix, so nothing longer can
/// even be put on the wire.
pub const MAX_TOPIC_LEN: usize = 65_535;

/// The prefix that marks an MQTT 5 shared subscription.
const SHARE_PREFIX: &str = "$share/";

/// Why a topic name or filter was rejected.
///
/// The `Display` text is a one-line statement of the rule that was broken;
/// it deliberately does not echo the topic back, because topics can embed
/// identifiers (device serials, customer ids) that should not end up in
/// server logs. [`TopicError::hint`] says how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicError {
    /// The topic or filter is the empty string.
    Empty,
    /// The topic or filter contains the NUL character (U+0000).
    ContainsNul,
    /// The topic or filter is longer than [`MAX_TOPIC_LEN`] bytes of UTF-8.
    TooLong {
        /// Actual length in bytes.
        len: usize,
    },
    /// A topic name used for publishing contains `+` or `#`.
    WildcardInTopic,
    /// `#` appears somewhere other than alone in the last level of a filter.
    MisplacedMultiLevelWildcard,
    /// `+` appears in a level together with other characters.
    MisplacedSingleLevelWildcard,
    /// A `$share/GROUP/FILTER` subscription has an empty or invalid group,
    /// or no filter after the group.
    BadSharedSubscription,
}

impl TopicError {
    /// A fix a DBA can act on, suitable for a PostgreSQL `HINT`.
    pub fn hint(&self) -> &'static str {
        match self {
            TopicError::Empty => {
                "Pass a non-empty topic such as 'plant/line1/temperature'."
            }
            TopicError::ContainsNul => {
                "Remove the NUL (\\0) character from the topic; MQTT forbids it."
            }
            TopicError::TooLong { .. } => {
                "Shorten the topic to at most 65535 bytes; move long identifiers into the payload."
            }
            TopicError::WildcardInTopic => {
                "Publish to a concrete topic such as 'plant/line1/temperature'; wildcards are only for subscriptions."
            }
            TopicError::MisplacedMultiLevelWildcard => {
                "Use '#' only as a whole last level, e.g. 'plant/#' rather than 'plant#' or 'plant/#/x'."
            }
            TopicError::MisplacedSingleLevelWildcard => {
                "Use '+' only as a whole level, e.g. 'plant/+/temperature' rather than 'plant/line+/temperature'."
            }
            TopicError::BadSharedSubscription => {
                "Write shared subscriptions as '$share/GROUP/FILTER' with a non-empty GROUP free of '/', '+' and '#', e.g. '$share/workers/plant/#'."
            }
        }
    }
}

impl fmt::Display for TopicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicError::Empty => f.write_str("topic must not be empty"),
            TopicError::ContainsNul => f.write_str("topic must not contain the NUL character"),
            TopicError::TooLong { len } => write!(
                f,
                "topic is {len} bytes long, more than the MQTT maximum of {MAX_TOPIC_LEN} bytes"
            ),
            TopicError::WildcardInTopic => {
                f.write_str("topic must not contain the wildcard characters '+' or '#'")
            }
            TopicError::MisplacedMultiLevelWildcard => f.write_str(
                "the multi-level wildcard '#' must be alone in the last level of a topic filter",
            ),
            TopicError::MisplacedSingleLevelWildcard => f.write_str(
                "the single-level wildcard '+' must occupy an entire level of a topic filter",
            ),
            TopicError::BadSharedSubscription => f.write_str(
                "shared subscription must have the form '$share/GROUP/FILTER' with a valid group and filter",
            ),
        }
    }
}

impl std::error::Error for TopicError {}

/// Checks shared by topic names and filters: emptiness, length, NUL.
fn validate_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong { len: s.len() });
    }
    if s.contains('\0') {
        return Err(TopicError::ContainsNul);
    }
    Ok(())
}

/// Validates a topic *name*, i.e. what a message is published to.
///
/// Topic names may contain empty levels (`a//b`, `/a`) and may start with `$`;
/// both are legal MQTT even if unusual. They may not contain wildcards.
pub fn validate_topic(topic: &str) -> Result<(), TopicError> {
    validate_common(topic)?;
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInTopic);
    }
    Ok(())
}

/// Validates a subscription *filter*, including `$share/GROUP/FILTER` shared
/// subscriptions (whose inner filter is validated with the normal rules).
///
/// The length limit applies to the whole string as sent to the broker, i.e.
/// including any `$share/GROUP/` prefix.
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    validate_common(filter)?;
    let inner = match split_shared(filter) {
        Shared::No(f) => f,
        Shared::Yes(f) => f,
        Shared::Malformed => return Err(TopicError::BadSharedSubscription),
    };
    validate_filter_levels(inner)
}

/// Level-by-level wildcard rules for a (non-shared) filter.
fn validate_filter_levels(filter: &str) -> Result<(), TopicError> {
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(TopicError::MisplacedMultiLevelWildcard);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::MisplacedSingleLevelWildcard);
        }
    }
    Ok(())
}

/// Result of looking for a `$share/GROUP/` prefix.
enum Shared<'a> {
    /// Not a shared subscription; the whole string is the filter.
    No(&'a str),
    /// A well-formed shared subscription; this is the inner filter.
    Yes(&'a str),
    /// Starts like a shared subscription but the group or filter is bad.
    Malformed,
}

/// Splits off a `$share/GROUP/` prefix, checking the group.
///
/// `$share` on its own (no slash) is treated as an ordinary filter: it is a
/// legal, if odd, topic level and is not a shared subscription.
fn split_shared(filter: &str) -> Shared<'_> {
    let Some(rest) = filter.strip_prefix(SHARE_PREFIX) else {
        return Shared::No(filter);
    };
    let Some((group, inner)) = rest.split_once('/') else {
        return Shared::Malformed;
    };
    if group.is_empty() || group.contains(['+', '#']) || inner.is_empty() {
        return Shared::Malformed;
    }
    Shared::Yes(inner)
}

/// Does the subscription `filter` match the topic name `topic`?
///
/// Full MQTT semantics:
///
/// * `+` matches exactly one level, including an empty one (`a/+` matches
///   `a/`, but not `a` or `a/b/c`);
/// * `#` matches its parent level and any number of further levels (`a/#`
///   matches `a`, `a/` and `a/b/c`; `#` alone matches every topic);
/// * topics starting with `$` are not matched by a filter whose first level
///   is `+` or `#` (so `#` does not pick up `$SYS/...`);
/// * a `$share/GROUP/` prefix is stripped before matching.
///
/// Returns `false` rather than guessing when the filter or topic is invalid
/// (see [`validate_filter`] and [`validate_topic`]): routing a message by a
/// malformed filter would be wrong whichever way it went.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if validate_filter(filter).is_err() || validate_topic(topic).is_err() {
        return false;
    }
    let filter = match split_shared(filter) {
        Shared::No(f) | Shared::Yes(f) => f,
        Shared::Malformed => return false,
    };

    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }

    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            // '#' matches whatever remains, including nothing at all.
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- validate_topic -------------------------------------------------

    #[test]
    fn topic_accepts_ordinary_names() {
        for t in [
            "a",
            "plant/line1/temperature",
            "/leading/slash",
            "trailing/slash/",
            "a//b",
            "/",
            "//",
            "$SYS/broker/uptime",
            "caf\u{e9}/\u{1F600}",
            " space in level ",
            "$share/group/x",
        ] {
            assert_eq!(validate_topic(t), Ok(()), "{t:?}");
        }
    }

    #[test]
    fn topic_rejects_empty() {
        assert_eq!(validate_topic(""), Err(TopicError::Empty));
    }

    #[test]
    fn topic_rejects_nul() {
        assert_eq!(validate_topic("a\0b"), Err(TopicError::ContainsNul));
        assert_eq!(validate_topic("\0"), Err(TopicError::ContainsNul));
    }

    #[test]
    fn topic_rejects_wildcards() {
        for t in ["a/+", "+", "#", "a/#", "a+b", "a#b", "sport/tennis/#/x"] {
            assert_eq!(validate_topic(t), Err(TopicError::WildcardInTopic), "{t:?}");
        }
    }

    #[test]
    fn topic_length_limit_is_in_bytes() {
        let ok = "a".repeat(MAX_TOPIC_LEN);
        assert_eq!(validate_topic(&ok), Ok(()));

        let too_long = "a".repeat(MAX_TOPIC_LEN + 1);
        assert_eq!(
            validate_topic(&too_long),
            Err(TopicError::TooLong {
                len: MAX_TOPIC_LEN + 1
            })
        );

        // 'é' is two bytes: 32,768 chars = 65,536 bytes, over the limit even
        // though the char count is well under it.
        let multibyte = "\u{e9}".repeat(32_768);
        assert_eq!(multibyte.chars().count(), 32_768);
        assert_eq!(
            validate_topic(&multibyte),
            Err(TopicError::TooLong { len: 65_536 })
        );
    }

    #[test]
    fn length_checked_before_content() {
        // A huge string full of wildcards reports the length problem first,
        // which is the more fundamental one.
        let s = "#".repeat(MAX_TOPIC_LEN + 10);
        assert_eq!(
            validate_topic(&s),
            Err(TopicError::TooLong {
                len: MAX_TOPIC_LEN + 10
            })
        );
        assert_eq!(
            validate_filter(&s),
            Err(TopicError::TooLong {
                len: MAX_TOPIC_LEN + 10
            })
        );
    }

    // ---- validate_filter ------------------------------------------------

    #[test]
    fn filter_accepts_valid_filters() {
        for f in [
            "a",
            "#",
            "+",
            "+/+",
            "/+",
            "+/",
            "a/#",
            "a/+/b",
            "a/+/#",
            "+/#",
            "/#",
            "a//#",
            "$SYS/#",
            "sport/tennis/player1/#",
            "$share",
            "$share/g/a/b",
            "$share/g/#",
            "$share/g/+",
            "$share/g/+/x/#",
            "$share/g//",
            "$sharex/y",
        ] {
            assert_eq!(validate_filter(f), Ok(()), "{f:?}");
        }
    }

    #[test]
    fn filter_rejects_misplaced_hash() {
        for f in [
            "a#",
            "#a",
            "a/#/b",
            "#/",
            "#/a",
            "a/b#",
            "##",
            "a/##",
            "$share/g/a/#/b",
        ] {
            assert_eq!(
                validate_filter(f),
                Err(TopicError::MisplacedMultiLevelWildcard),
                "{f:?}"
            );
        }
    }

    #[test]
    fn filter_rejects_misplaced_plus() {
        for f in ["a+", "+a", "a/b+/c", "++", "a/++/b", "$share/g/x+"] {
            assert_eq!(
                validate_filter(f),
                Err(TopicError::MisplacedSingleLevelWildcard),
                "{f:?}"
            );
        }
    }

    #[test]
    fn filter_rejects_empty_nul_and_long() {
        assert_eq!(validate_filter(""), Err(TopicError::Empty));
        assert_eq!(validate_filter("a/\0/#"), Err(TopicError::ContainsNul));
        let long = format!("a/{}", "b".repeat(MAX_TOPIC_LEN));
        assert_eq!(
            validate_filter(&long),
            Err(TopicError::TooLong { len: long.len() })
        );
    }

    #[test]
    fn shared_subscription_length_counts_prefix() {
        let inner = "a".repeat(MAX_TOPIC_LEN - "$share/g/".len());
        let ok = format!("$share/g/{inner}");
        assert_eq!(ok.len(), MAX_TOPIC_LEN);
        assert_eq!(validate_filter(&ok), Ok(()));
        let bad = format!("$share/g/{inner}a");
        assert_eq!(
            validate_filter(&bad),
            Err(TopicError::TooLong {
                len: MAX_TOPIC_LEN + 1
            })
        );
    }

    #[test]
    fn filter_rejects_bad_shared_subscriptions() {
        for f in [
            "$share/",
            "$share//a",
            "$share/g",
            "$share/g/",
            "$share/+/a",
            "$share/#/a",
            "$share/g+/a",
            "$share/g#/a",
            "$share/#",
            "$share/+",
        ] {
            assert_eq!(
                validate_filter(f),
                Err(TopicError::BadSharedSubscription),
                "{f:?}"
            );
        }
    }

    #[test]
    fn nul_reported_before_shared_subscription_problems() {
        assert_eq!(validate_filter("$share/\0"), Err(TopicError::ContainsNul));
    }

    // ---- filter_matches -------------------------------------------------

    #[test]
    fn exact_match() {
        assert!(filter_matches("a/b/c", "a/b/c"));
        assert!(!filter_matches("a/b/c", "a/b"));
        assert!(!filter_matches("a/b", "a/b/c"));
        assert!(!filter_matches("a/b/c", "a/b/d"));
        // Case sensitive, as MQTT requires.
        assert!(!filter_matches("A/b", "a/b"));
        // Empty levels are significant.
        assert!(filter_matches("/a", "/a"));
        assert!(!filter_matches("/a", "a"));
        assert!(!filter_matches("a/", "a"));
        assert!(filter_matches("a//b", "a//b"));
        assert!(!filter_matches("a//b", "a/b"));
    }

    #[test]
    fn single_level_wildcard() {
        assert!(filter_matches("a/+", "a/b"));
        assert!(filter_matches("a/+/c", "a/b/c"));
        assert!(!filter_matches("a/+", "a/b/c"));
        assert!(!filter_matches("a/+", "a"));
        // '+' matches an empty level.
        assert!(filter_matches("a/+", "a/"));
        assert!(filter_matches("a/+/c", "a//c"));
        assert!(filter_matches("+", "a"));
        assert!(!filter_matches("+", "a/b"));
        // Examples from MQTT 3.1.1 section 4.7.1.3.
        assert!(filter_matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(!filter_matches(
            "sport/tennis/+",
            "sport/tennis/player1/ranking"
        ));
        assert!(!filter_matches("sport/+", "sport"));
        assert!(filter_matches("sport/+", "sport/"));
        assert!(filter_matches("+/+", "/finance"));
        assert!(filter_matches("/+", "/finance"));
        assert!(!filter_matches("+", "/finance"));
    }

    #[test]
    fn multi_level_wildcard() {
        assert!(filter_matches("#", "a"));
        assert!(filter_matches("#", "a/b/c"));
        assert!(filter_matches("#", "/"));
        assert!(filter_matches("#", "/a"));
        assert!(filter_matches("a/#", "a"));
        assert!(filter_matches("a/#", "a/"));
        assert!(filter_matches("a/#", "a/b"));
        assert!(filter_matches("a/#", "a/b/c"));
        assert!(!filter_matches("a/#", "b"));
        assert!(!filter_matches("a/#", "ab"));
        assert!(!filter_matches("a/b/#", "a"));
        assert!(filter_matches("a/+/#", "a/b"));
        assert!(filter_matches("a/+/#", "a/b/c/d"));
        assert!(!filter_matches("a/+/#", "a"));
        assert!(filter_matches("+/#", "a"));
        // Examples from MQTT 3.1.1 section 4.7.1.2.
        for t in [
            "sport/tennis/player1",
            "sport/tennis/player1/ranking",
            "sport/tennis/player1/score/wimbledon",
        ] {
            assert!(filter_matches("sport/tennis/player1/#", t), "{t}");
        }
        assert!(filter_matches("sport/#", "sport"));
    }

    #[test]
    fn dollar_topics_not_matched_by_leading_wildcards() {
        assert!(!filter_matches("#", "$SYS"));
        assert!(!filter_matches("#", "$SYS/broker/uptime"));
        assert!(!filter_matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(!filter_matches("+", "$SYS"));
        assert!(!filter_matches("+/#", "$SYS/x"));
        assert!(filter_matches("$SYS/#", "$SYS/broker/uptime"));
        assert!(filter_matches("$SYS/#", "$SYS"));
        assert!(filter_matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(filter_matches("$SYS/broker/uptime", "$SYS/broker/uptime"));
        // '$' later in the topic is an ordinary character.
        assert!(filter_matches("#", "a/$b"));
        assert!(filter_matches("+/+", "a/$b"));
        // The rule is about the topic's first character, not its level.
        assert!(!filter_matches("#", "$"));
    }

    #[test]
    fn shared_prefix_is_stripped() {
        assert!(filter_matches("$share/g/a/+", "a/b"));
        assert!(filter_matches("$share/g/#", "a/b/c"));
        assert!(filter_matches("$share/g/a", "a"));
        assert!(!filter_matches("$share/g/a", "$share/g/a"));
        assert!(!filter_matches("$share/g/a/+", "a/b/c"));
        // The $-rule applies to the inner filter.
        assert!(!filter_matches("$share/g/#", "$SYS/x"));
        assert!(filter_matches("$share/g/$SYS/#", "$SYS/x"));
        // A plain "$share" level is not a shared subscription.
        assert!(filter_matches("$share", "$share"));
        assert!(filter_matches("$sharex/#", "$sharex/g/a"));
        // ...but "$share/#" is: one whose group is '#' and filter missing.
        assert!(!filter_matches("$share/#", "$share/g/a"));
    }

    #[test]
    fn invalid_inputs_never_match() {
        assert!(!filter_matches("", ""));
        assert!(!filter_matches("a", ""));
        assert!(!filter_matches("", "a"));
        assert!(!filter_matches("a#", "a#"));
        assert!(!filter_matches("a/#/b", "a/x/b"));
        assert!(!filter_matches("a+", "a+"));
        assert!(!filter_matches("$share/g", "g"));
        assert!(!filter_matches("$share//a", "a"));
        // Topic names with wildcards are not valid topics.
        assert!(!filter_matches("#", "a/+"));
        assert!(!filter_matches("a/+", "a/+"));
        assert!(!filter_matches("a\0", "a\0"));
    }

    #[test]
    fn every_valid_topic_matches_itself_and_hash() {
        for t in ["a", "a/b", "/", "a//b", "/x/", "caf\u{e9}"] {
            assert!(filter_matches(t, t), "{t}");
            assert!(filter_matches("#", t), "{t}");
        }
    }

    // ---- error presentation ----------------------------------------------

    fn all_errors() -> Vec<TopicError> {
        vec![
            TopicError::Empty,
            TopicError::ContainsNul,
            TopicError::TooLong { len: 70_000 },
            TopicError::WildcardInTopic,
            TopicError::MisplacedMultiLevelWildcard,
            TopicError::MisplacedSingleLevelWildcard,
            TopicError::BadSharedSubscription,
        ]
    }

    #[test]
    fn display_is_one_line_and_hint_is_present() {
        for e in all_errors() {
            let msg = e.to_string();
            assert!(!msg.is_empty(), "{e:?}");
            assert!(!msg.contains('\n'), "{e:?}");
            let hint = e.hint();
            assert!(!hint.is_empty(), "{e:?}");
            assert!(!hint.contains('\n'), "{e:?}");
            assert_ne!(msg, hint, "{e:?}");
        }
    }

    #[test]
    fn display_texts() {
        assert_eq!(
            TopicError::WildcardInTopic.to_string(),
            "topic must not contain the wildcard characters '+' or '#'"
        );
        assert_eq!(
            TopicError::TooLong { len: 70_000 }.to_string(),
            "topic is 70000 bytes long, more than the MQTT maximum of 65535 bytes"
        );
        assert_eq!(
            TopicError::WildcardInTopic.hint(),
            "Publish to a concrete topic such as 'plant/line1/temperature'; wildcards are only for subscriptions."
        );
    }

    #[test]
    fn is_std_error() {
        let e: Box<dyn std::error::Error + Send + Sync> = Box::new(TopicError::Empty);
        assert_eq!(e.to_string(), "topic must not be empty");
        assert!(e.source().is_none());
    }
}
