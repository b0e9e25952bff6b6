//! The workload's network as clients see it: published ports, forwarded in
//! the kernel or proxied, held during a migration's freeze and forwarded to
//! the destination after it.

pub mod proxy;
pub mod relay;
