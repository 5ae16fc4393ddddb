//! Retention settings (`mqtt_pg.history_retention`, `mqtt_pg.dead_letter_retention`): an
//! interval written as PostgreSQL writes one (`30 days`, `12 hours`, `1 mon`, `2 weeks 3 days`),
//! or empty for "keep everything".
//!
//! Parsed here rather than by PostgreSQL's `interval_in` because the value is checked in a GUC
//! check hook, which may run in the postmaster while it reads postgresql.conf: an ERROR there
//! would be fatal, so the check must be a plain function that answers yes or no. Units convert
//! to seconds as PostgreSQL's `extract(epoch from ...)` does: a month is 30 days, a year 365.25.

use std::time::Duration;

/// A parsed retention: `None` keeps everything.
pub type Retention = Option<Duration>;

/// Parse a retention setting. Empty (or only spaces) keeps everything; anything else must be
/// one or more `<number> <unit>` pairs adding up to more than zero.
pub fn parse_retention(text: &str) -> Result<Retention, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let mut total = 0f64;
    let mut tokens = Tokens::new(text);
    let mut pairs = 0;
    while let Some(number) = tokens.next_number()? {
        let unit = tokens.next_unit().ok_or_else(|| {
            format!("\"{text}\": a number needs a unit (for example \"30 days\" or \"12 hours\")")
        })?;
        let seconds = unit_seconds(&unit).ok_or_else(|| {
            format!(
                "\"{text}\": unknown unit \"{unit}\" (use seconds, minutes, hours, days, weeks, months or years)"
            )
        })?;
        total += number * seconds;
        pairs += 1;
    }
    if !tokens.rest().is_empty() {
        return Err(format!("\"{text}\": cannot read \"{}\"", tokens.rest()));
    }
    if pairs == 0 {
        return Err(format!("\"{text}\" is not an interval such as \"30 days\""));
    }
    if !total.is_finite() || total <= 0.0 {
        return Err(format!(
            "\"{text}\" must be longer than zero (leave the setting empty to keep everything)"
        ));
    }
    // Beyond a thousand years, "now() - retention" leaves timestamptz's range (4713 BC) in a
    // few thousand years' time; nobody means more: leave the setting empty to keep everything.
    const MAX_SECONDS: f64 = 1_000.0 * 365.25 * 86_400.0;
    if total > MAX_SECONDS {
        return Err(format!(
            "\"{text}\" is longer than 1000 years (leave the setting empty to keep everything)"
        ));
    }
    Ok(Some(Duration::from_secs_f64(total)))
}

/// Seconds in one `unit`, spelled as PostgreSQL accepts it (singular, plural or abbreviated).
fn unit_seconds(unit: &str) -> Option<f64> {
    const MINUTE: f64 = 60.0;
    const HOUR: f64 = 3_600.0;
    const DAY: f64 = 86_400.0;
    Some(match unit.to_ascii_lowercase().as_str() {
        "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
        "m" | "min" | "mins" | "minute" | "minutes" => MINUTE,
        "h" | "hr" | "hrs" | "hour" | "hours" => HOUR,
        "d" | "day" | "days" => DAY,
        "w" | "week" | "weeks" => 7.0 * DAY,
        "mon" | "mons" | "month" | "months" => 30.0 * DAY,
        "y" | "yr" | "yrs" | "year" | "years" => 365.25 * DAY,
        _ => return None,
    })
}

struct Tokens<'a> {
    rest: &'a str,
}

impl<'a> Tokens<'a> {
    fn new(text: &'a str) -> Self {
        Tokens { rest: text }
    }

    fn rest(&self) -> &'a str {
        self.rest.trim_start()
    }

    /// A non-negative decimal number, or None at the end of the text.
    fn next_number(&mut self) -> Result<Option<f64>, String> {
        let s = self.rest();
        if s.is_empty() {
            return Ok(None);
        }
        let end = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        if end == 0 {
            return Err(format!("expected a number at \"{s}\""));
        }
        let number: f64 = s[..end]
            .parse()
            .map_err(|_| format!("\"{}\" is not a number", &s[..end]))?;
        self.rest = &s[end..];
        Ok(Some(number))
    }

    /// A run of letters (the unit), possibly right after the number ("30d").
    fn next_unit(&mut self) -> Option<String> {
        let s = self.rest();
        let end = s
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(s.len());
        if end == 0 {
            return None;
        }
        self.rest = &s[end..];
        Some(s[..end].to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DAY: u64 = 86_400;

    fn secs(text: &str) -> u64 {
        parse_retention(text).unwrap().unwrap().as_secs()
    }

    #[test]
    fn empty_keeps_everything() {
        assert_eq!(parse_retention(""), Ok(None));
        assert_eq!(parse_retention("   "), Ok(None));
    }

    #[test]
    fn postgres_spellings() {
        assert_eq!(secs("30 days"), 30 * DAY);
        assert_eq!(secs("1 day"), DAY);
        assert_eq!(secs("30d"), 30 * DAY);
        assert_eq!(secs("12 hours"), 12 * 3600);
        assert_eq!(secs("90 min"), 90 * 60);
        assert_eq!(secs("2 weeks 3 days"), 17 * DAY);
        assert_eq!(secs("1 mon"), 30 * DAY);
        assert_eq!(secs("6 months"), 180 * DAY);
        assert_eq!(secs("1 year"), 365 * DAY + 6 * 3600);
        assert_eq!(secs("1.5 days"), DAY + DAY / 2);
        assert_eq!(secs("1000 years"), 365_250 * DAY);
        assert_eq!(secs("  7 DAYS "), 7 * DAY);
    }

    #[test]
    fn refused() {
        for bad in [
            "30",
            "days",
            "0 days",
            "-1 day",
            "1 fortnight",
            "1 day and more",
            "1..2 days",
            "20000 years",
            "1001 years",
            "1 day,",
        ] {
            assert!(parse_retention(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn errors_say_what_to_write() {
        let e = parse_retention("30").unwrap_err();
        assert!(e.contains("30 days"), "{e}");
        let e = parse_retention("3 fortnights").unwrap_err();
        assert!(e.contains("fortnights") && e.contains("days"), "{e}");
    }

    proptest! {
        #[test]
        fn any_count_of_days_round_trips(n in 1u64..100_000) {
            prop_assert_eq!(secs(&format!("{n} days")), n * DAY);
            prop_assert_eq!(secs(&format!("{n}d")), n * DAY);
        }

        #[test]
        fn never_panics(s in "\\PC{0,40}") {
            let _ = parse_retention(&s);
        }

        #[test]
        fn sums_are_additive(d in 1u64..1000, h in 0u64..24) {
            prop_assert_eq!(secs(&format!("{d} days {h} hours")), d * DAY + h * 3600);
        }
    }
}
