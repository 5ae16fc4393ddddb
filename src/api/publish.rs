//! `mqtt_publish`: queue a message in the outbox inside the caller's transaction.
//!
//! The row is the durable copy: it becomes visible to the worker only if the transaction
//! commits, and a commit callback wakes the worker at that moment, so there is neither a
//! polling delay nor a message from a rolled-back transaction (or savepoint: its row is gone).
//! The call itself only checks and queues (see `triggers::pending`): the rows of a statement
//! are written together when it ends, before the next statement can look at the outbox.

use mqtt_pg_core::properties::{MessageProperties, PayloadFormat};
use pgrx::callconv::{Arg, ArgAbi};
use pgrx::prelude::*;
use pgrx::{FromDatum, PgBuiltInOids, PgOid};

use crate::api::broker;
use crate::errors::{self, INVALID_PARAMETER, PROGRAM_LIMIT};
use crate::security::access::{self, Operation};
use crate::triggers::pending;
use crate::{catalog, gucs};

/// Queue a text payload (sent as its UTF-8 bytes), with MQTT 5 properties.
///
/// The Rust names (and so the C symbols, `<name>_wrapper`) of the forms with `properties` are
/// new: SQL of an earlier version points at the old symbols with five arguments, and between
/// installing this library and `ALTER EXTENSION mqtt_pg UPDATE` those must still take five
/// (and refuse with the version gate's 55000), not read a sixth that is not there.
#[pg_extern(name = "mqtt_publish", volatile, parallel_unsafe)]
fn mqtt_publish_text_properties(
    topic: Option<&str>,
    payload: Option<&str>,
    qos: default!(Option<i32>, 0),
    retain: default!(Option<bool>, false),
    broker: default!(Option<&str>, "NULL"),
    properties: default!(Option<JsonbText>, "NULL"),
) -> i64 {
    publish(
        topic,
        payload.map(str::as_bytes),
        qos,
        retain,
        broker,
        properties.as_ref().map(|p| p.0.as_str()),
    )
}

/// Queue a binary payload, sent byte for byte, with MQTT 5 properties.
#[pg_extern(name = "mqtt_publish", volatile, parallel_unsafe)]
fn mqtt_publish_bytea_properties(
    topic: Option<&str>,
    payload: Option<&[u8]>,
    qos: default!(Option<i32>, 0),
    retain: default!(Option<bool>, false),
    broker: default!(Option<&str>, "NULL"),
    properties: default!(Option<JsonbText>, "NULL"),
) -> i64 {
    publish(
        topic,
        payload,
        qos,
        retain,
        broker,
        properties.as_ref().map(|p| p.0.as_str()),
    )
}

/// The symbol 0.2.0's `mqtt_publish(text, text, integer, boolean, text)` calls; no SQL of
/// this version declares it (see `mqtt_publish_text_properties`).
#[pg_extern(sql = false)]
fn mqtt_publish_text(
    topic: Option<&str>,
    payload: Option<&str>,
    qos: Option<i32>,
    retain: Option<bool>,
    broker: Option<&str>,
) -> i64 {
    publish(topic, payload.map(str::as_bytes), qos, retain, broker, None)
}

/// The symbol 0.2.0's `mqtt_publish(text, bytea, integer, boolean, text)` calls.
#[pg_extern(sql = false)]
fn mqtt_publish_bytea(
    topic: Option<&str>,
    payload: Option<&[u8]>,
    qos: Option<i32>,
    retain: Option<bool>,
    broker: Option<&str>,
) -> i64 {
    publish(topic, payload, qos, retain, broker, None)
}

/// A jsonb argument as its text. pgrx's own `JsonB` parses the text with serde_json and panics
/// (XX000) on what jsonb holds but serde_json refuses: numbers beyond f64 (`1e400`), nesting
/// deeper than 128. Kept as text, such input reaches `MessageProperties::from_json_text`,
/// whose error is a 22023 like any other bad property.
pub struct JsonbText(pub String);

impl FromDatum for JsonbText {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<JsonbText> {
        if is_null {
            return None;
        }
        // SAFETY: the datum is a jsonb (the argument's declared type); jsonb_out detoasts it
        // and returns a palloc'd C string, freed once copied.
        unsafe {
            let out =
                pgrx::fcinfo::direct_function_call_as_datum(pg_sys::jsonb_out, &[Some(datum)])?;
            let cstr = std::ffi::CStr::from_ptr(out.cast_mut_ptr::<std::ffi::c_char>());
            let text = cstr.to_string_lossy().into_owned();
            pg_sys::pfree(out.cast_mut_ptr());
            Some(JsonbText(text))
        }
    }
}

// SAFETY: unboxed through FromDatum above, for an argument declared jsonb.
unsafe impl<'fcx> ArgAbi<'fcx> for JsonbText {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        // SAFETY: pgrx calls this for non-NULL arguments of the declared type only.
        unsafe { arg.unbox_arg_using_from_datum() }
            .unwrap_or_else(|| panic!("argument {index} must not be null"))
    }
}

