//! TLS for broker connections: the settings a broker row carries, the checks the SQL side runs
//! when a row is written, and the rustls client configuration the engine connects with.
//!
//! There is deliberately no way to skip verification: the broker's certificate is always
//! checked against `ca_cert` (or the system's CA certificates) and a host name.
//!
//! Every message starts with the column it is about and never contains a byte of what the
//! column holds: a key pasted into the wrong place must not end up in a log.

mod pem;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
    ServerName, UnixTime,
};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use pem::{Block, Broken, Label};

pub(crate) const CA_CERT: &str = "mqtt_broker.ca_cert";
pub(crate) const CLIENT_CERT: &str = "mqtt_broker.client_cert";
pub(crate) const CLIENT_KEY: &str = "mqtt_broker.client_key";
pub(crate) const SERVER_NAME: &str = "mqtt_broker.tls_server_name";

/// TLS settings of one broker (the `mqtt_broker` columns of the same names).
#[derive(Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM CA certificate(s) the broker's certificate must chain to; `None`: the system's.
    pub ca_cert: Option<String>,
    /// PEM client certificate (chain) for mutual TLS; set together with `client_key`.
    pub client_cert: Option<String>,
    /// PEM private key of `client_cert`, unencrypted. Secret: never printed.
    pub client_key: Option<String>,
    /// The name the broker's certificate must be valid for, when not the host connected to.
    pub server_name: Option<String>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("ca_cert", &self.ca_cert)
            .field("client_cert", &self.client_cert)
            .field("client_key", &Redacted(&self.client_key))
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// Debug-prints a secret as `Some(<redacted>)` or `None`.
pub(crate) struct Redacted<'a>(pub(crate) &'a Option<String>);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(_) => f.write_str("Some(<redacted>)"),
            None => f.write_str("None"),
        }
    }
}

/// What a PEM column is meant to hold (see [`check_pem`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PemKind {
    /// One or more CA certificates.
    CaCert,
    /// A certificate, optionally followed by its intermediates.
    ClientCert,
    /// One unencrypted private key: RSA (PKCS#1 or PKCS#8), ECDSA (SEC1 or PKCS#8), Ed25519.
    ClientKey,
}

/// Check that `pem` is usable as `kind`; the error starts with `column` (say
/// `mqtt_broker.client_key`) and says what is wrong without quoting the text.
pub fn check_pem(column: &str, pem: &str, kind: PemKind) -> Result<(), String> {
    match kind {
        PemKind::CaCert => ca_certs(column, pem).map(drop),
        PemKind::ClientCert => cert_chain(column, pem).map(drop),
        PemKind::ClientKey => private_key(column, pem).map(drop),
    }
}

/// Check a whole set of settings: each PEM column, client certificate and key given together
/// and belonging to each other, and a valid `tls_server_name`.
pub fn check_settings(s: &TlsSettings) -> Result<(), String> {
    if let Some(ca) = &s.ca_cert {
        ca_certs(CA_CERT, ca)?;
    }
    identity(s, &provider())?;
    if let Some(name) = &s.server_name {
        server_name(name)?;
    }
    Ok(())
}

/// The rustls configuration for one connection task (built once, used for every reconnect).
pub(crate) fn client_config(s: &TlsSettings) -> Result<Arc<ClientConfig>, String> {
    let provider = provider();
    let roots = Arc::new(roots(s)?);
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?;
    let builder = match &s.server_name {
        Some(name) => {
            let name = server_name(name)?;
            let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| format!("TLS setup failed: {e}"))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(FixedName { inner, name }))
        }
        None => builder.with_root_certificates(roots),
    };
    let config = match identity(s, &provider)? {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|_| format!("{CLIENT_KEY}: the key cannot be used with {CLIENT_CERT}"))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// aws-lc-rs, named explicitly: rustls' process-wide default is ambiguous (and panics) as soon
/// as anything else in the process enables the ring provider.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn roots(s: &TlsSettings) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match &s.ca_cert {
        Some(ca) => {
            for cert in ca_certs(CA_CERT, ca)? {
                // Already parsed once by ca_certs.
                let _ = store.add(cert);
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err(format!(
                    "no system CA certificates found to verify the broker with (install the \
                     ca-certificates package), and {CA_CERT} is not set"
                ));
            }
        }
    }
    Ok(store)
}

