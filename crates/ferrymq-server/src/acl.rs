//! `[acl]` in the configuration file: the rules the engine enforces (`ferrymq_core::acl`
//! says how they match), and the older `mqtt.deny_subscribe`, which is shorthand for deny
//! rules placed before them.

use ferrymq_core::acl::{AclAction, AclConfig, AclRule, Permission, Principal};
use serde::{Deserialize, Serialize};

use crate::ServerError;

/// `[acl]`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AclSection {
    /// When no rule matches. Unset = `allow`, so a configuration without rules keeps working.
    pub default: Option<PermissionSetting>,
    /// `[[acl.rule]]`, in order: the first that matches wins.
    #[serde(rename = "rule")]
    pub rules: Vec<RuleSetting>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PermissionSetting {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionSetting {
    Publish,
    Subscribe,
    All,
}

/// One `[[acl.rule]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSetting {
    pub permission: PermissionSetting,
    pub action: ActionSetting,
    /// A topic filter; `%u` = the user name, `%c` = the client id.
    pub topic: String,
    /// Only for this user name.
    #[serde(default)]
    pub user: Option<String>,
    /// Only for this client id.
    #[serde(default)]
    pub client_id: Option<String>,
}

fn permission(p: PermissionSetting) -> Permission {
    match p {
        PermissionSetting::Allow => Permission::Allow,
        PermissionSetting::Deny => Permission::Deny,
    }
}

impl AclSection {
    /// Checks every rule; the error names the rule (`acl.rule[2].topic`).
    pub fn validate(&self) -> Result<(), ServerError> {
        for (i, r) in self.rules.iter().enumerate() {
            let bad = |field: &str, message: String| ServerError::Config {
                key: format!("acl.rule[{i}].{field}"),
                message,
            };
            // Placeholders are checked as the level text they will be replaced by.
            let probe = r.topic.replace("%u", "u").replace("%c", "c");
            if !ferrymq_mqtt::topic::valid_topic_filter(&probe) {
                return Err(bad(
                    "topic",
                    format!("{:?} is not a valid topic filter", r.topic),
                ));
            }
            if r.user.is_some() && r.client_id.is_some() {
                return Err(bad(
                    "client_id",
                    "a rule names a user or a client id, not both".into(),
                ));
            }
            if r.user.as_deref() == Some("") || r.client_id.as_deref() == Some("") {
                return Err(bad("user", "must not be empty".into()));
            }
        }
        Ok(())
    }

    /// Whether the operator configured ACLs (rules or a default): then `$SYS` is readable
    /// only through a rule that names it. `mqtt.deny_subscribe` alone does not count, so the
    /// shorthand changes nothing else.
    pub fn configured(&self) -> bool {
        self.default.is_some() || !self.rules.is_empty()
    }

    /// The engine's rules: `deny_subscribe` first (as deny rules for subscribing and reading),
    /// then `[[acl.rule]]` in order.
    pub fn to_engine(&self, deny_subscribe: &[String]) -> AclConfig {
        let mut rules: Vec<AclRule> = deny_subscribe
            .iter()
            .map(|f| AclRule {
                permission: Permission::Deny,
                action: AclAction::Subscribe,
                topic: f.clone(),
                who: Principal::Anyone,
            })
            .collect();
        rules.extend(self.rules.iter().map(|r| AclRule {
            permission: permission(r.permission),
            action: match r.action {
                ActionSetting::Publish => AclAction::Publish,
                ActionSetting::Subscribe => AclAction::Subscribe,
                ActionSetting::All => AclAction::All,
            },
            topic: r.topic.clone(),
            who: match (&r.user, &r.client_id) {
                (Some(u), _) => Principal::User(u.clone()),
                (None, Some(c)) => Principal::ClientId(c.clone()),
                (None, None) => Principal::Anyone,
            },
        }));
        AclConfig {
            rules,
            default: self.default.map_or(Permission::Allow, permission),
            sys_default: if self.configured() {
                Permission::Deny
            } else {
                Permission::Allow
            },
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> AclSection {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn rules_parse_in_order_and_deny_subscribe_comes_first() {
        let s = parse(
            r#"
            default = "deny"
            [[rule]]
            permission = "allow"
            action = "all"
            topic = "home/%u/#"
            [[rule]]
            permission = "allow"
            action = "subscribe"
            topic = "$SYS/#"
            user = "ops"
            "#,
        );
        s.validate().unwrap();
        let e = s.to_engine(&["private/#".into()]);
        assert_eq!(e.rules.len(), 3);
        assert_eq!(e.rules[0].topic, "private/#");
        assert_eq!(e.rules[0].permission, Permission::Deny);
        assert_eq!(e.rules[2].who, Principal::User("ops".into()));
        assert_eq!(e.default, Permission::Deny);
        assert_eq!(e.sys_default, Permission::Deny);
    }

    #[test]
    fn without_acl_settings_sys_stays_open() {
        let e = AclSection::default().to_engine(&["x/#".into()]);
        assert_eq!(e.sys_default, Permission::Allow);
        assert_eq!(e.default, Permission::Allow);
    }

    #[test]
    fn bad_rules_name_their_index() {
        let s = parse("[[rule]]\npermission = \"deny\"\naction = \"all\"\ntopic = \"a/#/b\"\n");
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("acl.rule[0].topic"), "{err}");
        let s = parse(
            "[[rule]]\npermission = \"deny\"\naction = \"all\"\ntopic = \"a\"\nuser = \"u\"\nclient_id = \"c\"\n",
        );
        assert!(s.validate().is_err());
        assert!(toml::from_str::<AclSection>(
            "[[rule]]\npermission = \"maybe\"\naction = \"all\"\ntopic = \"a\"\n"
        )
        .is_err());
    }
}
