//! Downstream task heads on a [`FlavaModel`]: torchmultimodal's classifier layout
//! (`Linear(d, 768) -> ReLU -> Dropout(0.5) -> Linear(768, C)`, checkpoint keys
//! `classifier.model.0.*` and `classifier.model.3.*`), fed by `last_hidden_state[:, 0]` of the
//! image encoder, the text encoder, or the multimodal encoder's own CLS (text padding masked in
//! fusion), and the task losses: cross-entropy on classes, binary cross-entropy on soft scores
//! (VQA), mean squared error (STS-B). A `hidden_size` of 0 gives a single `Linear(d, C)`
//! (`classifier.model.0.*`), the layout of a linear probe.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::prelude::*;
use flava_fusion::{FlavaConfig, FlavaInput, FlavaModel, Tower};
use flava_vit::encoder::{linear, linear_2d};
use flava_vit::weights::{load_module, module_state_dict, LoadReport, StateDict, WeightsError};
use serde::{Deserialize, Serialize};

use crate::losses::cross_entropy;

/// The head's shape (torchmultimodal `flava_model_for_classification` defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClassifierConfig {
    /// Which encoder's CLS feeds the head.
    pub tower: Tower,
    /// Outputs: classes, answers (VQA) or 1 (regression).
    pub num_classes: usize,
    /// Width of the hidden layer; 0 for none (a linear head, `Linear(d, C)`).
    pub hidden_size: usize,
    /// Dropout after the ReLU (active in training only).
    pub dropout: f64,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        Self {
            tower: Tower::Multimodal,
            num_classes: 2,
            hidden_size: 768,
            dropout: 0.5,
        }
    }
}

/// `Linear(d, hidden) -> ReLU -> Dropout -> Linear(hidden, C)`. Checkpoint keys: `hidden` is
/// `classifier.model.0`, `output` is `classifier.model.3` (torchmultimodal's `MLP` indices).
/// Without the hidden layer, `output` alone is `classifier.model.0`.
#[derive(Module, Debug)]
pub struct ClassifierHead {
    /// d → hidden (`model.0`); `None` for a linear head.
    pub hidden: Option<Linear>,
    /// After the ReLU (`model.2`, no parameters).
    pub dropout: Dropout,
    /// hidden (or d) → classes (`model.3`, or `model.0` without a hidden layer).
    pub output: Linear,
}

impl ClassifierHead {
    /// A head for `in_dim` features, initialised as PyTorch's `nn.Linear` is not: N(0, std)
    /// weights and zero biases, as HF initialises FLAVA's own heads.
    pub fn new(in_dim: usize, cfg: &ClassifierConfig, std: f64, device: &Device) -> Self {
        let hidden = (cfg.hidden_size > 0).then(|| linear(in_dim, cfg.hidden_size, true, std, device));
        let width = if cfg.hidden_size > 0 { cfg.hidden_size } else { in_dim };
        Self {
            hidden,
            dropout: DropoutConfig::new(cfg.dropout).init(),
            output: linear(width, cfg.num_classes, true, std, device),
        }
    }

    /// [b, d] → [b, classes].
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        match &self.hidden {
            Some(hidden) => {
                let h = burn::tensor::activation::relu(linear_2d(hidden, x));
                linear_2d(&self.output, self.dropout.forward(h))
            }
            None => linear_2d(&self.output, x),
        }
    }
}

/// What a task is trained against, one row per sample.
#[derive(Debug, Clone)]
pub enum TaskTargets {
    /// Class indices (cross-entropy).
    Classes(Vec<usize>),
    /// Soft scores in [0, 1] per output, row-major [b, classes] (binary cross-entropy with
    /// logits, summed over outputs and averaged over samples, as MMF's VQA loss).
    Soft(Vec<f32>),
    /// Real values (mean squared error on the single output).
    Values(Vec<f32>),
}

/// FLAVA with a task head: HF `FlavaModel` keys for the backbone, `classifier.model.{0,3}.*`
/// for the head.
#[derive(Module, Debug)]
pub struct FlavaForClassification {
    /// The backbone.
    pub flava: FlavaModel,
    /// The head.
    pub classifier: ClassifierHead,
    /// Which encoder feeds the head.
    #[module(skip)]
    pub tower: Tower,
}

