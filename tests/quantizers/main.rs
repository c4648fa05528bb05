//! Quantizers against PyTorch's golden values, finite differences and invariants; LSQ; bad arguments.
//!
//! One test binary per subject (each links libtorch once); each module is one file of tests.

#[path = "../common/mod.rs"]
mod common;

mod bad_input;
mod golden;
mod gradients;
mod invariants;
mod lsq;
