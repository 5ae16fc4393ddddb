//! `mqtt_access_control`: the rules that let a role publish and subscribe.
//!
//! A role's rules are read once per transaction and kept in this backend, so a bulk publish of
//! 100,000 rows costs one query, not 100,000: the decision itself is a match in Rust
//! (`mqtt_pg_core::acl`). The cache is dropped at the end of every transaction and whenever
//! `mqtt_access_control` is written in this one (a statement trigger), so a transaction sees its
//! own rule changes and every later transaction sees committed ones.

use std::cell::RefCell;
use std::collections::HashMap;

use mqtt_pg_core::acl::{self, Rule};
use pgrx::prelude::*;
use pgrx::{register_xact_callback, PgBuiltInOids, PgOid, PgXactCallbackEvent};

use crate::errors::{self, INVALID_PARAMETER, UNDEFINED_OBJECT};
use crate::{catalog, plans, security};

/// What a rule is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Publish,
    Subscribe,
}

impl Operation {
    fn verb(self) -> &'static str {
        match self {
            Operation::Publish => "publish to",
            Operation::Subscribe => "subscribe to",
        }
    }
    fn column(self) -> &'static str {
        match self {
            Operation::Publish => "allow_publish",
            Operation::Subscribe => "allow_subscribe",
        }
    }
}

/// Rules per role oid, read in one (sub)transaction.
struct Cache {
    /// Rules read in another subtransaction may come from rows a ROLLBACK TO SAVEPOINT has
    /// undone since (or miss rows its RELEASE brought in): read again.
    subxact: pg_sys::SubTransactionId,
    rules: HashMap<u32, Vec<Rule>>,
}

thread_local! {
    /// For the current transaction only.
    static CACHE: RefCell<Option<Cache>> = const { RefCell::new(None) };
}

fn forget() {
    // try_borrow_mut: this runs in transaction callbacks, where a panic would stop the server.
    CACHE.with(|c| {
        if let Ok(mut c) = c.try_borrow_mut() {
            *c = None;
        }
    });
}

/// Run `f` on the rules that apply to `role`: its own, those of roles whose privileges it
/// inherits, and those for 'public'. Read as the extension's owner, since the role itself need not be able to
/// read the table.
fn with_rules<R>(role: pg_sys::Oid, f: impl FnOnce(&[Rule]) -> R) -> R {
    let key = role.to_u32();
    // SAFETY: a plain read of the transaction state.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let cached = CACHE.with(|c| {
        c.borrow()
            .as_ref()
            .is_some_and(|c| c.subxact == subxact && c.rules.contains_key(&key))
    });
    if !cached {
        remember(subxact, key, load_rules(role));
    }
    CACHE.with(|c| {
        let c = c.borrow();
        f(c.as_ref()
            .and_then(|c| c.rules.get(&key))
            .map_or(&[], Vec::as_slice))
    })
}

/// Read `role`'s rules from the table (through a kept plan: this runs in every transaction
/// that publishes).
fn load_rules(role: pg_sys::Oid) -> Vec<Rule> {
    let installed = catalog::installed_or_raise();
    let schema = &installed.schema;
    let sql = || {
        format!(
            "SELECT a.topic_filter, a.allow_publish, a.allow_subscribe \
             FROM {schema}.mqtt_access_control a \
             WHERE a.role_name OPERATOR(pg_catalog.=) 'public' OR EXISTS ( \
               SELECT FROM pg_catalog.pg_roles r \
               WHERE r.rolname OPERATOR(pg_catalog.=) a.role_name::pg_catalog.name \
                 AND pg_catalog.pg_has_role($1, r.oid, 'USAGE'))"
        )
    };
    let types = [PgOid::BuiltIn(PgBuiltInOids::OIDOID)];
    security::as_extension_owner(|| {
        Spi::connect_mut(|client| {
            plans::with_plan(
                client,
                installed.oid,
                "access_rules",
                &types,
                sql,
                |client, stmt| {
                    let mut out = Vec::new();
                    if let Ok(rows) = client.select(stmt, None, &[role.into()]) {
                        for row in rows {
                            let filter: Option<String> = row.get(1).ok().flatten();
                            let publish: bool = row.get(2).ok().flatten().unwrap_or(false);
                            let subscribe: bool = row.get(3).ok().flatten().unwrap_or(false);
                            if let Some(filter) = filter {
                                out.push(Rule {
                                    filter,
                                    publish,
                                    subscribe,
                                });
                            }
                        }
                    }
                    out
                },
            )
        })
    })
}

fn remember(subxact: pg_sys::SubTransactionId, key: u32, rules: Vec<Rule>) {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            // First look-up in this transaction: forget it all when the transaction ends.
            for event in [
                PgXactCallbackEvent::Commit,
                PgXactCallbackEvent::Abort,
                PgXactCallbackEvent::PrePrepare,
            ] {
                register_xact_callback(event, forget);
            }
        }
        let cache = c.get_or_insert_with(|| Cache {
            subxact,
            rules: HashMap::new(),
        });
        if cache.subxact != subxact {
            *cache = Cache {
                subxact,
                rules: HashMap::new(),
            };
        }
        cache.rules.insert(key, rules);
    });
}

