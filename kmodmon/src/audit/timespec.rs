//! Times given on the command line (`--since`, `--until`) and times in records.
use std::time::SystemTime;

/// A time the user gave that means nothing to us.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "time {0:?} not understood: give RFC 3339 (2026-11-22T13:00:00Z, 2026-11-22T14:00:00+01:00), a date (2026-11-22, UTC), \"now\", or a time ago (2h, 30min, 1day 6h)"
)]
pub struct TimeError(pub String);

/// Parses a time bound relative to `now`: RFC 3339 with `Z` or an offset, a date or date-time
/// without offset (taken as UTC), `now`, or a duration meaning that long ago (`2h`, `90s`,
/// `1day 2h`, optionally followed by `ago`).
pub fn parse_bound(text: &str, now: SystemTime) -> Result<SystemTime, TimeError> {
    let s = text.trim();
    let err = || TimeError(text.to_string());
    if s.is_empty() {
        return Err(err());
    }
    if s.eq_ignore_ascii_case("now") {
        return Ok(now);
    }
    let ago = s.strip_suffix("ago").map(str::trim_end).unwrap_or(s);
    if let Ok(d) = humantime::parse_duration(ago) {
        return now.checked_sub(d).ok_or_else(err);
    }
    if let Ok(ts) = s.parse::<jiff::Timestamp>() {
        return Ok(SystemTime::from(ts));
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    if let Ok(date) = s.parse::<jiff::civil::Date>() {
        let ts = date
            .to_zoned(jiff::tz::TimeZone::UTC)
            .map_err(|_| err())?
            .timestamp();
        return Ok(SystemTime::from(ts));
    }
    Err(err())
}

/// The time of a record (`"time"`, RFC 3339 as kmodmon writes it).
pub fn parse_record_time(s: &str) -> Option<SystemTime> {
    crate::event::parse_event_time(s)
}

/// `SystemTime` as RFC 3339 UTC with seconds (for messages).
pub fn display(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(s: &str) -> SystemTime {
        humantime::parse_rfc3339(s).unwrap()
    }

    #[test]
    fn relative_times_count_back_from_now() {
        let now = at("2026-11-22T13:00:00Z");
        assert_eq!(parse_bound("2h", now), Ok(at("2026-11-22T11:00:00Z")));
        assert_eq!(parse_bound("90s ago", now), Ok(at("2026-11-22T12:58:30Z")));
        assert_eq!(parse_bound("1day 6h", now), Ok(at("2026-11-21T07:00:00Z")));
        assert_eq!(parse_bound(" now ", now), Ok(now));
    }

    #[test]
    fn absolute_times_with_and_without_offsets() {
        let now = SystemTime::now();
        let utc = at("2026-11-22T13:00:00Z");
        assert_eq!(parse_bound("2026-11-22T13:00:00Z", now), Ok(utc));
        assert_eq!(parse_bound("2026-11-22T14:00:00+01:00", now), Ok(utc));
        assert_eq!(parse_bound("2026-11-22T08:00:00-05:00", now), Ok(utc));
        assert_eq!(parse_bound("2026-11-22 13:00:00", now), Ok(utc));
        assert_eq!(
            parse_bound("2026-11-22", now),
            Ok(at("2026-11-22T00:00:00Z"))
        );
        assert_eq!(
            parse_bound("2026-11-22T13:00:00.5Z", now),
            Ok(utc + Duration::from_millis(500))
        );
    }

    #[test]
    fn nonsense_is_an_error_that_says_what_works() {
        let now = SystemTime::now();
        for bad in ["", "yesterday-ish", "2026-13-40", "5 parsecs"] {
            let e = parse_bound(bad, now).unwrap_err();
            assert!(e.to_string().contains("RFC 3339"), "{e}");
        }
        assert!(parse_bound("18446744073709551615s", now).is_err());
    }

    #[test]
    fn record_times_parse_with_nanoseconds() {
        let t = parse_record_time("2026-11-22T13:00:00.123456789Z").unwrap();
        assert_eq!(
            t.duration_since(at("2026-11-22T13:00:00Z")).unwrap(),
            Duration::from_nanos(123_456_789)
        );
        assert_eq!(parse_record_time("garbage"), None);
    }
}
