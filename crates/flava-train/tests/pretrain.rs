//! Pretraining on a few steps of synthetic data (tiny preset), in process through the library
//! (`flava_train::pretrain::run_with`): the default run's first 50 losses, exact resume, data
//! parallelism, a crash in the middle of a checkpoint, the non-finite guard, fallback from a
//! damaged checkpoint, refusals. A few tests run the `flava` binary end to end.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use flava_train::observer::{Collect, Observer, StepMetrics};
use flava_train::pretrain::config::PretrainConfig;
use flava_train::pretrain::{self, RunSummary};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flava-pretrain-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small, fast configuration: tiny preset, batch 8, round-robin from the first step, the
/// fixture codebook, a short evaluation (`skip = true` in `[eval]` when `skip_eval`).
fn config(dir: &Path, extra: &str) -> PathBuf {
    let p = dir.join("run.toml");
    let (extra, skip) = match extra.split_once("[eval]") {
        Some((top, ev)) => (top.to_string(), ev.trim().to_string()),
        None => (extra.to_string(), String::new()),
    };
    let steps = if extra.contains("steps =") { "" } else { "steps = 6\n" };
    let text = format!(
        "preset = \"tiny\"\nbatch_size = 8\n{steps}warmup = 2\nworkers = 1\ncheckpoint_every = 3\nphases = \"joint\"\n\
         codebook = {:?}\nout = {:?}\n{extra}\n[eval]\nzero_shot_images = 48\nretrieval_pairs = 40\nmasked_samples = 16\n{skip}\n",
        fixtures().join("codebook"),
        dir.join("run"),
    );
    std::fs::write(&p, text).unwrap();
    p
}

