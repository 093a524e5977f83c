//! TLS for the API (rustls on the ring provider): the daemon's certificate, and what the client
//! trusts.
//!
//! Contract:
//! - [`ServerTls::from_files`] loads a PEM certificate chain and its private key;
//!   [`ServerTls::self_signed`] loads the pair kept in `<state_dir>/tls/` or, at first start,
//!   generates one there (ECDSA P-256, rcgen), valid for `localhost`, the loopback addresses,
//!   this host's name and the addresses it listens on. Either way [`ServerTls::fingerprint`]
//!   is the SHA-256 of the leaf certificate, which the daemon logs at start.
//! - [`ClientTls`] is what a client trusts: the system's roots by default, or only the
//!   certificates of a CA file, or exactly one certificate by its SHA-256 fingerprint
//!   (pinning, for a self-signed certificate reached by a name it was not made for).
//! - The server speaks HTTP/1.1 only (ALPN `http/1.1`), TLS 1.2 and 1.3.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

/// Where a generated certificate and key live, under the state directory.
pub const SELF_SIGNED_DIR: &str = "tls";
pub const SELF_SIGNED_CERT: &str = "api.crt";
pub const SELF_SIGNED_KEY: &str = "api.key";

/// What went wrong with a certificate, a key or a TLS setting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    /// A file does not hold what it should (no PEM certificate, no private key, ...).
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    /// rustls refused the certificate and key (a key that does not match, ...).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// Generating the self-signed certificate failed.
    #[error("generating a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A pinned fingerprint is not 32 bytes of hex.
    #[error("invalid certificate fingerprint {0:?}: expected the SHA-256 as 64 hex digits (colons allowed)")]
    Fingerprint(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The ring provider, installed as the process default once: rustls then needs no feature
/// guessing, and every config of this process uses the same algorithms.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        // Fails only if another provider was installed first, which this crate never does.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// `SHA256:` and the SHA-256 of a DER certificate, as colon-separated upper-case hex (the form
/// `openssl x509 -fingerprint -sha256` prints).
pub fn fingerprint(cert: &[u8]) -> String {
    let digest = Sha256::digest(cert);
    let hex: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
    format!("SHA256:{}", hex.join(":"))
}

/// Parses a fingerprint as [`fingerprint`] prints it, or as bare hex, in any case.
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32]> {
    let bare = text.trim();
    let bare =
        bare.strip_prefix("SHA256:").or_else(|| bare.strip_prefix("sha256:")).unwrap_or(bare);
    let hex: String = bare.chars().filter(|c| *c != ':').collect();
    let bad = || Error::Fingerprint(text.to_owned());
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// The daemon's side: a rustls server configuration and what it serves.
#[derive(Clone)]
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    /// [`fingerprint`] of the leaf certificate.
    pub fingerprint: String,
    /// Where the certificate came from (for the log).
    pub cert_path: PathBuf,
}

impl ServerTls {
    /// The certificate chain (leaf first) and private key of two PEM files.
    pub fn from_files(cert_path: &Path, key_path: &Path) -> Result<ServerTls> {
        let certs = read_certs(cert_path)?;
        let key = read_key(key_path)?;
        ServerTls::build(certs, key, cert_path)
    }

    /// The pair kept in `<state_dir>/tls/`, generated there first if it is not. `names` are the
    /// names and addresses (as text) the certificate is valid for, used only when generating.
    /// Returns whether it was generated now.
    pub fn self_signed(state_dir: &Path, names: &[String]) -> Result<(ServerTls, bool)> {
        let dir = state_dir.join(SELF_SIGNED_DIR);
        let cert_path = dir.join(SELF_SIGNED_CERT);
        let key_path = dir.join(SELF_SIGNED_KEY);
        if cert_path.exists() && key_path.exists() {
            return Ok((ServerTls::from_files(&cert_path, &key_path)?, false));
        }
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { what, path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        let mut params = rcgen::CertificateParams::new(names.to_vec())?;
        params.distinguished_name.push(rcgen::DnType::CommonName, "versed (self-signed)");
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        // The key first, private from its first byte; each file replaced atomically, so a crash
        // leaves either no pair or a whole one.
        write_private(&key_path, key.serialize_pem().as_bytes())
            .map_err(io("writing", &key_path))?;
        write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)
            .map_err(io("writing", &cert_path))?;
        Ok((ServerTls::from_files(&cert_path, &key_path)?, true))
    }

