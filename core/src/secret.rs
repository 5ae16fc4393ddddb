//! Sealing broker secrets (passwords, client keys) so that only this server can read them.
//!
//! Why seal instead of hiding a column: Odoo backs its database up with `pg_dump` run as the
//! database owner, and `pg_dump` copies every column of `mqtt_broker`. A plain secret column
//! would either break the dump (no SELECT privilege) or hand the owner the secret. A sealed
//! value can be dumped, restored and read by the owner as bytes without telling anything; only
//! a process holding this server's key (a file in the data directory, readable by the
//! `postgres` OS user alone) can open it.
//!
//! The sealed value is bound to a context: the column it belongs to and, for a password, the
//! endpoint it is sent to and how (host, port, user name, TLS on or off, the CA trusted, the TLS
//! server name): switching TLS off, or trusting another CA, would hand the password to whoever
//! is on the network path. Whoever may edit a broker
//! row but not read its password cannot copy the sealed bytes to a row of their own, or point
//! the row at a host of their own, and have the worker send the password there: the worker
//! cannot open it in the new context and says "set it again".
//!
//! Format: version byte 1, 12-byte random nonce, AES-256-GCM ciphertext with its tag.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};

/// Length of the server key, bytes.
pub const KEY_LEN: usize = 32;
const VERSION: u8 = 1;

/// Why a sealed value could not be opened. Never carries any byte of the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretError {
    /// Not a sealed value at all (too short, unknown version).
    Malformed,
    /// Sealed by another server, or for another context (the row was copied or its endpoint
    /// changed since the secret was set).
    WrongKeyOrContext,
    /// The system's random source failed (never expected).
    Random,
}

impl std::fmt::Display for SecretError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SecretError::Malformed => "the stored value is not a sealed secret",
            SecretError::WrongKeyOrContext => {
                "it was sealed by another server (a restored dump) or for another endpoint (host, \
                 port, user name, TLS settings: the row was changed or copied since it was set)"
            }
            SecretError::Random => "the system's random number generator failed",
        })
    }
}

impl std::error::Error for SecretError {}

/// A fresh random server key.
pub fn new_key() -> Result<[u8; KEY_LEN], SecretError> {
    let mut key = [0u8; KEY_LEN];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| SecretError::Random)?;
    Ok(key)
}

/// Where and how a password is sent: what it is bound to.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint<'a> {
    pub host: &'a str,
    pub port: i32,
    pub username: Option<&'a str>,
    pub use_tls: bool,
    pub ca_cert: Option<&'a str>,
    pub server_name: Option<&'a str>,
}

/// The context a password is bound to: the column and its endpoint.
pub fn password_context(e: &Endpoint<'_>) -> Vec<u8> {
    // Length-prefixed fields (NUL standing for NULL, which no text holds), so no two different
    // endpoints give the same bytes.
    let mut out = Vec::new();
    for field in [
        "mqtt_broker.password",
        e.host,
        &e.port.to_string(),
        e.username.unwrap_or("\u{0}"),
        if e.use_tls { "tls" } else { "plain" },
        e.ca_cert.unwrap_or("\u{0}"),
        e.server_name.unwrap_or("\u{0}"),
    ] {
        out.extend_from_slice(&(field.len() as u32).to_be_bytes());
        out.extend_from_slice(field.as_bytes());
    }
    out
}

/// The context a client key is bound to. A client key only signs the TLS handshake and is never
/// sent, so pointing the row elsewhere reveals nothing: it is bound to its column alone.
pub fn client_key_context() -> Vec<u8> {
    b"mqtt_broker.client_key".to_vec()
}

fn cipher(key: &[u8; KEY_LEN]) -> LessSafeKey {
    // A 32-byte key always fits AES-256.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte AES-256 key"))
}

/// Seal `plaintext` for `context`.
pub fn seal(key: &[u8; KEY_LEN], context: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, SecretError> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| SecretError::Random)?;
    let mut data = plaintext.to_vec();
    cipher(key)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(context),
            &mut data,
        )
        .map_err(|_| SecretError::Random)?;
    let mut out = Vec::with_capacity(1 + NONCE_LEN + data.len());
    out.push(VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&data);
    Ok(out)
}

/// Open a value sealed by [`seal`] with the same key and context.
pub fn open(key: &[u8; KEY_LEN], context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SecretError> {
    let tag_len = AES_256_GCM.tag_len();
    if sealed.len() < 1 + NONCE_LEN + tag_len || sealed[0] != VERSION {
        return Err(SecretError::Malformed);
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&sealed[1..1 + NONCE_LEN]);
    let mut data = sealed[1 + NONCE_LEN..].to_vec();
    let plain = cipher(key)
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(context),
            &mut data,
        )
        .map_err(|_| SecretError::WrongKeyOrContext)?;
    Ok(plain.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn endpoint(host: &str) -> Endpoint<'_> {
        Endpoint {
            host,
            port: 8883,
            username: Some("odoo"),
            use_tls: true,
            ca_cert: None,
            server_name: None,
        }
    }

    #[test]
    fn round_trip_and_binding() {
        let key = new_key().unwrap();
        let ctx = password_context(&endpoint("broker.example"));
        let sealed = seal(&key, &ctx, b"s3cret").unwrap();
        assert_eq!(open(&key, &ctx, &sealed).unwrap(), b"s3cret");
        assert!(!sealed.windows(6).any(|w| w == b"s3cret"));
        // Another host, port, user, server name, column or server key: refused.
        let base = endpoint("broker.example");
        for other in [
            password_context(&endpoint("evil.example")),
            password_context(&Endpoint { port: 1883, ..base }),
            password_context(&Endpoint {
                username: None,
                ..base
            }),
            password_context(&Endpoint {
                use_tls: false,
                ..base
            }),
            password_context(&Endpoint {
                ca_cert: Some("-----BEGIN CERTIFICATE-----"),
                ..base
            }),
            password_context(&Endpoint {
                server_name: Some("x"),
                ..base
            }),
            client_key_context(),
        ] {
            assert_eq!(
                open(&key, &other, &sealed),
                Err(SecretError::WrongKeyOrContext)
            );
        }
        assert_eq!(
            open(&new_key().unwrap(), &ctx, &sealed),
            Err(SecretError::WrongKeyOrContext)
        );
        // Two seals of the same secret differ (random nonce).
        assert_ne!(seal(&key, &ctx, b"s3cret").unwrap(), sealed);
    }

    #[test]
    fn contexts_do_not_collide_on_field_boundaries() {
        let ab = Endpoint {
            username: Some("c"),
            ..endpoint("ab")
        };
        let a = Endpoint {
            username: Some("bc"),
            ..endpoint("a")
        };
        assert_ne!(password_context(&ab), password_context(&a));
    }

    proptest! {
        #[test]
        fn open_never_panics_and_tampering_is_caught(
            secret in proptest::collection::vec(any::<u8>(), 0..300),
            junk in proptest::collection::vec(any::<u8>(), 0..100),
            flip in 0usize..400,
        ) {
            let key = [7u8; KEY_LEN];
            let ctx = client_key_context();
            prop_assert!(open(&key, &ctx, &junk).is_err());
            let mut sealed = seal(&key, &ctx, &secret).unwrap();
            prop_assert_eq!(open(&key, &ctx, &sealed).unwrap(), secret);
            let i = flip % sealed.len();
            sealed[i] ^= 0x01;
            prop_assert!(open(&key, &ctx, &sealed).is_err());
        }
    }
}
