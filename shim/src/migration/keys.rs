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
/// In a group's admin dir (`ums keys create --keep-ca`): the CA's private key
/// and certificate, and the trust bundle every member's `ca.pem` copies.
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// During a rotation (`ums keys rotate --step trust`), the next CA.
pub const NEXT_CA_KEY_FILE: &str = "next-ca-key.pem";
pub const NEXT_CA_CERT_FILE: &str = "next-ca-cert.pem";
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
    #[error("{0}")]
    Admin(String),
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
/// set) or one per name (`dir/NAME` is that member's key set). Without
/// `keep_ca` the CA's private key is not kept: a group grows by sharing a set
/// or is made anew. With it (and `names`), `dir` is also the group's admin
/// dir: `ca-key.pem`, `ca-cert.pem` and the trust bundle `ca.pem` stay there,
/// for [`add`] and [`rotate`]. Returns the key set directories made. Files
/// are mode 0600, dirs 0700; existing files are never overwritten.
pub fn create(dir: &Path, names: &[String], keep_ca: bool) -> Result<Vec<PathBuf>, KeysError> {
    for n in names {
        if !valid_name(n) {
            return Err(KeysError::BadName(n.clone()));
        }
    }
    if keep_ca && names.is_empty() {
        return Err(KeysError::Admin(
            "--keep-ca needs --names: the CA key stays in DIR, and each member's key set goes to DIR/NAME \
             (a shared key set would hand the CA key to every member)"
                .into(),
        ));
    }
    let (ca_key, ca_cert) = new_ca()?;
    let members: Vec<(String, PathBuf)> = if names.is_empty() {
        vec![(SHARED_NAME.to_string(), dir.to_path_buf())]
    } else {
        names.iter().map(|n| (n.clone(), dir.join(n))).collect()
    };
    // Refuse before writing anything if any file is already there.
    let mut files: Vec<PathBuf> =
        members.iter().flat_map(|(_, d)| [CA_FILE, CERT_FILE, KEY_FILE].map(|f| d.join(f))).collect();
    if keep_ca {
        files.extend([CA_FILE, CA_KEY_FILE, CA_CERT_FILE].map(|f| dir.join(f)));
    }
    if let Some(p) = files.into_iter().find(|p| p.exists()) {
        return Err(KeysError::Write { path: p, source: std::io::ErrorKind::AlreadyExists.into() });
    }
    make_private_dir(dir)?;
    let bundle = ca_cert.pem();
    if keep_ca {
        write_private(&dir.join(CA_KEY_FILE), ca_key.serialize_pem().as_bytes())?;
        write_private(&dir.join(CA_CERT_FILE), ca_cert.pem().as_bytes())?;
        write_private(&dir.join(CA_FILE), bundle.as_bytes())?;
    }
    for (name, d) in &members {
        write_member(d, name, &bundle, &ca_cert, &ca_key, false)?;
    }
    Ok(members.into_iter().map(|(_, d)| d).collect())
}

fn new_ca() -> Result<(rcgen::KeyPair, rcgen::Certificate), KeysError> {
    let ca_key = rcgen::KeyPair::generate()?;
    let ca_cert = ca_params(&format!("ums peer group CA {:08x}", rand::random::<u32>())).self_signed(&ca_key)?;
    Ok((ca_key, ca_cert))
}

/// A group CA's certificate parameters; its common name names the group.
fn ca_params(common_name: &str) -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    validity(&mut p);
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, common_name.to_string());
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    p
}

/// A member's key set in `d`: its certificate signed by `ca`, and `bundle`
/// as its `ca.pem`. `replace` swaps existing files atomically (a mounted
/// Secret's reader sees the old file or the new one, never half of one).
fn write_member(
    d: &Path,
    name: &str,
    bundle: &str,
    ca_cert: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
    replace: bool,
) -> Result<(), KeysError> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    validity(&mut params);
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, name.to_string());
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, ca_cert, ca_key)?;
    make_private_dir(d)?;
    let write = if replace { replace_private } else { write_private };
    // The key before the certificate: a connection set up between the two
    // renames finds a key that is not its certificate's and fails (`load`
    // checks they match) rather than using a wrong pair.
    write(&d.join(CA_FILE), bundle.as_bytes())?;
    write(&d.join(KEY_FILE), key.serialize_pem().as_bytes())?;
    write(&d.join(CERT_FILE), cert.pem().as_bytes())
}

