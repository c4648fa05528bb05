//! [`ScriptModel`]: loading a TorchScript file, running it, saving it, and exporting its state.

use std::path::Path;

use tch::{nn, CModule, Device, IValue, Kind, Tensor};

use super::{archive, rewrite, ts_error, RewriteConfig, RewriteReport, RewrittenLayer, ScriptModel};
use crate::import::{ImportOptions, ImportReport};
use crate::{torch_message, Error, Result};

impl ScriptModel {
    /// Loads a TorchScript file onto `device`, in evaluation mode.
    pub fn load(path: impl AsRef<Path>, device: Device) -> Result<Self> {
        let path = path.as_ref();
        crate::files::check_input_file(path, None)?;
        // Read once: the bytes checked are the bytes loaded, whatever happens to the file meanwhile.
        let bytes = std::fs::read(path).map_err(|e| Error::InputFile {
            path: path.to_path_buf(),
            problem: crate::files::FileProblem::Io(e.to_string()),
        })?;
        archive::check(path, &bytes)?;
        let mut module = CModule::load_data_on_device(&mut &bytes[..], device)
            .map_err(|e| Error::NotTorchScript { path: path.to_path_buf(), why: torch_message(&e) })?;
        module.f_set_eval()?;
        Ok(Self {
            module,
            source: path.to_path_buf(),
            device,
            rewritten: Vec::new(),
            multipliers: Vec::new(),
            parallel: None,
        })
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

    /// Runs the module's `forward` on one tensor; a rejected input is an error naming its shape.
    /// A tuple or list whose first element is a tensor gives that tensor: torchvision's
    /// scripted Inception and GoogLeNet return `(logits, aux...)` in evaluation too.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let out = self.module.forward_is(&[IValue::Tensor(x.shallow_clone())]).map_err(|e| {
            Error::InputRejected { model: self.source.clone(), shape: x.size(), why: torch_message(&e) }
        })?;
        first_tensor(out).map_err(|returned| Error::NotTensorOutput { model: self.source.clone(), returned })
    }

    /// Runs `forward` and checks that the result is `[N, classes]` logits for the `N` inputs.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.forward(x)?;
        let n = x.size().first().copied().unwrap_or(0);
        if y.dim() != 2 || y.size()[0] != n || !y.is_floating_point() {
            return Err(Error::NotLogits { model: self.source.clone(), n, kind: y.kind(), shape: y.size() });
        }
        Ok(y)
    }

    /// Share of `images` whose arg-max logit equals `labels`, in batches, without gradients.
    pub fn accuracy(&self, images: &Tensor, labels: &Tensor, batch_size: i64) -> Result<f64> {
        let n = labels.size()[0];
        if n == 0 {
            return Err(Error::NoData { what: "no digits to measure accuracy on" });
        }
        let correct = crate::data::count_correct(images, labels, batch_size, |x| {
            self.logits(&x.f_to_device(self.device)?)
        })?;
        Ok(correct as f64 / n as f64)
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
        let portable = self.portable_copy()?;
        let module = portable.as_ref().unwrap_or(&self.module);
        crate::files::write_atomic(path, &[&self.source], |tmp| {
            module
                .save(tmp)
                .map_err(|e| ts_error(format!("{}: {}", crate::files::shown_path(path), torch_message(&e))))
        })
    }

    /// Every parameter and buffer with its name (BatchNorm's `running_mean`, `running_var`
    /// and `num_batches_tracked` included), as PyTorch's `state_dict()` lists them; the
    /// tensors share storage with the module.
    pub fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        let mut entries = self.parameters()?;
        entries.extend(crate::glue::jit::named_buffers(&self.module)?);
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
        crate::import::import_from(vs, self, options)
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
        // A fresh module: one that already ran would keep calling its old layers. The clone
        // has new classes and methods and shares the tensors (nothing is serialized; the
        // original is dropped below, or kept whole if the rewrite fails).
        let mut fresh = crate::glue::jit::module_clone(&self.module)?;
        fresh.f_set_eval()?;
        let params = fresh.named_parameters()?;
        let report = rewrite::rewrite(&fresh, &params, config)?;
        self.module = fresh;
        self.rewritten = report.layers.clone();
        self.multipliers.clear();
        Ok(report)
    }

    /// Puts the module in training mode (`true`: BatchNorm uses and updates batch statistics,
    /// running MinMax ranges move) or evaluation mode (`false`, the state after loading), for
    /// a training loop of one's own.
    pub fn set_training(&mut self, training: bool) -> Result<()> {
        if training {
            self.module.f_set_train()?;
        } else {
            self.module.f_set_eval()?;
        }
        Ok(())
    }

    /// For a rewritten model, a copy in the form saved files carry: forwards that plain PyTorch
    /// runs (the crate's operators replaced by gathers from each layer's `approx_table`), no
    /// cached weights. The copy is a clone sharing the tensors, as in `quantize_layers`.
    fn portable_copy(&self) -> Result<Option<CModule>> {
        if self.rewritten.is_empty() {
            return Ok(None);
        }
        let copy = crate::glue::jit::module_clone(&self.module)?;
        self.set_portable_tables(&copy)?;
        rewrite::reset_weight_caches(&copy, &self.rewritten)?;
        rewrite::replace_forwards(&copy, &self.rewritten, true)?;
        Ok(Some(copy))
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
}

