//! The one optimizer of the workspace (pretraining, the dVAE, fine-tuning, the benchmarks):
//! Burn's AdamW with PyTorch's defaults made explicit, parameter groups (no decay on norms,
//! biases, tokens, positions and the logit scale; frozen towers not updated), PyTorch-style
//! decoupled weight decay, global gradient-norm clipping, and linear warmup then cosine decay
//! to a configurable floor.

use std::collections::HashSet;
use std::path::Path;

use burn::module::{Module, ModuleVisitor, Param, ParamGroup, ParamId};
use burn::optim::{GradientsParams, ModuleOptimizer};

use crate::adamw::{FusedAdamW, GradScale};
use burn::prelude::*;
use flava_fusion::Tower;
use serde::{Deserialize, Serialize};

/// AdamW settings and the learning-rate schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup: usize,
    /// The cosine decay ends at `lr · min_lr_ratio`.
    pub min_lr_ratio: f64,
    /// Decoupled weight decay (PyTorch AdamW's), on the decayed group only.
    pub weight_decay: f64,
    /// AdamW betas.
    pub betas: (f64, f64),
    /// AdamW epsilon.
    pub eps: f64,
    /// Global gradient-norm clipping (0 = off).
    pub grad_clip: f64,
    /// Towers not updated at all (`image`, `text`, `multimodal`: the `{tower}_model` module wherever it sits).
    pub freeze: Vec<Tower>,
}

impl Default for OptimizerConfig {
    /// PyTorch's AdamW defaults (betas 0.9/0.999, eps 1e-8, weight decay 0.01), clipping at 1.
    fn default() -> Self {
        Self {
            lr: 1e-3,
            warmup: 0,
            min_lr_ratio: 0.0,
            weight_decay: 0.01,
            betas: (0.9, 0.999),
            eps: 1e-8,
            grad_clip: 1.0,
            freeze: vec![],
        }
    }
}

impl OptimizerConfig {
    /// The learning rate of update `step` (from 0): linear warmup over `warmup` steps, then
    /// cosine decay over `progress` ∈ [0, 1] to `lr · min_lr_ratio`.
    pub fn lr_at(&self, step: usize, progress: f64) -> f64 {
        if self.warmup > 0 && step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * progress.clamp(0.0, 1.0)).cos());
        self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cos)
    }

    /// The schedule's progress at `step` of `total`: the share of the post-warmup steps done.
    pub fn progress(&self, step: usize, total: usize) -> f64 {
        let span = total.saturating_sub(self.warmup).max(1);
        ((step - self.warmup.min(step)) as f64 / span as f64).min(1.0)
    }
}

/// What one update did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateStats {
    /// The learning rate used.
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
}

/// AdamW over parameter groups, with clipping and decoupled decay.
pub struct Optimizer {
    cfg: OptimizerConfig,
    adam: ModuleOptimizer,
    groups: ParamGroups,
    scale: GradScale,
}

impl Optimizer {
    /// An optimizer for `module`'s parameters (groups found from the module paths).
    pub fn new<M: Module>(cfg: &OptimizerConfig, module: &M) -> Self {
        let groups = ParamGroups::of(module, &cfg.freeze);
        let scale = GradScale::default();
        Self {
            adam: Self::adam(cfg, &groups, &scale),
            groups,
            cfg: cfg.clone(),
            scale,
        }
    }

    /// Two AdamWs sharing the clipping scale: the decayed group's and the rest's. The clipping
    /// scale and the decay are applied inside each parameter's one-pass update on flex.
    fn adam(cfg: &OptimizerConfig, groups: &ParamGroups, scale: &GradScale) -> ModuleOptimizer {
        let adamw = |wd: f64| {
            FusedAdamW::new(
                cfg.betas.0 as f32,
                cfg.betas.1 as f32,
                cfg.eps as f32,
                wd,
                scale.clone(),
            )
        };
        let decayed = ParamGroup::from_ids(groups.decay.iter().copied().collect());
        ModuleOptimizer::from(adamw(0.0)).with_group(decayed, adamw(cfg.weight_decay), None)
    }

    /// Finds the groups again (a loaded record brings its own parameter ids); the Adam moments
    /// are kept and each goes to its parameter's group.
    pub fn regroup<M: Module>(&mut self, module: &M) {
        self.groups = ParamGroups::of(module, &self.cfg.freeze);
        let record = self.adam.to_record();
        self.adam = Self::adam(&self.cfg, &self.groups, &self.scale).load_record(record);
    }

    /// The settings.
    pub fn config(&self) -> &OptimizerConfig {
        &self.cfg
    }

    /// The parameter groups.
    pub fn groups(&self) -> &ParamGroups {
        &self.groups
    }

