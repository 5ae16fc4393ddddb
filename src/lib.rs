//! mqtt_pg: MQTT for PostgreSQL. See README.md for what it does and how; each module's doc says
//! why it is built the way it is.

use pgrx::prelude::*;

mod api;
mod catalog;
mod ddl;
mod errors;
mod gucs;
mod history;
mod launcher;
mod plans;
mod routing;
mod security;
mod shmem;
mod signals;
mod triggers;
mod wake;
mod worker;

::pgrx::pg_module_magic!();

// Tables, views and triggers: the first part of the install script, the SQL wrappers last.
extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: plain reads of postmaster globals.
    let (upgrading, preloading) = unsafe {
        (
            pg_sys::IsBinaryUpgrade,
            pg_sys::process_shared_preload_libraries_in_progress,
        )
    };
    if upgrading {
        return; // pg_upgrade must be able to load the library without side effects
    }
    if !preloading {
        errors::raise(
            errors::NOT_IN_PREREQUISITE_STATE,
            "mqtt_pg must be loaded via shared_preload_libraries",
            Some("Add mqtt_pg to shared_preload_libraries in postgresql.conf (shared_preload_libraries = 'mqtt_pg') and restart PostgreSQL."),
        );
    }
    gucs::init();
    shmem::init();
    launcher::register();
    ddl::init();
    catalog::init();
    triggers::pending::init();
}
