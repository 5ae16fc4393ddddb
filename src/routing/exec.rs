//! Running routes for stored messages: per subscription one set-based statement per step and
//! batch (target table rows, handler calls, notifications), never one statement per message.

use mqtt_pg_core::route::{filled_columns, json_rows};
use pgrx::prelude::*;
use pgrx::spi::{quote_identifier, SpiClient};

use super::{Route, Target};
use crate::security;
use crate::worker::subxact;

/// A received message as stored in `mqtt_message_history`.
pub struct Msg<'a> {
    pub id: i64,
    pub broker_id: i32,
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: i16,
    pub retain: bool,
    pub message_id: Option<i32>,
    pub at_us: i64,
    /// MQTT 5 properties as JSON text, None when the message had none.
    pub properties: Option<String>,
}

/// Handlers and everything else a route runs see the search path a new session of their role
/// gets by default, not the worker's, with pg_temp named last: left out, it would be searched
/// first, and a requeue runs in the caller's session, whose temporary tables would stand in
/// for the handler's own.
const USER_SEARCH_PATH: &std::ffi::CStr = c"\"$user\", public, pg_temp";

/// Can `m` go to every target table among `routes`? The reason if not, naming the route.
pub fn shape_check(routes: &[&Route], m: &Msg<'_>) -> Result<(), String> {
    for r in routes {
        if let Some(Ok(t)) = &r.target {
            if let Err(e) = json_rows(m.payload) {
                return Err(format!("{}: target table {}: {e}", r.describe(), t.sql));
            }
        }
    }
    Ok(())
}

fn permanent_error(code: PgSqlErrorCode, message: String) -> ! {
    ereport!(PgLogLevel::ERROR, code, message);
    unreachable!("ERROR does not return")
}

