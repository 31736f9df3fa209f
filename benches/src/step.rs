//! The training step the benchmarks time: `flava_train::Trainer::step` with the training
//! optimizer, over a pretraining batch already on the device (the benches' fixed inputs).

use std::cell::Cell;
use std::time::Instant;

use burn::optim::GradientsParams;
use burn::prelude::*;
use flava_objectives::{FlavaForPretraining, PretrainingBatch, StepOptions};
use flava_train::trainer::{Computed, Objective, Trainer, TrainerConfig};

/// The pretraining objective on a batch already on the device (the bench's fixed inputs), with
/// its forward and backward times recorded: `Trainer::step` adds the training optimizer.
pub struct Timed {
    device: Device,
    /// The last forward's milliseconds.
    pub forward_ms: Cell<f64>,
    /// The last backward's milliseconds.
    pub backward_ms: Cell<f64>,
}

impl Objective for Timed {
    type Model = FlavaForPretraining;
    type Batch = PretrainingBatch;

    fn compute(
        &mut self,
        m: &FlavaForPretraining,
        batch: &PretrainingBatch,
        _: usize,
        _: usize,
    ) -> anyhow::Result<Computed> {
        // Each phase ends with its results computed (flex runs eagerly; reading the loss waits
        // for the forward pass).
        let t = Instant::now();
        let out = m.forward(batch, &StepOptions::default())?;
        let total = out.total.ok_or_else(|| anyhow::anyhow!("the batch has no loss"))?;
        let loss = total.clone().into_scalar::<f64>();
        self.forward_ms.set(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let grads = GradientsParams::from_grads(total.backward(), m);
        self.device
            .sync()
            .map_err(|e| anyhow::anyhow!("device execution failed: {e:?}"))?;
        self.backward_ms.set(t.elapsed().as_secs_f64() * 1e3);
        Ok(Computed {
            loss,
            terms: vec![],
            grads: Some(grads),
        })
    }

    fn task(&self, _: &PretrainingBatch) -> String {
        "bench".into()
    }

    fn samples(&self, b: &PretrainingBatch) -> usize {
        b.pixel_values
            .as_ref()
            .map(|p| p.dims()[0])
            .or(b.input_ids.as_ref().map(|i| i.dims()[0]))
            .unwrap_or(0)
    }

    fn after_update(&self, model: FlavaForPretraining) -> FlavaForPretraining {
        model.clamp_logit_scale_param()
    }
}

/// A trainer over `model` as `flava pretrain` configures its optimizer (AdamW, decoupled decay on
/// the decayed group only, global-norm clipping at 1) at a constant learning rate of 1e-4.
pub fn training_step(model: FlavaForPretraining, device: &Device) -> Trainer<Timed> {
    Trainer::new(
        model,
        Timed {
            device: device.clone(),
            forward_ms: Cell::new(0.0),
            backward_ms: Cell::new(0.0),
        },
        TrainerConfig {
            optimizer: flava_train::OptimizerConfig {
                lr: 1e-4,
                min_lr_ratio: 1.0,
                ..Default::default()
            },
            steps: usize::MAX,
            max_nonfinite: usize::MAX,
        },
    )
}
