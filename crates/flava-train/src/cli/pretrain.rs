//! `flava pretrain`: options (each overrides the same key of `--config`), the library run with
//! progress bars, and the evaluation table.

use std::path::PathBuf;

use std::sync::Arc;

use flava_objectives::SingleProcess;
use flava_train::distributed::{launched_world_size, Group};
use flava_train::observer::{Observer, ProgressBars};
use flava_train::pretrain::{self, config::PretrainConfig};

/// `flava pretrain` options; each overrides the same key of `--config`.
#[derive(clap::Args)]
pub struct PretrainArgs {
    /// TOML file with any pretraining option (keys as printed by --print-config).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    /// Model size: tiny, small, base or full.
    #[arg(long)]
    preset: Option<String>,
    /// Paired source (repeatable): shards, CSV/TSV, coco:ANN.json:DIR, synthetic.
    #[arg(long = "pairs")]
    pairs: Vec<String>,
    /// Image-only source (repeatable): shards, ImageFolder, synthetic.
    #[arg(long = "images")]
    images: Vec<String>,
    /// Text-only source (repeatable): .txt, .jsonl, synthetic.
    #[arg(long = "text")]
    text: Vec<String>,
    /// round-robin, or weights pairs=W,images=W,text=W.
    #[arg(long)]
    mix: Option<String>,
    /// Optimizer steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Stop after N steps in this invocation (checkpoint saved; continue with --resume).
    #[arg(long)]
    stop_after: Option<usize>,
    /// Samples per step.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Split each batch into K micro-batches (contrastive negatives kept across them).
    #[arg(long)]
    accumulate: Option<usize>,
    /// Peak learning rate.
    #[arg(long)]
    lr: Option<f64>,
    /// Warmup steps.
    #[arg(long)]
    warmup: Option<usize>,
    /// AdamW weight decay.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Global gradient-norm clip (0 = off).
    #[arg(long)]
    grad_clip: Option<f64>,
    /// Run directory.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue from the last complete checkpoint in --out, with the run's own config.toml
    /// (only --steps, --stop-after, checkpointing, evaluation, --device and workers may change).
    #[arg(long, conflicts_with = "force")]
    resume: bool,
    /// Start over in an --out that holds a previous run (its files are deleted first).
    #[arg(long)]
    force: bool,
    /// Start from a pretrained FLAVA directory or Hugging Face Hub id (`facebook/flava-full`).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Freeze a tower: image, text or multimodal (repeatable).
    #[arg(long = "freeze")]
    freeze: Vec<flava_fusion::Tower>,
    /// Unimodal phases before joint training: images:N,text:N,pairs:N,joint:N (or P%).
    #[arg(long)]
    phases: Option<String>,
    /// Codebook directory (HF layout) or Hub id (`facebook/flava-image-codebook`); a dVAE is
    /// trained first when absent.
    #[arg(long)]
    codebook: Option<PathBuf>,
    /// tokenizer.json or vocab.txt; a WordPiece tokenizer is trained first when absent.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// flex, cuda or wgpu.
    #[arg(long)]
    device: Option<String>,
    /// Several devices for data parallelism: cuda:0,cuda:1 (one replica and one share of each batch per device; flex,flex runs the same path on the CPU).
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
    /// Split every batch into K data shares (default: the number of processes under mpiexec,
    /// else 1); runs with the same K see the same batches however many processes or devices.
    #[arg(long)]
    data_shares: Option<usize>,
    /// Checkpoint every N steps.
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Seconds of dVAE training when no codebook is given.
    #[arg(long)]
    dvae_time: Option<f64>,
    /// Skip the final evaluation.
    #[arg(long)]
    no_eval: bool,
}

