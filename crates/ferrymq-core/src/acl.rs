//! Access control: which topics a client may publish to and read.
//!
//! The rules are plain data ([`AclConfig`], filled by the server from `[[acl.rule]]`); at
//! CONNECT the engine resolves them for the client's identity (user name, client id, the
//! `acl` claim of its JWT) into a [`ClientAcl`] kept on the connection. With no rule, an
//! `allow` default and no token claim, no `ClientAcl` is made at all, so a broker without
//! ACLs pays one `Option` test per publish and per delivery.
//!
//! Semantics (docs/security.md, "ACLs", says the same for users):
//! - **Publish** to topic `t`: the first rule for `publish`/`all` whose filter matches `t`
//!   decides; otherwise `default`.
//! - **Read** (every delivery: routed, retained on subscribe, replayed on resume, `$SYS`,
//!   dead letters): the first rule for `subscribe`/`all` whose filter matches the message's
//!   topic decides; otherwise `default`, except that a `$SYS` topic falls to `sys_default`.
//!   Filters follow MQTT's `$` rule: `#` and `+` in the first level never match a `$` topic,
//!   so only a rule that names `$SYS` explicitly can grant it.
//! - **Subscribe** to filter `f`: the first rule for `subscribe`/`all` whose filter *covers*
//!   `f` (every topic `f` can match, the rule's filter matches too) decides; rules that only
//!   overlap `f` are skipped, since every delivery is checked again on its own topic;
//!   otherwise `default` (`sys_default` for a filter starting with `$SYS`).
//! - A JWT's `acl` claim narrows this further: with a `publish` list, a publish must also
//!   match one of its filters; with a `subscribe` list, a requested filter must be covered by
//!   one of them and every delivery must match one. A missing list restricts nothing; an
//!   empty one allows nothing.
//! - `%u` and `%c` in a rule's topic stand for the user name and the client id. A rule with
//!   `%u` does not apply to a client without a user name. A user name or client id that
//!   contains `/`, `+` or `#` (which would widen the filter) never matches an allow rule
//!   that substitutes it, and makes a deny rule that substitutes it deny everything.
//!
//! Work queues are read through `$queue/{name}` (the subscription is checked; the queue's
//! messages are then the consumer's without a check per message) and dead letters through
//! `$dlq/{queue}` (checked on subscribe and on every dead letter, whose topic it is).

use std::sync::Arc;

use ferrymq_mqtt::topic::matches;

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Permission {
    #[default]
    Allow,
    Deny,
}

/// What a rule is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AclAction {
    Publish,
    /// Subscribing and reading (every delivery).
    Subscribe,
    All,
}

/// Whom a rule applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    Anyone,
    User(String),
    ClientId(String),
}

/// One `[[acl.rule]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclRule {
    pub permission: Permission,
    pub action: AclAction,
    /// A topic filter, with `%u` and `%c` placeholders.
    pub topic: String,
    pub who: Principal,
}

/// The rules, in order (the first that matches wins), and the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AclConfig {
    pub rules: Vec<AclRule>,
    /// When no rule matches.
    pub default: Permission,
    /// When no rule matches a `$SYS` topic or filter.
    pub sys_default: Permission,
}

/// The `acl` claim of a client's token: filter lists that narrow what the rules allow.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenAcl {
    pub publish: Option<Vec<String>>,
    pub subscribe: Option<Vec<String>>,
}

/// Who a client is, as the server authenticated it. An anonymous client has no user name:
/// the one in its CONNECT proves nothing and does not select rules.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    pub user: Option<Arc<str>>,
    pub token_acl: Option<TokenAcl>,
}

/// A rule's filter once resolved for one client.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resolved {
    Filter(String),
    /// A deny rule whose substitution would have widened it: matches everything.
    Everything,
}

impl Resolved {
    fn matches(&self, topic: &str) -> bool {
        match self {
            Resolved::Filter(f) => matches(f, topic),
            Resolved::Everything => true,
        }
    }

    fn covers(&self, filter: &str) -> bool {
        match self {
            Resolved::Filter(f) => covers(f, filter),
            Resolved::Everything => true,
        }
    }
}

/// The rules resolved for one client: only those that apply to it, placeholders replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAcl {
    publish: Vec<(Permission, Resolved)>,
    read: Vec<(Permission, Resolved)>,
    default: Permission,
    sys_default: Permission,
    token: Option<TokenAcl>,
}

