//! Reading `mqtt_broker` and `mqtt_topic` into what the engine needs.

use std::collections::BTreeMap;
use std::time::Duration;

use mqtt_pg_core::engine::{BrokerConfig, Protocol, Will, MQTT_MAX_PACKET};
use mqtt_pg_core::tls::TlsSettings;
use pgrx::prelude::*;
use pgrx::spi::SpiHeapTupleData;

use crate::api::listener::client_id_for;
use crate::security::access::{self, Operation};
use crate::security::secrets;

/// One active broker as configured.
pub struct Loaded {
    pub id: i32,
    /// None when the row asks for something this build cannot do; `problem` says what.
    pub config: Option<BrokerConfig>,
    pub subs: BTreeMap<String, u8>,
    /// Shown as the broker's last error: a setting that cannot be honoured, a bad filter.
    pub problem: Option<String>,
}

/// The `mqtt_broker` columns [`broker_config`] reads, in this order.
pub const BROKER_COLUMNS: &str = "id, name, host, port, username, password_sealed, use_tls, \
     client_id, keepalive, clean_session, reconnect_min_ms, reconnect_max_ms, max_packet_size, \
     tls_server_name, ca_cert, client_cert, client_key_sealed, will_topic, will_payload, \
     will_qos, will_retain, birth_payload, protocol_version, session_expiry, receive_maximum";

/// A broker row, selected as [`BROKER_COLUMNS`], as the engine's configuration, its secrets
/// opened. Err: why the row cannot be used as it is, in words for its status (never a secret).
pub fn broker_config(row: &SpiHeapTupleData<'_>) -> Result<BrokerConfig, String> {
    let get_i = |n| row.get::<i32>(n).ok().flatten().unwrap_or(0);
    let get_s = |n| row.get::<String>(n).ok().flatten();
    let get_b = |n| row.get::<bool>(n).ok().flatten().unwrap_or(false);
    let get_bytes = |n| row.get::<Vec<u8>>(n).ok().flatten();
    let id = get_i(1);
    let name = get_s(2).unwrap_or_default();
    let host = get_s(3).unwrap_or_default();
    let username = get_s(5);
    let server_name = get_s(14);
    let ca_cert = get_s(15);
    let port = match u16::try_from(get_i(4)) {
        Ok(port) if port > 0 => port,
        _ => return Err(format!("invalid port {} for broker \"{name}\"", get_i(4))),
    };
    let (password, client_key) = secrets::open(
        &name,
        &secrets::Sealed {
            endpoint: mqtt_pg_core::secret::Endpoint {
                host: &host,
                port: get_i(4),
                username: username.as_deref(),
                use_tls: get_b(7),
                ca_cert: ca_cert.as_deref(),
                server_name: server_name.as_deref(),
            },
            password: get_bytes(6),
            client_key: get_bytes(17),
        },
    )?;
    let (protocol, session_expiry, receive_maximum) = mqtt5_settings(
        &name,
        get_s(23).as_deref(),
        row.get::<i32>(24).ok().flatten(),
        row.get::<i32>(25).ok().flatten(),
    )?;
    let will = get_s(18).map(|topic| Will {
        topic,
        payload: get_s(19).unwrap_or_default().into_bytes(),
        qos: row.get::<i16>(20).ok().flatten().unwrap_or(0).clamp(0, 2) as u8,
        retain: get_b(21),
    });
    Ok(BrokerConfig {
        id,
        name,
        host,
        port,
        username,
        password,
        tls: get_b(7).then(|| TlsSettings {
            ca_cert,
            client_cert: get_s(16),
            client_key,
            server_name,
        }),
        birth_payload: will
            .as_ref()
            .and_then(|_| get_s(22))
            .map(String::into_bytes),
        will,
        client_id: client_id_for(id, get_s(8)),
        keepalive: Duration::from_secs(get_i(9).clamp(5, 65_535) as u64),
        clean_session: get_b(10),
        protocol,
        session_expiry,
        receive_maximum,
        max_packet_size: row
            .get::<i32>(13)
            .ok()
            .flatten()
            .map_or(MQTT_MAX_PACKET, |n| {
                (n.max(64) as usize).min(MQTT_MAX_PACKET)
            }),
        reconnect_min: Duration::from_millis(get_i(11).max(0) as u64),
        reconnect_max: Duration::from_millis(get_i(12).max(0) as u64),
        max_inflight: 100,
    })
}

/// The MQTT 5 columns of a broker row. The table's CHECKs keep them in range; a row that is
/// not (a CHECK dropped by hand) is refused in words for its status rather than clamped into
/// something nobody configured.
fn mqtt5_settings(
    name: &str,
    protocol: Option<&str>,
    session_expiry: Option<i32>,
    receive_maximum: Option<i32>,
) -> Result<(Protocol, Option<u32>, Option<u16>), String> {
    let protocol = match protocol {
        None => Protocol::default(),
        Some(p) => Protocol::parse(p).ok_or_else(|| {
            format!(
                "invalid protocol_version {:?} for broker \"{name}\": must be '3.1.1' or '5'",
                p.chars().take(20).collect::<String>()
            )
        })?,
    };
    let session_expiry = session_expiry
        .map(|s| {
            u32::try_from(s).map_err(|_| {
                format!(
                    "invalid session_expiry {s} for broker \"{name}\": must be 0 or more seconds"
                )
            })
        })
        .transpose()?;
    let receive_maximum = receive_maximum
        .map(|r| match u16::try_from(r) {
            Ok(r) if r > 0 => Ok(r),
            _ => Err(format!(
                "invalid receive_maximum {r} for broker \"{name}\": must be 1 to 65535"
            )),
        })
        .transpose()?;
    Ok((protocol, session_expiry, receive_maximum))
}

