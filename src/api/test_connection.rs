//! `mqtt_test_connection`: one short connection to a broker, with a broker row's settings or
//! with settings given as arguments, made by the calling backend itself and reported as jsonb.
//!
//! The connection is `mqtt_pg_core::engine::probe`'s: the worker's options with a client id,
//! clean session and no will of its own, so the worker's connection to the same broker never
//! notices it. A connection that fails is an answer (`ok` false, the error in the words of
//! `mqtt_status`), not an SQL error; only bad arguments and missing privileges raise.
//!
//! Only this thread may call into Postgres. The probe runs on a current-thread tokio runtime
//! on this thread, 20 ms at a time with every signal blocked (so a thread tokio starts for a
//! name lookup never runs Postgres' handlers), and between slices `CHECK_FOR_INTERRUPTS`
//! honours query cancel, statement_timeout and termination; an ERROR there drops the probe,
//! which closes its socket.

use std::time::Duration;

use mqtt_pg_core::engine::{BrokerConfig, ProbeOutcome, Prober, Protocol, MQTT_MAX_PACKET};
use mqtt_pg_core::tls::{self, PemKind, TlsSettings};
use pgrx::datum::Interval;
use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::{json, Value};

use crate::api::broker;
use crate::errors::{self, INSUFFICIENT_PRIVILEGE, INVALID_PARAMETER, NOT_IN_PREREQUISITE_STATE};
use crate::signals::with_signals_blocked;
use crate::worker::config::{broker_config, BROKER_COLUMNS};
use crate::{catalog, security};

/// The longest `timeout` accepted: a test that needs more is not a test, and the call holds a
/// backend (and a snapshot) for as long as it waits.
const MAX_TIMEOUT: Duration = Duration::from_secs(300);

/// How long the probe runs between two looks at query cancel and statement_timeout.
const SLICE: Duration = Duration::from_millis(20);

/// Test the connection of a broker row (NULL: the default broker), with everything the worker
/// would use: host, port, user name and password, TLS with its CA, server name and client
/// certificate, keepalive and packet limit. Works whether its listener runs or not.
#[pg_extern(name = "mqtt_test_connection", volatile, parallel_unsafe)]
fn mqtt_test_connection_broker(
    broker: Option<&str>,
    timeout: default!(Option<Interval>, "'5 seconds'"),
) -> JsonB {
    require(Form::Broker);
    let timeout = checked_timeout(timeout);
    let schema = catalog::schema();
    let (name, config) = Spi::connect(|client| {
        let b = broker::resolve(client, &schema, broker);
        let row = client
            .select(
                &format!(
                    "SELECT {BROKER_COLUMNS} FROM {schema}.mqtt_broker \
                     WHERE id OPERATOR(pg_catalog.=) $1"
                ),
                Some(1),
                &[b.id.into()],
            )
            .unwrap_or_else(|e| errors::raise(errors::UNDEFINED_OBJECT, e.to_string(), None));
        let config = row.into_iter().next().map(|row| broker_config(&row));
        (b.name, config)
    });
    // `resolve` found it in this statement's snapshot, which the select shares.
    let config = config.unwrap_or_else(|| {
        errors::raise(
            errors::UNDEFINED_OBJECT,
            format!("MQTT broker \"{name}\" does not exist"),
            None,
        )
    });
    let mut out = match config {
        Ok(config) => result(&config, &run(&config, timeout)),
        // What the worker would show as the broker's last error (a password that cannot be
        // opened here, an invalid port): nothing was attempted.
        Err(problem) => json!({
            "ok": false,
            "error": problem,
            "connack": Value::Null,
            "session_present": Value::Null,
            "tls": Value::Null,
            "round_trip_ms": Value::Null,
            "host": Value::Null,
            "port": Value::Null,
            "client_id": Value::Null,
        }),
    };
    out["broker"] = json!(name);
    JsonB(out)
}

