//! Approximate multipliers in rewritten TorchScript layers: every product of a layer read
//! from a multiplier's table, through the crate's table GEMM (the operators
//! `torchapprox::lut_linear` / `lut_conv2d`), with the exact products' gradient.

use tch::{Kind, Tensor};

use super::rewrite::{APPROX_MULTIPLIER, APPROX_TABLE};
use super::ScriptModel;
use crate::approx::Multiplier;
use crate::glue::jit::{self, AttrValue};
use crate::{Error, Result};

/// `m`'s table as the saved files' gathers read it: int64 `table[(a + 128) * 256 + (b + 128)]`.
pub(super) fn portable_table(m: &Multiplier) -> Result<Tensor> {
    let values: Vec<i64> =
        (-128..128).flat_map(|a| (-128..128).map(move |b| m.product(a, b) as i64)).collect();
    Ok(Tensor::f_from_slice(&values)?)
}

impl ScriptModel {
    /// Runs every rewritten layer's products through `multiplier` (approximate mode, as the
    /// crate's layers in [`InferenceMode::Approximate`](crate::layers::InferenceMode)), or
    /// exactly again with `None`. Refused, changing nothing, before
    /// [`quantize_layers`](Self::quantize_layers) or when a layer's operands are wider than
    /// 8 bits or not rounded.
    pub fn set_multiplier(&mut self, multiplier: Option<&Multiplier>) -> Result<()> {
        // Every rewritten layer: an attention's two projections take its multiplier.
        let names: Vec<String> = self.rewritten.iter().map(|l| l.name.clone()).collect();
        if names.is_empty() {
            return Err(Error::NothingToDo {
                model: self.source.clone(),
                what: "no rewritten layers to approximate: call quantize_layers first",
            });
        }
        for name in &names {
            self.check_approximable(name, multiplier)?;
        }
        for name in &names {
            self.set_layer_multiplier(name, multiplier)?;
        }
        Ok(())
    }

    /// [`set_multiplier`](Self::set_multiplier) for the rewritten layer `layer` alone.
    pub fn set_layer_multiplier(&mut self, layer: &str, multiplier: Option<&Multiplier>) -> Result<()> {
        self.check_approximable(layer, multiplier)?;
        let id = match multiplier {
            Some(m) => crate::glue::ops::register(m)?,
            None => -1,
        };
        jit::set_attr(&self.module, layer, APPROX_MULTIPLIER, AttrValue::Int(id))?;
        self.multipliers.retain(|(name, _)| name != layer);
        if let Some(m) = multiplier {
            self.multipliers.push((layer.to_string(), m.clone()));
        }
        Ok(())
    }

    /// The multiplier of each rewritten layer in approximate mode (layers absent: exact).
    pub fn multipliers(&self) -> &[(String, Multiplier)] {
        &self.multipliers
    }

    fn check_approximable(&self, layer: &str, multiplier: Option<&Multiplier>) -> Result<()> {
        let l = self.rewritten.iter().find(|l| l.name == layer).ok_or_else(|| Error::UnknownLayers {
            unknown: vec![layer.to_string()],
            model: Some(self.source.clone()),
            known: self.rewritten.iter().map(|l| l.name.clone()).collect(),
        })?;
        if multiplier.is_none() {
            return Ok(());
        }
        let (x_bits, w_bits) = (l.spec.x_bitwidth(), l.spec.w_bitwidth());
        // Narrower integers index the same 256x256 table, as in the crate's layers.
        if x_bits > 8 || w_bits > 8 {
            return Err(Error::ApproxBits { x_bits, w_bits });
        }
        if !l.spec.rounded {
            return Err(Error::RewriteLayer {
                layer: layer.to_string(),
                problem: "approximate products need rounded (integer) operands".into(),
            });
        }
        Ok(())
    }

    /// Gives every rewritten layer of `m` (a copy of this model about to be saved) the table
    /// its portable forward gathers from: its multiplier's, or an empty one.
    pub(super) fn set_portable_tables(&self, m: &tch::CModule) -> Result<()> {
        for l in &self.rewritten {
            let table = match self.multipliers.iter().find(|(name, _)| name == &l.name) {
                Some((_, mult)) => portable_table(mult)?,
                None => Tensor::f_zeros([0], (Kind::Int64, tch::Device::Cpu))?,
            };
            jit::set_attr(m, &l.name, APPROX_TABLE, AttrValue::Tensor(&table.f_to_device(self.device)?))?;
        }
        Ok(())
    }
}
