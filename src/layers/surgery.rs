//! Replacing a layer's quantizer inside tch's `VarStore`: the one place that touches the
//! store's internals (its variable map and trainable list), so names stay clean.

use tch::{nn, Tensor};

use super::{join, LayerQuant, QuantizerSlot};
use crate::quantizers::{QuantConfig, Quantizer, QuantizerKind};
use crate::{Error, Result};

impl LayerQuant {
    /// Replaces a quantizer: removes the old one's variables (`{layer}.x_quantizer.*`)
    /// from `vs` and builds the new one there, so names stay clean (no `alpha__1`).
    /// `layer` is the layer's full path in `vs` (`fc1`, `model.layer1.0.conv1`); `weight`,
    /// the layer's, starts a PACT or LSQ weight quantizer. Optimizers built before still
    /// hold the old variables: build them after.
    ///
    /// ```
    /// use tch::{nn, Device};
    /// use torchapprox::layers::{approx_linear, QuantizerSlot};
    /// use torchapprox::quantizers::{QuantConfig, QuantizerKind};
    ///
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let mut fc = approx_linear(vs.root() / "fc", 4, 2, Default::default());
    /// let lsq = QuantConfig { bitwidth: 4, ..Default::default() };
    /// fc.quant.f_replace_quantizer(&vs, "fc", QuantizerSlot::Input, QuantizerKind::Lsq, lsq, &fc.weight)?;
    /// let mut names: Vec<String> = vs.variables().into_keys().collect();
    /// names.sort();
    /// assert_eq!(names, ["fc.bias", "fc.weight", "fc.x_quantizer.step_size"]);
    /// # Ok::<(), torchapprox::Error>(())
    /// ```
    pub fn f_replace_quantizer(
        &mut self,
        vs: &nn::VarStore,
        layer: &str,
        slot: QuantizerSlot,
        kind: QuantizerKind,
        config: QuantConfig,
        weight: &Tensor,
    ) -> Result<()> {
        let prefix = join(layer, slot.name());
        if prefix.split('.').any(str::is_empty) {
            return Err(Error::BadName {
                what: "layer path",
                name: layer.to_string(),
                problem: "has an empty component",
            });
        }
        // The configuration is checked in a scratch store first, so a bad one changes nothing.
        Quantizer::from_config(kind, nn::VarStore::new(vs.device()).root(), config)?;
        let old = match slot {
            QuantizerSlot::Input => &self.x_quantizer,
            QuantizerSlot::Weight => &self.w_quantizer,
        };
        let group = {
            let mut vars = vs.variables_.lock().unwrap_or_else(|p| p.into_inner());
            // The layer's weight under `layer` proves the store and the name are this layer's;
            // a MinMax quantizer in batch mode has no variable that could.
            let same_layer =
                vars.named_variables.get(&join(layer, "weight")).is_some_and(|w| w.is_set_to(weight));
            let state = old.state_tensors();
            let ours = |t: &Tensor| state.iter().any(|s| t.is_set_to(s));
            let under = format!("{prefix}.");
            let names: Vec<String> =
                vars.named_variables.keys().filter(|n| n.starts_with(&under)).cloned().collect();
            if !same_layer || names.iter().any(|n| !ours(&vars.named_variables[n])) {
                return Err(Error::NotThisLayer(layer.to_string()));
            }
            let group = vars.trainable_variables.iter().find(|v| ours(&v.tensor)).map_or(0, |v| v.group);
            for n in &names {
                vars.named_variables.remove(n);
            }
            vars.trainable_variables.retain(|v| !ours(&v.tensor));
            group
        };
        // The new variables join the old ones' optimizer group.
        let path = prefix.split('.').fold(vs.root().set_group(group), |p, part| p.sub(part));
        let new = Quantizer::from_config(kind, &path, config)?;
        match slot {
            QuantizerSlot::Input => self.x_quantizer = new,
            QuantizerSlot::Weight => {
                self.w_quantizer = new;
                self.init_weight_alpha(weight)?;
            }
        }
        Ok(())
    }
}