    /// One update at learning rate `lr`: frozen gradients dropped, the rest clipped to the
    /// global norm, decoupled decay on the decayed group, then the Adam step (the last three in
    /// one pass per parameter, see [`FusedAdamW`]).
    pub fn update<M: Module>(&mut self, module: M, mut grads: GradientsParams, lr: f64) -> (M, UpdateStats) {
        // The norm over every gradient, frozen ones too (as `clip_and_filter`).
        let grad_norm = clip_and_filter(&module, &mut grads, 0.0, &self.groups.frozen);
        self.scale.set(clip_factor(grad_norm, self.cfg.grad_clip));
        let module = self.adam.step(lr, module, grads);
        self.scale.set(1.0);
        (module, UpdateStats { lr, grad_norm })
    }

    /// Saves the Adam moments to `path` (Burn's record format; the extension is added).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        self.adam
            .save(path)
            .map_err(|e| anyhow::anyhow!("saving the optimizer to {}: {e}", path.display()))
    }

    /// Loads the Adam moments saved by [`Optimizer::save`].
    pub fn load(&mut self, path: &Path) -> anyhow::Result<()> {
        let fresh = Self::adam(&self.cfg, &self.groups, &self.scale);
        self.adam = fresh
            .load(path)
            .map_err(|e| anyhow::anyhow!("loading the optimizer of {}: {e}", path.display()))?;
        Ok(())
    }
}

/// Parameter sets by role, found once from the module paths.
#[derive(Debug, Clone, Default)]
pub struct ParamGroups {
    /// Parameters that get weight decay.
    pub decay: HashSet<ParamId>,
    /// Parameters of frozen towers (no update at all).
    pub frozen: HashSet<ParamId>,
    /// Number of float parameters (tensors) and scalars in total.
    pub tensors: usize,
    /// Number of trainable scalars.
    pub trainable: usize,
}

struct Grouper<'a> {
    path: Vec<String>,
    freeze: &'a [Tower],
    groups: ParamGroups,
}

/// No decay on biases, LayerNorms, CLS/mask tokens, position embeddings and the logit scale
/// (the usual BERT/ViT exclusions; the paper's recipe does not list them).
pub fn no_decay(path: &str) -> bool {
    let last = path.rsplit('.').next().unwrap_or(path);
    last == "bias"
        || last == "beta"
        || last == "gamma"
        || path.contains("layer_norm")
        || path.contains("layernorm")
        || path.contains("cls_token")
        || path.contains("mask_token")
        || path.contains("position_embeddings")
        || path.ends_with("logit_scale")
}

impl ModuleVisitor for Grouper<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path = self.path.join(".");
        self.groups.tensors += 1;
        // A tower is a module of that name anywhere on the path (`flava.image_model.…` in
        // pretraining, `backbone.image_model.…` in a task model).
        let frozen = self
            .freeze
            .iter()
            .any(|t| self.path.iter().any(|p| p == t.module_name()));
        if frozen {
            self.groups.frozen.insert(param.id);
            return;
        }
        self.groups.trainable += param.shape().num_elements();
        if !no_decay(&path) {
            self.groups.decay.insert(param.id);
        }
    }
}

impl ParamGroups {
    /// Groups the parameters of `module`; `freeze` lists towers (`image`, `text`, `multimodal`).
    pub fn of<M: Module>(module: &M, freeze: &[Tower]) -> Self {
        let mut g = Grouper {
            path: vec![],
            freeze,
            groups: ParamGroups::default(),
        };
        module.visit(&mut g);
        g.groups
    }
}

struct GradNorm<'a> {
    grads: &'a GradientsParams,
    /// Flex gradients: one read pass each, summed in f64.
    cpu: f64,
    /// Other devices: summed on the device, read once at the end.
    device: Option<Tensor<1>>,
}

impl ModuleVisitor for GradNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            if flava_vit::kernels::on_flex_f32(&g) {
                self.cpu += flava_vit::kernels::sum_of_squares(&g);
            } else {
                let s = g.square().sum();
                self.device = Some(match self.device.take() {
                    Some(acc) => acc + s,
                    None => s,
                });
            }
        }
    }
}

struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
    drop: &'a HashSet<ParamId>,
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            if !self.drop.contains(&param.id) {
                let g = if self.factor == 1.0 { g } else { g * self.factor };
                self.grads.register(param.id, g);
            }
        }
    }
}

/// Global L2 norm of all gradients (summed in f64 on flex; one device sync elsewhere). 0 when
/// there are none.
pub fn grad_norm<M: Module>(module: &M, grads: &GradientsParams) -> f64 {
    let mut v = GradNorm {
        grads,
        cpu: 0.0,
        device: None,
    };
    module.visit(&mut v);
    let device = v.device.map_or(0.0, |s| s.into_scalar::<f64>());
    (v.cpu + device).sqrt()
}

/// Drops gradients of frozen parameters and scales the rest so that their global norm is at
/// most `max_norm` (as `torch.nn.utils.clip_grad_norm_`, factor `max_norm / (norm + 1e-6)`).
/// Returns the norm before clipping.
pub fn clip_and_filter<M: Module>(
    module: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
    frozen: &HashSet<ParamId>,
) -> f64 {
    let norm = grad_norm(module, grads);
    let factor = clip_factor(norm, max_norm);
    if factor != 1.0 || !frozen.is_empty() {
        let mut s = Scale {
            grads,
            factor,
            drop: frozen,
        };
        module.visit(&mut s);
    }
    norm
}

