//! What the optimizer needs beyond Burn's AdamW: PyTorch-style decoupled weight decay on chosen
//! parameters only, global gradient-norm clipping, frozen towers, and the learning-rate schedule.

use std::collections::HashSet;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;

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
    freeze: &'a [String],
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
        let tower = |t: &str| path.starts_with(&format!("flava.{t}_model"));
        let frozen = self.freeze.iter().any(|f| tower(f));
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
    pub fn of<M: Module>(module: &M, freeze: &[String]) -> Self {
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
    sum: Option<Tensor<1>>,
}

impl ModuleVisitor for GradNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.get::<D>(param.id) {
            let s = g.square().sum();
            self.sum = Some(match self.sum.take() {
                Some(acc) => acc + s,
                None => s,
            });
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

/// Global L2 norm of all gradients (one device sync). 0 when there are none.
pub fn grad_norm<M: Module>(module: &M, grads: &GradientsParams) -> f64 {
    let mut v = GradNorm { grads, sum: None };
    module.visit(&mut v);
    v.sum.map_or(0.0, |s| s.into_scalar::<f64>().sqrt())
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
    let factor = if max_norm > 0.0 && norm > max_norm {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    };
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

struct Decay<'a> {
    ids: &'a HashSet<ParamId>,
    factor: f64,
}

impl ModuleMapper for Decay<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if !self.ids.contains(&param.id) {
            return param;
        }
        let factor = self.factor;
        param.map(|t| {
            let rg = t.is_require_grad();
            let t = (t * factor).detach();
            if rg {
                t.require_grad()
            } else {
                t
            }
        })
    }
}

/// PyTorch AdamW's decoupled decay, `θ ← θ·(1 − lr·wd)`, on the decayed parameters (run
/// before the Adam update, as PyTorch does).
pub fn apply_weight_decay<M: Module>(module: M, groups: &ParamGroups, lr: f64, weight_decay: f64) -> M {
    if weight_decay == 0.0 || lr == 0.0 {
        return module;
    }
    module.map(&mut Decay {
        ids: &groups.decay,
        factor: 1.0 - lr * weight_decay,
    })
}

/// Linear warmup from 0 to `peak` over `warmup` steps, then cosine decay to `peak·min_ratio` at
/// `total`. `step` counts from 0 (the learning rate of the first update is `peak/warmup`).
pub fn learning_rate(step: usize, total: usize, warmup: usize, peak: f64, min_ratio: f64) -> f64 {
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let t = ((step - warmup.min(step)) as f64 / span as f64).min(1.0);
    let cos = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
    peak * (min_ratio + (1.0 - min_ratio) * cos)
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
}
