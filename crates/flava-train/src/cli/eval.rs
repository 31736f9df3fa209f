//! `flava eval zero-shot` and `flava eval retrieval` on a model directory (ours or HF's);
//! `flava eval classify` on a task model (fine-tuned, or a probe); `flava eval linear-probe`.

use std::path::PathBuf;

use clap::Subcommand;
use flava_data::tasks::TaskOptions;
use flava_fusion::Tower;
use flava_train::observer::{Observer, ProgressBars, Quiet};
use flava_train::probe::{self, ProbeConfig};
use flava_train::task_model::TaskEval;
use flava_train::{eval_cmd, pick_device};

/// The evaluations.
#[derive(Subcommand)]
pub enum EvalCommand {
    /// Zero-shot classification: class names from the labels (ImageFolder folder names, or
    /// `synthetic:classes`), prompts from the templates, top-1 and top-5 accuracy.
    ZeroShot {
        /// Model directory or Hugging Face Hub id (`facebook/flava-full`).
        #[arg(long)]
        model: PathBuf,
        /// Labelled images: an ImageFolder directory or `synthetic:classes`.
        #[arg(long)]
        data: String,
        /// Prompt template with `{}` for the class (repeatable; several are averaged). Default "a
        /// photo of a {}.", or for `synthetic:classes` captions of every shape ("a big {} circle", ...).
        #[arg(long = "template")]
        templates: Vec<String>,
        /// The candidate classes: `imagenet` (ImageNet-1k's 1,000, matched to an ImageNet
        /// validation tree's WordNet-id folders such as n01440764, or to the class names), or a
        /// file with one `label<TAB>name` (or `name`) per line. Default: the labels of the images.
        #[arg(long)]
        classes: Option<String>,
        /// Templates: `openai` (CLIP's 80 ImageNet templates) or a file with one per line; added
        /// to any --template.
        #[arg(long = "templates")]
        template_set: Option<String>,
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
        /// Model directory or Hugging Face Hub id (`facebook/flava-full`).
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
    /// A task model (`flava finetune`'s or `flava eval linear-probe`'s model/) on task data:
    /// the task's metrics, and predictions as JSONL.
    Classify {
        /// Task model directory (or a Hub id of one).
        #[arg(long)]
        model: PathBuf,
        /// Task data (the specs of `flava finetune --data`).
        #[arg(long)]
        data: String,
        /// Write one JSON line per example: `{"id", "label" | "answer" | "value", "score"}`.
        #[arg(long)]
        predictions: Option<PathBuf>,
        /// Examples per forward pass.
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// Examples of a synthetic set.
        #[arg(long, default_value_t = 1000)]
        synthetic_len: usize,
        /// Print the metrics as JSON (the layout of `eval.json`).
        #[arg(long)]
        json: bool,
        /// Compute device.
        #[arg(long, default_value = "flex")]
        device: String,
    },
    /// The paper's linear probe: CLS features (cached), logistic regression by L-BFGS, the L2
    /// strength chosen on --val, refitted on train + val; the probe saved as a task model.
    LinearProbe {
        /// Model directory (or Hub id) whose features are probed.
        #[arg(long)]
        model: PathBuf,
        /// Training data (task specs: imagefolder:DIR, csv:, jsonl:, glue:, synthetic:classes).
        #[arg(long)]
        train: String,
        /// Validation data (chooses the strength).
        #[arg(long)]
        val: String,
        /// Test data, scored with the refitted probe.
        #[arg(long)]
        test: Option<String>,
        /// The encoder whose CLS is the feature (default: the one the task reads).
        #[arg(long)]
        feature: Option<Tower>,
        /// Training examples per class (few-shot).
        #[arg(long)]
        fewshot_k: Option<usize>,
        /// Where feature files are written and reused from (default OUT/features).
        #[arg(long)]
        save_features: Option<PathBuf>,
        /// Output directory (model/, probe.json, features/).
        #[arg(long, default_value = "runs/linear-probe")]
        out: PathBuf,
        /// Examples per forward pass while extracting features.
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// L-BFGS iterations per fit.
        #[arg(long, default_value_t = 1000)]
        max_iter: u64,
        /// Examples of a synthetic training set (held-out sets get half).
        #[arg(long, default_value_t = 2000)]
        synthetic_len: usize,
        /// Seed of synthetic sets and of the few-shot choice.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print `probe.json`.
        #[arg(long)]
        json: bool,
        /// Compute device.
        #[arg(long, default_value = "flex")]
        device: String,
    },
}

/// Progress bars, or with `--json` (stdout is the result) messages on stderr only.
fn observer(json: bool) -> Box<dyn Observer> {
    if json {
        Box::new(Quiet)
    } else {
        Box::new(ProgressBars::new())
    }
}

/// One line per metric the evaluation has.
fn print_eval(what: &str, e: &TaskEval) {
    let mut parts = vec![];
    for (name, v) in [
        ("top-1", e.accuracy),
        ("top-5", e.top5),
        ("mean per-class recall", e.mean_per_class_recall),
        ("VQA accuracy", e.vqa_accuracy),
        ("AUROC", e.auroc),
        ("F1", e.f1),
        ("Matthews", e.matthews),
    ] {
        if let Some(v) = v {
            parts.push(format!("{name} {:.2}%", 100.0 * v));
        }
    }
    if let Some(p) = e.pearson {
        parts.push(format!("Pearson {p:.4}"));
    }
    println!(
        "{what} ({}, n = {}, {} skipped): {}",
        e.task,
        e.n,
        e.skipped,
        if parts.is_empty() {
            "no labels".to_string()
        } else {
            parts.join(", ")
        }
    );
}

/// Runs the command.
pub fn run(c: EvalCommand) -> anyhow::Result<()> {
    match c {
        EvalCommand::ZeroShot {
            model,
            data,
            templates,
            classes,
            template_set,
            max_images,
            json,
            device,
        } => {
            let device = pick_device(&device)?;
            let vocab = eval_cmd::Vocabulary {
                classes,
                templates: template_set,
            };
            let z = eval_cmd::zero_shot(&model, &data, &templates, &vocab, max_images, &device)?;
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
        EvalCommand::Classify {
            model,
            data,
            predictions,
            batch_size,
            synthetic_len,
            json,
            device,
        } => {
            let device = pick_device(&device)?;
            let opts = TaskOptions {
                synthetic_len,
                ..Default::default()
            };
            let mut bars = ProgressBars::new();
            let c = eval_cmd::classify(
                &model,
                &data,
                &opts,
                batch_size,
                predictions.as_deref(),
                &device,
                &mut bars,
            )?;
            if json {
                println!("{}", serde_json::to_string(&c)?);
            } else {
                print_eval("classify", &c.eval);
                if let Some(p) = &predictions {
                    println!("{} predictions written to {}", c.predictions, p.display());
                }
            }
        }
        EvalCommand::LinearProbe {
            model,
            train,
            val,
            test,
            feature,
            fewshot_k,
            save_features,
            out,
            batch_size,
            max_iter,
            synthetic_len,
            seed,
            json,
            device,
        } => {
            let device = pick_device(&device)?;
            let cfg = ProbeConfig {
                model,
                train,
                val,
                test,
                feature,
                fewshot_k,
                features_dir: save_features,
                out,
                batch_size,
                max_iter,
                synthetic_len,
                seed,
            };
            let r = probe::run(&cfg, &device, observer(json).as_mut())?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "linear probe on the {} CLS ({} features, {} training rows): strength {:.3e} (C = {:.3e})",
                    r.feature,
                    r.dim,
                    r.n_train,
                    r.strength,
                    1.0 / r.strength
                );
                print_eval("  validation (probe fitted on train)", &r.val);
                if let Some(t) = &r.test {
                    print_eval("  test (refitted on train + val)", t);
                }
                println!("  probe saved as a task model in {}", r.model_dir.display());
            }
        }
    }
    Ok(())
}
