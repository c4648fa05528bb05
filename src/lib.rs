// The crate's front page is the README: set-up, the Python-to-Rust table with where gradients
// differ, the trainer, TorchScript, approximate multipliers, speed and semantics.
#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod approx;
pub mod args;
pub mod checkpoint;
pub mod data;
mod error;
pub mod files;
mod glue;
pub mod import;
pub mod layers;
pub mod models;
pub mod quantizers;
pub mod torchscript;

pub use error::{strip_backtrace, torch_message, Error, Result};
