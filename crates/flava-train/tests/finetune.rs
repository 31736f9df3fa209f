//! Fine-tuning through the library (`flava_train::finetune`), tiny models: a VQA run from a
//! model directory writes eval.json and a model/ that loads as a FlavaModel with the head's
//! keys beside it, resumes with each step once in metrics.jsonl, and refuses to overwrite a
//! run; a GLUE text task from scratch (`init = none`, tokenizer trained on the task) and an
//! ImageFolder task run end to end; bad options are errors.

use std::path::PathBuf;

use burn::prelude::*;
use flava_fusion::checkpoint::load_flava_model;
use flava_train::eval_cmd::classify;
use flava_train::finetune::{run, FinetuneConfig};
use flava_train::observer::Quiet;
use flava_vit::weights::StateDict;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flava-finetune-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    d
}

fn tiny(out: PathBuf, steps: usize) -> FinetuneConfig {
    FinetuneConfig {
        init: fixtures().join("embed_model").display().to_string(),
        data: "synthetic:vqa".into(),
        val: Some("synthetic:vqa:heldout".into()),
        steps,
        batch_size: 8,
        lr: 1e-3,
        warmup: 1,
        val_every: 3,
        checkpoint_every: 3,
        head_hidden: 16,
        synthetic_len: 48,
        max_length: 16,
        out,
        ..Default::default()
    }
}

