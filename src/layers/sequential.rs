//! `ApproxSequential`: a named sequence of Approx layers, BatchNorms, activations, pools and residual blocks.

use std::fmt;

use tch::{nn, Tensor};

use super::join;
use super::{ApproxConv2d, ApproxLayer, ApproxLinear, ApproxModule, QuantizerSlot};
use crate::quantizers::{QuantConfig, QuantizerKind};
use crate::{Error, Result};

pub(super) type Func = Box<dyn Fn(&Tensor, bool) -> Result<Tensor> + Send + Sync>;

pub(super) enum Item {
    Linear(ApproxLinear),
    Conv(ApproxConv2d),
    BatchNorm(nn::BatchNorm, nn::BatchNormConfig),
    Seq(ApproxSequential),
    Residual { body: ApproxSequential, shortcut: Option<(String, ApproxSequential)> },
    Module(Box<dyn nn::ModuleT>),
    Fn(&'static str, Func),
}

impl fmt::Debug for Item {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Linear(l) => l.fmt(f),
            Self::Conv(c) => c.fmt(f),
            Self::BatchNorm(b, _) => b.fmt(f),
            Self::Seq(s) => s.fmt(f),
            Self::Residual { body, shortcut } => {
                f.debug_struct("Residual").field("body", body).field("shortcut", shortcut).finish()
            }
            Self::Module(m) => m.fmt(f),
            Self::Fn(name, _) => f.write_str(name),
        }
    }
}

/// A sequence of layers with PyTorch-style names that finds its own Approx layers
/// ([`ApproxModule`]), so a network of your own needs no hand-written layer list.
///
/// Build one with [`approx_sequential`](super::approx_sequential). Nested sequences and residual blocks name their
/// layers `layer1.0.conv1` as PyTorch does, so state dicts map across
/// ([`import`](crate::import)).
#[derive(Debug)]
pub struct ApproxSequential {
    /// The dotted path the sequence was built at (`""` for a VarStore's root).
    pub(super) prefix: String,
    pub(super) items: Vec<(String, Item)>,
}

enum LayerMut<'s> {
    Linear(&'s mut ApproxLinear),
    Conv(&'s mut ApproxConv2d),
}

impl ApproxSequential {
    /// The forward pass, returning errors (naming the layer) instead of panicking.
    ///
    /// # Shapes
    /// - `xs`: what the first layer takes, e.g. `[N, C, H, W]` for a convolution
    /// - output: what the last layer gives
    pub fn f_forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        crate::quantizers::check_defined(xs, "network input")?;
        self.forward_at(xs, train, "")
    }

    fn forward_at(&self, xs: &Tensor, train: bool, prefix: &str) -> Result<Tensor> {
        let mut x = xs.shallow_clone();
        for (i, (name, item)) in self.items.iter().enumerate() {
            let here = || match item {
                Item::Fn(what, _) => join(prefix, &format!("[{i}] {what}")),
                _ => join(prefix, name),
            };
            let at = |e: Error| match e {
                e @ Error::In { .. } => e,
                e => Error::In { name: here(), error: Box::new(e) },
            };
            x = match item {
                Item::Linear(l) => l.f_forward_t(&x, train),
                Item::Conv(c) => c.f_forward_t(&x, train),
                Item::BatchNorm(bn, config) => batch_norm(bn, config, &x, train),
                Item::Seq(s) => s.forward_at(&x, train, &here()),
                Item::Residual { body, shortcut } => {
                    let y = body.forward_at(&x, train, &here())?;
                    let s = match shortcut {
                        Some((n, s)) => s.forward_at(&x, train, &join(&here(), n))?,
                        None => x.shallow_clone(),
                    };
                    if y.size() != s.size() {
                        Err(Error::Shape {
                            what: "residual block's body output".into(),
                            expected: format!("the shortcut's shape {:?}", s.size()),
                            actual: y.size(),
                        })
                    } else {
                        Ok(y.f_add(&s)?)
                    }
                }
                // tch's modules panic on bad input (their forward has no Result).
                Item::Module(m) => {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.forward_t(&x, train))).map_err(
                        |p| {
                            let msg = crate::error::panic_message(&*p).unwrap_or_default();
                            Error::ModulePanicked(crate::strip_backtrace(&msg))
                        },
                    )
                }
                Item::Fn(_, f) => f(&x, train),
            }
            .map_err(at)?;
        }
        Ok(x)
    }

    fn layers_at<'s>(&'s self, prefix: &str, out: &mut Vec<(String, &'s dyn ApproxLayer)>) {
        for (name, item) in &self.items {
            let here = join(prefix, name);
            match item {
                Item::Linear(l) => out.push((here, l)),
                Item::Conv(c) => out.push((here, c)),
                Item::Seq(s) => s.layers_at(&here, out),
                Item::Residual { body, shortcut } => {
                    body.layers_at(&here, out);
                    if let Some((n, s)) = shortcut {
                        s.layers_at(&join(&here, n), out);
                    }
                }
                _ => {}
            }
        }
    }

    /// Replaces one quantizer of the Approx layer `layer` (a name from
    /// [`approx_layers`](ApproxModule::approx_layers)), removing the old quantizer's
    /// variables from `vs`, so the new ones take the same clean names
    /// (`layer.x_quantizer.alpha`) in the same optimizer group. `vs` is the store the
    /// network was built in. Build optimizers after this call.
    pub fn f_replace_quantizer(
        &mut self,
        vs: &nn::VarStore,
        layer: &str,
        slot: QuantizerSlot,
        kind: QuantizerKind,
        config: QuantConfig,
    ) -> Result<()> {
        let mut layers = Vec::new();
        let prefix = self.prefix.clone();
        self.layers_mut(&prefix, &mut layers);
        let full = join(&prefix, layer);
        match layers.into_iter().find(|(n, _)| *n == full) {
            Some((_, LayerMut::Linear(l))) => {
                l.quant.f_replace_quantizer(vs, &full, slot, kind, config, &l.weight)
            }
            Some((_, LayerMut::Conv(c))) => {
                c.quant.f_replace_quantizer(vs, &full, slot, kind, config, &c.weight)
            }
            None => Err(Error::NoSuchLayer(layer.to_string())),
        }
    }

    fn layers_mut<'s>(&'s mut self, prefix: &str, out: &mut Vec<(String, LayerMut<'s>)>) {
        for (name, item) in &mut self.items {
            let here = join(prefix, name);
            match item {
                Item::Linear(l) => out.push((here, LayerMut::Linear(l))),
                Item::Conv(c) => out.push((here, LayerMut::Conv(c))),
                Item::Seq(s) => s.layers_mut(&here, out),
                Item::Residual { body, shortcut } => {
                    body.layers_mut(&here, out);
                    if let Some((n, s)) = shortcut {
                        s.layers_mut(&join(&here, n), out);
                    }
                }
                _ => {}
            }
        }
    }
}

