//! The example programs end to end: the trainer (and its accuracy targets), quantize_torchscript
//! and custom_net.
//!
//! One test binary per subject (each links libtorch once); each module is one file of tests.

#[path = "../common/mod.rs"]
mod common;

mod accuracy;
mod custom_net;
mod trainer_cli;