/// The group's CA (or the next one) from its admin dir.
fn load_ca(dir: &Path, key_file: &str, cert_file: &str) -> Result<(rcgen::KeyPair, rcgen::Certificate), KeysError> {
    let read = |f: &str| {
        let path = dir.join(f);
        std::fs::read_to_string(&path).map_err(|source| KeysError::Read { path, source })
    };
    let key = rcgen::KeyPair::from_pem(&read(key_file)?)?;
    let path = dir.join(cert_file);
    let der = read_certs(&path)?.remove(0);
    let cn = common_name(&der).ok_or_else(|| KeysError::NoCert { path })?;
    // The issuer for signing only: the same subject and key as the CA
    // members trust (its ca.pem), so what it signs verifies against that.
    let cert = ca_params(&cn).self_signed(&key)?;
    Ok((key, cert))
}

fn is_admin_dir(dir: &Path) -> Result<(), KeysError> {
    if dir.join(CA_KEY_FILE).is_file() {
        return Ok(());
    }
    Err(KeysError::Admin(format!(
        "{} holds no CA key ({CA_KEY_FILE}): only a group made with `ums keys create DIR --names ... --keep-ca` can \
         grow or rotate",
        dir.display()
    )))
}

/// Members of the group whose admin dir is `dir`: its subdirectories that
/// hold a key set.
fn members(dir: &Path) -> Result<Vec<(String, PathBuf)>, KeysError> {
    let rd = std::fs::read_dir(dir).map_err(|source| KeysError::Read { path: dir.to_path_buf(), source })?;
    let mut out: Vec<(String, PathBuf)> = rd
        .flatten()
        .filter(|e| e.path().join(CERT_FILE).is_file())
        .filter_map(|e| Some((e.file_name().to_str()?.to_string(), e.path())))
        .collect();
    out.sort();
    Ok(out)
}

/// New members of an existing group (`ums keys add DIR NAME...`): key sets
/// `dir/NAME` signed by the group's CA, trusting what the group trusts now.
pub fn add(dir: &Path, names: &[String]) -> Result<Vec<PathBuf>, KeysError> {
    is_admin_dir(dir)?;
    for n in names {
        if !valid_name(n) {
            return Err(KeysError::BadName(n.clone()));
        }
        if dir.join(n).exists() {
            return Err(KeysError::Write { path: dir.join(n), source: std::io::ErrorKind::AlreadyExists.into() });
        }
    }
    let (key, cert) = load_ca(dir, CA_KEY_FILE, CA_CERT_FILE)?;
    let bundle = std::fs::read_to_string(dir.join(CA_FILE))
        .map_err(|source| KeysError::Read { path: dir.join(CA_FILE), source })?;
    let mut made = Vec::new();
    for n in names {
        write_member(&dir.join(n), n, &bundle, &cert, &key, false)?;
        made.push(dir.join(n));
    }
    Ok(made)
}

/// One step of replacing a group's CA while its members run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RotateStep {
    /// A next CA; every member trusts both (their certificates unchanged).
    Trust,
    /// Every member gets a certificate of the next CA, which becomes the CA.
    Certs,
    /// Members trust only the new CA; the old one is gone.
    Finish,
}

