//! The pretraining configuration: every `flava pretrain` option, also readable from TOML
//! (`--config FILE.toml`; command-line options override the file). `--print-config` prints the
//! effective configuration in the same TOML form.

use std::path::{Path, PathBuf};

use anyhow::Context;
use flava_data::task::Task;
use flava_fusion::Tower;
use serde::{Deserialize, Serialize};

/// dVAE training done by the default run when no codebook is given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DvaeSection {
    /// Seconds of dVAE training.
    pub time_limit_s: f64,
    /// Most dVAE steps.
    pub steps: usize,
    /// Codebook size (the image vocabulary of MIM).
    pub vocab_size: usize,
    /// Codebook width.
    pub hidden_size: usize,
}

impl Default for DvaeSection {
    fn default() -> Self {
        Self {
            // Step-bound (250 steps take ~45 s on 2 cores), so that the codebook, and with it
            // the MIM targets, do not depend on how busy the machine is; the time limit is a
            // safety net for slow machines.
            time_limit_s: 90.0,
            steps: 250,
            vocab_size: 64,
            hidden_size: 16,
        }
    }
}

/// The evaluation at the end of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    /// Labelled images for zero-shot classification (ImageFolder or `synthetic:classes`).
    pub zero_shot: String,
    /// Images evaluated for zero-shot.
    pub zero_shot_images: usize,
    /// Prompt templates (`{}` = class name), averaged as CLIP does.
    pub templates: Vec<String>,
    /// Held-out pairs for retrieval and MLM/MIM accuracy.
    pub retrieval: String,
    /// Pairs evaluated for retrieval.
    pub retrieval_pairs: usize,
    /// Held-out texts for MLM accuracy.
    pub text: String,
    /// Held-out images for MIM accuracy.
    pub images: String,
    /// Samples for MLM and MIM accuracy each.
    pub masked_samples: usize,
    /// Skip the evaluation.
    pub skip: bool,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            zero_shot: "synthetic:classes".into(),
            zero_shot_images: 480,
            templates: flava_data::synthetic::class_templates(),
            retrieval: "synthetic:heldout".into(),
            retrieval_pairs: 500,
            text: "synthetic:heldout".into(),
            images: "synthetic:heldout".into(),
            masked_samples: 256,
            skip: false,
        }
    }
}

