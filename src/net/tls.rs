//! Mutual TLS between the nodes of one cluster.
//!
//! Every node (primary or replica) holds a [`NodeIdentity`]: a certificate whose DNS subject
//! alternative name is the node's name, its private key, and the cluster CA certificate(s) it
//! trusts. Both sides of a connection present their certificate and verify the other's against the
//! cluster CA, so a node's name can be read from the connection with [`peer_name`] and trusted: a
//! replica's identity is taken from its client certificate, never from what it says in-band.
//!
//! On disk a certificate folder holds (these names are a contract with the binaries and
//! `certs/README.md`):
//!
//! ```text
//! DIR/ca.pem        the cluster CA certificate(s), PEM
//! DIR/NAME.pem      the node certificate (then any intermediates), PEM
//! DIR/NAME.key      the node private key, PEM (PKCS#8 is what `gen_certs` writes)
//! ```
//!
//! [`ClusterCa`] makes such certificates with rcgen, in memory for tests or into a folder for
//! development (`cargo run --release --example gen_certs`).
//!
//! Every rustls configuration here uses the *ring* provider explicitly
//! (`rustls::crypto::ring::default_provider()`); nothing depends on a process-wide default
//! provider being installed.

use std::fmt;
use std::fs;
use std::io::{self, BufReader};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::RootCertStore;

/// ALPN protocol id of the replication protocol; both sides require it.
pub const ALPN: &[u8] = b"walship/1";

/// File name of the cluster CA certificate(s) inside a certificate folder.
pub const CA_CERT_FILE: &str = "ca.pem";

/// How to make the missing files of node `name` in `dir`. A folder that has a CA already must
/// keep it (its nodes trust it): gen_certs would refuse to overwrite it, and `--force` would make
/// every node's files anew.
fn missing_file_hint(dir: &Path, name: &str) -> String {
    if dir.join(CA_CERT_FILE).exists() {
        format!(
            "{} holds a cluster CA already: sign a certificate for {name:?} with its key (certs/README.md, \
             \"Adding a node\"), or make a new set for every node with `cargo run --release --example gen_certs -- --out {} \
             --names <every node, {name} included> --force`",
            dir.display(),
            dir.display()
        )
    } else {
        format!(
            "run `cargo run --release --example gen_certs -- --out {} --names {name},<every other node>` to create \
             development certificates for the whole cluster at once (one CA; copy the folder to every node), or see \
             certs/README.md to use your own CA",
            dir.display()
        )
    }
}

/// File name of the cluster CA private key, written only on explicit request
/// ([`ClusterCa::write_ca_key`]).
pub const CA_KEY_FILE: &str = "ca.key";

