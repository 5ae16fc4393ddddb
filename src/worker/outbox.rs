//! Reading committed outbox rows for the engine.
//!
//! Rows are not marked when handed out (no write per message); the worker remembers the ids in
//! flight instead. Ids come from a sequence, so a transaction that commits late can reveal a
//! row below ids already sent; reading "the lowest ids not in flight" rather than "ids above a
//! watermark" picks those up too, in the order they became visible.

use std::collections::HashSet;

use mqtt_pg_core::engine::OutMessage;
use pgrx::prelude::*;

/// Up to `room` committed rows of one broker that are not in flight, lowest id first.
pub fn fetch(
    schema: &str,
    broker_id: i32,
    in_flight: &HashSet<i64>,
    room: usize,
) -> Vec<OutMessage> {
    Spi::connect(|client| {
        let limit = (in_flight.len() + room) as i64;
        let ids: Vec<i64> = client
            .select(
                &format!(
                    "SELECT id FROM {schema}.mqtt_outbox WHERE broker_id OPERATOR(pg_catalog.=) $1 \
                     ORDER BY id LIMIT $2"
                ),
                None,
                &[broker_id.into(), limit.into()],
            )
            .map(|rows| {
                rows.filter_map(|r| r.get::<i64>(1).ok().flatten())
                    .filter(|id| !in_flight.contains(id))
                    .take(room)
                    .collect()
            })
            .unwrap_or_default();
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
