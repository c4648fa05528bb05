//! [`SequentialBuilder`]: an [`ApproxSequential`] built step by step, with PyTorch's names.

use std::borrow::Borrow;

use tch::{nn, Tensor};

use super::sequential::{Func, Item};
use super::{join, ApproxConv2d, ApproxConvConfig, ApproxLinear, ApproxLinearConfig, ApproxSequential};
use crate::{Error, Result};

/// Starts an [`ApproxSequential`] whose variables live under `path`.
///
/// Each step records the first error (a bad layer configuration, a repeated name) and
/// [`SequentialBuilder::build`] returns it, so a network is one chain. Layers made before
/// the error keep their variables in the store: build again in a fresh one.
///
/// ```
/// use tch::{nn, nn::ModuleT, Device, Kind, Tensor};
/// use torchapprox::layers::{approx_sequential, ApproxConvConfig, ApproxModule, InferenceMode};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let conv = |padding| ApproxConvConfig { padding, bias: false, ..Default::default() };
/// let net = approx_sequential(vs.root())
///     .conv2d("conv1", 1, 8, 3, conv(1))
///     .batch_norm2d("bn1", 8)
///     .relu()
///     .residual("block", |b| b.conv2d("conv", 8, 8, 3, conv(1)).batch_norm2d("bn", 8))
///     .relu()
///     .max_pool2d(2)
///     .flatten()
///     .linear("fc", 8 * 14 * 14, 10, Default::default())
///     .build()?;
/// let names: Vec<String> = net.approx_layers().into_iter().map(|(n, _)| n).collect();
/// assert_eq!(names, ["conv1", "block.conv", "fc"]);
/// assert!(vs.variables().contains_key("block.bn.running_var"));
///
/// net.set_mode(InferenceMode::Quantized);
/// let y = net.f_forward_t(&Tensor::rand([2, 1, 28, 28], (Kind::Float, Device::Cpu)), false)?;
/// assert_eq!(y.size(), [2, 10]);
/// # Ok::<(), torchapprox::Error>(())
/// ```
pub fn approx_sequential<'a, P: Borrow<nn::Path<'a>>>(path: P) -> SequentialBuilder<'a> {
    let path = path.borrow().clone();
    let prefix = path.components().collect::<Vec<_>>().join(".");
    SequentialBuilder { path, seq: ApproxSequential { prefix, items: Vec::new() }, error: None }
}

/// Builds an [`ApproxSequential`] step by step; see [`approx_sequential`].
#[derive(Debug)]
pub struct SequentialBuilder<'a> {
    path: nn::Path<'a>,
    seq: ApproxSequential,
    error: Option<Error>,
}