/// Errors loading, generating or configuring TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file of a certificate folder does not exist.
    #[error("{what} not found at {}: {hint}", path.display())]
    MissingFile {
        /// What the file should hold, e.g. "CA certificate".
        what: &'static str,
        path: PathBuf,
        /// How to make it, for the folder and node name asked for.
        hint: String,
    },
    /// A file exists but could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file is not valid PEM.
    #[error("{what} {} is not valid PEM: {source}", path.display())]
    BadPem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A PEM file holds no item of the expected kind.
    #[error("{what} {} holds no {expected} PEM block", path.display())]
    NoPemItem {
        what: &'static str,
        path: PathBuf,
        /// e.g. "CERTIFICATE" or "PRIVATE KEY".
        expected: &'static str,
    },
    /// A node name that cannot be used as a DNS name in a certificate (or as a file name).
    #[error(
        "invalid node name {name:?}: {reason} (use lowercase letters, digits, '-' and '.', \
         like \"replica-1\")"
    )]
    InvalidNodeName { name: String, reason: &'static str },
    /// Certificate material that loads but cannot serve as this node's identity.
    #[error("TLS identity of node {name:?} is unusable: {detail}")]
    InvalidIdentity { name: String, detail: String },
    /// Certificate generation (rcgen) failed.
    #[error("certificate generation failed ({context}): {source}")]
    Rcgen {
        context: String,
        #[source]
        source: rcgen::Error,
    },
    /// A CA certificate rustls refuses as a trust anchor.
    #[error("invalid CA certificate: {source}")]
    CaCert {
        #[source]
        source: rustls::Error,
    },
    /// Building a certificate verifier failed (e.g. no CA certificate).
    #[error("cannot build the {side} certificate verifier: {source}")]
    Verifier {
        side: &'static str,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// Building a rustls configuration failed (e.g. key does not match certificate).
    #[error("cannot build the rustls {context}: {source}")]
    Config {
        context: &'static str,
        #[source]
        source: rustls::Error,
    },
    /// Writing a file failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Checks that `name` can be a node name: a lowercase DNS name (it becomes the certificate's DNS
/// SAN and the `NAME.pem` / `NAME.key` file names).
pub fn validate_node_name(name: &str) -> Result<(), TlsError> {
    let bad = |reason| Err(TlsError::InvalidNodeName { name: name.to_owned(), reason });
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > 253 {
        return bad("longer than 253 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.') {
        return bad("contains a character other than a-z, 0-9, '-' or '.'");
    }
    if name.parse::<IpAddr>().is_ok() {
        return bad("is an IP address, not a DNS name");
    }
    if DnsName::try_from(name).is_err() {
        return bad("is not a valid DNS name");
    }
    Ok(())
}

/// Path of the certificate of node `name` in certificate folder `dir`.
pub fn cert_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.pem"))
}

/// Path of the private key of node `name` in certificate folder `dir`.
pub fn key_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.key"))
}

/// A node's TLS identity: its name, certificate chain, private key and the cluster CA(s).
pub struct NodeIdentity {
    /// The node name; the DNS SAN of `cert_chain[0]`.
    pub name: String,
    /// End-entity certificate first, then any intermediates.
    pub cert_chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// Trust anchors that peers' certificates must chain to.
    pub ca_certs: Vec<CertificateDer<'static>>,
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        NodeIdentity {
            name: self.name.clone(),
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
            ca_certs: self.ca_certs.clone(),
        }
    }
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("name", &self.name)
            .field("cert_chain", &format_args!("[{} certificate(s)]", self.cert_chain.len()))
            .field("key", &"<redacted>")
            .field("ca_certs", &format_args!("[{} certificate(s)]", self.ca_certs.len()))
            .finish()
    }
}

impl NodeIdentity {
    /// Checks that `name` (a node's configured name, `setting` says which) is this identity's
    /// certificate's first DNS name, which peers know the node by: a mismatch would be refused on
    /// every connection. Told at start instead.
    pub fn check_configured_name(&self, setting: &str, name: &str) -> Result<(), crate::config::ConfigError> {
        let names = self.cert_chain.first().map(cert_dns_names).unwrap_or_default();
        // Peers name a node by its certificate's first DNS name (`peer_name`), not by any of them.
        if names.first().is_some_and(|n| n == name) {
            return Ok(());
        }
        Err(crate::config::ConfigError(format!(
            "{setting} {name:?} is not the name of this node's certificate, its first DNS name, which peers \
             go by (it names {names:?}): peers would refuse every connection; use the name the certificate \
             was issued for"
        )))
    }

    /// Loads `<dir>/ca.pem`, `<dir>/<name>.pem` and `<dir>/<name>.key`, then checks the result
    /// ([`NodeIdentity::verify`]) so that a wrong file is reported here rather than as an opaque
    /// handshake failure on the other node.
    pub fn load(certs_dir: &Path, name: &str) -> Result<NodeIdentity, TlsError> {
        validate_node_name(name)?;
        let missing = |what, path: &Path| TlsError::MissingFile {
            what,
            path: path.to_owned(),
            hint: missing_file_hint(certs_dir, name),
        };

        let ca_path = certs_dir.join(CA_CERT_FILE);
        let ca_certs = read_certs(&ca_path, "CA certificate", missing)?;
        let cert_file = cert_path(certs_dir, name);
        let cert_chain = read_certs(&cert_file, "node certificate", missing)?;
        let key_file = key_path(certs_dir, name);
        let key = read_key(&key_file, missing)?;

        let id = NodeIdentity { name: name.to_owned(), cert_chain, key, ca_certs };
        id.verify().map_err(|e| match e {
            TlsError::InvalidIdentity { name, detail } => TlsError::InvalidIdentity {
                name,
                detail: format!(
                    "{detail} (files: {}, {}, {})",
                    ca_path.display(),
                    cert_file.display(),
                    key_file.display()
                ),
            },
            other => other,
        })?;
        Ok(id)
    }

