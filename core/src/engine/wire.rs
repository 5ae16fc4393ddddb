//! MQTT 3.1.1 and MQTT 5 behind one face. rumqttc has a separate client, event loop and packet
//! types for each version; the connection's bookkeeping (`connection.rs`) only needs what both
//! share, so it talks to a [`Client`] and a [`Loop`] and reads [`Wire`] events, and everything
//! that differs between the versions (properties, reason codes, the broker's limits in its
//! CONNACK) is translated here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use bytes::Bytes;
use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::v5::mqttbytes::QoS as Qos5;
use rumqttc::{Outgoing, Transport};

use super::options::{options, options_v5};
use super::{BrokerConfig, MessageProperties, Protocol};
use crate::properties::PayloadFormat;

/// The request channel of a connection. Every call hands a request over without waiting:
/// `Err(())` means the channel is full (or the request was refused), and the caller keeps it.
#[derive(Clone)]
pub(super) enum Client {
    V4(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

/// One connection's rumqttc event loop.
pub(super) enum Loop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<v5::EventLoop>),
}

/// Why a connection attempt or a connection ended, as rumqttc reported it.
#[derive(Debug)]
pub(super) enum ConnError {
    V4(rumqttc::ConnectionError),
    V5(v5::ConnectionError),
}

impl ConnError {
    /// The return code of a CONNACK that refused us, as rumqttc names it.
    pub(super) fn refused_code(&self) -> Option<String> {
        match self {
            ConnError::V4(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                Some(format!("{code:?}"))
            }
            ConnError::V5(v5::ConnectionError::ConnectionRefused(code))
            | ConnError::V5(v5::ConnectionError::MqttState(v5::StateError::ConnFail {
                reason: code,
            })) => Some(format!("{code:?}")),
            _ => None,
        }
    }
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnError::V4(e) => e.fmt(f),
            ConnError::V5(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ConnError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConnError::V4(e) => Some(e),
            ConnError::V5(e) => Some(e),
        }
    }
}

/// What the bookkeeping needs to know of a rumqttc event, in either version.
#[derive(Debug)]
pub(super) enum Wire {
    ConnAck {
        session_present: bool,
        /// MQTT 5: the largest packet the broker accepts, when it says.
        max_packet_size: Option<u32>,
        /// The CONNACK's code in words (for `mqtt_test_connection`).
        code: String,
    },
    Publish {
        topic: String,
        payload: Bytes,
        qos: u8,
        retain: bool,
        pkid: u16,
        properties: Option<MessageProperties>,
    },
    /// A PUBLISH went out with this packet id (0 for QoS 0).
    SentPublish(u16),
    SentSubscribe(u16),
    SentDisconnect,
    /// `refused`: MQTT 5's failure reason, in words; `None` for success (or 3.1.1).
    PubAck {
        pkid: u16,
        refused: Option<String>,
    },
    PubRec {
        pkid: u16,
        refused: Option<String>,
    },
    PubComp {
        pkid: u16,
    },
    /// One entry per filter of the SUBSCRIBE: `None` granted, `Some(reason)` refused.
    SubAck {
        pkid: u16,
        refused: Vec<Option<String>>,
    },
    UnsubAck,
    Other,
}

