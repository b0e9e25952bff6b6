//! The nested container's OCI runtime spec (config.json), built from the
//! workload image's config the way Docker would run it: Entrypoint+Cmd, Env,
//! WorkingDir, User resolved in the image's own /etc/passwd and /etc/group, a
//! Docker-like capability set, and a network namespace that `ums` creates and
//! hands over by path (so it survives checkpoint/restore with loopback up).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxDeviceCgroupBuilder, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxResourcesBuilder, ProcessBuilder, RootBuilder, Spec, UserBuilder,
};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("the image has no command (no Entrypoint or Cmd) and none was given")]
    NoCommand,
    #[error("user {user:?} not found in the image's {file}")]
    UnknownUser { user: String, file: &'static str },
    #[error("cannot build the runtime spec: {0}")]
    Build(#[from] oci_spec::OciSpecError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: oci_spec::OciSpecError,
    },
}

/// What the spec needs besides the image config.
#[derive(Debug, Clone)]
pub struct SpecInput<'a> {
    /// Overrides Entrypoint+Cmd when non-empty (`ums init -- CMD...`).
    pub command: &'a [String],
    pub hostname: &'a str,
    /// The network namespace `ums` made for the workload.
    pub netns: &'a Path,
    pub cgroups_path: &'a str,
    /// The unpacked image, to resolve user and group names.
    pub rootfs: &'a Path,
}

/// The capabilities Docker grants by default.
pub const DEFAULT_CAPS: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Entrypoint + Cmd, or the override.
pub fn command_line(config: &ImageConfiguration, overridden: &[String]) -> Result<Vec<String>, SpecError> {
    if !overridden.is_empty() {
        return Ok(overridden.to_vec());
    }
    let c = config.config().as_ref();
    let mut args: Vec<String> = c.and_then(|c| c.entrypoint().clone()).unwrap_or_default();
    args.extend(c.and_then(|c| c.cmd().clone()).unwrap_or_default());
    if args.is_empty() {
        return Err(SpecError::NoCommand);
    }
    Ok(args)
}

/// The image's Env, with a default PATH when it sets none and HOSTNAME.
pub fn environment(config: &ImageConfiguration, hostname: &str) -> Vec<String> {
    let mut env: Vec<String> = config.config().as_ref().and_then(|c| c.env().clone()).unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    if !env.iter().any(|e| e.starts_with("HOSTNAME=")) {
        env.push(format!("HOSTNAME={hostname}"));
    }
    env
}

/// A resolved `User` field: uid, gid and supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

/// Resolve "", "name", "uid", "name:group", "uid:gid" against the image's
/// passwd and group files (their contents, so this stays a pure function).
pub fn resolve_user(user: &str, passwd: &str, group: &str) -> Result<ResolvedUser, SpecError> {
    let user = user.trim();
    if user.is_empty() {
        return Ok(ResolvedUser { uid: 0, gid: 0, additional_gids: Vec::new() });
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd_entry = passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 {
            return None;
        }
        let matches = f[0] == u || (u.parse::<u32>().is_ok() && f[2] == u);
        matches.then(|| (f[0].to_string(), f[2].parse::<u32>().ok(), f[3].parse::<u32>().ok()))
    });
    let (name, uid, primary_gid) = match (u.parse::<u32>(), passwd_entry) {
        (Ok(uid), entry) => (entry.as_ref().map(|e| e.0.clone()), uid, entry.and_then(|e| e.2).unwrap_or(0)),
        (Err(_), Some((name, Some(uid), Some(gid)))) => (Some(name), uid, gid),
        (Err(_), _) => return Err(SpecError::UnknownUser { user: u.to_string(), file: "/etc/passwd" }),
    };
    let gid = match g {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group
                .lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() >= 3 && f[0] == g).then(|| f[2].parse::<u32>().ok()).flatten()
                })
                .ok_or_else(|| SpecError::UnknownUser { user: g.to_string(), file: "/etc/group" })?,
        },
    };
    let mut additional_gids = Vec::new();
    if let (Some(name), None) = (name, g) {
        let mut seen = HashSet::new();
        for l in group.lines() {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() >= 4 && f[3].split(',').any(|m| m == name) {
                if let Ok(id) = f[2].parse::<u32>() {
                    if id != gid && seen.insert(id) {
                        additional_gids.push(id);
                    }
                }
            }
        }
    }
    Ok(ResolvedUser { uid, gid, additional_gids })
}