/// Route each message to the routes it matched. With `describe`, every step runs in its own
/// subtransaction and an error names the subscription and the step (used to pin a failing
/// message down; a batch that fails is split by the caller until it is one message).
pub fn route(
    client: &mut SpiClient<'_>,
    schema: &str,
    msgs: &[(Msg<'_>, Vec<&Route>)],
    describe: bool,
) {
    // Messages per route, in arrival order, each route once.
    let mut by_route: Vec<(&Route, Vec<&Msg<'_>>)> = Vec::new();
    for (m, routes) in msgs {
        for r in routes {
            match by_route.iter_mut().find(|(x, _)| x.topic_id == r.topic_id) {
                Some((_, ms)) => ms.push(m),
                None => by_route.push((r, vec![m])),
            }
        }
    }
    for (r, ms) in by_route {
        let owner = match &r.owner {
            Ok(o) => *o,
            Err(e) => permanent_error(
                PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                format!("{}: {e}", r.describe()),
            ),
        };
        if security::is_superuser(owner) {
            // Refused when configured (see check); a role can have become one since.
            permanent_error(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!(
                    "{}: its owner_role is a superuser, and routing never runs as one",
                    r.describe()
                ),
            );
        }
        security::as_role(owner, USER_SEARCH_PATH, || {
            if let Some(t) = &r.target {
                let what = match t {
                    Ok(t) => format!("target table {}", t.sql),
                    Err(_) => "target table".to_string(),
                };
                step(describe, r, &what, || match t {
                    Ok(t) => target(client, r, t, &ms),
                    Err(e) => permanent_error(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE, e.clone()),
                });
            }
            if let Some(h) = &r.handler {
                step(describe, r, "handler", || match h {
                    Ok(h) => handler(client, schema, h, &ms),
                    Err(e) => {
                        permanent_error(PgSqlErrorCode::ERRCODE_UNDEFINED_FUNCTION, e.clone())
                    }
                });
            }
            if let Some(channel) = &r.notify {
                step(describe, r, "notify channel", || {
                    notify(client, channel, &ms)
                });
            }
        });
    }
}

fn step(describe: bool, r: &Route, what: &str, f: impl FnOnce()) {
    if !describe {
        return f();
    }
    if let Err(e) = subxact::run(f) {
        ereport!(
            PgLogLevel::ERROR,
            e.code,
            format!("{}: {what}: {}", r.describe(), e.message)
        );
    }
}

/// The columns of `table` an INSERT may name (not dropped, generated or GENERATED ALWAYS).
fn insertable_columns(client: &SpiClient<'_>, table: pg_sys::Oid) -> Vec<String> {
    client
        .select(
            "SELECT a.attname::pg_catalog.text FROM pg_catalog.pg_attribute a \
             WHERE a.attrelid OPERATOR(pg_catalog.=) $1 AND a.attnum OPERATOR(pg_catalog.>) 0 \
               AND NOT a.attisdropped AND a.attgenerated OPERATOR(pg_catalog.=) '' \
               AND a.attidentity OPERATOR(pg_catalog.<>) 'a' ORDER BY a.attnum",
            None,
            &[table.into()],
        )
        .map(|rows| {
            rows.filter_map(|r| r.get::<String>(1).ok().flatten())
                .collect()
        })
        .unwrap_or_default()
}

/// Rows going into the target table with the same columns: one INSERT.
#[derive(Default)]
struct Group {
    /// Each row's object with the topic's named levels, `topic` and `received_at` laid over it
    /// (`mqtt_pg_core::route::overlay`).
    docs: Vec<String>,
    ord: Vec<i64>,
}

fn target(client: &mut SpiClient<'_>, r: &Route, t: &Target, ms: &[&Msg<'_>]) {
    let cols = insertable_columns(client, t.oid);
    let mut extra: Vec<&str> = r.filter.names.iter().map(|(_, n)| n.as_str()).collect();
    extra.extend(["topic", "received_at"]);
    let mut groups: Vec<(Vec<usize>, Group)> = Vec::new();
    for (ord, m) in ms.iter().enumerate() {
        let rows = json_rows(m.payload).unwrap_or_else(|e| {
            permanent_error(PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION, e)
        });
        let received_at = mqtt_pg_core::utc::rfc3339_micros(m.at_us);
        let mut over: Vec<(&str, &str)> = r.filter.values(m.topic);
        over.push(("topic", m.topic));
        over.push(("received_at", &received_at));
        for row in rows {
            let filled = filled_columns(&cols, &row.keys, &extra);
            let g = match groups.iter().position(|(f, _)| *f == filled) {
                Some(i) => &mut groups[i].1,
                None => {
                    groups.push((filled, Group::default()));
                    &mut groups.last_mut().expect("just pushed").1
                }
            };
            g.docs.push(mqtt_pg_core::route::overlay(row.text, &over));
            g.ord.push(ord as i64);
        }
    }
    for (filled, g) in groups {
        let sql = insert_sql(&t.sql, &cols, &filled, &r.conflict);
        if let Err(e) = client.update(&sql, None, &[g.docs.into(), g.ord.into()]) {
            permanent_error(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, e.to_string());
        }
    }
}

/// One INSERT for a group of rows with the same columns: each JSON object, with the topic's
/// named levels, `topic` and `received_at` laid over it (in Rust, see `Group`), through
/// jsonb_populate_record (which
/// converts every value with its column type's input function). With conflict columns an
/// upsert, keeping the latest row per key from the batch (ON CONFLICT may not touch one row
/// twice in a statement).
fn insert_sql(table: &str, cols: &[String], filled: &[usize], conflict: &[String]) -> String {
    let q: Vec<String> = filled.iter().map(|i| quote_identifier(&cols[*i])).collect();
    let from = format!(
        "FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]), pg_catalog.unnest($2::pg_catalog.int8[])) \
           AS u(doc, ord), \
         LATERAL pg_catalog.jsonb_populate_record(NULL::{table}, u.doc::pg_catalog.jsonb) AS r"
    );
    if q.is_empty() {
        return format!("INSERT INTO {table} SELECT {from}");
    }
    let list = q.join(", ");
    let select: Vec<String> = q.iter().map(|c| format!("r.{c}")).collect();
    let select = select.join(", ");
    if conflict.is_empty() {
        return format!("INSERT INTO {table} ({list}) SELECT {select} {from} ORDER BY u.ord");
    }
    let keys: Vec<String> = conflict.iter().map(quote_identifier).collect();
    let rkeys: Vec<String> = keys.iter().map(|k| format!("r.{k}")).collect();
    let set: Vec<String> = q
        .iter()
        .filter(|c| !keys.contains(c))
        .map(|c| format!("{c} = EXCLUDED.{c}"))
        .collect();
    let action = if set.is_empty() {
        "DO NOTHING".to_string()
    } else {
        format!("DO UPDATE SET {}", set.join(", "))
    };
    format!(
        "INSERT INTO {table} ({list}) SELECT DISTINCT ON ({rk}) {select} {from} \
         ORDER BY {rk}, u.ord DESC ON CONFLICT ({k}) {action}",
        rk = rkeys.join(", "),
        k = keys.join(", "),
    )
}

/// Call the handler once per message, in order, with the message's history row.
fn handler(client: &mut SpiClient<'_>, schema: &str, h: &str, ms: &[&Msg<'_>]) {
    // The function is called by name: checked again right before, in case the owner of its
    // schema has dropped it and made one of the same name since the routes were loaded (that
    // one would run as the subscription's role). It must belong to that role, a role it is a
    // member of, or a superuser.
    let trusted = client
        .select(
            "SELECT pg_catalog.pg_has_role(p.proowner, 'USAGE') OR o.rolsuper \
             FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_roles o ON o.oid OPERATOR(pg_catalog.=) p.proowner \
             WHERE p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure($1)",
            Some(1),
            &[format!("{h}({schema}.mqtt_message_history)").into()],
        )
        .ok()
        .and_then(|t| t.first().get_one::<bool>().ok().flatten())
        .unwrap_or(false);
    if !trusted {
        permanent_error(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "its handler {h} is gone, or now belongs to a role that the subscription's role does \
                 not act as (replaced by its schema's owner?); configure the subscription again"
            ),
        );
    }
    // The row is built from the values, not read from the table: the role the handler runs
    // as needs no privilege on mqtt_message_history. Columns in the table's order.
    let sql = format!(
        "SELECT {h}(ROW(u.id, u.broker_id, u.topic, u.payload, u.qos, u.retain, 'receive', u.message_id, \
           'epoch'::pg_catalog.timestamptz OPERATOR(pg_catalog.+) \
           (u.at::pg_catalog.float8 OPERATOR(pg_catalog.*) '1 microsecond'::pg_catalog.interval), \
           u.properties::pg_catalog.jsonb \
         )::{schema}.mqtt_message_history) \
         FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.int8[]), pg_catalog.unnest($2::pg_catalog.int4[]), \
           pg_catalog.unnest($3::pg_catalog.text[]), pg_catalog.unnest($4::pg_catalog.bytea[]), \
           pg_catalog.unnest($5::pg_catalog.int2[]), pg_catalog.unnest($6::pg_catalog.bool[]), \
           pg_catalog.unnest($7::pg_catalog.int4[]), pg_catalog.unnest($8::pg_catalog.int8[]), \
           pg_catalog.unnest($9::pg_catalog.text[])) \
           AS u(id, broker_id, topic, payload, qos, retain, message_id, at, properties)"
    );
    let ids: Vec<i64> = ms.iter().map(|m| m.id).collect();
    let brokers: Vec<i32> = ms.iter().map(|m| m.broker_id).collect();
    let topics: Vec<&str> = ms.iter().map(|m| m.topic).collect();
    let payloads: Vec<&[u8]> = ms.iter().map(|m| m.payload).collect();
    let qos: Vec<i16> = ms.iter().map(|m| m.qos).collect();
    let retain: Vec<bool> = ms.iter().map(|m| m.retain).collect();
    let mids: Vec<Option<i32>> = ms.iter().map(|m| m.message_id).collect();
    let at: Vec<i64> = ms.iter().map(|m| m.at_us).collect();
    let properties: Vec<Option<&str>> = ms.iter().map(|m| m.properties.as_deref()).collect();
    if let Err(e) = client.update(
        &sql,
        None,
        &[
            ids.into(),
            brokers.into(),
            topics.into(),
            payloads.into(),
            qos.into(),
            retain.into(),
            mids.into(),
            at.into(),
            properties.into(),
        ],
    ) {
        permanent_error(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, e.to_string());
    }
}

/// NOTIFY payloads are limited to 8,000 bytes; a topic that would not fit is left out.
const NOTIFY_MAX: usize = 7_999;

fn notify(client: &mut SpiClient<'_>, channel: &str, ms: &[&Msg<'_>]) {
    let notes: Vec<String> = ms
        .iter()
        .map(|m| {
            let full = serde_json::json!({"id": m.id, "topic": m.topic}).to_string();
            if full.len() <= NOTIFY_MAX {
                full
            } else {
                serde_json::json!({"id": m.id}).to_string()
            }
        })
        .collect();
    if let Err(e) = client.update(
        "SELECT pg_catalog.pg_notify($1, n) FROM pg_catalog.unnest($2::pg_catalog.text[]) AS n",
        None,
        &[channel.into(), notes.into()],
    ) {
        permanent_error(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, e.to_string());
    }
}