impl PretrainArgs {
    /// The configuration these options give, and whether to print it instead of running.
    pub fn into_config(self) -> anyhow::Result<(PretrainConfig, bool)> {
        let mut c = match &self.config {
            Some(p) => PretrainConfig::from_toml_file(p)?,
            None => PretrainConfig::default(),
        };
        if self.resume {
            // A resumed run continues with its own settings; options given now override them
            // (and `pretrain::run` refuses those that may not change).
            let out = self.out.clone().unwrap_or_else(|| c.out.clone());
            let saved = out.join("config.toml");
            if saved.is_file() {
                c = PretrainConfig::from_toml_file(&saved)?;
                c.out = out;
                // Per invocation, not part of the run.
                c.stop_after = None;
            }
        }
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            preset,
            mix,
            steps,
            batch_size,
            accumulate,
            lr,
            warmup,
            weight_decay,
            grad_clip,
            out,
            device,
            checkpoint_every,
            seed
        );
        for (dst, src) in [
            (&mut c.pairs, self.pairs),
            (&mut c.images, self.images),
            (&mut c.text, self.text),
        ] {
            if !src.is_empty() {
                *dst = src;
            }
        }
        if self.stop_after.is_some() {
            c.stop_after = self.stop_after;
        }
        if self.resume {
            c.resume = true;
        }
        c.force = self.force;
        for (dst, src) in [
            (&mut c.init, self.init),
            (&mut c.codebook, self.codebook),
            (&mut c.tokenizer, self.tokenizer),
        ] {
            if src.is_some() {
                *dst = src;
            }
        }
        if !self.freeze.is_empty() {
            c.freeze = self.freeze;
        }
        if self.phases.is_some() {
            c.phases = self.phases;
        }
        if !self.devices.is_empty() {
            c.devices = self.devices;
        }
        if self.data_shares.is_some() {
            c.data_shares = self.data_shares;
        }
        if let Some(t) = self.dvae_time {
            c.dvae.time_limit_s = t;
        }
        if self.no_eval {
            c.eval.skip = true;
        }
        Ok((c, self.print_config))
    }
}

/// Runs the command.
pub fn run(args: PretrainArgs, limits: &[String]) -> anyhow::Result<()> {
    let (mut cfg, print) = args.into_config()?;
    cfg.limits = super::parse_limits(cfg.limits, limits)?;
    if print {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    let job = Job::start()?;
    let (rank, world) = (job.group.get().rank(), job.group.get().world());
    let result = if rank == 0 {
        pretrain::run_in_group(&cfg, &job.group, &mut ProgressBars::new())
    } else {
        pretrain::run_in_group(&cfg, &job.group, &mut OtherRank(rank))
    };
    let summary = match result {
        Ok(s) => s,
        Err(e) if world > 1 => {
            // Bring every rank down with this message, not leave them waiting in a collective.
            // The message goes out in one write, and the abort waits a moment: the launcher
            // forwards output asynchronously and drops what is pending when the job is killed.
            // Other ranks wait longer, so an error every rank saw is reported by rank 0.
            use std::io::Write;
            let msg = format!("error: rank {rank} of {world}: {e:#}\n");
            let mut err = std::io::stderr().lock();
            err.write_all(msg.as_bytes()).ok();
            err.flush().ok();
            drop(err);
            std::thread::sleep(std::time::Duration::from_millis(if rank == 0 { 500 } else { 1500 }));
            job.abort()
        }
        Err(e) => return Err(e),
    };
    if let Some(report) = &summary.eval {
        print!("{}", flava_train::eval::render_report(report));
        println!("evaluation saved to {}", cfg.out.join("eval.json").display());
    }
    Ok(())
}

/// A rank other than 0: its warnings, prefixed with the rank; rank 0 reports the rest.
struct OtherRank(usize);

impl Observer for OtherRank {
    fn on_message(&mut self, msg: &str) {
        if msg.starts_with("warning") {
            eprintln!("rank {}: {msg}", self.0);
        }
    }
}

/// This process's place in the job: alone, or a rank of an MPI job when a launcher started it.
struct Job {
    group: Group,
    #[cfg(feature = "mpi")]
    mpi: Option<Arc<flava_train::distributed::MpiGroup>>,
}

impl Job {
    #[cfg(feature = "mpi")]
    fn start() -> anyhow::Result<Self> {
        if launched_world_size().is_none() {
            return Ok(Self {
                group: Group::new(Arc::new(SingleProcess)),
                mpi: None,
            });
        }
        let mpi = Arc::new(flava_train::distributed::MpiGroup::init()?);
        Ok(Self {
            group: Group::new(mpi.clone()),
            mpi: Some(mpi),
        })
    }

    #[cfg(not(feature = "mpi"))]
    fn start() -> anyhow::Result<Self> {
        match launched_world_size() {
            Some(n) if n > 1 => anyhow::bail!(
                "started as one of {n} processes (mpiexec or srun), but this flava was built without MPI: every process would train alone into the same run directory. Build it with `--features mpi`, or start one process"
            ),
            _ => Ok(Self {
                group: Group::new(Arc::new(SingleProcess)),
            }),
        }
    }

    /// Ends the whole job (every rank) with a failure.
    fn abort(&self) -> ! {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            m.abort(1)
        }
        std::process::exit(1)
    }
}
