//! Queue administration as the router runs it: the commands the REST API sends
//! ([`ToRouter::Queue`](crate::router::ToRouter)) and the engine calls they make.
//!
//! Runs on the router thread with the router's `now` and its step's [`Outbox`]: what a
//! command changes is journaled and its actions delivered exactly like a packet's (the
//! router stores the step's records, then dispatches; the reply waits for the records, see
//! `Router::answer_queue_commands`). The JSON shapes live with the HTTP handlers
//! (`queue_api.rs`); nothing here formats anything.

use ferrymq_core::queues::{
    DeadLetterPage, DeadLetterQuery, DeadLetterView, QueueError, QueueView,
};
use ferrymq_core::workqueue::QueueDefError;
use ferrymq_core::{Broker, Outbox, Time};

use crate::queue_spec::QueueSpec;

/// Most dead letters one command redrives or discards: a larger selection goes as several
/// commands, so that one request never holds the router for long (other clients' packets
/// run between them).
pub(crate) const CHUNK: usize = 1000;

/// One queue operation, run on the router thread.
#[derive(Debug)]
pub(crate) enum QueueCommand {
    List,
    Get(String),
    /// Create or replace (the definition was validated by the caller).
    Declare(ferrymq_core::workqueue::QueueDef),
    /// An RFC 7396 merge patch over the current definition, as written (`QueueSpec` JSON).
    Patch {
        name: String,
        patch: serde_json::Value,
    },
    Delete(String),
    DeadLetters {
        queue: String,
        query: DeadLetterQuery,
    },
    DeadLetter {
        queue: String,
        id: u64,
    },
    /// Every id the query takes (for redrive and purge, which then move them in chunks).
    DeadLetterIds {
        queue: String,
        query: DeadLetterQuery,
    },
    Redrive {
        queue: String,
        /// At most [`CHUNK`].
        ids: Vec<u64>,
        target_topic: Option<String>,
    },
    Discard {
        queue: String,
        /// At most [`CHUNK`].
        ids: Vec<u64>,
    },
}

/// What a command answers.
#[derive(Debug)]
pub(crate) enum QueueReply {
    Queues(Vec<QueueView>),
    Queue(QueueView),
    Declared {
        created: bool,
        view: QueueView,
    },
    Deleted,
    Page(DeadLetterPage),
    DeadLetter(Box<DeadLetterView>),
    Ids(Vec<u64>),
    /// How many dead letters a redrive or discard moved.
    Moved(usize),
}

pub(crate) type QueueResult = Result<QueueReply, QueueError>;

/// Runs one command against the engine.
pub(crate) fn execute(
    broker: &mut Broker,
    command: QueueCommand,
    now: Time,
    out: &mut Outbox,
) -> QueueResult {
    let view = |broker: &Broker, name: &str| {
        broker
            .queue_view(name, now)
            .ok_or_else(|| QueueError::NoSuchQueue(name.into()))
    };
    match command {
        QueueCommand::List => Ok(QueueReply::Queues(broker.queue_views(now))),
        QueueCommand::Get(name) => view(broker, &name).map(QueueReply::Queue),
        QueueCommand::Declare(def) => {
            let name = def.name.clone();
            let created = broker.declare_queue(def, now, out)?;
            Ok(QueueReply::Declared {
                created,
                view: view(broker, &name)?,
            })
        }
        QueueCommand::Patch { name, patch } => {
            let current = view(broker, &name)?;
            let def = patched(&name, &current.def, &patch)?;
            broker.declare_queue(def, now, out)?;
            view(broker, &name).map(QueueReply::Queue)
        }
        QueueCommand::Delete(name) => {
            broker.delete_queue(&name, out)?;
            Ok(QueueReply::Deleted)
        }
        QueueCommand::DeadLetters { queue, query } => {
            broker.dead_letters(&queue, &query).map(QueueReply::Page)
        }
        QueueCommand::DeadLetter { queue, id } => broker
            .dead_letter(&queue, id)
            .map(|d| QueueReply::DeadLetter(Box::new(d))),
        QueueCommand::DeadLetterIds { queue, query } => {
            broker.dead_letter_ids(&queue, &query).map(QueueReply::Ids)
        }
        QueueCommand::Redrive {
            queue,
            ids,
            target_topic,
        } => broker
            .redrive_dead_letters(&queue, &ids, target_topic.as_deref(), now, out)
            .map(QueueReply::Moved),
        QueueCommand::Discard { queue, ids } => broker
            .discard_dead_letters(&queue, &ids, out)
            .map(QueueReply::Moved),
    }
}