fn qos4(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

pub(super) fn qos5(q: u8) -> Qos5 {
    match q {
        0 => Qos5::AtMostOnce,
        1 => Qos5::AtLeastOnce,
        _ => Qos5::ExactlyOnce,
    }
}

/// MQTT 5 publish properties from ours.
pub(super) fn to_v5(p: &MessageProperties) -> p5::PublishProperties {
    p5::PublishProperties {
        payload_format_indicator: p.payload_format.map(|f| match f {
            PayloadFormat::Bytes => 0,
            PayloadFormat::Utf8 => 1,
        }),
        message_expiry_interval: p.message_expiry,
        topic_alias: None,
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone().map(Bytes::from),
        user_properties: p.user_properties.clone(),
        subscription_identifiers: Vec::new(),
        content_type: p.content_type.clone(),
    }
}

/// Ours from MQTT 5 publish properties; `None` when nothing we keep is set.
fn from_v5(p: Option<p5::PublishProperties>) -> Option<MessageProperties> {
    let p = p?;
    let m = MessageProperties {
        content_type: p.content_type,
        payload_format: p.payload_format_indicator.map(|f| match f {
            1 => PayloadFormat::Utf8,
            _ => PayloadFormat::Bytes,
        }),
        message_expiry: p.message_expiry_interval,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data.map(|b| b.to_vec()),
        user_properties: p.user_properties,
    };
    (!m.is_empty()).then_some(m)
}

impl Client {
    /// Hand a PUBLISH to rumqttc. Properties are sent on MQTT 5 only (mqtt_publish refuses
    /// them for a 3.1.1 broker).
    pub(super) fn try_publish(
        &self,
        topic: &str,
        qos: u8,
        retain: bool,
        payload: &[u8],
        properties: Option<&MessageProperties>,
    ) -> Result<(), ()> {
        match self {
            Client::V4(c) => c
                .try_publish(topic, qos4(qos), retain, payload.to_vec())
                .map_err(drop),
            Client::V5(c) => match properties.filter(|p| !p.is_empty()) {
                Some(p) => c
                    .try_publish_with_properties(
                        topic,
                        qos5(qos),
                        retain,
                        payload.to_vec(),
                        to_v5(p),
                    )
                    .map_err(drop),
                None => c
                    .try_publish(topic, qos5(qos), retain, payload.to_vec())
                    .map_err(drop),
            },
        }
    }

    /// Acknowledge a received QoS 1/2 message (PUBACK or PUBREC).
    pub(super) fn try_ack(&self, qos: u8, pkid: u16) -> Result<(), ()> {
        match self {
            Client::V4(c) => {
                let mut p = rumqttc::Publish::new("", qos4(qos), Vec::new());
                p.pkid = pkid;
                c.try_ack(&p).map_err(drop)
            }
            Client::V5(c) => {
                let mut p = p5::Publish::new("", qos5(qos), Vec::new(), None);
                p.pkid = pkid;
                c.try_ack(&p).map_err(drop)
            }
        }
    }

    pub(super) fn try_subscribe_many(&self, filters: &BTreeMap<String, u8>) -> Result<(), ()> {
        match self {
            Client::V4(c) => c
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), qos4(*q))),
                )
                .map_err(drop),
            Client::V5(c) => c
                .try_subscribe_many(
                    filters
                        .iter()
                        .map(|(f, q)| p5::Filter::new(f.clone(), qos5(*q))),
                )
                .map_err(drop),
        }
    }

    pub(super) fn try_unsubscribe(&self, filter: &str) -> Result<(), ()> {
        match self {
            Client::V4(c) => c.try_unsubscribe(filter).map_err(drop),
            Client::V5(c) => c.try_unsubscribe(filter).map_err(drop),
        }
    }

    pub(super) fn try_disconnect(&self) -> Result<(), ()> {
        match self {
            Client::V4(c) => c.try_disconnect().map_err(drop),
            Client::V5(c) => c.try_disconnect().map_err(drop),
        }
    }
}

impl Loop {
    /// The client and event loop of a connection with `c`'s settings.
    pub(super) fn new(c: &BrokerConfig, channel: usize) -> (Client, Loop) {
        match c.protocol {
            Protocol::V311 => {
                let (client, mut el) = rumqttc::AsyncClient::new(options(c), channel);
                el.set_network_options(super::options::network_options());
                (Client::V4(client), Loop::V4(Box::new(el)))
            }
            Protocol::V5 => {
                let (client, el) = v5::AsyncClient::new(options_v5(c), channel);
                (Client::V5(client), Loop::V5(Box::new(el)))
            }
        }
    }

    /// rumqttc's own connect timeout, in whole seconds.
    pub(super) fn set_connection_timeout(&mut self, secs: u64) {
        match self {
            Loop::V4(el) => {
                let mut net = super::options::network_options();
                net.set_connection_timeout(secs);
                el.set_network_options(net);
            }
            Loop::V5(el) => {
                el.options.set_connection_timeout(secs);
            }
        }
    }

    pub(super) fn set_transport(&mut self, t: Transport) {
        match self {
            Loop::V4(el) => {
                el.mqtt_options.set_transport(t);
            }
            Loop::V5(el) => {
                el.options.set_transport(t);
            }
        }
    }

    /// The next event. Cancel-safe only as far as rumqttc's `poll` is (see `run_broker`).
    pub(super) async fn poll(&mut self) -> Result<Wire, ConnError> {
        match self {
            Loop::V4(el) => el.poll().await.map(wire4).map_err(ConnError::V4),
            Loop::V5(el) => el.poll().await.map(wire5).map_err(ConnError::V5),
        }
    }