/// Read a file of the image without following symlinks out of it: good enough
/// for /etc/passwd, which is only parsed.
fn image_file(rootfs: &Path, rel: &str) -> String {
    let p = rootfs.join(rel);
    match std::fs::symlink_metadata(&p) {
        Ok(m) if m.is_file() => std::fs::read_to_string(p).unwrap_or_default(),
        _ => String::new(),
    }
}

/// Build the whole spec.
pub fn build(config: &ImageConfiguration, input: &SpecInput<'_>) -> Result<Spec, SpecError> {
    let args = command_line(config, input.command)?;
    let env = environment(config, input.hostname);
    let image_cfg = config.config().as_ref();
    let cwd = image_cfg.and_then(|c| c.working_dir().clone()).filter(|w| !w.is_empty()).unwrap_or_else(|| "/".into());
    let user_field = image_cfg.and_then(|c| c.user().clone()).unwrap_or_default();
    let user =
        resolve_user(&user_field, &image_file(input.rootfs, "etc/passwd"), &image_file(input.rootfs, "etc/group"))?;

    let caps: HashSet<Capability> = DEFAULT_CAPS.into_iter().collect();
    let capabilities =
        LinuxCapabilitiesBuilder::default().bounding(caps.clone()).effective(caps.clone()).permitted(caps).build()?;
    let process = ProcessBuilder::default()
        .terminal(false)
        .args(args)
        .env(env)
        .cwd(cwd)
        .user(UserBuilder::default().uid(user.uid).gid(user.gid).additional_gids(user.additional_gids).build()?)
        .capabilities(capabilities)
        .no_new_privileges(false)
        .rlimits(vec![oci_spec::runtime::PosixRlimitBuilder::default()
            .typ(oci_spec::runtime::PosixRlimitType::RlimitNofile)
            .soft(1024u64)
            .hard(1024u64)
            .build()?])
        .build()?;

    let ns = |t: LinuxNamespaceType| LinuxNamespaceBuilder::default().typ(t).build();
    let namespaces = vec![
        ns(LinuxNamespaceType::Pid)?,
        ns(LinuxNamespaceType::Ipc)?,
        ns(LinuxNamespaceType::Uts)?,
        ns(LinuxNamespaceType::Mount)?,
        LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network).path(input.netns).build()?,
    ];
    let deny_all = LinuxDeviceCgroupBuilder::default().allow(false).access("rwm").build()?;
    let defaults = oci_spec::runtime::Linux::default();
    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .cgroups_path(PathBuf::from(input.cgroups_path))
        .resources(LinuxResourcesBuilder::default().devices(vec![deny_all]).build()?)
        .masked_paths(defaults.masked_paths().clone().unwrap_or_default())
        .readonly_paths(defaults.readonly_paths().clone().unwrap_or_default())
        .build()?;

    let mut spec = Spec::default();
    spec.set_process(Some(process));
    spec.set_root(Some(RootBuilder::default().path("rootfs").readonly(false).build()?));
    spec.set_hostname(Some(input.hostname.to_string()));
    spec.set_linux(Some(linux));
    Ok(spec)
}

pub fn write(spec: &Spec, bundle: &Path) -> Result<(), SpecError> {
    let path = bundle.join("config.json");
    spec.save(&path).map_err(|source| SpecError::Write { path, source })
}

