//! TorchScript models from PyTorch: loading and running ([`ScriptModel`]), post-training
//! weight quantization, fine-tuning, layers rewritten inside the model, and calibration.
//!
//! Each file has one job: `model` loads, runs, saves and exports; `ptq` quantizes weights in
//! place; `finetune` trains the module itself; `rewrite` plans and generates the quantized
//! layers' TorchScript; `calibrate` sets their alphas from data; `archive` checks a file
//! before libtorch reads it.
//!
//! The guide below is `docs/torchscript.md`, kept as this module's documentation so that its
//! examples run as doctests.
#![doc = include_str!("../../docs/torchscript.md")]

use std::path::PathBuf;

use tch::{CModule, Device};

use crate::Error;

mod approx;
mod archive;
mod calibrate;
mod finetune;
mod model;
mod ptq;
mod rewrite;

pub use calibrate::LayerAlphas;
pub use finetune::FinetuneConfig;
pub use ptq::{LayerReport, PtqConfig, QuantizableWeight};
pub use rewrite::{
    ConvPadding, InputPad, LayerOp, PadMode, RewriteConfig, RewriteReport, RewrittenLayer, TracedAttention,
};

/// A TorchScript module (from `torch.jit.script` or `torch.jit.trace`) loaded with libtorch.
///
/// ```no_run
/// use tch::Device;
/// use torchapprox::torchscript::{PtqConfig, ScriptModel};
///
/// let model = ScriptModel::load("model.pt", Device::Cpu)?;
/// let report = model.quantize_weights(&PtqConfig { bits: 4, per_channel: true, ..Default::default() })?;
/// for layer in &report {
///     println!("{}: SQNR {:.1} dB", layer.name, layer.sqnr_db);
/// }
/// model.save("model-w4.pt")?; // torch.jit.load reads it
/// # Ok::<(), torchapprox::Error>(())
/// ```
#[derive(Debug)]
pub struct ScriptModel {
    module: CModule,
    source: PathBuf,
    device: Device,
    rewritten: Vec<RewrittenLayer>,
    /// Rewritten layers in approximate mode, with their multipliers.
    multipliers: Vec<(String, crate::approx::Multiplier)>,
    /// Where fine-tuning runs data-parallel: the process group and its settings.
    parallel: Option<crate::distributed::DataParallel>,
}

fn ts_error(msg: String) -> Error {
    Error::TorchScript(msg)
}
