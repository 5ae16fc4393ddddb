//! The rumqttc options of one broker connection, and what must be checked before the first
//! attempt (TLS configuration, will and birth messages).

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::{LastWill, MqttOptions, NetworkOptions, QoS, TlsConfiguration, Transport};

use super::wire::{qos5, Loop};
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

/// [`options`] for MQTT 5: the same settings, and the session expiry and Receive Maximum
/// that only MQTT 5 has.
pub(super) fn options_v5(c: &BrokerConfig) -> rumqttc::v5::MqttOptions {
    let mut o = rumqttc::v5::MqttOptions::new(c.client_id.clone(), c.host.clone(), c.port);
    o.set_keep_alive(c.keepalive.max(Duration::from_secs(5)));
    o.set_clean_start(c.clean_session);
    // A 3.1.1 persistent session lasts until the broker drops it; MQTT 5 ends a session at
    // the disconnect unless told otherwise. Without a setting, behave as 3.1.1 does.
    let expiry = c
        .session_expiry
        .unwrap_or(if c.clean_session { 0 } else { u32::MAX });
    o.set_session_expiry_interval((expiry > 0).then_some(expiry));
    o.set_manual_acks(true);
    // The largest packet we take: anything MQTT can carry (see `options`). The broker's own
    // limit arrives in its CONNACK and is honoured in `flush_queue`.
    o.set_max_packet_size(Some(MQTT_MAX_PACKET as u32));
    // How many unacknowledged QoS 1/2 messages the broker may send us at once. Each is owed
    // its acknowledgement until the database has stored it, so this is the window that keeps
    // the batches full (mosquitto's 3.1.1 default is 20).
    o.set_receive_maximum(c.receive_maximum);
    o.set_outgoing_inflight_upper_limit(c.max_inflight.max(1));
    o.set_network_options(network_options());
    if let Some(user) = &c.username {
        o.set_credentials(user.clone(), c.password.clone().unwrap_or_default());
    }
    if let Some(w) = &c.will {
        o.set_last_will(p5::LastWill::new(
            w.topic.clone(),
            w.payload.clone(),
            qos5(w.qos.min(2)),
            w.retain,
            None,
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
    eventloop: &mut Loop,
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
        eventloop.set_transport(Transport::Tls(TlsConfiguration::Rustls(config)));
    }
    *done = true;
    Ok(())
}
