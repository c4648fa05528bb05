//! Data-parallel training over a [`ProcessGroup`]: the same variables on every rank, a
//! disjoint share of each global batch per rank, gradients summed in flattened buckets so
//! that every rank takes the step one process would take on the whole batch.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

use tch::{nn, Kind, Tensor};

use super::{ProcessGroup, ReduceOp};
use crate::glue::distributed::Reducer;
use crate::{Error, Result};

/// PyTorch DDP's default bucket: 25 MiB of gradients per allreduce.
pub const DEFAULT_BUCKET_BYTES: usize = 25 << 20;

/// A process group used for data-parallel training of one `VarStore`.
#[derive(Debug)]
pub struct DataParallel {
    group: Arc<Mutex<ProcessGroup>>,
    rank: i64,
    world_size: i64,
    bucket_bytes: usize,
    sum_seconds: f64,
    overlap: bool,
    reducer: Option<Overlap>,
}

/// Gradient sums during the backward pass: c10d's reducer over the trainable variables
/// `hooked` (names and storage) but those in `after`, which are summed after the pass.
#[derive(Debug)]
struct Overlap {
    reducer: Reducer,
    hooked: Vec<(String, usize)>,
    after: Vec<(String, Tensor)>,
}

/// The variables of `vs` in name order: the order every rank agrees on.
fn sorted_variables(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

impl DataParallel {
    /// Data-parallel training over `group`, summing gradients in buckets of about
    /// `bucket_bytes` (at least one gradient each).
    pub fn new(group: ProcessGroup, bucket_bytes: usize) -> Self {
        let (rank, world_size) = (group.rank(), group.world_size());
        Self {
            group: Arc::new(Mutex::new(group)),
            rank,
            world_size,
            bucket_bytes: bucket_bytes.max(1),
            sum_seconds: 0.0,
            overlap: true,
            reducer: None,
        }
    }

    /// The process group, locked.
    pub fn group(&self) -> MutexGuard<'_, ProcessGroup> {
        self.group.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This rank and the number of ranks.
    pub fn rank_and_size(&self) -> (i64, i64) {
        (self.rank, self.world_size)
    }

    /// Makes every MinMax activation quantizer of this process take, in training, the range
    /// of the whole global batch (the maximum over ranks), so that running ranges and the
    /// quantized values are those one process would compute
    /// ([`set_range_sync`](crate::quantizers::set_range_sync)); `false` removes the hook.
    pub fn sync_activation_ranges(&self, on: bool) {
        let group = Arc::clone(&self.group);
        let sync: Option<crate::quantizers::RangeSync> = on.then(|| {
            Arc::new(move |range: f64| -> Result<f64> {
                let mut t = Tensor::f_from_slice(&[range])?;
                group.lock().unwrap_or_else(|p| p.into_inner()).allreduce_(&mut t, ReduceOp::Max)?;
                Ok(t.f_double_value(&[0])?)
            }) as crate::quantizers::RangeSync
        });
        crate::quantizers::set_range_sync(sync);
    }

    /// Refuses to start unless every rank has the same `config` (its flags, in words) and
    /// the same variable names and shapes: different networks or flags would otherwise
    /// deadlock or silently train apart.
    pub fn check_same_setup(&mut self, vs: &nn::VarStore, config: &str) -> Result<()> {
        let mut h = DefaultHasher::new();
        config.hash(&mut h);
        self.group().check_same("the configuration (flags)", h.finish())?;
        let mut h = DefaultHasher::new();
        for (name, t) in sorted_variables(vs) {
            (name, t.size(), t.requires_grad()).hash(&mut h);
        }
        self.group().check_same("the network (variable names and shapes)", h.finish())
    }

    /// Copies every variable of rank 0's `vs` (parameters and buffers: BatchNorm statistics,
    /// running ranges, alphas) into every rank's, in name order.
    pub fn broadcast_variables(&mut self, vs: &nn::VarStore) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (_, t) in sorted_variables(vs) {
            let on = self.group().collective_device(t.device());
            let mut flat = t.f_detach()?.f_to_device(on)?.f_contiguous()?;
            self.group().broadcast_(&mut flat, 0)?;
            t.shallow_clone().f_copy_(&flat)?;
        }
        Ok(())
    }

    /// This rank's part of a global batch `batch` (indices): the `rank`-th of `world`
    /// contiguous parts, sizes differing by at most one; empty where the batch is smaller
    /// than the world.
    pub fn shard(&self, batch: &Tensor) -> Result<Tensor> {
        let (rank, world) = self.rank_and_size();
        let n = batch.size().first().copied().unwrap_or(0);
        let (start, end) = (n * rank / world, n * (rank + 1) / world);
        Ok(batch.f_narrow(0, start, end - start)?)
    }

    /// Turns each rank's gradients of its mean loss over `local` samples into the gradient
    /// of the mean loss over the whole global batch of `global` samples, on every rank: each
    /// gradient scaled by `local / global`, then summed over ranks in flattened buckets.
    /// Trainable variables without a gradient (or a rank with no samples) count as zeros.
    /// LSQ activation step sizes, whose gradient scale counts the batch's elements, are
    /// rescaled to the global batch's count.
    pub fn sum_gradients(&mut self, vs: &nn::VarStore, local: i64, global: i64) -> Result<()> {
        check_share(local, global, 0)?;
        let share = local as f64 / global as f64;
        let vars = sorted_variables(vs)
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(name, t)| (t, share * lsq_batch_correction(&name, share)))
            .collect();
        self.sum_weighted(vars)
    }

    /// Sums `weight * gradient` of each variable over the ranks, in flattened buckets, into
    /// every rank's gradient (a missing gradient counts as zeros).
    fn sum_weighted(&mut self, vars: Vec<(Tensor, f64)>) -> Result<()> {
        if vars.is_empty() {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        let started = std::time::Instant::now();
        let (vars, weights): (Vec<Tensor>, Vec<f64>) = vars.into_iter().unzip();
        let mut start = 0;
        while start < vars.len() {
            // One bucket: gradients until the byte budget is spent (at least one).
            let mut end = start + 1;
            let mut bytes = vars[start].numel() * 4;
            while end < vars.len() && bytes + vars[end].numel() * 4 <= self.bucket_bytes {
                bytes += vars[end].numel() * 4;
                end += 1;
            }
            let parts: Vec<Tensor> = vars[start..end]
                .iter()
                .zip(&weights[start..end])
                .map(|(v, &weight)| {
                    let g = v.grad();
                    let g = if g.defined() { g.f_mul_scalar(weight)? } else { v.f_zeros_like()? };
                    let on = self.group().collective_device(v.device());
                    Ok(g.f_to_kind(Kind::Float)?.f_to_device(on)?.f_flatten(0, -1)?)
                })
                .collect::<Result<_>>()?;
            let mut flat = Tensor::f_cat(&parts, 0)?;
            self.group().allreduce_(&mut flat, ReduceOp::Sum)?;
            let mut offset = 0;
            for v in &vars[start..end] {
                let n = v.numel() as i64;
                let summed = flat
                    .f_narrow(0, offset, n)?
                    .f_view_as(v)?
                    .f_to_kind(v.kind())?
                    .f_to_device(v.device())?;
                let mut g = v.grad();
                if g.defined() {
                    g.f_copy_(&summed)?;
                } else {
                    // A rank whose share was empty: its variables get the others' gradient.
                    set_grad(v, &summed)?;
                }
                offset += n;
            }
            start = end;
        }
        self.sum_seconds += started.elapsed().as_secs_f64();
        Ok(())
    }

    /// Whether [`backward`](Self::backward) sums gradients during the backward pass (the
    /// default), as PyTorch's DistributedDataParallel does: c10d's `Reducer` hooks the
    /// trainable variables (in name order, in buckets of this group's `bucket_bytes`, the
    /// first capped at 1 MiB, last variables first) and averages each bucket over the ranks as
    /// soon as its gradients exist, while the pass goes on. `false` sums them after the pass
    /// ([`sum_gradients`](Self::sum_gradients)), as does a global batch smaller than the world.
    pub fn set_overlap(&mut self, on: bool) {
        self.overlap = on;
        if !on {
            self.reducer = None;
        }
    }

    /// The reducer for the trainable variables of `vs`, (re)built when they changed. LSQ
    /// activation step sizes, whose batch correction differs per rank, are left to the sums
    /// after the pass.
    fn reducer_for(&mut self, vs: &nn::VarStore) -> Result<&mut Overlap> {
        let trainable: Vec<(String, Tensor)> =
            sorted_variables(vs).into_iter().filter(|(_, t)| t.requires_grad()).collect();
        // The hooks sit on tensors: a new VarStore with the same names needs new ones.
        let hooked: Vec<(String, usize)> =
            trainable.iter().map(|(name, t)| (name.clone(), t.data_ptr() as usize)).collect();
        if self.reducer.as_ref().map_or(true, |o| o.hooked != hooked) {
            // The old hooks go before new ones are set.
            self.reducer = None;
            let (during, after): (Vec<_>, Vec<_>) =
                trainable.into_iter().partition(|(name, _)| lsq_batch_correction(name, 0.25) == 1.0);
            let vars: Vec<Tensor> = during.into_iter().map(|(_, t)| t).collect();
            // Variables a pass never reaches (a frozen branch) are found by searching its graph.
            let reducer = self.group().reducer(&vars, self.bucket_bytes, true)?;
            self.reducer = Some(Overlap { reducer, hooked, after });
        }
        Ok(self.reducer.as_mut().expect("set above"))
    }

    /// The backward pass of this rank's `loss`, its mean over `local` samples of a global
    /// batch of `global`: afterwards every rank holds the gradient of the mean loss over the
    /// whole global batch, as one process would. Summed after the pass
    /// ([`sum_gradients`](Self::sum_gradients)), or during it
    /// ([`set_overlap`](Self::set_overlap)), where every rank needs a sample.
    pub fn backward(&mut self, vs: &nn::VarStore, loss: &Tensor, local: i64, global: i64) -> Result<()> {
        if loss.numel() != 1 {
            return Err(Error::Argument {
                what: "elements of the loss",
                value: loss.numel() as f64,
                expected: "1 (a mean over the rank's samples)",
            });
        }
        // A batch smaller than the world leaves some ranks without samples; every rank sees
        // the same global batch, so all of them take the sums after the pass alike.
        if !self.overlap || global < self.world_size {
            loss.f_backward()?;
            return self.sum_gradients(vs, local, global);
        }
        check_share(local, global, 1)?;
        let (group, world) = (Arc::clone(&self.group), self.world_size as f64);
        let lock = || group.lock().unwrap_or_else(|p| p.into_inner());
        let share = local as f64 / global as f64;
        // The reducer averages over ranks: a loss weighted by (ranks x share) makes the
        // average the sum of the shares' gradients, the whole batch's.
        let scaled = loss.f_mul_scalar(world * share)?;
        let overlap = self.reducer_for(vs)?;
        overlap.reducer.prepare(&[&scaled]).map_err(|p| lock().fail("allreduce", p))?;
        scaled.f_backward().map_err(|e| lock().fail("allreduce", e.to_string()))?;
        // Those gradients are (ranks x share) times this rank's: rescaled to share x correction.
        let after: Vec<(Tensor, f64)> = overlap
            .after
            .iter()
            .map(|(name, t)| (t.shallow_clone(), lsq_batch_correction(name, share) / world))
            .collect();
        self.sum_weighted(after)
    }

    /// Seconds spent in gradient sums after the backward pass so far (flattening, the
    /// allreduce and the copies back), for the share of a step that communication takes;
    /// sums during the pass ([`set_overlap`](Self::set_overlap)) hide in it.
    pub fn gradient_seconds(&self) -> f64 {
        self.sum_seconds
    }

    /// The sum over ranks of `value` (counts: correct predictions, samples).
    pub fn sum_i64(&mut self, value: i64) -> Result<i64> {
        let mut t = Tensor::f_from_slice(&[value])?;
        self.group().allreduce_(&mut t, ReduceOp::Sum)?;
        Ok(t.f_int64_value(&[0])?)
    }
}

