//! Reading committed outbox rows for the engine.
//!
//! Rows are not marked when handed out (no write per message); the worker remembers the ids in
//! flight instead. Ids come from a sequence, so a transaction that commits late can reveal a
//! row below ids already sent; reading "the lowest ids not in flight" rather than "ids above a
//! watermark" picks those up too, in the order they became visible.

use mqtt_pg_core::engine::OutMessage;
use mqtt_pg_core::properties::MessageProperties;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::{PgBuiltInOids, PgOid};

/// Payload bytes one broker may have handed to its connection and not yet acknowledged: the
/// worker's memory must not follow the size of the messages queued (up to 256 MB each).
pub const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;

/// Up to `room` committed rows of one broker with ids above `floor` that are not in flight,
/// lowest id first, with payloads of at most `byte_room` bytes in all (but always at least one
/// row, however large). `above` counts the rows above `floor` that `is_taken` says are in
/// flight already (they are read and skipped). Also returns the highest id read and either
/// handed out or skipped as taken: every committed row up to it is now taken.
///
/// A row whose MQTT 5 message_expiry has run out while it waited (counted from `created_at`)
/// is not handed out but moved to `mqtt_dead_letter`, in this transaction (the worker's send
/// transaction), as is a row whose properties cannot be read (written into the table
/// directly). The others go with what is left of their expiry.
pub fn fetch(
    broker_id: i32,
    floor: i64,
    above: usize,
    is_taken: impl Fn(i64) -> bool,
    room: usize,
    byte_room: usize,
) -> (Vec<OutMessage>, i64) {
    // The lowest ids of one broker are an ordered scan of the index on (broker_id, id) that
    // stops after `limit` rows. Without fresh statistics (a new or truncated outbox, a backlog
    // built faster than autovacuum analyzes) the planner guesses few matching rows and picks a
    // bitmap scan plus sort, which reads the whole backlog for every batch: a million-row
    // backlog then drains at a few hundred messages a second. Sorting is never needed here.
    // A setting local to this transaction (the worker's send transaction).
    crate::gucs::set_local(c"enable_sort", c"off");
    let Some(installed) = crate::catalog::installed() else {
        return (Vec::new(), floor);
    };
    let schema = &installed.schema;
    let limit = (above + room) as i64;
    let arg = PgOid::BuiltIn;
    let types = [
        arg(PgBuiltInOids::INT4OID),
        arg(PgBuiltInOids::INT8OID),
        arg(PgBuiltInOids::INT8OID),
        arg(PgBuiltInOids::INT8OID),
    ];
    // One ordered index scan. The running sum keeps the batch within `byte_room` (a payload
    // is never detoasted to be measured, nor read at all when it is cut off or in flight).
    // `waited`: whole seconds since the row was queued, only for rows with properties (the
    // only ones it matters for), from the statement's clock.
    let sql = || {
        format!(
            "SELECT id, topic, payload, qos, retain, properties::pg_catalog.text, \
               CASE WHEN properties IS NOT NULL THEN pg_catalog.floor(pg_catalog.date_part('epoch', \
                 pg_catalog.statement_timestamp() OPERATOR(pg_catalog.-) created_at))::pg_catalog.int8 END \
             FROM ( \
               SELECT id, topic, payload, qos, retain, properties, created_at, \
                 pg_catalog.octet_length(payload) AS len, \
                 pg_catalog.sum(pg_catalog.octet_length(payload)) \
                   OVER (ORDER BY broker_id, id ROWS UNBOUNDED PRECEDING) AS upto \
               FROM {schema}.mqtt_outbox \
               WHERE broker_id OPERATOR(pg_catalog.=) $1 AND id OPERATOR(pg_catalog.>) $2 \
               ORDER BY broker_id, id LIMIT $3) x \
             WHERE x.upto OPERATOR(pg_catalog.-) x.len OPERATOR(pg_catalog.<) $4"
        )
    };
    Spi::connect_mut(|client| {
        crate::plans::with_plan(
            client,
            installed.oid,
            "outbox_fetch_v2",
            &types,
            sql,
            |client, stmt| {
                let rows = client.select(
                    stmt,
                    None,
                    &[
                        broker_id.into(),
                        floor.into(),
                        limit.into(),
                        (byte_room as i64).into(),
                    ],
                );
                let mut messages = Vec::new();
                let mut dead: Vec<(i64, String)> = Vec::new();
                let mut consumed = floor;
                if let Ok(rows) = rows {
                    for r in rows {
                        let Some(id) = r.get::<i64>(1).ok().flatten() else {
                            continue;
                        };
                        consumed = consumed.max(id);
                        if is_taken(id) {
                            continue;
                        }
                        if messages.len() >= room {
                            consumed = messages.last().map_or(floor, |m: &OutMessage| m.outbox_id);
                            break;
                        }
                        let (Some(topic), Some(payload), Some(qos), Some(retain)) = (
                            r.get::<String>(2).ok().flatten(),
                            r.get::<Vec<u8>>(3).ok().flatten(),
                            r.get::<i16>(4).ok().flatten(),
                            r.get::<bool>(5).ok().flatten(),
                        ) else {
                            continue;
                        };
                        let waited = r.get::<i64>(7).ok().flatten().unwrap_or(0).max(0) as u64;
                        let properties = match r.get::<String>(6).ok().flatten() {
                            None => None,
                            Some(text) => match MessageProperties::from_json_text(&text)
                                .map_err(|e| format!("invalid properties in mqtt_outbox: {e}"))
                                .and_then(|p| p.aged(waited))
                            {
                                Ok(p) => (!p.is_empty()).then_some(p),
                                Err(e) => {
                                    dead.push((id, e));
                                    continue;
                                }
                            },
                        };
                        messages.push(OutMessage {
                            outbox_id: id,
                            topic,
                            payload,
                            qos: qos.clamp(0, 2) as u8,
                            retain,
                            properties,
                        });
                    }
                }
                if !dead.is_empty() {
                    // In a subtransaction: a trigger someone put on mqtt_dead_letter must not
                    // take the send transaction (and the worker) down with it. The rows are
                    // then left where they are, unsent, and not counted as read, so the next
                    // fetch tries again.
                    if let Err(f) = super::subxact::run(|| dead_letter(client, schema, &dead)) {
                        let first = dead.iter().map(|d| d.0).min().unwrap_or(floor + 1);
                        consumed = consumed.min(first - 1);
                        warning!(
                            "mqtt_pg could not move {} expired or unreadable messages from mqtt_outbox to mqtt_dead_letter: {}",
                            dead.len(),
                            f.message
                        );
                    }
                }
                (messages, consumed)
            },
        )
    })
}