/// The image's ExposedPorts ("80/tcp", "53/udp"), recorded for publishing.
pub fn exposed_ports(config: &ImageConfiguration) -> Vec<String> {
    let mut p = config.config().as_ref().and_then(|c| c.exposed_ports().clone()).unwrap_or_default();
    p.sort();
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app,bob\napp:x:1001:\nweb:x:33:\n";

    fn image(json: &str) -> ImageConfiguration {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn users_resolve_like_docker() {
        assert_eq!(resolve_user("", PASSWD, GROUP).unwrap().uid, 0);
        let u = resolve_user("app", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid, u.additional_gids), (1000, 1001, vec![50]));
        let u = resolve_user("1000", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1001));
        let u = resolve_user("4242:4343", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid), (4242, 4343));
        let u = resolve_user("app:web", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid, u.additional_gids.len()), (1000, 33, 0));
        assert!(matches!(resolve_user("nobody", PASSWD, GROUP), Err(SpecError::UnknownUser { .. })));
        assert!(matches!(resolve_user("app:nogroup", PASSWD, GROUP), Err(SpecError::UnknownUser { .. })));
    }

    #[test]
    fn entrypoint_and_cmd_join_unless_overridden() {
        let c = image(
            r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"history":[],
            "config":{"Entrypoint":["/bin/memctr"],"Cmd":["128"]}}"#,
        );
        assert_eq!(command_line(&c, &[]).unwrap(), ["/bin/memctr", "128"]);
        assert_eq!(command_line(&c, &["/bin/sh".into()]).unwrap(), ["/bin/sh"]);
        let empty =
            image(r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"history":[]}"#);
        assert!(matches!(command_line(&empty, &[]), Err(SpecError::NoCommand)));
    }

    #[test]
    fn spec_carries_the_image_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(dir.path().join("etc/passwd"), PASSWD).unwrap();
        std::fs::write(dir.path().join("etc/group"), GROUP).unwrap();
        let c = image(
            r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"history":[],
            "config":{"Cmd":["/bin/memctr"],"Env":["FOO=bar"],"WorkingDir":"/work","User":"app",
                      "ExposedPorts":{"8080/tcp":{},"53/udp":{}}}}"#,
        );
        let spec = build(
            &c,
            &SpecInput {
                command: &[],
                hostname: "outer-a",
                netns: Path::new("/run/ums/netns-workload"),
                cgroups_path: "/ums/x",
                rootfs: dir.path(),
            },
        )
        .unwrap();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.args().as_ref().unwrap(), &["/bin/memctr"]);
        let env = p.env().as_ref().unwrap();
        assert!(env.contains(&"FOO=bar".to_string()));
        assert!(env.iter().any(|e| e.starts_with("PATH=")));
        assert_eq!(p.cwd(), Path::new("/work"));
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 1001));
        assert!(!p.terminal().unwrap());
        let caps = p.capabilities().as_ref().unwrap().bounding().as_ref().unwrap();
        assert!(caps.contains(&Capability::NetBindService));
        assert!(!caps.contains(&Capability::SysAdmin));
        assert_eq!(spec.hostname().as_deref(), Some("outer-a"));
        let linux = spec.linux().as_ref().unwrap();
        let nss = linux.namespaces().as_ref().unwrap();
        let net = nss.iter().find(|n| n.typ() == LinuxNamespaceType::Network).unwrap();
        assert_eq!(net.path().as_deref(), Some(Path::new("/run/ums/netns-workload")));
        for t in [LinuxNamespaceType::Pid, LinuxNamespaceType::Ipc, LinuxNamespaceType::Uts, LinuxNamespaceType::Mount]
        {
            assert!(nss.iter().any(|n| n.typ() == t && n.path().is_none()));
        }
        let mounts: Vec<_> = spec.mounts().as_ref().unwrap().iter().map(|m| m.destination().clone()).collect();
        for m in ["/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys"] {
            assert!(mounts.contains(&PathBuf::from(m)), "{m} missing");
        }
        assert_eq!(exposed_ports(&c), ["53/udp", "8080/tcp"]);
    }
}
