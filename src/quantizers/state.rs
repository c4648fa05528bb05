//! What loaded or saved tensors must hold: finite values everywhere, and quantizer state
//! (`alpha`, `step_size`, `running_max`) within its own domain.

use tch::{Kind, Tensor};

use crate::{Error, Result};

/// The domain of a quantizer state variable, by its last name component, if it is one.
fn domain(name: &str) -> Option<(bool, &'static str)> {
    let mut parts = name.rsplit('.');
    let last = parts.next()?;
    if !parts.any(|p| p.ends_with("_quantizer")) {
        return None;
    }
    match last {
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

#[cfg(test)]
mod tests {
    use super::domain;

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
