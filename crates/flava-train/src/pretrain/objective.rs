//! FLAVA pretraining as a [`crate::trainer::Objective`]: a host batch (pairs, images or text)
//! in, the six losses (those the batch has) and their gradients out, by the step strategy: one
//! pass, contrastive-exact accumulation over micro-batches, data parallelism over devices, or
//! one rank's share of a job over processes.

use burn::module::Module;
use burn::prelude::*;
use flava_data::batch::HostBatch;
use flava_data::task::Task;
use flava_dvae::ImageCodebook;
use flava_objectives::{
    accumulate_gradients, distributed_gradients, FlavaForPretraining, MlmTargets, PretrainingBatch, ProcessGroup,
    Replica, SingleProcess, StepOptions,
};

use crate::trainer::{Computed, Objective, Strategy};

/// A host batch as model inputs on `device`.
pub fn to_pretraining(h: &HostBatch, device: &Device) -> PretrainingBatch {
    let f = h.to_device(device);
    let has_text = !h.input_ids.is_empty();
    PretrainingBatch {
        pixel_values: f.pixel_values,
        bool_masked_pos: f.bool_masked_pos,
        codebook_pixel_values: f.codebook_pixel_values,
        mim_targets: None,
        input_ids: f.input_ids,
        input_ids_masked: f.input_ids_masked,
        attention_mask: f.attention_mask,
        token_type_ids: None,
        mlm: has_text.then(|| MlmTargets {
            positions: h.mlm_positions.clone(),
            targets: h.mlm_targets.iter().map(|&t| t as usize).collect(),
        }),
        itm_labels: (h.task == Task::Pairs).then(|| h.itm_labels.iter().map(|&t| t as usize).collect()),
    }
}

/// The pretraining objective: the frozen codebook (MIM targets) and the step strategy.
pub struct Pretraining {
    codebook: ImageCodebook,
    /// The codebook on each further data-parallel device.
    replica_codebooks: Vec<ImageCodebook>,
    strategy: Strategy,
    device: Device,
}

impl Pretraining {
    /// The objective on `device` (the main one; autodiff is added here) with `strategy`.
    pub fn new(codebook: ImageCodebook, strategy: Strategy, device: &Device) -> Self {
        let replica_codebooks = match &strategy {
            Strategy::DataParallel { devices, .. } | Strategy::Distributed { devices, .. } => {
                devices.iter().skip(1).map(|d| codebook.clone().fork(d)).collect()
            }
            _ => vec![],
        };
        Self {
            codebook,
            replica_codebooks,
            strategy,
            device: device.clone().autodiff(),
        }
    }

    /// The frozen codebook.
    pub fn codebook(&self) -> &ImageCodebook {
        &self.codebook
    }

    /// The step strategy.
    pub fn strategy(&self) -> &Strategy {
        &self.strategy
    }
}

impl Pretraining {
    /// This process's rows over its devices (`accumulate` micro-batches each), exchanged with
    /// the other ranks of `group`: [`distributed_gradients`].
    fn parallel(
        &self,
        group: &dyn ProcessGroup,
        devices: &[Device],
        accumulate: usize,
        model: &FlavaForPretraining,
        host: &HostBatch,
    ) -> anyhow::Result<Computed> {
        anyhow::ensure!(!devices.is_empty(), "a parallel step needs at least one device");
        let n = devices.len();
        let micro: Vec<PretrainingBatch> = host
            .split(accumulate.max(1) * n)
            .iter()
            .enumerate()
            .map(|(i, h)| to_pretraining(h, &devices[i % n].clone().autodiff()))
            .collect();
        // Replicas of this step's parameters on the other devices (same parameter ids).
        let forks: Vec<FlavaForPretraining> = devices[1..]
            .iter()
            .map(|d| model.clone().fork(&d.clone().autodiff()))
            .collect();
        let mut replicas = vec![Replica {
            model,
            codebook: Some(&self.codebook),
        }];
        replicas.extend(forks.iter().zip(&self.replica_codebooks).map(|(m, c)| Replica {
            model: m,
            codebook: Some(c),
        }));
        let s = distributed_gradients(group, &replicas, &micro)?;
        Ok(Computed {
            loss: s.total,
            terms: terms(s.losses),
            grads: Some(s.grads),
        })
    }
}

fn terms(losses: Vec<(&'static str, f64)>) -> Vec<(String, f64)> {
    losses.into_iter().map(|(n, v)| (n.to_string(), v)).collect()
}

impl Objective for Pretraining {
    type Model = FlavaForPretraining;
    type Batch = HostBatch;

    fn compute(
        &mut self,
        model: &FlavaForPretraining,
        host: &HostBatch,
        _step: usize,
        _total: usize,
    ) -> anyhow::Result<Computed> {
        match &self.strategy {
            Strategy::DataParallel { devices, accumulate } if devices.len() > 1 => {
                self.parallel(&SingleProcess, devices, *accumulate, model, host)
            }
            Strategy::Distributed {
                group,
                devices,
                accumulate,
            } => self.parallel(group.get(), devices, *accumulate, model, host),
            Strategy::Accumulate(k) if *k > 1 => {
                let micro: Vec<PretrainingBatch> =
                    host.split(*k).iter().map(|h| to_pretraining(h, &self.device)).collect();
                let s = accumulate_gradients(model, &micro, Some(&self.codebook))?;
                Ok(Computed {
                    loss: s.total,
                    terms: terms(s.losses),
                    grads: Some(s.grads),
                })
            }
            _ => {
                let batch = to_pretraining(host, &self.device);
                let o = model.forward(
                    &batch,
                    &StepOptions {
                        codebook: Some(&self.codebook),
                        ..Default::default()
                    },
                )?;
                let losses = terms(o.losses.values());
                Ok(match o.total {
                    Some(t) => Computed::backward(t, model, losses),
                    None => Computed {
                        loss: 0.0,
                        terms: losses,
                        grads: None,
                    },
                })
            }
        }
    }

    fn task(&self, batch: &HostBatch) -> String {
        batch.task.name().to_string()
    }

    fn samples(&self, batch: &HostBatch) -> usize {
        batch.batch_size
    }

    fn after_update(&self, model: FlavaForPretraining) -> FlavaForPretraining {
        model.clamp_logit_scale_param()
    }

    fn report(&self, model: &FlavaForPretraining) -> Vec<(String, f64)> {
        // The contrastive temperature's log (CLIP-style runs watch it grow).
        vec![("logit_scale".into(), model.flava.logit_scale.val().into_scalar::<f64>())]
    }
}
