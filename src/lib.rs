// The crate's front page is the README (what it is, the two commands, an example, the module
// map); each module's guide is a docs/ page included as its documentation.
#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod approx;
pub mod args;
pub mod checkpoint;
pub mod cuda;
pub mod data;
pub mod distributed;
mod error;
pub mod files;
mod glue;
pub mod import;
pub mod layers;
pub mod models;
pub mod quantizers;
pub mod torchscript;
pub mod weights;

pub use error::{strip_backtrace, torch_message, Error, Mismatch, MnistProblem, Result};