/// BatchNorm through libtorch's fallible call, after checking the input's rank and
/// channels (tch's `forward_t` panics on a mismatch).
fn batch_norm(bn: &nn::BatchNorm, config: &nn::BatchNormConfig, x: &Tensor, train: bool) -> Result<Tensor> {
    let channels = bn.running_mean.size()[0];
    let size = x.size();
    let ranks = if bn.nd == 1 { vec![2, 3] } else { vec![bn.nd + 2] };
    if !ranks.contains(&size.len()) || size[1] != channels {
        return Err(Error::Shape {
            what: "BatchNorm input".into(),
            expected: format!(
                "[N, {channels}, ...] with {} dimensions",
                ranks.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(" or ")
            ),
            actual: size,
        });
    }
    Ok(x.f_batch_norm(
        bn.ws.as_ref(),
        bn.bs.as_ref(),
        Some(&bn.running_mean),
        Some(&bn.running_var),
        train,
        config.momentum,
        config.eps,
        config.cudnn_enabled,
    )?)
}

impl nn::ModuleT for ApproxSequential {
    /// Applies the items in order; `train` reaches BatchNorm, dropout and the quantizers.
    ///
    /// # Shapes
    /// - `xs`: what the first layer takes
    /// - output: what the last layer gives
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.f_forward_t(xs, train).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl ApproxSequential {
    /// [`ApproxModule::calibrate`] with the sequence's own forward pass: sets every layer's
    /// activation range from `batches` (in float, no gradient) and returns the ranges by layer.
    ///
    /// ```
    /// use tch::{nn, Device, Kind, Tensor};
    /// use torchapprox::layers::{approx_sequential, Calibration};
    ///
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let net = approx_sequential(vs.root()).flatten().linear("fc", 4, 2, Default::default()).build()?;
    /// let x = Tensor::ones([3, 4], (Kind::Float, Device::Cpu)) * 3.0;
    /// assert_eq!(net.calibrate_on(&[x], Calibration::Max)?, [("fc".to_string(), 3.0)]);
    /// # Ok::<(), torchapprox::Error>(())
    /// ```
    pub fn calibrate_on(&self, batches: &[Tensor], method: super::Calibration) -> Result<Vec<(String, f64)>> {
        self.calibrate(batches, &|x| self.f_forward_t(x, false), method)
    }
}

impl ApproxModule for ApproxSequential {
    fn approx_layers(&self) -> Vec<(String, &dyn ApproxLayer)> {
        let mut out = Vec::new();
        self.layers_at("", &mut out);
        out
    }
}
