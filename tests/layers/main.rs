//! Approx layers and networks: layer goldens, per-layer settings, training, approximate multipliers.
//!
//! One test binary per subject (each links libtorch once); each module is one file of tests.

#[path = "../common/mod.rs"]
mod common;

mod approx;
mod device;
mod layers;
mod per_layer;
mod training;