/// Errors of a classification step.
#[derive(Debug, thiserror::Error)]
pub enum ClassificationError {
    /// The input lacks what the tower needs.
    #[error("the {tower} head needs {needs}")]
    MissingInput {
        /// The head's tower.
        tower: Tower,
        /// What is missing.
        needs: &'static str,
    },
    /// Targets that do not fit the logits.
    #[error("targets: {0}")]
    Targets(String),
}

impl FlavaForClassification {
    /// A head on `flava` (the backbone's hidden size for the tower's CLS).
    pub fn new(flava: FlavaModel, config: &FlavaConfig, head: &ClassifierConfig, device: &Device) -> Self {
        let in_dim = match head.tower {
            Tower::Image => config.image_config.hidden_size,
            Tower::Text => config.text_config.hidden_size,
            Tower::Multimodal => config.multimodal_config.hidden_size,
        };
        Self {
            flava,
            classifier: ClassifierHead::new(in_dim, head, config.initializer_range, device),
            tower: head.tower,
        }
    }

    /// The CLS of the chosen encoder (after its final LayerNorm): [b, d].
    pub fn features(&self, input: FlavaInput) -> Result<Tensor<2>, ClassificationError> {
        cls_features(&self.flava, self.tower, input)
    }

    /// Logits [b, classes].
    pub fn forward(&self, input: FlavaInput) -> Result<Tensor<2>, ClassificationError> {
        Ok(self.classifier.forward(self.features(input)?))
    }

    /// The task loss of `logits` [b, classes] against `targets`, `[1]`.
    pub fn loss(logits: Tensor<2>, targets: &TaskTargets) -> Result<Tensor<1>, ClassificationError> {
        let [b, c] = logits.dims();
        let bad = |m: String| ClassificationError::Targets(m);
        match targets {
            TaskTargets::Classes(t) => {
                if t.len() != b {
                    return Err(bad(format!("{} labels for {b} rows", t.len())));
                }
                if let Some(x) = t.iter().find(|&&x| x >= c) {
                    return Err(bad(format!("label {x} is not below the {c} classes")));
                }
                Ok(cross_entropy(logits, t))
            }
            TaskTargets::Soft(y) => {
                if y.len() != b * c {
                    return Err(bad(format!("{} soft scores for logits [{b}, {c}]", y.len())));
                }
                if let Some(v) = y.iter().find(|v| !(0.0..=1.0).contains(*v)) {
                    return Err(bad(format!("soft score {v} is not in [0, 1]")));
                }
                // PyTorch's stable form: max(x, 0) − x·y + log(1 + exp(−|x|)), summed over
                // outputs, mean over rows.
                let x = logits;
                let y = Tensor::<2>::from_data(TensorData::new(y.clone(), [b, c]), &x.device());
                let loss = x.clone().clamp_min(0.0) - x.clone() * y + (x.abs().neg().exp() + 1.0).log();
                Ok(loss.sum() / b.max(1) as f64)
            }
            TaskTargets::Values(v) => {
                if v.len() != b || c != 1 {
                    return Err(bad(format!("{} values for logits [{b}, {c}] (one output)", v.len())));
                }
                let y = Tensor::<1>::from_floats(v.as_slice(), &logits.device());
                let diff = logits.reshape([b]) - y;
                Ok((diff.clone() * diff).mean())
            }
        }
    }

    /// The checkpoint: the backbone under HF `FlavaModel` keys, the head as
    /// `classifier.model.0.*` / `classifier.model.3.*`.
    pub fn state_dict(&self) -> StateDict {
        let linear_head = self.classifier.hidden.is_none();
        let mut sd = module_state_dict(&self.flava, "", &["logit_scale"]);
        let head = module_state_dict(&self.classifier, "", &[]);
        for (k, t) in head.tensors {
            sd.tensors
                .insert(format!("classifier.{}", head_key_to_checkpoint(&k, linear_head)), t);
        }
        sd
    }

