//! Retained messages: a trie keyed by topic level, walked by a filter on subscribe. Levels are
//! kept in order, so the admin API pages through topics (level by level) from a cursor
//! without visiting what comes before it.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use crate::Message;

#[derive(Debug, Default)]
struct Node {
    children: BTreeMap<Box<str>, Node>,
    message: Option<Arc<Message>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.message.is_none()
    }
}

/// The retained-message store.
#[derive(Debug, Default)]
pub struct RetainedStore {
    root: Node,
    count: usize,
}

impl RetainedStore {
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Stores `message` as the retained message of its topic; an empty payload clears it
    /// (MQTT-3.3.1-6, MQTT-3.3.1-7).
    pub fn set(&mut self, message: Arc<Message>) {
        let topic = message.topic.clone();
        if message.payload.is_empty() {
            let levels: Vec<&str> = topic.split('/').collect();
            if clear(&mut self.root, &levels) {
                self.count -= 1;
            }
            return;
        }
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        if node.message.replace(message).is_none() {
            self.count += 1;
        }
    }

    /// Every retained message (checkpoints, admin views).
    pub fn all(&self) -> Vec<Arc<Message>> {
        let mut out = Vec::with_capacity(self.count);
        all(&self.root, &mut out);
        out
    }

    /// The retained message of `topic`.
    pub fn get(&self, topic: &str) -> Option<Arc<Message>> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.message.clone()
    }

    /// Up to `limit` retained messages whose topics come after `after`, in level order (a
    /// topic before those below it: `a`, `a/b`, `a/c`, `b`).
    pub fn page_after(&self, after: Option<&str>, limit: usize) -> Vec<Arc<Message>> {
        let mut out = Vec::new();
        if limit > 0 {
            let levels: Option<Vec<&str>> = after.map(|a| a.split('/').collect());
            page(&self.root, levels.as_deref(), limit, &mut out);
        }
        out
    }

    /// Every retained message whose topic matches `filter`.
    pub fn matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let levels: Vec<&str> = filter.split('/').collect();
        let mut out = Vec::new();
        walk(&self.root, &levels, true, &mut out);
        out
    }
}

fn clear(node: &mut Node, levels: &[&str]) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return node.message.take().is_some();
    };
    let Some(child) = node.children.get_mut(*first) else {
        return false;
    };
    let removed = clear(child, rest);
    if child.is_empty() {
        node.children.remove(*first);
    }
    removed
}

fn walk(node: &Node, levels: &[&str], root: bool, out: &mut Vec<Arc<Message>>) {
    let Some((first, rest)) = levels.split_first() else {
        out.extend(node.message.iter().cloned());
        return;
    };
    // Wildcards at the first level do not match `$` topics (MQTT-4.7.2-1).
    let visible = |name: &str| !(root && name.starts_with('$'));
    match *first {
        "#" => {
            out.extend(node.message.iter().filter(|_| !root).cloned());
            for (name, child) in &node.children {
                if visible(name) {
                    all(child, out);
                }
            }
        }
        "+" => {
            for (name, child) in &node.children {
                if visible(name) {
                    walk(child, rest, false, out);
                }
            }
        }
        level => {
            if let Some(child) = node.children.get(level) {
                walk(child, rest, false, out);
            }
        }
    }
}

/// Messages at and below `node` in level order, after the path `after` (relative to `node`;
/// `None`: all of them), until `out` holds `limit`.
fn page(node: &Node, after: Option<&[&str]>, limit: usize, out: &mut Vec<Arc<Message>>) {
    let rest = match after {
        // At or above the cursor: this node's message comes before it.
        Some(levels) => levels,
        None => {
            if let Some(m) = &node.message {
                out.push(m.clone());
            }
            for child in node.children.values() {
                if out.len() >= limit {
                    return;
                }
                page(child, None, limit, out);
            }
            return;
        }
    };
    let Some((first, below)) = rest.split_first() else {
        // The cursor is this node: everything below it comes after.
        for child in node.children.values() {
            if out.len() >= limit {
                return;
            }
            page(child, None, limit, out);
        }
        return;
    };
    if let Some(child) = node.children.get(*first) {
        page(child, Some(below), limit, out);
    }
    let later = node
        .children
        .range::<str, _>((Bound::Excluded(*first), Bound::Unbounded));
    for (_, child) in later {
        if out.len() >= limit {
            return;
        }
        page(child, None, limit, out);
    }
}

fn all(node: &Node, out: &mut Vec<Arc<Message>>) {
    out.extend(node.message.iter().cloned());
    for child in node.children.values() {
        all(child, out);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{Message, Time};
    use ferrymq_mqtt::topic::matches;

    fn msg(topic: &str, payload: &str) -> Arc<Message> {
        Arc::new(Message::new(
            topic,
            payload.as_bytes().to_vec().into(),
            Time(0),
        ))
    }

    fn topics(r: &RetainedStore, filter: &str) -> Vec<String> {
        let mut v: Vec<String> = r
            .matching(filter)
            .iter()
            .map(|m| m.topic.to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn set_clear_and_match() {
        let mut r = RetainedStore::default();
        for t in ["a", "a/b", "a/b/c", "x/b", "$SYS/up", "/lead"] {
            r.set(msg(t, "1"));
        }
        assert_eq!(r.len(), 6);
        assert_eq!(topics(&r, "a/#"), vec!["a", "a/b", "a/b/c"]);
        assert_eq!(topics(&r, "+/b"), vec!["a/b", "x/b"]);
        assert_eq!(topics(&r, "#"), vec!["/lead", "a", "a/b", "a/b/c", "x/b"]);
        assert_eq!(topics(&r, "$SYS/#"), vec!["$SYS/up"]);
        r.set(msg("a/b", ""));
        assert_eq!(r.len(), 5);
        assert_eq!(topics(&r, "a/+"), Vec::<String>::new());
        assert_eq!(topics(&r, "a/b/c"), vec!["a/b/c"]);
        // Every result agrees with the reference matcher.
        for f in ["#", "+", "+/+", "a/+/c", "/+", "+/#"] {
            for t in topics(&r, f) {
                assert!(matches(f, &t), "{f} {t}");
            }
        }
    }
}
