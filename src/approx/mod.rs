//! Approximate multipliers, as TorchApprox simulates them: 8-bit products read from a 256×256
//! table inside Linear and Conv2d layers ([`InferenceMode::Approximate`](crate::layers::InferenceMode)).

mod lut;
mod multiplier;

pub use lut::*;
pub use multiplier::*;
