//! UTC timestamps as people and log tools read them: RFC 3339 with milliseconds,
//! `2026-11-29T20:03:54.123Z` (audit lines, the CLI's dead-letter listings).

use time::macros::format_description;
use time::OffsetDateTime;

/// `ms` milliseconds since the Unix epoch, as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_millis(ms: u64) -> String {
    let format =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&format).ok())
        // Past year 9999: not a time this broker will see; say so rather than panic.
        .unwrap_or_else(|| format!("{ms} ms after the Unix epoch"))
}

/// Now, as [`rfc3339_millis`].
pub fn now() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    rfc3339_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_instants() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_millis(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(1_795_982_634_123),
            "2026-11-29T20:03:54.123Z"
        );
        assert_eq!(
            rfc3339_millis(1_796_000_523_456),
            "2026-11-30T01:02:03.456Z"
        );
    }
}
