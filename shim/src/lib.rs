//! ums: the PID 1 of an outer container. It runs a user's OCI image as a nested
//! container under runc/crun, supervises it, checkpoints and restores it with
//! CRIU, and live-migrates it to a peer outer container.

pub mod cli;
pub mod config;
pub mod image;
pub mod metrics;
pub mod migration;
pub mod net;
pub mod process;
pub mod supervisor;
pub mod sys;
pub mod workload;