fn flava(args: &[&str], cfg: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flava"))
        .arg("pretrain")
        .arg("--config")
        .arg(cfg)
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: &Output) -> String {
    let s = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "stdout:\n{s}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    s
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn losses(run: &Path) -> Vec<(u64, f64)> {
    metrics(run)
        .iter()
        .map(|r| (r["step"].as_u64().unwrap(), r["loss"].as_f64().unwrap()))
        .collect()
}

/// In-process runs share the device's seeded RNG (initial weights): one at a time.
static ONE_RUN_AT_A_TIME: Mutex<()> = Mutex::new(());

/// An observer that records everything and injects faults: a NaN loss at the given batches
/// (counted from 1 over the whole run), a crash (panic) in the middle of one checkpoint write.
#[derive(Default)]
struct Probe {
    seen: Collect,
    batches: usize,
    nan_at: Vec<usize>,
    crash_in_checkpoint: Option<usize>,
}

impl Probe {
    fn text(&self) -> String {
        self.seen.messages.join("\n")
    }
    fn updates(&self) -> Vec<&StepMetrics> {
        self.seen.steps.iter().filter(|m| m.updated).collect()
    }
}

impl Observer for Probe {
    fn on_step(&mut self, m: &StepMetrics) {
        self.seen.on_step(m);
    }
    fn on_message(&mut self, msg: &str) {
        self.seen.on_message(msg);
    }
    fn inspect_loss(&mut self, _step: usize, loss: f64) -> f64 {
        self.batches += 1;
        if self.nan_at.contains(&self.batches) {
            f64::NAN
        } else {
            loss
        }
    }
    fn before_commit(&mut self, step: usize, _tmp: &Path) {
        if self.crash_in_checkpoint == Some(step) {
            panic!("injected crash while writing the checkpoint of step {step}");
        }
    }
}

/// Runs the configuration file `cfg` (edited by `edit`) in process.
fn train(cfg: &Path, edit: impl FnOnce(&mut PretrainConfig), probe: &mut Probe) -> anyhow::Result<RunSummary> {
    let _one = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = PretrainConfig::from_toml_file(cfg).unwrap();
    edit(&mut c);
    pretrain::run_with(&c, probe)
}

fn keep(_: &mut PretrainConfig) {}

/// The default run (`flava pretrain` with no options) as it was recorded, with its 60 warmup
/// steps (the default then; 300 since 2026-12-07), the fixture tokenizer and codebook (the run
/// trains both otherwise, and the `tokenizers` trainer is not deterministic): the first 50
/// steps' losses equal those recorded before training became a library
/// (`tests/fixtures/default_run/losses.json`, see its README), within 1e-5.
#[test]
fn the_default_runs_first_50_steps_are_unchanged() {
    let dir = scratch("default50");
    let fx = fixtures().join("default_run");
    let cfg = PretrainConfig {
        warmup: 60,
        tokenizer: Some(fx.join("tokenizer.json")),
        codebook: Some(fixtures().join("codebook")),
        stop_after: Some(50),
        out: dir.join("run"),
        ..Default::default()
    };
    let mut probe = Probe::default();
    {
        let _one = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        pretrain::run_with(&cfg, &mut probe).unwrap();
    }
    let want: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fx.join("losses.json")).unwrap()).unwrap();
    let got = probe.updates();
    assert_eq!((got.len(), want.len()), (50, 50));
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.step as u64, w["step"].as_u64().unwrap());
        assert_eq!(g.task, w["task"].as_str().unwrap(), "step {}", g.step);
        for (k, v) in w.as_object().unwrap() {
            let Some(v) = v.as_f64() else { continue };
            if k == "step" {
                continue;
            }
            let x = match k.as_str() {
                "loss" => g.loss,
                "lr" => g.lr,
                "grad_norm" => g.grad_norm,
                _ => g.term(k).unwrap_or_else(|| panic!("step {}: no {k}", g.step)),
            };
            assert!((x - v).abs() <= 1e-5, "step {} {k}: {x} now vs {v} before", g.step);
        }
    }
    // metrics.jsonl has the same numbers.
    let m = losses(&dir.join("run"));
    assert_eq!(m.len(), 50);
    assert!((m[49].1 - want[49]["loss"].as_f64().unwrap()).abs() <= 1e-5);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn stopping_and_resuming_gives_the_same_losses_as_one_run() {
    let dir = scratch("resume");
    let whole = dir.join("whole");
    std::fs::create_dir_all(&whole).unwrap();
    let cfg = config(&whole, "steps = 9\n[eval]\nskip = true");
    train(&cfg, keep, &mut Probe::default()).unwrap();
    let want = losses(&whole.join("run"));
    assert_eq!(want.len(), 9);

    // The same tokenizer for both: the `tokenizers` trainer breaks ties between equally frequent
    // merges in hash-map order, so two trainings need not give the same vocabulary.
    let parts = dir.join("parts");
    std::fs::create_dir_all(&parts).unwrap();
    let tokenizer = whole.join("run").join("tokenizer.json");
    let cfg = config(
        &parts,
        &format!("steps = 9\ntokenizer = {tokenizer:?}\n[eval]\nskip = true"),
    );
    let mut first = Probe::default();
    let s = train(&cfg, |c| c.stop_after = Some(4), &mut first).unwrap();
    assert_eq!(s.steps, 4);
    assert!(first.text().contains("stopped after step 4"), "{}", first.text());
    let mut second = Probe::default();
    train(&cfg, |c| c.resume = true, &mut second).unwrap();
    assert!(second.text().contains("(step 4)"), "{}", second.text());
    let got = losses(&parts.join("run"));
    assert_eq!(got.len(), 9);
    for ((s, a), (_, b)) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-6, "step {s}: {a} resumed vs {b} uninterrupted");
    }
    std::fs::remove_dir_all(dir).ok();
}

