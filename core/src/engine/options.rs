//! The rumqttc options of one broker connection, and what must be checked before the first
//! attempt (TLS configuration, will and birth messages).

use std::time::Duration;

use rumqttc::{EventLoop, LastWill, MqttOptions, NetworkOptions, QoS, TlsConfiguration, Transport};

use super::{BrokerConfig, Will, MQTT_MAX_PACKET};

pub(super) fn qos_from(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

pub(super) fn options(c: &BrokerConfig) -> MqttOptions {
    let mut o = MqttOptions::new(c.client_id.clone(), c.host.clone(), c.port);
    o.set_keep_alive(c.keepalive.max(Duration::from_secs(5)));
    o.set_clean_session(c.clean_session);
    // Acknowledge only what the database has stored (see `Engine::ack`).
    o.set_manual_acks(true);
    // Incoming is never limited below what MQTT allows: a message refused here would come back
    // on every reconnect of a persistent session. Outgoing rows over the broker's limit are
    // set aside before they reach the connection (see `flush_queue`).
    o.set_max_packet_size(MQTT_MAX_PACKET, c.max_packet_size);
    o.set_inflight(c.max_inflight.max(1));
    if let Some(user) = &c.username {
        o.set_credentials(user.clone(), c.password.clone().unwrap_or_default());
    }
    if let Some(w) = &c.will {
        o.set_last_will(LastWill::new(
            w.topic.clone(),
            w.payload.clone(),
            qos_from(w.qos.min(2)),
            w.retain,
        ));
    }
    o
}

/// The socket options of every connection.
pub(super) fn network_options() -> NetworkOptions {
    let mut net = NetworkOptions::new();
    // Small writes (a PUBACK, one publish after a commit) must leave at once, not wait for
    // Nagle's algorithm: commit-to-delivery latency is a promise of mqtt_publish.
    net.set_tcp_nodelay(true);
    net
}

/// The birth message, published after every CONNACK: only together with a will, whose topic
/// it shares, so that the will's "offline" and the birth's "online" take turns on one topic.
pub(super) fn birth(c: &BrokerConfig) -> Option<Will> {
    let will = c.will.as_ref()?;
    Some(Will {
        payload: c.birth_payload.clone()?,
        ..will.clone()
    })
}

/// What must hold before the first connection attempt: a usable will and birth message and,
/// for TLS, the rustls configuration. Built once per task; a failure is reported like a
/// failed connection attempt (and so waits out the backoff) and is tried again afterwards,
/// so a CA bundle installed meanwhile is picked up without a restart.
pub(super) fn prepare(
    c: &BrokerConfig,
    eventloop: &mut EventLoop,
    done: &mut bool,
) -> Result<(), String> {
    if *done {
        return Ok(());
    }
    if let Some(w) = &c.will {
        crate::topic::validate_topic(&w.topic).map_err(|e| format!("invalid will topic: {e}"))?;
        let largest = w
            .payload
            .len()
            .max(c.birth_payload.as_ref().map_or(0, Vec::len));
        // Counted as `flush_queue` counts a row: topic, its length, packet id, fixed header.
        let size = w.topic.len() + 2 + 2 + 5 + largest;
        if size > c.max_packet_size {
            return Err(format!(
                "the will or birth message ({size} bytes) exceeds the connection's packet limit \
                 of {} bytes",
                c.max_packet_size
            ));
        }
    }
    if let Some(tls) = &c.tls {
        let config = crate::tls::client_config(tls)?;
        eventloop
            .mqtt_options
            .set_transport(Transport::Tls(TlsConfiguration::Rustls(config)));
    }
    *done = true;
    Ok(())
}
