//! Broker secrets: sealed with this server's key when written, opened only to connect with
//! them: by the worker, and by `mqtt_test_connection(broker)` for its one test connection (to
//! the endpoint the password is bound to, never shown).
//!
//! Writes go through the triggers in finalize.sql, which call the sealing functions below and
//! leave `password` / `client_key` NULL in the row; there is no SQL function that returns an
//! opened value. The key is a file in the data directory (`mqtt_pg_secret.key`, mode 0600, readable by
//! the postgres OS user only), made by the first backend that needs it. Why sealing at all, and
//! why a password is bound to its endpoint: see `mqtt_pg_core::secret`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use mqtt_pg_core::secret::{self, KEY_LEN};
use mqtt_pg_core::tls;
use pgrx::prelude::*;

use crate::errors::{self, INVALID_PARAMETER};

const KEY_FILE: &str = "mqtt_pg_secret.key";

fn key_path() -> PathBuf {
    // SAFETY: DataDir is set before any backend or worker runs extension code.
    let dir = unsafe { std::ffi::CStr::from_ptr(pg_sys::DataDir) };
    PathBuf::from(dir.to_string_lossy().into_owned()).join(KEY_FILE)
}

/// This server's key, made on first use (by a backend sealing a secret, or by the worker
/// meeting a sealed value restored from another server, which then fails to open as it should).
pub fn server_key() -> Result<[u8; KEY_LEN], String> {
    let path = key_path();
    match fs::read(&path) {
        Ok(bytes) => {
            return bytes.try_into().map_err(|_| {
                format!(
                    "the mqtt_pg key file {} is damaged (not {KEY_LEN} bytes)",
                    path.display()
                )
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(format!(
                "cannot read the mqtt_pg key file {}: {e}",
                path.display()
            ))
        }
    }
    // Write a private temporary file, then link it into place: of two backends racing here,
    // one link wins and both read back the winner's key.
    let key = secret::new_key().map_err(|e| e.to_string())?;
    // SAFETY: a plain read of the process id.
    let tmp = path.with_extension(format!("tmp.{}", unsafe { libc::getpid() }));
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(&key)?;
            f.sync_all()
        });
    let linked = written.and_then(|()| match fs::hard_link(&tmp, &path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    });
    let _ = fs::remove_file(&tmp);
    linked.map_err(|e| format!("cannot create the mqtt_pg key file {}: {e}", path.display()))?;
    let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o600));
    server_key()
}

fn sealing_key() -> [u8; KEY_LEN] {
    server_key().unwrap_or_else(|e| {
        errors::raise(
            errors::NOT_IN_PREREQUISITE_STATE,
            format!("cannot store the secret: {e}"),
            Some(
                "The key file lives in the data directory; check that PostgreSQL can write there.",
            ),
        )
    })
}

fn sealed(context: &[u8], plaintext: &str) -> Vec<u8> {
    secret::seal(&sealing_key(), context, plaintext.as_bytes()).unwrap_or_else(|e| {
        errors::raise(
            errors::NOT_IN_PREREQUISITE_STATE,
            format!("cannot store the secret: {e}"),
            None,
        )
    })
}

/// Internal (the `mqtt_broker` triggers): seal a password for the endpoint it is sent to.
#[pg_extern(volatile)]
fn _mqtt_seal_password(
    password: &str,
    host: Option<&str>,
    port: Option<i32>,
    username: Option<&str>,
    use_tls: Option<bool>,
    ca_cert: Option<&str>,
    tls_server_name: Option<&str>,
) -> Vec<u8> {
    if password.len() > 65_535 {
        errors::raise(
            INVALID_PARAMETER,
            format!(
                "mqtt_broker.password is {} bytes; MQTT allows 65,535",
                password.len()
            ),
            None,
        );
    }
    let context = secret::password_context(&secret::Endpoint {
        host: host.unwrap_or(""),
        port: port.unwrap_or(0),
        username,
        use_tls: use_tls.unwrap_or(false),
        ca_cert,
        server_name: tls_server_name,
    });
    sealed(&context, password)
}

/// Internal (the `mqtt_broker` triggers): check a PEM client key (and, when the row has a
/// certificate, that the two are a pair), then seal it. The error never shows any of the key.
#[pg_extern(volatile)]
fn _mqtt_seal_client_key(client_key: &str, client_cert: Option<&str>) -> Vec<u8> {
    let checked = match client_cert {
        Some(cert) => tls::check_settings(&tls::TlsSettings {
            ca_cert: None,
            client_cert: Some(cert.to_string()),
            client_key: Some(client_key.to_string()),
            server_name: None,
        }),
        // Without a certificate the row is refused by the trigger's own check ("set together").
        None => tls::check_pem(
            "mqtt_broker.client_key",
            client_key,
            tls::PemKind::ClientKey,
        ),
    };
    if let Err(e) = checked {
        errors::raise(
            INVALID_PARAMETER,
            e,
            Some("client_key takes the unencrypted PEM private key (-----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY) of client_cert."),
        );
    }
    sealed(&secret::client_key_context(), client_key)
}

/// What the worker needs to open one broker's secrets.
pub struct Sealed<'a> {
    pub endpoint: secret::Endpoint<'a>,
    pub password: Option<Vec<u8>>,
    pub client_key: Option<Vec<u8>>,
}

/// Open a broker's secrets, to connect with them (the worker, a test connection). An error
/// names the column and what to do, never the value.
pub fn open(broker: &str, s: &Sealed<'_>) -> Result<(Option<String>, Option<String>), String> {
    if s.password.is_none() && s.client_key.is_none() {
        return Ok((None, None));
    }
    let key = server_key()?;
    let one = |column: &str, context: Vec<u8>, value: &Option<Vec<u8>>| {
        value
            .as_ref()
            .map(|v| {
                let plain = secret::open(&key, &context, v).map_err(|e| {
                    format!(
                        "mqtt_broker.{column} of broker \"{broker}\" cannot be used: {e}; set it again \
                         (UPDATE mqtt_broker SET {column} = '...' WHERE name = '{broker}')"
                    )
                })?;
                String::from_utf8(plain)
                    .map_err(|_| format!("mqtt_broker.{column} of broker \"{broker}\" is not UTF-8"))
            })
            .transpose()
    };
    let password = one(
        "password",
        secret::password_context(&s.endpoint),
        &s.password,
    )?;
    let client_key = one("client_key", secret::client_key_context(), &s.client_key)?;
    Ok((password, client_key))
}