/// Data parallelism over two replicas (`devices = flex,flex`: the multi-GPU code path, run on
/// the CPU) trains as one device does on the same batches: the same losses at every step, within
/// float summation order (1e-4), as plain training and as `accumulate = 2`.
#[test]
fn data_parallel_training_gives_the_losses_of_one_device() {
    let dir = scratch("dp");
    let tokenizer = {
        let one = dir.join("one");
        std::fs::create_dir_all(&one).unwrap();
        train(
            &config(&one, "steps = 4\n[eval]\nskip = true"),
            keep,
            &mut Probe::default(),
        )
        .unwrap();
        one.join("run").join("tokenizer.json")
    };
    let want = losses(&dir.join("one").join("run"));
    type Edit = fn(&mut PretrainConfig);
    let strategies: [(&str, Edit); 2] = [
        ("dp", |c| c.devices = vec!["flex".into(), "flex".into()]),
        ("acc", |c| c.accumulate = 2),
    ];
    for (name, edit) in strategies {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let cfg = config(
            &d,
            &format!("steps = 4\ntokenizer = {tokenizer:?}\n[eval]\nskip = true"),
        );
        let mut probe = Probe::default();
        train(&cfg, edit, &mut probe).unwrap();
        if name == "dp" {
            assert!(
                probe.text().contains("data parallel over 2 devices"),
                "{}",
                probe.text()
            );
        }
        let got = losses(&d.join("run"));
        assert_eq!(got.len(), 4);
        for ((s, a), (_, b)) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-4, "{name} step {s}: {a} vs {b} on one device");
        }
    }
    let e = train(
        &config(&dir, ""),
        |c| {
            c.devices = vec!["flex".into(), "flex".into()];
            c.batch_size = 6;
            c.accumulate = 2;
        },
        &mut Probe::default(),
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("on each of 2 devices"), "{e:#}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_crash_while_writing_a_checkpoint_resumes_from_the_last_complete_one() {
    let dir = scratch("crash");
    let cfg = config(&dir, "steps = 9\n[eval]\nskip = true");
    let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut probe = Probe {
            crash_in_checkpoint: Some(6),
            ..Default::default()
        };
        train(&cfg, keep, &mut probe)
    }));
    assert!(crashed.is_err(), "the run was meant to die");
    let ckpts = dir.join("run/checkpoints");
    assert!(ckpts.join("step-00000003/state.json").is_file());
    assert!(
        ckpts.join("step-00000006.tmp").is_dir(),
        "the interrupted write is left behind"
    );
    assert!(!ckpts.join("step-00000006").exists());
    let mut probe = Probe::default();
    train(&cfg, |c| c.resume = true, &mut probe).unwrap();
    assert!(probe.text().contains("(step 3)"), "{}", probe.text());
    assert!(!ckpts.join("step-00000006.tmp").exists());
    let m = losses(&dir.join("run"));
    assert_eq!(m.iter().map(|x| x.0).collect::<Vec<_>>(), (1..=9).collect::<Vec<_>>());
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn non_finite_losses_are_skipped_then_stop_the_run() {
    let dir = scratch("nan");
    // Batch 2 (an image batch) gets a NaN loss: skipped, counted, training goes on.
    let cfg = config(&dir, "[eval]\nskip = true");
    let mut probe = Probe {
        nan_at: vec![2],
        ..Default::default()
    };
    let s = train(&cfg, keep, &mut probe).unwrap();
    assert_eq!(s.nonfinite, 1);
    assert!(
        probe.text().contains("non-finite loss at step 2 (images batch)"),
        "{}",
        probe.text()
    );
    assert!(
        probe.text().contains("1 non-finite loss(es) skipped"),
        "{}",
        probe.text()
    );
    assert_eq!(
        metrics(&dir.join("run")).len(),
        6,
        "6 optimizer steps despite the skipped batch"
    );

    let dir2 = scratch("nan-stop");
    let cfg = config(&dir2, "max_nonfinite = 3\n[eval]\nskip = true");
    let mut probe = Probe {
        nan_at: vec![2, 3, 4],
        ..Default::default()
    };
    let e = format!("{:#}", train(&cfg, keep, &mut probe).unwrap_err());
    assert!(e.contains("3 non-finite losses in a row"), "{e}");
    assert!(
        dir2.join("run/checkpoints/step-00000001/state.json").is_file(),
        "saved before stopping"
    );
    std::fs::remove_dir_all(dir).ok();
    std::fs::remove_dir_all(dir2).ok();
}