pgrx::impl_sql_translatable!(JsonbText, arg_only = "jsonb");

/// The `properties` argument checked against the payload: None when absent or empty (NULL,
/// `{}`), else the properties, or 22023 naming what is wrong.
fn checked_properties(properties: Option<&str>, payload: &[u8]) -> Option<MessageProperties> {
    let p = MessageProperties::from_json_text(properties?).unwrap_or_else(|e| {
        errors::raise(
            INVALID_PARAMETER,
            format!("invalid MQTT properties: {e}"),
            Some("Keys: content_type, payload_format ('bytes' or 'utf8'), message_expiry (seconds), response_topic, correlation_data (hex), user_properties ([[name, value], ...])."),
        )
    });
    if p.payload_format == Some(PayloadFormat::Utf8) && std::str::from_utf8(payload).is_err() {
        errors::raise(
            INVALID_PARAMETER,
            "payload_format is \"utf8\" but the payload is not valid UTF-8",
            Some("Send it with payload_format \"bytes\" (or none), or fix the payload's encoding."),
        );
    }
    (!p.is_empty()).then_some(p)
}

/// Properties need MQTT 5: a 3.1.1 connection would drop them without a word, and a reply
/// awaited by correlation data would never come.
fn require_v5(broker_id: i32, broker: Option<&str>) {
    // Looked up once per statement and broker, as the broker itself is (see
    // `broker::id_for_publish`): a bulk publish with properties pays one look-up, not one a row.
    let now = catalog::stamp();
    if V5_CHECKED.get() == Some((now, broker_id)) {
        return;
    }
    let installed = catalog::installed_or_raise();
    let schema = &installed.schema;
    // As the extension's owner, as the broker was resolved: publishing needs no privilege on
    // mqtt_broker.
    let version = crate::security::as_extension_owner(|| {
        Spi::connect_mut(|client| {
            let sql = || {
                format!(
                    "SELECT protocol_version FROM {schema}.mqtt_broker WHERE id OPERATOR(pg_catalog.=) $1"
                )
            };
            crate::plans::with_plan(
                client,
                installed.oid,
                "broker_protocol",
                &[PgOid::BuiltIn(PgBuiltInOids::INT4OID)],
                sql,
                |client, stmt| {
                    client
                        .select(stmt, Some(1), &[broker_id.into()])
                        .ok()
                        .and_then(|t| t.first().get_one::<String>().ok().flatten())
                },
            )
        })
    });
    if version.as_deref() != Some("5") {
        let shown = broker.map_or_else(
            || "the default broker".to_string(),
            |b| format!("broker \"{b}\""),
        );
        errors::raise(
            INVALID_PARAMETER,
            format!(
                "MQTT properties need MQTT 5, but {shown} uses protocol_version {}",
                version.as_deref().unwrap_or("3.1.1")
            ),
            Some("Set mqtt_broker.protocol_version to '5' for the broker (UPDATE mqtt_broker SET protocol_version = '5' WHERE name = ...), or publish without properties."),
        );
    }
    V5_CHECKED.set(Some((now, broker_id)));
}

thread_local! {
    /// The broker last found to speak MQTT 5, and the statement that found it.
    static V5_CHECKED: std::cell::Cell<Option<(catalog::Stamp, i32)>> =
        const { std::cell::Cell::new(None) };
}

/// Validate, then insert one outbox row and arrange the wake-up at commit.
pub fn publish(
    topic: Option<&str>,
    payload: Option<&[u8]>,
    qos: Option<i32>,
    retain: Option<bool>,
    broker: Option<&str>,
    properties: Option<&str>,
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
    let properties = checked_properties(properties, payload);
    // Properties travel in the same packet: with the default limit (MQTT's packet ceiling)
    // a payload just under it plus properties would be a packet no broker accepts.
    let props_len = properties.as_ref().map_or(0, |p| p.encoded_len());
    let limit = gucs::max_payload_size();
    if payload.len() + props_len > limit {
        let what = if props_len > 0 {
            format!(
                "MQTT payload of {} bytes with {props_len} bytes of properties",
                payload.len()
            )
        } else {
            format!("MQTT payload of {} bytes", payload.len())
        };
        errors::raise(
            PROGRAM_LIMIT,
            format!("{what} exceeds mqtt_pg.max_payload_size ({limit} bytes)"),
            Some("Send a smaller payload, or raise mqtt_pg.max_payload_size (a superuser setting) if the broker accepts larger messages."),
        );
    }
    // The rule is the permission (see `security`): checked as the caller; the row is written
    // as the extension's owner, so the caller needs no privilege on mqtt_outbox.
    access::require(topic, Operation::Publish);
    let broker_id = broker::id_for_publish(broker);
    if properties.is_some() {
        require_v5(broker_id, broker);
    }
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
        properties.and_then(|p| p.to_json_text()),
    )
}