    /// Events rumqttc has read but not handed out yet.
    pub(super) fn take_buffered(&mut self) -> Vec<Wire> {
        match self {
            Loop::V4(el) => el.state.events.drain(..).map(wire4).collect(),
            Loop::V5(el) => el.state.events.drain(..).map(wire5).collect(),
        }
    }

    /// Before the first connection: answer any PUBREL (see [`answer_any_pubrel`]) and release
    /// every QoS 2 packet id an earlier process may have left open at the broker (see
    /// [`releases`]). The releases are dropped if the session turns out to be new.
    pub(super) fn prime(&mut self, max_inflight: u16) {
        let ids = 1..=max_inflight.max(1);
        match self {
            Loop::V4(el) => {
                answer_any_pubrel4(&mut el.state);
                el.pending = ids
                    .map(|pkid| rumqttc::Request::PubRel(rumqttc::PubRel::new(pkid)))
                    .collect();
            }
            Loop::V5(el) => {
                answer_any_pubrel5(&mut el.state);
                el.pending = ids
                    .map(|pkid| v5::Request::PubRel(p5::PubRel::new(pkid, None)))
                    .collect();
            }
        }
    }

    /// Forget everything in flight but the QoS 2 releases (see `Book::connection_lost`).
    pub(super) fn connection_lost(&mut self) {
        match self {
            Loop::V4(el) => {
                el.clean();
                let pending = std::mem::take(&mut el.pending);
                el.pending = releases(pending.into_iter().filter_map(|r| match r {
                    rumqttc::Request::PubRel(p) => Some(p.pkid),
                    rumqttc::Request::Publish(p) if p.qos == rumqttc::QoS::ExactlyOnce => {
                        Some(p.pkid)
                    }
                    _ => None,
                }))
                .map(|pkid| rumqttc::Request::PubRel(rumqttc::PubRel::new(pkid)))
                .collect();
                answer_any_pubrel4(&mut el.state);
                // A packet-id collision pending on the dead connection would otherwise keep
                // rumqttc from taking any request on the next one.
                el.state.collision = None;
            }
            Loop::V5(el) => {
                el.clean();
                let pending = std::mem::take(&mut el.pending);
                el.pending = releases(pending.into_iter().filter_map(|r| match r {
                    v5::Request::PubRel(p) => Some(p.pkid),
                    v5::Request::Publish(p) if p.qos == Qos5::ExactlyOnce => Some(p.pkid),
                    _ => None,
                }))
                .map(|pkid| v5::Request::PubRel(p5::PubRel::new(pkid, None)))
                .collect();
                answer_any_pubrel5(&mut el.state);
                el.state.collision = None;
            }
        }
    }
}

/// What to send again on a resumed session: a PUBREL for every QoS 2 packet id the lost
/// connection left open, once each, and nothing else (the rows themselves are resent from the
/// outbox).
///
/// A broker that got a QoS 2 PUBLISH keeps its packet id "awaiting PUBREL" in the session. Left
/// so, it would take the next PUBLISH that reuses the id (rumqttc cycles through 1..=inflight)
/// for a duplicate and drop it while acknowledging it: a lost message counted as delivered.
/// Releasing the id closes that flow (delivering the old message, which the outbox resends
/// too: at-least-once); a broker that never had it answers PUBCOMP all the same (MQTT 3.1.1,
/// 4.3.3; MQTT 5 with reason 0x92, which our patched rumqttc counts as the end of the flow:
/// vendor/rumqttc/PATCHES.md). rumqttc sends `pending` first on a resumed session and drops it
/// on a new one.
fn releases(ids: impl Iterator<Item = u16>) -> impl Iterator<Item = u16> {
    let mut seen = BTreeSet::new();
    ids.filter(|pkid| *pkid != 0)
        .filter(move |pkid| seen.insert(*pkid))
}

/// Make rumqttc answer a PUBREL for any packet id with PUBCOMP, as MQTT requires (3.1.1 and 5,
/// 4.3.3).
///
/// rumqttc 0.25 forgets the QoS 2 messages it acknowledged with PUBREC whenever a connection
/// ends (and a new process never knew them), then treats the PUBREL a broker resends on a
/// resumed session as an "unsolicited" protocol error and drops the connection, for ever
/// (rumqtt #664). It only accepts PUBREL for ids it has marked; marking every id, through its
/// public packet handler, restores the standard behaviour. With manual acks the handler
/// sends nothing for these stand-in messages, and the events it queues are taken back here.
fn answer_any_pubrel4(state: &mut rumqttc::MqttState) {
    let events = state.events.len();
    for pkid in 1..=u16::MAX {
        let mut p = rumqttc::Publish::new("", rumqttc::QoS::ExactlyOnce, Vec::new());
        p.pkid = pkid;
        let _ = state.handle_incoming_packet(rumqttc::Packet::Publish(p));
    }
    state.events.truncate(events);
    // The stand-ins grew the queue to some 10 MB: give that back.
    state.events.shrink_to(events.max(64));
}