    /// Checks that this identity can be used on both sides of a connection: the certificate names
    /// `self.name`, chains to `ca_certs`, is currently valid for server and client
    /// authentication, and matches the private key.
    pub fn verify(&self) -> Result<(), TlsError> {
        let invalid = |detail: String| TlsError::InvalidIdentity { name: self.name.clone(), detail };
        validate_node_name(&self.name)?;
        let Some((end_entity, intermediates)) = self.cert_chain.split_first() else {
            return Err(invalid("the certificate chain is empty".into()));
        };
        let names = cert_dns_names(end_entity);
        if !names.iter().any(|n| n.eq_ignore_ascii_case(&self.name)) {
            return Err(invalid(format!("the certificate's DNS names are {names:?}, not {:?}", self.name)));
        }

        let provider = provider();
        let roots = Arc::new(root_store(&self.ca_certs)?);
        let now = UnixTime::now();
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|source| TlsError::Verifier { side: "server", source })?;
        let server_name =
            ServerName::try_from(self.name.clone()).map_err(|e| invalid(format!("name is not a server name: {e}")))?;
        server_verifier
            .verify_server_cert(end_entity, intermediates, &server_name, &[], now)
            .map_err(|e| invalid(format!("the certificate is not valid as a server certificate under the CA: {e}")))?;
        client_verifier(roots, provider)?
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|e| invalid(format!("the certificate is not valid as a client certificate under the CA: {e}")))?;
        // Both builders check that the private key matches the certificate.
        server_crypto(self)?;
        client_crypto(self)?;
        Ok(())
    }
}

fn read_file(
    path: &Path,
    what: &'static str,
    missing: impl FnOnce(&'static str, &Path) -> TlsError,
) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            missing(what, path)
        } else {
            TlsError::Read { what, path: path.to_owned(), source }
        }
    })
}

fn read_certs(
    path: &Path,
    what: &'static str,
    missing: impl FnOnce(&'static str, &Path) -> TlsError,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_file(path, what, missing)?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(bytes.as_slice()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::BadPem { what, path: path.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoPemItem { what, path: path.to_owned(), expected: "CERTIFICATE" });
    }
    Ok(certs)
}

fn read_key(
    path: &Path,
    missing: impl FnOnce(&'static str, &Path) -> TlsError,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    const WHAT: &str = "node private key";
    let bytes = read_file(path, WHAT, missing)?;
    // Accepts PKCS#8 ("PRIVATE KEY", what gen_certs writes) and also SEC1 / PKCS#1 keys.
    rustls_pemfile::private_key(&mut BufReader::new(bytes.as_slice()))
        .map_err(|source| TlsError::BadPem { what: WHAT, path: path.to_owned(), source })?
        .ok_or_else(|| TlsError::NoPemItem { what: WHAT, path: path.to_owned(), expected: "PRIVATE KEY" })
}

/// The crypto provider of every configuration made here (never the process default).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn root_store(ca_certs: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in ca_certs {
        roots.add(ca.clone()).map_err(|source| TlsError::CaCert { source })?;
    }
    Ok(roots)
}

fn client_verifier(
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    // Client authentication is mandatory: `allow_unauthenticated()` is never called.
    WebPkiClientVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|source| TlsError::Verifier { side: "client", source })
}

/// The rustls server configuration of a node: TLS 1.3 only, presents `id`'s certificate,
/// requires a client certificate that chains to `id.ca_certs`, ALPN [`ALPN`].
///
/// 0-RTT and session resumption are off: a replication connection lives long, and every
/// handshake then authenticates the client with its certificate.
pub fn server_crypto(id: &NodeIdentity) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let roots = Arc::new(root_store(&id.ca_certs)?);
    let verifier = client_verifier(roots, provider.clone())?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config { context: "server configuration (TLS 1.3)", source })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.cert_chain.clone(), id.key.clone_key())
        .map_err(|source| TlsError::Config { context: "server configuration (node certificate and key)", source })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // QUIC allows only 0 or u32::MAX here; 0 disables 0-RTT.
    config.max_early_data_size = 0;
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    Ok(config)
}