/// A newest checkpoint whose files were damaged after it was written: resume says so and
/// continues from the one before; every step appears once in metrics.jsonl.
#[test]
fn a_damaged_newest_checkpoint_falls_back_to_the_one_before() {
    let dir = scratch("fallback");
    let cfg = config(&dir, "steps = 9\n[eval]\nskip = true");
    train(&cfg, |c| c.stop_after = Some(6), &mut Probe::default()).unwrap();
    let ckpts = dir.join("run/checkpoints");
    let newest = ckpts.join("step-00000006");
    let model = std::fs::read_dir(&newest)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("model"))
        .unwrap();
    let mut bytes = std::fs::read(&model).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    std::fs::write(&model, bytes).unwrap();
    let mut probe = Probe::default();
    train(&cfg, |c| c.resume = true, &mut probe).unwrap();
    let text = probe.text();
    assert!(text.contains("(step 3)"), "{text}");
    assert!(text.contains("fell back") && text.contains("checksum"), "{text}");
    let m = losses(&dir.join("run"));
    assert_eq!(m.iter().map(|x| x.0).collect::<Vec<_>>(), (1..=9).collect::<Vec<_>>());

    // Every checkpoint unreadable: an error, not a silent restart.
    for e in std::fs::read_dir(&ckpts).unwrap().flatten() {
        std::fs::write(e.path().join("state.json"), "{").unwrap();
    }
    let e = format!(
        "{:#}",
        train(&cfg, |c| c.resume = true, &mut Probe::default()).unwrap_err()
    );
    assert!(e.contains("no checkpoint"), "{e}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_previous_run_is_never_overwritten_without_resume_or_force() {
    let dir = scratch("guard");
    let run = dir.join("run");
    std::fs::create_dir_all(run.join("model")).unwrap();
    std::fs::write(run.join("model/config.json"), "{}").unwrap();
    std::fs::write(run.join("metrics.jsonl"), "{\"step\": 1}\n").unwrap();
    let cfg = config(&dir, "steps = 2\n[eval]\nskip = true");
    let e = format!("{:#}", train(&cfg, keep, &mut Probe::default()).unwrap_err());
    assert!(e.contains("already holds a run"), "{e}");
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl")).unwrap(),
        "{\"step\": 1}\n"
    );
    train(&cfg, |c| c.force = true, &mut Probe::default()).unwrap();
    assert_eq!(metrics(&run).len(), 2);
    std::fs::remove_dir_all(dir).ok();
}

/// A paired source whose every record is broken: the run ends with an error naming the source
/// and the reason, within a bounded time, instead of looping over it.
#[test]
fn an_all_broken_source_ends_the_run_with_its_reasons() {
    let dir = scratch("broken");
    std::fs::write(dir.join("junk.tar"), vec![1u8; 5000]).unwrap();
    let junk = dir.join("junk.tar").display().to_string();
    let tok = fixtures().join("tokenizer/tokenizer.json");
    let cfg = config(
        &dir,
        &format!(
            "pairs = [{junk:?}]\nimages = [{junk:?}]\ntext = [\"synthetic\"]\ntokenizer = {tok:?}\n[eval]\nskip = true"
        ),
    );
    let t0 = std::time::Instant::now();
    let mut probe = Probe::default();
    let e = format!("{:#}", train(&cfg, keep, &mut probe).unwrap_err());
    assert!(e.contains("BadShard") && e.contains("junk.tar"), "{e}");
    assert!(
        probe.seen.messages.len() < 100,
        "the log is bounded: {} messages",
        probe.seen.messages.len()
    );
    assert!(t0.elapsed().as_secs() < 120, "{:?}", t0.elapsed());
    std::fs::remove_dir_all(dir).ok();
}

