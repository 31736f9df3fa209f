//! Pretrains a tiny FLAVA on the built-in synthetic data and evaluates it, from Rust, without
//! the command line: `cargo run --release --example pretrain_tiny -p flava-train`.
//! (The library's pieces — `Trainer`, `Optimizer`, `RunDir`, `Observer` — are in the docs.)

use flava_train::observer::{Observer, ProgressBars, StepMetrics};
use flava_train::pretrain::{config::PretrainConfig, run_with};

/// Progress bars, and every 100th step's losses kept for a summary.
struct Watch(ProgressBars, Vec<StepMetrics>);

impl Observer for Watch {
    fn on_train_start(&mut self, what: &str, step: usize, total: usize) {
        self.0.on_train_start(what, step, total)
    }
    fn on_train_end(&mut self) {
        self.0.on_train_end()
    }
    fn on_step(&mut self, m: &StepMetrics) {
        self.0.on_step(m);
        if m.updated && m.task != "dvae" && m.step.is_multiple_of(100) {
            self.1.push(m.clone());
        }
    }
    fn on_message(&mut self, msg: &str) {
        self.0.on_message(msg)
    }
}

fn main() -> anyhow::Result<()> {
    let mut cfg = PretrainConfig {
        steps: 400,
        out: "target/pretrain_tiny".into(),
        force: true, // start over on every run of the example
        ..Default::default()
    };
    cfg.dvae.time_limit_s = 20.0;
    let mut watch = Watch(ProgressBars::new(), vec![]);
    let summary = run_with(&cfg, &mut watch)?;
    for m in &watch.1 {
        println!("step {:>4} {:<6} loss {:.3}", m.step, m.task, m.loss);
    }
    if let Some(report) = &summary.eval {
        print!("{}", flava_train::eval::render_report(report));
    }
    println!(
        "model in {} ({:.0} s of training)",
        summary.model_dir.display(),
        summary.train_seconds
    );
    Ok(())
}
