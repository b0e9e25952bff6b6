//! Peer key sets: the files that decide who may push a workload here.
//!
//! Restoring a checkpoint runs its code as root in a privileged outer
//! container, so the peer port trusts only peers of the same *group*: a
//! private CA (`ca.pem`) and a member certificate with its key (`peer.pem`,
//! `peer-key.pem`), usually a Kubernetes Secret mounted into every pod of the
//! group. `create` makes such a set (`ums keys create`); `load` reads and
//! checks one (`ums init` at start, and `migration::transport` for every
//! connection, so a rotated Secret takes effect without a restart).
//!
//! Peers are addressed by IP, which says nothing about who they are: every
//! member certificate carries the fixed DNS name [`SERVER_NAME`], which TLS
//! checks instead of the address, and both sides check the chain to the
//! group CA. The member's own name (its certificate's common name) is what
//! the logs show as the peer's identity.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// The key set's file names, inside its directory.
pub const CA_FILE: &str = "ca.pem";
pub const CERT_FILE: &str = "peer.pem";
pub const KEY_FILE: &str = "peer-key.pem";
/// The DNS name in every member certificate; TLS checks it instead of the address.
pub const SERVER_NAME: &str = "ums-peer";
/// The identity of a member certificate made without `--names`.
pub const SHARED_NAME: &str = "ums-peer";
/// How long certificates made by `create` are valid.
pub const VALID_YEARS: i32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it")]
    NoCert { path: PathBuf },
    #[error("{path}: no PEM private key in it ({detail})")]
    NoKey { path: PathBuf, detail: String },
    #[error("{path} is not a valid member certificate of the group in {ca}: {source}")]
    NotMember {
        path: PathBuf,
        ca: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{path}: {source}")]
    Tls {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("generating keys: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad member name {0:?}: use letters, digits, '.', '-' and '_' (at most 64)")]
    BadName(String),
}

/// A loaded, checked key set.
#[derive(Debug)]
pub struct KeySet {
    pub dir: PathBuf,
    pub ca: Vec<CertificateDer<'static>>,
    /// The member certificate (and any intermediates after it).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// This member's name: the common name of its certificate.
    pub identity: String,
}

impl KeySet {
    pub fn roots(&self) -> Result<Arc<rustls::RootCertStore>, KeysError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone()).map_err(|source| KeysError::Tls { path: self.dir.join(CA_FILE), source })?;
        }
        Ok(Arc::new(roots))
    }
}

/// The crypto provider for every peer connection (ring: no C toolchain beyond cc).
///
/// AES-128-GCM is offered first: a migration's cost is bulk encryption, and
/// it is about a third cheaper than AES-256-GCM for the same AEAD guarantees
/// (both sides use this order; a peer that prefers another suite still works).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// Read the key set in `dir` and check that its certificate belongs to its CA
/// and is valid now, so a broken Secret fails at start, not at migration.
pub fn load(dir: &Path) -> Result<KeySet, KeysError> {
    let ca_path = dir.join(CA_FILE);
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    let ca = read_certs(&ca_path)?;
    let chain = read_certs(&cert_path)?;
    let key_pem = std::fs::read(&key_path).map_err(|source| KeysError::Read { path: key_path.clone(), source })?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| KeysError::NoKey { path: key_path.clone(), detail: e.to_string() })?;
    let identity = common_name(&chain[0]).unwrap_or_else(|| "(no common name)".into());
    let set = KeySet { dir: dir.to_path_buf(), ca, chain, key, identity };
    // The member certificate must chain to the group CA, with the peer name.
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(set.roots()?, provider())
        .build()
        .map_err(|e| KeysError::Tls { path: ca_path.clone(), source: rustls::Error::General(e.to_string()) })?;
    let name = ServerName::try_from(SERVER_NAME).expect("a valid DNS name");
    verifier
        .verify_server_cert(&set.chain[0], &set.chain[1..], &name, &[], UnixTime::now())
        .map_err(|source| KeysError::NotMember { path: cert_path.clone(), ca: ca_path.clone(), source })?;
    // And the key must be the certificate's.
    let signer = provider()
        .key_provider
        .load_private_key(set.key.clone_key())
        .map_err(|source| KeysError::Tls { path: key_path.clone(), source })?;
    rustls::sign::CertifiedKey::new(set.chain.clone(), signer)
        .keys_match()
        .map_err(|source| KeysError::Tls { path: key_path, source })?;
    Ok(set)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, KeysError> {
    let pem = std::fs::read(path).map_err(|source| KeysError::Read { path: path.to_path_buf(), source })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(KeysError::NoCert { path: path.to_path_buf() });
    }
    Ok(certs)
}