/// [`answer_any_pubrel4`] for MQTT 5 (the same bug, the same remedy).
fn answer_any_pubrel5(state: &mut v5::MqttState) {
    let events = state.events.len();
    for pkid in 1..=u16::MAX {
        let mut p = p5::Publish::new("", Qos5::ExactlyOnce, Vec::new(), None);
        p.pkid = pkid;
        let _ = state.handle_incoming_packet(p5::Packet::Publish(p));
    }
    state.events.truncate(events);
    state.events.shrink_to(events.max(64));
}

fn sent(o: Outgoing) -> Wire {
    match o {
        Outgoing::Publish(pkid) => Wire::SentPublish(pkid),
        Outgoing::Subscribe(pkid) => Wire::SentSubscribe(pkid),
        Outgoing::Disconnect => Wire::SentDisconnect,
        _ => Wire::Other,
    }
}

fn wire4(ev: rumqttc::Event) -> Wire {
    use rumqttc::{Event, Packet};
    match ev {
        Event::Incoming(Packet::ConnAck(a)) => Wire::ConnAck {
            session_present: a.session_present,
            max_packet_size: None,
            code: format!("{:?}", a.code),
        },
        Event::Incoming(Packet::Publish(p)) => Wire::Publish {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos as u8,
            retain: p.retain,
            pkid: p.pkid,
            properties: None,
        },
        Event::Incoming(Packet::PubAck(a)) => Wire::PubAck {
            pkid: a.pkid,
            refused: None,
        },
        Event::Incoming(Packet::PubRec(a)) => Wire::PubRec {
            pkid: a.pkid,
            refused: None,
        },
        Event::Incoming(Packet::PubComp(a)) => Wire::PubComp { pkid: a.pkid },
        Event::Incoming(Packet::UnsubAck(_)) => Wire::UnsubAck,
        Event::Incoming(Packet::SubAck(a)) => Wire::SubAck {
            pkid: a.pkid,
            refused: a
                .return_codes
                .iter()
                .map(|c| {
                    matches!(c, rumqttc::SubscribeReasonCode::Failure)
                        .then(|| "failure (reason code 128)".to_string())
                })
                .collect(),
        },
        Event::Incoming(_) => Wire::Other,
        Event::Outgoing(o) => sent(o),
    }
}

fn wire5(ev: v5::Event) -> Wire {
    use p5::Packet;
    match ev {
        v5::Event::Incoming(Packet::ConnAck(a)) => Wire::ConnAck {
            session_present: a.session_present,
            // 0 is not a size a broker may announce (MQTT 5, 3.2.2.3.6): ignored, rather than
            // refusing every row as too large.
            max_packet_size: a
                .properties
                .as_ref()
                .and_then(|p| p.max_packet_size)
                .filter(|n| *n > 0),
            code: format!("{:?}", a.code),
        },
        v5::Event::Incoming(Packet::Publish(p)) => Wire::Publish {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload,
            qos: p.qos as u8,
            retain: p.retain,
            pkid: p.pkid,
            properties: from_v5(p.properties),
        },
        v5::Event::Incoming(Packet::PubAck(a)) => Wire::PubAck {
            pkid: a.pkid,
            refused: reasons::puback(a.reason)
                .map(|r| with_reason_string(r, a.properties.and_then(|p| p.reason_string))),
        },
        v5::Event::Incoming(Packet::PubRec(a)) => Wire::PubRec {
            pkid: a.pkid,
            refused: reasons::pubrec(a.reason)
                .map(|r| with_reason_string(r, a.properties.and_then(|p| p.reason_string))),
        },
        v5::Event::Incoming(Packet::PubComp(a)) => Wire::PubComp { pkid: a.pkid },
        v5::Event::Incoming(Packet::UnsubAck(_)) => Wire::UnsubAck,
        v5::Event::Incoming(Packet::SubAck(a)) => {
            let why = a.properties.and_then(|p| p.reason_string);
            Wire::SubAck {
                pkid: a.pkid,
                refused: a
                    .return_codes
                    .iter()
                    .map(|c| reasons::suback(*c).map(|r| with_reason_string(r, why.clone())))
                    .collect(),
            }
        }
        v5::Event::Incoming(_) => Wire::Other,
        v5::Event::Outgoing(o) => sent(o),
    }
}