/// The tensor a forward's output stands for: itself, or the first element of a tuple or list
/// (the logits of a model with auxiliary outputs); otherwise what was returned, in words.
fn first_tensor(out: IValue) -> std::result::Result<Tensor, String> {
    match out {
        IValue::Tensor(t) => Ok(t),
        IValue::TensorList(ts) => ts.into_iter().next().ok_or_else(|| "an empty list".to_string()),
        IValue::Tuple(items) | IValue::GenericList(items) => match items.into_iter().next() {
            Some(IValue::Tensor(t)) => Ok(t),
            Some(other) => Err(format!("a tuple or list whose first element is {}", ivalue_kind(&other))),
            None => Err("an empty tuple or list".into()),
        },
        other => Err(ivalue_kind(&other).into()),
    }
}

/// What kind of value `v` is, in words.
fn ivalue_kind(v: &IValue) -> &'static str {
    match v {
        IValue::None => "None",
        IValue::Tensor(_) => "a tensor",
        IValue::Double(_) => "a float",
        IValue::Int(_) => "an int",
        IValue::Bool(_) => "a bool",
        IValue::Tuple(_) => "a tuple",
        IValue::String(_) => "a string",
        IValue::GenericDict(_) => "a dict",
        IValue::Object(_) => "an object",
        IValue::Device(_) => "a device",
        IValue::IntList(_)
        | IValue::DoubleList(_)
        | IValue::BoolList(_)
        | IValue::StringList(_)
        | IValue::TensorList(_)
        | IValue::GenericList(_) => "a list",
        // IValue is non-exhaustive: variants of later tch versions.
        _ => "a value of another kind",
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use tch::{Device, IValue, Kind, Tensor};

    use super::{first_tensor, ScriptModel};
    use crate::torchscript::RewriteConfig;

    #[test]
    fn an_output_stands_for_its_first_tensor_or_says_what_it_is() {
        let t = || Tensor::from_slice(&[1.0f32, 2.0]);
        assert_eq!(first_tensor(IValue::Tensor(t())).unwrap(), t());
        let tuple = IValue::Tuple(vec![IValue::Tensor(t()), IValue::None]);
        assert_eq!(first_tensor(tuple).unwrap(), t());
        assert_eq!(first_tensor(IValue::TensorList(vec![t(), t() * 2])).unwrap(), t());
        assert_eq!(first_tensor(IValue::GenericList(vec![IValue::Tensor(t())])).unwrap(), t());
        let no = |v| first_tensor(v).unwrap_err();
        assert_eq!(no(IValue::None), "None");
        assert_eq!(no(IValue::Int(3)), "an int");
        assert_eq!(no(IValue::Tuple(vec![])), "an empty tuple or list");
        assert_eq!(no(IValue::TensorList(vec![])), "an empty list");
        assert_eq!(
            no(IValue::Tuple(vec![IValue::None, IValue::Tensor(t())])),
            "a tuple or list whose first element is None"
        );
        assert_eq!(no(IValue::GenericDict(vec![])), "a dict");
    }

    /// The fixture ResNet of the rewrite tests, rewritten with the defaults, in training mode.
    fn rewritten() -> ScriptModel {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rewrite/resnet_scripted.pt");
        let mut m = ScriptModel::load(path, Device::Cpu).unwrap();
        m.quantize_layers(&RewriteConfig::default()).unwrap();
        m.set_training(true).unwrap();
        m
    }

    /// Every parameter's gradient, by name (zeros where none), then cleared.
    fn take_grads(m: &ScriptModel) -> Vec<(String, Tensor)> {
        m.parameters()
            .unwrap()
            .into_iter()
            .map(|(n, p)| {
                let mut g = p.grad();
                let out = if g.defined() { g.copy() } else { p.zeros_like() };
                if g.defined() {
                    let _ = g.zero_();
                }
                (n, out)
            })
            .collect()
    }

    // Issue 20: a training step writes a layer's quantized weights into the layer's kept buffer
    // (no weight-sized allocation per step), but never while a graph still holds it.
    #[test]
    fn training_reuses_the_weight_buffer_only_when_no_graph_holds_it() {
        tch::manual_seed(0);
        let x = Tensor::randn([4, 1, 28, 28], (Kind::Float, Device::Cpu));
        let m = rewritten();
        let buffer = |m: &ScriptModel| {
            crate::glue::jit::get_tensor(&m.module, "fc", "w_cache").unwrap().data_ptr() as usize
        };
        let step = |m: &ScriptModel| m.forward(&x).unwrap().sum(Kind::Float).backward();
        step(&m);
        let first = buffer(&m);
        step(&m);
        let reused = buffer(&m);
        // Two forwards before a backward, the weights changed in between (as by an optimizer
        // step): the first graph keeps its own integers, the second gets a fresh buffer.
        let _ = take_grads(&m);
        let first_graph = m.forward(&x).unwrap();
        let held = buffer(&m);
        // (Only the rewritten layers' weights: autograd refuses a change to what a graph saved,
        // such as alphas and BatchNorm weights; a graph saves the integers, not the float weights.)
        let layers: Vec<String> = m.rewritten_layers().iter().map(|l| format!("{}.weight", l.name)).collect();
        tch::no_grad(|| {
            for (_, p) in m.parameters().unwrap().into_iter().filter(|(n, _)| layers.contains(n)) {
                let _ = p.shallow_clone().f_add_(&(p.randn_like() * 0.1)).unwrap();
            }
        });
        let second_graph = m.forward(&x).unwrap();
        let fresh = buffer(&m);
        first_graph.sum(Kind::Float).backward();
        let grads = take_grads(&m);
        drop(second_graph);
        // The reference: the same forward and backward in a model that ran nothing else.
        let reference = rewritten();
        reference.forward(&x).unwrap().sum(Kind::Float).backward();
        for ((name, ours), (_, theirs)) in grads.iter().zip(take_grads(&reference)) {
            let diff = (ours - &theirs).abs().max().double_value(&[]);
            assert!(diff == 0.0, "{name}: the first graph's gradient differs by {diff}");
        }
        assert_eq!(reused, first, "a step after a backward writes into the same buffer");
        assert_eq!(held, first, "and so does the first of two forwards");
        assert_ne!(fresh, held, "a forward while a graph holds the buffer writes elsewhere");
    }
}