/// `current` with `patch` merged over it (RFC 7396: objects merge, `null` removes a field,
/// anything else replaces), checked like a new definition. The name cannot change.
fn patched(
    name: &str,
    current: &ferrymq_core::workqueue::QueueDef,
    patch: &serde_json::Value,
) -> Result<ferrymq_core::workqueue::QueueDef, QueueError> {
    let invalid = |field: &str, message: String| {
        QueueError::Invalid(QueueDefError {
            queue: name.into(),
            field: field.into(),
            message,
        })
    };
    if !patch.is_object() {
        return Err(QueueError::BadRequest(
            "a PATCH body is a JSON object with the fields to change".into(),
        ));
    }
    let mut merged = serde_json::to_value(QueueSpec::from_def(current))
        .map_err(|e| QueueError::BadRequest(e.to_string()))?;
    merge_patch(&mut merged, patch);
    if merged.get("name").and_then(|n| n.as_str()) != Some(name) {
        return Err(invalid(
            "name",
            "a queue's name cannot change (create a new queue instead)".into(),
        ));
    }
    let spec = spec_from_json(merged).map_err(QueueError::Invalid)?;
    spec.to_def().map_err(QueueError::Invalid)
}

/// A definition from JSON (a POST body, a merged PATCH), with a serde error turned into the
/// same shape as a validation error: which field, and why. serde names the field only for
/// unknown and missing ones; for a value of the wrong type each field is tried alone.
pub(crate) fn spec_from_json(value: serde_json::Value) -> Result<QueueSpec, QueueDefError> {
    let queue = value
        .get("name")
        .and_then(|n| n.as_str())
        .unwrap_or_default()
        .to_string();
    let e = match serde_json::from_value::<QueueSpec>(value.clone()) {
        Ok(spec) => return Ok(spec),
        Err(e) => e.to_string(),
    };
    let fail = |field: &str| QueueDefError {
        queue: queue.clone(),
        field: field.into(),
        message: e.clone(),
    };
    let serde_json::Value::Object(fields) = &value else {
        return Err(fail(""));
    };
    // "unknown field `nope`, expected ..." / "missing field `filter`"
    for prefix in ["unknown field `", "missing field `"] {
        if let Some(field) = e.strip_prefix(prefix).and_then(|r| r.split('`').next()) {
            return Err(fail(field));
        }
    }
    for (k, v) in fields {
        let mut alone = serde_json::Map::new();
        alone.insert("name".into(), "x".into());
        alone.insert("filter".into(), "x".into());
        alone.insert(k.clone(), v.clone());
        if serde_json::from_value::<QueueSpec>(alone.into()).is_err() {
            return Err(fail(k));
        }
    }
    Err(fail(""))
}

/// RFC 7396 JSON merge patch.
fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    let serde_json::Value::Object(changes) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = serde_json::Value::Object(Default::default());
    }
    if let serde_json::Value::Object(fields) = target {
        for (k, v) in changes {
            if v.is_null() {
                fields.remove(k);
            } else {
                merge_patch(
                    fields.entry(k.clone()).or_insert(serde_json::Value::Null),
                    v,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_merge_patch_merges_objects_removes_nulls_and_replaces_the_rest() {
        let mut v = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2]});
        merge_patch(
            &mut v,
            &json!({"b": {"c": null, "x": 9}, "e": [3], "a": null}),
        );
        assert_eq!(v, json!({"b": {"d": 3, "x": 9}, "e": [3]}));
    }

    #[test]
    fn a_patch_keeps_what_it_does_not_name_and_cannot_rename() {
        let mut def = ferrymq_core::workqueue::QueueDef::new("q", "a/#");
        def.max_messages = Some(10);
        let d =
            patched("q", &def, &json!({"max_attempts": 3, "max_messages": null})).expect("valid");
        assert_eq!((d.max_attempts, d.max_messages), (3, None));
        assert_eq!(d.filters, vec!["a/#".to_string()]);
        let e = patched("q", &def, &json!({"name": "r"})).expect_err("rename");
        assert!(
            matches!(e, QueueError::Invalid(ref f) if f.field == "name"),
            "{e:?}"
        );
        let e = patched("q", &def, &json!({"default_priority": "high"})).expect_err("type");
        assert!(
            matches!(e, QueueError::Invalid(ref f) if f.field == "default_priority"),
            "{e:?}"
        );
    }
}