impl Drop for DataParallel {
    /// The range hook holds the group: it goes with it.
    fn drop(&mut self) {
        crate::quantizers::set_range_sync(None);
    }
}

/// Checks a rank's share: `local` of a global batch of `global` samples, at least `least`.
fn check_share(local: i64, global: i64, least: i64) -> Result<()> {
    if global < 1 || local < least || local > global {
        return Err(Error::Argument {
            what: "samples of a rank's share",
            value: local as f64,
            expected: if least > 0 {
                "between 1 and the global batch: with sums during the backward pass every rank needs a sample"
            } else {
                "between 0 and the global batch, which is at least 1"
            },
        });
    }
    Ok(())
}

/// The extra factor of an LSQ activation step size's gradient (`*x_quantizer.step_size`) on a
/// rank holding `share` of the global batch: LSQ scales that gradient by
/// `1 / sqrt(numel(x) int_max)`, and a rank's `x` holds `share` of the batch's elements, so
/// its scale is `1 / sqrt(share)` times the one process's; `sqrt(share)` undoes it. Other
/// variables (weights' step sizes included: every rank has the whole weight) get 1.
fn lsq_batch_correction(name: &str, share: f64) -> f64 {
    if share > 0.0 && (name == "x_quantizer.step_size" || name.ends_with(".x_quantizer.step_size")) {
        share.sqrt()
    } else {
        1.0
    }
}

/// Gives `v` the gradient `g` where it has none yet (no backward pass reached it): the
/// gradient of `sum(v * g)` with respect to `v` is exactly `g`.
fn set_grad(v: &Tensor, g: &Tensor) -> Result<()> {
    tch::with_grad(|| -> Result<()> {
        v.f_mul(&g.f_detach()?)?.f_sum(Kind::Float)?.f_backward()?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::lsq_batch_correction;

    #[test]
    fn only_activation_step_sizes_are_rescaled_to_the_global_batch() {
        assert_eq!(lsq_batch_correction("conv1.x_quantizer.step_size", 0.25), 0.5);
        assert_eq!(lsq_batch_correction("x_quantizer.step_size", 0.25), 0.5);
        for name in
            ["conv1.w_quantizer.step_size", "conv1.x_quantizer.alpha", "fc.weight", "max_quantizer.step_size"]
        {
            assert_eq!(lsq_batch_correction(name, 0.25), 1.0, "{name}");
        }
        assert_eq!(lsq_batch_correction("conv1.x_quantizer.step_size", 0.0), 1.0);
    }
}