/// Load every active broker with its active subscriptions. Runs inside a transaction.
pub fn load(schema: &str) -> Vec<Loaded> {
    let mut out: Vec<Loaded> = Vec::new();
    Spi::connect(|client| {
        let rows = client.select(
            &format!("SELECT {BROKER_COLUMNS} FROM {schema}.mqtt_broker WHERE active ORDER BY id"),
            None,
            &[],
        );
        let Ok(rows) = rows else { return };
        for row in rows {
            let id = row.get::<i32>(1).ok().flatten().unwrap_or(0);
            let (config, problem) = match broker_config(&row) {
                Ok(config) => (Some(config), None),
                Err(problem) => (None, Some(problem)),
            };
            out.push(Loaded {
                id,
                config,
                subs: BTreeMap::new(),
                problem,
            });
        }
        let subs = client.select(
            &format!(
                "SELECT t.id, t.broker_id, t.name, t.qos, t.owner_role, r.oid FROM {schema}.mqtt_topic t \
                 LEFT JOIN pg_catalog.pg_roles r ON r.rolname OPERATOR(pg_catalog.=) t.owner_role \
                 WHERE t.subscribe AND t.active ORDER BY t.id"
            ),
            None,
            &[],
        );
        let Ok(subs) = subs else { return };
        let subs: Vec<_> = subs
            .map(|row| {
                (
                    row.get::<i32>(1).ok().flatten().unwrap_or(0),
                    row.get::<i32>(2).ok().flatten().unwrap_or(0),
                    row.get::<String>(3).ok().flatten().unwrap_or_default(),
                    row.get::<i16>(4).ok().flatten().unwrap_or(0).clamp(0, 2) as u8,
                    row.get::<String>(5).ok().flatten(),
                    row.get::<pg_sys::Oid>(6).ok().flatten(),
                )
            })
            .collect();
        for (topic_id, broker_id, filter, qos, owner_name, owner) in subs {
            let Some(b) = out.iter_mut().find(|b| b.id == broker_id) else {
                continue;
            };
            if let Err(why) = still_allowed(&filter, owner_name.as_deref(), owner) {
                b.problem = Some(format!(
                    "mqtt_topic {topic_id} (\"{filter}\") is not subscribed: {why}"
                ));
                continue;
            }
            // Rows inserted directly (as an Odoo model would) skip mqtt_subscribe's checks. A
            // filter naming its levels (plant/{line}/t) is subscribed with + for them.
            match mqtt_pg_core::template::NamedFilter::parse(&filter) {
                Ok(named) => {
                    let q = b.subs.entry(named.filter).or_insert(qos);
                    *q = (*q).max(qos);
                }
                Err(e) => {
                    b.problem = Some(format!(
                        "mqtt_topic {topic_id}: invalid topic filter \"{filter}\": {e}"
                    ));
                }
            }
        }
    });
    out
}

/// May the role that made a subscription still subscribe to it? Rules are checked when a
/// subscription is made, and again at every load: a rule the owner has since removed (or a
/// role dropped) ends the subscription, and so its routing. Rows without an owner_role predate
/// ownership and were made by a superuser.
fn still_allowed(
    filter: &str,
    owner_name: Option<&str>,
    owner: Option<pg_sys::Oid>,
) -> Result<(), String> {
    let Some(name) = owner_name else {
        return Ok(());
    };
    let Some(oid) = owner else {
        return Err(format!("its owner_role \"{name}\" does not exist"));
    };
    let subscribed = mqtt_pg_core::template::NamedFilter::parse(filter)
        .map(|f| f.filter)
        .unwrap_or_else(|_| filter.to_string());
    if access::allowed(oid, &subscribed, Operation::Subscribe) {
        Ok(())
    } else {
        Err(format!(
            "no rule in mqtt_access_control lets its role \"{name}\" subscribe to it any more"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt5_columns() {
        assert_eq!(
            mqtt5_settings("b", None, None, None).unwrap(),
            (Protocol::V311, None, None)
        );
        assert_eq!(
            mqtt5_settings("b", Some("5"), Some(0), Some(1)).unwrap(),
            (Protocol::V5, Some(0), Some(1))
        );
        assert_eq!(
            mqtt5_settings("b", Some("3.1.1"), Some(i32::MAX), Some(65_535)).unwrap(),
            (Protocol::V311, Some(i32::MAX as u32), Some(65_535))
        );
        for (p, s, r, want) in [
            (Some("4"), None, None, "protocol_version"),
            (Some("5.0"), None, None, "protocol_version"),
            (None, Some(-1), None, "session_expiry"),
            (None, None, Some(0), "receive_maximum"),
            (None, None, Some(65_536), "receive_maximum"),
        ] {
            let e = mqtt5_settings("b", p, s, r).unwrap_err();
            assert!(e.contains(want) && e.contains("\"b\""), "{e}");
        }
    }
}
