//! The `flava` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flava_data::masking::BlockMaskConfig;
use flava_data::stream::{SourceOptions, Task};
use flava_fusion::checkpoint::{convert_to_safetensors, find_weights};
use flava_train::pretrain::config::PretrainConfig;
use flava_train::{data_cmd, embed, eval_cmd, pick_device, pretrain};

#[derive(Parser)]
#[command(
    name = "flava",
    version,
    about = "FLAVA in Rust: pretrain, evaluate, embed, tokenize images, prepare data, convert checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Override a reader's resource limit, e.g. `--reader-limit max_image_pixels=200000000`
    /// (repeatable; names as in the `[limits]` section of `flava pretrain --print-config`).
    #[arg(long = "reader-limit", global = true, value_name = "NAME=VALUE")]
    limits: Vec<String>,
}

/// The default limits with `NAME=VALUE` overrides applied.
fn parse_limits(base: flava_vit::limits::Limits, overrides: &[String]) -> anyhow::Result<flava_vit::limits::Limits> {
    if overrides.is_empty() {
        return Ok(base);
    }
    let mut table = toml::Table::try_from(base)?;
    for o in overrides {
        let (k, v) = o
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--reader-limit {o}: expected NAME=VALUE"))?;
        let v: u64 = v
            .trim()
            .replace('_', "")
            .parse()
            .map_err(|_| anyhow::anyhow!("--reader-limit {o}: the value must be a whole number"))?;
        if !table.contains_key(k.trim()) {
            anyhow::bail!(
                "--reader-limit {o}: unknown limit `{k}` (one of {})",
                table.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        table.insert(
            k.trim().to_string(),
            toml::Value::Integer(v.min(i64::MAX as u64) as i64),
        );
    }
    let limits: flava_vit::limits::Limits = table.try_into()?;
    limits.validate().map_err(anyhow::Error::msg)?;
    Ok(limits)
}

#[derive(Subcommand)]
enum Command {
    /// Pretrain FLAVA (all six losses, round-robin over image, text and paired data). With no
    /// arguments: a tiny model on the built-in synthetic data, ending with an evaluation.
    Pretrain(Box<PretrainArgs>),
    /// Evaluate a model directory (ours or an HF FLAVA one).
    Eval {
        #[command(subcommand)]
        command: EvalCommand,
    },
    /// Image and text features, and their contrastive logits, from an HF-format FLAVA directory.
    Embed {
        /// Model directory: config.json, model.safetensors or pytorch_model.bin, tokenizer.json
        /// (or vocab.txt), preprocessor_config.json.
        #[arg(long)]
        model: PathBuf,
        /// An image file (repeatable).
        #[arg(long = "image")]
        images: Vec<PathBuf>,
        /// A text (repeatable).
        #[arg(long = "text")]
        texts: Vec<String>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Compute device: flex (CPU), cuda or wgpu (GPU features must be compiled in).
        #[arg(long, default_value = "flex")]
        device: String,
        /// Text length in tokens, [CLS] and [SEP] included.
        #[arg(long, default_value_t = flava_text::DEFAULT_MAX_LENGTH)]
        max_length: usize,
        /// Also print the ITM head's match probability for every (image, text) pair (needs a
        /// FlavaForPreTraining checkpoint).
        #[arg(long)]
        itm: bool,
    },
    /// Visual tokens of images from a codebook (or a full FLAVA directory's codebook).
    Codebook {
        /// A codebook directory (`facebook/flava-image-codebook` layout) or a FLAVA directory.
        #[arg(long)]
        model: PathBuf,
        /// An image file (repeatable).
        #[arg(long = "image", required = true)]
        images: Vec<PathBuf>,
        /// Print `{"tokens": [[u32; h*w]; n]}`.
        #[arg(long)]
        json: bool,
        /// Compute device: flex, cuda or wgpu.
        #[arg(long, default_value = "flex")]
        device: String,
    },
    /// Train a dVAE image tokenizer, or reconstruct an image with one.
    Dvae {
        #[command(subcommand)]
        command: DvaeCommand,
    },
    /// Draw BEiT block masks, to see and tune the masking.
    Masks {
        /// Patch grid, ROWSxCOLS.
        #[arg(long, default_value = "14x14")]
        grid: String,
        /// Most patches masked per image.
        #[arg(long, default_value_t = 75)]
        num_masking_patches: usize,
        /// Smallest block area.
        #[arg(long, default_value_t = 16)]
        min_patches: usize,
        /// Largest block area (default: the number of masking patches).
        #[arg(long)]
        max_patches: Option<usize>,
        /// Smallest block aspect ratio.
        #[arg(long, default_value_t = 0.3)]
        min_aspect: f64,
        /// Masks to draw.
        #[arg(long, default_value_t = 4)]
        samples: usize,
        /// Random seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also draw the masks into this PNG.
        #[arg(long)]
        png: Option<PathBuf>,
        /// Replace an existing --png file.
        #[arg(long)]
        force: bool,
        /// Print `{"masks": [[0|1; rows*cols]; samples]}` (row-major).
        #[arg(long)]
        json: bool,
    },
    /// Data utilities: write any source as WebDataset shards, inspect shards.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Convert a PyTorch checkpoint (`pytorch_model.bin`, `.pt`) to `model.safetensors`,
    /// without executing any pickled code.
    Convert {
        /// A `.bin`/`.pt` file, or a directory holding `pytorch_model.bin`.
        input: PathBuf,
        /// Output file (default: `model.safetensors` beside the input).
        output: Option<PathBuf>,
        /// Replace an existing output file.
        #[arg(long)]
        force: bool,
    },
}

/// `flava pretrain` options; each overrides the same key of `--config`.
#[derive(clap::Args)]
struct PretrainArgs {
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
    /// Start from a pretrained FLAVA directory (e.g. flava-full).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Freeze a tower: image, text or multimodal (repeatable).
    #[arg(long = "freeze")]
    freeze: Vec<String>,
    /// Unimodal phases before joint training: image:N,text:N,joint:N.
    #[arg(long)]
    phases: Option<String>,
    /// Codebook directory (HF layout); a dVAE is trained first when absent.
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
    fn into_config(self) -> anyhow::Result<(PretrainConfig, bool)> {
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
        if let Some(t) = self.dvae_time {
            c.dvae.time_limit_s = t;
        }
        if self.no_eval {
            c.eval.skip = true;
        }
        Ok((c, self.print_config))
    }
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Zero-shot classification: class names from the labels (ImageFolder folder names, or
    /// `synthetic:classes`), prompts from the templates, top-1 and top-5 accuracy.
    ZeroShot {
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// Labelled images: an ImageFolder directory or `synthetic:classes`.
        #[arg(long)]
        data: String,
        /// Prompt template with `{}` for the class (repeatable; several are averaged). Default "a
        /// photo of a {}.", or for `synthetic:classes` captions of every shape ("a big {} circle", ...).
        #[arg(long = "template")]
        templates: Vec<String>,
        /// Most images evaluated.
        #[arg(long, default_value_t = 50_000)]
        max_images: usize,
        /// Print `{"top1", "top5", "n_images", "classes"}`.
        #[arg(long)]
        json: bool,
        /// Compute device.
        #[arg(long, default_value = "flex")]
        device: String,
    },
    /// Image-text retrieval, R@1/5/10 both ways.
    Retrieval {
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// Image-caption pairs: shards, CSV/TSV, coco:ANN.json:DIR, synthetic:heldout.
        #[arg(long)]
        pairs: String,
        /// Most pairs evaluated.
        #[arg(long, default_value_t = 5_000)]
        max_pairs: usize,
        /// Print `{"image_to_text": {...}, "text_to_image": {...}, "n_images", "n_texts"}`.
        #[arg(long)]
        json: bool,
        /// Compute device.
        #[arg(long, default_value = "flex")]
        device: String,
    },
}

#[derive(Subcommand)]
enum DvaeCommand {
    /// Train on any image source (synthetic by default); the codebook is saved in the HF layout.
    Train {
        /// Image source spec.
        #[arg(long, default_value = "synthetic")]
        images: String,
        /// Held-out images for the final evaluation.
        #[arg(long, default_value = "synthetic:heldout")]
        eval: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// JSON file with any `DvaeTrainConfig` fields.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Optimizer steps (overrides the config).
        #[arg(long)]
        steps: Option<usize>,
        /// Stop after this many seconds (overrides the config).
        #[arg(long)]
        time_limit: Option<f64>,
        /// Continue from `OUT/checkpoint`.
        #[arg(long, conflicts_with = "force")]
        resume: bool,
        /// Start over in an --out that holds a previous dVAE run (its files are deleted first).
        #[arg(long)]
        force: bool,
        /// Compute device.
        #[arg(long, default_value = "flex")]
        device: String,
    },
    /// Write an image and its reconstruction side by side.
    Reconstruct {
        /// A directory written by `flava dvae train`.
        #[arg(long)]
        model: PathBuf,
        /// The image.
        #[arg(long)]
        image: PathBuf,
        /// Output PNG.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing output file.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Write a source (synthetic, shards, CSV, COCO, ImageFolder, text) as WebDataset shards.
    Shards {
        /// The source spec.
        #[arg(long)]
        from: String,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Samples per shard.
        #[arg(long, default_value_t = 1000)]
        shard_size: usize,
        /// What to read: pairs, images or text.
        #[arg(long, default_value = "pairs")]
        task: String,
        /// Stop after this many samples (the synthetic source has 20,000 per epoch).
        #[arg(long)]
        limit: Option<u64>,
        /// Write into an --out that already holds shards (they are deleted first).
        #[arg(long)]
        force: bool,
    },
    /// Count samples and members of shards (`data/{000..009}.tar`) and show the first sample.
    Inspect {
        /// Shard file or brace pattern.
        shards: String,
    },
}

fn parse_task(s: &str) -> anyhow::Result<Task> {
    match s {
        "pairs" => Ok(Task::Pairs),
        "images" => Ok(Task::Images),
        "text" => Ok(Task::Text),
        other => anyhow::bail!("unknown task `{other}` (pairs, images, text)"),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    flava_vit::limits::set(parse_limits(Default::default(), &cli.limits)?);
    match cli.command {
        Command::Pretrain(args) => {
            let (mut cfg, print) = args.into_config()?;
            cfg.limits = parse_limits(cfg.limits, &cli.limits)?;
            if print {
                print!("{}", cfg.to_toml());
                return Ok(());
            }
            let summary = pretrain::run_with(&cfg, &mut flava_train::observer::ProgressBars::new())?;
            if let Some(report) = &summary.eval {
                print!("{}", flava_train::eval::render_report(report));
                println!("evaluation saved to {}", cfg.out.join("eval.json").display());
            }
        }
        Command::Eval { command } => match command {
            EvalCommand::ZeroShot {
                model,
                data,
                templates,
                max_images,
                json,
                device,
            } => {
                let device = pick_device(&device)?;
                let z = eval_cmd::zero_shot(&model, &data, &templates, max_images, &device)?;
                if json {
                    println!("{}", serde_json::to_string(&z)?);
                } else {
                    println!(
                        "zero-shot on {} images, {} classes: top-1 {:.2}%, top-5 {:.2}% (chance {:.2}%)",
                        z.n_images,
                        z.classes.len(),
                        100.0 * z.top1,
                        100.0 * z.top5,
                        100.0 / z.classes.len() as f64
                    );
                }
            }
            EvalCommand::Retrieval {
                model,
                pairs,
                max_pairs,
                json,
                device,
            } => {
                let device = pick_device(&device)?;
                let r = eval_cmd::retrieval(&model, &pairs, max_pairs, &device)?;
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!("retrieval on {} images, {} texts:", r.n_images, r.n_texts);
                    for (name, x) in [("image->text", r.image_to_text), ("text->image", r.text_to_image)] {
                        println!(
                            "  {name}: R@1 {:.2}%  R@5 {:.2}%  R@10 {:.2}%",
                            100.0 * x.r1,
                            100.0 * x.r5,
                            100.0 * x.r10
                        );
                    }
                }
            }
        },
        Command::Embed {
            model,
            images,
            texts,
            json,
            device,
            max_length,
            itm,
        } => {
            let device = pick_device(&device)?;
            let out = embed::run(&model, &images, &texts, max_length, itm, &device)?;
            if json {
                println!("{}", serde_json::to_string(&out)?);
            } else {
                print!("{}", embed::render(&out, &images, &texts));
            }
        }
        Command::Codebook {
            model,
            images,
            json,
            device,
        } => {
            let device = pick_device(&device)?;
            let (tokens, side) = embed::codebook_tokens(&model, &images, &device)?;
            if json {
                println!("{}", serde_json::json!({ "tokens": tokens }));
            } else {
                for (p, t) in images.iter().zip(&tokens) {
                    println!("{} ({side}x{side} tokens):", p.display());
                    for row in t.chunks(side.max(1)) {
                        println!(
                            "  {}",
                            row.iter().map(|v| format!("{v:5}")).collect::<Vec<_>>().join("")
                        );
                    }
                }
            }
        }
        Command::Dvae {
            command:
                DvaeCommand::Train {
                    images,
                    eval,
                    out,
                    config,
                    steps,
                    time_limit,
                    resume,
                    force,
                    device,
                },
        } => {
            let device = pick_device(&device)?;
            let mut cfg: flava_dvae::dvae::DvaeTrainConfig = match &config {
                Some(p) => serde_json::from_str(&std::fs::read_to_string(p)?)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
                None => Default::default(),
            };
            if let Some(s) = steps {
                cfg.steps = s;
            }
            if time_limit.is_some() {
                cfg.time_limit_s = time_limit;
            }
            if force {
                flava_train::dvae_cmd::remove_previous(&out)?;
            }
            flava_train::dvae_cmd::train_cmd(
                &images,
                &eval,
                &out,
                cfg,
                resume,
                &device,
                &mut flava_train::observer::ProgressBars::new(),
            )?;
        }
        Command::Dvae {
            command:
                DvaeCommand::Reconstruct {
                    model,
                    image,
                    out,
                    force,
                },
        } => {
            flava_train::dvae_cmd::reconstruct_cmd(&model, &image, &out, force, &burn::prelude::Device::flex())?;
        }
        Command::Masks {
            grid,
            num_masking_patches,
            min_patches,
            max_patches,
            min_aspect,
            samples,
            seed,
            png,
            force,
            json,
        } => {
            let (height, width) = data_cmd::parse_grid(&grid)?;
            let cfg = BlockMaskConfig {
                height,
                width,
                num_masking_patches,
                min_num_patches: min_patches,
                max_num_patches: max_patches,
                min_aspect,
                max_aspect: None,
            };
            let masks = data_cmd::masks(cfg, samples, seed)?;
            if let Some(p) = &png {
                data_cmd::masks_png(&masks, height, width, p, force)?;
            }
            if json {
                let m: Vec<Vec<u8>> = masks.iter().map(|m| m.iter().map(|&b| b as u8).collect()).collect();
                println!("{}", serde_json::json!({ "masks": m }));
            } else {
                print!("{}", data_cmd::render_masks(&masks, height, width));
            }
        }
        Command::Data {
            command:
                DataCommand::Shards {
                    from,
                    out,
                    shard_size,
                    task,
                    limit,
                    force,
                },
        } => {
            data_cmd::shards(
                &from,
                parse_task(&task)?,
                &out,
                shard_size,
                limit,
                force,
                &SourceOptions::default(),
            )?;
        }
        Command::Data {
            command: DataCommand::Inspect { shards },
        } => data_cmd::inspect_cmd(&shards)?,
        Command::Convert { input, output, force } => {
            let input = if input.is_dir() {
                input.join("pytorch_model.bin")
            } else {
                input
            };
            let input = find_weights(&input)?;
            let output = output.unwrap_or_else(|| input.with_file_name("model.safetensors"));
            let same = output
                .canonicalize()
                .ok()
                .is_some_and(|o| input.canonicalize().ok() == Some(o));
            if same || output == input {
                anyhow::bail!(
                    "the output {} is the input: choose another output file",
                    output.display()
                );
            }
            if output.exists() && !force {
                anyhow::bail!("{} exists; pass --force to replace it", output.display());
            }
            eprintln!("reading {}", input.display());
            let (n, ignored) = convert_to_safetensors(&input, &output)?;
            println!("wrote {} tensors to {}", n, output.display());
            if !ignored.is_empty() {
                println!("dropped {} non-float buffers: {}", ignored.len(), ignored.join(", "));
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // Reuse freed memory across training steps instead of mmap/munmap per large tensor.
    flava_vit::kernels::tune_allocator();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
