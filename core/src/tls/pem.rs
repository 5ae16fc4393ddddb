//! A PEM reader that says what is wrong with a column without ever repeating its text.
//!
//! rustls' own PEM reader skips blocks it does not know (an encrypted key, an OpenSSH key) as if
//! they were comments, and its errors quote the offending line. Both are wrong for a DBA looking
//! at a rejected `client_key`: the first turns "encrypted key" into "no key found", the second
//! would copy key material into a log. So blocks are found and named here, from a fixed list of
//! labels, and only their base64 body goes to rustls to decode.

use rustls::pki_types::pem::{PemObject, SectionKind};

/// What a PEM block claims to be, from its BEGIN line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Label {
    Certificate,
    /// PKCS#1 ("RSA PRIVATE KEY").
    RsaKey,
    /// PKCS#8 ("PRIVATE KEY").
    Pkcs8Key,
    /// SEC1 ("EC PRIVATE KEY").
    EcKey,
    /// PKCS#8 encrypted with a passphrase.
    EncryptedKey,
    /// `openssl ecparam -genkey` writes these before the key; they carry nothing we need.
    EcParameters,
    OpenSshKey,
    /// DSA and other key types rustls cannot sign with.
    OtherKey,
    PublicKey,
    CertificateRequest,
    /// Anything else (a CRL, a label with a typo).
    Other,
}

impl Label {
    fn parse(label: &str) -> Label {
        match label {
            "CERTIFICATE" | "X509 CERTIFICATE" => Label::Certificate,
            "RSA PRIVATE KEY" => Label::RsaKey,
            "PRIVATE KEY" => Label::Pkcs8Key,
            "EC PRIVATE KEY" => Label::EcKey,
            "ENCRYPTED PRIVATE KEY" => Label::EncryptedKey,
            "EC PARAMETERS" => Label::EcParameters,
            "OPENSSH PRIVATE KEY" => Label::OpenSshKey,
            "PUBLIC KEY" | "RSA PUBLIC KEY" => Label::PublicKey,
            "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST" => Label::CertificateRequest,
            l if l.ends_with("PRIVATE KEY") => Label::OtherKey,
            _ => Label::Other,
        }
    }

    /// Whether the block holds secret key material (and so must never sit in a cert column).
    pub(super) fn is_private_key(self) -> bool {
        matches!(
            self,
            Label::RsaKey
                | Label::Pkcs8Key
                | Label::EcKey
                | Label::EncryptedKey
                | Label::OpenSshKey
                | Label::OtherKey
        )
    }

    /// How the block is named in messages: fixed words, never the text of the column.
    pub(super) fn describe(self) -> &'static str {
        match self {
            Label::Certificate => "a certificate",
            Label::RsaKey => "an RSA private key",
            Label::Pkcs8Key => "a PKCS#8 private key",
            Label::EcKey => "an EC private key",
            Label::EncryptedKey => "an encrypted private key",
            Label::EcParameters => "EC parameters",
            Label::OpenSshKey => "an OpenSSH private key",
            Label::OtherKey => "a private key of an unsupported type",
            Label::PublicKey => "a public key",
            Label::CertificateRequest => "a certificate signing request",
            Label::Other => "an unrecognised PEM block",
        }
    }
}

/// One block, decoded.
pub(super) struct Block {
    pub(super) label: Label,
    /// The block has RFC 1421 headers saying it is encrypted (`Proc-Type: 4,ENCRYPTED`, what
    /// `openssl rsa -aes256 -traditional` writes).
    pub(super) encrypted: bool,
    /// The DER bytes; empty for labels that are not decoded (see [`blocks`]).
    pub(super) der: Vec<u8>,
}

/// Why the text is not PEM at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Broken {
    /// No `-----BEGIN ...-----` line anywhere.
    NoBlock,
    /// BEGIN, base64 and END on one line: the line breaks were lost on the way in.
    OneLine,
    /// A BEGIN line with no matching END line: the text was cut short.
    Truncated(Label),
    /// An END line that does not match the open block, or a BEGIN inside a block.
    Mismatched,
    /// The base64 between the lines does not decode.
    BadBase64(Label),
}

/// Every PEM block in `text`, in order. Text outside blocks is ignored, as OpenSSL does (CA
/// bundles carry comments between certificates). Lines may be indented and end in CRLF, as
/// text pasted into SQL often does.
pub(super) fn blocks(text: &str) -> Result<Vec<Block>, Broken> {
    let mut found = Vec::new();
    // (label, encrypted, base64 lines) of the block being read.
    let mut open: Option<(Label, bool, String)> = None;
    for line in text.lines().map(str::trim) {
        if let Some(label) = marker(line, "-----BEGIN ") {
            if label.contains("-----") {
                return Err(Broken::OneLine);
            }
            if open.is_some() {
                return Err(Broken::Mismatched);
            }
            open = Some((Label::parse(label), false, String::new()));
        } else if let Some(label) = marker(line, "-----END ") {
            let Some((l, encrypted, body)) = open.take() else {
                return Err(Broken::Mismatched);
            };
            if Label::parse(label) != l {
                return Err(Broken::Mismatched);
            }
            let der = if encrypted {
                Vec::new()
            } else {
                decode(l, &body).ok_or(Broken::BadBase64(l))?
            };
            found.push(Block {
                label: l,
                encrypted,
                der,
            });
        } else if let Some((_, encrypted, body)) = open.as_mut() {
            if let Some((name, value)) = line.split_once(':') {
                // RFC 1421 headers; base64 never contains ':'.
                if name.trim().eq_ignore_ascii_case("Proc-Type") && value.contains("ENCRYPTED") {
                    *encrypted = true;
                }
            } else {
                body.push_str(line);
                body.push('\n');
            }
        }
    }
    if let Some((label, ..)) = open {
        return Err(Broken::Truncated(label));
    }
    if found.is_empty() {
        return Err(Broken::NoBlock);
    }
    Ok(found)
}

/// The label of a `-----BEGIN LABEL-----` / `-----END LABEL-----` line.
fn marker<'a>(line: &'a str, prefix: &str) -> Option<&'a str> {
    line.strip_prefix(prefix)?.strip_suffix("-----")
}

/// Decode the base64 body of a certificate or key block; other labels are not decoded (they
/// are refused by name, whatever their body holds).
fn decode(label: Label, body: &str) -> Option<Vec<u8>> {
    let (kind, name) = match label {
        Label::Certificate => (SectionKind::Certificate, "CERTIFICATE"),
        Label::RsaKey => (SectionKind::RsaPrivateKey, "RSA PRIVATE KEY"),
        Label::Pkcs8Key => (SectionKind::PrivateKey, "PRIVATE KEY"),
        Label::EcKey => (SectionKind::EcPrivateKey, "EC PRIVATE KEY"),
        _ => return Some(Vec::new()),
    };
    let canonical = format!("-----BEGIN {name}-----\n{body}-----END {name}-----\n");
    match <(SectionKind, Vec<u8>)>::from_pem_slice(canonical.as_bytes()) {
        Ok((k, der)) if k == kind && !der.is_empty() => Some(der),
        _ => None,
    }
}
