//! Checks of numeric arguments, shared by the library and its command-line programs: every
//! value that reaches a float32 tensor or libtorch's thread pool is checked up front.

use crate::{Error, Result};

/// float32's largest finite value, the bound of every float argument that becomes tensor data.
pub const F32_MAX: f64 = f32::MAX as f64;

/// The largest learning rate: Adam's first step is `lr / (1 - beta1) = 10 lr`, computed in float32.
pub const MAX_LEARNING_RATE: f64 = F32_MAX / 10.0;

/// `Ok` for a finite `value` within float32's range; otherwise the [`Error::Argument`] naming `what`.
pub fn check_f32(what: &'static str, value: f64) -> Result<()> {
    if !value.is_finite() {
        return Err(Error::Argument { what, value, expected: "finite" });
    }
    if value.abs() > F32_MAX {
        return Err(Error::Argument {
            what,
            value,
            expected: "within float32's range (at most 3.4028235e38)",
        });
    }
    Ok(())
}

/// `Ok` for a positive value that float32 holds; otherwise the [`Error::Argument`] naming `what`.
pub fn check_positive(what: &'static str, value: f64) -> Result<()> {
    if !(value.is_finite() && value > 0.0) {
        return Err(Error::Argument { what, value, expected: "positive and finite" });
    }
    check_f32(what, value)
}

/// `Ok` for a learning rate in `[0, MAX_LEARNING_RATE]`; larger ones overflow the optimizer's
/// float32 step (libtorch aborts the step), so they are refused before training starts.
pub fn check_learning_rate(what: &'static str, value: f64) -> Result<()> {
    if !(value.is_finite() && value >= 0.0) {
        return Err(Error::Argument { what, value, expected: "finite and not negative" });
    }
    if value > MAX_LEARNING_RATE {
        return Err(Error::Argument {
            what,
            value,
            expected: "at most 3.4e37 (Adam's first step, lr / (1 - beta1), must fit float32)",
        });
    }
    Ok(())
}

/// The most intra-op threads accepted: four per core of this machine.
pub fn max_threads() -> i64 {
    4 * std::thread::available_parallelism().map_or(1, |n| n.get()) as i64
}

/// `Ok` for 0 (libtorch's choice) up to [`max_threads`]; more would only stall or exhaust
/// memory in libtorch's pool (`libgomp: Out of memory`).
pub fn check_threads(what: &'static str, value: i64) -> Result<()> {
    if (0..=max_threads()).contains(&value) {
        Ok(())
    } else {
        Err(Error::Threads { what, value, max: max_threads() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_float32s() {
        assert!(check_f32("x", 3.4e38).is_ok());
        assert_eq!(check_f32("x", 3.5e38).unwrap_err().to_string(), "x must be within float32's range (at most 3.4028235e38), got 350000000000000000000000000000000000000");
        assert!(check_f32("x", -1.0).is_ok());
        assert!(check_positive("x", -1.0).unwrap_err().to_string().contains("positive and finite, got -1"));
        assert!(check_positive("x", 1e308).unwrap_err().to_string().contains("float32's range"));
        assert!(check_learning_rate("lr", 0.0).is_ok());
        assert!(check_learning_rate("lr", 3.4e37).is_ok());
        assert!(check_learning_rate("lr", 1e38).unwrap_err().to_string().contains("at most 3.4e37"));
        assert!(check_threads("t", 0).is_ok() && check_threads("t", max_threads()).is_ok());
        assert!(check_threads("t", -1).is_err() && check_threads("t", max_threads() + 1).is_err());
    }
}
