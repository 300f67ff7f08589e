//! hiddenpool: fused layer reduction and masked pooling of transformer hidden states.
//!
//! `kernels` is the pure Rust core; `bindings` (cargo feature `python`) exposes it to Python as
//! `hiddenpool._native`.

pub mod kernels;

#[cfg(feature = "python")]
mod bindings;