/// A resumed run must train with the codebook it started with: one changed on disk in between
/// (here a weight nudged, so it still loads) is refused, naming the codebook.
#[test]
fn resume_refuses_a_codebook_that_changed_since_the_run_started() {
    let dir = scratch("fingerprint");
    let cb = dir.join("codebook");
    std::fs::create_dir_all(&cb).unwrap();
    for e in std::fs::read_dir(fixtures().join("codebook")).unwrap().flatten() {
        std::fs::copy(e.path(), cb.join(e.file_name())).unwrap();
    }
    let cfg = config(&dir, "[eval]\nskip = true");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&format!("{:?}", fixtures().join("codebook")), &format!("{cb:?}"));
    std::fs::write(&cfg, text).unwrap();
    train(&cfg, |c| c.stop_after = Some(3), &mut Probe::default()).unwrap();
    let w = cb.join("model.safetensors");
    let mut sd = flava_vit::StateDict::from_file(&w).unwrap();
    let first = sd.tensors.keys().next().unwrap().clone();
    sd.tensors.get_mut(&first).unwrap().data[0] += 0.5;
    sd.save_safetensors(&w).unwrap();
    let e = format!(
        "{:#}",
        train(&cfg, |c| c.resume = true, &mut Probe::default()).unwrap_err()
    );
    assert!(e.contains("the codebook differs"), "{e}");
    std::fs::remove_dir_all(dir).ok();
}

// The command line end to end: a whole run and its model in `flava eval` and `flava embed`,
// the configuration file and flags, resume from the run directory alone, refusals.