    fn build(
        certs: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        cert_path: &Path,
    ) -> Result<ServerTls> {
        let fingerprint = fingerprint(&certs[0]);
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls { config: Arc::new(config), fingerprint, cert_path: cert_path.to_owned() })
    }
}

/// The PEM certificates of a file, in order; at least one.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        what: "reading",
        path: path.into(),
        source,
    })?;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&bytes).collect::<std::result::Result<_, _>>().map_err(
            |e| Error::Pem { path: path.into(), reason: format!("not PEM certificates: {e}") },
        )?;
    if certs.is_empty() {
        return Err(Error::Pem { path: path.into(), reason: "holds no PEM certificate".into() });
    }
    Ok(certs)
}

/// The first PEM private key of a file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        what: "reading",
        path: path.into(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| Error::Pem {
        path: path.into(),
        reason: format!("holds no PEM private key: {e}"),
    })
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let temp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, path)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic(path, bytes, 0o600)
}

/// What a client trusts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// Trust only the certificates of this PEM file (a CA, or the daemon's self-signed
    /// certificate itself); `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Accept exactly the certificate with this SHA-256 (see [`fingerprint`]), whatever name it
    /// carries and whoever signed it.
    pub fingerprint: Option<String>,
}

impl ClientTls {
    /// A rustls client configuration, when the system's roots are not what is wanted (`None`
    /// when neither a CA file nor a fingerprint is given).
    pub fn rustls_config(&self) -> Result<Option<rustls::ClientConfig>> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let mut config = if let Some(pin) = &self.fingerprint {
            let expected = parse_fingerprint(pin)?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Pinned {
                    expected,
                    provider: provider(),
                }))
                .with_no_client_auth()
        } else if let Some(ca) = &self.ca_file {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots.add(cert).map_err(|e| Error::Pem {
                    path: ca.clone(),
                    reason: format!("not a usable CA certificate: {e}"),
                })?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        } else {
            return Ok(None);
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(config))
    }
}

/// Accepts one certificate, by its SHA-256, and checks that the server holds its key.
#[derive(Debug)]
struct Pinned {
    expected: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let digest: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if digest == self.expected {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate has fingerprint {}, not the pinned one",
                fingerprint(end_entity.as_ref())
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_pair_is_generated_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let (first, generated) = ServerTls::self_signed(dir.path(), &names).unwrap();
        assert!(generated);
        assert!(first.fingerprint.starts_with("SHA256:"));
        let (again, generated) = ServerTls::self_signed(dir.path(), &names).unwrap();
        assert!(!generated);
        assert_eq!(first.fingerprint, again.fingerprint, "the same pair at every start");
        use std::os::unix::fs::PermissionsExt;
        let key = dir.path().join(SELF_SIGNED_DIR).join(SELF_SIGNED_KEY);
        assert_eq!(std::fs::metadata(key).unwrap().permissions().mode() & 0o777, 0o600);
        let cert = read_certs(&dir.path().join(SELF_SIGNED_DIR).join(SELF_SIGNED_CERT)).unwrap();
        assert_eq!(fingerprint(&cert[0]), first.fingerprint);
    }

    #[test]
    fn fingerprints_parse_in_the_printed_and_bare_forms() {
        let f = fingerprint(b"x");
        let bytes = parse_fingerprint(&f).unwrap();
        let bare: String = f.trim_start_matches("SHA256:").replace(':', "").to_lowercase();
        assert_eq!(parse_fingerprint(&bare).unwrap(), bytes);
        assert!(parse_fingerprint("SHA256:AB").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn a_file_without_a_certificate_or_key_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "nothing here\n").unwrap();
        assert!(read_certs(&path).unwrap_err().to_string().contains("empty.pem"));
        assert!(read_key(&path).unwrap_err().to_string().contains("empty.pem"));
        let err = ClientTls { ca_file: Some(path), fingerprint: None }.rustls_config().unwrap_err();
        assert!(err.to_string().contains("empty.pem"), "{err}");
    }
}
