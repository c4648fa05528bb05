//! TorchScript models from PyTorch: post-training weight quantization, saving, import into Approx networks, weight-only QAT.

use std::path::{Path, PathBuf};

use tch::nn::{self, OptimizerConfig};
use tch::{CModule, Device, Kind, Tensor};

use crate::import::{ImportOptions, ImportReport};
use crate::quantizers::{check_bitwidth, ApproxQuantizer, MinMaxQuant, QuantConfig, QuantizerKind};
use crate::{torch_message, Error, Result};

mod archive;
mod rewrite;

pub use rewrite::{LayerOp, LayerQuantSpec, RewriteConfig, RewriteReport, RewrittenLayer};

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
}

/// A weight that post-training quantization replaces: a float parameter with two or more dimensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantizableWeight {
    /// The parameter's name, e.g. `conv1.weight`.
    pub name: String,
    /// Its shape.
    pub shape: Vec<i64>,
}

/// Settings of post-training weight quantization (MinMax).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PtqConfig {
    /// Bits of every weight, `2..=16` (0 means the default, 8).
    pub bits: u32,
    /// One scale per output channel instead of one per tensor.
    pub per_channel: bool,
    /// Per-layer bitwidths by parameter name (`fc1.weight`) or module name (`fc1`).
    pub overrides: Vec<(String, u32)>,
}

impl PtqConfig {
    fn bits_for(&self, name: &str) -> u32 {
        let module = name.rsplit_once('.').map_or(name, |(m, _)| m);
        let default = if self.bits == 0 { 8 } else { self.bits };
        self.overrides.iter().rev().find(|(n, _)| n == name || n == module).map_or(default, |(_, b)| *b)
    }
}

/// A rewritten layer's PACT alphas: `(layer, input alpha, weight alpha)`, `None` for MinMax.
pub type LayerAlphas = (String, Option<f64>, Option<f64>);

/// What quantization did to one weight.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerReport {
    /// The parameter's name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<i64>,
    /// The bitwidth used.
    pub bits: u32,
    /// Whether scales are per output channel.
    pub per_channel: bool,
    /// The scale factor(s): one, or one per output channel.
    pub scales: Vec<f64>,
    /// `max |w - q(w)|`.
    pub max_abs_error: f64,
    /// Signal-to-quantization-noise ratio, `10 log10(sum w^2 / sum (w - q(w))^2)`, in dB (infinite for an exact grid).
    /// A few outliers dominate both sums: read it with [`zeroed`](Self::zeroed).
    pub sqnr_db: f64,
    /// Share of the non-zero weights that quantize to 0, in `[0, 1]`: near 1, one outlier set
    /// the range and the layer is lost whatever the SQNR says (see [`collapsed`](Self::collapsed)).
    pub zeroed: f64,
}

impl LayerReport {
    /// Whether quantization lost the layer: more than half of its non-zero weights became 0.
    pub fn collapsed(&self) -> bool {
        self.zeroed > 0.5
    }
}

/// Share of the non-zero values of `w` that are 0 in `q`.
fn zeroed_share(w: &Tensor, q: &Tensor) -> Result<f64> {
    let nonzero = w.f_ne(0.0)?;
    let n = nonzero.f_sum(Kind::Int64)?.f_int64_value(&[])?;
    if n == 0 {
        return Ok(0.0);
    }
    let lost = nonzero.f_logical_and(&q.f_eq(0.0)?)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
    Ok(lost as f64 / n as f64)
}

/// Settings of [`ScriptModel::finetune_qat`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FinetuneConfig {
    /// Passes over the data.
    pub epochs: usize,
    /// Adam's learning rate.
    pub lr: f64,
    /// Samples per step.
    pub batch_size: i64,
    /// Seed of the shuffling.
    pub seed: i64,
}

impl FinetuneConfig {
    /// Checks the learning rate (finite, not negative) and the batch size (at least 1).
    pub fn check(&self) -> Result<()> {
        crate::args::check_learning_rate("fine-tuning learning rate", self.lr)?;
        if self.batch_size < 1 {
            return Err(Error::Argument {
                what: "fine-tuning batch size",
                value: self.batch_size as f64,
                expected: "at least 1",
            });
        }
        Ok(())
    }
}