    /// Loads [`Self::state_dict`]'s layout (a backbone may also carry `flava.` prefixes, as a
    /// pretraining checkpoint does). Without `classifier.*` keys the head keeps its initial
    /// weights and the report lists them missing.
    pub fn load_state_dict(&mut self, sd: &StateDict) -> Result<(LoadReport, LoadReport), WeightsError> {
        let backbone = if sd.tensors.keys().any(|k| k.starts_with("flava.")) {
            sd.strip_prefix("flava.")
        } else {
            sd.clone()
        };
        let linear_head = self.classifier.hidden.is_none();
        let mut head = StateDict::default();
        for (k, t) in &sd.tensors {
            if let Some(rest) = k.strip_prefix("classifier.") {
                head.tensors
                    .insert(checkpoint_key_to_head(rest, linear_head), t.clone());
            }
        }
        let backbone_report = load_module(&mut self.flava, &backbone, false)?;
        let head_report = load_module(&mut self.classifier, &head, true)?;
        Ok((backbone_report, head_report))
    }
}

/// `last_hidden_state[:, 0]` of `tower` (after the encoder's final LayerNorm): [b, d]; the
/// features of a task head and of a linear probe. The multimodal CLS runs the whole model. The
/// tower that gives the CLS runs its last layer at that position only (`forward_cls`), equal to
/// slicing the full pass.
pub fn cls_features(flava: &FlavaModel, tower: Tower, input: FlavaInput) -> Result<Tensor<2>, ClassificationError> {
    let missing = |needs| ClassificationError::MissingInput { tower, needs };
    match tower {
        Tower::Image => {
            let px = input.pixel_values.ok_or_else(|| missing("pixel_values"))?;
            Ok(flava.image_model.forward_cls(px, false))
        }
        Tower::Text => {
            let ids = input.input_ids.ok_or_else(|| missing("input_ids"))?;
            Ok(flava
                .text_model
                .forward_cls(ids, input.attention_mask.as_ref(), input.token_type_ids))
        }
        Tower::Multimodal => {
            let both = input.pixel_values.zip(input.input_ids);
            let (px, ids) = both.ok_or_else(|| missing("pixel_values and input_ids"))?;
            let image = flava.image_model.forward(
                px,
                input.bool_masked_pos.as_ref(),
                input.interpolate_pos_encoding,
                false,
            );
            let text = flava
                .text_model
                .forward(ids, input.attention_mask.as_ref(), input.token_type_ids, false);
            Ok(flava.fuse_cls(&image, &text, input.attention_mask.as_ref()))
        }
    }
}

/// `hidden.weight` → `model.0.weight`, `output.bias` → `model.3.bias` (`model.0.bias` for a
/// linear head).
fn head_key_to_checkpoint(k: &str, linear_head: bool) -> String {
    if let Some(rest) = k.strip_prefix("hidden.") {
        format!("model.0.{rest}")
    } else if let Some(rest) = k.strip_prefix("output.") {
        format!("model.{}.{rest}", if linear_head { 0 } else { 3 })
    } else {
        k.to_string()
    }
}

