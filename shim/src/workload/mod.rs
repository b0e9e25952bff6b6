//! One nested container: its OCI bundle and runtime spec, start and restore
//! (`nested`), and checkpoint/restore with CRIU through the runtime.

pub mod bundle;
pub mod cgroup;
pub mod checkpoint;
pub mod nested;
pub mod seccomp;
pub mod spec;
