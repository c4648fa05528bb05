//! TorchScript models from PyTorch: weight quantization, the layer rewrite, and imports into the crate's networks.
//!
//! One test binary per subject (each links libtorch once); each module is one file of tests.

#[path = "../common/mod.rs"]
mod common;

mod import;
mod rewrite;
mod torchscript;
mod vision;
