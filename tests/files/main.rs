//! Files in and out: MNIST data and checkpoints, hostile files and inputs, and seeded fuzzing.
//!
//! One test binary per subject (each links libtorch once); each module is one file of tests.

#[path = "../common/mod.rs"]
mod common;

mod data_and_checkpoints;
mod data_formats;
mod fuzz;
mod hostile;
