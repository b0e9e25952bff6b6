//! The nested container's seccomp profile: what Docker gives a container
//! that runs with Docker's default capabilities, written the other way
//! round. Docker's profile lists the syscalls it allows; this one allows
//! every syscall and refuses, with EPERM, the ones Docker's default profile
//! leaves out for a container without CAP_SYS_ADMIN and the other
//! capabilities ums does not grant either. A refused syscall fails the way an
//! unprivileged process expects ("Operation not permitted"), so programs that
//! probe for a feature fall back instead of crashing.
//!
//! `--seccomp unconfined` runs the workload without a filter, and
//! `--seccomp FILE` with the OCI `LinuxSeccomp` object in FILE (JSON). CRIU
//! dumps and restores the filters of the workload's processes, so a
//! checkpoint, restore or migration keeps them.

use std::path::Path;

use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArgBuilder, LinuxSeccompBuilder, LinuxSeccompOperator,
    LinuxSyscall, LinuxSyscallBuilder,
};

/// Refused with EPERM, by what they would let the workload do.
pub const DENIED: &[(&str, &[&str])] = &[
    (
        "mount filesystems, change namespaces or the root (CAP_SYS_ADMIN)",
        &[
            "mount",
            "umount",
            "umount2",
            "pivot_root",
            "unshare",
            "setns",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "open_tree",
            "move_mount",
            "mount_setattr",
            "quotactl",
            "quotactl_fd",
            "lookup_dcookie",
            "swapon",
            "swapoff",
            "nfsservctl",
            "sysfs",
            "_sysctl",
            "ustat",
            "uselib",
        ],
    ),
    ("use the kernel's keyrings, which are not namespaced", &["keyctl", "add_key", "request_key"]),
    (
        "load code into the kernel or replace it (CAP_SYS_MODULE, CAP_SYS_BOOT, CAP_SYS_ADMIN)",
        &[
            "init_module",
            "finit_module",
            "delete_module",
            "create_module",
            "query_module",
            "get_kernel_syms",
            "kexec_load",
            "kexec_file_load",
            "reboot",
            "bpf",
        ],
    ),
    ("watch other processes and the kernel", &["perf_event_open", "kcmp", "userfaultfd", "syslog", "acct"]),
    ("set the host's clock (CAP_SYS_TIME)", &["settimeofday", "stime", "clock_settime", "clock_adjtime"]),
    ("touch hardware directly (CAP_SYS_RAWIO)", &["iopl", "ioperm", "vm86", "vm86old"]),
    ("open files by handle, past the container's root (CAP_DAC_READ_SEARCH)", &["open_by_handle_at"]),
    ("set the memory policy of NUMA nodes (CAP_SYS_NICE)", &["get_mempolicy", "set_mempolicy", "mbind", "move_pages"]),
];

/// `clone` with any of these flags makes a new namespace: EPERM, as unshare.
const CLONE_NAMESPACE_FLAGS: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// Which seccomp filter the workload gets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Seccomp {
    /// [`default_profile`].
    #[default]
    Default,
    /// No filter.
    Unconfined,
    /// A profile read from a file.
    Profile(Box<LinuxSeccomp>),
}

impl Seccomp {
    /// `unconfined`, `default`, or the path of an OCI LinuxSeccomp JSON file.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "unconfined" => Ok(Seccomp::Unconfined),
            "default" => Ok(Seccomp::Default),
            path => {
                let text = std::fs::read_to_string(Path::new(path)).map_err(|e| {
                    format!("--seccomp {path}: cannot read it ({e}); give unconfined, default or a file")
                })?;
                let p: LinuxSeccomp = serde_json::from_str(&text)
                    .map_err(|e| format!("--seccomp {path}: not an OCI LinuxSeccomp object: {e}"))?;
                Ok(Seccomp::Profile(Box::new(p)))
            }
        }
    }

    /// The filter for the runtime spec, if any.
    pub fn profile(&self) -> Option<LinuxSeccomp> {
        match self {
            Seccomp::Default => Some(default_profile()),
            Seccomp::Unconfined => None,
            Seccomp::Profile(p) => Some((**p).clone()),
        }
    }
}

fn architectures() -> Vec<Arch> {
    if cfg!(target_arch = "x86_64") {
        vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32]
    } else if cfg!(target_arch = "aarch64") {
        vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm]
    } else {
        vec![Arch::ScmpArchNative]
    }
}

