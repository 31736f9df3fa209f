//! Downstream task files in their real layouts (miniature copies in tests/fixtures/tasks):
//! ImageFolder, CSV and JSONL with image/text/label columns, GLUE TSVs (with a header, CoLA's
//! headerless train/dev layout, STS-B scores, an unlabelled test split), and bad rows counted.

use std::path::PathBuf;

use flava_data::sources::SkipReason;
use flava_data::tasks::{open_task, ImageRef, Metric, Target, TaskKind, TaskOptions};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tasks")
}

fn spec(prefix: &str, file: &str) -> String {
    format!("{prefix}{}", dir().join(file).display())
}

fn label(t: &Option<Target>) -> &str {
    match t {
        Some(Target::Label(l)) => l,
        other => panic!("not a label: {other:?}"),
    }
}

#[test]
fn image_folders_are_labelled_by_folder() {
    for s in [spec("imagefolder:", "imagefolder"), spec("", "imagefolder")] {
        let t = open_task(&s, &TaskOptions::default()).unwrap();
        assert_eq!((t.kind, t.metric), (TaskKind::Image, Metric::Accuracy));
        assert_eq!(t.labels.as_deref(), Some(&["cat".to_string(), "dog".to_string()][..]));
        let labels: Vec<&str> = t.examples.iter().map(|e| label(&e.target)).collect();
        assert_eq!(labels, ["cat", "cat", "dog", "dog"]);
        assert!(matches!(&t.examples[0].image, Some(ImageRef::File(p)) if p.ends_with("cat/0.png")));
    }
}

#[test]
fn csv_and_jsonl_tables_choose_the_task_by_their_columns() {
    let t = open_task(&spec("csv:", "pairs.csv"), &TaskOptions::default()).unwrap();
    assert_eq!(t.kind, TaskKind::Multimodal);
    assert_eq!(t.examples.len(), 2, "the row without text is skipped");
    assert_eq!(t.skipped.get(&SkipReason::MissingCaption), Some(&1));
    assert_eq!(t.examples[0].text.as_deref(), Some("a green, dark square"));
    assert_eq!(label(&t.examples[1].target), "no");
    assert!(matches!(&t.examples[0].image, Some(ImageRef::File(p)) if p.ends_with("img/0.png") && p.is_file()));
    let j = open_task(&spec("jsonl:", "memes_like.jsonl"), &TaskOptions::default()).unwrap();
    assert_eq!((j.kind, j.examples.len()), (TaskKind::Multimodal, 2));
    assert_eq!(
        j.skipped.get(&SkipReason::BadJson),
        Some(&1),
        "the malformed line is counted"
    );
    assert_eq!((j.examples[0].id.as_str(), label(&j.examples[0].target)), ("a1", "1"));
}

#[test]
fn glue_files_as_distributed() {
    let sst = open_task(&spec("glue:sst2:", "sst2.tsv"), &TaskOptions::default()).unwrap();
    assert_eq!(
        (sst.kind, sst.metric, sst.examples.len()),
        (TaskKind::Text, Metric::Accuracy, 2)
    );
    assert_eq!(label(&sst.examples[1].target), "0");
    let qnli = open_task(&spec("glue:qnli:", "qnli.tsv"), &TaskOptions::default()).unwrap();
    assert_eq!(qnli.examples.len(), 2, "the row with label `maybe` is skipped");
    assert_eq!(qnli.examples[0].text.as_deref(), Some("what is red?"));
    assert_eq!(qnli.examples[0].text_pair.as_deref(), Some("the circle is red."));
    assert_eq!(qnli.labels.as_ref().map(Vec::len), Some(2));
    let sts = open_task(&spec("glue:stsb:", "stsb.tsv"), &TaskOptions::default()).unwrap();
    assert_eq!(sts.metric, Metric::Pearson);
    assert_eq!(sts.examples[1].target, Some(Target::Value(3.8)));
    let cola = open_task(&spec("glue:cola:", "cola.tsv"), &TaskOptions::default()).unwrap();
    assert_eq!((cola.metric, cola.examples.len()), (Metric::Matthews, 2));
    assert_eq!(cola.examples[1].text.as_deref(), Some("They drank the pub."));
    assert_eq!(label(&cola.examples[1].target), "0");
    let test = open_task(&spec("glue:sst2:", "test_unlabelled.tsv"), &TaskOptions::default()).unwrap();
    assert!(test.examples[0].target.is_none());
    let e = open_task(&spec("glue:imdb:", "sst2.tsv"), &TaskOptions::default()).unwrap_err();
    assert!(e.to_string().contains("unknown GLUE task `imdb`"), "{e}");
    let e = open_task(&spec("glue:qnli:", "sst2.tsv"), &TaskOptions::default()).unwrap_err();
    assert!(e.to_string().contains("no column `question`"), "{e}");
}

#[test]
fn memes_snli_ve_and_vqa_as_distributed() {
    let m = open_task(&spec("memes:", "memes.jsonl"), &TaskOptions::default()).unwrap();
    assert_eq!(
        (m.kind, m.metric, m.examples.len()),
        (TaskKind::Multimodal, Metric::Auroc, 3)
    );
    assert_eq!(
        (m.examples[0].id.as_str(), label(&m.examples[1].target)),
        ("42953", "1")
    );
    assert!(m.examples[2].target.is_none(), "the test split has no label");
    assert!(matches!(&m.examples[0].image, Some(ImageRef::File(p)) if p.is_file()));
    let d = dir();
    let s = open_task(
        &format!(
            "snli-ve:{}:{}",
            d.join("snli_ve.jsonl").display(),
            d.join("flickr30k").display()
        ),
        &TaskOptions::default(),
    )
    .unwrap();
    assert_eq!((s.examples.len(), s.skipped.get(&SkipReason::BadJson)), (2, Some(&1)));
    assert_eq!(label(&s.examples[1].target), "neutral");
    assert!(matches!(&s.examples[0].image, Some(ImageRef::File(p)) if p.is_file()));
    let v = d.join("vqa");
    let q = v.join("v2_OpenEnded_mscoco_val2014_questions.json");
    let a = v.join("v2_mscoco_val2014_annotations.json");
    let t = open_task(
        &format!("vqa:{}:{}:{}", q.display(), a.display(), v.join("val2014").display()),
        &TaskOptions::default(),
    )
    .unwrap();
    assert_eq!(
        (t.metric, t.examples.len()),
        (Metric::VqaAccuracy, 2),
        "the unannotated question is skipped"
    );
    let Some(Target::Answers(ans)) = &t.examples[0].target else {
        panic!("answers")
    };
    assert_eq!((ans.len(), flava_data::tasks::vqa_score("grey", ans)), (10, 0.6));
    assert!(
        matches!(&t.examples[0].image, Some(ImageRef::File(p)) if p.is_file()),
        "COCO file names"
    );
    let test = open_task(
        &format!("vqa:{}:-:{}", q.display(), v.join("val2014").display()),
        &TaskOptions::default(),
    )
    .unwrap();
    assert_eq!(test.examples.len(), 3);
    assert!(test.examples.iter().all(|e| e.target.is_none()));
}
