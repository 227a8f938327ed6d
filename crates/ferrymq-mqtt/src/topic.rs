//! Topic name and topic filter syntax (spec 4.7), and a reference matcher.

/// A topic name a PUBLISH may carry: non-empty, no `+` or `#` (MQTT-3.3.2-2, MQTT-4.7.3-1).
/// UTF-8 and U+0000 are checked by the string decoder.
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#'])
}

/// A topic filter: non-empty; `+` occupies a whole level; `#` occupies the last whole level
/// (MQTT-4.7.1-1, MQTT-4.7.1-2).
pub fn valid_topic_filter(filter: &str) -> bool {
    if filter.is_empty() {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return false;
        }
        if level.contains('+') && level != "+" {
            return false;
        }
    }
    true
}

/// Whether a filter has a wildcard.
pub fn has_wildcard(filter: &str) -> bool {
    filter.contains(['+', '#'])
}

/// A `$share/{group}/{filter}` subscription split into its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedFilter<'a> {
    pub group: &'a str,
    pub filter: &'a str,
}

/// Error in a `$share/` filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidShare;

/// Splits a shared subscription. `Ok(None)` for an ordinary filter. The group must be non-empty
/// and wildcard-free, and a filter must follow (MQTT-4.8.2-1, MQTT-4.8.2-2).
pub fn parse_shared(filter: &str) -> Result<Option<SharedFilter<'_>>, InvalidShare> {
    let Some(rest) = filter.strip_prefix("$share/") else {
        if filter == "$share" {
            return Err(InvalidShare);
        }
        return Ok(None);
    };
    let (group, inner) = rest.split_once('/').ok_or(InvalidShare)?;
    if group.is_empty() || group.contains(['+', '#']) || !valid_topic_filter(inner) {
        return Err(InvalidShare);
    }
    Ok(Some(SharedFilter {
        group,
        filter: inner,
    }))
}

/// Reference matcher: whether `topic` matches `filter`. The broker uses a trie; this is the
/// plain definition it is tested against. Topics starting with `$` are not matched by a filter
/// starting with a wildcard (MQTT-4.7.2-1).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn filter_syntax_4_7_1() {
        for ok in [
            "a", "#", "+", "a/#", "a/+/b", "/", "+/+", "a//b", "$SYS/#", "😀/+",
        ] {
            assert!(valid_topic_filter(ok), "{ok}");
        }
        for bad in ["", "a#", "a/#/b", "a+", "a/b+/c", "#/a", "++"] {
            assert!(!valid_topic_filter(bad), "{bad}");
        }
    }

    #[test]
    fn topic_name_has_no_wildcards() {
        assert!(valid_topic_name("a/b"));
        assert!(!valid_topic_name("a/+"));
        assert!(!valid_topic_name("#"));
        assert!(!valid_topic_name(""));
    }

    #[test]
    fn matching_4_7() {
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1/ranking"
        ));
        assert!(matches("sport/#", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(!matches("#", "$SYS/uptime"));
        assert!(!matches("+/uptime", "$SYS/uptime"));
        assert!(matches("$SYS/#", "$SYS/uptime"));
    }

    #[test]
    fn shared_subscriptions_4_8_2() {
        let s = parse_shared("$share/g/a/+").unwrap().unwrap();
        assert_eq!((s.group, s.filter), ("g", "a/+"));
        assert!(parse_shared("$share/g").is_err());
        assert!(parse_shared("$share//a").is_err());
        assert!(parse_shared("$share/g+/a").is_err());
        assert_eq!(parse_shared("a/b"), Ok(None));
    }
}
