//! Connection errors as sentences a DBA can act on: what failed, and which setting to change.
//!
//! rumqttc wraps TLS failures differently depending on when they happen, and the cases below
//! were each provoked against mosquitto 2.0.11 to see the real chain:
//! - the handshake (our verdict on the broker's certificate, a broker alert during it, a
//!   plain-TCP port that resets the connection) arrives as `ConnectionError::Tls(Io(io))`, the
//!   `rustls::Error` inside `io`;
//! - with TLS 1.3 the broker judges our client certificate only after the handshake, so its
//!   alert (`CertificateRequired`, `UnknownCA`) arrives while reading the CONNACK, as
//!   `MqttState(Deserialization(Io(io)))`, again with the `rustls::Error` inside `io`;
//! - a plain-TCP client on a TLS port is reset by the broker before any CONNACK.
//!
//! So the chain is searched for a `rustls::Error` wherever it sits. Nothing here prints a
//! password or a key: the inputs are the error and the non-secret parts of the config.

use std::error::Error as StdError;
use std::io;

use rumqttc::v5;
use rumqttc::ConnectReturnCode;
use rustls::{AlertDescription, CertificateError};

use super::wire::{reasons, ConnError};
use super::BrokerConfig;
use crate::tls::{CA_CERT, CLIENT_CERT, CLIENT_KEY, SERVER_NAME};

/// Turn a rumqttc error into a sentence a DBA can act on. `connected`: a CONNACK had arrived
/// on the connection that failed.
pub(super) fn describe_error(e: &ConnError, c: &BrokerConfig, connected: bool) -> String {
    let target = format!("{}:{}", c.host, c.port);
    if let Some(tls) = find::<rustls::Error>(e) {
        return describe_tls(tls, c, &target);
    }
    let io_kind = find::<io::Error>(e).map(io::Error::kind);
    let closed = matches!(
        io_kind,
        Some(
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::UnexpectedEof
                | io::ErrorKind::BrokenPipe
        )
    );
    if io_kind == Some(io::ErrorKind::ConnectionRefused) {
        return format!(
            "connection to {target} refused: is the broker running and listening there?"
        );
    }
    // The TLS layer is the same in both versions.
    let tls = match e {
        ConnError::V4(rumqttc::ConnectionError::Tls(t)) => Some(t),
        ConnError::V5(v5::ConnectionError::Tls(t)) => Some(t),
        _ => None,
    };
    match tls {
        Some(rumqttc::TlsError::DNSName(_)) => {
            return format!(
                "host {:?} cannot be checked against a TLS certificate (not a valid DNS name or \
                 IP address); set {SERVER_NAME} to the name in the broker's certificate",
                c.host
            )
        }
        Some(_) if closed => {
            return format!(
                "{target} closed the connection during the TLS handshake: is it a plain MQTT \
                 port rather than a TLS one (mqtt_broker.use_tls is true)?"
            )
        }
        Some(other) => return format!("TLS handshake with {target} failed: {other}"),
        None => {}
    }
    if closed && !connected && c.tls.is_none() {
        return format!(
            "{target} closed the connection without answering CONNECT: if it is a TLS port \
             (such as 8883), set mqtt_broker.use_tls"
        );
    }
    match e {
        ConnError::V4(e) => describe_v4(e, &target),
        ConnError::V5(e) => describe_v5(e, &target),
    }
}

/// A connection attempt that got no answer in time.
pub(super) fn describe_timeout(c: &BrokerConfig) -> String {
    format!(
        "no answer from {}:{} within the connection timeout",
        c.host, c.port
    )
}

fn describe_v4(e: &rumqttc::ConnectionError, target: &str) -> String {
    use rumqttc::ConnectionError as E;
    match e {
        E::Io(io) => format!("network error talking to {target}: {io}"),
        E::NetworkTimeout => format!("no answer from {target} within the connection timeout"),
        E::ConnectionRefused(code) => {
            let why = match code {
                ConnectReturnCode::BadUserNamePassword => "bad user name or password",
                ConnectReturnCode::NotAuthorized => "not authorized",
                ConnectReturnCode::BadClientId => "client id rejected",
                ConnectReturnCode::ServiceUnavailable => "service unavailable",
                ConnectReturnCode::RefusedProtocolVersion => "protocol version refused",
                ConnectReturnCode::Success => "success?",
            };
            format!("broker at {target} refused the connection: {why}")
        }
        other => format!("connection to {target} lost: {other}"),
    }
}

