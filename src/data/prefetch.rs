//! Batches prepared on a background thread while the caller trains on the previous ones.

use std::sync::mpsc::sync_channel;

use crate::{Error, Result};

/// Calls `make(0..count)` on a background thread, at most `ahead` results ahead of the
/// caller, and hands each result to `consume` in order, so that a training step never waits
/// for its batch to be gathered, augmented and moved to the device. The first error of
/// either side ends both (the producer stops at its next send) and is returned.
///
/// ```
/// let mut seen = Vec::new();
/// torchapprox::data::prefetched(5, 2, |i| Ok(i * i), |v| {
///     seen.push(v);
///     Ok(())
/// })?;
/// assert_eq!(seen, [0, 1, 4, 9, 16]);
/// # Ok::<(), torchapprox::Error>(())
/// ```
pub fn prefetched<T: Send>(
    count: usize,
    ahead: usize,
    mut make: impl FnMut(usize) -> Result<T> + Send,
    mut consume: impl FnMut(T) -> Result<()>,
) -> Result<()> {
    std::thread::scope(|scope| {
        let (tx, rx) = sync_channel::<Result<T>>(ahead.max(1));
        scope.spawn(move || {
            for i in 0..count {
                // A panic in `make` (libtorch's, say) becomes this batch's error, not the scope's.
                let item =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| make(i))).unwrap_or_else(|p| {
                        let what = crate::error::panic_message(&*p).unwrap_or_else(|| "a panic".into());
                        Err(Error::ModulePanicked(format!("preparing batch {i}: {what}")))
                    });
                let failed = item.is_err();
                // A closed channel means the consumer stopped: nothing more to make.
                if tx.send(item).is_err() || failed {
                    break;
                }
            }
        });
        for _ in 0..count {
            // The producer sends every item or stops after sending an error: never silent.
            let item =
                rx.recv().map_err(|_| Error::NoData { what: "the batch producer stopped early" })??;
            consume(item)?;
        }
        // Returning drops `rx` before the scope joins the producer, so it never blocks there.
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn results_arrive_in_order_and_errors_of_either_side_stop_both() {
        let mut got = Vec::new();
        prefetched(100, 3, Ok, |v| {
            got.push(v);
            Ok(())
        })
        .unwrap();
        assert_eq!(got, (0..100).collect::<Vec<_>>());

        let made = AtomicUsize::new(0);
        let err = prefetched(
            100,
            2,
            |i| {
                made.fetch_add(1, Ordering::SeqCst);
                if i == 7 {
                    Err(Error::NoData { what: "seventh" })
                } else {
                    Ok(i)
                }
            },
            |_| Ok(()),
        );
        assert!(matches!(err, Err(Error::NoData { what: "seventh" })));
        assert_eq!(made.load(Ordering::SeqCst), 8, "the producer stops at its error");

        let made = AtomicUsize::new(0);
        let err = prefetched(
            1000,
            2,
            |i| {
                made.fetch_add(1, Ordering::SeqCst);
                Ok(i)
            },
            |v| if v == 3 { Err(Error::NoData { what: "consumer" }) } else { Ok(()) },
        );
        assert!(matches!(err, Err(Error::NoData { what: "consumer" })));
        // At most `ahead` queued plus one in hand beyond what the consumer took.
        assert!(made.load(Ordering::SeqCst) <= 4 + 2 + 1, "made {}", made.load(Ordering::SeqCst));
    }
}
