//! The training loop's core, shared by pretraining, the dVAE and fine-tuning: a [`Trainer`]
//! owns a model, its [`Objective`] (what a batch's losses and gradients are), the workspace's
//! [`Optimizer`], the step counter and the non-finite guard. `step(&batch)` computes the
//! gradients (how, is the objective's [`Strategy`]), checks the loss, updates and returns the
//! step's [`StepMetrics`]. Checkpoints, data and metrics files are the caller's (a
//! [`crate::run_dir::RunDir`]); progress and fault injection go through an [`Observer`].

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::observer::{Observer, StepMetrics};
use crate::optim::{Optimizer, OptimizerConfig};

/// How a step's gradients are computed; each gives the same gradients as one pass over the
/// whole batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Strategy {
    /// One forward and backward over the batch.
    #[default]
    Single,
    /// The batch split into `k` micro-batches, gradients summed (memory of one micro-batch).
    Accumulate(usize),
    /// Micro-batches spread over the devices of this process (the first is the main one),
    /// `accumulate` micro-batches per device.
    DataParallel {
        /// The devices; replicas of the model run on the others.
        devices: Vec<Device>,
        /// Micro-batches per device per step.
        accumulate: usize,
    },
    /// One rank of a job over several processes ([`crate::distributed`]): the batch given to
    /// the step is this rank's rows of the global batch (rank order), split into micro-batches
    /// over `devices` as in `DataParallel`; contrastive features, batch counts and losses are
    /// all-gathered and the gradients all-reduced, so every rank takes the same update.
    Distributed {
        /// The ranks.
        group: crate::distributed::Group,
        /// This rank's devices (the first is its main one).
        devices: Vec<Device>,
        /// Micro-batches per device per step.
        accumulate: usize,
    },
}

impl Strategy {
    /// Micro-batches per step in this process.
    pub fn micro_batches(&self) -> usize {
        match self {
            Strategy::Single => 1,
            Strategy::Accumulate(k) => (*k).max(1),
            Strategy::DataParallel { devices, accumulate }
            | Strategy::Distributed {
                devices, accumulate, ..
            } => devices.len().max(1) * (*accumulate).max(1),
        }
    }
}

/// A batch's losses and gradients.
#[derive(Debug)]
pub struct Computed {
    /// The total loss.
    pub loss: f64,
    /// Each term and other numbers worth logging, by name.
    pub terms: Vec<(String, f64)>,
    /// The gradients; `None` when the batch had nothing to learn (or the loss is not finite).
    pub grads: Option<GradientsParams>,
}

impl Computed {
    /// The loss's value and, when it is finite, the gradients of `model`'s parameters from
    /// one backward pass (a non-finite loss is left to the trainer's guard, never backpropagated).
    pub fn backward<M: Module>(loss: Tensor<1>, model: &M, terms: Vec<(String, f64)>) -> Self {
        let v = loss.clone().into_scalar::<f64>();
        let grads = v
            .is_finite()
            .then(|| GradientsParams::from_grads(loss.backward(), model));
        Self { loss: v, terms, grads }
    }
}

/// What a model learns from a batch.
pub trait Objective {
    /// The model being trained (on an autodiff device).
    type Model: Module + Clone;
    /// One step's input.
    type Batch;

    /// The losses and gradients of `batch` for update `step` (from 0) of `total`.
    fn compute(
        &mut self,
        model: &Self::Model,
        batch: &Self::Batch,
        step: usize,
        total: usize,
    ) -> anyhow::Result<Computed>;

    /// The batch's kind, for metrics (`pairs`, `images`, `text`, `dvae`, …).
    fn task(&self, batch: &Self::Batch) -> String;

    /// Samples in the batch.
    fn samples(&self, batch: &Self::Batch) -> usize;

    /// Applied to the model after each update (e.g. clamping the logit scale).
    fn after_update(&self, model: Self::Model) -> Self::Model {
        model
    }

    /// Numbers read from the model after the update, logged with the step.
    fn report(&self, _model: &Self::Model) -> Vec<(String, f64)> {
        vec![]
    }

    /// The schedule's progress at `step`, when it is not the share of steps done (the dVAE's
    /// follows its time limit too).
    fn progress(&self, _step: usize, _total: usize) -> Option<f64> {
        None
    }
}

/// The trainer's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerConfig {
    /// The optimizer and schedule.
    pub optimizer: OptimizerConfig,
    /// Updates the schedule spans.
    pub steps: usize,
    /// Non-finite losses in a row after which [`Trainer::too_many_nonfinite`] says stop.
    pub max_nonfinite: usize,
}

/// The counters a checkpoint keeps beside the model and optimizer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Updates done.
    pub step: usize,
    /// Non-finite losses skipped so far.
    pub nonfinite_total: usize,
    /// Non-finite losses in a row at the end.
    pub nonfinite_consecutive: usize,
}