fn describe_v5(e: &v5::ConnectionError, target: &str) -> String {
    use v5::ConnectionError as E;
    use v5::StateError as S;
    match e {
        E::Io(io) => format!("network error talking to {target}: {io}"),
        E::Timeout(_) => format!("no answer from {target} within the connection timeout"),
        E::ConnectionRefused(code) | E::MqttState(S::ConnFail { reason: code }) => {
            let why = reasons::connack(*code);
            let hint = if matches!(
                code,
                v5::mqttbytes::v5::ConnectReturnCode::UnsupportedProtocolVersion
                    | v5::mqttbytes::v5::ConnectReturnCode::RefusedProtocolVersion
            ) {
                ": the broker does not speak MQTT 5; set mqtt_broker.protocol_version to '3.1.1'"
            } else {
                ""
            };
            format!("broker at {target} refused the connection: {why}{hint}")
        }
        E::MqttState(S::ServerDisconnect {
            reason_code,
            reason_string,
        }) => {
            let why = reasons::disconnect(*reason_code);
            match reason_string {
                Some(s) if !s.is_empty() => {
                    format!("the broker at {target} disconnected us: {why}: {s:?}")
                }
                _ => format!("the broker at {target} disconnected us: {why}"),
            }
        }
        other => format!("connection to {target} lost: {other}"),
    }
}

/// The first `T` in the error chain, looking inside `io::Error`s too (their `source()` skips
/// the error they wrap, which is where tokio-rustls puts the `rustls::Error`).
fn find<T: StdError + 'static>(e: &ConnError) -> Option<&T> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        if let Some(inner) = err.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            if let Some(t) = inner.downcast_ref::<T>() {
                return Some(t);
            }
        }
        cur = match err.downcast_ref::<v5::StateError>() {
            // rumqttc's MQTT 5 state error does not name the packet error it wraps as its
            // source; that is where a TLS alert read with the CONNACK sits.
            Some(v5::StateError::Deserialization(inner)) => Some(inner),
            _ => err.source(),
        };
    }
    None
}

fn describe_tls(e: &rustls::Error, c: &BrokerConfig, target: &str) -> String {
    let tls = c.tls.as_ref();
    let has_client_cert = tls.is_some_and(|t| t.client_cert.is_some());
    match e {
        rustls::Error::InvalidCertificate(ce) => describe_certificate(ce, c, target),
        rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => format!(
            "the broker at {target} requires a client certificate: set {CLIENT_CERT} and \
             {CLIENT_KEY}"
        ),
        rustls::Error::AlertReceived(AlertDescription::HandshakeFailure) if !has_client_cert => {
            format!(
                "the broker at {target} refused the TLS handshake: it may require a client \
                 certificate (set {CLIENT_CERT} and {CLIENT_KEY}), or share no TLS version or \
                 cipher suite with us"
            )
        }
        rustls::Error::AlertReceived(alert) if has_client_cert && is_about_our_cert(*alert) => {
            let why = match alert {
                AlertDescription::UnknownCA => {
                    "it is not signed by a CA the broker trusts (mosquitto: cafile)"
                }
                AlertDescription::CertificateExpired => "it has expired",
                AlertDescription::CertificateRevoked => "it has been revoked",
                AlertDescription::AccessDenied => "access denied",
                _ => "the broker does not accept it",
            };
            format!(
                "the broker at {target} rejected our client certificate ({CLIENT_CERT}): {why} \
                 (TLS alert {alert:?})"
            )
        }
        rustls::Error::AlertReceived(AlertDescription::ProtocolVersion)
        | rustls::Error::PeerIncompatible(_) => format!(
            "the broker at {target} shares no TLS version or cipher suite with us (TLS 1.2 and \
             1.3 are supported)"
        ),
        rustls::Error::AlertReceived(alert) => {
            format!("the broker at {target} ended the TLS connection (TLS alert {alert:?})")
        }
        rustls::Error::InvalidMessage(_) => format!(
            "{target} does not answer in TLS: is it a plain MQTT port rather than a TLS one \
             (mqtt_broker.use_tls is true)?"
        ),
        other => format!("TLS error with {target}: {other}"),
    }
}

