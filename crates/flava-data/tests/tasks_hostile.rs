//! Hostile task files: over the size limit (refused before reading), empty and header-only
//! tables, every row bad, truncated VQA JSON, a VQA file with a lying shape. Each is a clear
//! error naming the file, never a panic. Every test here sets the same small file-size limit
//! (the limit is process-wide), so the tests can run in any order.

use std::path::{Path, PathBuf};

use flava_data::sources::{SkipReason, SourceError};
use flava_data::tasks::{open_task, TaskOptions};
use flava_vit::limits::{self, Limits};

const MAX_FILE: u64 = 4096;

fn setup(name: &str) -> PathBuf {
    limits::set(Limits {
        max_file_bytes: MAX_FILE,
        ..Default::default()
    });
    let d = std::env::temp_dir().join(format!("flava-tasks-hostile-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(dir: &Path, name: &str, body: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

fn open(spec: String) -> Result<flava_data::tasks::TaskSet, SourceError> {
    open_task(&spec, &TaskOptions::default())
}

#[test]
fn files_over_the_size_limit_are_refused_by_name() {
    let d = setup("big");
    let line = b"{\"text\": \"a sentence\", \"label\": \"0\", \"img\": \"x.png\"}\n";
    let big: Vec<u8> = line.iter().copied().cycle().take(MAX_FILE as usize + 100).collect();
    let jsonl = write(&d, "big.jsonl", &big);
    let tsv = write(
        &d,
        "big.tsv",
        &[b"sentence\tlabel\n".as_slice(), &[b'a'; 5000]].concat(),
    );
    let specs = [
        format!("jsonl:{}", jsonl.display()),
        format!("csv:{}", tsv.display()),
        format!("memes:{}", jsonl.display()),
        format!("snli-ve:{}:{}", jsonl.display(), d.display()),
        format!("glue:sst2:{}", tsv.display()),
        format!("vqa:{}:-:{}", jsonl.display(), d.display()),
    ];
    for spec in specs {
        match open(spec.clone()) {
            Err(SourceError::Read { path, message }) => {
                assert!(path == jsonl || path == tsv, "{spec}: {}", path.display());
                assert!(message.contains("limits.max_file_bytes"), "{spec}: {message}");
            }
            other => panic!(
                "{spec}: expected a size error, got {:?}",
                other.map(|t| t.examples.len())
            ),
        }
    }
}

#[test]
fn empty_header_only_and_all_bad_files_have_no_records() {
    let d = setup("empty");
    let empty = write(&d, "empty.jsonl", b"");
    let blank = write(&d, "blank.jsonl", b"\n\n  \n");
    let header_csv = write(&d, "header.csv", b"image,text,label\n");
    let header_tsv = write(&d, "header.tsv", b"sentence\tlabel\n");
    let bad_json = write(&d, "bad.jsonl", b"{not json\n[1, 2\n\"just a string\"\n");
    let no_usable = write(
        &d,
        "nocaption.jsonl",
        b"{\"text\": \"\", \"label\": \"1\"}\n{\"text\": \"  \"}\n",
    );
    let specs = [
        format!("jsonl:{}", empty.display()),
        format!("jsonl:{}", blank.display()),
        format!("csv:{}", header_csv.display()),
        format!("glue:sst2:{}", header_tsv.display()),
        format!("glue:cola:{}", empty.display()),
        format!("memes:{}", empty.display()),
        format!("snli-ve:{}:{}", empty.display(), d.display()),
        format!("jsonl:{}", bad_json.display()),
        format!("memes:{}", no_usable.display()),
    ];
    for spec in specs {
        match open(spec.clone()) {
            Err(SourceError::NoRecords(m)) => assert!(m.contains(d.to_str().unwrap()), "{spec}: {m}"),
            other => panic!("{spec}: expected NoRecords, got {:?}", other.map(|t| t.examples.len())),
        }
    }
    // A file with one good row among bad ones is read, the bad ones counted.
    let mixed = write(
        &d,
        "mixed.jsonl",
        b"{not json\n{\"text\": \"fine\", \"label\": \"1\"}\n{\"text\": \"\"}\n",
    );
    let t = open(format!("jsonl:{}", mixed.display())).unwrap();
    assert_eq!(t.examples.len(), 1);
    assert_eq!(t.skipped.get(&SkipReason::BadJson), Some(&1));
    assert_eq!(t.skipped.get(&SkipReason::MissingCaption), Some(&1));
}

#[test]
fn truncated_and_lying_vqa_files_are_errors_naming_the_file() {
    let d = setup("vqa");
    let q = br#"{"questions": [{"image_id": 1, "question": "what?", "question_id": 10}]}"#;
    let a = br#"{"annotations": [{"question_id": 10, "answers": [{"answer": "yes"}]}]}"#;
    let questions = write(&d, "q.json", q);
    let answers = write(&d, "a.json", a);
    let truncated_q = write(&d, "q_cut.json", &q[..q.len() / 2]);
    let truncated_a = write(&d, "a_cut.json", &a[..a.len() - 3]);
    // Well-formed JSON of the wrong shape: `questions` is an object, ids are strings.
    let lying_q = write(&d, "q_lie.json", br#"{"questions": {"image_id": 1}}"#);
    let lying_a = write(
        &d,
        "a_lie.json",
        br#"{"annotations": [{"question_id": "ten", "answers": "yes"}]}"#,
    );
    let images = d.join("val2014");
    let cases = [
        (&truncated_q, &answers),
        (&questions, &truncated_a),
        (&lying_q, &answers),
        (&questions, &lying_a),
    ];
    for (q, a) in cases {
        let spec = format!("vqa:{}:{}:{}", q.display(), a.display(), images.display());
        match open(spec.clone()) {
            Err(SourceError::Read { path, message }) => {
                assert!(path == *q || path == *a, "{spec}: {}", path.display());
                assert!(!message.is_empty());
            }
            other => panic!(
                "{spec}: expected a read error, got {:?}",
                other.map(|t| t.examples.len())
            ),
        }
    }
    // A missing file is a read error too; the good pair reads.
    let missing = d.join("nope.json");
    let spec = format!("vqa:{}:{}:{}", missing.display(), answers.display(), images.display());
    assert!(matches!(open(spec), Err(SourceError::Read { path, .. }) if path == missing));
    let ok = open(format!(
        "vqa:{}:{}:{}",
        questions.display(),
        answers.display(),
        images.display()
    ))
    .unwrap();
    assert_eq!(ok.examples.len(), 1);
}
