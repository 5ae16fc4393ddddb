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
pub fn validate_common(s: &str) -> Result<(), TopicError> {
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

/// Does every topic that `specific` matches also match `general`? Both must be valid filters;
/// a shared subscription covers another only within the same group (`$share/G/a/#` covers
/// `$share/G/a/b`), never a plain one or one of another group.
///
/// The engine subscribes only the filters no other wanted filter covers on an MQTT 5
/// connection: an MQTT 5 broker may send a client one copy of a message per matching
/// subscription (mosquitto does), where MQTT 3.1.1 asks for one copy in all.
pub fn filter_covers(general: &str, specific: &str) -> bool {
    if validate_filter(general).is_err() || validate_filter(specific).is_err() {
        return false;
    }
    let (g, s) = match (split_shared(general), split_shared(specific)) {
        (Shared::No(g), Shared::No(s)) => (g, s),
        (Shared::Yes(g), Shared::Yes(s)) => {
            let group = |f: &str| f.split('/').nth(1).map(str::to_string);
            if group(general) != group(specific) {
                return false;
            }
            (g, s)
        }
        _ => return false,
    };
    // Topics that start with '$' (all of them, if the specific filter's first level is such a
    // literal) are not matched by a first-level wildcard.
    if s.starts_with('$') && (g.starts_with('+') || g.starts_with('#')) {
        return false;
    }
    let mut gl = g.split('/');
    let mut sl = s.split('/');
    loop {
        match (gl.next(), sl.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(l)) if l != "#" => {}
            (Some(a), Some(b)) if a == b && a != "+" && a != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_examples() {
        for (g, s) in [
            ("#", "a/b"),
            ("#", "#"),
            ("a/#", "a"),
            ("a/#", "a/b/#"),
            ("a/+/c", "a/b/c"),
            ("a/+/#", "a/+/c/d"),
            ("+/+", "a/+"),
            ("$SYS/#", "$SYS/broker/load"),
            ("$share/g/a/#", "$share/g/a/b"),
            ("a/b", "a/b"),
        ] {
            assert!(filter_covers(g, s), "{g} covers {s}");
        }
        for (g, s) in [
            ("a/b", "a/#"),
            ("a/+", "a/#"),
            ("a", "a/#"),
            ("#", "$SYS/x"),
            ("+/x", "$SYS/x"),
            ("a/+/c", "a/b/d"),
            ("$share/g/#", "a/b"),
            ("#", "$share/g/a"),
            ("$share/g/#", "$share/h/a"),
            ("a/b/c", "a/b"),
        ] {
            assert!(!filter_covers(g, s), "{g} does not cover {s}");
        }
    }

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

    // ---- properties against a reference implementation --------------------
    //
    // The reference below is written from MQTT 3.1.1 section 4.7 (and MQTT 5.0 4.8.2 for
    // `$share`) as plainly as possible, and deliberately not in the style of the code above:
    // validity is a predicate per level, and matching compares whole level lists instead of
    // walking two iterators. The generators draw from a small alphabet ('/', '+', '#', '$',
    // empty levels, NUL, multi-byte UTF-8), so that equal levels, wildcards in odd places and
    // `$` topics turn up in most cases.

    use proptest::prelude::*;
    use proptest::test_runner::RngSeed;

    /// Runs are reproducible: the same cases every time, unless PROPTEST_RNG_SEED picks others.
    fn config(cases: u32) -> ProptestConfig {
        let seed = std::env::var("PROPTEST_RNG_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x6d71_7474_5f70_6721);
        ProptestConfig {
            cases,
            rng_seed: RngSeed::Fixed(seed),
            // A failure prints its shrunk input; no regression file next to the sources.
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    fn ref_common_ok(s: &str) -> bool {
        !s.is_empty() && s.len() <= 65_535 && !s.chars().any(|c| c == '\u{0}')
    }

    /// MQTT 3.1.1 4.7.3 and 3.3.2-2: non-empty, at most 65,535 bytes, no NUL, no wildcard.
    fn ref_topic_ok(t: &str) -> bool {
        ref_common_ok(t) && !t.chars().any(|c| c == '+' || c == '#')
    }

    /// The filter inside a `$share/GROUP/FILTER`, the whole string otherwise; `None` for a
    /// malformed shared subscription (MQTT 5.0 4.8.2: GROUP non-empty and free of '/', '+',
    /// '#', followed by '/' and a filter).
    fn ref_inner(f: &str) -> Option<&str> {
        if !f.starts_with("$share/") {
            return Some(f);
        }
        let parts: Vec<&str> = f.splitn(3, '/').collect();
        if parts.len() != 3 {
            return None;
        }
        let (group, inner) = (parts[1], parts[2]);
        let group_ok = !group.is_empty() && !group.contains('+') && !group.contains('#');
        (group_ok && !inner.is_empty()).then_some(inner)
    }

    /// MQTT 3.1.1 4.7.1: every level is "#" (and then the last one), "+", or free of both.
    fn ref_levels_ok(inner: &str) -> bool {
        let levels: Vec<&str> = inner.split('/').collect();
        let last = levels.len() - 1;
        levels.iter().enumerate().all(|(i, level)| {
            (*level == "#" && i == last)
                || *level == "+"
                || (!level.contains('#') && !level.contains('+'))
        })
    }

    fn ref_filter_ok(f: &str) -> bool {
        ref_common_ok(f) && ref_inner(f).is_some_and(ref_levels_ok)
    }

    fn ref_misplaced_hash(inner: &str) -> bool {
        let levels: Vec<&str> = inner.split('/').collect();
        let last = levels.len() - 1;
        levels
            .iter()
            .enumerate()
            .any(|(i, level)| level.contains('#') && (*level != "#" || i != last))
    }

    fn ref_misplaced_plus(inner: &str) -> bool {
        inner
            .split('/')
            .any(|level| level.contains('+') && level != "+")
    }

    /// MQTT 3.1.1 4.7: '+' stands for exactly one level, a final '#' for its parent level and
    /// any number of levels below it; a topic starting with '$' is not matched by a filter
    /// whose first level is a wildcard (4.7.2). Invalid input matches nothing.
    fn ref_matches(filter: &str, topic: &str) -> bool {
        if !ref_filter_ok(filter) || !ref_topic_ok(topic) {
            return false;
        }
        let inner = ref_inner(filter).expect("checked above");
        let f: Vec<&str> = inner.split('/').collect();
        let t: Vec<&str> = topic.split('/').collect();
        if topic.starts_with('$') && (f[0] == "+" || f[0] == "#") {
            return false;
        }
        let level_matches = |(fl, tl): (&&str, &&str)| *fl == "+" || fl == tl;
        match f.split_last() {
            Some((&"#", parent)) => {
                t.len() >= parent.len() && parent.iter().zip(&t).all(level_matches)
            }
            _ => f.len() == t.len() && f.iter().zip(&t).all(level_matches),
        }
    }

    /// Levels of topic names, chosen to collide: empty, '$', multi-byte, a BOM (which MQTT
    /// says must not be stripped), control characters.
    const TOPIC_LEVELS: &[&str] = &[
        "",
        "a",
        "b",
        "ab",
        "$",
        "$SYS",
        "$share",
        "g",
        "\u{e9}",
        "\u{1F600}",
        "\u{FEFF}",
        "\u{1}",
    ];

    /// Levels of filters: the topic levels plus wildcards, correct and misplaced, and NUL.
    const FILTER_LEVELS: &[&str] = &[
        "",
        "a",
        "b",
        "ab",
        "$",
        "$SYS",
        "$share",
        "g",
        "\u{e9}",
        "\u{1F600}",
        "+",
        "+",
        "#",
        "#",
        "a+",
        "+a",
        "a#",
        "#a",
        "++",
        "+#",
        "\u{0}",
    ];

    fn joined(levels: &'static [&'static str], max: usize) -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(levels), 1..=max).prop_map(|v| v.join("/"))
    }

    /// Any string over the troublesome characters, levels and all.
    fn small_alphabet() -> impl Strategy<Value = String> {
        "[ab/+#$\u{0}\u{e9}\u{1F600}]{0,10}"
    }

    fn topic_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => joined(TOPIC_LEVELS, 5),
            2 => small_alphabet(),
            1 => any::<String>(),
        ]
    }

    fn filter_strategy() -> impl Strategy<Value = String> {
        let share = prop::sample::select(
            &[
                "$share/g/",
                "$share/\u{e9}/",
                "$share/",
                "$share//",
                "$share/g+/",
                "$share/#/",
                "$share/g",
            ][..],
        );
        prop_oneof![
            6 => joined(FILTER_LEVELS, 5),
            2 => (share, joined(FILTER_LEVELS, 3)).prop_map(|(p, f)| format!("{p}{f}")),
            2 => small_alphabet(),
            1 => any::<String>(),
        ]
    }

    /// A filter made from a topic, so that it matches (or nearly matches) it often: some
    /// levels replaced by '+' or by another level, possibly cut short and ended by '#',
    /// possibly wrapped in `$share/g/`.
    fn derived_pair() -> impl Strategy<Value = (String, String)> {
        (
            prop::collection::vec(prop::sample::select(TOPIC_LEVELS), 1..=5),
            prop::collection::vec((0u8..4, prop::sample::select(TOPIC_LEVELS)), 5),
            prop::option::of(0usize..6),
            any::<bool>(),
        )
            .prop_map(|(topic, edits, cut, shared)| {
                let mut filter: Vec<&str> = topic
                    .iter()
                    .zip(&edits)
                    .map(|(level, (op, other))| match op {
                        0 => "+",
                        1 => other,
                        _ => level,
                    })
                    .collect();
                if let Some(n) = cut {
                    filter.truncate(n);
                    filter.push("#");
                }
                let filter = filter.join("/");
                let filter = if shared {
                    format!("$share/g/{filter}")
                } else {
                    filter
                };
                (filter, topic.join("/"))
            })
    }

    fn pair_strategy() -> impl Strategy<Value = (String, String)> {
        prop_oneof![
            3 => derived_pair(),
            2 => (filter_strategy(), topic_strategy()),
        ]
    }

    /// Checks that an error presents itself properly: its text and hint are one non-empty
    /// line each (formatting never slices the input, so multi-byte input cannot upset it).
    fn presentable(e: &TopicError) -> Result<(), TestCaseError> {
        let (msg, hint) = (e.to_string(), e.hint());
        prop_assert!(!msg.is_empty() && !msg.contains('\n'), "{e:?}: {msg:?}");
        prop_assert!(!hint.is_empty() && !hint.contains('\n'), "{e:?}: {hint:?}");
        Ok(())
    }

    /// What `validate_topic` must answer, in its documented order of checks.
    fn expected_topic(t: &str) -> Result<(), TopicError> {
        if t.is_empty() {
            Err(TopicError::Empty)
        } else if t.len() > MAX_TOPIC_LEN {
            Err(TopicError::TooLong { len: t.len() })
        } else if t.contains('\u{0}') {
            Err(TopicError::ContainsNul)
        } else if t.contains('+') || t.contains('#') {
            Err(TopicError::WildcardInTopic)
        } else {
            Ok(())
        }
    }

    /// The filter error must be true of the filter, with emptiness, length and NUL first.
    fn check_filter_error(f: &str, e: &TopicError) -> Result<(), TestCaseError> {
        let inner = ref_inner(f);
        let holds = match e {
            TopicError::Empty => f.is_empty(),
            TopicError::TooLong { len } => *len == f.len() && f.len() > MAX_TOPIC_LEN,
            TopicError::ContainsNul => f.contains('\u{0}'),
            TopicError::BadSharedSubscription => inner.is_none(),
            TopicError::MisplacedMultiLevelWildcard => inner.is_some_and(ref_misplaced_hash),
            TopicError::MisplacedSingleLevelWildcard => inner.is_some_and(ref_misplaced_plus),
            TopicError::WildcardInTopic => false,
        };
        prop_assert!(holds, "{f:?} rejected for a reason it does not have: {e:?}");
        if !matches!(e, TopicError::Empty | TopicError::TooLong { .. }) {
            prop_assert!(!f.is_empty() && f.len() <= MAX_TOPIC_LEN, "{f:?}: {e:?}");
        }
        if !matches!(
            e,
            TopicError::Empty | TopicError::TooLong { .. } | TopicError::ContainsNul
        ) {
            prop_assert!(
                !f.contains('\u{0}'),
                "{f:?}: NUL must be reported first, not {e:?}"
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(config(4096))]

        #[test]
        fn prop_matcher_agrees_with_reference((filter, topic) in pair_strategy()) {
            prop_assert_eq!(
                filter_matches(&filter, &topic),
                ref_matches(&filter, &topic),
                "filter {:?}, topic {:?}", filter, topic
            );
        }

        #[test]
        fn prop_covers_is_sound(
            (g, t) in pair_strategy(),
            s in filter_strategy(),
        ) {
            // A filter that covers another matches every topic the other matches.
            if filter_covers(&g, &s) && filter_matches(&s, &t) {
                prop_assert!(filter_matches(&g, &t), "{:?} covers {:?} but not {:?}", g, s, t);
            }
            // A valid filter covers itself.
            if validate_filter(&s).is_ok() {
                prop_assert!(filter_covers(&s, &s), "{:?}", s);
            }
        }

        #[test]
        fn prop_matcher_agrees_on_any_strings(filter in any::<String>(), topic in any::<String>()) {
            prop_assert_eq!(filter_matches(&filter, &topic), ref_matches(&filter, &topic));
        }

        #[test]
        fn prop_validate_topic_rejects_exactly(t in prop_oneof![topic_strategy(), filter_strategy()]) {
            let got = validate_topic(&t);
            prop_assert_eq!(&got, &expected_topic(&t), "{:?}", t);
            prop_assert_eq!(got.is_ok(), ref_topic_ok(&t));
            if let Err(e) = &got {
                presentable(e)?;
            } else {
                // rumqttc refuses to publish what it considers invalid: it must never refuse
                // what we accept.
                prop_assert!(rumqttc::valid_topic(&t), "{:?}", t);
            }
        }

        #[test]
        fn prop_validate_filter_rejects_exactly(f in prop_oneof![filter_strategy(), topic_strategy()]) {
            let got = validate_filter(&f);
            prop_assert_eq!(got.is_ok(), ref_filter_ok(&f), "{:?}: {:?}", f, got);
            match &got {
                Err(e) => {
                    check_filter_error(&f, e)?;
                    presentable(e)?;
                }
                // The engine drops a filter rumqttc refuses (see `flush_subscriptions`), so
                // every filter we accept must pass rumqttc's check too.
                Ok(()) => prop_assert!(rumqttc::valid_filter(&f), "{:?}", f),
            }
        }
    }

    proptest! {
        #![proptest_config(config(256))]

        #[test]
        fn prop_validators_never_panic(s in any::<String>()) {
            for e in [validate_topic(&s).err(), validate_filter(&s).err()].into_iter().flatten() {
                presentable(&e)?;
            }
        }

        /// Two facts of 4.7 stated on their own: a valid topic matches itself as a filter
        /// (unless it reads as a shared subscription), and '#' matches every valid topic that
        /// does not start with '$'.
        #[test]
        fn prop_topic_matches_itself_and_hash(t in topic_strategy()) {
            if validate_topic(&t).is_ok() {
                prop_assert_eq!(filter_matches(&t, &t), !t.starts_with("$share/"), "{:?}", t);
                prop_assert_eq!(filter_matches("#", &t), !t.starts_with('$'), "{:?}", t);
                prop_assert!(!filter_matches("+/#", &t) || !t.starts_with('$'), "{:?}", t);
            } else {
                prop_assert!(!filter_matches("#", &t), "{:?}", t);
            }
        }
    }

    /// Every string a few bytes either side of the limit, ending in a character of one to
    /// four bytes (or a wildcard, or NUL) so that the limit also falls inside a character,
    /// with and without a filter-ish head: too long exactly when over 65,535 bytes.
    #[test]
    fn length_limit_around_multibyte_boundaries() {
        let tails = [
            "",
            "a",
            "\u{e9}",
            "\u{20AC}",
            "\u{1F600}",
            "+",
            "#",
            "\u{0}",
        ];
        for head in ["", "/", "$share/g/", "#/"] {
            for tail in tails {
                for n in MAX_TOPIC_LEN - 3..=MAX_TOPIC_LEN + 3 {
                    let body = n - head.len() - tail.len();
                    let s = format!("{head}{}{tail}", "a".repeat(body));
                    assert_eq!(s.len(), n);
                    let over = n > MAX_TOPIC_LEN;
                    let t = validate_topic(&s);
                    assert_eq!(t, expected_topic(&s), "{head:?} {tail:?} {n}");
                    let f = validate_filter(&s);
                    let too_long = matches!(f, Err(TopicError::TooLong { len }) if len == n);
                    assert_eq!(too_long, over, "{head:?} {tail:?} {n}: {f:?}");
                    assert_eq!(f.is_ok(), ref_filter_ok(&s), "{head:?} {tail:?} {n}: {f:?}");
                    assert_eq!(filter_matches(&s, &s), ref_matches(&s, &s), "{head:?} {n}");
                }
            }
        }
    }

    #[test]
    fn reference_agrees_with_the_spec_examples() {
        // A check of the checker, on the examples of MQTT 3.1.1 4.7.1 and 4.7.2.
        for (f, t, want) in [
            ("sport/tennis/player1/#", "sport/tennis/player1", true),
            (
                "sport/tennis/player1/#",
                "sport/tennis/player1/score/wimbledon",
                true,
            ),
            ("sport/#", "sport", true),
            ("sport/tennis/+", "sport/tennis/player1/ranking", false),
            ("sport/+", "sport", false),
            ("sport/+", "sport/", true),
            ("+/+", "/finance", true),
            ("/+", "/finance", true),
            ("+", "/finance", false),
            ("#", "$SYS/x", false),
            ("+/monitor/Clients", "$SYS/monitor/Clients", false),
            ("$SYS/#", "$SYS/x", true),
            ("$SYS/monitor/+", "$SYS/monitor/Clients", true),
            ("a/#/b", "a/x/b", false),
            ("$share/g/#", "a", true),
        ] {
            assert_eq!(ref_matches(f, t), want, "{f} {t}");
            assert_eq!(filter_matches(f, t), want, "{f} {t}");
        }
    }
}
