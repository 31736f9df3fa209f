//! Broken and hostile inputs, each built here: every one ends fast with a clear error or a
//! counted skip, never a hang, a crash or an unbounded allocation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;

use flava_data::loader::{DataLoader, LoaderConfig, LoaderError, Mix};
use flava_data::masking::{BlockMaskConfig, BlockMaskGenerator, MaskConfigError};
use flava_data::processor::{decode_image, ImageError, ImageProcessor};
use flava_data::sources::{expand_braces, read_coco, read_texts, Record, ShardSource, SkipReason, Source, SourceError};
use flava_data::spec::{open_source, SourceOptions};
use flava_data::task::Task;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flava-hostile-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([10, 200, 30]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn jpeg(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([10, 200, 30]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

fn write_tar(path: &Path, members: &[(&str, Vec<u8>)]) {
    common::write_tar(path, members, None)
}

fn loader(task: Task, source: Box<dyn Source>) -> DataLoader {
    let sources = BTreeMap::from([(task, vec![source])]);
    let cfg = LoaderConfig {
        mix: Mix::RoundRobin,
        workers: 1,
        prefetch: 1,
        seed: 0,
    };
    DataLoader::new(sources, common::builder(4), cfg, None).unwrap()
}

fn opts() -> SourceOptions {
    SourceOptions {
        shuffle_buffer: 0,
        ..Default::default()
    }
}

/// The first batch of a source with no usable record: an error naming the source and the
/// reason, within seconds (it used to loop for ever).
fn unusable(task: Task, spec: &str, reason: &str) {
    let t0 = Instant::now();
    let mut l = loader(task, open_source(spec, task, &opts()).unwrap());
    let err = l.next_batch().unwrap_err();
    assert!(
        matches!(err, LoaderError::Source(SourceError::Unusable { .. })),
        "{spec}: {err:?}"
    );
    let err = err.to_string();
    assert!(err.contains("no usable sample"), "{spec}: {err}");
    assert!(err.contains(reason), "{spec}: expected {reason} in: {err}");
    assert!(err.contains(spec), "the error names the source: {err}");
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "{spec}: took {:?}",
        t0.elapsed()
    );
}

#[test]
fn sources_of_only_unusable_records_are_errors_not_endless_loops() {
    let d = scratch("unusable");
    let bad = b"not an image at all".to_vec();
    write_tar(
        &d.join("corrupt.tar"),
        &[
            ("a.jpg", bad.clone()),
            ("a.txt", b"x".to_vec()),
            ("b.jpg", bad.clone()),
            ("b.txt", b"y".to_vec()),
        ],
    );
    std::fs::write(d.join("notatar.tar"), vec![7u8; 3000]).unwrap();
    std::fs::write(d.join("notgzip.tar.gz"), b"plain text, not gzip").unwrap();
    std::fs::write(
        d.join("m.csv"),
        "image,caption\nmissing1.png,a cat\nmissing2.png,a dog\n",
    )
    .unwrap();
    let coco = serde_json::json!({
        "images": [{"id": 1, "file_name": "gone.jpg"}],
        "annotations": [{"image_id": 1, "caption": "a cat"}, {"image_id": 1, "caption": "a dog"}]
    });
    std::fs::write(d.join("c.json"), coco.to_string()).unwrap();
    std::fs::create_dir_all(d.join("folder/cats")).unwrap();
    for i in 0..3 {
        std::fs::write(d.join(format!("folder/cats/{i}.png")), &bad).unwrap();
    }
    let p = |n: &str| d.join(n).display().to_string();
    unusable(Task::Pairs, &p("corrupt.tar"), "CorruptImage");
    unusable(Task::Pairs, &p("notatar.tar"), "BadShard");
    unusable(Task::Pairs, &p("notgzip.tar.gz"), "BadShard");
    unusable(Task::Pairs, &p("m.csv"), "UnreadableImage");
    unusable(
        Task::Pairs,
        &format!("coco:{}:{}", p("c.json"), d.display()),
        "UnreadableImage",
    );
    unusable(Task::Images, &p("folder"), "CorruptImage");
    std::fs::remove_dir_all(&d).ok();
}

/// A JPEG that declares `w`×`h` in its frame header but holds the data of a tiny image.
fn jpeg_declaring(w: u16, h: u16) -> Vec<u8> {
    let mut b = jpeg(16, 16);
    let sof = b.windows(2).position(|m| m == [0xFF, 0xC0]).expect("baseline SOF0");
    b[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    b[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    b
}

#[test]
fn decompression_bombs_are_refused_before_decoding() {
    let t0 = Instant::now();
    let bomb = jpeg_declaring(65500, 65500);
    assert!(bomb.len() < 4096);
    let e = decode_image(&bomb).unwrap_err();
    assert!(
        matches!(
            e,
            ImageError::TooLarge {
                width: 65500,
                height: 65500,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("65500x65500") && e.to_string().contains("limit"),
        "{e}"
    );
    // A PNG whose header declares 60000x60000 (IHDR patched; its CRC no longer matches, and the
    // size check comes first either way).
    let mut p = png(8, 8);
    p[16..20].copy_from_slice(&60000u32.to_be_bytes());
    p[20..24].copy_from_slice(&60000u32.to_be_bytes());
    assert!(decode_image(&p).is_err());
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // An honest small JPEG still decodes, and one just within the limit is not refused for size.
    assert_eq!(decode_image(&jpeg(16, 16)).unwrap().width(), 16);
    // In a shard, a bomb is a counted skip and the next sample is read.
    let d = scratch("bomb");
    write_tar(
        &d.join("s.tar"),
        &[
            ("a.jpg", bomb),
            ("a.txt", b"bomb".to_vec()),
            ("b.png", png(8, 8)),
            ("b.txt", b"fine".to_vec()),
        ],
    );
    let mut l = loader(
        Task::Pairs,
        open_source(&d.join("s.tar").display().to_string(), Task::Pairs, &opts()).unwrap(),
    );
    let b = l.next_batch().unwrap();
    // A batch of 4 from a shard of one good sample: four epochs, four skipped bombs.
    assert_eq!(b.batch.batch_size, 4);
    assert_eq!(b.stats[&Task::Pairs].skipped.get(&SkipReason::CorruptImage), Some(&4));
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn brace_patterns_expand_or_fail_cleanly() {
    assert_eq!(expand_braces("{5..1}").unwrap(), ["5", "4", "3", "2", "1"]);
    assert_eq!(expand_braces("x{a..c}").unwrap(), ["xa", "xb", "xc"]);
    assert_eq!(
        expand_braces("{0,1}-{00..01}").unwrap(),
        ["0-00", "0-01", "1-00", "1-01"]
    );
    for bad in [
        "{000..}",
        "{..3}",
        "{{0..1}}",
        "{0..99999999999}",
        "{a",
        "b}",
        "{1..x}",
        "{0..999}{0..9999}",
    ] {
        let t0 = Instant::now();
        let e = expand_braces(bad).unwrap_err().to_string();
        assert!(e.contains(bad), "{e}");
        assert!(t0.elapsed() < Duration::from_millis(500), "{bad}");
    }
    // Through open_source too: an error, not a stack overflow.
    assert!(open_source("d/{5..}.tar", Task::Pairs, &opts()).is_err());
}

#[test]
fn oversized_and_lying_tar_members_are_skipped() {
    let d = scratch("members");
    let huge_caption = vec![b'a'; 100 << 10];
    write_tar(
        &d.join("s.tar"),
        &[
            ("a.png", png(8, 8)),
            ("a.txt", huge_caption),
            ("a.cls", b"1".to_vec()),
            ("b.png", png(8, 8)),
            ("b.txt", b"fine".to_vec()),
        ],
    );
    let recs = ShardSource::read_shard(&d.join("s.tar"));
    let skipped: Vec<SkipReason> = recs
        .iter()
        .filter_map(|r| match r {
            Record::Skipped { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect();
    assert_eq!(skipped, [SkipReason::TooLarge]);
    let keys: Vec<&str> = recs
        .iter()
        .filter_map(|r| match r {
            Record::Sample(s) => Some(s.key.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(keys, ["b"], "the sample that lost its caption is dropped whole");

    // A header that declares 1 GB of data in a file of a few KB.
    let mut bytes = std::fs::read(d.join("s.tar")).unwrap();
    let size_field = 124..136;
    bytes[size_field.clone()].copy_from_slice(b"07777777777\0");
    // Fix the header checksum so the lie is in the size alone.
    bytes[148..156].copy_from_slice(b"        ");
    let sum: u32 = bytes[..512].iter().map(|&b| b as u32).sum();
    bytes[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    std::fs::write(d.join("lying.tar"), &bytes).unwrap();
    let recs = ShardSource::read_shard(&d.join("lying.tar"));
    assert!(
        recs.iter().any(|r| matches!(
            r,
            Record::Skipped {
                reason: SkipReason::TooLarge | SkipReason::TruncatedMember,
                ..
            }
        )),
        "{recs:?}"
    );
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn text_files_skip_long_and_malformed_lines_and_name_empty_files() {
    let d = scratch("texts");
    let long = "x".repeat(1 << 20);
    std::fs::write(d.join("t.txt"), format!("first\n{long}\nthird\n")).unwrap();
    let t0 = Instant::now();
    let e = read_texts(&d.join("t.txt"), "text").unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(e.len(), 3);
    assert_eq!(e[1].skip.as_ref().unwrap().0, SkipReason::TooLarge);
    assert_eq!(e[2].text.as_deref(), Some("third"));

    std::fs::write(
        d.join("t.jsonl"),
        "{\"text\": \"ok\"}\n{\"text\": \"cut\n{\"other\": 1}\n{\"text\": 5}\n",
    )
    .unwrap();
    let e = read_texts(&d.join("t.jsonl"), "text").unwrap();
    let reasons: Vec<Option<SkipReason>> = e.iter().map(|x| x.skip.as_ref().map(|s| s.0)).collect();
    assert_eq!(
        reasons,
        [
            None,
            Some(SkipReason::BadJson),
            Some(SkipReason::MissingCaption),
            Some(SkipReason::BadJson)
        ]
    );

    std::fs::write(d.join("empty.txt"), "\n\n  \n").unwrap();
    let e = open_source(&d.join("empty.txt").display().to_string(), Task::Text, &opts())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no non-blank lines"), "{e}");
    std::fs::write(d.join("h.csv"), "image,caption\n").unwrap();
    let e = open_source(&d.join("h.csv").display().to_string(), Task::Pairs, &opts())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("header but no rows"), "{e}");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn a_null_coco_caption_skips_that_record_only() {
    let d = scratch("coco");
    std::fs::write(d.join("a.png"), png(8, 8)).unwrap();
    let coco = serde_json::json!({
        "images": [{"id": 1, "file_name": "a.png"}],
        "annotations": [
            {"image_id": 1, "caption": null},
            {"image_id": 1, "caption": "a green square"},
            {"image_id": 7, "caption": "no such image"}
        ]
    });
    std::fs::write(d.join("c.json"), coco.to_string()).unwrap();
    let e = read_coco(&d.join("c.json"), &d).unwrap();
    let reasons: Vec<Option<SkipReason>> = e.iter().map(|x| x.skip.as_ref().map(|s| s.0)).collect();
    assert_eq!(
        reasons,
        [Some(SkipReason::MissingCaption), None, Some(SkipReason::MissingImage)]
    );
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn masks_and_processor_configs_with_impossible_sizes_are_errors() {
    let cfg = BlockMaskConfig {
        height: 14,
        width: 14,
        num_masking_patches: 75,
        min_num_patches: 1000,
        ..Default::default()
    };
    let e = BlockMaskGenerator::new(cfg).err().unwrap();
    assert!(
        matches!(
            e,
            MaskConfigError::MinPatches {
                min: 1000,
                budget: 75,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("min_num_patches 1000"), "{e}");
    let d = scratch("proc");
    std::fs::write(d.join("p.json"), r#"{"size": {"height": 1048576, "width": 1048576}}"#).unwrap();
    let e = ImageProcessor::from_file(d.join("p.json")).unwrap_err().to_string();
    assert!(e.contains("size") && e.contains("limit"), "{e}");
    std::fs::remove_dir_all(&d).ok();
}
