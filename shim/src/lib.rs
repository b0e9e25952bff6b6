//! ums: the PID 1 of an outer container. It runs a user's OCI image as a nested
//! container under runc/crun, supervises it, checkpoints and restores it with
//! CRIU, and live-migrates it to a peer outer container.

pub mod bundle;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod control;
pub mod exec;
pub mod keys;
pub mod migration;
pub mod nested;
pub mod oci_layout;
pub mod proxy;
pub mod reaper;
pub mod runtime;
pub mod spec;
pub mod state;
pub mod supervisor;
pub mod sys;
pub mod upper_diff;
