//! Reading committed outbox rows for the engine.
//!
//! Rows are not marked when handed out (no write per message); the worker remembers the ids in
//! flight instead. Ids come from a sequence, so a transaction that commits late can reveal a
//! row below ids already sent; reading "the lowest ids not in flight" rather than "ids above a
//! watermark" picks those up too, in the order they became visible.

use mqtt_pg_core::engine::OutMessage;
use pgrx::prelude::*;

/// Payload bytes one broker may have handed to its connection and not yet acknowledged: the
/// worker's memory must not follow the size of the messages queued (up to 256 MB each).
pub const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;

/// Up to `room` committed rows of one broker that are not in flight, lowest id first, with
/// payloads of at most `byte_room` bytes in all (but always at least one row, however large).
/// `taken` counts the rows `is_taken` says are in flight already (they are skipped).
pub fn fetch(
    schema: &str,
    broker_id: i32,
    taken: usize,
    is_taken: impl Fn(i64) -> bool,
    room: usize,
    byte_room: usize,
) -> Vec<OutMessage> {
    Spi::connect(|client| {
        let limit = (taken + room) as i64;
        let candidates: Vec<(i64, usize)> = client
            .select(
                &format!(
                    "SELECT id, pg_catalog.octet_length(payload) FROM {schema}.mqtt_outbox \
                     WHERE broker_id OPERATOR(pg_catalog.=) $1 ORDER BY id LIMIT $2"
                ),
                None,
                &[broker_id.into(), limit.into()],
            )
            .map(|rows| {
                rows.filter_map(|r| {
                    let id = r.get::<i64>(1).ok().flatten()?;
                    let len = r.get::<i32>(2).ok().flatten().unwrap_or(0).max(0) as usize;
                    Some((id, len))
                })
                .filter(|(id, _)| !is_taken(*id))
                .take(room)
                .collect()
            })
            .unwrap_or_default();
        let mut ids = Vec::new();
        let mut bytes = 0usize;
        for (id, len) in candidates {
            if !ids.is_empty() && bytes + len > byte_room {
                break;
            }
            bytes += len;
            ids.push(id);
        }
        if ids.is_empty() {
            return Vec::new();
        }
        client
            .select(
                &format!(
                    "SELECT id, topic, payload, qos, retain FROM {schema}.mqtt_outbox \
                     WHERE id OPERATOR(pg_catalog.=) ANY ($1) ORDER BY id"
                ),
                None,
                &[ids.into()],
            )
            .map(|rows| {
                rows.filter_map(|r| {
                    Some(OutMessage {
                        outbox_id: r.get::<i64>(1).ok()??,
                        topic: r.get::<String>(2).ok()??,
                        payload: r.get::<Vec<u8>>(3).ok()??,
                        qos: r.get::<i16>(4).ok()??.clamp(0, 2) as u8,
                        retain: r.get::<bool>(5).ok()??,
                    })
                })
                .collect()
            })
            .unwrap_or_default()
    })
}