/// Move outbox rows whose broker id no broker has to `mqtt_dead_letter`. The outbox has no
/// foreign key (see schema.sql): mqtt_pg's own writers lock the broker row, but a row written
/// directly into the table may name any id, and would otherwise wait there for ever. Finding
/// the ids takes one index probe per distinct broker id, not a scan of the outbox.
pub fn set_aside_orphans(schema: &str) {
    let result = Spi::connect_mut(|client| {
        client.update(
            &format!(
                "WITH RECURSIVE ids(id) AS ( \
                   (SELECT broker_id FROM {schema}.mqtt_outbox ORDER BY broker_id LIMIT 1) \
                   UNION ALL \
                   SELECT (SELECT o.broker_id FROM {schema}.mqtt_outbox o \
                           WHERE o.broker_id OPERATOR(pg_catalog.>) ids.id ORDER BY o.broker_id LIMIT 1) \
                   FROM ids WHERE ids.id IS NOT NULL), \
                 orphans AS (SELECT id FROM ids WHERE id IS NOT NULL AND NOT EXISTS ( \
                   SELECT FROM {schema}.mqtt_broker b WHERE b.id OPERATOR(pg_catalog.=) ids.id)), \
                 d AS (DELETE FROM {schema}.mqtt_outbox o USING orphans x \
                   WHERE o.broker_id OPERATOR(pg_catalog.=) x.id RETURNING o.*) \
                 INSERT INTO {schema}.mqtt_dead_letter (broker_id, topic, payload, qos, retain, direction, error, properties) \
                 SELECT broker_id, topic, payload, qos, retain, 'send', \
                   'no MQTT broker has id ' OPERATOR(pg_catalog.||) broker_id \
                   OPERATOR(pg_catalog.||) ' (the row was written into mqtt_outbox directly)', \
                   properties \
                 FROM d ORDER BY id"
            ),
            None,
            &[],
        )
        .map(|t| t.len())
    });
    match result {
        Ok(0) => {}
        Ok(n) => log!("mqtt_pg moved {n} messages for brokers that do not exist from mqtt_outbox to mqtt_dead_letter"),
        Err(e) => warning!("mqtt_pg could not check mqtt_outbox for messages of missing brokers: {e}"),
    }
}

/// Move outbox rows to `mqtt_dead_letter` with an error each, properties and all: rows the
/// broker refused (MQTT 5 reason codes), rows expired while they waited. One statement.
pub fn dead_letter(client: &mut SpiClient<'_>, schema: &str, rows: &[(i64, String)]) {
    let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
    let reasons: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    let result = client.update(
        &format!(
            "WITH d AS (DELETE FROM {schema}.mqtt_outbox o \
               USING ROWS FROM (pg_catalog.unnest($1::pg_catalog.int8[]), pg_catalog.unnest($2::pg_catalog.text[])) AS u(id, error) \
               WHERE o.id OPERATOR(pg_catalog.=) u.id \
               RETURNING o.*, u.error) \
             INSERT INTO {schema}.mqtt_dead_letter \
               (broker_id, topic, payload, qos, retain, direction, error, properties) \
             SELECT broker_id, topic, payload, qos, retain, 'send', error, properties FROM d ORDER BY id"
        ),
        None,
        &[ids.into(), reasons.into()],
    );
    if let Err(e) = result {
        error!("mqtt_pg could not move messages from mqtt_outbox to mqtt_dead_letter: {e}");
    }
}