fn metric_steps(out: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("val").is_none())
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn vqa_from_a_model_directory_saves_evaluates_and_resumes() {
    let out = scratch("vqa");
    let first = run(&tiny(out.clone(), 3), &mut Quiet).unwrap();
    assert_eq!(first.steps, 3);
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    assert_eq!(eval["task"], "vqa");
    assert_eq!(eval["metric"], "vqa_accuracy");
    let acc = eval["vqa_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc) && eval["n"].as_u64() == Some(12), "{eval}");
    // The run's report: its curves (training loss, validation), the task's numbers, the config.
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    for part in [
        "<section id=\"curves\">",
        "data-title=\"val vqa_accuracy\"",
        "<section id=\"eval\">",
        "<td>vqa_accuracy</td>",
        "<section id=\"config\">",
    ] {
        assert!(html.contains(part), "{part} missing from the finetune report");
    }
    // model/ loads as a FlavaModel (flava eval / embed), the head's keys beside the backbone's.
    let device = Device::flex();
    let loaded = load_flava_model(out.join("model"), &device).unwrap();
    assert!(loaded.report.missing.is_empty());
    assert!(
        loaded
            .report
            .unexpected
            .iter()
            .any(|k| k == "classifier.model.3.weight"),
        "{}",
        loaded.report
    );
    let sd = StateDict::from_file(out.join("model/model.safetensors")).unwrap();
    let answers = sd.get("classifier.model.3.bias").unwrap().shape[0];
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["task"]["labels"].as_array().unwrap().len(), answers);
    assert_eq!(cfg["id2label"].as_object().unwrap().len(), answers);
    // `flava eval classify` on model/ gives eval.json's number on the same validation set, and
    // one prediction (an answer of the vocabulary, its probability) per question.
    let opts = flava_data::tasks::TaskOptions {
        synthetic_len: 12,
        ..Default::default()
    };
    let preds = out.join("pred.jsonl");
    let c = classify(
        &out.join("model"),
        "synthetic:vqa:heldout",
        &opts,
        8,
        Some(&preds),
        &device,
        &mut Quiet,
    )
    .unwrap();
    let again = c.eval.vqa_accuracy.unwrap();
    assert!((again - acc).abs() < 1e-9, "classify {again} vs eval.json {acc}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&preds)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 12);
    let vocab = cfg["task"]["labels"].as_array().unwrap();
    for l in &lines {
        assert!(vocab.contains(&l["answer"]), "{l}");
        let p = l["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&p), "{l}");
    }
    // Without --resume the run is not overwritten; with it, steps 4..6 follow 1..3, each once.
    let e = run(&tiny(out.clone(), 6), &mut Quiet).unwrap_err().to_string();
    assert!(e.contains("already holds a fine-tuning run"), "{e}");
    let mut more = tiny(out.clone(), 6);
    more.resume = true;
    let second = run(&more, &mut Quiet).unwrap();
    assert_eq!(second.steps, 6);
    assert_eq!(metric_steps(&out), [1, 2, 3, 4, 5, 6]);
    std::fs::remove_dir_all(out).ok();
}

#[test]
fn glue_from_scratch_and_an_image_folder_run_end_to_end() {
    let out = scratch("glue");
    let cfg = FinetuneConfig {
        init: "none".into(),
        data: format!("glue:qnli:{}", fixtures().join("tasks/qnli.tsv").display()),
        val: Some(format!("glue:qnli:{}", fixtures().join("tasks/qnli.tsv").display())),
        steps: 2,
        batch_size: 2,
        val_every: 2,
        checkpoint_every: 2,
        head_hidden: 8,
        max_length: 16,
        out: out.clone(),
        ..Default::default()
    };
    let s = run(&cfg, &mut Quiet).unwrap();
    assert_eq!((s.best.task.as_str(), s.best.n), ("qnli", 2));
    assert!(s.best.accuracy.is_some() && s.best.f1.is_some() && s.best.auroc.is_some());
    assert!(
        out.join("tokenizer.json").is_file(),
        "a tokenizer trained on the task's text"
    );
    std::fs::remove_dir_all(&out).ok();
    let out = scratch("folder");
    let folder = fixtures().join("tasks/imagefolder").display().to_string();
    let cfg = FinetuneConfig {
        data: format!("imagefolder:{folder}"),
        val: Some(folder),
        steps: 2,
        batch_size: 4,
        val_every: 1,
        head_hidden: 8,
        ..tiny(out.clone(), 2)
    };
    let s = run(&cfg, &mut Quiet).unwrap();
    assert_eq!((s.best.task.as_str(), s.best.n), ("imagefolder", 4));
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn bad_options_are_errors() {
    for edit in [
        (|c: &mut FinetuneConfig| c.lr = 0.0) as fn(&mut FinetuneConfig),
        |c| c.batch_size = 0,
        |c| c.val_every = 0,
        |c| c.head_dropout = 1.0,
        |c| c.data = "synthetic:nothing".into(),
        |c| c.init = "/nonexistent/model".into(),
    ] {
        let mut c = tiny(scratch("bad"), 2);
        edit(&mut c);
        assert!(run(&c, &mut Quiet).is_err());
    }
}

/// A JSONL task (image + text + label) whose images are `good` readable copies and then a
/// truncated PNG, a text file named `.jpg`, an empty `.png` and a missing file.
fn corrupt_images_task(dir: &std::path::Path, good: usize) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let png = std::fs::read(fixtures().join("tasks/img/0.png")).unwrap();
    let mut lines = vec![];
    for i in 0..good {
        std::fs::write(dir.join(format!("good{i}.png")), &png).unwrap();
        lines.push(format!(
            r#"{{"image": "good{i}.png", "text": "a picture", "label": "{}"}}"#,
            i % 2
        ));
    }
    std::fs::write(dir.join("cut.png"), &png[..png.len() / 3]).unwrap();
    std::fs::write(dir.join("text.jpg"), b"this is not a jpeg").unwrap();
    std::fs::write(dir.join("empty.png"), b"").unwrap();
    for (i, name) in ["cut.png", "text.jpg", "empty.png", "missing.png"].iter().enumerate() {
        lines.push(format!(
            r#"{{"image": "{name}", "text": "a picture", "label": "{}"}}"#,
            i % 2
        ));
    }
    let file = dir.join("task.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    format!("jsonl:{}", file.display())
}

#[test]
fn unreadable_images_are_skipped_and_counted_and_a_batch_of_none_stops_the_run() {
    // Two readable images among four unreadable ones: training and validation go on, the four
    // counted as skipped in eval.json.
    let data_dir = scratch("corrupt-data");
    let spec = corrupt_images_task(&data_dir, 2);
    let out = scratch("corrupt");
    let cfg = FinetuneConfig {
        data: spec.clone(),
        val: Some(spec),
        steps: 1,
        batch_size: 8,
        val_every: 1,
        ..tiny(out.clone(), 1)
    };
    let s = run(&cfg, &mut Quiet).unwrap();
    assert_eq!((s.best.n, s.best.skipped), (2, 4), "{:?}", s.best);
    std::fs::remove_dir_all(&out).ok();
    std::fs::remove_dir_all(&data_dir).ok();
    // Every image unreadable: a clear error at the first step, not a panic or a NaN run.
    let data_dir = scratch("corrupt-all");
    let spec = corrupt_images_task(&data_dir, 0);
    let out = scratch("corrupt-all-out");
    let cfg = FinetuneConfig {
        data: spec.clone(),
        val: Some(spec),
        ..cfg
    };
    let cfg = FinetuneConfig {
        out: out.clone(),
        ..cfg
    };
    let err = format!("{:#}", run(&cfg, &mut Quiet).unwrap_err());
    assert!(err.contains("no usable example"), "{err}");
    std::fs::remove_dir_all(&out).ok();
    std::fs::remove_dir_all(&data_dir).ok();
}

/// Training batches are augmented (random crop; flip for image-only tasks) from a seeded RNG:
/// the same seed gives the same pixels, another seed others, and evaluation batches are the
/// plain transform.
#[test]
fn training_augmentation_is_seeded_and_evaluation_is_not_augmented() {
    use flava_data::tasks::{open_task, TaskOptions};
    use flava_train::embed::{find_processor, find_tokenizer};
    use flava_train::finetune::{Augment, Batcher, TaskHead};
    use rand::SeedableRng;

    let dir = fixtures().join("embed_model");
    let set = open_task(
        "synthetic:classes",
        &TaskOptions {
            synthetic_len: 4,
            ..Default::default()
        },
    )
    .unwrap();
    let batcher = Batcher {
        head: TaskHead::of(&set, 10).unwrap(),
        tokenizer: find_tokenizer(&dir).unwrap(),
        processor: find_processor(&dir).unwrap(),
        max_length: 8,
        keep_unlabelled: false,
    };
    let device = Device::flex();
    let refs: Vec<_> = set.examples.iter().collect();
    let pixels = |b: Option<flava_train::finetune::FinetuneBatch>| -> Vec<f32> {
        b.unwrap()
            .input
            .pixel_values
            .unwrap()
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    };
    let rng = |s: u64| rand_chacha::ChaCha8Rng::seed_from_u64(s);
    let a = Augment::default();
    let plain = pixels(batcher.batch(&refs, &device).unwrap().0);
    let one = pixels(batcher.augmented(&refs, &device, &a, &mut rng(1)).unwrap().0);
    let again = pixels(batcher.augmented(&refs, &device, &a, &mut rng(1)).unwrap().0);
    let other = pixels(batcher.augmented(&refs, &device, &a, &mut rng(2)).unwrap().0);
    assert_eq!(one, again);
    assert_ne!(one, other);
    assert_ne!(one, plain);
    // Scale [1, 1], ratio 1 and no flip: the whole (square) image, as the plain transform.
    let none = Augment {
        scale: (1.0, 1.0),
        ratio: (1.0, 1.0),
        hflip: false,
    };
    assert_eq!(
        pixels(batcher.augmented(&refs, &device, &none, &mut rng(3)).unwrap().0),
        plain
    );
    let bad = FinetuneConfig {
        augment: Some(Augment {
            scale: (0.0, 1.0),
            ..Augment::default()
        }),
        ..tiny(scratch("bad-augment"), 1)
    };
    assert!(format!("{:#}", run(&bad, &mut Quiet).unwrap_err()).contains("augment"));
}

#[test]
fn the_default_tokenizer_spells_the_synthetic_questions_in_whole_words() {
    // `flava pretrain` on its built-in data trains its tokenizer on the text-only corpus and the
    // captions; a model pretrained so must read the synthetic VQA questions as words, not as
    // letters and [UNK] (which made fine-tuning from it no better than from scratch).
    use flava_data::synthetic::{caption, scene, text_passage, Split};
    use flava_data::tasks::synthetic_question;
    use rand::SeedableRng;
    let cfg = flava_train::pretrain::config::PretrainConfig::default();
    let texts: Vec<String> = (0..2000u64)
        .flat_map(|i| {
            let objs = scene(cfg.seed, Split::Train, i);
            [text_passage(&objs, cfg.seed, i), caption(&objs, i)]
        })
        .collect();
    let dir = scratch("tokenizer");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    flava_text::train::train_wordpiece(texts.into_iter(), cfg.tokenizer_vocab_size, &path).unwrap();
    let tok = flava_text::Tokenizer::from_file(&path).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..300 {
        let (q, a) = synthetic_question(&scene(cfg.seed, Split::HeldOut, i), &mut rng);
        let enc = tok.inner().encode(q.as_str(), false).unwrap();
        let spaced = q.replace('?', " ?");
        let words: Vec<&str> = spaced.split_whitespace().collect();
        assert_eq!(enc.get_tokens(), words, "{q}");
        assert!(tok.inner().token_to_id(&a).is_some(), "answer {a} is not one token");
        seen.insert(q);
    }
    assert!(seen.len() > 30, "only {} distinct questions", seen.len());
    std::fs::remove_dir_all(&dir).ok();
}