/// A model, its objective and optimizer, and where training stands.
pub struct Trainer<O: Objective> {
    // `None` only while the optimizer holds it: a model handed over, not cloned, leaves every
    // parameter's buffer unshared, so the update is done in place (a clone made it copy each one).
    model: Option<O::Model>,
    /// The objective (public: a run may adjust it between steps).
    pub objective: O,
    optimizer: Optimizer,
    cfg: TrainerConfig,
    /// Where training stands.
    pub counters: Counters,
}

impl<O: Objective> Trainer<O> {
    /// A trainer at step 0.
    pub fn new(model: O::Model, objective: O, cfg: TrainerConfig) -> Self {
        let optimizer = Optimizer::new(&cfg.optimizer, &model);
        Self {
            model: Some(model),
            objective,
            optimizer,
            cfg,
            counters: Counters::default(),
        }
    }

    /// The model.
    pub fn model(&self) -> &O::Model {
        self.model.as_ref().expect("the trainer holds its model between steps")
    }

    /// The model, by value (training ends).
    pub fn into_model(self) -> O::Model {
        self.model.expect("the trainer holds its model between steps")
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    /// The settings.
    pub fn config(&self) -> &TrainerConfig {
        &self.cfg
    }

    /// Updates done.
    pub fn step_count(&self) -> usize {
        self.counters.step
    }

    /// The learning rate of the next update.
    pub fn next_lr(&self) -> f64 {
        let (step, total) = (self.counters.step, self.cfg.steps);
        let o = &self.cfg.optimizer;
        let progress = self
            .objective
            .progress(step, total)
            .unwrap_or_else(|| o.progress(step, total));
        o.lr_at(step, progress)
    }

    /// Whether the non-finite guard says stop (`max_nonfinite` in a row).
    pub fn too_many_nonfinite(&self) -> bool {
        self.counters.nonfinite_consecutive >= self.cfg.max_nonfinite.max(1)
    }

    /// One training step on `batch`. A non-finite loss skips the update (counted; a message
    /// goes to the observer); a batch with nothing to learn is skipped too. Either way the
    /// step counter does not move and `updated` is false.
    pub fn step(&mut self, batch: &O::Batch, observer: &mut dyn Observer) -> anyhow::Result<StepMetrics> {
        let t0 = Instant::now();
        let lr = self.next_lr();
        let step = self.counters.step;
        let model = self.model.as_ref().expect("the trainer holds its model between steps");
        let c = self.objective.compute(model, batch, step, self.cfg.steps)?;
        let loss = observer.inspect_loss(step + 1, c.loss);
        let task = self.objective.task(batch);
        let mut m = StepMetrics {
            step: step + 1,
            task: task.clone(),
            loss,
            terms: c.terms,
            lr,
            grad_norm: 0.0,
            samples: self.objective.samples(batch),
            step_time_s: 0.0,
            updated: false,
        };
        let grads = match c.grads {
            Some(g) if loss.is_finite() => g,
            _ => {
                if !loss.is_finite() {
                    self.counters.nonfinite_total += 1;
                    self.counters.nonfinite_consecutive += 1;
                    observer.on_message(&format!(
                        "warning: non-finite loss at step {} ({task} batch); skipped ({} in a row, {} in total)",
                        step + 1,
                        self.counters.nonfinite_consecutive,
                        self.counters.nonfinite_total
                    ));
                }
                m.step_time_s = t0.elapsed().as_secs_f64();
                observer.on_step(&m);
                return Ok(m);
            }
        };
        self.counters.nonfinite_consecutive = 0;
        let model = self.model.take().expect("the trainer holds its model between steps");
        let (model, stats) = self.optimizer.update(model, grads, lr);
        self.model = Some(self.objective.after_update(model));
        self.counters.step += 1;
        m.grad_norm = stats.grad_norm;
        m.terms.extend(self.objective.report(self.model()));
        m.updated = true;
        m.step_time_s = t0.elapsed().as_secs_f64();
        observer.on_step(&m);
        Ok(m)
    }

    /// Writes the model (`model.bpk`) and optimizer (`optim.bpk`) records into `dir`.
    pub fn save_records(&self, dir: &Path) -> anyhow::Result<()> {
        self.model()
            .clone()
            .save_file(dir.join("model"))
            .map_err(|e| anyhow::anyhow!("saving the model: {e}"))?;
        self.optimizer.save(&dir.join("optim"))
    }

    /// Loads what [`Trainer::save_records`] wrote, and the counters of that checkpoint.
    pub fn load_records(&mut self, dir: &Path, counters: Counters) -> anyhow::Result<()> {
        let model = self
            .model()
            .clone()
            .try_load_file(dir.join("model"))
            .with_context(|| format!("loading the model of {}", dir.display()))?;
        self.optimizer.load(&dir.join("optim"))?;
        // The record brings its own parameter ids: the groups are found again.
        self.optimizer.regroup(&model);
        self.model = Some(model);
        self.counters = counters;
        Ok(())
    }

    /// Replaces the model (same structure; e.g. weights changed outside the trainer).
    pub fn set_model(&mut self, model: O::Model) {
        self.optimizer.regroup(&model);
        self.model = Some(model);
    }
}