fn server_name(name: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(name.to_string())
        .map_err(|_| format!("{SERVER_NAME}: {name:?} is not a valid DNS name or IP address"))
}

/// The client certificate chain and key, both or neither, checked to be a pair.
#[allow(clippy::type_complexity)]
fn identity(
    s: &TlsSettings,
    provider: &CryptoProvider,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, String> {
    let (cert, key) = match (&s.client_cert, &s.client_key) {
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(format!(
                "{CLIENT_CERT} is set but {CLIENT_KEY} is not: a client certificate needs its \
                 private key (set both, or neither)"
            ))
        }
        (None, Some(_)) => {
            return Err(format!(
                "{CLIENT_KEY} is set but {CLIENT_CERT} is not: a client key needs its \
                 certificate (set both, or neither)"
            ))
        }
        (Some(c), Some(k)) => (c, k),
    };
    let chain = cert_chain(CLIENT_CERT, cert)?;
    let key = private_key(CLIENT_KEY, key)?;
    match CertifiedKey::from_der(chain.clone(), key.clone_key(), provider) {
        Ok(_) => Ok(Some((chain, key))),
        Err(rustls::Error::InconsistentKeys(_)) => Err(format!(
            "{CLIENT_KEY} does not belong to the certificate in {CLIENT_CERT}: they are not a \
             key pair"
        )),
        Err(_) => Err(format!(
            "{CLIENT_KEY}: the key cannot be used with the certificate in {CLIENT_CERT}"
        )),
    }
}

/// The blocks of a column, or what is wrong with its PEM as such.
fn read_blocks(column: &str, text: &str, expected: &str) -> Result<Vec<Block>, String> {
    pem::blocks(text).map_err(|b| match b {
        Broken::NoBlock if looks_like_a_path(text) => format!(
            "{column}: this looks like a file name; the column holds the PEM text itself \
             (starting with {expected})"
        ),
        Broken::NoBlock => format!("{column}: no PEM block found (expected {expected})"),
        Broken::OneLine => format!(
            "{column}: the PEM text is on one line; the BEGIN line, the base64 lines and the END \
             line must be separated by line breaks"
        ),
        Broken::Truncated(l) => format!(
            "{column}: truncated PEM: {} begins but its -----END line is missing",
            l.describe()
        ),
        Broken::Mismatched => format!(
            "{column}: malformed PEM: an -----END line does not match the -----BEGIN line before \
             it"
        ),
        Broken::BadBase64(l) => format!(
            "{column}: malformed PEM: the base64 text of {} is damaged",
            l.describe()
        ),
    })
}

fn looks_like_a_path(text: &str) -> bool {
    let t = text.trim();
    !t.contains('\n')
        && (t.starts_with('/')
            || [".pem", ".crt", ".cer", ".key"]
                .iter()
                .any(|ext| t.ends_with(ext)))
}

const CERT_START: &str = "-----BEGIN CERTIFICATE-----";

fn ca_certs(column: &str, text: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let blocks = read_blocks(column, text, CERT_START)?;
    let certs = only_certificates(column, &blocks, "CA certificates")?;
    for (i, c) in certs.iter().enumerate() {
        if RootCertStore::empty().add(c.clone()).is_err() {
            return Err(format!(
                "{column}: certificate {} of {} is not a valid X.509 certificate (damaged or \
                 cut short)",
                i + 1,
                certs.len()
            ));
        }
    }
    Ok(certs)
}

fn cert_chain(column: &str, text: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let blocks = read_blocks(column, text, CERT_START)?;
    let chain = only_certificates(column, &blocks, "a certificate")?;
    if ParsedCertificate::try_from(&chain[0]).is_err() {
        return Err(format!(
            "{column}: the certificate is not a valid X.509 v3 certificate (damaged, cut short, \
             or an old v1 certificate)"
        ));
    }
    for (i, c) in chain.iter().enumerate().skip(1) {
        if RootCertStore::empty().add(c.clone()).is_err() {
            return Err(format!(
                "{column}: certificate {} of the chain is not a valid X.509 certificate \
                 (damaged or cut short)",
                i + 1
            ));
        }
    }
    Ok(chain)
}

