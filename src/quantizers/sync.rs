//! A hook through which data-parallel training gives every rank the same activation ranges:
//! in training, each MinMax activation quantizer passes its batch's range through it (the
//! maximum over ranks is the range of the whole global batch).

use std::sync::{Arc, RwLock};

use crate::Result;

/// A function of a batch's range returning the range to use in its place.
pub type RangeSync = Arc<dyn Fn(f64) -> Result<f64> + Send + Sync>;

static SYNC: RwLock<Option<RangeSync>> = RwLock::new(None);

/// Installs (or with `None` removes) the process-wide range hook. Every rank must then run
/// the same training forward passes, in the same order: each calls the hook once per MinMax
/// activation quantizer.
pub fn set_range_sync(sync: Option<RangeSync>) {
    *SYNC.write().unwrap_or_else(|p| p.into_inner()) = sync;
}

/// `range` through the installed hook (unchanged without one).
pub(crate) fn synced(range: f64) -> Result<f64> {
    let hook = SYNC.read().unwrap_or_else(|p| p.into_inner()).clone();
    match hook {
        Some(f) => f(range),
        None => Ok(range),
    }
}