/// The subject common name of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_string();
    Some(cn)
}

/// A member name from the command line: it becomes a directory name and a
/// certificate common name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

fn this_year() -> i32 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

fn validity(p: &mut rcgen::CertificateParams) {
    let year = this_year();
    // From the start of last year: a peer whose clock lags a little still accepts it.
    p.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    p.not_after = rcgen::date_time_ymd(year + VALID_YEARS, 1, 1);
}

/// Create a key set for a group in `dir`: a new CA, and one member
/// certificate shared by all members (`names` empty: `dir` itself is the key
/// set) or one per name (`dir/NAME` is that member's key set). The CA's
/// private key is not kept: a group grows by sharing a set or is made anew.
/// Returns the key set directories made. Files are mode 0600, dirs 0700;
/// existing files are never overwritten.
pub fn create(dir: &Path, names: &[String]) -> Result<Vec<PathBuf>, KeysError> {
    for n in names {
        if !valid_name(n) {
            return Err(KeysError::BadName(n.clone()));
        }
    }
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::default();
    validity(&mut ca_params);
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("ums peer group CA {:08x}", rand::random::<u32>()));
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let members: Vec<(String, PathBuf)> = if names.is_empty() {
        vec![(SHARED_NAME.to_string(), dir.to_path_buf())]
    } else {
        names.iter().map(|n| (n.clone(), dir.join(n))).collect()
    };
    // Refuse before writing anything if any file is already there.
    for (_, d) in &members {
        for f in [CA_FILE, CERT_FILE, KEY_FILE] {
            let p = d.join(f);
            if p.exists() {
                return Err(KeysError::Write { path: p, source: std::io::ErrorKind::AlreadyExists.into() });
            }
        }
    }
    make_private_dir(dir)?;
    for (name, d) in &members {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        validity(&mut params);
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, name.clone());
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
        make_private_dir(d)?;
        write_private(&d.join(CA_FILE), ca_cert.pem().as_bytes())?;
        write_private(&d.join(CERT_FILE), cert.pem().as_bytes())?;
        write_private(&d.join(KEY_FILE), key.serialize_pem().as_bytes())?;
    }
    Ok(members.into_iter().map(|(_, d)| d).collect())
}

fn make_private_dir(d: &Path) -> Result<(), KeysError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(d)
        .map_err(|source| KeysError::Write { path: d.to_path_buf(), source })
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), KeysError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| KeysError::Write { path: path.to_path_buf(), source };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_created_set_loads_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("group");
        let made = create(&dir, &[]).unwrap();
        assert_eq!(made, vec![dir.clone()]);
        let set = load(&dir).unwrap();
        assert_eq!(set.identity, SHARED_NAME);
        for f in [CA_FILE, CERT_FILE, KEY_FILE] {
            assert_eq!(std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777, 0o600, "{f}");
        }
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        // Never overwritten.
        assert!(matches!(create(&dir, &[]), Err(KeysError::Write { .. })));
    }

    #[test]
    fn named_members_share_a_ca_and_foreign_certs_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let made = create(tmp.path(), &["a".into(), "b".into()]).unwrap();
        assert_eq!(load(&made[0]).unwrap().identity, "a");
        assert_eq!(load(&made[1]).unwrap().identity, "b");
        assert_eq!(std::fs::read(made[0].join(CA_FILE)).unwrap(), std::fs::read(made[1].join(CA_FILE)).unwrap());
        // A member certificate of another group does not load against this CA.
        let other = tmp.path().join("other");
        create(&other, &[]).unwrap();
        std::fs::remove_file(made[0].join(CERT_FILE)).unwrap();
        std::fs::copy(other.join(CERT_FILE), made[0].join(CERT_FILE)).unwrap();
        assert!(matches!(load(&made[0]), Err(KeysError::NotMember { .. })), "{:?}", load(&made[0]));
        // A key that is not the certificate's is refused.
        std::fs::remove_file(made[1].join(KEY_FILE)).unwrap();
        std::fs::copy(other.join(KEY_FILE), made[1].join(KEY_FILE)).unwrap();
        assert!(matches!(load(&made[1]), Err(KeysError::Tls { .. })), "{:?}", load(&made[1]));
        assert!(matches!(create(tmp.path(), &["../x".into()]), Err(KeysError::BadName(_))));
        assert!(matches!(load(&tmp.path().join("missing")), Err(KeysError::Read { .. })));
    }
}