/// Test a connection with settings that are in no row: to try a broker before adding it.
#[allow(clippy::too_many_arguments)]
#[pg_extern(name = "mqtt_test_connection", volatile, parallel_unsafe)]
fn mqtt_test_connection_host(
    host: Option<&str>,
    port: Option<i32>,
    username: default!(Option<&str>, "NULL"),
    password: default!(Option<&str>, "NULL"),
    use_tls: default!(Option<bool>, false),
    ca_cert: default!(Option<&str>, "NULL"),
    client_cert: default!(Option<&str>, "NULL"),
    client_key: default!(Option<&str>, "NULL"),
    timeout: default!(Option<Interval>, "'5 seconds'"),
) -> JsonB {
    require(Form::Host);
    let timeout = checked_timeout(timeout);
    let host = match host {
        None => bad_argument(
            "host must not be NULL",
            "Pass the broker's host name or IP address.",
        ),
        Some(h) if h.trim().is_empty() => bad_argument(
            "host must not be empty",
            "Pass the broker's host name or IP address.",
        ),
        Some(h) => h,
    };
    let port = match port.map(u16::try_from) {
        Some(Ok(p)) if p > 0 => p,
        Some(_) => bad_argument(
            format!("port {} is out of range", port.unwrap_or(0)),
            "A TCP port is 1 to 65535: 1883 for plain MQTT, 8883 for MQTT over TLS.",
        ),
        None => bad_argument(
            "port must not be NULL",
            "A TCP port is 1 to 65535: 1883 for plain MQTT, 8883 for MQTT over TLS.",
        ),
    };
    if password.is_some() && username.is_none() {
        bad_argument(
            "password needs a username",
            "MQTT 3.1.1 sends a password only with a user name: pass username too.",
        );
    }
    for (what, value) in [("username", username), ("password", password)] {
        // Not the value: it may be a secret.
        if value.is_some_and(|v| v.len() > 65_535) {
            bad_argument(
                format!("{what} is longer than the 65,535 bytes MQTT allows"),
                "Pass a shorter value.",
            );
        }
    }
    let use_tls = use_tls.unwrap_or_else(|| {
        bad_argument(
            "use_tls must not be NULL",
            "Pass true for a TLS listener (usually port 8883), false for plain MQTT.",
        )
    });
    let has_tls_settings = ca_cert.is_some() || client_cert.is_some() || client_key.is_some();
    if !use_tls && has_tls_settings {
        bad_argument(
            "ca_cert, client_cert and client_key are TLS settings, but use_tls is false",
            "Pass use_tls => true to connect over TLS with them, or leave them out.",
        );
    }
    let tls = use_tls.then(|| checked_tls(ca_cert, client_cert, client_key));
    let config = BrokerConfig {
        id: 0,
        name: format!("{host}:{port}"),
        host: host.to_string(),
        port,
        username: username.map(str::to_string),
        password: password.map(str::to_string),
        // Never connected with (the probe makes its own); what a new row would get.
        client_id: String::new(),
        // The defaults of a new mqtt_broker row (sql/schema.sql), as the worker reads them.
        keepalive: Duration::from_secs(60),
        clean_session: true,
        protocol: Protocol::default(),
        session_expiry: None,
        receive_maximum: None,
        max_packet_size: MQTT_MAX_PACKET,
        reconnect_min: Duration::from_millis(500),
        reconnect_max: Duration::from_millis(30_000),
        max_inflight: 100,
        tls,
        will: None,
        birth_payload: None,
    };
    JsonB(result(&config, &run(&config, timeout)))
}

/// Which form is called (see [`require`]).
#[derive(Clone, Copy)]
enum Form {
    Broker,
    Host,
}

/// Refuse (42501) a caller who may not use this form. The checks are the table privileges
/// that already give the same power, so the function adds none (README "Three roles"):
///
/// * A broker row's form connects to where the row points with its secrets, which is what
///   starting its listener does: it takes what `mqtt_start_listener` takes, SELECT on
///   `mqtt_broker` and UPDATE of its `active` column.
/// * The host form makes the database server open a connection to any host and port, a port
///   scanner in the wrong hands: it takes INSERT on `mqtt_broker`, whose holders can already
///   make the worker connect anywhere (a row inserted with `active = true`).
///
/// The database owner holds both (and may grant them); superusers pass every check. Checked
/// before anything else, so a refused caller learns nothing, not even whether a broker exists.
fn require(form: Form) {
    let table = format!("{}.mqtt_broker", catalog::schema());
    let role = security::current_role();
    let (query, hint) = match form {
        Form::Broker => (
            "SELECT pg_catalog.has_table_privilege($1, $2, 'SELECT') \
             AND pg_catalog.has_column_privilege($1, $2, 'active', 'UPDATE')",
            "Testing a broker's connection takes what starting its listener takes: SELECT on \
             mqtt_broker and UPDATE of its active column, which the database owner has and can \
             grant.",
        ),
        Form::Host => (
            "SELECT pg_catalog.has_table_privilege($1, $2, 'INSERT')",
            "Testing a connection to a host and port of your choice takes INSERT on mqtt_broker \
             (which can point the worker anywhere), which the database owner has and can grant; \
             mqtt_test_connection(broker) tests a configured broker.",
        ),
    };
    let allowed = Spi::get_one_with_args::<bool>(query, &[role.into(), table.as_str().into()])
        .ok()
        .flatten()
        .unwrap_or(false);
    if !allowed {
        errors::raise(
            INSUFFICIENT_PRIVILEGE,
            match form {
                Form::Broker => "permission denied to test the connection of an MQTT broker",
                Form::Host => "permission denied to test a connection to an MQTT host",
            },
            Some(hint),
        );
    }
}