#[test]
fn pretrain_runs_end_to_end_and_its_model_loads_everywhere() {
    let dir = scratch("e2e");
    // No codebook: the run trains its tokenizer and a dVAE (2 s) first, as the default run does.
    let cfg = config(&dir, "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text.replace(&format!("codebook = {:?}\n", fixtures().join("codebook")), "");
    std::fs::write(
        &cfg,
        format!("{text}\n[dvae]\ntime_limit_s = 2.0\nvocab_size = 32\nhidden_size = 8\n"),
    )
    .unwrap();
    let out = ok(&flava(&[], &cfg));
    let run = dir.join("run");
    assert!(
        out.contains("tokenizer: WordPiece") && out.contains("zero-shot top-1"),
        "{out}"
    );
    for f in [
        "config.toml",
        "tokenizer.json",
        "dvae/codebook/config.json",
        "metrics.jsonl",
        "loss_curves.png",
        "eval.json",
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "model/preprocessor_config.json",
        "report.html",
        "report_data.json",
    ] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    let m = metrics(&run);
    assert_eq!(m.len(), 6);
    let tasks: Vec<&str> = m.iter().map(|r| r["task"].as_str().unwrap()).collect();
    assert_eq!(
        tasks,
        ["pairs", "images", "text", "pairs", "images", "text"],
        "round-robin"
    );
    for r in &m {
        for k in ["step", "loss", "lr", "step_time_s", "samples_per_s", "skipped"] {
            assert!(r[k].is_number(), "{k} in {r}");
        }
    }
    // The end-of-run summary and eval.json carry samples and skips per source.
    assert!(out.contains("data pairs: synthetic"), "{out}");
    let ev: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("eval.json")).unwrap()).unwrap();
    let pairs = ev["data"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(k, _)| k.starts_with("pairs"))
        .unwrap()
        .1;
    assert!(pairs["samples"].as_u64().unwrap() >= 16, "{pairs}");
    for k in ["global_contrastive", "itm", "mmm_image", "mmm_text"] {
        assert!(m[0][k].is_number(), "{k} in the paired step");
    }
    assert!(m[1]["mim"].is_number() && m[2]["mlm"].is_number());
    // The total is the sum of the step's losses.
    let sum: f64 = ["global_contrastive", "itm", "mmm_image", "mmm_text"]
        .iter()
        .map(|k| m[0][k].as_f64().unwrap())
        .sum();
    assert!((sum - m[0]["loss"].as_f64().unwrap()).abs() < 1e-4);
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("eval.json")).unwrap()).unwrap();
    // The classes are those present among the 48 images (most of the 24 colour-shape pairs).
    let classes = eval["zero_shot"]["classes"].as_array().unwrap();
    let known = flava_data::synthetic::class_names();
    assert!(classes.len() >= 12 && classes.iter().all(|c| known.contains(&c.as_str().unwrap().to_string())));
    assert_eq!(eval["zero_shot"]["n_images"], 48);
    assert_eq!(eval["retrieval"]["n_texts"], 40);
    for k in ["r1", "r5", "r10"] {
        assert!(eval["retrieval"]["image_to_text"][k].is_number());
    }
    assert!(eval["mlm_accuracy"].is_number() && eval["mim_accuracy"].is_number());

    // The model directory serves `flava eval` and `flava embed --itm`.
    let model = run.join("model");
    let z = Command::new(env!("CARGO_BIN_EXE_flava"))
        .args([
            "eval",
            "zero-shot",
            "--json",
            "--data",
            "synthetic:classes",
            "--max-images",
            "24",
            "--model",
        ])
        .arg(&model)
        .output()
        .unwrap();
    let z: serde_json::Value = serde_json::from_str(&ok(&z)).unwrap();
    assert_eq!(z["n_images"], 24);
    assert!(z["top1"].as_f64().unwrap() <= z["top5"].as_f64().unwrap());
    let r = Command::new(env!("CARGO_BIN_EXE_flava"))
        .args([
            "eval",
            "retrieval",
            "--json",
            "--pairs",
            "synthetic:heldout",
            "--max-pairs",
            "20",
            "--model",
        ])
        .arg(&model)
        .output()
        .unwrap();
    let r: serde_json::Value = serde_json::from_str(&ok(&r)).unwrap();
    assert_eq!((r["n_images"].as_u64(), r["n_texts"].as_u64()), (Some(20), Some(20)));
    let e = Command::new(env!("CARGO_BIN_EXE_flava"))
        .args(["embed", "--json", "--itm", "--text", "a big red circle", "--model"])
        .arg(&model)
        .arg("--image")
        .arg(fixtures().join("processor").join("rgba_80x64.png"))
        .output()
        .unwrap();
    let e: serde_json::Value = serde_json::from_str(&ok(&e)).unwrap();
    let p = e["itm_match_probability"][0][0].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p));
    check_report(&run);
    // A second run into the same directory must not overwrite it silently.
    let again = flava(&[], &cfg);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn print_config_shows_the_effective_options_and_bad_keys_are_named() {
    let dir = scratch("cfg");
    let cfg = config(&dir, "");
    let out = ok(&flava(
        &["--print-config", "--lr", "0.005", "--pairs", "data/{000..003}.tar"],
        &cfg,
    ));
    let v: toml::Value = toml::from_str(&out).unwrap();
    assert_eq!(v["lr"].as_float(), Some(0.005));
    assert_eq!(v["preset"].as_str(), Some("tiny"));
    assert_eq!(v["pairs"][0].as_str(), Some("data/{000..003}.tar"));
    assert_eq!(v["eval"]["retrieval_pairs"].as_integer(), Some(40));
    std::fs::write(dir.join("bad.toml"), "learning_rate = 1.0\n").unwrap();
    let out = flava(&[], &dir.join("bad.toml"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("learning_rate"));
    let out = flava(&["--accumulate", "3"], &cfg);
    assert!(String::from_utf8_lossy(&out.stderr).contains("must divide"));
    std::fs::remove_dir_all(dir).ok();
}

fn flava_raw(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flava")).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// `--resume` continues with the run's own config.toml (here a batch size given on the first
/// command line and the fixture codebook), retrains nothing, and refuses options that would
/// change the run.
#[test]
fn resume_keeps_the_runs_own_settings_and_refuses_changes() {
    let dir = scratch("resume-cfg");
    let cfg = config(&dir, "[eval]\nskip = true");
    ok(&flava(&["--stop-after", "3", "--batch-size", "4"], &cfg));
    let run = dir.join("run");
    let run_s = run.display().to_string();
    // No --config: everything comes from the run directory.
    let out = ok(&flava_raw(&["pretrain", "--out", &run_s, "--resume"]));
    assert!(out.contains("(step 3)"), "{out}");
    assert!(
        !out.contains("tokenizer: WordPiece") && !out.contains("dVAE: training"),
        "{out}"
    );
    let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    let v: toml::Value = toml::from_str(&saved).unwrap();
    assert_eq!(v["batch_size"].as_integer(), Some(4));
    assert!(v.get("codebook").is_some(), "{saved}");
    let m = metrics(&run);
    assert_eq!(
        m.iter().map(|r| r["step"].as_u64().unwrap()).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6]
    );

    let out = flava_raw(&[
        "pretrain",
        "--out",
        &run_s,
        "--resume",
        "--batch-size",
        "16",
        "--steps",
        "8",
    ]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("batch_size: 4 -> 16") && !e.contains("steps:"), "{e}");
    // A safe change is taken: more steps.
    let out = ok(&flava_raw(&["pretrain", "--out", &run_s, "--resume", "--steps", "7"]));
    assert!(out.contains("(step 6)"), "{out}");
    assert_eq!(metrics(&run).len(), 7);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn nonsense_values_are_refused_before_anything_runs() {
    let dir = scratch("nonsense");
    let cfg = config(&dir, "");
    for (args, want) in [
        (vec!["--lr=-1"], "--lr"),
        (vec!["--grad-clip=-1"], "--grad-clip"),
        (vec!["--weight-decay=-5"], "--weight-decay"),
        (vec!["--checkpoint-every", "0"], "--checkpoint-every"),
        (vec!["--dvae-time", "0"], "--dvae-time"),
        (vec!["--pairs", "d/{5..}.tar"], "needs both bounds"),
        (vec!["--batch-size", "1000000000"], "--batch-size"),
        (vec!["--workers", "1000000"], "--workers"),
    ] {
        let out = flava(&args, &cfg);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }
    assert!(!dir.join("run/checkpoints").exists());
    std::fs::remove_dir_all(dir).ok();
}

/// The run's `report.html`: every section with its figures, the examples' numbers, nothing
/// fetched from elsewhere, `flava report` rebuilding the same page, and (with a Chromium at
/// hand) the page rendered headless: every figure loads, the screenshot is not blank.
fn check_report(run: &Path) {
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    for id in ["curves", "eval", "confusion", "retrieval", "mim", "masks", "config"] {
        assert!(html.contains(&format!("<section id=\"{id}\">")), "section {id} missing");
    }
    for name in [
        "loss (pairs)",
        "loss (images)",
        "loss (text)",
        "global_contrastive",
        "mim",
        "mlm",
        "lr",
        "samples_per_s",
    ] {
        assert!(html.contains(&format!("data-title=\"{name}\"")), "chart {name} missing");
    }
    // Self-contained: no script, style, image or link fetched from a server.
    for attr in ["src=\"http", "href=\"http", "url(http", "@import"] {
        assert!(!html.contains(attr), "{attr} in the page");
    }
    let data: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("report_data.json")).unwrap()).unwrap();
    let counts = data["confusion"]["counts"].as_array().unwrap();
    let total: u64 = counts
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(total, 48, "every zero-shot image in the matrix");
    let retrieval = data["retrieval"].as_array().unwrap();
    assert_eq!(retrieval.len(), 6);
    assert!(retrieval.iter().all(|r| r["top"].as_array().unwrap().len() == 3));
    let mim = data["mim"].as_array().unwrap();
    assert_eq!(mim.len(), 4);
    for m in mim {
        // The run trained its dVAE, so the decoder's reconstructions are there.
        assert!(m["reconstruction"]
            .as_str()
            .unwrap()
            .starts_with("data:image/png;base64,"));
        let (masked, cells) = (
            m["masked_patches"][0].as_u64().unwrap(),
            m["masked_patches"][1].as_u64().unwrap(),
        );
        assert!(masked > 0 && masked < cells, "{masked} of {cells}");
    }
    // `flava report` rebuilds the same page from the files.
    let again = run.join("again.html");
    let o = Command::new(env!("CARGO_BIN_EXE_flava"))
        .arg("report")
        .arg(run)
        .arg("--out")
        .arg(&again)
        .output()
        .unwrap();
    ok(&o);
    assert_eq!(std::fs::read_to_string(&again).unwrap(), html);
    let figures = html.matches("<svg").count() + html.matches("<img").count();
    render_in_chromium(&run.join("report.html"), figures);
}