/// The rustls client configuration of a node: TLS 1.3 only, verifies the server's certificate
/// against `id.ca_certs` and the server name dialed, presents `id`'s certificate, ALPN
/// [`ALPN`]. There is no mode that skips verification.
pub fn client_crypto(id: &NodeIdentity) -> Result<rustls::ClientConfig, TlsError> {
    let roots = root_store(&id.ca_certs)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config { context: "client configuration (TLS 1.3)", source })?
        .with_root_certificates(roots)
        .with_client_auth_cert(id.cert_chain.clone(), id.key.clone_key())
        .map_err(|source| TlsError::Config { context: "client configuration (node certificate and key)", source })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.enable_early_data = false;
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// The DNS subject alternative names of a certificate, lowercased; wildcard names are skipped.
/// Empty if the certificate cannot be parsed.
pub fn cert_dns_names(cert: &CertificateDer<'_>) -> Vec<String> {
    match webpki::EndEntityCert::try_from(cert) {
        Ok(parsed) => {
            parsed.valid_dns_names().filter(|n| !n.starts_with('*')).map(|n| n.to_ascii_lowercase()).collect()
        }
        Err(_) => Vec::new(),
    }
}

/// The node name of the peer of `conn`: the first DNS SAN (lowercased) of the end-entity
/// certificate it presented, which the handshake verified against the cluster CA. Works on both
/// sides: on the server it names the client (replica or primary) by its client certificate.
///
/// `None` before the handshake completes or if the certificate has no DNS name.
pub fn peer_name(conn: &quinn::Connection) -> Option<String> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    cert_dns_names(chain.first()?).into_iter().next()
}

/// A cluster certificate authority made with rcgen, for development and tests.
///
/// Certificates are ECDSA P-256 and use rcgen's default validity (1975 to 4096): fine for a
/// development or test CA, not a production PKI.
pub struct ClusterCa {
    common_name: String,
    cert: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa").field("common_name", &self.common_name).finish_non_exhaustive()
    }
}

fn rcgen_err(context: impl Into<String>) -> impl FnOnce(rcgen::Error) -> TlsError {
    let context = context.into();
    move |source| TlsError::Rcgen { context, source }
}

impl ClusterCa {
    /// A new self-signed CA named `common_name` (its subject CN) with a fresh key.
    pub fn generate(common_name: &str) -> Result<ClusterCa, TlsError> {
        let key = rcgen::KeyPair::generate().map_err(rcgen_err("CA key"))?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        // Issues node certificates only, no intermediate CAs.
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert =
            params.self_signed(&key).map_err(rcgen_err(format!("self-signed CA certificate {common_name:?}")))?;
        Ok(ClusterCa { common_name: common_name.to_owned(), cert, issuer: rcgen::Issuer::new(params, key) })
    }