/// Every option of `flava pretrain`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    /// Model size: tiny, small, base or full (ignored with `init`, which brings its own).
    pub preset: String,
    /// Paired sources (image + caption).
    pub pairs: Vec<String>,
    /// Image-only sources.
    pub images: Vec<String>,
    /// Text-only sources.
    pub text: Vec<String>,
    /// Task mix: `round-robin` or weights `pairs=W,images=W,text=W`.
    pub mix: String,
    /// Optimizer steps.
    pub steps: usize,
    /// Stop after this many steps in this invocation (saving a checkpoint), to continue later
    /// with `resume`; the schedule still spans `steps`.
    pub stop_after: Option<usize>,
    /// Samples per step (per task batch).
    pub batch_size: usize,
    /// Micro-batches per step (the batch is split; contrastive negatives are kept).
    pub accumulate: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warmup steps.
    pub warmup: usize,
    /// Cosine decay ends at `lr · min_lr_ratio`.
    pub min_lr_ratio: f64,
    /// AdamW weight decay (not applied to biases, LayerNorms, tokens, position embeddings,
    /// the logit scale).
    pub weight_decay: f64,
    /// AdamW betas.
    pub betas: (f64, f64),
    /// AdamW epsilon.
    pub eps: f64,
    /// Global gradient-norm clipping (0 = off).
    pub grad_clip: f64,
    /// Run directory.
    pub out: PathBuf,
    /// Continue from the last complete checkpoint in `out`.
    pub resume: bool,
    /// Start over in an `out` that holds a previous run (its files are removed first).
    #[serde(skip)]
    pub force: bool,
    /// Initialise from a pretrained FLAVA directory (e.g. flava-full).
    pub init: Option<PathBuf>,
    /// Towers to freeze: `image`, `text`, `multimodal`.
    pub freeze: Vec<Tower>,
    /// Phases in order: `images`, `text` (unimodal), `pairs` (paired only) and `joint` (the mix),
    /// each `NAME:STEPS` or `NAME:P%` of `steps`; one may omit its count to take the rest, e.g.
    /// `images:100,text:100,joint`. The default gives the first half to paired batches only: the
    /// contrastive loss leaves its initial plateau before the unimodal losses share the towers
    /// (the README's "default run" section has the measurements behind this choice).
    pub phases: Option<String>,
    /// Codebook directory (HF layout); trained first when absent.
    pub codebook: Option<PathBuf>,
    /// `tokenizer.json` or `vocab.txt`; trained first when absent.
    pub tokenizer: Option<PathBuf>,
    /// WordPiece vocabulary size when the tokenizer is trained.
    pub tokenizer_vocab_size: usize,
    /// Compute device: flex, cuda or wgpu.
    pub device: String,
    /// Several devices for data parallelism (`cuda:0,cuda:1`): one model replica and one share
    /// of every batch per device, gradients summed on the first, which replaces `device`.
    /// (`flex,flex` runs the same path on the CPU, for testing.)
    pub devices: Vec<String>,
    /// Data shares of every batch (default: the number of processes). Each of `K` shares reads
    /// every `K`-th record of each source and builds `batch_size / K` rows; the batch is the
    /// shares' rows in order, and a job of `N` processes gives each `K / N` of them. Two runs
    /// with the same `K` see the same batches, whatever their number of processes, devices or
    /// micro-batches (so a resume may change the number of processes when it divides `K`).
    pub data_shares: Option<usize>,
    /// Checkpoint every N steps (0 = only at the end).
    pub checkpoint_every: usize,
    /// Checkpoints kept.
    pub keep_checkpoints: usize,
    /// Consecutive non-finite losses before the run saves and stops.
    pub max_nonfinite: usize,
    /// Seed of data order, masking and initialisation.
    pub seed: u64,
    /// Data worker threads.
    pub workers: usize,
    /// Text length in tokens.
    pub max_length: usize,
    /// Share of pairs turned into ITM negatives.
    pub itm_negative_prob: f64,
    /// Patches masked per image (BEiT); default 40% of the grid.
    pub mask_patches: Option<usize>,
    /// Loss weights (default: the model configuration's `*_weight` fields, all 1).
    pub weights: Option<flava_objectives::LossWeights>,
    /// dVAE training when no codebook is given.
    pub dvae: DvaeSection,
    /// Final evaluation.
    pub eval: EvalSection,
    /// Resource limits of every reader (image pixels, member and text bytes, ...).
    pub limits: flava_vit::limits::Limits,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            preset: "tiny".into(),
            pairs: vec!["synthetic".into()],
            images: vec!["synthetic".into()],
            text: vec!["synthetic".into()],
            mix: "round-robin".into(),
            steps: 1700,
            stop_after: None,
            batch_size: 32,
            accumulate: 1,
            lr: 1e-3,
            // 300, not 60: at the full 1e-3 from step 60 the global contrastive loss sat at
            // ln(batch) for 170-300 steps (the towers learned MLM/MIM first) and retrieval missed
            // its bar in 2 of 2 seeds on Zen 4; with 300 it leaves that plateau by step ~100 (3
            // seeds) at the same MLM accuracy (README, "Measured, the default run").
            warmup: 300,
            min_lr_ratio: 0.02,
            weight_decay: 0.01,
            betas: (0.9, 0.999),
            eps: 1e-8,
            grad_clip: 1.0,
            out: PathBuf::from("runs/flava"),
            resume: false,
            force: false,
            init: None,
            freeze: vec![],
            phases: Some("pairs:50%,joint".into()),
            codebook: None,
            tokenizer: None,
            tokenizer_vocab_size: 200,
            device: "flex".into(),
            devices: vec![],
            data_shares: None,
            checkpoint_every: 200,
            keep_checkpoints: 2,
            max_nonfinite: 5,
            seed: 0,
            workers: 2,
            max_length: 24,
            itm_negative_prob: 0.25,
            mask_patches: None,
            weights: None,
            dvae: DvaeSection::default(),
            eval: EvalSection::default(),
            limits: Default::default(),
        }
    }
}

impl PretrainConfig {
    /// The optimizer and schedule settings.
    pub fn optimizer(&self) -> crate::optim::OptimizerConfig {
        crate::optim::OptimizerConfig {
            lr: self.lr,
            warmup: self.warmup,
            min_lr_ratio: self.min_lr_ratio,
            weight_decay: self.weight_decay,
            betas: self.betas,
            eps: self.eps,
            grad_clip: self.grad_clip,
            freeze: self.freeze.clone(),
        }
    }
}

