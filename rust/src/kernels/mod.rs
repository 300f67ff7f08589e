//! Pure Rust kernels: no Python types here, so the core can be tested and reused alone.

pub mod accumulator;
pub mod element;
pub mod eos;
pub mod error;
pub mod pool;
pub mod selection;
pub mod view;

pub use accumulator::Accumulator;
pub use element::{Element, MaskElement};
pub use eos::{first_token_positions, missing_rows, TokenId};
pub use error::KernelError;
pub use pool::{bytes_to_read, pool_layers, Combine, Execution, Pool, Pooled};
pub use selection::TokenSelection;
pub use view::{fits_inside, LayerView, TokenSlice};