/// A reason in words, with the broker's own explanation when it sent one.
fn with_reason_string(reason: String, why: Option<String>) -> String {
    match why {
        Some(why) if !why.is_empty() => format!("{reason}: {why:?}"),
        _ => reason,
    }
}

/// MQTT 5 reason codes in the specification's words (MQTT 5.0, 2.4), with their number, so a
/// DBA can look them up.
pub(super) mod reasons {
    use super::p5;

    fn named(name: &str, code: u8) -> String {
        format!("{name} (reason code {code})")
    }

    /// PUBACK and PUBREC carry the same reason codes, in two enums of the same variants.
    macro_rules! publish_reason {
        ($r:expr, $R:ident) => {{
            use p5::$R as R;
            let (name, code) = match $r {
                R::Success | R::NoMatchingSubscribers => return None,
                R::UnspecifiedError => ("unspecified error", 0x80),
                R::ImplementationSpecificError => ("implementation specific error", 0x83),
                R::NotAuthorized => ("not authorized", 0x87),
                R::TopicNameInvalid => ("topic name invalid", 0x90),
                R::PacketIdentifierInUse => ("packet identifier in use", 0x91),
                R::QuotaExceeded => ("quota exceeded", 0x97),
                R::PayloadFormatInvalid => ("payload format invalid", 0x99),
            };
            Some(named(name, code))
        }};
    }

    /// A PUBACK's failure reason; `None` for a success (0x10 "no matching subscribers" is one).
    pub(in crate::engine) fn puback(r: p5::PubAckReason) -> Option<String> {
        publish_reason!(r, PubAckReason)
    }

    /// A PUBREC's failure reason; `None` for a success.
    pub(in crate::engine) fn pubrec(r: p5::PubRecReason) -> Option<String> {
        publish_reason!(r, PubRecReason)
    }

    /// A SUBACK entry's failure reason; `None` when the subscription was granted.
    pub(in crate::engine) fn suback(r: p5::SubscribeReasonCode) -> Option<String> {
        use p5::SubscribeReasonCode as R;
        let (name, code) = match r {
            R::Success(_) => return None,
            R::Failure | R::Unspecified => ("unspecified error", 0x80),
            R::ImplementationSpecific => ("implementation specific error", 0x83),
            R::NotAuthorized => ("not authorized", 0x87),
            R::TopicFilterInvalid => ("topic filter invalid", 0x8F),
            R::PkidInUse => ("packet identifier in use", 0x91),
            R::QuotaExceeded => ("quota exceeded", 0x97),
            R::SharedSubscriptionsNotSupported => ("shared subscriptions not supported", 0x9E),
            R::SubscriptionIdNotSupported => ("subscription identifiers not supported", 0xA1),
            R::WildcardSubscriptionsNotSupported => ("wildcard subscriptions not supported", 0xA2),
        };
        Some(named(name, code))
    }

    /// A refused CONNACK's reason.
    pub(in crate::engine) fn connack(r: p5::ConnectReturnCode) -> String {
        use p5::ConnectReturnCode as R;
        let (name, code) = match r {
            R::Success => ("success", 0x00),
            R::RefusedProtocolVersion | R::UnsupportedProtocolVersion => {
                ("unsupported protocol version", 0x84)
            }
            R::BadClientId | R::ClientIdentifierNotValid => ("client identifier not valid", 0x85),
            R::ServiceUnavailable | R::ServerUnavailable => ("server unavailable", 0x88),
            R::UnspecifiedError => ("unspecified error", 0x80),
            R::MalformedPacket => ("malformed packet", 0x81),
            R::ProtocolError => ("protocol error", 0x82),
            R::ImplementationSpecificError => ("implementation specific error", 0x83),
            R::BadUserNamePassword => ("bad user name or password", 0x86),
            R::NotAuthorized => ("not authorized", 0x87),
            R::ServerBusy => ("server busy", 0x89),
            R::Banned => ("banned", 0x8A),
            R::BadAuthenticationMethod => ("bad authentication method", 0x8C),
            R::TopicNameInvalid => ("topic name invalid", 0x90),
            R::PacketTooLarge => ("packet too large", 0x95),
            R::QuotaExceeded => ("quota exceeded", 0x97),
            R::PayloadFormatInvalid => ("payload format invalid", 0x99),
            R::RetainNotSupported => ("retain not supported", 0x9A),
            R::QoSNotSupported => ("QoS not supported", 0x9B),
            R::UseAnotherServer => ("use another server", 0x9C),
            R::ServerMoved => ("server moved", 0x9D),
            R::ConnectionRateExceeded => ("connection rate exceeded", 0x9F),
        };
        named(name, code)
    }