/// `ums keys rotate DIR --step trust|certs|finish`: each step rewrites every
/// member's key set in `dir/NAME`; roll each step out to every member (a
/// Secret update; peers reload their key set for every connection) before
/// the next. Between steps every member still talks to every other.
pub fn rotate(dir: &Path, step: RotateStep) -> Result<Vec<PathBuf>, KeysError> {
    is_admin_dir(dir)?;
    let members = members(dir)?;
    let next_there = dir.join(NEXT_CA_KEY_FILE).is_file();
    match step {
        RotateStep::Trust => {
            if next_there {
                return Err(KeysError::Admin("a rotation is under way: run --step certs, then --step finish".into()));
            }
            let (next_key, next_cert) = new_ca()?;
            write_private(&dir.join(NEXT_CA_KEY_FILE), next_key.serialize_pem().as_bytes())?;
            write_private(&dir.join(NEXT_CA_CERT_FILE), next_cert.pem().as_bytes())?;
            let bundle = format!("{}{}", read_text(&dir.join(CA_CERT_FILE))?, next_cert.pem());
            set_bundle(dir, &members, &bundle)?;
        }
        RotateStep::Certs => {
            if !next_there {
                return Err(KeysError::Admin("no rotation under way: start with --step trust".into()));
            }
            let (key, cert) = load_ca(dir, NEXT_CA_KEY_FILE, NEXT_CA_CERT_FILE)?;
            let bundle = read_text(&dir.join(CA_FILE))?;
            for (name, d) in &members {
                write_member(d, name, &bundle, &cert, &key, true)?;
            }
        }
        RotateStep::Finish => {
            if !next_there {
                return Err(KeysError::Admin("no rotation under way: start with --step trust".into()));
            }
            // Every member must hold a certificate of the next CA by now.
            let (_, next) = load_ca(dir, NEXT_CA_KEY_FILE, NEXT_CA_CERT_FILE)?;
            let only_next = next.pem();
            for (_, d) in &members {
                check_member(d, &only_next)?;
            }
            set_bundle(dir, &members, &only_next)?;
            std::fs::rename(dir.join(NEXT_CA_KEY_FILE), dir.join(CA_KEY_FILE))
                .map_err(|source| KeysError::Write { path: dir.join(CA_KEY_FILE), source })?;
            std::fs::rename(dir.join(NEXT_CA_CERT_FILE), dir.join(CA_CERT_FILE))
                .map_err(|source| KeysError::Write { path: dir.join(CA_CERT_FILE), source })?;
        }
    }
    Ok(members.into_iter().map(|(_, d)| d).collect())
}

