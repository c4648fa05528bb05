//! Fine-tuning a TorchScript model itself: weight-only QAT, or QAT of its rewritten layers.

use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use super::{LayerReport, PtqConfig, ScriptModel};
use crate::distributed::{DataParallel, ReduceOp};
use crate::quantizers::{check_bitwidth, ApproxQuantizer, MinMaxQuant, QuantConfig, StateFloors};
use crate::{Error, Result};

/// Settings of [`ScriptModel::finetune_qat`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FinetuneConfig {
    /// Passes over the data.
    pub epochs: usize,
    /// Adam's learning rate.
    pub lr: f64,
    /// Samples per step.
    pub batch_size: i64,
    /// Seed of the shuffling.
    pub seed: i64,
    /// Random crops of images zero-padded by this many pixels, and random horizontal flips,
    /// for each batch ([`random_crop_flip`](crate::data::random_crop_flip)); 0: none.
    pub augment_pad: i64,
}

impl FinetuneConfig {
    /// Checks the learning rate (finite, not negative) and the batch size (at least 1).
    pub fn check(&self) -> Result<()> {
        crate::args::check_learning_rate("fine-tuning learning rate", self.lr)?;
        if !(0..=1024).contains(&self.augment_pad) {
            return Err(Error::Argument {
                what: "augmentation padding",
                value: self.augment_pad as f64,
                expected: "0 to 1024 pixels",
            });
        }
        if self.batch_size < 1 {
            return Err(Error::Argument {
                what: "fine-tuning batch size",
                value: self.batch_size as f64,
                expected: "at least 1",
            });
        }
        Ok(())
    }
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        Self { epochs: 1, lr: 1e-4, batch_size: 64, seed: 0, augment_pad: 0 }
    }
}

fn diverged(epoch: usize, what: String) -> Error {
    Error::Diverged { epoch, what }
}

impl ScriptModel {
    /// Makes [`finetune`](Self::finetune) and [`finetune_qat`](Self::finetune_qat) run
    /// data-parallel over `dp`'s ranks (`None`: one process again): each rank loads the same
    /// model and data (checked), takes rank 0's parameters, buffers, shadow weights and each
    /// epoch's order and augmentation draws, trains on its share of every global batch of
    /// `batch_size` with the gradients summed over the ranks, and gets rank 0's buffers
    /// (BatchNorm statistics, running ranges) after every epoch, so that every rank ends with
    /// the same model. Every share holds at least two samples (BatchNorm in training needs
    /// two): a `batch_size` under twice the ranks is refused, a smaller last batch skipped.
    pub fn set_data_parallel(&mut self, dp: Option<DataParallel>) {
        self.parallel = dp;
    }

    /// The data-parallel group set by [`set_data_parallel`](Self::set_data_parallel).
    pub fn data_parallel(&mut self) -> Option<&mut DataParallel> {
        self.parallel.as_mut()
    }

    /// Weight-only quantization-aware fine-tuning of the module itself.
    ///
    /// The current weights become float shadows; each step runs the module with
    /// fake-quantized weights, sends the gradients straight through to the
    /// shadows (Adam on all parameters), then puts the shadows back. At the end
    /// the weights are quantized once more and the report returned. The module
    /// runs in training mode meanwhile (BatchNorm statistics update). If training
    /// diverges the parameters are restored and an error returned.
    pub fn finetune_qat(
        &mut self,
        quant: &PtqConfig,
        images: &Tensor,
        labels: &Tensor,
        config: FinetuneConfig,
    ) -> Result<Vec<LayerReport>> {
        let weights = self.quantizable()?;
        if weights.is_empty() {
            return Err(Error::NothingToDo {
                model: self.source.clone(),
                what: "no quantizable weights to fine-tune",
            });
        }
        self.check_overrides(quant, &weights)?;
        let mut shadows = Vec::new();
        for (name, w) in &weights {
            let bits = check_bitwidth(quant.bits_for(name))?;
            let q = MinMaxQuant::stateless(QuantConfig {
                per_channel: quant.per_channel,
                ..QuantConfig::with_bitwidth(bits)
            })?;
            shadows.push((w.shallow_clone(), w.detach().copy(), q));
        }
        self.train(images, labels, config, &shadows)?;
        self.quantize_weights(quant)
    }

