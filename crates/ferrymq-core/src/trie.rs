//! The subscription index: a trie with one step per topic level, never a scan of all filters.
//!
//! Each node holds the plain subscriptions whose filter ends there and the shared-subscription
//! groups (`$share/{group}/{filter}`) whose inner filter ends there. `+` and `#` are child
//! slots of their own so a lookup visits at most three children per level.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;

use ferrymq_mqtt::SubscriptionOptions;

use crate::SessionId;

/// One subscription as the index stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubEntry {
    pub session: SessionId,
    pub options: SubscriptionOptions,
    pub identifier: Option<u32>,
}

/// A shared-subscription group on one filter: messages go to one member at a time.
#[derive(Debug, Default)]
pub struct SharedGroup {
    pub name: Arc<str>,
    /// The group's topic filter (without `$share/{group}/`), so a delivery can name the
    /// subscription it came through even when one session has several filters in a group.
    pub filter: Arc<str>,
    pub members: Vec<SubEntry>,
    /// Round-robin cursor; a `Cell` so matching can stay `&self`.
    next: Cell<usize>,
}

impl SharedGroup {
    /// Picks the next member for which `eligible` holds, round robin. Falls back to any
    /// member when none is eligible (the message then waits in that member's session).
    pub fn pick(&self, eligible: impl Fn(SessionId) -> bool) -> Option<SubEntry> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = self.next.get() % n;
        for i in 0..n {
            let idx = (start + i) % n;
            if eligible(self.members[idx].session) {
                self.next.set(idx + 1);
                return Some(self.members[idx]);
            }
        }
        self.next.set(start + 1);
        Some(self.members[start])
    }
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    plus: Option<Box<Node>>,
    hash: Option<Box<Node>>,
    subs: Vec<SubEntry>,
    shared: Vec<SharedGroup>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.hash.is_none()
            && self.subs.is_empty()
            && self.shared.is_empty()
    }

    fn child_mut(&mut self, level: &str) -> &mut Node {
        match level {
            "+" => self.plus.get_or_insert_with(Default::default),
            "#" => self.hash.get_or_insert_with(Default::default),
            _ => self.children.entry(level.into()).or_default(),
        }
    }
}

/// What a topic matched: plain subscriptions and shared groups.
#[derive(Debug, Default)]
pub struct Matches<'a> {
    pub plain: Vec<SubEntry>,
    pub shared: Vec<&'a SharedGroup>,
}

/// What a topic matched, for routing: plain subscriptions sorted by session (shared, possibly
/// from the cache) and shared groups.
#[derive(Debug)]
pub struct Lookup<'a> {
    pub plain: Arc<[SubEntry]>,
    pub shared: Vec<&'a SharedGroup>,
}

/// Most topics remembered by the match cache before it starts over.
const CACHE_TOPICS: usize = 16 * 1024;

/// The subscription index.
#[derive(Debug, Default)]
pub struct SubscriptionTree {
    root: Node,
    count: usize,
    /// Topic → its plain matches, for topics that match no shared group. Any change to the
    /// tree clears it. Walking the trie (splitting, hashing each level, comparing) was ~25% of
    /// the broker's time on a repeated topic; a hit costs one hash of the topic.
    /// (SipHash: topics come from clients, so the cache must resist collision floods.)
    cache: RefCell<HashMap<Box<str>, Arc<[SubEntry]>>>,
    /// Filter → subscriptions on it (plain and shared), in order: the admin API pages
    /// through filters without walking the trie.
    filters: std::collections::BTreeMap<Box<str>, u32>,
}

impl SubscriptionTree {
    /// Number of subscriptions (plain and shared memberships).
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds or replaces the subscription of `entry.session` on `filter` (within `group`, if
    /// shared). Returns true when it replaced an existing one.
    pub fn insert(&mut self, filter: &str, group: Option<&str>, entry: SubEntry) -> bool {
        self.cache.get_mut().clear();
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.child_mut(level);
        }
        let list = match group {
            None => &mut node.subs,
            Some(g) => {
                let pos = node.shared.iter().position(|s| &*s.name == g);
                let idx = match pos {
                    Some(i) => i,
                    None => {
                        node.shared.push(SharedGroup {
                            name: g.into(),
                            filter: filter.into(),
                            members: Vec::new(),
                            next: Cell::new(0),
                        });
                        node.shared.len() - 1
                    }
                };
                &mut node.shared[idx].members
            }
        };
        if let Some(existing) = list.iter_mut().find(|e| e.session == entry.session) {
            *existing = entry;
            true
        } else {
            list.push(entry);
            self.count += 1;
            *self.filters.entry(filter.into()).or_default() += 1;
            false
        }
    }

