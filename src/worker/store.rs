//! Writing one batch of engine events: received messages into history, delivered outbox rows
//! moved to history, rejected ones to dead letters. One transaction, a handful of statements,
//! however many messages: arrays in, `unnest` out (never one INSERT per message).

use std::collections::HashMap;

use mqtt_pg_core::batch::chunks_by_size;
use mqtt_pg_core::engine::InMessage;
use pgrx::prelude::*;

/// Payload bytes of received messages stored by one INSERT (and drained from the engine for
/// one batch): PostgreSQL caps an array at 1 GB, and a batch must stay far below that.
pub const MAX_BATCH_BYTES: usize = 128 << 20;

#[derive(Default)]
pub struct Batch {
    pub received: Vec<InMessage>,
    /// (broker id, outbox id, packet id)
    pub delivered: Vec<(i32, i64, Option<u16>)>,
    /// (outbox id, reason)
    pub rejected: Vec<(i64, String)>,
}

/// Store the batch; returns (broker id, messages received, messages sent) for the counters.
pub fn store(schema: &str, batch: &Batch) -> Vec<(i32, u64, u64)> {
    let mut counts: HashMap<i32, (u64, u64)> = HashMap::new();
    Spi::connect_mut(|client| {
        // Topics with U+0000 are illegal in MQTT and cannot be stored as text: set aside.
        let received: Vec<&InMessage> = batch
            .received
            .iter()
            .filter(|m| !m.topic.contains('\0'))
            .collect();
        for chunk in chunks_by_size(&received, MAX_BATCH_BYTES, |m| m.payload.len()) {
            let received = chunk;
            let broker: Vec<i32> = received.iter().map(|m| m.broker_id).collect();
            let topic: Vec<&str> = received.iter().map(|m| m.topic.as_str()).collect();
            let payload: Vec<&[u8]> = received.iter().map(|m| m.payload.as_ref()).collect();
            let qos: Vec<i16> = received.iter().map(|m| m.qos as i16).collect();
            let retain: Vec<bool> = received.iter().map(|m| m.retain).collect();
            let pkid: Vec<Option<i32>> = received.iter().map(|m| m.pkid.map(i32::from)).collect();
            let at: Vec<i64> = received.iter().map(|m| m.received_at_us).collect();
            let result = client.update(
                &format!(
                    "INSERT INTO {schema}.mqtt_message_history \
                     (broker_id, topic, payload, qos, retain, direction, message_id, \"timestamp\") \
                     SELECT b, t, p, q, r, 'receive', m, \
                            'epoch'::pg_catalog.timestamptz OPERATOR(pg_catalog.+) \
                            (u::pg_catalog.float8 OPERATOR(pg_catalog.*) interval '1 microsecond') \
                     FROM unnest($1::int4[], $2::text[], $3::bytea[], $4::int2[], $5::bool[], \
                                 $6::int4[], $7::int8[]) AS x(b, t, p, q, r, m, u)"
                ),
                None,
                &[
                    broker.into(),
                    topic.into(),
                    payload.into(),
                    qos.into(),
                    retain.into(),
                    pkid.into(),
                    at.into(),
                ],
            );
            if let Err(e) = result {
                error!("mqtt_pg could not store received messages: {e}");
            }
            for m in received {
                counts.entry(m.broker_id).or_default().0 += 1;
            }
        }
        if !batch.delivered.is_empty() {
            let ids: Vec<i64> = batch.delivered.iter().map(|d| d.1).collect();
            let pkids: Vec<Option<i32>> =
                batch.delivered.iter().map(|d| d.2.map(i32::from)).collect();
            let result = client.update(
                &format!(
                    "WITH d AS (DELETE FROM {schema}.mqtt_outbox o \
                       USING unnest($1::int8[], $2::int4[]) AS u(id, pkid) \
                       WHERE o.id OPERATOR(pg_catalog.=) u.id \
                       RETURNING o.id, o.broker_id, o.topic, o.payload, o.qos, o.retain, u.pkid) \
                     INSERT INTO {schema}.mqtt_message_history \
                       (broker_id, topic, payload, qos, retain, direction, message_id) \
                     SELECT broker_id, topic, payload, qos, retain, 'send', pkid FROM d ORDER BY id \
                     RETURNING broker_id"
                ),
                None,
                &[ids.into(), pkids.into()],
            );
            // Count what left the outbox, not the events: a row reported twice is sent once.
            match result {
                Ok(rows) => {
                    for r in rows {
                        if let Ok(Some(b)) = r.get::<i32>(1) {
                            counts.entry(b).or_default().1 += 1;
                        }
                    }
                }
                Err(e) => error!("mqtt_pg could not record delivered messages: {e}"),
            }
        }
        if !batch.rejected.is_empty() {
            let ids: Vec<i64> = batch.rejected.iter().map(|r| r.0).collect();
            let reasons: Vec<&str> = batch.rejected.iter().map(|r| r.1.as_str()).collect();
            let result = client.update(
                &format!(
                    "WITH d AS (DELETE FROM {schema}.mqtt_outbox o \
                       USING unnest($1::int8[], $2::text[]) AS u(id, error) \
                       WHERE o.id OPERATOR(pg_catalog.=) u.id \
                       RETURNING o.*, u.error) \
                     INSERT INTO {schema}.mqtt_dead_letter \
                       (broker_id, topic, payload, qos, retain, direction, error) \
                     SELECT broker_id, topic, payload, qos, retain, 'send', error FROM d"
                ),
                None,
                &[ids.into(), reasons.into()],
            );
            if let Err(e) = result {
                error!("mqtt_pg could not move rejected messages to mqtt_dead_letter: {e}");
            }
        }
    });
    counts.into_iter().map(|(b, (r, s))| (b, r, s)).collect()
}