/// A headless Chromium, when there is one (`FLAVA_CHROMIUM`, or `chromium` on the PATH).
/// `FLAVA_REQUIRE_BROWSER=1` (set by `.ci/run`) makes a missing browser a failure.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FLAVA_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let found = ["chromium", "chromium-browser", "google-chrome"].iter().find_map(|b| {
        std::env::var_os("PATH")
            .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(b)).find(|p| p.is_file()))
    });
    if found.is_none() {
        assert!(
            std::env::var_os("FLAVA_REQUIRE_BROWSER").is_none(),
            "FLAVA_REQUIRE_BROWSER is set but no chromium was found"
        );
        eprintln!("no chromium on the PATH: the report's rendering check is skipped");
    }
    found
}

/// Runs Chromium headless on `page` (bounded to 90 s), returning its stdout.
fn headless(browser: &Path, page: &Path, extra: &[&str]) -> String {
    let profile = page.with_extension("chromium-profile");
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--virtual-time-budget=15000")
        .args(extra)
        .arg(format!("file://{}", page.canonicalize().unwrap().display()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Read while it runs: the dumped DOM (with its data URIs) is larger than a pipe holds.
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut out).unwrap();
        out
    });
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(90) {
            child.kill().ok();
            panic!("chromium did not finish in 90 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    reader.join().unwrap()
}

fn render_in_chromium(page: &Path, figures: usize) {
    let Some(browser) = chromium() else { return };
    let dom = headless(&browser, page, &["--dump-dom"]);
    let attr = |name: &str| -> usize {
        let at = dom.find(&format!("{name}=\"")).unwrap_or_else(|| {
            panic!(
                "{name} not set: the page's script did not run\n{}",
                &dom[..dom.len().min(2000)]
            )
        });
        let rest = &dom[at + name.len() + 2..];
        rest[..rest.find('"').unwrap()].parse().unwrap()
    };
    let (total, loaded) = (attr("data-figures-total"), attr("data-figures-loaded"));
    assert_eq!(total, figures, "figures in the rendered page");
    assert_eq!(loaded, total, "figures that rendered");
    let shot = page.with_extension("png");
    headless(
        &browser,
        page,
        &["--window-size=1280,3000", &format!("--screenshot={}", shot.display())],
    );
    let img = image::open(&shot).unwrap().to_rgb8();
    let non_white = img.pixels().filter(|p| p.0.iter().any(|&c| c < 235)).count();
    let colours: std::collections::BTreeSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    let share = non_white as f64 / (img.width() * img.height()) as f64;
    assert!(
        share > 0.03 && colours.len() > 200,
        "screenshot looks blank: {share:.3} non-white, {} colours",
        colours.len()
    );
}