/// One training phase: which tasks it samples, for how many steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phase {
    /// What the phase trains on.
    pub kind: PhaseKind,
    /// Steps in this phase.
    pub steps: usize,
}

/// What a phase trains on: one task's data, or all of them mixed by `mix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseKind {
    /// Only this task's sources (round-robin over them).
    Only(Task),
    /// Every task, mixed by `mix`.
    Joint,
}

impl PhaseKind {
    /// The tasks the phase draws from.
    pub fn tasks(self) -> &'static [Task] {
        match self {
            PhaseKind::Only(Task::Pairs) => &[Task::Pairs],
            PhaseKind::Only(Task::Images) => &[Task::Images],
            PhaseKind::Only(Task::Text) => &[Task::Text],
            PhaseKind::Joint => &Task::ALL,
        }
    }
}

impl std::fmt::Display for PhaseKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PhaseKind::Only(t) => f.write_str(t.name()),
            PhaseKind::Joint => f.write_str("joint"),
        }
    }
}

impl std::str::FromStr for PhaseKind {
    type Err = anyhow::Error;
    /// `pairs`, `images`, `text` (the task names) or `joint`.
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.trim() {
            "joint" => Ok(PhaseKind::Joint),
            other => other
                .parse()
                .map(PhaseKind::Only)
                .map_err(|_| anyhow::anyhow!("unknown phase `{other}` (pairs, images, text or joint)")),
        }
    }
}

