//! Keeping the history and dead-letter tables from growing without end.
//!
//! `mqtt_message_history` is partitioned by day: the worker creates each day's partition a
//! few days ahead, and with `mqtt_pg.history_retention` set drops whole partitions once every
//! row in them is older (`_mqtt_history_plan` in sql/finalize.sql says what to do, `history`
//! makes partitions).
//! Dropping a partition never leaves dead rows behind, so retention costs no vacuum however
//! fast messages arrive. Dead letters are few; old ones are deleted in bounded batches
//! (`mqtt_pg.dead_letter_retention`).
//!
//! Runs on the worker's main thread between batches, in its own transaction, under a short
//! lock timeout: dropping a partition needs an exclusive lock on the history table, and a
//! long report reading history must delay retention, not the worker's ingest (nor queue every
//! other reader behind the drop's lock request). What fails is logged and tried again later.

use std::time::{Duration, Instant};

use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;

use super::subxact;
use crate::gucs;

/// How often maintenance runs besides at start and after a configuration reload.
pub const INTERVAL: Duration = Duration::from_secs(300);
/// Days of partitions kept ready beyond today: ingest never waits for a partition to be made,
/// even when the worker was away for a while.
const DAYS_AHEAD: i32 = 3;
/// Longest a maintenance statement waits for a lock before giving up until next time.
const LOCK_TIMEOUT: &std::ffi::CStr = c"2s";
/// Dead letters deleted per statement, and statements per run: bounded, so one run never
/// holds the worker for long.
const DEAD_LETTER_BATCH: i32 = 10_000;
const DEAD_LETTER_BATCHES: usize = 10;

/// When maintenance last ran; None: at the next turn.
#[derive(Default)]
pub struct Schedule {
    last: Option<Instant>,
}

impl Schedule {
    /// Run at the next turn (settings may have changed).
    pub fn soon(&mut self) {
        self.last = None;
    }

    pub fn due(&self) -> bool {
        self.last.is_none_or(|t| t.elapsed() >= INTERVAL)
    }

    pub fn ran(&mut self) {
        self.last = Some(Instant::now());
    }
}

/// An interval literal PostgreSQL reads back exactly.
fn interval_literal(d: Duration) -> String {
    format!("{} seconds", d.as_secs().max(1))
}

/// Carry out `_mqtt_history_plan`: each step on its own (a partition another session holds
/// locked must not keep the others from being made or dropped). Returns what was done; the
/// first failure as the error, after the other steps had their turn.
fn keep_partitions(schema: &str, dboid: u32, keep: Option<String>) -> Result<Vec<String>, String> {
    let plan = subxact::run(|| {
        Spi::connect(|client| {
            let rows = client
                .select(
                    &format!(
                        "SELECT action, part, lo::text, hi::text \
                         FROM {schema}._mqtt_history_plan($1::pg_catalog.interval, $2)"
                    ),
                    None,
                    &[keep.clone().into(), DAYS_AHEAD.into()],
                )
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(
                rows.map(|r| {
                    (
                        r.get::<String>(1).ok().flatten().unwrap_or_default(),
                        r.get::<String>(2).ok().flatten().unwrap_or_default(),
                        r.get::<String>(3).ok().flatten().unwrap_or_default(),
                        r.get::<String>(4).ok().flatten().unwrap_or_default(),
                    )
                })
                .collect::<Vec<_>>(),
            )
        })
    })
    .map_err(|f| f.message)??;
    let mut done = Vec::new();
    let mut failed = None;
    for (action, part, lo, hi) in plan {
        let step = subxact::run(|| match action.as_str() {
            "create" => crate::history::create_partition(&part, &lo, &hi),
            "drop" => Spi::run_with_args(
                &format!("SELECT {schema}._mqtt_history_partition_drop($1)"),
                &[part.clone().into()],
            )
            .map(|_| true)
            .map_err(|e| e.to_string()),
            "empty" => Spi::run(&format!("TRUNCATE {schema}.mqtt_message_history_default"))
                .map(|_| true)
                .map_err(|e| e.to_string()),
            other => Err(format!("unknown step {other}")),
        });
        match step {
            // made by a restore meanwhile
            Ok(Ok(false)) => {}
            Ok(Ok(true)) => done.push(match action.as_str() {
                "create" => format!("created {part}"),
                "drop" => format!("dropped {part}"),
                _ => format!("emptied {part}"),
            }),
            Ok(Err(e)) => {
                failed.get_or_insert(format!("{action} {part}: {e}"));
            }
            Err(f) => {
                failed.get_or_insert(format!("{action} {part}: {}", f.message));
            }
        }
    }
    match failed {
        // What was done is logged either way.
        Some(e) => {
            for what in &done {
                log!("mqtt_pg history maintenance in database {dboid}: {what}");
            }
            Err(e)
        }
        None => Ok(done),
    }
}

/// Create partitions ahead, apply the retention settings. Logs what it did at LOG (a dropped
/// partition is data gone: the log should say so) and what failed as a WARNING.
pub fn run(schema: &str, dboid: u32) {
    let history = gucs::history_retention().map(interval_literal);
    let dead = gucs::dead_letter_retention().map(interval_literal);
    let outcome = BackgroundWorker::transaction(|| {
        crate::gucs::set_local(c"lock_timeout", LOCK_TIMEOUT);
        let partitions = keep_partitions(schema, dboid, history.clone());
        let mut expired = 0i64;
        let mut dead_error = None;
        if let Some(keep) = &dead {
            for _ in 0..DEAD_LETTER_BATCHES {
                let n = subxact::run(|| {
                    Spi::get_one_with_args::<i64>(
                        &format!(
                            "SELECT {schema}._mqtt_dead_letter_expire($1::pg_catalog.interval, $2)"
                        ),
                        &[keep.clone().into(), DEAD_LETTER_BATCH.into()],
                    )
                    .map_err(|e| e.to_string())
                });
                match n {
                    Ok(Ok(n)) => {
                        let n = n.unwrap_or(0);
                        expired += n;
                        if n < i64::from(DEAD_LETTER_BATCH) {
                            break;
                        }
                    }
                    Ok(Err(e)) => {
                        dead_error = Some(e);
                        break;
                    }
                    Err(f) => {
                        dead_error = Some(f.message);
                        break;
                    }
                }
            }
        }
        (partitions, expired, dead_error)
    });
    let (partitions, expired, dead_error) = outcome;
    match partitions {
        Ok(done) => {
            for what in done {
                log!("mqtt_pg history maintenance in database {dboid}: {what}");
            }
        }
        Err(e) => warning!(
            "mqtt_pg could not maintain mqtt_message_history's partitions in database {dboid}: {e}; \
             trying again in {} minutes",
            INTERVAL.as_secs() / 60
        ),
    }
    if expired > 0 {
        log!("mqtt_pg deleted {expired} dead letters older than mqtt_pg.dead_letter_retention in database {dboid}");
    }
    if let Some(e) = dead_error {
        warning!("mqtt_pg could not delete old dead letters in database {dboid}: {e}");
    }
}