fn diverged(epoch: usize, what: String) -> Error {
    ts_error(format!(
        "fine-tuning diverged in epoch {epoch} ({what}); the weights are restored and nothing is written: try a smaller learning rate"
    ))
}

/// `max |w - q|` and the SQNR in dB, in float64 and relative to `max |w|`, so that neither
/// squares nor sums overflow; infinite SQNR only for an exact grid.
fn error_stats(w: &Tensor, q: &Tensor) -> Result<(f64, f64)> {
    let w = w.f_to_kind(Kind::Double)?;
    let err = q.f_to_kind(Kind::Double)?.f_sub(&w)?;
    let max_abs_error = err.f_abs()?.f_max()?.f_double_value(&[])?;
    let peak = w.f_abs()?.f_max()?.f_double_value(&[])?;
    if max_abs_error == 0.0 {
        return Ok((0.0, f64::INFINITY));
    }
    let signal = w.f_div_scalar(peak)?.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
    let noise = err.f_div_scalar(peak)?.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
    let sqnr_db = if noise > 0.0 {
        10.0 * (signal / noise).log10()
    } else {
        10.0 * (signal / f64::MIN_POSITIVE).log10()
    };
    Ok((max_abs_error, sqnr_db))
}

/// Refuses weights holding NaN or ±inf: their quantization would be meaningless.
fn check_finite_weights(source: &Path, weights: &[(String, Tensor)]) -> Result<()> {
    for (name, w) in weights {
        let bad = w.f_isfinite()?.f_logical_not()?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
        if bad > 0 {
            return Err(ts_error(format!(
                "{}: weight {name} holds {bad} non-finite value(s) (NaN or ±inf) of {}",
                source.display(),
                w.numel()
            )));
        }
    }
    Ok(())
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self { epochs: 1, lr: 1e-4, batch_size: 64, seed: 0 }
    }
}

fn ts_error(msg: String) -> Error {
    Error::TorchScript(msg)
}

impl ScriptModel {
    /// Loads a TorchScript file onto `device`, in evaluation mode.
    pub fn load(path: impl AsRef<Path>, device: Device) -> Result<Self> {
        let path = path.as_ref();
        crate::files::check_input_file(path, None)?;
        // Read once: the bytes checked are the bytes loaded, whatever happens to the file meanwhile.
        let bytes =
            std::fs::read(path).map_err(|e| ts_error(format!("{}: {e}", crate::files::shown_path(path))))?;
        archive::check(path, &bytes)?;
        let mut module = CModule::load_data_on_device(&mut &bytes[..], device).map_err(|e| {
            ts_error(format!(
                "{}: not a TorchScript model ({})",
                crate::files::shown_path(path),
                torch_message(&e)
            ))
        })?;
        module.f_set_eval()?;
        Ok(Self { module, source: path.to_path_buf(), device, rewritten: Vec::new() })
    }