    /// Up to `limit` subscribed filters after `after`, with their subscription counts, and
    /// the cursor for the next page.
    pub fn filters_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<(String, u32)>, Option<String>) {
        use std::ops::Bound;
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut it = self.filters.range::<str, _>((from, Bound::Unbounded));
        let items: Vec<(String, u32)> = it
            .by_ref()
            .take(limit)
            .map(|(f, n)| (f.to_string(), *n))
            .collect();
        let next = it.next().and(items.last()).map(|(f, _)| f.clone());
        (items, next)
    }

    /// Removes the subscription of `session` on `filter`; true when it existed.
    pub fn remove(&mut self, filter: &str, group: Option<&str>, session: SessionId) -> bool {
        self.cache.get_mut().clear();
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove_at(&mut self.root, &levels, group, session);
        if removed {
            self.count -= 1;
            if let Some(n) = self.filters.get_mut(filter) {
                *n -= 1;
                if *n == 0 {
                    self.filters.remove(filter);
                }
            }
        }
        removed
    }

    /// Every subscription matching `topic`. Topics beginning with `$` are not matched by
    /// filters beginning with a wildcard (MQTT-4.7.2-1).
    pub fn matches(&self, topic: &str) -> Matches<'_> {
        let mut out = Matches::default();
        let dollar = topic.starts_with('$');
        // Levels on the stack: no allocation per publish for topics of up to 64 levels.
        let mut stack = [""; 64];
        let mut n = 0;
        for level in topic.split('/') {
            if n == stack.len() {
                let levels: Vec<&str> = topic.split('/').collect();
                collect(&self.root, &levels, dollar, &mut out);
                return out;
            }
            stack[n] = level;
            n += 1;
        }
        collect(&self.root, &stack[..n], dollar, &mut out);
        out
    }

    /// Matches for routing, from the cache when the topic was seen since the last change.
    pub fn lookup(&self, topic: &str) -> Lookup<'_> {
        if let Some(plain) = self.cache.borrow().get(topic) {
            return Lookup {
                plain: plain.clone(),
                shared: Vec::new(),
            };
        }
        let Matches { mut plain, shared } = self.matches(topic);
        plain.sort_unstable_by_key(|e| e.session);
        let plain: Arc<[SubEntry]> = plain.into();
        if shared.is_empty() {
            let mut cache = self.cache.borrow_mut();
            if cache.len() >= CACHE_TOPICS {
                cache.clear();
            }
            cache.insert(topic.into(), plain.clone());
        }
        Lookup { plain, shared }
    }

    /// The shared group `group` on `filter`, if it exists.
    pub fn shared_group(&self, filter: &str, group: &str) -> Option<&SharedGroup> {
        let mut node = &self.root;
        for level in filter.split('/') {
            node = match level {
                "+" => node.plus.as_deref()?,
                "#" => node.hash.as_deref()?,
                _ => node.children.get(level)?,
            };
        }
        node.shared.iter().find(|g| &*g.name == group)
    }
}

fn remove_at(node: &mut Node, levels: &[&str], group: Option<&str>, session: SessionId) -> bool {
    let Some((first, rest)) = levels.split_first() else {
        return match group {
            None => take(&mut node.subs, session),
            Some(g) => {
                let Some(i) = node.shared.iter().position(|s| &*s.name == g) else {
                    return false;
                };
                let removed = take(&mut node.shared[i].members, session);
                if node.shared[i].members.is_empty() {
                    node.shared.swap_remove(i);
                }
                removed
            }
        };
    };
    let removed = match *first {
        "+" | "#" => {
            let slot = if *first == "+" {
                &mut node.plus
            } else {
                &mut node.hash
            };
            let Some(child) = slot.as_deref_mut() else {
                return false;
            };
            let removed = remove_at(child, rest, group, session);
            if child.is_empty() {
                *slot = None;
            }
            removed
        }
        level => {
            let Some(child) = node.children.get_mut(level) else {
                return false;
            };
            let removed = remove_at(child, rest, group, session);
            if child.is_empty() {
                node.children.remove(level);
            }
            removed
        }
    };
    removed
}

fn take(list: &mut Vec<SubEntry>, session: SessionId) -> bool {
    match list.iter().position(|e| e.session == session) {
        Some(i) => {
            list.swap_remove(i);
            true
        }
        None => false,
    }
}

