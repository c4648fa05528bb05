//! `Quantizer`: MinMax, PACT or LSQ behind one type, so a network can choose per layer.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

use tch::{nn, Tensor};

use super::{ApproxQuantizer, LSQQuant, MinMaxQuant, PACTQuant, QuantConfig, Quantized};
use crate::{Error, Result};

/// Which quantizer to build; parses from and prints as `minmax` / `pact` / `lsq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantizerKind {
    /// [`MinMaxQuant`].
    MinMax,
    /// [`PACTQuant`].
    Pact,
    /// [`LSQQuant`].
    Lsq,
}

impl fmt::Display for QuantizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::MinMax => "minmax",
            Self::Pact => "pact",
            Self::Lsq => "lsq",
        })
    }
}

impl FromStr for QuantizerKind {
    type Err = Error;

    /// Accepts `minmax`, `pact` and `lsq`, ignoring ASCII case.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "minmax" => Ok(Self::MinMax),
            "pact" => Ok(Self::Pact),
            "lsq" => Ok(Self::Lsq),
            _ => Err(Error::Unknown {
                what: "quantizer kind",
                name: s.to_string(),
                expected: "`minmax`, `pact` or `lsq`",
            }),
        }
    }
}

/// Either quantizer, implementing [`ApproxQuantizer`] and `nn::Module` by delegation.
///
/// ```
/// use tch::{nn, nn::Module, Device, Tensor};
/// use torchapprox::quantizers::{ApproxQuantizer, Quantizer, QuantizerKind};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let act = Quantizer::new("pact".parse()?, vs.root() / "x_quantizer", 8);
/// let wgt = Quantizer::new(QuantizerKind::MinMax, vs.root() / "w_quantizer", 4);
/// let x = Tensor::randn([2, 3], (tch::Kind::Float, Device::Cpu));
/// let (y, w) = (act.forward(&x), wgt.quantize(&x));
/// assert_eq!((y.size(), w.size()), (vec![2, 3], vec![2, 3]));
/// assert_eq!(vs.variables().len(), 1); // only PACT's alpha
/// # Ok::<(), torchapprox::Error>(())
/// ```
#[derive(Debug)]
pub enum Quantizer {
    /// A MinMax quantizer.
    MinMax(MinMaxQuant),
    /// A PACT quantizer.
    Pact(PACTQuant),
    /// An LSQ quantizer.
    Lsq(LSQQuant),
}

impl Quantizer {
    /// A quantizer of `kind` with `bitwidth` bits; PACT's `alpha` goes under `path`.
    pub fn f_new<'a, P: Borrow<nn::Path<'a>>>(kind: QuantizerKind, path: P, bitwidth: u32) -> Result<Self> {
        Self::from_config(kind, path, QuantConfig::with_bitwidth(bitwidth))
    }

    /// Like [`f_new`](Self::f_new), panicking on a bad bitwidth.
    pub fn new<'a, P: Borrow<nn::Path<'a>>>(kind: QuantizerKind, path: P, bitwidth: u32) -> Self {
        Self::f_new(kind, path, bitwidth).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A quantizer of `kind` from a full configuration.
    pub fn from_config<'a, P: Borrow<nn::Path<'a>>>(
        kind: QuantizerKind,
        path: P,
        config: QuantConfig,
    ) -> Result<Self> {
        Ok(match kind {
            QuantizerKind::MinMax => Self::MinMax(MinMaxQuant::from_config(path, config)?),
            QuantizerKind::Pact => Self::Pact(PACTQuant::from_config(path, config)?),
            QuantizerKind::Lsq => Self::Lsq(LSQQuant::from_config(path, config)?),
        })
    }

    /// Which kind this is.
    pub fn kind(&self) -> QuantizerKind {
        match self {
            Self::MinMax(_) => QuantizerKind::MinMax,
            Self::Pact(_) => QuantizerKind::Pact,
            Self::Lsq(_) => QuantizerKind::Lsq,
        }
    }

    /// PACT's `alpha` variable, `None` for the others.
    pub fn alpha(&self) -> Option<&Tensor> {
        match self {
            Self::Pact(p) => Some(p.alpha()),
            _ => None,
        }
    }

    /// The variables the quantizer keeps in its VarStore (alpha, step size, running range).
    pub(crate) fn state_tensors(&self) -> Vec<&Tensor> {
        match self {
            Self::MinMax(m) => m.running_tensor().into_iter().collect(),
            Self::Pact(p) => vec![p.alpha()],
            Self::Lsq(q) => vec![q.step_size()],
        }
    }

    /// LSQ's `step_size` variable, `None` for the others.
    pub fn step_size(&self) -> Option<&Tensor> {
        match self {
            Self::Lsq(q) => Some(q.step_size()),
            _ => None,
        }
    }

    fn inner(&self) -> &dyn ApproxQuantizer {
        match self {
            Self::MinMax(q) => q,
            Self::Pact(q) => q,
            Self::Lsq(q) => q,
        }
    }
}

impl ApproxQuantizer for Quantizer {
    fn bitwidth(&self) -> u32 {
        self.inner().bitwidth()
    }

    fn scale_factor(&self) -> f64 {
        self.inner().scale_factor()
    }

    fn f_quantize_scaled(&self, x: &Tensor) -> Result<Quantized> {
        self.inner().f_quantize_scaled(x)
    }

    fn f_quantize_scaled_t(&self, x: &Tensor, train: bool) -> Result<Quantized> {
        self.inner().f_quantize_scaled_t(x, train)
    }

    fn f_fake_quantize(&self, x: &Tensor) -> Result<Tensor> {
        self.inner().f_fake_quantize(x)
    }

    fn f_fake_quantize_out(&self, x: &Tensor, out: &mut Tensor) -> Result<()> {
        self.inner().f_fake_quantize_out(x, out)
    }
}

impl nn::Module for Quantizer {
    /// Fake quantization with the chosen quantizer.
    ///
    /// # Shapes
    /// - `xs`: any shape; the output has the same shape.
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.f_fake_quantize(xs).unwrap_or_else(|e| panic!("{e}"))
    }
}
