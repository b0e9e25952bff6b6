//! The workload's image on disk: OCI image layouts (index, manifests, blobs,
//! unpacking layers with whiteouts) and the writable layer's diff that a
//! migration carries (packed at the source, applied at the destination).

pub mod oci_layout;
pub mod upper_diff;
