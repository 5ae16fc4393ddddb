//! Access-rule decisions (`mqtt_access_control`), without the database: which of a role's rules
//! let it publish to a topic or subscribe to a filter.
//!
//! Publishing is a match: some rule with `allow_publish` whose filter matches the topic.
//! Subscribing is containment: a subscription to `a/+` receives every `a/x`, so a rule must
//! cover all of them, not just one; `a/+` is allowed by `a/#` or `+/+` but not by `a/b`.
//! Topics starting with `$` stay out of a leading wildcard, exactly as in matching, so a rule
//! `#` never grants `$SYS/...`.

use crate::topic::{filter_matches, validate_filter};

/// One rule as it applies to a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub filter: String,
    pub publish: bool,
    pub subscribe: bool,
}

/// May a role with these rules publish to `topic`?
pub fn may_publish(rules: &[Rule], topic: &str) -> bool {
    rules
        .iter()
        .any(|r| r.publish && filter_matches(&r.filter, topic))
}

/// May a role with these rules subscribe to `filter`?
pub fn may_subscribe(rules: &[Rule], filter: &str) -> bool {
    rules
        .iter()
        .any(|r| r.subscribe && filter_covers(&r.filter, filter))
}

/// Does every topic that `filter` matches also match `rule`? Both are MQTT filters; a shared
/// subscription (`$share/GROUP/f`) is judged by `f`, the topics it receives. Invalid input is
/// never covered.
pub fn filter_covers(rule: &str, filter: &str) -> bool {
    if validate_filter(rule).is_err() || validate_filter(filter).is_err() {
        return false;
    }
    let filter = strip_share(filter);
    let rule = strip_share(rule);
    // A leading wildcard in the rule never reaches `$` topics; a filter that can match one
    // (a literal first level starting with `$`) is then out of its reach.
    if (rule.starts_with('+') || rule.starts_with('#')) && filter.starts_with('$') {
        return false;
    }
    let mut r = rule.split('/');
    let mut f = filter.split('/');
    loop {
        match (r.next(), f.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(level)) if level != "#" => {}
            (Some(a), Some(b)) if a == b && a != "+" && a != "#" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

fn strip_share(filter: &str) -> &str {
    match filter.strip_prefix("$share/") {
        Some(rest) => rest.split_once('/').map_or(rest, |(_, f)| f),
        None => filter,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rule(filter: &str, publish: bool, subscribe: bool) -> Rule {
        Rule {
            filter: filter.into(),
            publish,
            subscribe,
        }
    }

    #[test]
    fn publish_is_a_match() {
        let rules = [
            rule("devices/pump1/#", true, false),
            rule("status", false, true),
        ];
        assert!(may_publish(&rules, "devices/pump1/state"));
        assert!(may_publish(&rules, "devices/pump1"));
        assert!(!may_publish(&rules, "devices/pump2/state"));
        assert!(!may_publish(&rules, "status"), "subscribe-only rule");
        assert!(!may_publish(&[], "anything"), "no rule: denied");
        assert!(!may_publish(&[rule("#", true, true)], "$SYS/x"));
    }

    #[test]
    fn subscribe_is_containment() {
        for (r, f, want) in [
            ("#", "a/b", true),
            ("#", "#", true),
            ("a/#", "a", true),
            ("a/#", "a/+/c", true),
            ("a/#", "a/#", true),
            ("+/+", "a/+", true),
            ("a/+", "a/#", false),
            ("a/b", "a/+", false),
            ("a/+", "a/b/c", false),
            ("a/b", "a/b", true),
            ("#", "$SYS/#", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/broker/load", true),
            ("a/#", "$share/g/a/b", true),
            ("a/#", "$share/g/b", false),
            ("a/#", "a/#/b", false),
        ] {
            assert_eq!(filter_covers(r, f), want, "rule {r} covers {f}");
        }
        let rules = [rule("a/#", false, true), rule("b/#", true, false)];
        assert!(may_subscribe(&rules, "a/+/t"));
        assert!(!may_subscribe(&rules, "b/x"), "publish-only rule");
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("".to_string()),
            Just("$s".to_string()),
            Just("+".to_string()),
            Just("#".to_string()),
        ]
    }

    fn filter() -> impl Strategy<Value = String> {
        proptest::collection::vec(level(), 1..5).prop_map(|v| v.join("/"))
    }

    fn topic() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![Just("a"), Just("b"), Just(""), Just("$s"), Just("c")],
            1..6,
        )
        .prop_map(|v| v.join("/"))
    }

    proptest! {
        /// Soundness: when a rule covers a filter, every topic the filter matches, the rule
        /// matches too (a covered subscription never receives what the rule does not allow).
        #[test]
        fn covering_is_sound(r in filter(), f in filter(), topics in proptest::collection::vec(topic(), 1..40)) {
            if filter_covers(&r, &f) {
                for t in &topics {
                    if filter_matches(&f, t) {
                        prop_assert!(filter_matches(&r, t), "{r} covers {f} but not topic {t}");
                    }
                }
            }
        }

        /// A filter always covers itself, and `#` covers every filter without a leading `$`.
        #[test]
        fn reflexive_and_hash(f in filter()) {
            if validate_filter(&f).is_ok() {
                prop_assert!(filter_covers(&f, &f));
                prop_assert_eq!(filter_covers("#", &f), !f.starts_with('$'));
            }
        }
    }
}
