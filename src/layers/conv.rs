//! `ApproxConv2d`: a 2-D convolution (strided, padded, dilated, grouped) with activation and weight quantizers.

use std::borrow::Borrow;
use std::sync::atomic::{AtomicI64, Ordering};

use tch::{nn, Tensor};

use super::{ApproxLayer, ApproxModule, LayerQuant, OpGeom, QuantSpec};
use crate::{Error, Result};

/// Settings of an [`ApproxConv2d`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ApproxConvConfig {
    /// Step of the kernel; default 1.
    pub stride: i64,
    /// Zero padding on each side; default 0.
    pub padding: i64,
    /// Spacing of the kernel's taps; default 1.
    pub dilation: i64,
    /// Channel groups; `groups == in_channels` is a depthwise convolution; default 1.
    pub groups: i64,
    /// Whether the layer has a bias; default `true`.
    pub bias: bool,
    /// Quantizers, bitwidth and mode; default [`QuantSpec::default`].
    pub quant: QuantSpec,
}

impl Default for ApproxConvConfig {
    fn default() -> Self {
        Self { stride: 1, padding: 0, dilation: 1, groups: 1, bias: true, quant: QuantSpec::default() }
    }
}

/// A 2-D convolution that can run quantized, after TorchApprox's `ApproxConv2d`.
///
/// Variables: `weight` `[out, in / groups, kh, kw]`, `bias` `[out]`, and
/// `x_quantizer.alpha` / `w_quantizer.alpha` for PACT quantizers.
#[derive(Debug)]
pub struct ApproxConv2d {
    /// The float weight, `[out_channels, in_channels / groups, kh, kw]`.
    pub weight: Tensor,
    /// The float bias, `[out_channels]`.
    pub bias: Option<Tensor>,
    /// Quantizers and mode.
    pub quant: LayerQuant,
    /// Stride, padding, dilation, groups (the `quant` field is not used after construction).
    pub config: ApproxConvConfig,
    last_output_pixels: AtomicI64,
}

/// Creates an [`ApproxConv2d`] with a square kernel and PyTorch's default initialisation.
///
/// ```
/// use tch::{nn, nn::ModuleT, Device, Kind, Tensor};
/// use torchapprox::layers::{approx_conv2d, ApproxConvConfig, ApproxLayer};
///
/// let vs = nn::VarStore::new(Device::Cpu);
/// let conv1 = approx_conv2d(vs.root() / "conv1", 1, 6, 5, ApproxConvConfig { padding: 2, ..Default::default() });
/// let y = conv1.forward_t(&Tensor::rand([2, 1, 28, 28], (Kind::Float, Device::Cpu)), false);
/// assert_eq!(y.size(), [2, 6, 28, 28]);
/// assert_eq!(conv1.opcount(), 6 * 28 * 28 * 25);
/// ```
pub fn approx_conv2d<'a, P: Borrow<nn::Path<'a>>>(
    path: P,
    in_channels: i64,
    out_channels: i64,
    kernel_size: i64,
    config: ApproxConvConfig,
) -> ApproxConv2d {
    ApproxConv2d::f_new(path, in_channels, out_channels, kernel_size, config)
        .unwrap_or_else(|e| panic!("{e}"))
}

impl ApproxConv2d {
    /// Like [`approx_conv2d`], returning an error for a bad configuration.
    pub fn f_new<'a, P: Borrow<nn::Path<'a>>>(
        path: P,
        in_channels: i64,
        out_channels: i64,
        kernel_size: i64,
        config: ApproxConvConfig,
    ) -> Result<Self> {
        let path = path.borrow();
        check_geometry(in_channels, out_channels, &config)?;
        let quant = LayerQuant::f_new(path, config.quant)?;
        let shape = [out_channels, in_channels / config.groups, kernel_size, kernel_size];
        // PyTorch's default (kaiming_uniform with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        let bound = 1.0 / ((in_channels / config.groups * kernel_size * kernel_size) as f64).sqrt();
        let init = nn::Init::Uniform { lo: -bound, up: bound };
        let weight = path.f_var("weight", &shape, init)?;
        quant.init_weight_alpha(&weight)?;
        let bias = if config.bias { Some(path.f_var("bias", &[out_channels], init)?) } else { None };
        Ok(Self { weight, bias, quant, config, last_output_pixels: AtomicI64::new(0) })
    }

