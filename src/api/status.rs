//! `mqtt_status(broker)` and the view `mqtt_broker_status` built on it: what a DBA polls.
//!
//! Live figures (state, counters, rates, last messages) come from shared memory, where the
//! worker keeps them as batches commit; the outbox and dead-letter figures from their tables.
//! Both must stay cheap with a million rows queued and a million in history, polled every few
//! seconds: no `count(*)` over a table. Queued and dead-lettered rows are counted exactly up to
//! [`EXACT_UP_TO`] through the `(broker_id, id)` indexes, and estimated above that; the oldest
//! queued row is the first entry of the same index.

use mqtt_pg_core::utc::rfc3339_micros;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;
use serde_json::{json, Value};

use crate::api::broker;
use crate::api::listener::client_id_for;
use crate::shmem::{self, DbState, SHARED};
use crate::{catalog, errors};

/// Rows counted one by one before the figure becomes an estimate.
const EXACT_UP_TO: i64 = 10_000;

fn ts(us: i64) -> Value {
    if us <= 0 {
        return Value::Null;
    }
    Value::String(rfc3339_micros(us))
}

/// The broker's connection state, counters, rates, queue and dead letters, as JSON. Keys:
/// see README.md (mqtt_status and mqtt_broker_status).
#[pg_extern(stable)]
fn mqtt_status(broker: default!(Option<&str>, "NULL")) -> JsonB {
    let schema = catalog::schema();
    let (b, active, configured, tables) = Spi::connect(|client| {
        let b = broker::resolve(client, &schema, broker);
        let row = client
            .select(
                &format!(
                    "SELECT active, client_id FROM {schema}.mqtt_broker WHERE id OPERATOR(pg_catalog.=) $1"
                ),
                Some(1),
                &[b.id.into()],
            )
            .unwrap_or_else(|e| errors::raise(errors::UNDEFINED_OBJECT, e.to_string(), None));
        let row = row.first();
        let (active, configured) = row.get_two::<bool, String>().unwrap_or((None, None));
        let tables = queue_figures(client, &schema, b.id);
        (b, active.unwrap_or(false), configured, tables)
    });

    // SAFETY: MyDatabaseId is set in every backend connected to a database.
    let dboid = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let (worker, pid, slot) = {
        let shared = SHARED.share();
        match shared.db(dboid) {
            Some(d) => (Some(d.state), d.pid, d.broker(b.id).copied()),
            None => (None, 0, None),
        }
    };
    let worker_running = worker == Some(DbState::Running);
    let status = match (active, &slot) {
        (false, _) => "stopped",
        (true, Some(s)) if worker_running => s.state.as_str(),
        (true, _) => "connecting",
    };
    let now = shmem::now_us();
    let second = now.div_euclid(1_000_000);
    let mut out = json!({
        "status": status,
        "broker": b.name,
        "broker_id": b.id,
        "active": active,
        "client_id": client_id_for(b.id, configured),
        "worker": if worker_running { "running" } else { "not running" },
        "worker_pid": if worker_running && pid > 0 { json!(pid) } else { Value::Null },
        "outbox_depth": tables.outbox_depth,
        "outbox_depth_exact": tables.outbox_depth_exact,
        "outbox_oldest_at": tables.outbox_oldest_at.map(Value::String).unwrap_or(Value::Null),
        "outbox_oldest_age_s": tables.outbox_oldest_age_s,
        "dead_letters": tables.dead_letters,
        "dead_letters_exact": tables.dead_letters_exact,
        "since": Value::Null,
        "last_error": Value::Null,
        "last_error_at": Value::Null,
        "reconnects": 0,
        "messages_received": 0,
        "messages_sent": 0,
        "bytes_received": 0,
        "bytes_sent": 0,
        "received_per_second": 0.0,
        "sent_per_second": 0.0,
        "last_received_at": Value::Null,
        "last_sent_at": Value::Null,
    });
    if let Some(s) = slot {
        out["since"] = ts(s.since_us);
        out["last_error"] = s
            .last_error()
            .map(|e| Value::String(e.into()))
            .unwrap_or(Value::Null);
        out["last_error_at"] = ts(s.last_error_at_us);
        out["reconnects"] = json!(s.reconnects);
        out["messages_received"] = json!(s.received);
        out["messages_sent"] = json!(s.sent);
        out["bytes_received"] = json!(s.received_bytes);
        out["bytes_sent"] = json!(s.sent_bytes);
        out["received_per_second"] = json!(s.received_rate.per_second(second));
        out["sent_per_second"] = json!(s.sent_rate.per_second(second));
        out["last_received_at"] = ts(s.last_received_us);
        out["last_sent_at"] = ts(s.last_sent_us);
    }
    JsonB(out)
}

/// What the outbox and the dead letters hold for one broker.
struct QueueFigures {
    outbox_depth: i64,
    outbox_depth_exact: bool,
    outbox_oldest_at: Option<String>,
    outbox_oldest_age_s: Option<f64>,
    dead_letters: i64,
    dead_letters_exact: bool,
}

/// Read as the extension's owner: a monitoring role that may read the broker row (checked by
/// `resolve` above, as the caller) learns how many messages wait and how old the oldest is,
/// without the right to read their payloads.
fn queue_figures(client: &SpiClient<'_>, schema: &str, broker_id: i32) -> QueueFigures {
    crate::security::as_extension_owner(|| {
        index_scans_only(|| read_queue_figures(client, schema, broker_id))
    })
}

