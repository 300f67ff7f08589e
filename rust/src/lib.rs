//! hiddenpool: fused layer reduction and masked pooling of transformer hidden states.
//!
//! `kernels` is the pure Rust core; `bindings` exposes it to Python as `hiddenpool._native`.

pub mod kernels;

mod bindings;
