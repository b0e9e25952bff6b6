//! ums: the PID 1 of an outer container. It runs a user's OCI image as a nested
//! container under runc/crun, supervises it, checkpoints and restores it with
//! CRIU, and live-migrates it to a peer outer container.

pub mod oci_layout;
pub mod upper_diff;
