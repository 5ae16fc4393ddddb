//! The validators on hand-made input; real openssl output is covered by `tests/tls.rs`.

use proptest::prelude::*;

use super::*;

const KEY: &str = "mqtt_broker.client_key";
const CERT: &str = "mqtt_broker.client_cert";
const CA: &str = "mqtt_broker.ca_cert";
const KINDS: [(&str, PemKind); 3] = [
    (CA, PemKind::CaCert),
    (CERT, PemKind::ClientCert),
    (KEY, PemKind::ClientKey),
];

fn block(label: &str, body: &str) -> String {
    format!("-----BEGIN {label}-----\n{body}\n-----END {label}-----\n")
}

fn err(column: &str, text: &str, kind: PemKind) -> String {
    let e = check_pem(column, text, kind).expect_err("must be refused");
    assert!(e.starts_with(&format!("{column}: ")), "{e:?}");
    e
}

fn assert_has(e: &str, part: &str) {
    assert!(e.contains(part), "{e:?} lacks {part:?}");
}

#[test]
fn no_pem_at_all() {
    for (column, kind) in KINDS {
        assert_has(&err(column, "", kind), "no PEM block found");
        assert_has(
            &err(column, "hello world\nnot a key", kind),
            "no PEM block found",
        );
        assert_has(
            &err(column, "/etc/mosquitto/certs/ca.crt", kind),
            "looks like a file name",
        );
        assert_has(&err(column, "client.key", kind), "looks like a file name");
    }
}

#[test]
fn broken_framing() {
    let one_line = "-----BEGIN CERTIFICATE----- MIIBszCCAVmgAwIBAgIU -----END CERTIFICATE-----";
    let truncated = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\nMIIB";
    let mismatched = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END PRIVATE KEY-----\n";
    let end_only = "AAAA\n-----END CERTIFICATE-----\n";
    let nested = "-----BEGIN CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\n";
    for (column, kind) in KINDS {
        assert_has(&err(column, one_line, kind), "on one line");
        assert_has(
            &err(column, truncated, kind),
            "truncated PEM: a certificate begins",
        );
        assert_has(&err(column, mismatched, kind), "does not match");
        assert_has(&err(column, end_only, kind), "does not match");
        assert_has(&err(column, nested, kind), "does not match");
        assert_has(&err(column, &block("CERTIFICATE", "A*B?"), kind), "base64");
        assert_has(&err(column, &block("CERTIFICATE", ""), kind), "base64");
    }
    let cut_key = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI";
    assert_has(
        &err(KEY, cut_key, PemKind::ClientKey),
        "truncated PEM: a PKCS#8 private key",
    );
}

#[test]
fn wrong_kinds() {
    let cert = block("CERTIFICATE", "AAAA");
    let key = block("PRIVATE KEY", "AAAA");
    assert_has(
        &err(KEY, &cert, PemKind::ClientKey),
        "holds a certificate, not a private key",
    );
    for (column, kind) in [(CA, PemKind::CaCert), (CERT, PemKind::ClientCert)] {
        for label in [
            "PRIVATE KEY",
            "RSA PRIVATE KEY",
            "EC PRIVATE KEY",
            "ENCRYPTED PRIVATE KEY",
        ] {
            let e = err(column, &block(label, "AAAA"), kind);
            assert_has(&e, "private key");
            assert_has(&e, "belongs in mqtt_broker.client_key only");
        }
        assert_has(
            &err(column, &block("PUBLIC KEY", "AAAA"), kind),
            "holds a public key",
        );
        assert_has(
            &err(column, &block("X509 CRL", "AAAA"), kind),
            "unrecognised PEM block",
        );
        // Framed correctly, but the bytes are no certificate.
        assert_has(&err(column, &cert, kind), "not a valid X.509");
    }
    assert_has(
        &err(KEY, &block("PUBLIC KEY", "AAAA"), PemKind::ClientKey),
        "holds a public key",
    );
    assert_has(
        &err(
            KEY,
            &block("CERTIFICATE REQUEST", "AAAA"),
            PemKind::ClientKey,
        ),
        "signing request",
    );
    assert_has(&err(KEY, &key, PemKind::ClientKey), "cannot be used");
    assert_has(
        &err(
            KEY,
            &block("EC PARAMETERS", "BggqhkjOPQMBBw=="),
            PemKind::ClientKey,
        ),
        "no private key",
    );
}

#[test]
fn unsupported_keys() {
    assert_has(
        &err(
            KEY,
            &block("ENCRYPTED PRIVATE KEY", "AAAA"),
            PemKind::ClientKey,
        ),
        "encrypted",
    );
    let traditional = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\
                       DEK-Info: AES-256-CBC,0123456789ABCDEF0123456789ABCDEF\n\nAAAA\n\
                       -----END RSA PRIVATE KEY-----\n";
    assert_has(
        &err(KEY, traditional, PemKind::ClientKey),
        "encrypted with a passphrase",
    );
    assert_has(
        &err(
            KEY,
            &block("OPENSSH PRIVATE KEY", "AAAA"),
            PemKind::ClientKey,
        ),
        "OpenSSH",
    );
    assert_has(
        &err(KEY, &block("DSA PRIVATE KEY", "AAAA"), PemKind::ClientKey),
        "unsupported type",
    );
}