/// The inverse of [`head_key_to_checkpoint`].
fn checkpoint_key_to_head(k: &str, linear_head: bool) -> String {
    if let Some(rest) = k.strip_prefix("model.0.") {
        format!("{}.{rest}", if linear_head { "output" } else { "hidden" })
    } else if let Some(rest) = k.strip_prefix("model.3.") {
        format!("output.{rest}")
    } else {
        k.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_keys_follow_torchmultimodal() {
        for (ours, theirs) in [
            ("hidden.weight", "model.0.weight"),
            ("hidden.bias", "model.0.bias"),
            ("output.weight", "model.3.weight"),
        ] {
            assert_eq!(head_key_to_checkpoint(ours, false), theirs);
            assert_eq!(checkpoint_key_to_head(theirs, false), ours);
        }
        // A linear head (a probe) is `nn.Sequential(nn.Linear(d, C))`.
        for (ours, theirs) in [("output.weight", "model.0.weight"), ("output.bias", "model.0.bias")] {
            assert_eq!(head_key_to_checkpoint(ours, true), theirs);
            assert_eq!(checkpoint_key_to_head(theirs, true), ours);
        }
    }

    #[test]
    fn a_linear_head_saves_and_loads_as_model_0() {
        let device = Device::flex();
        let config = FlavaConfig::preset("tiny").unwrap();
        let head = ClassifierConfig {
            tower: Tower::Image,
            num_classes: 3,
            hidden_size: 0,
            dropout: 0.0,
        };
        let m = FlavaForClassification::new(FlavaModel::new(&config, &device), &config, &head, &device);
        assert!(m.classifier.hidden.is_none());
        let sd = m.state_dict();
        let w = sd.get("classifier.model.0.weight").expect("linear head key");
        assert_eq!(w.shape, vec![3, config.image_config.hidden_size], "PyTorch [out, in]");
        assert!(sd.get("classifier.model.3.weight").is_none());
        let mut other = FlavaForClassification::new(FlavaModel::new(&config, &device), &config, &head, &device);
        let (_, report) = other.load_state_dict(&sd).unwrap();
        assert!(report.missing.is_empty() && report.unexpected.is_empty(), "{report}");
        let x = Tensor::<2>::ones([2, config.image_config.hidden_size], &device);
        let (a, b) = (m.classifier.forward(x.clone()), other.classifier.forward(x));
        assert_eq!(
            a.into_data().try_to_vec::<f32>().unwrap(),
            b.into_data().try_to_vec::<f32>().unwrap()
        );
    }

    #[test]
    fn task_losses_match_hand_computation() {
        let device = Device::flex();
        let logits = Tensor::<2>::from_floats([[2.0, 0.0], [0.0, 1.0]], &device);
        // Cross-entropy: mean of −log softmax at the labels.
        let ce = FlavaForClassification::loss(logits.clone(), &TaskTargets::Classes(vec![0, 0]))
            .unwrap()
            .into_scalar::<f64>();
        let lse = |a: f64, b: f64| (a.exp() + b.exp()).ln();
        let want = ((lse(2.0, 0.0) - 2.0) + (lse(0.0, 1.0) - 0.0)) / 2.0;
        assert!((ce - want).abs() < 1e-6, "{ce} vs {want}");
        // Soft BCE: Σ_j [log(1 + e^x) − x·y] per row, mean over rows.
        let y = vec![1.0, 0.0, 0.3, 0.6];
        let bce = FlavaForClassification::loss(logits.clone(), &TaskTargets::Soft(y))
            .unwrap()
            .into_scalar::<f64>();
        let sp = |x: f64| (1.0 + x.exp()).ln();
        let want = ((sp(2.0) - 2.0) + sp(0.0) + (sp(0.0) - 0.0) + (sp(1.0) - 0.6)) / 2.0;
        assert!((bce - want).abs() < 1e-6, "{bce} vs {want}");
        // MSE on one output.
        let one = Tensor::<2>::from_floats([[1.5], [-0.5]], &device);
        let mse = FlavaForClassification::loss(one, &TaskTargets::Values(vec![1.0, 0.5]))
            .unwrap()
            .into_scalar::<f64>();
        assert!((mse - (0.25 + 1.0) / 2.0).abs() < 1e-6, "{mse}");
        // Bad targets are errors, not panics.
        assert!(FlavaForClassification::loss(logits.clone(), &TaskTargets::Classes(vec![0, 2])).is_err());
        assert!(FlavaForClassification::loss(logits.clone(), &TaskTargets::Classes(vec![0])).is_err());
        assert!(FlavaForClassification::loss(logits.clone(), &TaskTargets::Soft(vec![1.5, 0.0, 0.0, 0.0])).is_err());
        assert!(FlavaForClassification::loss(logits.clone(), &TaskTargets::Soft(vec![0.5; 3])).is_err());
        assert!(FlavaForClassification::loss(logits, &TaskTargets::Values(vec![1.0, 2.0])).is_err());
    }
}
