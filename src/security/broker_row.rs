//! Checks on a `mqtt_broker` row as it is written (called by its trigger), so a PEM that does
//! not parse or a will without a topic is refused at once with the column named, instead of
//! surfacing later as a connection error.

use mqtt_pg_core::tls::{self, PemKind};
use pgrx::prelude::*;

use crate::errors::{self, INVALID_PARAMETER};

/// Internal: raise 22023 for the first problem in these columns of a broker row.
#[pg_extern(immutable, parallel_safe)]
fn _mqtt_check_broker(ca_cert: Option<&str>, client_cert: Option<&str>, will_topic: Option<&str>) {
    for (column, value, kind) in [
        ("mqtt_broker.ca_cert", ca_cert, PemKind::CaCert),
        ("mqtt_broker.client_cert", client_cert, PemKind::ClientCert),
    ] {
        if let Some(pem) = value {
            if let Err(e) = tls::check_pem(column, pem, kind) {
                errors::raise(
                    INVALID_PARAMETER,
                    e,
                    Some("Paste the PEM text itself, -----BEGIN CERTIFICATE----- to -----END CERTIFICATE-----."),
                );
            }
        }
    }
    if let Some(topic) = will_topic {
        if let Err(e) = mqtt_pg_core::topic::validate_topic(topic) {
            errors::bad_topic("topic in mqtt_broker.will_topic", topic, &e);
        }
    }
}