fn collect<'a>(node: &'a Node, levels: &[&str], dollar_first: bool, out: &mut Matches<'a>) {
    let wild_ok = !dollar_first;
    if let Some(hash) = node.hash.as_deref() {
        // `#` also matches the parent level itself ("a/#" matches "a").
        if wild_ok {
            out.plain.extend_from_slice(&hash.subs);
            out.shared.extend(hash.shared.iter());
        }
    }
    let Some((first, rest)) = levels.split_first() else {
        out.plain.extend_from_slice(&node.subs);
        out.shared.extend(node.shared.iter());
        return;
    };
    if wild_ok {
        if let Some(plus) = node.plus.as_deref() {
            collect(plus, rest, false, out);
        }
    }
    if let Some(child) = node.children.get(*first) {
        collect(child, rest, false, out);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ferrymq_mqtt::topic::matches;
    use proptest::prelude::*;

    fn entry(s: u64) -> SubEntry {
        SubEntry {
            session: SessionId(s),
            options: Default::default(),
            identifier: None,
        }
    }

    fn sessions(t: &SubscriptionTree, topic: &str) -> Vec<u64> {
        let mut v: Vec<u64> = t.matches(topic).plain.iter().map(|e| e.session.0).collect();
        v.sort();
        v
    }

    #[test]
    fn hash_matches_parent_and_children() {
        let mut t = SubscriptionTree::default();
        t.insert("a/#", None, entry(1));
        t.insert("a/+", None, entry(2));
        t.insert("#", None, entry(3));
        assert_eq!(sessions(&t, "a"), vec![1, 3]);
        assert_eq!(sessions(&t, "a/b"), vec![1, 2, 3]);
        assert_eq!(sessions(&t, "a/b/c"), vec![1, 3]);
        assert_eq!(sessions(&t, "$SYS/x"), Vec::<u64>::new());
    }

    #[test]
    fn remove_prunes_nodes() {
        let mut t = SubscriptionTree::default();
        t.insert("a/b/c", None, entry(1));
        t.insert("a/+/c", Some("g"), entry(2));
        assert_eq!(t.len(), 2);
        assert!(t.remove("a/b/c", None, SessionId(1)));
        assert!(t.remove("a/+/c", Some("g"), SessionId(2)));
        assert!(!t.remove("a/+/c", Some("g"), SessionId(2)));
        assert!(t.root.is_empty());
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn cached_lookups_follow_subscription_changes() {
        let mut t = SubscriptionTree::default();
        t.insert("a/+", None, entry(1));
        let ids = |t: &SubscriptionTree| {
            t.lookup("a/b")
                .plain
                .iter()
                .map(|e| e.session.0)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&t), vec![1]);
        assert_eq!(ids(&t), vec![1], "served from the cache");
        t.insert("a/#", None, entry(2));
        assert_eq!(ids(&t), vec![1, 2], "a new subscription is seen at once");
        t.remove("a/+", None, SessionId(1));
        assert_eq!(ids(&t), vec![2], "a removed one is gone at once");
        t.insert("a/b", Some("g"), entry(3));
        let l = t.lookup("a/b");
        assert_eq!(l.shared.len(), 1, "shared groups are never served stale");
    }

    #[test]
    fn shared_groups_round_robin() {
        let mut t = SubscriptionTree::default();
        for s in 1..=3 {
            t.insert("jobs/#", Some("w"), entry(s));
        }
        let picks: Vec<u64> = (0..6)
            .map(|_| {
                t.matches("jobs/1").shared[0]
                    .pick(|_| true)
                    .unwrap()
                    .session
                    .0
            })
            .collect();
        assert_eq!(picks, vec![1, 2, 3, 1, 2, 3]);
        let only2: Vec<u64> = (0..3)
            .map(|_| {
                t.matches("jobs/1").shared[0]
                    .pick(|s| s.0 == 2)
                    .unwrap()
                    .session
                    .0
            })
            .collect();
        assert_eq!(only2, vec![2, 2, 2]);
    }

    proptest! {
        /// The trie agrees with the reference matcher on random filters and topics.
        #[test]
        fn trie_agrees_with_reference(
            filters in proptest::collection::vec("(\\$s|a|b|\\+)(/(a|b|\\+|#|))?(/(a|b|#))?", 1..12),
            topics in proptest::collection::vec("(\\$s|a|b|)(/(a|b|))?(/(a|b))?", 1..12),
        ) {
            let mut t = SubscriptionTree::default();
            let filters: Vec<String> = filters.into_iter().filter(|f| ferrymq_mqtt::topic::valid_topic_filter(f)).collect();
            for (i, f) in filters.iter().enumerate() {
                t.insert(f, None, entry(i as u64));
            }
            for topic in &topics {
                let mut expect: Vec<u64> = filters.iter().enumerate()
                    .filter(|(_, f)| matches(f, topic)).map(|(i, _)| i as u64).collect();
                expect.sort();
                expect.dedup();
                let mut got = sessions(&t, topic);
                got.dedup();
                prop_assert_eq!(&got, &expect, "topic {}", topic);
                // The cached path agrees too, on first and repeated lookups.
                for _ in 0..2 {
                    let mut cached: Vec<u64> = t.lookup(topic).plain.iter().map(|e| e.session.0).collect();
                    cached.dedup();
                    prop_assert_eq!(&cached, &expect, "cached, topic {}", topic);
                }
            }
        }
    }
}