#[test]
fn settings() {
    let none = TlsSettings {
        ca_cert: None,
        client_cert: None,
        client_key: None,
        server_name: None,
    };
    check_settings(&none).unwrap();
    let cert_only = TlsSettings {
        client_cert: Some(block("CERTIFICATE", "AAAA")),
        ..none.clone()
    };
    assert_has(
        &check_settings(&cert_only).unwrap_err(),
        "mqtt_broker.client_cert is set but mqtt_broker.client_key is not",
    );
    let key_only = TlsSettings {
        client_key: Some(block("PRIVATE KEY", "AAAA")),
        ..none.clone()
    };
    assert_has(
        &check_settings(&key_only).unwrap_err(),
        "mqtt_broker.client_key is set but mqtt_broker.client_cert is not",
    );
    let bad_ca = TlsSettings {
        ca_cert: Some("garbage".into()),
        ..none.clone()
    };
    assert_has(
        &check_settings(&bad_ca).unwrap_err(),
        "mqtt_broker.ca_cert: no PEM block",
    );
    for name in ["", "under score..", "a b"] {
        let s = TlsSettings {
            server_name: Some(name.into()),
            ..none.clone()
        };
        assert_has(
            &check_settings(&s).unwrap_err(),
            "mqtt_broker.tls_server_name:",
        );
    }
    for name in ["broker.example.com", "localhost", "10.0.0.1", "::1"] {
        let s = TlsSettings {
            server_name: Some(name.into()),
            ..none.clone()
        };
        check_settings(&s).unwrap();
    }
}

#[test]
fn system_roots_load() {
    // Debian's ca-certificates: the roots used when ca_cert is NULL.
    if std::path::Path::new("/etc/ssl/certs/ca-certificates.crt").exists() {
        let none = TlsSettings {
            ca_cert: None,
            client_cert: None,
            client_key: None,
            server_name: None,
        };
        assert!(roots(&none).unwrap().len() > 10);
        client_config(&none).unwrap();
    }
}

#[test]
fn debug_redacts_the_key() {
    let s = TlsSettings {
        ca_cert: None,
        client_cert: None,
        client_key: Some("SECRET-KEY-TEXT".into()),
        server_name: Some("b.example".into()),
    };
    let shown = format!("{s:?}");
    assert!(!shown.contains("SECRET-KEY-TEXT"), "{shown}");
    assert!(shown.contains("client_key: Some(<redacted>)"), "{shown}");
    assert!(shown.contains("b.example"), "{shown}");
}

/// Texts that embed `token` wherever a careless message might copy it from.
fn hiding_places(token: &str) -> Vec<String> {
    vec![
        token.to_string(),
        format!("/etc/{token}.pem"),
        block(token, token),
        block("PRIVATE KEY", token),
        block("RSA PRIVATE KEY", token),
        block("EC PRIVATE KEY", token),
        block("CERTIFICATE", token),
        format!("-----BEGIN PRIVATE KEY-----\n{token}\n"),
        format!("-----BEGIN {token}-----\n{token}\n"),
        format!("-----BEGIN CERTIFICATE-----\n{token}\n-----END {token}-----\n"),
        format!("-----BEGIN CERTIFICATE----- {token} -----END CERTIFICATE-----"),
        format!(
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: {token}\n\n\
             {token}\n-----END RSA PRIVATE KEY-----\n"
        ),
        format!("{}{token}", block("CERTIFICATE", "AAAA")),
        format!(
            "{}{}",
            block("PRIVATE KEY", token),
            block("CERTIFICATE", token)
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn never_panics_on_any_text(text in any::<String>()) {
        for (column, kind) in KINDS {
            let _ = check_pem(column, &text, kind);
        }
    }

    #[test]
    fn never_panics_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let text = String::from_utf8_lossy(&bytes);
        for (column, kind) in KINDS {
            let _ = check_pem(column, &text, kind);
            let framed = block("PRIVATE KEY", &text);
            let _ = check_pem(column, &framed, kind);
        }
    }

    #[test]
    fn never_panics_on_pem_like_text(
        lines in proptest::collection::vec(
            prop_oneof![
                Just("-----BEGIN CERTIFICATE-----".to_string()),
                Just("-----END CERTIFICATE-----".to_string()),
                Just("-----BEGIN PRIVATE KEY-----".to_string()),
                Just("-----END PRIVATE KEY-----".to_string()),
                Just("-----BEGIN EC PARAMETERS-----".to_string()),
                Just("-----END EC PARAMETERS-----".to_string()),
                Just("Proc-Type: 4,ENCRYPTED".to_string()),
                "[A-Za-z0-9+/=]{0,70}",
                ".{0,20}",
            ],
            0..12,
        ),
    ) {
        let text = lines.join("\n");
        for (column, kind) in KINDS {
            let _ = check_pem(column, &text, kind);
        }
        let s = TlsSettings {
            ca_cert: Some(text.clone()),
            client_cert: Some(text.clone()),
            client_key: Some(text.clone()),
            server_name: None,
        };
        let _ = check_settings(&s);
    }

    #[test]
    fn never_echoes_the_input(token in "[A-Za-z0-9+/]{12,48}") {
        for text in hiding_places(&token) {
            for (column, kind) in KINDS {
                let e = check_pem(column, &text, kind);
                prop_assert!(e.is_err(), "accepted {text:?}");
                let e = e.unwrap_err();
                prop_assert!(!e.contains(&token), "{e:?} repeats the input");
            }
            let s = TlsSettings {
                ca_cert: None,
                client_cert: Some(block("CERTIFICATE", "AAAA")),
                client_key: Some(text.clone()),
                server_name: None,
            };
            let e = check_settings(&s).unwrap_err();
            prop_assert!(!e.contains(&token), "{e:?} repeats the key");
        }
    }

    #[test]
    fn never_echoes_long_text(text in "[^\n]{20,80}") {
        for (column, kind) in KINDS {
            if let Err(e) = check_pem(column, &text, kind) {
                prop_assert!(!e.contains(&text), "{e:?} repeats the input");
            }
        }
    }
}
