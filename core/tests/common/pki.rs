//! Test certificates, made with the openssl command line once per test process: a CA, an
//! unrelated second CA, server certificates (good, expired, valid only for a DNS name) and
//! client certificates with every key form the engine must accept.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// A DNS name no resolver knows: certificates valid only for it are reached through
/// `tls_server_name` while connecting to 127.0.0.1.
pub const DNS_ONLY_NAME: &str = "broker.mqtt-pg.test";

/// Client key forms: (name, how openssl makes the key, the PEM label it must come out with).
pub const CLIENT_KEYS: &[(&str, &str, &str)] = &[
    ("rsa-pkcs1", "genrsa -traditional 2048", "RSA PRIVATE KEY"),
    (
        "rsa-pkcs8",
        "genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048",
        "PRIVATE KEY",
    ),
    (
        "ecdsa-sec1",
        "ecparam -name prime256v1 -genkey -noout",
        "EC PRIVATE KEY",
    ),
    (
        "ecdsa-pkcs8",
        "genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256",
        "PRIVATE KEY",
    ),
    (
        "ecdsa-p384-sec1",
        "ecparam -name secp384r1 -genkey -noout",
        "EC PRIVATE KEY",
    ),
    ("ed25519", "genpkey -algorithm ed25519", "PRIVATE KEY"),
];

pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// The process's certificates, made on first use (RSA key generation takes a while).
    pub fn get() -> &'static Pki {
        static PKI: OnceLock<Pki> = OnceLock::new();
        PKI.get_or_init(Pki::generate)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// The path as a string, for config files and command lines.
    pub fn file(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }

    pub fn read(&self, file: &str) -> String {
        fs::read_to_string(self.path(file)).unwrap_or_else(|e| panic!("read {file}: {e}"))
    }

    /// mosquitto listener lines serving `cert` (a `server*` name) signed by our CA; with
    /// `require_client_cert`, clients must present a certificate signed by it too.
    pub fn listener_conf(&self, cert: &str, require_client_cert: bool) -> String {
        let mut conf = format!(
            "cafile {}\ncertfile {}\nkeyfile {}\n",
            self.file("ca.pem"),
            self.file(&format!("{cert}.pem")),
            self.file("server.key"),
        );
        if require_client_cert {
            conf.push_str("require_certificate true\n");
        }
        conf
    }

    /// mosquitto_pub / mosquitto_sub arguments for a broker with our server certificate, as
    /// client `client` (a `CLIENT_KEYS` name) when given.
    pub fn client_args(&self, client: Option<&str>) -> Vec<String> {
        let mut args = vec!["--cafile".to_string(), self.file("ca.pem")];
        if let Some(c) = client {
            args.extend([
                "--cert".to_string(),
                self.file(&format!("client-{c}.pem")),
                "--key".to_string(),
                self.file(&format!("client-{c}.key")),
            ]);
        }
        args
    }

    fn generate() -> Pki {
        // Inside the target directory, so nothing is left in /tmp; earlier runs' sets go.
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        if let Ok(entries) = fs::read_dir(base) {
            for e in entries.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with("mqtt_pg_core_pki_")
                {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = base.join(format!("mqtt_pg_core_pki_{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let pki = Pki { dir };
        pki.make_ca("ca", "mqtt_pg test CA");
        pki.make_ca("other-ca", "unrelated test CA");

        pki.openssl(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "server.key",
        ]);
        pki.csr("server.key", "server.csr", "localhost");
        let server_ext = "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
                          keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n";
        pki.sign("server.csr", "ca", server_ext, "server.pem");
        pki.sign("server.csr", "other-ca", server_ext, "server-other-ca.pem");
        let dns_only = format!(
            "subjectAltName=DNS:{DNS_ONLY_NAME}\nbasicConstraints=CA:FALSE\n\
             extendedKeyUsage=serverAuth\n"
        );
        pki.sign("server.csr", "ca", &dns_only, "server-dns-only.pem");
        pki.sign_expired("server.csr", server_ext, "server-expired.pem");

        let client_ext = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n";
        for (name, genkey, label) in CLIENT_KEYS {
            let key = format!("client-{name}.key");
            // "-out" right after the command: genrsa wants the key size last.
            let mut args: Vec<&str> = genkey.split(' ').collect();
            args.splice(1..1, ["-out", key.as_str()]);
            pki.openssl(&args);
            let pem = pki.read(&key);
            assert!(
                pem.starts_with(&format!("-----BEGIN {label}-----")),
                "openssl {genkey} did not write a {label}"
            );
            let csr = format!("client-{name}.csr");
            pki.csr(&key, &csr, &format!("client-{name}"));
            pki.sign(&csr, "ca", client_ext, &format!("client-{name}.pem"));
        }
        // A client the broker's CA never signed.
        pki.openssl(&[
            "genpkey",
            "-algorithm",
            "ed25519",
            "-out",
            "client-stranger.key",
        ]);
        pki.csr("client-stranger.key", "client-stranger.csr", "stranger");
        pki.sign(
            "client-stranger.csr",
            "other-ca",
            client_ext,
            "client-stranger.pem",
        );
        // Passphrase-protected keys, in PKCS#8 and in OpenSSL's traditional form.
        pki.openssl(&[
            "pkey",
            "-in",
            "client-ecdsa-pkcs8.key",
            "-aes256",
            "-passout",
            "pass:secret",
            "-out",
            "encrypted-pkcs8.key",
        ]);
        pki.openssl(&[
            "rsa",
            "-in",
            "client-rsa-pkcs1.key",
            "-aes256",
            "-passout",
            "pass:secret",
            "-traditional",
            "-out",
            "encrypted-pkcs1.key",
        ]);
        pki
    }

    fn make_ca(&self, name: &str, cn: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "3650",
            "-subj",
            &format!("/CN={cn}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
    }

    fn csr(&self, key: &str, csr: &str, cn: &str) {
        self.openssl(&[
            "req",
            "-new",
            "-key",
            key,
            "-subj",
            &format!("/CN={cn}"),
            "-out",
            csr,
        ]);
    }

    /// Sign `csr` with CA `ca` (v3, with the extensions in `ext`).
    fn sign(&self, csr: &str, ca: &str, ext: &str, out: &str) {
        let ext_file = format!("{out}.ext");
        fs::write(self.path(&ext_file), ext).unwrap();
        let serial = format!("0x{:x}", rand_serial(out));
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-set_serial",
            &serial,
            "-days",
            "3650",
            "-extfile",
            &ext_file,
            "-out",
            out,
        ]);
    }

    /// A certificate that expired in 2020. openssl 3.0's `x509 -req` has no way to set past
    /// dates, `openssl ca` does (`-startdate` / `-enddate`); it needs a little CA directory.
    fn sign_expired(&self, csr: &str, ext: &str, out: &str) {
        let db = self.path("ca-db");
        fs::create_dir_all(db.join("new")).unwrap();
        fs::write(db.join("index.txt"), "").unwrap();
        fs::write(db.join("serial"), "1000\n").unwrap();
        let conf = format!(
            "[ca]\ndefault_ca = test\n\
             [test]\ndatabase = {db}/index.txt\nnew_certs_dir = {db}/new\nserial = {db}/serial\n\
             certificate = {dir}/ca.pem\nprivate_key = {dir}/ca.key\ndefault_md = sha256\n\
             policy = any\nunique_subject = no\n\
             [any]\ncommonName = supplied\n\
             [ext]\n{ext}",
            db = db.display(),
            dir = self.dir.display(),
        );
        fs::write(self.path("ca-db.cnf"), conf).unwrap();
        self.openssl(&[
            "ca",
            "-batch",
            "-notext",
            "-config",
            "ca-db.cnf",
            "-extensions",
            "ext",
            "-in",
            csr,
            "-startdate",
            "20200101000000Z",
            "-enddate",
            "20200102000000Z",
            "-out",
            out,
        ]);
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A serial number unique enough within one set (certificates of one CA must differ).
fn rand_serial(seed: &str) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(seed.as_bytes());
    h.finish() >> 1
}