/// Does the member key set in `d` chain to the CA `ca_pem`? (`load` against
/// a copy whose `ca.pem` is that CA alone.)
fn check_member(d: &Path, ca_pem: &str) -> Result<(), KeysError> {
    let tmp = std::env::temp_dir().join(format!("ums-keys-check-{:08x}", rand::random::<u32>()));
    make_private_dir(&tmp)?;
    let r = (|| {
        write_private(&tmp.join(CA_FILE), ca_pem.as_bytes())?;
        for f in [CERT_FILE, KEY_FILE] {
            write_private(&tmp.join(f), read_text(&d.join(f))?.as_bytes())?;
        }
        load(&tmp).map(|_| ()).map_err(|e| {
            KeysError::Admin(format!("{} has no certificate of the new CA yet (run --step certs): {e}", d.display()))
        })
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    r
}

fn read_text(path: &Path) -> Result<String, KeysError> {
    std::fs::read_to_string(path).map_err(|source| KeysError::Read { path: path.to_path_buf(), source })
}

fn set_bundle(dir: &Path, members: &[(String, PathBuf)], bundle: &str) -> Result<(), KeysError> {
    replace_private(&dir.join(CA_FILE), bundle.as_bytes())?;
    for (_, d) in members {
        replace_private(&d.join(CA_FILE), bundle.as_bytes())?;
    }
    Ok(())
}

/// Writes `bytes` to a new file beside `path`, then renames it over `path`.
fn replace_private(path: &Path, bytes: &[u8]) -> Result<(), KeysError> {
    let tmp = path.with_extension(format!("new-{:08x}", rand::random::<u32>()));
    write_private(&tmp, bytes)?;
    std::fs::rename(&tmp, path).map_err(|source| KeysError::Write { path: path.to_path_buf(), source })
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
        let made = create(&dir, &[], false).unwrap();
        assert_eq!(made, vec![dir.clone()]);
        let set = load(&dir).unwrap();
        assert_eq!(set.identity, SHARED_NAME);
        for f in [CA_FILE, CERT_FILE, KEY_FILE] {
            assert_eq!(std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777, 0o600, "{f}");
        }
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        // Never overwritten.
        assert!(matches!(create(&dir, &[], false), Err(KeysError::Write { .. })));
    }

    #[test]
    fn named_members_share_a_ca_and_foreign_certs_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let made = create(tmp.path(), &["a".into(), "b".into()], false).unwrap();
        assert_eq!(load(&made[0]).unwrap().identity, "a");
        assert_eq!(load(&made[1]).unwrap().identity, "b");
        assert_eq!(std::fs::read(made[0].join(CA_FILE)).unwrap(), std::fs::read(made[1].join(CA_FILE)).unwrap());
        // A member certificate of another group does not load against this CA.
        let other = tmp.path().join("other");
        create(&other, &[], false).unwrap();
        std::fs::remove_file(made[0].join(CERT_FILE)).unwrap();
        std::fs::copy(other.join(CERT_FILE), made[0].join(CERT_FILE)).unwrap();
        assert!(matches!(load(&made[0]), Err(KeysError::NotMember { .. })), "{:?}", load(&made[0]));
        // A key that is not the certificate's is refused.
        std::fs::remove_file(made[1].join(KEY_FILE)).unwrap();
        std::fs::copy(other.join(KEY_FILE), made[1].join(KEY_FILE)).unwrap();
        assert!(matches!(load(&made[1]), Err(KeysError::Tls { .. })), "{:?}", load(&made[1]));
        assert!(matches!(create(tmp.path(), &["../x".into()], false), Err(KeysError::BadName(_))));
        assert!(matches!(load(&tmp.path().join("missing")), Err(KeysError::Read { .. })));
    }

    /// Does a TLS client with key set `a` get through to a server with `b`?
    fn talks(a: &Path, b: &Path) -> bool {
        let (a, b) = (load(a).unwrap(), load(b).unwrap());
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(a.roots().unwrap(), provider())
            .build()
            .unwrap();
        let name = ServerName::try_from(SERVER_NAME).unwrap();
        verifier.verify_server_cert(&b.chain[0], &b.chain[1..], &name, &[], UnixTime::now()).is_ok()
    }

    #[test]
    fn a_kept_ca_adds_members_and_rotates_without_a_gap() {
        let tmp = tempfile::tempdir().unwrap();
        let g = tmp.path().join("group");
        assert!(matches!(create(&g, &[], true), Err(KeysError::Admin(_))));
        let made = create(&g, &["a".into(), "b".into()], true).unwrap();
        assert_eq!(std::fs::metadata(g.join(CA_KEY_FILE)).unwrap().permissions().mode() & 0o777, 0o600);
        // A new member of the same group talks to the others.
        let c = add(&g, &["c".into()]).unwrap().remove(0);
        assert_eq!(load(&c).unwrap().identity, "c");
        assert!(talks(&made[0], &c) && talks(&c, &made[1]));
        assert!(matches!(add(&g, &["c".into()]), Err(KeysError::Write { .. })));
        // A group without a kept CA cannot grow.
        let plain = tmp.path().join("plain");
        create(&plain, &["x".into()], false).unwrap();
        assert!(matches!(add(&plain, &["y".into()]), Err(KeysError::Admin(_))));

        let old_b = tmp.path().join("old-b");
        std::fs::create_dir(&old_b).unwrap();
        for f in [CA_FILE, CERT_FILE, KEY_FILE] {
            std::fs::copy(made[1].join(f), old_b.join(f)).unwrap();
        }
        assert!(matches!(rotate(&g, RotateStep::Finish), Err(KeysError::Admin(_))));
        // Each step is rolled out one member at a time: a member still on
        // the previous step (old-b) talks to one on the next, both ways.
        rotate(&g, RotateStep::Trust).unwrap();
        assert!(talks(&made[0], &old_b) && talks(&old_b, &made[0]));
        assert!(matches!(rotate(&g, RotateStep::Finish), Err(KeysError::Admin(_))));
        let after_trust = tmp.path().join("trust-b");
        std::fs::create_dir(&after_trust).unwrap();
        for f in [CA_FILE, CERT_FILE, KEY_FILE] {
            std::fs::copy(made[1].join(f), after_trust.join(f)).unwrap();
        }
        rotate(&g, RotateStep::Certs).unwrap();
        assert!(talks(&made[0], &after_trust) && talks(&after_trust, &made[0]));
        assert!(talks(&made[0], &made[1]) && talks(&c, &made[0]));
        rotate(&g, RotateStep::Finish).unwrap();
        assert!(talks(&made[0], &made[1]) && talks(&made[1], &c));
        // The old CA is trusted no more, and new members come from the new one.
        assert!(!talks(&made[0], &old_b));
        let d = add(&g, &["d".into()]).unwrap().remove(0);
        assert!(talks(&d, &made[0]) && talks(&made[0], &d));
    }
}