/// Run `f` with the planner held to index scans, as a function's SET clauses would (settings
/// back as they were afterwards). Every query here has an index that answers it in a few
/// entries; but right after a bulk publish the table has no statistics yet, and the planner
/// then guesses a small table and picks a sequential scan, or a sort, over a million rows.
fn index_scans_only<R>(f: impl FnOnce() -> R) -> R {
    crate::gucs::with_settings(
        &[
            (c"enable_seqscan", c"off"),
            (c"enable_sort", c"off"),
            (c"enable_bitmapscan", c"off"),
        ],
        f,
    )
}

fn read_queue_figures(client: &SpiClient<'_>, schema: &str, broker_id: i32) -> QueueFigures {
    let (outbox_depth, outbox_depth_exact) =
        bounded_count(client, schema, "mqtt_outbox", broker_id);
    let (dead_letters, dead_letters_exact) =
        bounded_count(client, schema, "mqtt_dead_letter", broker_id);
    // The first index entry of the broker is its oldest queued row.
    let oldest = client
        .select(
            &format!(
                "SELECT pg_catalog.to_char(o.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
                   EXTRACT(epoch FROM pg_catalog.now() OPERATOR(pg_catalog.-) o.created_at)::pg_catalog.float8 \
                 FROM {schema}.mqtt_outbox o WHERE o.broker_id OPERATOR(pg_catalog.=) $1 \
                 ORDER BY o.broker_id, o.id LIMIT 1"
            ),
            Some(1),
            &[broker_id.into()],
        )
        .ok()
        .filter(|t| !t.is_empty())
        .and_then(|t| t.first().get_two::<String, f64>().ok());
    let (outbox_oldest_at, outbox_oldest_age_s) = oldest.unwrap_or((None, None));
    QueueFigures {
        outbox_depth,
        outbox_depth_exact,
        outbox_oldest_at,
        outbox_oldest_age_s: outbox_oldest_age_s.map(|a| a.max(0.0)),
        dead_letters,
        dead_letters_exact,
    }
}

/// The broker's rows in `table` (which has an index on (broker_id, id)): exact up to
/// EXACT_UP_TO, read off the index; above that an estimate, and false. The estimate is the
/// broker's share (ANALYZE's most common values) of the rows ANALYZE counted (reltuples, which
/// agrees with those shares; the live-row counter can count a bulk insert twice around an
/// ANALYZE) when there are statistics, else the span of the broker's ids (exact for one busy broker
/// whose ids are dense) bounded by the table's live rows; never above that span, nor below
/// EXACT_UP_TO.
fn bounded_count(client: &SpiClient<'_>, schema: &str, table: &str, broker_id: i32) -> (i64, bool) {
    let sql = format!(
        "WITH b AS (SELECT pg_catalog.count(*) AS n FROM \
                      (SELECT FROM {schema}.{table} t WHERE t.broker_id OPERATOR(pg_catalog.=) $1 \
                       LIMIT $2 OPERATOR(pg_catalog.+) 1) s) \
         SELECT b.n, \
           CASE WHEN b.n OPERATOR(pg_catalog.>) $2 THEN ( \
             SELECT CASE WHEN n.freq IS NOT NULL AND n.analyzed OPERATOR(pg_catalog.>) $2 \
                           THEN LEAST(n.span, GREATEST((n.freq OPERATOR(pg_catalog.*) n.analyzed)::pg_catalog.int8, \
                                                       $2 OPERATOR(pg_catalog.+) 1)) \
                         WHEN n.live OPERATOR(pg_catalog.>) $2 THEN LEAST(n.span, n.live) \
                         ELSE n.span END \
             FROM (SELECT pg_catalog.pg_stat_get_live_tuples('{schema}.{table}'::pg_catalog.regclass) AS live, \
                     (SELECT c.reltuples FROM pg_catalog.pg_class c \
                      WHERE c.oid OPERATOR(pg_catalog.=) '{schema}.{table}'::pg_catalog.regclass) AS analyzed, \
                     (SELECT t.id FROM {schema}.{table} t WHERE t.broker_id OPERATOR(pg_catalog.=) $1 \
                      ORDER BY t.broker_id DESC, t.id DESC LIMIT 1) \
                     OPERATOR(pg_catalog.-) \
                     (SELECT t.id FROM {schema}.{table} t WHERE t.broker_id OPERATOR(pg_catalog.=) $1 \
                      ORDER BY t.broker_id, t.id LIMIT 1) OPERATOR(pg_catalog.+) 1 AS span, \
                     (SELECT m.f FROM pg_catalog.pg_stats st, \
                        ROWS FROM (pg_catalog.unnest(st.most_common_vals::text::pg_catalog.int4[]), \
                                   pg_catalog.unnest(st.most_common_freqs)) AS m(v, f) \
                      WHERE st.schemaname OPERATOR(pg_catalog.=) (SELECT ns.nspname FROM pg_catalog.pg_namespace ns \
                              JOIN pg_catalog.pg_class c ON c.relnamespace OPERATOR(pg_catalog.=) ns.oid \
                              WHERE c.oid OPERATOR(pg_catalog.=) '{schema}.{table}'::pg_catalog.regclass) \
                        AND st.tablename OPERATOR(pg_catalog.=) '{table}' \
                        AND st.attname OPERATOR(pg_catalog.=) 'broker_id' \
                        AND m.v OPERATOR(pg_catalog.=) $1) AS freq) n) END \
         FROM b"
    );
    let row = client
        .select(&sql, Some(1), &[broker_id.into(), EXACT_UP_TO.into()])
        .ok()
        .and_then(|t| t.first().get_two::<i64, i64>().ok());
    match row {
        Some((Some(n), None)) => (n, true),
        Some((Some(n), Some(estimate))) => (estimate.max(n), false),
        _ => (0, true),
    }
}