impl PretrainConfig {
    /// Reads a TOML file; unknown keys are errors that name the key.
    pub fn from_toml_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the configuration serialises")
    }

    /// The phases: `phases` parsed, or one joint phase of `steps`. A phase without a count
    /// (`pairs:150,joint`) takes the steps the others leave.
    pub fn phases(&self) -> anyhow::Result<Vec<Phase>> {
        let Some(spec) = &self.phases else {
            return Ok(vec![Phase {
                kind: PhaseKind::Joint,
                steps: self.steps,
            }]);
        };
        let mut out = Vec::new();
        let mut open = None;
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, n) = part.split_once(':').map_or((part, None), |(a, b)| (a, Some(b)));
            let kind: PhaseKind = name.parse().with_context(|| format!("phase `{part}`"))?;
            let bad = || {
                anyhow::anyhow!(
                    "phase `{part}`: `{}` is not a step count or a percentage",
                    n.unwrap_or("")
                )
            };
            let steps = match n {
                Some(p) if p.ends_with('%') => {
                    let pct: f64 = p.trim_end_matches('%').parse().map_err(|_| bad())?;
                    (pct / 100.0 * self.steps as f64).floor() as usize
                }
                Some(n) => n.parse().map_err(|_| bad())?,
                None if open.is_none() => {
                    open = Some(out.len());
                    0
                }
                None => anyhow::bail!("--phases: only one phase may leave out its step count"),
            };
            out.push(Phase { kind, steps });
        }
        if out.is_empty() {
            anyhow::bail!("--phases is empty");
        }
        let fixed: usize = out.iter().map(|p| p.steps).sum();
        if let Some(i) = open {
            if fixed > self.steps {
                anyhow::bail!("the phases take {fixed} steps but --steps is {}", self.steps);
            }
            out[i].steps = self.steps - fixed;
        }
        Ok(out)
    }

    /// Options a resumed run may change: the length of the run, checkpointing, logging and
    /// evaluation, the device and the worker threads. Everything else defines the run.
    pub const RESUMABLE: [&'static str; 10] = [
        "steps",
        "stop_after",
        "resume",
        "checkpoint_every",
        "keep_checkpoints",
        "max_nonfinite",
        "workers",
        "device",
        "eval",
        "limits",
    ];

    /// `Err` naming every option that differs from the run's saved configuration and may not
    /// change on resume (see [`Self::RESUMABLE`]).
    pub fn check_resumable(&self, saved: &PretrainConfig) -> anyhow::Result<()> {
        let table = |c: &PretrainConfig| -> toml::Table { toml::Table::try_from(c).unwrap_or_default() };
        let (now, was) = (table(self), table(saved));
        let mut changed: Vec<String> = now
            .keys()
            .chain(was.keys())
            .filter(|k| !Self::RESUMABLE.contains(&k.as_str()))
            .filter(|k| now.get(*k) != was.get(*k))
            .map(|k| {
                let show = |v: Option<&toml::Value>| v.map_or("(unset)".to_string(), |v| v.to_string());
                format!("{k}: {} -> {}", show(was.get(k)), show(now.get(k)))
            })
            .collect();
        changed.dedup();
        if !changed.is_empty() {
            anyhow::bail!(
                "--resume: these options differ from the run's config.toml and cannot change in a resumed run: {}. Resume without them (the run's own settings are used), or start a new run",
                changed.join("; ")
            );
        }
        Ok(())
    }

    /// The run's data shares for a job of `world` processes ([`Self::data_shares`], default
    /// `world`), or why they do not fit the batch, the processes and the devices.
    pub fn check_processes(&self, world: usize) -> anyhow::Result<usize> {
        let k = self.data_shares.unwrap_or(world.max(1));
        if k == 0 || !self.batch_size.is_multiple_of(k) {
            anyhow::bail!("--data-shares {k} must divide --batch-size {}", self.batch_size);
        }
        if !k.is_multiple_of(world.max(1)) {
            anyhow::bail!(
                "--data-shares {k} cannot be split evenly over {world} processes (use a multiple of {world})"
            );
        }
        let per_process = self.batch_size / world.max(1);
        let micro = self.accumulate * self.devices.len().max(1);
        if world > 1 && !per_process.is_multiple_of(micro) {
            anyhow::bail!(
                "each of the {world} processes takes {per_process} samples of --batch-size {}, which do not split into --accumulate {} micro-batches on {} device(s)",
                self.batch_size,
                self.accumulate,
                self.devices.len().max(1)
            );
        }
        Ok(k)
    }

    /// Checks values that would fail later with a less clear message, or train nonsense.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.batch_size == 0 || self.steps == 0 {
            anyhow::bail!("batch size and steps must be at least 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            anyhow::bail!("--lr must be a positive number, got {}", self.lr);
        }
        if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) {
            anyhow::bail!("--grad-clip must be ≥ 0 (0 turns clipping off), got {}", self.grad_clip);
        }
        if !(self.weight_decay.is_finite() && (0.0..1.0).contains(&self.weight_decay)) {
            anyhow::bail!("--weight-decay must be in [0, 1), got {}", self.weight_decay);
        }
        if !(self.min_lr_ratio.is_finite() && (0.0..=1.0).contains(&self.min_lr_ratio)) {
            anyhow::bail!("min_lr_ratio must be in [0, 1], got {}", self.min_lr_ratio);
        }
        let (b1, b2) = self.betas;
        if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) {
            anyhow::bail!("betas must each be in [0, 1), got ({b1}, {b2})");
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            anyhow::bail!("eps must be a positive number, got {}", self.eps);
        }
        if !(0.0..=1.0).contains(&self.itm_negative_prob) {
            anyhow::bail!("itm_negative_prob must be in [0, 1], got {}", self.itm_negative_prob);
        }
        if self.checkpoint_every == 0 {
            anyhow::bail!(
                "--checkpoint-every must be at least 1 (a run without checkpoints loses all its work when stopped; give a number ≥ --steps to save only at the end)"
            );
        }
        if self.keep_checkpoints == 0 || self.max_nonfinite == 0 || self.workers == 0 {
            anyhow::bail!("keep_checkpoints, max_nonfinite and workers must be at least 1");
        }
        if self.workers > 1024 {
            anyhow::bail!(
                "--workers {} is more threads than any machine has (at most 1024)",
                self.workers
            );
        }
        self.limits.check_dims(
            "",
            &[
                ("--batch-size", self.batch_size),
                ("max_length", self.max_length),
                ("tokenizer_vocab_size", self.tokenizer_vocab_size),
                ("[dvae] vocab_size", self.dvae.vocab_size),
                ("[dvae] hidden_size", self.dvae.hidden_size),
            ],
        )?;
        if self.max_length < 2 {
            anyhow::bail!(
                "max_length must be at least 2 ([CLS] and [SEP]), got {}",
                self.max_length
            );
        }
        if self.tokenizer_vocab_size < 10 {
            anyhow::bail!(
                "tokenizer_vocab_size must be at least 10, got {}",
                self.tokenizer_vocab_size
            );
        }
        if self.mask_patches == Some(0) {
            anyhow::bail!("mask_patches must be at least 1 (or unset for 40% of the grid)");
        }
        if !(self.dvae.time_limit_s.is_finite() && self.dvae.time_limit_s > 0.0) {
            anyhow::bail!(
                "--dvae-time must be a positive number of seconds, got {}",
                self.dvae.time_limit_s
            );
        }
        if self.dvae.steps == 0 || self.dvae.vocab_size < 2 || self.dvae.hidden_size == 0 {
            anyhow::bail!("[dvae] steps and hidden_size must be at least 1 and vocab_size at least 2");
        }
        for t in &self.eval.templates {
            if !t.contains("{}") {
                anyhow::bail!("[eval] template `{t}` has no `{{}}` for the class name");
            }
        }
        if self.pairs.is_empty() && self.images.is_empty() && self.text.is_empty() {
            anyhow::bail!("no data source: give --pairs, --images or --text");
        }
        self.limits.validate()?;
        if self.accumulate == 0 || !self.batch_size.is_multiple_of(self.accumulate) {
            anyhow::bail!(
                "--accumulate {} must divide --batch-size {} (the batch is split into micro-batches)",
                self.accumulate,
                self.batch_size
            );
        }
        let replicas = self.devices.len().max(1);
        if !self.batch_size.is_multiple_of(self.accumulate * replicas) {
            anyhow::bail!(
                "--batch-size {} must split into --accumulate {} micro-batches on each of {} devices",
                self.batch_size,
                self.accumulate,
                replicas
            );
        }
        for d in &self.devices {
            crate::pick_device(d).with_context(|| format!("--devices {}", self.devices.join(",")))?;
        }
        flava_data::loader::Mix::parse(&self.mix).context("--mix")?;
        let total: usize = self.phases()?.iter().map(|p| p.steps).sum();
        if self.phases.is_some() && total != self.steps {
            anyhow::bail!("the phases add up to {total} steps but --steps is {}", self.steps);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_round_trip_and_unknown_keys() {
        let cfg = PretrainConfig::default();
        let back: PretrainConfig = toml::from_str(&cfg.to_toml()).unwrap();
        assert_eq!(back, cfg);
        let err = toml::from_str::<PretrainConfig>("stepz = 3").unwrap_err().to_string();
        assert!(err.contains("stepz"), "{err}");
        let part: PretrainConfig = toml::from_str("steps = 7\n[eval]\nretrieval_pairs = 9").unwrap();
        assert_eq!((part.steps, part.eval.retrieval_pairs, part.batch_size), (7, 9, 32));
        // Towers are spelled as on the command line; anything else is a parse error.
        let frozen: PretrainConfig = toml::from_str("freeze = [\"image\", \"multimodal\"]").unwrap();
        assert_eq!(frozen.freeze, [Tower::Image, Tower::Multimodal]);
        assert!(toml::from_str::<PretrainConfig>("freeze = [\"vision\"]").is_err());
    }

    #[test]
    fn phases_parse_and_check() {
        let open = PretrainConfig {
            phases: Some("pairs:4,joint".into()),
            steps: 10,
            ..Default::default()
        };
        assert_eq!(
            open.phases().unwrap().iter().map(|p| p.steps).collect::<Vec<_>>(),
            [4, 6]
        );
        let pct = PretrainConfig {
            phases: Some("pairs:20%,joint".into()),
            steps: 1050,
            ..Default::default()
        };
        assert_eq!(
            pct.phases().unwrap().iter().map(|p| p.steps).collect::<Vec<_>>(),
            [210, 840]
        );
        let cfg = PretrainConfig {
            phases: Some("images:2, text:3,joint:5".into()),
            steps: 10,
            ..Default::default()
        };
        let p = cfg.phases().unwrap();
        assert_eq!(p.iter().map(|p| p.steps).collect::<Vec<_>>(), [2, 3, 5]);
        assert_eq!(
            p.iter().map(|p| p.kind).collect::<Vec<_>>(),
            [
                PhaseKind::Only(Task::Images),
                PhaseKind::Only(Task::Text),
                PhaseKind::Joint
            ]
        );
        assert_eq!(p[0].kind.tasks(), [Task::Images]);
        assert_eq!(p[2].kind.tasks(), Task::ALL);
        cfg.validate().unwrap();
        // One spelling: a phase is named after its task (`images`, as in --mix and the logs).
        for (spec, word) in [("vision:2", "vision"), ("image:2", "image")] {
            let bad = PretrainConfig {
                phases: Some(spec.into()),
                ..Default::default()
            };
            let e = format!("{:#}", bad.phases().unwrap_err());
            assert!(
                e.contains(&format!("unknown phase `{word}`")) && e.contains("images"),
                "{e}"
            );
        }
        let short = PretrainConfig { steps: 11, ..cfg };
        assert!(short.validate().is_err());
    }
}
