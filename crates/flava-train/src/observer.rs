//! What a training loop tells the world: an [`Observer`] sees each step's metrics, each
//! checkpoint and each message. The CLI's progress bars are one; a Rust user's own logging,
//! plots or evaluation hooks are others. Tests inject faults through it (a non-finite loss at a
//! step, a crash in the middle of a checkpoint write) instead of through production switches.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// One optimizer step's numbers (also one line of `metrics.jsonl`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Updates done after this step (1-based).
    pub step: usize,
    /// What the batch was (`pairs`, `images`, `text`, `dvae`, a task name).
    pub task: String,
    /// The total loss (NaN or ∞ when the step was skipped by the non-finite guard).
    pub loss: f64,
    /// Each loss term and other per-step numbers, by name.
    pub terms: Vec<(String, f64)>,
    /// Learning rate of the update.
    pub lr: f64,
    /// Global gradient norm before clipping (0 when no update was made).
    pub grad_norm: f64,
    /// Samples in the batch.
    pub samples: usize,
    /// Seconds the step took (data excluded unless the loop includes it).
    pub step_time_s: f64,
    /// Whether the parameters were updated (false: a non-finite loss, or nothing to learn).
    pub updated: bool,
}

impl StepMetrics {
    /// The value of a term.
    pub fn term(&self, name: &str) -> Option<f64> {
        self.terms.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// The `metrics.jsonl` line: `step`, `task`, `loss`, the terms, `lr`, `grad_norm`,
    /// `step_time_s`, `samples_per_s`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "step": self.step,
            "task": self.task,
            "loss": self.loss,
            "lr": self.lr,
            "grad_norm": self.grad_norm,
            "step_time_s": self.step_time_s,
            "samples_per_s": self.samples as f64 / self.step_time_s.max(1e-9),
        });
        for (n, x) in &self.terms {
            v[n.as_str()] = serde_json::json!(x);
        }
        v
    }
}

/// Hooks into a training run; every method has a default that does nothing.
pub trait Observer {
    /// A training loop (`what`: `flava`, `dvae`, a task) starts at update `step` of `total`.
    fn on_train_start(&mut self, _what: &str, _step: usize, _total: usize) {}
    /// The training loop ended (or stopped early).
    fn on_train_end(&mut self) {}
    /// A step finished (updated or skipped).
    fn on_step(&mut self, _m: &StepMetrics) {}
    /// A checkpoint was written.
    fn on_checkpoint(&mut self, _step: usize, _dir: &Path) {}
    /// Work outside the training loop (`what`: `predict`, `features train`, ...) has done
    /// `done` of `total` items.
    fn on_progress(&mut self, _what: &str, _done: usize, _total: usize) {}
    /// A message for the user (progress, a warning); the default prints it to stderr.
    fn on_message(&mut self, msg: &str) {
        eprintln!("{msg}");
    }
    /// Fault injection: called with each step's loss before the non-finite guard; a test
    /// returns NaN to exercise the guard.
    fn inspect_loss(&mut self, _step: usize, loss: f64) -> f64 {
        loss
    }
    /// Fault injection: called with a checkpoint's temporary directory after its files are
    /// written and before it is moved into place (a test can stop the process here).
    fn before_commit(&mut self, _step: usize, _tmp_dir: &Path) {}
}

/// An observer that prints messages and nothing else.
#[derive(Debug, Default, Clone, Copy)]
pub struct Quiet;

impl Observer for Quiet {}

/// Metrics of every step collected in memory (for tests and notebooks).
#[derive(Debug, Default, Clone)]
pub struct Collect {
    /// The steps seen, in order.
    pub steps: Vec<StepMetrics>,
    /// The messages seen.
    pub messages: Vec<String>,
}

impl Observer for Collect {
    fn on_step(&mut self, m: &StepMetrics) {
        self.steps.push(m.clone());
    }
    fn on_message(&mut self, msg: &str) {
        self.messages.push(msg.to_string());
    }
}

/// Progress bars on the terminal (indicatif): one per training loop, with the step's loss,
/// learning rate and time; messages printed above the bar (warnings to stderr).
#[derive(Default)]
pub struct ProgressBars {
    bar: Option<indicatif::ProgressBar>,
    what: String,
    /// The bar of [`Observer::on_progress`] and what it counts.
    work: Option<(String, indicatif::ProgressBar)>,
}

impl ProgressBars {
    /// No bar until a loop starts.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Observer for ProgressBars {
    fn on_train_start(&mut self, what: &str, step: usize, total: usize) {
        let bar = indicatif::ProgressBar::new(total as u64);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{bar:28} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]")
        {
            bar.set_style(style);
        }
        bar.set_position(step as u64);
        self.bar = Some(bar);
        self.what = what.to_string();
    }

    fn on_train_end(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }

    fn on_step(&mut self, m: &StepMetrics) {
        let Some(bar) = &self.bar else { return };
        bar.set_position(m.step.saturating_sub(usize::from(!m.updated)) as u64);
        let extra = if self.what == "dvae" {
            format!(
                " psnr {:.1} dB ppl {:.0} tau {:.3}",
                m.term("psnr").unwrap_or(0.0),
                m.term("perplexity").unwrap_or(0.0),
                m.term("tau").unwrap_or(0.0)
            )
        } else {
            String::new()
        };
        bar.set_message(format!(
            "{:<6} loss {:.3}{extra} lr {:.1e} {:.2}s/step",
            m.task, m.loss, m.lr, m.step_time_s
        ));
    }

    fn on_checkpoint(&mut self, _step: usize, dir: &Path) {
        self.on_message(&format!("checkpoint {}", dir.display()));
    }

    fn on_progress(&mut self, what: &str, done: usize, total: usize) {
        if self.work.as_ref().is_none_or(|(w, _)| w != what) {
            let bar = indicatif::ProgressBar::new(total as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:28} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
            ) {
                bar.set_style(style);
            }
            bar.set_message(what.to_string());
            if let Some((_, old)) = self.work.take() {
                old.finish();
            }
            self.work = Some((what.to_string(), bar));
        }
        if let Some((_, bar)) = &self.work {
            bar.set_position(done as u64);
            if done >= total {
                bar.finish();
            }
        }
    }

    fn on_message(&mut self, msg: &str) {
        let print = || {
            if msg.starts_with("warning") || msg.starts_with("error") {
                eprintln!("{msg}");
            } else {
                println!("{msg}");
            }
        };
        match &self.bar {
            Some(bar) => bar.suspend(print),
            None => print(),
        }
    }
}