impl AclConfig {
    /// Whether anything would ever be denied without a token claim.
    pub fn is_active(&self) -> bool {
        !self.rules.is_empty()
            || self.default == Permission::Deny
            || self.sys_default == Permission::Deny
    }

    /// The rules for one client; `None` when nothing could be denied to it.
    pub fn for_client(&self, who: &Identity, client_id: &str) -> Option<ClientAcl> {
        if !self.is_active() && who.token_acl.is_none() {
            return None;
        }
        let user = who.user.as_deref();
        let mut acl = ClientAcl {
            publish: Vec::new(),
            read: Vec::new(),
            default: self.default,
            sys_default: self.sys_default,
            token: who.token_acl.as_ref().map(|t| TokenAcl {
                publish: t
                    .publish
                    .as_ref()
                    .map(|l| substitute_all(l, user, client_id)),
                subscribe: t
                    .subscribe
                    .as_ref()
                    .map(|l| substitute_all(l, user, client_id)),
            }),
        };
        for rule in &self.rules {
            let applies = match &rule.who {
                Principal::Anyone => true,
                Principal::User(u) => user == Some(u.as_str()),
                Principal::ClientId(c) => c == client_id,
            };
            if !applies {
                continue;
            }
            let Some(resolved) = resolve(&rule.topic, rule.permission, user, client_id) else {
                continue;
            };
            if matches!(rule.action, AclAction::Publish | AclAction::All) {
                acl.publish.push((rule.permission, resolved.clone()));
            }
            if matches!(rule.action, AclAction::Subscribe | AclAction::All) {
                acl.read.push((rule.permission, resolved));
            }
        }
        Some(acl)
    }
}

impl ClientAcl {
    /// Whether the client may publish to `topic` (a topic name).
    pub fn may_publish(&self, topic: &str) -> bool {
        let by_rules = first_match(&self.publish, |f| f.matches(topic))
            .unwrap_or_else(|| self.fallback(topic));
        by_rules == Permission::Allow
            && self
                .token
                .as_ref()
                .and_then(|t| t.publish.as_ref())
                .is_none_or(|l| l.iter().any(|f| matches(f, topic)))
    }

    /// Whether a message on `topic` may be delivered to the client.
    pub fn may_read(&self, topic: &str) -> bool {
        let by_rules =
            first_match(&self.read, |f| f.matches(topic)).unwrap_or_else(|| self.fallback(topic));
        by_rules == Permission::Allow
            && self
                .token
                .as_ref()
                .and_then(|t| t.subscribe.as_ref())
                .is_none_or(|l| l.iter().any(|f| matches(f, topic)))
    }

    /// Whether the client may subscribe to `filter` (without any `$share/{group}/`).
    pub fn may_subscribe(&self, filter: &str) -> bool {
        let by_rules =
            first_match(&self.read, |f| f.covers(filter)).unwrap_or_else(|| self.fallback(filter));
        by_rules == Permission::Allow
            && self
                .token
                .as_ref()
                .and_then(|t| t.subscribe.as_ref())
                .is_none_or(|l| l.iter().any(|f| covers(f, filter)))
    }

    fn fallback(&self, topic_or_filter: &str) -> Permission {
        if is_sys(topic_or_filter) {
            self.sys_default
        } else {
            self.default
        }
    }
}

fn is_sys(t: &str) -> bool {
    t == "$SYS" || t.starts_with("$SYS/")
}

fn first_match(
    rules: &[(Permission, Resolved)],
    hit: impl Fn(&Resolved) -> bool,
) -> Option<Permission> {
    rules.iter().find(|(_, f)| hit(f)).map(|(p, _)| *p)
}

/// A value that cannot go into a filter without changing its meaning.
fn unsafe_value(v: &str) -> bool {
    v.is_empty() || v.contains(['/', '+', '#', '\0'])
}

/// Replaces `%u` and `%c`. `None`: the rule does not apply to this client.
fn resolve(topic: &str, permission: Permission, user: Option<&str>, cid: &str) -> Option<Resolved> {
    let wants_user = topic.contains("%u");
    let wants_cid = topic.contains("%c");
    if wants_user && user.is_none() {
        return None;
    }
    let widened =
        (wants_user && user.is_some_and(unsafe_value)) || (wants_cid && unsafe_value(cid));
    if widened {
        return match permission {
            Permission::Allow => None,
            Permission::Deny => Some(Resolved::Everything),
        };
    }
    Some(Resolved::Filter(substitute(topic, user, cid)))
}

