//! Resolving the `broker` argument every function takes.

use pgrx::spi::{Spi, SpiClient};

use crate::catalog;
use crate::errors::{self, UNDEFINED_OBJECT};

/// Run `f` with an SPI connection, the extension's quoted schema and the resolved broker: the
/// shape of every function that acts on one broker.
pub fn with_broker<R>(
    name: Option<&str>,
    f: impl FnOnce(&mut SpiClient<'_>, &str, &Broker) -> R,
) -> R {
    let schema = catalog::schema();
    Spi::connect_mut(|client| {
        let b = resolve(client, &schema, name);
        f(client, &schema, &b)
    })
}

/// A broker row as the functions need it.
pub struct Broker {
    pub id: i32,
    pub name: String,
}

/// NULL means the broker with `is_default`, or the only one when exactly one exists.
pub fn resolve(client: &SpiClient<'_>, schema: &str, name: Option<&str>) -> Broker {
    match name {
        Some(name) => {
            let row = client
                .select(
                    &format!(
                        "SELECT id, name FROM {schema}.mqtt_broker WHERE name OPERATOR(pg_catalog.=) $1"
                    ),
                    Some(1),
                    &[name.into()],
                )
                .ok()
                .and_then(|t| t.first().get_two::<i32, String>().ok());
            match row {
                Some((Some(id), Some(name))) => Broker { id, name },
                _ => errors::raise(
                    UNDEFINED_OBJECT,
                    format!("MQTT broker \"{name}\" does not exist"),
                    Some("SELECT name FROM mqtt_broker; lists the configured brokers."),
                ),
            }
        }
        None => {
            let rows = client
                .select(
                    &format!(
                        "SELECT id, name, is_default FROM {schema}.mqtt_broker \
                         ORDER BY is_default DESC, id LIMIT 2"
                    ),
                    None,
                    &[],
                )
                .unwrap_or_else(|e| errors::raise(UNDEFINED_OBJECT, e.to_string(), None));
            let mut found = Vec::new();
            for row in rows {
                let id: Option<i32> = row.get(1).ok().flatten();
                let name: Option<String> = row.get(2).ok().flatten();
                let is_default: bool = row.get(3).ok().flatten().unwrap_or(false);
                if let (Some(id), Some(name)) = (id, name) {
                    found.push((id, name, is_default));
                }
            }
            match found.as_slice() {
                [(id, name, true), ..] | [(id, name, false)] => Broker {
                    id: *id,
                    name: name.clone(),
                },
                [] => errors::raise(
                    UNDEFINED_OBJECT,
                    "no MQTT broker is configured",
                    Some("Add one: INSERT INTO mqtt_broker (name, host, port) VALUES ('local', '127.0.0.1', 1883);"),
                ),
                _ => errors::raise(
                    UNDEFINED_OBJECT,
                    "no default MQTT broker: several brokers exist and none has is_default",
                    Some("Pass the broker name, or mark one: UPDATE mqtt_broker SET is_default = true WHERE name = '...';"),
                ),
            }
        }
    }
}

/// Internal: the id of the broker a `broker` argument names, resolved and checked as every
/// function does (for the SQL-language functions in finalize.sql).
#[pgrx::pg_extern(stable, parallel_safe)]
fn _mqtt_broker_id(broker: pgrx::default!(Option<&str>, "NULL")) -> i32 {
    with_broker(broker, |_, _, b| b.id)
}