fn refuse(names: &[&str], errno: i32) -> LinuxSyscall {
    LinuxSyscallBuilder::default()
        .names(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(errno as u32)
        .build()
        .expect("a syscall rule has every field")
}

/// Allow everything but [`DENIED`] and namespace-making `clone`; `clone3`
/// answers ENOSYS, as under Docker, because a filter cannot look into its
/// argument struct: the C library then falls back to `clone`.
pub fn default_profile() -> LinuxSeccomp {
    let mut syscalls: Vec<LinuxSyscall> = DENIED.iter().map(|(_, names)| refuse(names, libc::EPERM)).collect();
    for flag in CLONE_NAMESPACE_FLAGS {
        let mut rule = refuse(&["clone"], libc::EPERM);
        let arg = LinuxSeccompArgBuilder::default()
            .index(0usize)
            .value(flag)
            .value_two(flag)
            .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
            .build()
            .expect("a seccomp argument has every field");
        rule.set_args(Some(vec![arg]));
        syscalls.push(rule);
    }
    syscalls.push(refuse(&["clone3"], libc::ENOSYS));
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .architectures(architectures())
        .syscalls(syscalls)
        .build()
        .expect("a seccomp profile has every field")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule_for<'a>(p: &'a LinuxSeccomp, name: &str) -> Vec<&'a LinuxSyscall> {
        p.syscalls().as_ref().unwrap().iter().filter(|s| s.names().iter().any(|n| n == name)).collect()
    }

    #[test]
    fn default_profile_allows_all_but_the_privileged_syscalls() {
        let p = default_profile();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActAllow);
        for name in
            ["mount", "umount2", "unshare", "setns", "pivot_root", "keyctl", "add_key", "bpf", "perf_event_open"]
        {
            let r = rule_for(&p, name);
            assert_eq!(r.len(), 1, "{name}");
            assert_eq!(r[0].action(), LinuxSeccompAction::ScmpActErrno, "{name}");
            assert_eq!(r[0].errno_ret(), Some(libc::EPERM as u32), "{name}");
            assert!(r[0].args().is_none(), "{name}");
        }
        for name in ["read", "write", "ptrace", "socket"] {
            assert!(rule_for(&p, name).is_empty(), "{name} is allowed");
        }
        // clone: refused only with a namespace flag.
        let clone = rule_for(&p, "clone");
        assert_eq!(clone.len(), CLONE_NAMESPACE_FLAGS.len());
        let user = clone
            .iter()
            .flat_map(|r| r.args().as_ref().unwrap())
            .find(|a| a.value() == libc::CLONE_NEWUSER as u64)
            .unwrap();
        assert_eq!(
            (user.index(), user.op(), user.value_two()),
            (0, LinuxSeccompOperator::ScmpCmpMaskedEq, Some(libc::CLONE_NEWUSER as u64))
        );
        assert_eq!(rule_for(&p, "clone3")[0].errno_ret(), Some(libc::ENOSYS as u32));
    }

    #[test]
    fn the_profile_is_written_as_runc_reads_it() {
        let v = serde_json::to_value(default_profile()).unwrap();
        assert_eq!(v["defaultAction"], "SCMP_ACT_ALLOW");
        let mount = v["syscalls"].as_array().unwrap().iter().find(|s| s["names"][0] == "mount").unwrap();
        assert_eq!(mount["action"], "SCMP_ACT_ERRNO");
        assert_eq!(mount["errnoRet"], 1);
        let clone = v["syscalls"].as_array().unwrap().iter().find(|s| s["names"][0] == "clone").unwrap();
        assert_eq!(clone["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
    }

    #[test]
    fn seccomp_choices_parse() {
        assert_eq!(Seccomp::parse("unconfined").unwrap().profile(), None);
        assert_eq!(Seccomp::parse("default").unwrap().profile(), Some(default_profile()));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.json");
        std::fs::write(
            &f,
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{"names":["read"],"action":"SCMP_ACT_ALLOW"}]}"#,
        )
        .unwrap();
        let p = Seccomp::parse(f.to_str().unwrap()).unwrap().profile().unwrap();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActErrno);
        let e = Seccomp::parse(dir.path().join("missing.json").to_str().unwrap()).unwrap_err();
        assert!(e.contains("cannot read"), "{e}");
        std::fs::write(&f, r#"{"defaultAction":"SCMP_ACT_NOPE"}"#).unwrap();
        let e = Seccomp::parse(f.to_str().unwrap()).unwrap_err();
        assert!(e.contains("not an OCI LinuxSeccomp"), "{e}");
    }
}