fn substitute(topic: &str, user: Option<&str>, cid: &str) -> String {
    let mut t = topic.to_string();
    if let Some(u) = user {
        t = t.replace("%u", u);
    }
    t.replace("%c", cid)
}

/// Token filter lists: an entry that cannot be substituted safely is dropped (it grants
/// nothing: the lists only ever narrow).
fn substitute_all(list: &[String], user: Option<&str>, cid: &str) -> Vec<String> {
    list.iter()
        .filter_map(|f| match resolve(f, Permission::Allow, user, cid)? {
            Resolved::Filter(f) => Some(f),
            Resolved::Everything => None,
        })
        .collect()
}

/// Whether filter `outer` matches every topic that filter `inner` can match. `inner`'s
/// wildcards are wildcards here (`a/+` does not cover `a/#`), and MQTT's `$` rule holds:
/// a leading wildcard in `outer` never covers an `inner` that names a `$` topic.
pub fn covers(outer: &str, inner: &str) -> bool {
    let inner_dollar = inner.starts_with('$');
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    let mut first = true;
    loop {
        let (a, b) = (o.next(), i.next());
        if first && inner_dollar && matches!(a, Some("+" | "#")) {
            return false;
        }
        first = false;
        match (a, b) {
            (Some("#"), _) => return o.next().is_none(),
            (None, None) => return true,
            (Some("+"), Some(b)) if b != "#" => {}
            (Some(a), Some(b)) if a == b && a != "#" && a != "+" => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rule(permission: Permission, action: AclAction, topic: &str) -> AclRule {
        AclRule {
            permission,
            action,
            topic: topic.into(),
            who: Principal::Anyone,
        }
    }

    fn user(name: &str) -> Identity {
        Identity {
            user: Some(name.into()),
            token_acl: None,
        }
    }

    #[test]
    fn covers_reads_the_inner_wildcards_as_wildcards() {
        for (o, i) in [
            ("#", "a/b"),
            ("#", "#"),
            ("a/#", "a"),
            ("a/#", "a/#"),
            ("a/#", "a/+/c"),
            ("a/+", "a/+"),
            ("a/+", "a/b"),
            ("+/+", "a/+"),
            ("$SYS/#", "$SYS/broker/+"),
        ] {
            assert!(covers(o, i), "{o} covers {i}");
        }
        for (o, i) in [
            ("a/+", "a/#"),
            ("a/b", "a/+"),
            ("a/+", "a/b/c"),
            ("a/b/c", "a/b"),
            ("#", "$SYS/#"),
            ("+/broker", "$SYS/broker"),
            ("a/#", "b"),
        ] {
            assert!(!covers(o, i), "{o} does not cover {i}");
        }
    }

    #[test]
    fn no_rules_and_allow_default_make_no_client_acl() {
        let cfg = AclConfig::default();
        assert!(cfg.for_client(&user("u"), "c").is_none());
        let with_token = Identity {
            user: None,
            token_acl: Some(TokenAcl::default()),
        };
        assert!(cfg.for_client(&with_token, "c").is_some());
    }

    #[test]
    fn first_matching_rule_wins_then_the_default() {
        let cfg = AclConfig {
            rules: vec![
                rule(Permission::Deny, AclAction::Subscribe, "a/secret"),
                rule(Permission::Allow, AclAction::All, "a/#"),
            ],
            default: Permission::Deny,
            sys_default: Permission::Deny,
        };
        let acl = cfg.for_client(&user("u"), "c").unwrap();
        assert!(acl.may_subscribe("a/#"));
        assert!(acl.may_read("a/x"));
        assert!(!acl.may_read("a/secret"));
        assert!(!acl.may_subscribe("a/secret"));
        assert!(
            acl.may_publish("a/secret"),
            "the deny rule is subscribe-only"
        );
        assert!(!acl.may_publish("b"));
        assert!(!acl.may_subscribe("#"), "not covered by an allow rule");
    }

    #[test]
    fn a_deny_rule_that_only_overlaps_lets_the_subscription_through_but_not_the_messages() {
        let cfg = AclConfig {
            rules: vec![rule(Permission::Deny, AclAction::Subscribe, "private/#")],
            ..AclConfig::default()
        };
        let acl = cfg.for_client(&Identity::default(), "c").unwrap();
        assert!(acl.may_subscribe("#"));
        assert!(!acl.may_subscribe("private/+/x"));
        assert!(!acl.may_read("private/a"));
        assert!(acl.may_read("public/a"));
    }

    #[test]
    fn sys_needs_a_rule_that_names_it() {
        let mut cfg = AclConfig {
            rules: vec![rule(Permission::Allow, AclAction::Subscribe, "#")],
            default: Permission::Allow,
            sys_default: Permission::Deny,
        };
        let acl = cfg.for_client(&user("u"), "c").unwrap();
        assert!(!acl.may_subscribe("$SYS/#"));
        assert!(!acl.may_read("$SYS/broker/uptime"));
        assert!(acl.may_read("$dlq/q"), "other $ topics follow the default");
        cfg.rules
            .insert(0, rule(Permission::Allow, AclAction::Subscribe, "$SYS/#"));
        let acl = cfg.for_client(&user("u"), "c").unwrap();
        assert!(acl.may_subscribe("$SYS/#"));
        assert!(acl.may_read("$SYS/broker/uptime"));
    }

    #[test]
    fn placeholders_and_principals() {
        let cfg = AclConfig {
            rules: vec![
                AclRule {
                    who: Principal::User("admin".into()),
                    ..rule(Permission::Allow, AclAction::All, "#")
                },
                AclRule {
                    who: Principal::ClientId("probe".into()),
                    ..rule(Permission::Allow, AclAction::Subscribe, "$SYS/#")
                },
                rule(Permission::Allow, AclAction::All, "home/%u/#"),
                rule(Permission::Allow, AclAction::Publish, "dev/%c"),
            ],
            default: Permission::Deny,
            sys_default: Permission::Deny,
        };
        let alice = cfg.for_client(&user("alice"), "a1").unwrap();
        assert!(alice.may_publish("home/alice/x"));
        assert!(!alice.may_publish("home/bob/x"));
        assert!(alice.may_publish("dev/a1"));
        assert!(!alice.may_publish("dev/a2"));
        assert!(!alice.may_read("$SYS/x"));
        let admin = cfg.for_client(&user("admin"), "x").unwrap();
        assert!(admin.may_publish("anything"));
        let probe = cfg.for_client(&Identity::default(), "probe").unwrap();
        assert!(probe.may_read("$SYS/x"));
        assert!(
            !probe.may_publish("home/+/x"),
            "no user: %u rules do not apply"
        );
    }

    #[test]
    fn a_wildcard_in_a_user_name_never_widens_an_allow_rule_and_widens_a_deny_rule() {
        let cfg = AclConfig {
            rules: vec![
                rule(Permission::Deny, AclAction::Publish, "locked/%u"),
                rule(Permission::Allow, AclAction::All, "home/%u/#"),
            ],
            default: Permission::Allow,
            sys_default: Permission::Deny,
        };
        let acl = cfg.for_client(&user("+"), "c").unwrap();
        assert!(!acl.may_publish("home/bob/x"));
        assert!(!acl.may_publish("anything"));
        let acl = cfg.for_client(&user("a/b"), "c").unwrap();
        assert!(!acl.may_publish("x"));
    }

    #[test]
    fn a_token_claim_narrows_what_the_rules_allow() {
        let cfg = AclConfig::default();
        let who = Identity {
            user: Some("u".into()),
            token_acl: Some(TokenAcl {
                publish: Some(vec!["out/%u/#".into()]),
                subscribe: Some(vec!["in/#".into()]),
            }),
        };
        let acl = cfg.for_client(&who, "c").unwrap();
        assert!(acl.may_publish("out/u/1"));
        assert!(!acl.may_publish("out/v/1"));
        assert!(acl.may_subscribe("in/+"));
        assert!(!acl.may_subscribe("#"));
        assert!(acl.may_read("in/x"));
        assert!(!acl.may_read("other"));
        let empty = Identity {
            user: None,
            token_acl: Some(TokenAcl {
                publish: Some(vec![]),
                subscribe: None,
            }),
        };
        let acl = cfg.for_client(&empty, "c").unwrap();
        assert!(!acl.may_publish("x"));
        assert!(acl.may_read("x"));
    }
}