    /// Copies an existing weight `[out, in / groups, kh, kw]` and bias into new
    /// variables under `path` (TorchApprox's `from_super`).
    pub fn from_tensors<'a, P: Borrow<nn::Path<'a>>>(
        path: P,
        weight: &Tensor,
        bias: Option<&Tensor>,
        config: ApproxConvConfig,
    ) -> Result<Self> {
        let path = path.borrow();
        let size = weight.size();
        if size.len() != 4 {
            return Err(Error::Shape {
                what: "ApproxConv2d weight".into(),
                expected: "[out_channels, in_channels / groups, kh, kw]".into(),
                actual: size,
            });
        }
        check_geometry(size[1] * config.groups, size[0], &config)?;
        if let Some(b) = bias {
            if b.size() != [size[0]] {
                return Err(Error::Shape {
                    what: "ApproxConv2d bias".into(),
                    expected: format!("[{}]", size[0]),
                    actual: b.size(),
                });
            }
        }
        let quant = LayerQuant::f_new(path, config.quant)?;
        let weight = path.f_var_copy("weight", weight)?;
        quant.init_weight_alpha(&weight)?;
        let bias = bias.map(|b| path.f_var_copy("bias", b)).transpose()?;
        Ok(Self { weight, bias, quant, config, last_output_pixels: AtomicI64::new(0) })
    }

    /// Converts a tch `nn::Conv2D` with the given geometry (tch's layer does not expose it).
    pub fn from_conv2d<'a, P: Borrow<nn::Path<'a>>>(
        path: P,
        conv: &nn::Conv2D,
        config: ApproxConvConfig,
    ) -> Result<Self> {
        Self::from_tensors(path, &conv.ws, conv.bs.as_ref(), config)
    }

    /// The forward pass, returning errors instead of panicking.
    pub fn f_forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let c = &self.config;
        let y = self.quant.forward(
            xs,
            &self.weight,
            self.bias.as_ref(),
            train,
            OpGeom::Conv2d([c.stride, c.stride, c.padding, c.padding, c.dilation, c.dilation, c.groups]),
            |x, w, m| crate::approx::lut_conv2d(x, w, m, c.stride, c.padding, c.dilation, c.groups),
        )?;
        let size = y.size();
        self.last_output_pixels.store(size[size.len() - 2] * size[size.len() - 1], Ordering::Relaxed);
        Ok(y)
    }
}

fn check_geometry(in_channels: i64, out_channels: i64, c: &ApproxConvConfig) -> Result<()> {
    let bad = |what, value: i64, expected| Err(Error::Argument { what, value: value as f64, expected });
    if c.groups < 1 || in_channels % c.groups != 0 || out_channels % c.groups != 0 {
        return bad("groups", c.groups, "at least 1 and a divisor of both channel counts");
    }
    if c.stride < 1 {
        return bad("stride", c.stride, "at least 1");
    }
    if c.dilation < 1 {
        return bad("dilation", c.dilation, "at least 1");
    }
    if c.padding < 0 {
        return bad("padding", c.padding, "at least 0");
    }
    Ok(())
}

impl nn::ModuleT for ApproxConv2d {
    /// Applies the convolution in its current [`InferenceMode`](super::InferenceMode).
    ///
    /// # Shapes
    /// - `xs`: `[N, in_channels, H, W]`
    /// - output: `[N, out_channels, H_out, W_out]`
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.f_forward_t(xs, train).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl ApproxLayer for ApproxConv2d {
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
        let s = self.weight.size();
        s[1] * s[2] * s[3]
    }
    fn opcount(&self) -> i64 {
        self.weight.size()[0] * self.last_output_pixels.load(Ordering::Relaxed) * self.fan_in()
    }
}

impl ApproxModule for ApproxConv2d {
    fn approx_layers(&self) -> Vec<(String, &dyn ApproxLayer)> {
        vec![(String::new(), self)]
    }
}