    /// The CA's subject common name.
    pub fn common_name(&self) -> &str {
        &self.common_name
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// The CA certificate, PEM (the content of `ca.pem`).
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// The CA private key, PKCS#8 PEM. Whoever holds it can mint node identities.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    fn issue_rcgen(&self, name: &str) -> Result<(rcgen::Certificate, rcgen::KeyPair), TlsError> {
        validate_node_name(name)?;
        let key = rcgen::KeyPair::generate().map_err(rcgen_err(format!("key of node {name:?}")))?;
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])
            .map_err(rcgen_err(format!("certificate parameters of node {name:?}")))?;
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(rcgen_err(format!("certificate of node {name:?}")))?;
        Ok((cert, key))
    }

    /// A new identity for node `name`: a fresh key and a certificate with `name` as DNS SAN and
    /// CN, valid for server and client authentication, signed by this CA.
    pub fn issue(&self, name: &str) -> Result<NodeIdentity, TlsError> {
        let (cert, key) = self.issue_rcgen(name)?;
        Ok(NodeIdentity {
            name: name.to_owned(),
            cert_chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            ca_certs: vec![self.cert_der()],
        })
    }

    /// Writes `dir/ca.pem` and, for each name, a new `dir/NAME.pem` and `dir/NAME.key` (mode 0600
    /// on unix), creating `dir` if needed and overwriting existing files. The CA key is not
    /// written (see [`ClusterCa::write_ca_key`]). Returns the paths written.
    pub fn write_dir(&self, dir: &Path, names: &[&str]) -> Result<Vec<PathBuf>, TlsError> {
        for name in names {
            validate_node_name(name)?;
        }
        fs::create_dir_all(dir).map_err(|source| TlsError::Write { path: dir.to_owned(), source })?;
        let mut written = Vec::with_capacity(1 + 2 * names.len());
        let ca_path = dir.join(CA_CERT_FILE);
        write_file(&ca_path, self.cert_pem().as_bytes(), false)?;
        written.push(ca_path);
        for name in names {
            let (cert, key) = self.issue_rcgen(name)?;
            let cert_file = cert_path(dir, name);
            write_file(&cert_file, cert.pem().as_bytes(), false)?;
            written.push(cert_file);
            let key_file = key_path(dir, name);
            write_file(&key_file, key.serialize_pem().as_bytes(), true)?;
            written.push(key_file);
        }
        Ok(written)
    }

    /// Writes the CA private key to `dir/ca.key` (mode 0600 on unix) and returns its path. Only
    /// for development setups that will issue more certificates later with other tools; keep it
    /// off the nodes.
    pub fn write_ca_key(&self, dir: &Path) -> Result<PathBuf, TlsError> {
        fs::create_dir_all(dir).map_err(|source| TlsError::Write { path: dir.to_owned(), source })?;
        let path = dir.join(CA_KEY_FILE);
        write_file(&path, self.key_pem().as_bytes(), true)?;
        Ok(path)
    }
}

/// Writes `contents` to `path`; a `secret` file is created with mode 0600 on unix (and an
/// existing one is narrowed to 0600 before it is written).
fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    let wrap = |source| TlsError::Write { path: path.to_owned(), source };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(wrap)?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600)).map_err(wrap)?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    file.write_all(contents).map_err(wrap)?;
    file.sync_all().map_err(wrap)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        for ok in ["primary", "replica-1", "db1.cluster.local", "a"] {
            validate_node_name(ok).unwrap();
        }
        for bad in ["", "Replica", "replica_1", "../x", "a/b", "10.0.0.1", "-a", "a..b", "*.x"] {
            assert!(matches!(validate_node_name(bad), Err(TlsError::InvalidNodeName { .. })), "{bad:?} accepted");
        }
    }

    #[test]
    fn issued_identity_verifies_and_names_itself() {
        let ca = ClusterCa::generate("test ca").unwrap();
        let id = ca.issue("replica-1").unwrap();
        id.verify().unwrap();
        assert_eq!(cert_dns_names(&id.cert_chain[0]), vec!["replica-1"]);
        server_crypto(&id).unwrap();
        client_crypto(&id).unwrap();
        let dbg = format!("{id:?}");
        assert!(dbg.contains("replica-1") && dbg.contains("redacted"));
    }

    #[test]
    fn identity_under_another_ca_does_not_verify() {
        let ca = ClusterCa::generate("a").unwrap();
        let other = ClusterCa::generate("b").unwrap();
        let mut id = ca.issue("primary").unwrap();
        id.ca_certs = vec![other.cert_der()];
        assert!(matches!(id.verify(), Err(TlsError::InvalidIdentity { .. })));
        let mut renamed = ca.issue("primary").unwrap();
        renamed.name = "replica-1".into();
        let err = renamed.verify().unwrap_err().to_string();
        assert!(err.contains("primary"), "{err}");
    }

    #[test]
    fn mismatched_key_is_refused() {
        let ca = ClusterCa::generate("a").unwrap();
        let mut id = ca.issue("primary").unwrap();
        id.key = ca.issue("replica-1").unwrap().key;
        assert!(id.verify().is_err());
    }
}