/// Alerts a TLS server sends about the client's certificate.
fn is_about_our_cert(alert: AlertDescription) -> bool {
    matches!(
        alert,
        AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::AccessDenied
            | AlertDescription::DecryptError
            | AlertDescription::HandshakeFailure
    )
}

fn describe_certificate(e: &CertificateError, c: &BrokerConfig, target: &str) -> String {
    let tls = c.tls.as_ref();
    let cert = format!("the broker's certificate at {target}");
    match e {
        CertificateError::UnknownIssuer if tls.is_some_and(|t| t.ca_cert.is_some()) => format!(
            "{cert} is not signed by {CA_CERT} (unknown issuer): put the CA certificate that \
             signed it (mosquitto: cafile) in {CA_CERT}"
        ),
        CertificateError::UnknownIssuer => format!(
            "{cert} is not trusted by the system's CA certificates ({CA_CERT} is NULL): set \
             {CA_CERT} to the CA certificate that signed it"
        ),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            let presented = match e {
                CertificateError::NotValidForNameContext { presented, .. } => presented
                    .iter()
                    .map(|n| general_name(n))
                    .collect::<Vec<_>>()
                    .join(", "),
                _ => String::new(),
            };
            let names = if presented.is_empty() {
                String::new()
            } else {
                format!(" (it is valid for {presented})")
            };
            match tls.and_then(|t| t.server_name.as_deref()) {
                Some(name) => format!(
                    "{cert} is not valid for {name:?}, the name in {SERVER_NAME}{names}: set \
                     {SERVER_NAME} to a name the certificate lists"
                ),
                None => format!(
                    "{cert} is not valid for {:?}, the host connected to{names}: connect by a \
                     name the certificate lists, or set {SERVER_NAME} to one",
                    c.host
                ),
            }
        }
        CertificateError::Expired => format!("{cert} has expired"),
        CertificateError::ExpiredContext { not_after, .. } => format!(
            "{cert} has expired (it was valid until {}): the broker needs a new certificate",
            utc_date(not_after.as_secs())
        ),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            format!("{cert} is not valid yet: check the clocks of this server and of the broker")
        }
        CertificateError::Revoked => format!("{cert} has been revoked"),
        CertificateError::BadSignature => {
            format!("{cert} has an invalid signature (it was not issued by the CA it names)")
        }
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            format!("{cert} is not meant for a server (its extended key usage lacks serverAuth)")
        }
        other => format!(
            "{cert} was rejected: {}",
            rustls::Error::InvalidCertificate(other.clone())
        ),
    }
}

/// webpki's rendering of a certificate name (`DnsName("x")`, `IpAddress(1.2.3.4)`), as the name.
fn general_name(n: &str) -> String {
    let name = n
        .strip_prefix("DnsName(\"")
        .and_then(|r| r.strip_suffix("\")"))
        .or_else(|| {
            n.strip_prefix("IpAddress(")
                .and_then(|r| r.strip_suffix(')'))
        });
    name.unwrap_or(n).to_string()
}

/// `YYYY-MM-DD HH:MM UTC` for seconds since the Unix epoch.
fn utc_date(secs: u64) -> String {
    let (hh, mm) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    let (y, m, d) = crate::utc::civil_from_days((secs / 86_400) as i64);
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02} UTC")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_date(1_577_923_200), "2020-01-02 00:00 UTC");
        assert_eq!(utc_date(951_782_400 + 3_661), "2000-02-29 01:01 UTC");
    }

    #[test]
    fn names() {
        assert_eq!(general_name("DnsName(\"a.example\")"), "a.example");
        assert_eq!(general_name("IpAddress(127.0.0.1)"), "127.0.0.1");
        assert_eq!(general_name("DirectoryName"), "DirectoryName");
    }
}