    /// The reason of a DISCONNECT the broker sent.
    pub(in crate::engine) fn disconnect(r: p5::DisconnectReasonCode) -> String {
        use p5::DisconnectReasonCode as R;
        let (name, code) = match r {
            R::NormalDisconnection => ("normal disconnection", 0x00),
            R::DisconnectWithWillMessage => ("disconnect with will message", 0x04),
            R::UnspecifiedError => ("unspecified error", 0x80),
            R::MalformedPacket => ("malformed packet", 0x81),
            R::ProtocolError => ("protocol error", 0x82),
            R::ImplementationSpecificError => ("implementation specific error", 0x83),
            R::NotAuthorized => ("not authorized", 0x87),
            R::ServerBusy => ("server busy", 0x89),
            R::ServerShuttingDown => ("server shutting down", 0x8B),
            R::KeepAliveTimeout => ("keep alive timeout", 0x8D),
            R::SessionTakenOver => ("session taken over", 0x8E),
            R::TopicFilterInvalid => ("topic filter invalid", 0x8F),
            R::TopicNameInvalid => ("topic name invalid", 0x90),
            R::ReceiveMaximumExceeded => ("receive maximum exceeded", 0x93),
            R::TopicAliasInvalid => ("topic alias invalid", 0x94),
            R::PacketTooLarge => ("packet too large", 0x95),
            R::MessageRateTooHigh => ("message rate too high", 0x96),
            R::QuotaExceeded => ("quota exceeded", 0x97),
            R::AdministrativeAction => ("administrative action", 0x98),
            R::PayloadFormatInvalid => ("payload format invalid", 0x99),
            R::RetainNotSupported => ("retain not supported", 0x9A),
            R::QoSNotSupported => ("QoS not supported", 0x9B),
            R::UseAnotherServer => ("use another server", 0x9C),
            R::ServerMoved => ("server moved", 0x9D),
            R::SharedSubscriptionNotSupported => ("shared subscriptions not supported", 0x9E),
            R::ConnectionRateExceeded => ("connection rate exceeded", 0x9F),
            R::MaximumConnectTime => ("maximum connect time", 0xA0),
            R::SubscriptionIdentifiersNotSupported => {
                ("subscription identifiers not supported", 0xA1)
            }
            R::WildcardSubscriptionsNotSupported => ("wildcard subscriptions not supported", 0xA2),
        };
        named(name, code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_cross_both_ways() {
        let p = MessageProperties {
            content_type: Some("text/plain".into()),
            payload_format: Some(PayloadFormat::Utf8),
            message_expiry: Some(30),
            response_topic: Some("r".into()),
            correlation_data: Some(vec![1, 2]),
            user_properties: vec![("k".into(), "v".into())],
        };
        assert_eq!(from_v5(Some(to_v5(&p))), Some(p));
        assert_eq!(from_v5(Some(p5::PublishProperties::default())), None);
        assert_eq!(from_v5(None), None);
    }

    #[test]
    fn releases_once_each_and_never_zero() {
        let ids: Vec<u16> = releases([3, 0, 3, 1, 2, 1].into_iter()).collect();
        assert_eq!(ids, vec![3, 1, 2]);
    }

    #[test]
    fn reasons_have_names_and_numbers() {
        assert_eq!(
            reasons::puback(p5::PubAckReason::NotAuthorized).as_deref(),
            Some("not authorized (reason code 135)")
        );
        assert_eq!(
            reasons::puback(p5::PubAckReason::NoMatchingSubscribers),
            None
        );
        assert_eq!(
            reasons::suback(p5::SubscribeReasonCode::NotAuthorized).as_deref(),
            Some("not authorized (reason code 135)")
        );
        assert_eq!(
            reasons::suback(p5::SubscribeReasonCode::Success(Qos5::AtLeastOnce)),
            None
        );
    }
}