impl<'a> SequentialBuilder<'a> {
    /// Adds a named item made by `make` from the item's path, unless an earlier step failed.
    fn named(mut self, name: &str, make: impl FnOnce(nn::Path<'a>) -> Result<Item>) -> Self {
        if self.error.is_some() {
            return self;
        }
        let bad = |what, problem| Error::BadName { what, name: name.to_string(), problem };
        let item = if name.is_empty() || name.contains('.') {
            Err(bad("layer name", "must be non-empty and hold no '.'"))
        } else if self.seq.items.iter().any(|(n, _)| n == name) {
            Err(bad("", "the name is used twice in one sequence: give each layer its own"))
        } else {
            make(self.path.sub(name))
        };
        match item {
            Ok(item) => self.seq.items.push((name.to_string(), item)),
            Err(e @ Error::In { .. }) => self.error = Some(e),
            Err(e) => self.error = Some(Error::In { name: join(&self.seq.prefix, name), error: Box::new(e) }),
        }
        self
    }

    /// Adds an [`ApproxLinear`] named `name` (variables `name.weight`, `name.bias`, ...).
    pub fn linear(self, name: &str, in_features: i64, out_features: i64, config: ApproxLinearConfig) -> Self {
        self.named(name, |p| Ok(Item::Linear(ApproxLinear::f_new(p, in_features, out_features, config)?)))
    }

    /// Adds an [`ApproxConv2d`] with a square kernel.
    pub fn conv2d(
        self,
        name: &str,
        in_channels: i64,
        out_channels: i64,
        kernel_size: i64,
        config: ApproxConvConfig,
    ) -> Self {
        self.named(name, |p| {
            Ok(Item::Conv(ApproxConv2d::f_new(p, in_channels, out_channels, kernel_size, config)?))
        })
    }

    /// Adds a float BatchNorm over the channels of `[N, C, H, W]` inputs (PyTorch's
    /// `BatchNorm2d` defaults: eps 1e-5, momentum 0.1), with variables `weight`, `bias`,
    /// `running_mean` and `running_var`.
    pub fn batch_norm2d(self, name: &str, channels: i64) -> Self {
        self.batch_norm(name, 2, channels, Default::default())
    }

    /// Adds a float BatchNorm over the features of `[N, C]` or `[N, C, L]` inputs.
    pub fn batch_norm1d(self, name: &str, features: i64) -> Self {
        self.batch_norm(name, 1, features, Default::default())
    }

    /// Adds a BatchNorm over `nd` spatial dimensions (1 to 3) with tch's configuration.
    pub fn batch_norm(self, name: &str, nd: usize, channels: i64, config: nn::BatchNormConfig) -> Self {
        self.named(name, |p| {
            if !(1..=3).contains(&nd) || channels < 1 {
                return Err(Error::Argument {
                    what: "BatchNorm dimensions and channels",
                    value: if channels < 1 { channels as f64 } else { nd as f64 },
                    expected: "1 to 3 dimensions and at least 1 channel",
                });
            }
            let bn = match nd {
                1 => nn::batch_norm1d(p, channels, config),
                2 => nn::batch_norm2d(p, channels, config),
                _ => nn::batch_norm3d(p, channels, config),
            };
            Ok(Item::BatchNorm(bn, config))
        })
    }

    /// Adds a nested sequence named `name`, whose layers are named `name.child`.
    pub fn seq(self, name: &str, build: impl FnOnce(SequentialBuilder<'a>) -> SequentialBuilder<'a>) -> Self {
        self.named(name, |p| Ok(Item::Seq(build(approx_sequential(p)).build()?)))
    }

    /// Adds a residual block `x + body(x)`; the body's layers are named `name.child`.
    /// Shapes must agree exactly (no broadcasting).
    pub fn residual(
        self,
        name: &str,
        body: impl FnOnce(SequentialBuilder<'a>) -> SequentialBuilder<'a>,
    ) -> Self {
        self.named(name, |p| Ok(Item::Residual { body: body(approx_sequential(p)).build()?, shortcut: None }))
    }

    /// Adds a residual block `shortcut(x) + body(x)`, as ResNet's downsampling blocks:
    /// the body's layers are `name.child`, the shortcut's `name.shortcut_name.child`.
    pub fn residual_with(
        self,
        name: &str,
        body: impl FnOnce(SequentialBuilder<'a>) -> SequentialBuilder<'a>,
        shortcut_name: &str,
        shortcut: impl FnOnce(SequentialBuilder<'a>) -> SequentialBuilder<'a>,
    ) -> Self {
        self.named(name, |p| {
            if shortcut_name.is_empty() || shortcut_name.contains('.') {
                return Err(Error::BadName {
                    what: "shortcut name",
                    name: shortcut_name.to_string(),
                    problem: "must be non-empty and hold no '.'",
                });
            }
            let body = body(approx_sequential(&p)).build()?;
            if body.items.iter().any(|(n, _)| n == shortcut_name) {
                return Err(Error::BadName {
                    what: "shortcut name",
                    name: shortcut_name.to_string(),
                    problem: "is a layer of the body",
                });
            }
            let shortcut = shortcut(approx_sequential(p.sub(shortcut_name))).build()?;
            Ok(Item::Residual { body, shortcut: Some((shortcut_name.to_string(), shortcut)) })
        })
    }

    /// Adds a module of your own, made from its path (`name.*` variables), for example
    /// `|p| nn::linear(p, 10, 10, Default::default())`. tch's modules panic on bad input;
    /// the sequence catches that and returns an error naming the module (the panic hook
    /// still prints the panic, and nothing is caught under `panic = "abort"`).
    pub fn add<M: nn::ModuleT + 'static>(self, name: &str, make: impl FnOnce(nn::Path<'a>) -> M) -> Self {
        self.named(name, |p| Ok(Item::Module(Box::new(make(p)))))
    }

    /// Adds a function without variables; `train` says whether the network is training.
    pub fn add_fn(
        self,
        what: &'static str,
        f: impl Fn(&Tensor, bool) -> Result<Tensor> + Send + Sync + 'static,
    ) -> Self {
        self.unnamed(what, Box::new(f))
    }

    fn unnamed(mut self, what: &'static str, f: Func) -> Self {
        if self.error.is_none() {
            self.seq.items.push((String::new(), Item::Fn(what, f)));
        }
        self
    }

    /// Adds a ReLU.
    pub fn relu(self) -> Self {
        self.unnamed("relu", Box::new(|x, _| Ok(x.f_relu()?)))
    }

    /// Adds a max-pool with a square window `kernel` and stride `kernel`.
    pub fn max_pool2d(self, kernel: i64) -> Self {
        self.unnamed(
            "max_pool2d",
            Box::new(move |x, _| Ok(x.f_max_pool2d([kernel; 2], [kernel; 2], [0; 2], [1; 2], false)?)),
        )
    }

    /// Adds an average pool with a square window `kernel` and stride `kernel`.
    pub fn avg_pool2d(self, kernel: i64) -> Self {
        self.unnamed(
            "avg_pool2d",
            Box::new(move |x, _| Ok(x.f_avg_pool2d([kernel; 2], [kernel; 2], [0; 2], false, true, None)?)),
        )
    }

    /// Adds an adaptive average pool to `[size, size]` (1 is global average pooling).
    pub fn adaptive_avg_pool2d(self, size: i64) -> Self {
        self.unnamed("adaptive_avg_pool2d", Box::new(move |x, _| Ok(x.f_adaptive_avg_pool2d([size; 2])?)))
    }

    /// Adds a flattening of all dimensions after the batch one.
    pub fn flatten(self) -> Self {
        self.unnamed("flatten", Box::new(|x, _| Ok(x.f_flatten(1, -1)?)))
    }

    /// Adds dropout with probability `p`, active in training only.
    pub fn dropout(mut self, p: f64) -> Self {
        if !(0.0..1.0).contains(&p) && self.error.is_none() {
            self.error =
                Some(Error::Argument { what: "dropout probability", value: p, expected: "in [0, 1)" });
        }
        self.unnamed("dropout", Box::new(move |x, train| Ok(x.f_dropout(p, train)?)))
    }

    /// The sequence, or the first error of its steps.
    pub fn build(self) -> Result<ApproxSequential> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.seq),
        }
    }
}