/// The certificates among `blocks`; anything else in a certificate column is an error, a
/// private key above all (certificate columns are not secret).
fn only_certificates(
    column: &str,
    blocks: &[Block],
    wanted: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    if let Some(b) = blocks.iter().find(|b| b.label.is_private_key()) {
        return Err(format!(
            "{column}: holds {}, not {wanted}: a private key belongs in {CLIENT_KEY} only",
            b.label.describe()
        ));
    }
    if let Some(b) = blocks.iter().find(|b| b.label != Label::Certificate) {
        return Err(format!(
            "{column}: holds {}, not {wanted}",
            b.label.describe()
        ));
    }
    Ok(blocks
        .iter()
        .map(|b| CertificateDer::from(b.der.clone()))
        .collect())
}

fn private_key(column: &str, text: &str) -> Result<PrivateKeyDer<'static>, String> {
    let blocks = read_blocks(column, text, "-----BEGIN PRIVATE KEY-----")?;
    let blocks: Vec<&Block> = blocks
        .iter()
        .filter(|b| b.label != Label::EcParameters)
        .collect();
    if blocks
        .iter()
        .any(|b| b.encrypted || b.label == Label::EncryptedKey)
    {
        return Err(format!(
            "{column}: the private key is encrypted with a passphrase, which is not supported; \
             store it decrypted (openssl pkey -in KEY -out PLAIN.pem)"
        ));
    }
    let keys = blocks.iter().filter(|b| b.label.is_private_key()).count();
    if keys > 1 {
        return Err(format!("{column}: holds more than one private key"));
    }
    let Some(key) = blocks.first().copied() else {
        return Err(format!("{column}: holds EC parameters but no private key"));
    };
    if keys == 0 && key.label == Label::Certificate {
        return Err(format!(
            "{column}: holds a certificate, not a private key (the certificate belongs in \
             {CLIENT_CERT})"
        ));
    }
    if keys == 0 {
        return Err(format!(
            "{column}: holds {}, not a private key",
            key.label.describe()
        ));
    }
    if let Some(other) = blocks.iter().find(|b| !b.label.is_private_key()) {
        return Err(format!(
            "{column}: holds {} besides the private key; put only the key here (a certificate \
             belongs in {CLIENT_CERT})",
            other.label.describe()
        ));
    }
    let der = match key.label {
        Label::RsaKey => PrivateKeyDer::from(PrivatePkcs1KeyDer::from(key.der.clone())),
        Label::Pkcs8Key => PrivateKeyDer::from(PrivatePkcs8KeyDer::from(key.der.clone())),
        Label::EcKey => PrivateKeyDer::from(PrivateSec1KeyDer::from(key.der.clone())),
        Label::OpenSshKey => {
            return Err(format!(
                "{column}: OpenSSH private keys are not supported; convert it to PEM \
                 (ssh-keygen -p -m PEM -f KEY does so for RSA and ECDSA keys)"
            ))
        }
        _ => {
            return Err(format!(
                "{column}: holds {}; use an RSA, ECDSA or Ed25519 key",
                key.label.describe()
            ))
        }
    };
    if rustls::crypto::aws_lc_rs::sign::any_supported_type(&der).is_err() {
        return Err(format!(
            "{column}: the private key cannot be used: damaged, cut short, or of an unsupported \
             type (RSA of 2048 bits or more, ECDSA P-256/P-384/P-521 and Ed25519 are supported)"
        ));
    }
    Ok(der)
}

/// Verifies the broker's certificate for `tls_server_name` instead of the host connected to.
///
/// rumqttc 0.25.1 derives the handshake's server name from the host it dials
/// (`ServerName::try_from(addr)` in its tls.rs) and offers no way to pass another, so the SNI
/// sent is still the host (none at all for an IP address); only the name the certificate is
/// checked against changes here. Everything else (chain, validity dates, signatures) is
/// rustls' own WebPki verification, unchanged.
#[derive(Debug)]
struct FixedName {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for FixedName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialed: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}