    /// Quantization-aware fine-tuning of a model whose layers [`quantize_layers`](Self::quantize_layers)
    /// rewrote: Adam on every parameter (weights, biases, BatchNorm, PACT alphas) through the
    /// layers' own straight-through gradients. If training diverges the parameters are
    /// restored and an error returned.
    pub fn finetune(&mut self, images: &Tensor, labels: &Tensor, config: FinetuneConfig) -> Result<()> {
        if self.rewritten.is_empty() {
            return Err(Error::NothingToDo {
                model: self.source.clone(),
                what: "no rewritten layers to fine-tune: call quantize_layers first (or finetune_qat for weights only)",
            });
        }
        self.train(images, labels, config, &[])
    }

    /// Copies rank 0's buffers (BatchNorm statistics, running ranges) and `extra` tensors
    /// into every rank's.
    fn broadcast_buffers(&self, dp: &mut DataParallel, extra: &[&Tensor]) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let buffers = crate::glue::jit::named_buffers(&self.module)?;
        for t in buffers.iter().map(|(_, t)| t).chain(extra.iter().copied()) {
            let mut flat = t.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?;
            dp.group().broadcast_(&mut flat, 0)?;
            t.shallow_clone().f_copy_(&flat)?;
        }
        Ok(())
    }

    /// The training loop of both fine-tunings. `shadows` holds, for weight-only QAT, each
    /// weight with its float shadow and quantizer.
    fn train(
        &mut self,
        images: &Tensor,
        labels: &Tensor,
        config: FinetuneConfig,
        shadows: &[(Tensor, Tensor, MinMaxQuant)],
    ) -> Result<()> {
        // Out of `self` for the loop, which borrows the model too; always put back.
        let mut dp = self.parallel.take();
        let result = self.train_on(images, labels, config, shadows, dp.as_mut());
        self.parallel = dp;
        result
    }

    fn train_on(
        &mut self,
        images: &Tensor,
        labels: &Tensor,
        config: FinetuneConfig,
        shadows: &[(Tensor, Tensor, MinMaxQuant)],
        mut dp: Option<&mut DataParallel>,
    ) -> Result<()> {
        config.check()?;
        let n = labels.size().first().copied().unwrap_or(0);
        if n == 0 {
            return Err(Error::NoData { what: "fine-tuning needs training digits, got none" });
        }
        if images.size().first() != Some(&n) {
            return Err(Error::CountMismatch {
                images: images.size().first().copied().unwrap_or(0),
                labels: n,
            });
        }
        // Restored if training diverges, so a failed run leaves the model as it was.
        let snapshot: Vec<(Tensor, Tensor)> =
            self.parameters()?.into_iter().map(|(_, t)| (t.detach().copy(), t)).collect();
        let vs = nn::VarStore::new(self.device);
        for (name, t) in self.parameters()? {
            // VarStore names cannot hold dots.
            let _ = vs.root().add(&name.replace('.', "_"), t, true);
        }
        let copy_all = |pairs: &mut dyn Iterator<Item = (&Tensor, Tensor)>| -> Result<()> {
            tch::no_grad(|| -> Result<()> {
                for (dst, src) in pairs {
                    dst.shallow_clone().f_copy_(&src)?;
                }
                Ok(())
            })
        };
        if let Some(dp) = dp.as_deref_mut() {
            // Same settings and parameters everywhere, then rank 0's state everywhere.
            let layers: Vec<&str> = self.rewritten.iter().map(|l| l.name.as_str()).collect();
            // The data's size and shape too: different counts would give different step counts.
            let setup = format!(
                "{config:?} {} shadows, layers {layers:?}, images {:?}",
                shadows.len(),
                images.size()
            );
            dp.check_same_setup(&vs, &setup)?;
            dp.broadcast_variables(&vs)?;
            let shadow_list: Vec<&Tensor> = shadows.iter().map(|(_, s, _)| s).collect();
            self.broadcast_buffers(dp, &shadow_list)?;
        }
        let (rank, world) = dp.as_deref().map_or((0, 1), |d| d.rank_and_size());
        // Under data parallelism every share holds at least two samples (BatchNorm in training
        // needs two): smaller global batches are refused, a smaller last batch is skipped.
        let least = if world > 1 { 2 * world } else { 1 };
        if config.batch_size < least {
            return Err(Error::Argument {
                what: "fine-tuning batch size (the global batch, over all ranks)",
                value: config.batch_size as f64,
                expected: "at least twice the number of ranks",
            });
        }
        let mut opt = nn::Adam::default().build(&vs, config.lr)?;
        // Alphas stay at least the floor the forward uses, so the stored value is in effect.
        let floors = StateFloors::new(self.parameters()?);
        self.module.f_set_train()?;
        tch::manual_seed(config.seed);
        let result = (|| -> Result<()> {
            for epoch in 1..=config.epochs {
                // Every random number of the epoch is drawn here, in order, so that making the
                // batches on the producer thread changes nothing in the results.
                let mut order = Tensor::f_randperm(n, (Kind::Int64, Device::Cpu))?;
                let pad = config.augment_pad;
                let mut draws = if pad > 0 { Some(crate::data::crop_flip_draws(n, pad)?) } else { None };
                if let Some(dp) = dp.as_deref_mut() {
                    // Rank 0's draws everywhere: dropout may move the ranks' generators apart
                    // (it draws in proportion to each rank's share).
                    dp.group().broadcast_(&mut order, 0)?;
                    if let Some((offsets, flips)) = draws.as_mut() {
                        dp.group().broadcast_(offsets, 0)?;
                        dp.group().broadcast_(flips, 0)?;
                    }
                }
                let batch = config.batch_size.max(1);
                let (images, labels, device) = (images.shallow_clone(), labels.shallow_clone(), self.device);
                let make = move |i: usize| -> Result<(Tensor, Tensor, i64)> {
                    let start = i as i64 * batch;
                    let len = batch.min(n - start);
                    // This rank's contiguous share of the global batch (all of it on one process).
                    let (from, to) = (start + len * rank / world, start + len * (rank + 1) / world);
                    let idx = order.f_narrow(0, from, to - from)?;
                    let mut x = images.f_index_select(0, &idx)?;
                    if let Some((offsets, flips)) = &draws {
                        let (o, f) =
                            (offsets.f_narrow(0, from, to - from)?, flips.f_narrow(0, from, to - from)?);
                        x = crate::data::crop_flip(&x, pad, &o, &f)?;
                    }
                    Ok((x.f_to_device(device)?, labels.f_index_select(0, &idx)?.f_to_device(device)?, len))
                };
                // Every rank alike skips a last batch whose shares would hold fewer than two.
                let steps = (n / batch) as usize + usize::from(n % batch >= least);
                crate::data::prefetched(steps, 2, make, |(x, y, global)| {
                    let quantized: Vec<Tensor> =
                        shadows.iter().map(|(_, s, q)| q.f_fake_quantize(s)).collect::<Result<_>>()?;
                    copy_all(&mut shadows.iter().map(|(w, _, _)| w).zip(quantized))?;
                    let loss = self.logits(&x)?.f_cross_entropy_loss::<Tensor>(
                        &y,
                        None,
                        tch::Reduction::Mean,
                        -100,
                        0.0,
                    )?;
                    let mut value = loss.f_double_value(&[])?;
                    if let Some(dp) = dp.as_deref_mut() {
                        // Every rank decides on the same value, or one would stop alone.
                        let mut t = Tensor::f_from_slice(&[value * x.size()[0] as f64 / global as f64])?;
                        dp.group().allreduce_(&mut t, ReduceOp::Sum)?;
                        value = t.f_double_value(&[0])?;
                    }
                    if !value.is_finite() {
                        return Err(diverged(epoch, format!("loss {value}")));
                    }
                    opt.zero_grad();
                    match dp.as_deref_mut() {
                        // The gradient of the mean loss over the global batch, on every rank.
                        Some(dp) => dp.backward(&vs, &loss, x.size()[0], global)?,
                        None => loss.f_backward()?,
                    }
                    // The straight-through step: the gradient of the quantized weights updates the shadows.
                    copy_all(&mut shadows.iter().map(|(w, s, _)| (w, s.shallow_clone())))?;
                    opt.step();
                    floors.raise()?;
                    copy_all(&mut shadows.iter().map(|(w, s, _)| (s, w.shallow_clone())))?;
                    Ok(())
                })?;
                if let Some(dp) = dp.as_deref_mut() {
                    // Each rank's statistics saw its shares: rank 0's, everywhere.
                    self.broadcast_buffers(dp, &[])?;
                }
                for (name, t) in self.parameters()? {
                    if t.f_isfinite()?.f_all()?.f_int64_value(&[])? == 0 {
                        return Err(diverged(epoch, format!("{name} holds non-finite values")));
                    }
                }
            }
            Ok(())
        })();
        opt.zero_grad();
        self.module.f_set_eval()?;
        if result.is_err() {
            copy_all(&mut snapshot.iter().map(|(saved, t)| (t, saved.shallow_clone())))?;
        }
        result
    }
}
