//! Approximate multipliers, as TorchApprox simulates them: 8-bit products read from a 256×256
//! table inside Linear and Conv2d layers ([`InferenceMode::Approximate`](crate::layers::InferenceMode)).
//!
//! The guide below is `docs/approx.md`, kept as this module's documentation so that its
//! examples run as doctests.
#![doc = include_str!("../../docs/approx.md")]

mod direct;
pub mod evoapprox;
mod lut;
mod multiplier;

pub use evoapprox::CatalogueEntry;
pub use lut::*;
pub use multiplier::*;