/// `torch.nn.utils.clip_grad_norm_`'s factor: `max_norm / (norm + 1e-6)` when the norm is above
/// `max_norm` (> 0), else 1.
pub fn clip_factor(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Linear warmup from 0 to `peak` over `warmup` steps, then cosine decay to `peak·min_ratio` at
/// `total`. `step` counts from 0 (the learning rate of the first update is `peak/warmup`).
pub fn learning_rate(step: usize, total: usize, warmup: usize, peak: f64, min_ratio: f64) -> f64 {
    let cfg = OptimizerConfig {
        lr: peak,
        warmup,
        min_lr_ratio: min_ratio,
        ..Default::default()
    };
    cfg.lr_at(step, cfg.progress(step, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let lr = |s| learning_rate(s, 110, 10, 1e-3, 0.1);
        assert!((lr(0) - 1e-4).abs() < 1e-12);
        assert!((lr(9) - 1e-3).abs() < 1e-12);
        assert!((lr(10) - 1e-3).abs() < 1e-12);
        assert!((lr(60) - 1e-3 * (0.1 + 0.9 * 0.5)).abs() < 1e-12);
        assert!((lr(110) - 1e-4).abs() < 1e-12);
        assert!((1..110).all(|s| lr(s) <= 1e-3 + 1e-15));
    }

    #[test]
    fn decay_exclusions() {
        for p in [
            "flava.image_model.encoder.layer.0.attention.attention.query.bias",
            "flava.text_model.embeddings.layer_norm.gamma",
            "flava.image_model.embeddings.cls_token",
            "flava.image_model.embeddings.position_embeddings",
            "flava.logit_scale",
            "mlm_head.transform.layer_norm.beta",
        ] {
            assert!(no_decay(p), "{p}");
        }
        for p in [
            "flava.image_model.encoder.layer.0.attention.attention.query.weight",
            "flava.text_model.embeddings.word_embeddings.weight",
            "mim_head.decoder.weight",
        ] {
            assert!(!no_decay(p), "{p}");
        }
    }

    #[test]
    fn clipping_matches_the_global_norm() {
        let device = Device::flex().autodiff();
        let lin = burn::nn::LinearConfig::new(3, 2).init(&device);
        let x = Tensor::<2>::from_floats([[1.0, 2.0, 3.0]], &device);
        let loss = lin.forward(x).sum() * 10.0;
        let mut grads = GradientsParams::from_grads(loss.backward(), &lin);
        // d/dW = 10·x for each output column, d/db = 10: norm = 10·sqrt(2·14 + 2).
        let want = 10.0 * (2.0f64 * 14.0 + 2.0).sqrt();
        let norm = clip_and_filter(&lin, &mut grads, 1.0, &HashSet::new());
        assert!((norm - want).abs() < 1e-3, "{norm} vs {want}");
        let after = grad_norm(&lin, &grads);
        assert!((after - 1.0).abs() < 1e-4, "{after}");
    }

    #[derive(Module, Debug)]
    struct TwoLayers {
        used: burn::nn::Linear,
        unused: burn::nn::Linear,
    }

    /// A decayed weight without a gradient this step (a tower the batch did not reach) is left
    /// alone, as PyTorch's AdamW skips parameters whose `grad` is None; the weight with one is
    /// decayed by exactly (1 − lr·wd) before Adam's step (checked with Adam's step known: the
    /// first step moves every element by lr·sign(g), up to eps).
    #[test]
    fn only_parameters_with_gradients_are_decayed() {
        let device = Device::flex().autodiff();
        let model = TwoLayers {
            used: burn::nn::LinearConfig::new(3, 2).init(&device),
            unused: burn::nn::LinearConfig::new(3, 2).init(&device),
        };
        let w = |l: &burn::nn::Linear| l.weight.val().into_data().try_into_vec::<f32>().unwrap();
        let (used_before, unused_before) = (w(&model.used), w(&model.unused));
        let x = Tensor::<2>::from_floats([[1.0, 2.0, 3.0]], &device);
        let grads = GradientsParams::from_grads(model.used.forward(x).sum().backward(), &model);
        let cfg = OptimizerConfig {
            lr: 0.1,
            weight_decay: 0.5,
            grad_clip: 0.0,
            ..Default::default()
        };
        let mut opt = Optimizer::new(&cfg, &model);
        let (model, _) = opt.update(model, grads, 0.1);
        assert_eq!(
            w(&model.unused),
            unused_before,
            "no gradient: neither decayed nor stepped"
        );
        // The gradient of every weight element is x > 0: Adam's first step is −lr.
        for (a, b) in w(&model.used).iter().zip(&used_before) {
            let want = b * (1.0 - 0.1 * 0.5) - 0.1;
            assert!((a - want).abs() < 1e-5, "{a} vs {want}");
        }
    }
}