    /// The file this model was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The device its parameters live on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Every parameter with its name; the tensors share storage with the module.
    pub fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self.module.named_parameters()?)
    }

    fn quantizable(&self) -> Result<Vec<(String, Tensor)>> {
        let params = self.parameters()?;
        Ok(params.into_iter().filter(|(_, t)| t.dim() >= 2 && t.is_floating_point()).collect())
    }

    /// The weights post-training quantization replaces (Linear and Conv weights), in module order.
    pub fn quantizable_weights(&self) -> Result<Vec<QuantizableWeight>> {
        Ok(self
            .quantizable()?
            .into_iter()
            .map(|(name, t)| QuantizableWeight { name, shape: t.size() })
            .collect())
    }

    /// Runs the module's `forward` on one tensor; a rejected input is an error naming its shape.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.module.forward_ts(&[x]).map_err(|e| {
            ts_error(format!(
                "{}: the model rejected an input of shape {:?}: {}",
                self.source.display(),
                x.size(),
                torch_message(&e)
            ))
        })
    }

    /// Runs `forward` and checks that the result is `[N, classes]` logits for the `N` inputs.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward(x)?;
        let n = x.size().first().copied().unwrap_or(0);
        if y.dim() != 2 || y.size()[0] != n || !y.is_floating_point() {
            return Err(ts_error(format!(
                "{}: expected float logits of shape [{n}, classes] for {n} inputs, the model returned {:?} of shape {:?}",
                self.source.display(),
                y.kind(),
                y.size()
            )));
        }
        Ok(y)
    }

    /// Share of `images` whose arg-max logit equals `labels`, in batches, without gradients.
    pub fn accuracy(&self, images: &Tensor, labels: &Tensor, batch_size: i64) -> Result<f64> {
        let n = labels.size()[0];
        if n == 0 {
            return Err(ts_error("no digits to measure accuracy on".into()));
        }
        let correct = crate::data::count_correct(images, labels, batch_size, |x| {
            self.logits(&x.f_to_device(self.device)?)
        })?;
        Ok(correct as f64 / n as f64)
    }

    /// Replaces every quantizable weight by its MinMax fake-quantized value, in place;
    /// biases, BatchNorm parameters and buffers stay untouched.
    pub fn quantize_weights(&self, config: &PtqConfig) -> Result<Vec<LayerReport>> {
        let weights = self.quantizable()?;
        if weights.is_empty() {
            return Err(ts_error(format!(
                "{}: no quantizable weights (float parameters with two or more dimensions)",
                self.source.display()
            )));
        }
        self.check_overrides(config, &weights)?;
        let _guard = tch::no_grad_guard();
        let mut reports = Vec::with_capacity(weights.len());
        for (name, w) in weights {
            let bits = check_bitwidth(config.bits_for(&name))?;
            let q = MinMaxQuant::from_config(QuantConfig {
                per_channel: config.per_channel,
                ..QuantConfig::with_bitwidth(bits)
            })?;
            let fq = q.f_fake_quantize(&w)?;
            let (max_abs_error, sqnr_db) = error_stats(&w, &fq)?;
            let zeroed = zeroed_share(&w, &fq)?;
            w.shallow_clone().f_copy_(&fq)?;
            reports.push(LayerReport {
                name,
                shape: w.size(),
                bits,
                per_channel: config.per_channel && w.dim() >= 2,
                scales: q.scale_factors(),
                max_abs_error,
                sqnr_db,
                zeroed,
            });
        }
        Ok(reports)
    }

    fn check_overrides(&self, config: &PtqConfig, weights: &[(String, Tensor)]) -> Result<()> {
        check_finite_weights(&self.source, weights)?;
        // `fc1` and `fc1.weight` name the same weight: two overrides of one layer are ambiguous.
        let target = |n: &str| {
            weights.iter().position(|(w, _)| w == n || w.rsplit_once('.').is_some_and(|(m, _)| m == n))
        };
        for (i, (a, _)) in config.overrides.iter().enumerate() {
            if let Some(other) =
                config.overrides[..i].iter().find(|(b, _)| target(b).is_some() && target(b) == target(a))
            {
                return Err(ts_error(format!(
                    "layer override {a:?} repeats {:?}: give each layer once",
                    other.0
                )));
            }
        }
        let known =
            |n: &str| weights.iter().any(|(w, _)| w == n || w.rsplit_once('.').is_some_and(|(m, _)| m == n));
        let unknown: Vec<&str> =
            config.overrides.iter().map(|(n, _)| n.as_str()).filter(|n| !known(n)).collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = weights.iter().map(|(n, _)| n.as_str()).collect();
        Err(ts_error(format!(
            "unknown layer(s) {}: {} has quantizable weights {}",
            unknown.join(", "),
            self.source.display(),
            names.join(", ")
        )))
    }

    /// Saves the module as TorchScript (readable by `torch.jit.load`) through the crate's
    /// atomic writer. Refuses the file it was loaded from, special files, and parameters or
    /// buffers holding NaN or ±inf (writing nothing).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let origin = format!("refusing to write {}", crate::files::shown_path(path));
        for (name, t) in self.state_dict()? {
            crate::quantizers::check_state(&origin, &name, &t)?;
        }
        crate::files::write_atomic(path, &[&self.source], |tmp| {
            self.module
                .save(tmp)
                .map_err(|e| ts_error(format!("{}: {}", crate::files::shown_path(path), torch_message(&e))))
        })
    }

    /// Every parameter and buffer with its name (BatchNorm's `running_mean`, `running_var`
    /// and `num_batches_tracked` included), as PyTorch's `state_dict()` lists them; the
    /// tensors share storage with the module.
    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        let mut entries = self.parameters()?;
        entries.extend(rewrite::named_buffers(&self.module)?);
        Ok(entries)
    }

    /// Copies parameters and buffers into a network's `VarStore` by name (`fc1.weight`,
    /// `bn1.running_var`, ...), so a network of Approx layers starts from this model.
    /// Quantizer state (`x_quantizer.alpha`, ...) is copied where the model has it (after
    /// [`quantize_layers`](Self::quantize_layers)) and kept otherwise. Missing, mis-shaped
    /// or unused names are an error listing each; see [`import_into_with`](Self::import_into_with)
    /// for renames and partial imports.
    pub fn import_into(&self, vs: &nn::VarStore) -> Result<ImportReport> {
        self.import_into_with(vs, &ImportOptions::default())
    }

    /// [`import_into`](Self::import_into) with renames and, optionally, a partial import
    /// that copies what fits and reports the rest.
    pub fn import_into_with(&self, vs: &nn::VarStore, options: &ImportOptions) -> Result<ImportReport> {
        crate::import::import_tensors(vs, self.state_dict()?, &self.source.display().to_string(), options)
    }

    /// Weight-only quantization-aware fine-tuning of the module itself.
    ///
    /// The current weights become float shadows; each step runs the module with
    /// fake-quantized weights, sends the gradients straight through to the
    /// shadows (Adam on all parameters), then puts the shadows back. At the end
    /// the weights are quantized once more and the report returned. The module
    /// runs in training mode meanwhile (BatchNorm statistics update). If training
    /// diverges the parameters are restored and an error returned.
    pub fn finetune_qat(
        &mut self,
        quant: &PtqConfig,
        images: &Tensor,
        labels: &Tensor,
        config: FinetuneConfig,
    ) -> Result<Vec<LayerReport>> {
        let weights = self.quantizable()?;
        if weights.is_empty() {
            return Err(ts_error(format!("{}: no quantizable weights to fine-tune", self.source.display())));
        }
        self.check_overrides(quant, &weights)?;
        let mut shadows = Vec::new();
        for (name, w) in &weights {
            let bits = check_bitwidth(quant.bits_for(name))?;
            let q = MinMaxQuant::from_config(QuantConfig {
                per_channel: quant.per_channel,
                ..QuantConfig::with_bitwidth(bits)
            })?;
            shadows.push((w.shallow_clone(), w.detach().copy(), q));
        }
        self.train(images, labels, config, &shadows)?;
        self.quantize_weights(quant)
    }

    /// Quantization-aware fine-tuning of a model whose layers [`quantize_layers`](Self::quantize_layers)
    /// rewrote: Adam on every parameter (weights, biases, BatchNorm, PACT alphas) through the
    /// layers' own straight-through gradients. If training diverges the parameters are
    /// restored and an error returned.
    pub fn finetune(&mut self, images: &Tensor, labels: &Tensor, config: FinetuneConfig) -> Result<()> {
        if self.rewritten.is_empty() {
            return Err(ts_error(format!(
                "{}: no rewritten layers to fine-tune: call quantize_layers first (or finetune_qat for weights only)",
                self.source.display()
            )));
        }
        self.train(images, labels, config, &[])
    }

    /// The training loop of both fine-tunings. `shadows` holds, for weight-only QAT, each
    /// weight with its float shadow and quantizer.
    fn train(
        &mut self,
        images: &Tensor,
        labels: &Tensor,
        config: FinetuneConfig,
        shadows: &[(Tensor, Tensor, MinMaxQuant)],
    ) -> Result<()> {
        config.check()?;
        let n = labels.size().first().copied().unwrap_or(0);
        if n == 0 {
            return Err(ts_error("fine-tuning needs training digits, got none".into()));
        }
        if images.size().first() != Some(&n) {
            return Err(ts_error(format!("{} images but {n} labels", images.size().first().unwrap_or(&0))));
        }
        // Restored if training diverges, so a failed run leaves the model as it was.
        let snapshot: Vec<(Tensor, Tensor)> =
            self.parameters()?.into_iter().map(|(_, t)| (t.detach().copy(), t)).collect();
        let vs = nn::VarStore::new(self.device);
        for (name, t) in self.parameters()? {
            // VarStore names cannot hold dots.
            let _ = vs.root().add(&name.replace('.', "_"), t, true);
        }
        let copy_all = |pairs: &mut dyn Iterator<Item = (&Tensor, Tensor)>| -> Result<()> {
            tch::no_grad(|| -> Result<()> {
                for (dst, src) in pairs {
                    dst.shallow_clone().f_copy_(&src)?;
                }
                Ok(())
            })
        };
        let mut opt = nn::Adam::default().build(&vs, config.lr)?;
        self.module.f_set_train()?;
        tch::manual_seed(config.seed);
        let result = (|| -> Result<()> {
            for epoch in 1..=config.epochs {
                let order = Tensor::f_randperm(n, (Kind::Int64, Device::Cpu))?;
                for start in (0..n).step_by(config.batch_size.max(1) as usize) {
                    let idx = order.f_narrow(0, start, config.batch_size.min(n - start))?;
                    let x = images.f_index_select(0, &idx)?.f_to_device(self.device)?;
                    let y = labels.f_index_select(0, &idx)?.f_to_device(self.device)?;
                    let quantized: Vec<Tensor> =
                        shadows.iter().map(|(_, s, q)| q.f_fake_quantize(s)).collect::<Result<_>>()?;
                    copy_all(&mut shadows.iter().map(|(w, _, _)| w).zip(quantized))?;
                    let loss = self.logits(&x)?.f_cross_entropy_loss::<Tensor>(
                        &y,
                        None,
                        tch::Reduction::Mean,
                        -100,
                        0.0,
                    )?;
                    let value = loss.f_double_value(&[])?;
                    if !value.is_finite() {
                        return Err(diverged(epoch, format!("loss {value}")));
                    }
                    opt.zero_grad();
                    loss.f_backward()?;
                    // The straight-through step: the gradient of the quantized weights updates the shadows.
                    copy_all(&mut shadows.iter().map(|(w, s, _)| (w, s.shallow_clone())))?;
                    opt.step();
                    copy_all(&mut shadows.iter().map(|(w, s, _)| (s, w.shallow_clone())))?;
                }
                for (name, t) in self.parameters()? {
                    if t.f_isfinite()?.f_all()?.f_int64_value(&[])? == 0 {
                        return Err(diverged(epoch, format!("{name} holds non-finite values")));
                    }
                }
            }
            Ok(())
        })();
        opt.zero_grad();
        self.module.f_set_eval()?;
        if result.is_err() {
            copy_all(&mut snapshot.iter().map(|(saved, t)| (t, saved.shallow_clone())))?;
        }
        result
    }

    /// Turns every `Linear` and `Conv2d` of the model (nested anywhere, scripted or traced)
    /// into a quantized layer by rewriting its `forward` inside the TorchScript module: an
    /// input quantizer and a weight quantizer per layer, computed as the crate's
    /// `ApproxLinear` / `ApproxConv2d` in Quantized mode compute them. PACT alphas become
    /// parameters `<layer>.x_quantizer.alpha` (and `w_quantizer.alpha`); the saved file is
    /// plain TorchScript that `torch.jit.load` runs with nothing else installed.
    ///
    /// Layers the rewrite does not cover (Conv1d, transposed convolutions, functional
    /// `F.linear` calls) stay in float and are listed in the report. A model rewritten once
    /// is refused. The rewrite runs on a fresh copy of the module (libtorch freezes a
    /// module's calls into its optimized plan on its first run).
    ///
    /// ```no_run
    /// use tch::Device;
    /// use torchapprox::torchscript::{RewriteConfig, ScriptModel};
    ///
    /// let mut model = ScriptModel::load("resnet.pt", Device::Cpu)?;
    /// let report = model.quantize_layers(&RewriteConfig::default())?; // 8-bit PACT / MinMax
    /// println!("{} layers quantized, left in float: {:?}", report.layers.len(), report.left_in_float);
    /// model.save("resnet-q8.pt")?;
    /// # Ok::<(), torchapprox::Error>(())
    /// ```
    pub fn quantize_layers(&mut self, config: &RewriteConfig) -> Result<RewriteReport> {
        // A fresh module: one that already ran would keep calling its old layers. The copy
        // goes through memory, never through a file another thread or user could touch.
        let bytes = rewrite::module_bytes(&self.module)?;
        let mut fresh = CModule::load_data_on_device(&mut &bytes[..], self.device)
            .map_err(|e| ts_error(format!("{}: {}", self.source.display(), torch_message(&e))))?;
        fresh.f_set_eval()?;
        let params = fresh.named_parameters()?;
        let report = rewrite::rewrite(&fresh, &params, config)?;
        self.module = fresh;
        self.rewritten = report.layers.clone();
        Ok(report)
    }

    /// Casts every parameter and buffer to `kind` (e.g. `Kind::Double` for gradient checks).
    pub fn set_kind(&mut self, kind: Kind) -> Result<()> {
        if !matches!(kind, Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16) {
            return Err(Error::Dtype(kind));
        }
        self.module.to(self.device, kind, false);
        Ok(())
    }

    /// The layers [`quantize_layers`](Self::quantize_layers) rewrote (empty before).
    pub fn rewritten_layers(&self) -> &[RewrittenLayer] {
        &self.rewritten
    }

    /// Sets every PACT input alpha of the rewritten layers from data: runs the model in float
    /// on the first `batches` batches of `images` (no gradient), takes each layer's largest
    /// input magnitude, and makes it that layer's alpha. Returns the alphas by layer.
    pub fn calibrate(
        &mut self,
        images: &Tensor,
        batches: usize,
        batch_size: i64,
    ) -> Result<Vec<(String, f64)>> {
        let pact: Vec<RewrittenLayer> =
            self.rewritten.iter().filter(|l| l.spec.x_kind == QuantizerKind::Pact).cloned().collect();
        if pact.is_empty() {
            return Err(ts_error("no PACT input quantizers to calibrate: call quantize_layers first".into()));
        }
        if batch_size < 1 || batches == 0 {
            return Err(Error::Argument {
                what: "calibration batches",
                value: batches as f64,
                expected: "at least 1, of at least 1 sample",
            });
        }
        let n = images.size().first().copied().unwrap_or(0);
        if n == 0 {
            return Err(ts_error("calibration needs images, got none".into()));
        }
        let _guard = tch::no_grad_guard();
        for l in &pact {
            let _ = rewrite::get_tensor(&self.module, &format!("{}.x_quantizer", l.name), "observed")?
                .f_zero_()?;
        }
        rewrite::set_calibrating(&self.module, &pact, true)?;
        let run = (|| -> Result<()> {
            for b in 0..batches as i64 {
                let start = b * batch_size;
                if start >= n {
                    break;
                }
                let x = images.f_narrow(0, start, batch_size.min(n - start))?.f_to_device(self.device)?;
                let _ = self.forward(&x)?;
            }
            Ok(())
        })();
        rewrite::set_calibrating(&self.module, &pact, false)?;
        run?;
        let mut alphas = Vec::new();
        for l in &pact {
            let path = format!("{}.x_quantizer", l.name);
            let observed = rewrite::get_tensor(&self.module, &path, "observed")?.f_double_value(&[])?;
            let mut alpha = rewrite::get_tensor(&self.module, &path, "alpha")?;
            if observed > 0.0 && observed.is_finite() {
                let _ = alpha.f_fill_(observed)?;
            }
            alphas.push((l.name.clone(), alpha.f_double_value(&[0])?));
        }
        Ok(alphas)
    }

    /// The current PACT alphas of the rewritten layers: `(layer, x alpha, w alpha)`.
    pub fn alphas(&self) -> Result<Vec<LayerAlphas>> {
        let read = |l: &RewrittenLayer, q: &str, kind: QuantizerKind| -> Result<Option<f64>> {
            if kind != QuantizerKind::Pact {
                return Ok(None);
            }
            Ok(Some(
                rewrite::get_tensor(&self.module, &format!("{}.{q}", l.name), "alpha")?
                    .f_double_value(&[0])?,
            ))
        };
        self.rewritten
            .iter()
            .map(|l| {
                Ok((
                    l.name.clone(),
                    read(l, "x_quantizer", l.spec.x_kind)?,
                    read(l, "w_quantizer", l.spec.w_kind)?,
                ))
            })
            .collect()
    }
}
