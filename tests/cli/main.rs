//! The example programs end to end: the trainer (and its accuracy targets), quantize_torchscript,
//! custom_net and explore.
//!
//! One test binary per subject (each links libtorch once); each module is one file of tests.

#[path = "../common/mod.rs"]
mod common;

mod accuracy;
mod custom_net;
mod explore;
mod trainer_cli;
