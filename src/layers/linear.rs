//! `ApproxLinear`: a fully connected layer with activation and weight quantizers.

use std::borrow::Borrow;

use tch::{nn, Tensor};

use super::{ApproxLayer, ApproxModule, LayerQuant, OpGeom, QuantSpec};
use crate::{Error, Result};

/// Settings of an [`ApproxLinear`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ApproxLinearConfig {
    /// Whether the layer has a bias; default `true`.
    pub bias: bool,
    /// Quantizers, bitwidth and mode; default [`QuantSpec::default`].
    pub quant: QuantSpec,
}

impl Default for ApproxLinearConfig {
    fn default() -> Self {
        Self { bias: true, quant: QuantSpec::default() }
    }
}

/// A linear layer `y = x W^T + b` that can run quantized, after TorchApprox's `ApproxLinear`.
///
/// Variables: `weight` `[out, in]`, `bias` `[out]`, and `x_quantizer.alpha` /
/// `w_quantizer.alpha` for PACT quantizers, as PyTorch names them.
#[derive(Debug)]
pub struct ApproxLinear {
    /// The float weight, `[out_features, in_features]`.
    pub weight: Tensor,
    /// The float bias, `[out_features]`.
    pub bias: Option<Tensor>,
    /// Quantizers and mode.
    pub quant: LayerQuant,
}

/// Creates an [`ApproxLinear`] with PyTorch's default initialisation.
///
/// ```
/// use tch::{nn, nn::ModuleT, Device, Kind, Tensor};
/// use torchapprox::layers::{approx_linear, ApproxLinearConfig, InferenceMode, QuantSpec};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let spec = QuantSpec { mode: InferenceMode::Quantized, bitwidth: 4, ..Default::default() };
/// let fc1 = approx_linear(vs.root() / "fc1", 784, 128, ApproxLinearConfig { quant: spec, ..Default::default() });
/// let y = fc1.forward_t(&Tensor::rand([2, 784], (Kind::Float, Device::Cpu)), true);
/// assert_eq!(y.size(), [2, 128]);
/// assert!(vs.variables().contains_key("fc1.x_quantizer.alpha"));
/// ```
pub fn approx_linear<'a, P: Borrow<nn::Path<'a>>>(
    path: P,
    in_features: i64,
    out_features: i64,
    config: ApproxLinearConfig,
) -> ApproxLinear {
    ApproxLinear::f_new(path, in_features, out_features, config).unwrap_or_else(|e| panic!("{e}"))
}

impl ApproxLinear {
    /// Like [`approx_linear`], returning an error for a bad configuration.
    pub fn f_new<'a, P: Borrow<nn::Path<'a>>>(
        path: P,
        in_features: i64,
        out_features: i64,
        config: ApproxLinearConfig,
    ) -> Result<Self> {
        let path = path.borrow();
        let quant = LayerQuant::f_new(path, config.quant)?;
        // PyTorch's default (kaiming_uniform with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        let bound = 1.0 / (in_features as f64).sqrt();
        let init = nn::Init::Uniform { lo: -bound, up: bound };
        let weight = path.f_var("weight", &[out_features, in_features], init)?;
        quant.init_weight_alpha(&weight)?;
        let bias = if config.bias { Some(path.f_var("bias", &[out_features], init)?) } else { None };
        Ok(Self { weight, bias, quant })
    }

    /// Copies an existing weight `[out, in]` and bias `[out]` into new variables under `path`
    /// (TorchApprox's `from_super`).
    pub fn from_tensors<'a, P: Borrow<nn::Path<'a>>>(
        path: P,
        weight: &Tensor,
        bias: Option<&Tensor>,
        spec: QuantSpec,
    ) -> Result<Self> {
        let path = path.borrow();
        if weight.dim() != 2 {
            return Err(Error::Shape {
                what: "ApproxLinear weight".into(),
                expected: "[out_features, in_features]".into(),
                actual: weight.size(),
            });
        }
        let out = weight.size()[0];
        if let Some(b) = bias {
            if b.size() != [out] {
                return Err(Error::Shape {
                    what: "ApproxLinear bias".into(),
                    expected: format!("[{out}]"),
                    actual: b.size(),
                });
            }
        }
        let quant = LayerQuant::f_new(path, spec)?;
        let weight = path.f_var_copy("weight", weight)?;
        quant.init_weight_alpha(&weight)?;
        let bias = bias.map(|b| path.f_var_copy("bias", b)).transpose()?;
        Ok(Self { weight, bias, quant })
    }

    /// Converts a tch `nn::Linear` (its weights are copied under `path`).
    pub fn from_linear<'a, P: Borrow<nn::Path<'a>>>(
        path: P,
        linear: &nn::Linear,
        spec: QuantSpec,
    ) -> Result<Self> {
        Self::from_tensors(path, &linear.ws, linear.bs.as_ref(), spec)
    }

    /// The forward pass, returning errors instead of panicking.
    pub fn f_forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.quant.forward(
            xs,
            &self.weight,
            self.bias.as_ref(),
            train,
            OpGeom::Linear,
            crate::approx::lut_linear,
        )
    }
}

impl nn::ModuleT for ApproxLinear {
    /// Applies the layer in its current [`InferenceMode`](super::InferenceMode).
    ///
    /// # Shapes
    /// - `xs`: `[*, in_features]`
    /// - output: `[*, out_features]`
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.f_forward_t(xs, train).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl ApproxLayer for ApproxLinear {
    fn quant(&self) -> &LayerQuant {
        &self.quant
    }
    fn weight(&self) -> &Tensor {
        &self.weight
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    fn fan_in(&self) -> i64 {
        self.weight.size()[1]
    }
    fn opcount(&self) -> i64 {
        self.weight.numel() as i64
    }
}

impl ApproxModule for ApproxLinear {
    fn approx_layers(&self) -> Vec<(String, &dyn ApproxLayer)> {
        vec![(String::new(), self)]
    }
}
