//! The benchmarks and the demo of `ums` (`make bench`, `make bench-compare`,
//! `make demo`), on the end-to-end support of `ums-e2e`. A crate of their own,
//! so that `make test` does not build them or their plotting.
//!
//! - [`plot`]: the benchmarks' PNG figures (plotters, text drawn with ab_glyph).

pub mod plot;