/// The decision for `role` (superusers are never checked).
pub fn allowed(role: pg_sys::Oid, topic: &str, op: Operation) -> bool {
    if security::is_superuser(role) {
        return true;
    }
    with_rules(role, |rules| match op {
        Operation::Publish => acl::may_publish(rules, topic),
        Operation::Subscribe => acl::may_subscribe(rules, topic),
    })
}

/// Raise 42501 unless the current role may `op` `topic`. Nothing has been written yet when
/// this raises, so a denied call changes nothing.
pub fn require(topic: &str, op: Operation) {
    let role = security::current_role();
    if allowed(role, topic, op) {
        return;
    }
    let name = role_name(role).unwrap_or_else(|| format!("oid {}", role.to_u32()));
    let shown: String = topic.chars().take(80).collect();
    errors::raise(
        errors::INSUFFICIENT_PRIVILEGE,
        format!(
            "role \"{name}\" may not {} MQTT topic \"{shown}\"",
            op.verb()
        ),
        Some(&format!(
            "No rule in mqtt_access_control allows it. The database owner can add one: \
             INSERT INTO mqtt_access_control (role_name, topic_filter, {}) VALUES ('{name}', '...', true);",
            op.column()
        )),
    )
}

fn role_name(role: pg_sys::Oid) -> Option<String> {
    Spi::get_one_with_args::<String>(
        "SELECT rolname::text FROM pg_catalog.pg_roles WHERE oid OPERATOR(pg_catalog.=) $1",
        &[role.into()],
    )
    .ok()
    .flatten()
}

/// Internal, behind `mqtt_check_permission(role name, ...)` (finalize.sql): the access-control
/// decision for `role`: may it publish to (`operation` 'publish') or subscribe to
/// ('subscribe') `topic`? Any role may ask about itself and the roles it inherits from; asking
/// about others takes the right to read mqtt_access_control.
#[pg_extern(stable, parallel_safe)]
fn _mqtt_check_permission(
    role: Option<&str>,
    topic: Option<&str>,
    operation: Option<&str>,
) -> bool {
    let op = match operation.map(str::to_ascii_lowercase).as_deref() {
        Some("publish") => Operation::Publish,
        Some("subscribe") => Operation::Subscribe,
        other => errors::raise(
            INVALID_PARAMETER,
            format!(
                "invalid operation {}: must be 'publish' or 'subscribe'",
                other.map_or("NULL".to_string(), |o| format!("\"{o}\""))
            ),
            None,
        ),
    };
    let topic =
        topic.unwrap_or_else(|| errors::raise(INVALID_PARAMETER, "topic must not be NULL", None));
    let checked = match op {
        Operation::Publish => mqtt_pg_core::topic::validate_topic(topic),
        Operation::Subscribe => mqtt_pg_core::topic::validate_filter(topic),
    };
    if let Err(e) = checked {
        errors::bad_topic(
            if op == Operation::Publish {
                "topic"
            } else {
                "topic filter"
            },
            topic,
            &e,
        );
    }
    let role =
        role.unwrap_or_else(|| errors::raise(INVALID_PARAMETER, "role must not be NULL", None));
    let oid = Spi::get_one_with_args::<pg_sys::Oid>(
        "SELECT oid FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) $1::pg_catalog.name",
        &[role.into()],
    )
    .ok()
    .flatten()
    .unwrap_or_else(|| {
        errors::raise(
            UNDEFINED_OBJECT,
            format!("role \"{role}\" does not exist"),
            None,
        )
    });
    let caller = security::current_role();
    let schema = catalog::schema();
    let table = format!("{schema}.mqtt_access_control");
    let may_ask = Spi::get_one_with_args::<bool>(
        "SELECT pg_catalog.pg_has_role($1, $2, 'USAGE') OR \
         pg_catalog.has_table_privilege($1, $3, 'SELECT')",
        &[caller.into(), oid.into(), table.as_str().into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if !may_ask {
        errors::raise(
            errors::INSUFFICIENT_PRIVILEGE,
            format!("permission denied to check the MQTT access rules of role \"{role}\""),
            Some("A role may check its own rules; checking another's takes SELECT on mqtt_access_control."),
        );
    }
    allowed(oid, topic, op)
}

/// Internal: raise 42501 unless the current role may subscribe to `filter`. Called by the
/// trigger on `mqtt_topic`, so subscriptions inserted directly are checked like
/// `mqtt_subscribe`'s.
#[pg_extern(stable)]
fn _mqtt_require_subscribe(filter: Option<&str>) {
    if let Some(filter) = filter {
        require(filter, Operation::Subscribe);
    }
}

/// Internal: `mqtt_access_control` changed in this transaction; read the rules afresh.
#[pg_extern(volatile)]
fn _mqtt_access_changed() {
    forget();
}
