//! TorchApprox's quantizers for Rust programs built on [tch](https://docs.rs/tch) (libtorch).
//!
//! [`quantizers`] mirrors the Python package `torchapprox.quantizers`:
//! [`MinMaxQuant`](quantizers::MinMaxQuant) scales by the tensor's own
//! absolute maximum, [`PACTQuant`](quantizers::PACTQuant) by a learnable
//! clipping level `alpha`, and both share the
//! [`ApproxQuantizer`](quantizers::ApproxQuantizer) trait. Each is a
//! `tch::nn::Module` whose `forward` is fake quantization (quantize, then
//! divide by the scale) with straight-through gradients, so it drops into
//! `nn::seq()` and trains on CPU or CUDA.
//!
//! Around them: [`layers`] (`ApproxLinear`, `ApproxConv2d` with baseline,
//! quantized and noisy modes), [`models`] (the trainer's MLP and LeNet-5),
//! [`data`] (MNIST in IDX format), [`checkpoint`] (atomic, checked VarStore
//! files) and [`torchscript`] (post-training quantization, import and QAT of
//! models exported from PyTorch, and quantized layers rewritten into them).
//!
//! The quantizers' gradients are native autograd nodes, and the TorchScript
//! rewrite uses libtorch's JIT API: both through a small C++ glue (`src/glue`,
//! compiled by `build.rs` against the same libtorch), whose errors come back as
//! [`Error`]s.
//!
//! ```
//! use tch::{nn, nn::Module, Device, Kind, Tensor};
//! use torchapprox::quantizers::{ApproxQuantizer, MinMaxQuant, PACTQuant};
//!
//! let x = Tensor::from_slice(&[-1.0f32, -0.25, 0.1, 0.5, 3.0]);
//! let minmax = MinMaxQuant::new(8);
//! assert_eq!(Vec::<f32>::try_from(minmax.quantize(&x))?, [-42.0, -11.0, 4.0, 21.0, 127.0]);
//! assert_eq!(minmax.scale_factor(), (127.0f32 / 3.0) as f64);
//!
//! let vs = nn::VarStore::new(Device::Cpu);
//! let pact = PACTQuant::new(vs.root() / "act", 4); // alpha starts at 2.2
//! let y = pact.forward(&x); // fake-quantized: integers on a grid of 2.2 / 7
//! assert_eq!(y.size(), [5]);
//! # Ok::<(), tch::TchError>(())
//! ```

#![warn(missing_docs)]

pub mod approx;
pub mod checkpoint;
pub mod data;
mod error;
mod glue;
pub mod layers;
pub mod models;
pub mod quantizers;
pub mod torchscript;

pub use error::{strip_backtrace, torch_message, Error, Result};