/// `timeout` as a duration: more than zero and at most [`MAX_TIMEOUT`].
fn checked_timeout(timeout: Option<Interval>) -> Duration {
    const HINT: &str = "Pass a timeout above zero and at most 5 minutes, such as '5 seconds'.";
    let Some(timeout) = timeout else {
        bad_argument("timeout must not be NULL", HINT)
    };
    // Months count as 30 days, as PostgreSQL compares intervals; infinite ones fall outside.
    let micros = timeout.as_micros();
    if micros <= 0 || micros > MAX_TIMEOUT.as_micros() as i128 {
        bad_argument(
            "timeout is out of range: above zero and at most 5 minutes",
            HINT,
        );
    }
    Duration::from_micros(micros as u64)
}

/// The TLS arguments, checked as the `mqtt_broker` columns are when a row is written (22023,
/// naming the argument and never quoting it).
fn checked_tls(
    ca_cert: Option<&str>,
    client_cert: Option<&str>,
    client_key: Option<&str>,
) -> TlsSettings {
    let hint = "Pass PEM text itself (-----BEGIN CERTIFICATE----- ... for ca_cert and \
                client_cert, the unencrypted -----BEGIN PRIVATE KEY----- ... of client_cert for \
                client_key), both client_cert and client_key or neither.";
    let settings = TlsSettings {
        ca_cert: ca_cert.map(str::to_string),
        client_cert: client_cert.map(str::to_string),
        client_key: client_key.map(str::to_string),
        server_name: None,
    };
    // Each PEM on its own first, so the message names the argument that is wrong; then the
    // pair (both or neither, and belonging together).
    let checked = [
        ("ca_cert", ca_cert, PemKind::CaCert),
        ("client_cert", client_cert, PemKind::ClientCert),
        ("client_key", client_key, PemKind::ClientKey),
    ]
    .into_iter()
    .filter_map(|(argument, value, kind)| value.map(|pem| tls::check_pem(argument, pem, kind)))
    .collect::<Result<(), String>>()
    .and_then(|()| tls::check_settings(&settings));
    if let Err(e) = checked {
        // The messages name the mqtt_broker columns these arguments stand for.
        bad_argument(e.replace("mqtt_broker.", ""), hint);
    }
    settings
}

fn bad_argument(message: impl Into<String>, hint: &str) -> ! {
    errors::raise(INVALID_PARAMETER, message, Some(hint))
}

/// Run the probe to its end on this thread, honouring interrupts between slices.
fn run(config: &BrokerConfig, timeout: Duration) -> ProbeOutcome {
    let mut prober = with_signals_blocked(|| Prober::new(config, timeout)).unwrap_or_else(|e| {
        errors::raise(
            NOT_IN_PREREQUISITE_STATE,
            format!("mqtt_pg could not start the test connection: {e}"),
            Some("The server may be out of file descriptors or memory; try again."),
        )
    });
    loop {
        if let Some(outcome) = with_signals_blocked(|| prober.run_for(SLICE)) {
            return outcome;
        }
        // Query cancel, statement_timeout, pg_terminate_backend: an ERROR unwinds from here,
        // dropping the prober and with it the connection.
        pgrx::check_for_interrupts!();
    }
}

/// The jsonb answer for a probe of `config`.
fn result(config: &BrokerConfig, o: &ProbeOutcome) -> Value {
    json!({
        "ok": o.ok,
        "error": o.error,
        "connack": o.connack,
        "session_present": o.session_present,
        "tls": o.tls,
        // Milliseconds with microseconds as decimals.
        "round_trip_ms": (o.round_trip.as_secs_f64() * 1e6).round() / 1e3,
        "host": config.host,
        "port": config.port,
        "client_id": o.client_id,
    })
}
