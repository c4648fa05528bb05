//! What loaded or saved tensors must hold: finite values everywhere, and quantizer state
//! (`alpha`, `step_size`, `running_max`) within its own domain, and the floors that keep a
//! trained alpha or step size the value in effect.

use tch::{Kind, Tensor};

use super::{ALPHA_MIN, STEP_MIN};
use crate::{Error, Result};

/// The last name component of a quantizer's variable (`alpha` of `fc.x_quantizer.alpha`).
fn quantizer_leaf(name: &str) -> Option<&str> {
    let mut parts = name.rsplit('.');
    let last = parts.next()?;
    parts.any(|p| p.ends_with("_quantizer")).then_some(last)
}

/// The domain of a quantizer state variable, by its last name component, if it is one.
fn domain(name: &str) -> Option<(bool, &'static str)> {
    match quantizer_leaf(name)? {
        "alpha" => Some((true, "a PACT alpha must be positive")),
        "step_size" => Some((true, "an LSQ step size must be positive")),
        "running_max" => Some((false, "a running range cannot be negative")),
        "observed" => Some((false, "an observed range cannot be negative")),
        _ => None,
    }
}

/// Checks one named tensor from `origin` (a file, a model) before it is used or written:
/// every float value finite, and quantizer state (`*_quantizer.alpha` and `.step_size`
/// positive, `.running_max` not negative) within its domain.
///
/// ```
/// use tch::Tensor;
/// use torchapprox::quantizers::check_state;
///
/// check_state("ck.safetensors", "fc1.weight", &Tensor::from_slice(&[0.5f32, -1.0]))?;
/// let e = check_state("ck.safetensors", "fc1.x_quantizer.alpha", &Tensor::from_slice(&[0.0f32]));
/// assert_eq!(e.unwrap_err().to_string(), "ck.safetensors: fc1.x_quantizer.alpha is 0, but a PACT alpha must be positive");
/// # Ok::<(), torchapprox::Error>(())
/// ```
pub fn check_state(origin: &str, name: &str, t: &Tensor) -> Result<()> {
    if !t.defined() || !t.is_floating_point() || t.numel() == 0 {
        return Ok(());
    }
    let count = t.f_isfinite()?.f_logical_not()?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
    if count > 0 {
        return Err(Error::NonFiniteTensor {
            origin: origin.to_string(),
            name: name.to_string(),
            count,
            numel: t.numel() as i64,
        });
    }
    if let Some((strict, expected)) = domain(name) {
        let min = t.f_min()?.f_double_value(&[])?;
        if min < 0.0 || (strict && min == 0.0) {
            return Err(Error::QuantizerState {
                origin: origin.to_string(),
                name: name.to_string(),
                value: min,
                expected,
            });
        }
    }
    Ok(())
}

/// The smallest value a quantizer variable acts as, if it has one: PACT's alpha
/// ([`ALPHA_MIN`]) and LSQ's step size ([`STEP_MIN`]).
fn floor(name: &str) -> Option<f64> {
    match quantizer_leaf(name)? {
        "alpha" => Some(ALPHA_MIN),
        "step_size" => Some(STEP_MIN),
        _ => None,
    }
}

/// The quantizer variables of a model that have a floor, for [`raise`](Self::raise) after
/// each optimizer step.
///
/// Adam moves every variable by about its learning rate per step, so an alpha calibrated near
/// [`ALPHA_MIN`] (a layer whose inputs are almost all zero) can step below zero. The forward
/// then uses the floor, but the stored value is not the one in effect and saving refuses it.
/// Raising it to the floor after the step stores what the forward uses (projected gradient
/// descent).
///
/// ```
/// use tch::Tensor;
/// use torchapprox::quantizers::{StateFloors, ALPHA_MIN};
///
/// let alpha = Tensor::from_slice(&[-5e-5f32]);
/// let weight = Tensor::from_slice(&[-5e-5f32]);
/// let floors = StateFloors::new([
///     ("fc.x_quantizer.alpha".into(), alpha.shallow_clone()),
///     ("fc.weight".into(), weight),
/// ]);
/// assert_eq!(floors.len(), 1);
/// floors.raise()?;
/// assert_eq!(alpha.double_value(&[0]), ALPHA_MIN as f32 as f64);
/// # Ok::<(), torchapprox::Error>(())
/// ```
#[derive(Debug)]
pub struct StateFloors(Vec<(Tensor, f64)>);

impl StateFloors {
    /// Picks the variables with a floor (`*_quantizer.alpha`, `*_quantizer.step_size`) out
    /// of `vars`; the tensors share memory with the model's.
    pub fn new(vars: impl IntoIterator<Item = (String, Tensor)>) -> Self {
        Self(vars.into_iter().filter_map(|(name, t)| Some((t, floor(&name)?))).collect())
    }

    /// How many variables have a floor.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no variable has a floor.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Raises every variable below its floor to it, in place and without gradient. NaN and
    /// ±inf stay as they are, for the divergence checks to see.
    pub fn raise(&self) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (t, floor) in &self.0 {
            let raised = t.f_clamp_min(*floor)?.f_where_self(&t.f_isfinite()?, t)?;
            t.shallow_clone().f_copy_(&raised)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{domain, floor, StateFloors};
    use tch::Tensor;

    #[test]
    fn floors_raise_only_quantizer_state_below_them_and_keep_non_finite_values() {
        assert_eq!(floor("conv1.x_quantizer.alpha"), Some(super::ALPHA_MIN));
        assert_eq!(floor("fc.w_quantizer.step_size"), Some(super::STEP_MIN));
        assert_eq!(floor("fc.x_quantizer.running_max"), None);
        assert_eq!(floor("bn.alpha"), None);
        let alpha =
            Tensor::from_slice(&[-1.0f64, 0.0, 5e-7, 2e-6, f64::NAN, f64::INFINITY, f64::NEG_INFINITY]);
        let step = Tensor::from_slice(&[-3.0f32]);
        let plain = Tensor::from_slice(&[-1.0f32]);
        let floors = StateFloors::new([
            ("a.x_quantizer.alpha".to_string(), alpha.shallow_clone()),
            ("a.w_quantizer.step_size".to_string(), step.shallow_clone()),
            ("a.alpha".to_string(), plain.shallow_clone()),
        ]);
        assert_eq!(floors.len(), 2);
        floors.raise().unwrap();
        let got = Vec::<f64>::try_from(&alpha).unwrap();
        assert_eq!(got[..4], [1e-6, 1e-6, 1e-6, 2e-6]);
        assert!(got[4].is_nan());
        assert_eq!(got[5..], [f64::INFINITY, f64::NEG_INFINITY]);
        assert_eq!(step.double_value(&[0]), super::STEP_MIN as f32 as f64);
        assert_eq!(plain.double_value(&[0]), -1.0);
    }

    #[test]
    fn only_quantizer_state_has_a_domain() {
        assert_eq!(domain("conv1.x_quantizer.alpha").map(|d| d.0), Some(true));
        assert_eq!(domain("fc.w_quantizer.step_size").map(|d| d.0), Some(true));
        assert_eq!(domain("fc.x_quantizer.running_max").map(|d| d.0), Some(false));
        assert_eq!(domain("alpha"), None);
        assert_eq!(domain("bn.alpha"), None);
        assert_eq!(domain("fc.weight"), None);
    }
}
