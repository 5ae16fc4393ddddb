//! `mqtt_publish`: queue a message in the outbox inside the caller's transaction.
//!
//! The row is the durable copy: it becomes visible to the worker only if the transaction
//! commits, and a commit callback wakes the worker at that moment, so there is neither a
//! polling delay nor a message from a rolled-back transaction (or savepoint: its row is gone).
//! The call itself only checks and queues (see `triggers::pending`): the rows of a statement
//! are written together when it ends, before the next statement can look at the outbox.

use pgrx::prelude::*;

use crate::api::broker;
use crate::errors::{self, INVALID_PARAMETER, PROGRAM_LIMIT};
use crate::security::access::{self, Operation};
use crate::triggers::pending;
use crate::{catalog, gucs};

/// Queue a text payload (sent as its UTF-8 bytes).
#[pg_extern(name = "mqtt_publish", volatile, parallel_unsafe)]
fn mqtt_publish_text(
    topic: Option<&str>,
    payload: Option<&str>,
    qos: default!(Option<i32>, 0),
    retain: default!(Option<bool>, false),
    broker: default!(Option<&str>, "NULL"),
) -> i64 {
    publish(topic, payload.map(str::as_bytes), qos, retain, broker)
}

/// Queue a binary payload, sent byte for byte.
#[pg_extern(name = "mqtt_publish", volatile, parallel_unsafe)]
fn mqtt_publish_bytea(
    topic: Option<&str>,
    payload: Option<&[u8]>,
    qos: default!(Option<i32>, 0),
    retain: default!(Option<bool>, false),
    broker: default!(Option<&str>, "NULL"),
) -> i64 {
    publish(topic, payload, qos, retain, broker)
}

/// Validate, then insert one outbox row and arrange the wake-up at commit.
pub fn publish(
    topic: Option<&str>,
    payload: Option<&[u8]>,
    qos: Option<i32>,
    retain: Option<bool>,
    broker: Option<&str>,
) -> i64 {
    let topic =
        topic.unwrap_or_else(|| errors::raise(INVALID_PARAMETER, "topic must not be NULL", None));
    if let Err(e) = mqtt_pg_core::topic::validate_topic(topic) {
        errors::bad_topic("topic", topic, &e);
    }
    let payload = payload.unwrap_or_else(|| {
        errors::raise(
            INVALID_PARAMETER,
            "payload must not be NULL",
            Some("Pass '' for an empty message (which, retained, clears the topic's retained message)."),
        )
    });
    let qos = errors::checked_qos(qos);
    let retain =
        retain.unwrap_or_else(|| errors::raise(INVALID_PARAMETER, "retain must not be NULL", None));
    let limit = gucs::max_payload_size();
    if payload.len() > limit {
        errors::raise(
            PROGRAM_LIMIT,
            format!(
                "MQTT payload of {} bytes exceeds mqtt_pg.max_payload_size ({limit} bytes)",
                payload.len()
            ),
            Some("Send a smaller payload, or raise mqtt_pg.max_payload_size (a superuser setting) if the broker accepts larger messages."),
        );
    }
    // The rule is the permission (see `security`): checked as the caller; the row is written
    // as the extension's owner, so the caller needs no privilege on mqtt_outbox.
    access::require(topic, Operation::Publish);
    let broker_id = broker::id_for_publish(broker);
    // Queued, not inserted: the statement's messages reach mqtt_outbox in one INSERT when it
    // ends (see `triggers::pending`), which is what makes a bulk publish cost about what an
    // INSERT ... SELECT of the same rows costs.
    pending::queue(
        catalog::installed_or_raise().outbox_seq,
        broker_id,
        topic.to_owned(),
        payload.to_vec(),
        qos as i16,
        retain,
    )
}
