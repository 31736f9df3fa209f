//! Sources, bad input, the mixer and the loader: determinism, exact resume, round-robin order and
//! counted skips, on files built here.

use std::collections::BTreeMap;
use std::path::PathBuf;

mod common;
use common::write_tar;

use common::{builder, tokenizer};
use flava_data::batch::BatchBuilder;
use flava_data::loader::{DataLoader, LoaderConfig, Mix};
use flava_data::sources::{expand_braces, split_key, SkipReason, Source};
use flava_data::spec::{open_source, SourceOptions};
use flava_data::task::Task;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flava-data-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn png(w: u32, h: u32, v: u8) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([v, 255 - v, 128]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn synthetic_sources(opts: &SourceOptions) -> BTreeMap<Task, Vec<Box<dyn Source>>> {
    [Task::Pairs, Task::Images, Task::Text]
        .into_iter()
        .map(|t| (t, vec![open_source("synthetic", t, opts).unwrap()]))
        .collect()
}

fn opts() -> SourceOptions {
    SourceOptions {
        seed: 5,
        synthetic_len: 20,
        synthetic_image_size: 40,
        ..Default::default()
    }
}

#[test]
fn round_robin_shapes_and_determinism() {
    let run = || {
        let mut l = DataLoader::new(synthetic_sources(&opts()), builder(4), LoaderConfig::default(), None).unwrap();
        (0..6).map(|_| l.next_batch().unwrap()).collect::<Vec<_>>()
    };
    let (a, b) = (run(), run());
    let tasks: Vec<Task> = a.iter().map(|x| x.batch.task).collect();
    assert_eq!(
        tasks,
        [
            Task::Pairs,
            Task::Images,
            Task::Text,
            Task::Pairs,
            Task::Images,
            Task::Text
        ]
    );
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.batch, y.batch, "same seed, same batches");
    }
    let p = &a[0].batch;
    assert_eq!(
        (
            p.pixel_values.len(),
            p.codebook_pixel_values.len(),
            p.bool_masked_pos.len()
        ),
        (4 * 3 * 32 * 32, 4 * 3 * 32 * 32, 4 * 16)
    );
    assert_eq!((p.input_ids.len(), p.itm_labels.len()), (4 * 16, 4));
    assert!(!p.mlm_positions.is_empty() && p.mlm_positions.len() == p.mlm_targets.len());
    for (&pos, &t) in p.mlm_positions.iter().zip(&p.mlm_targets) {
        assert_eq!(p.input_ids[pos], t);
    }
    let img = &a[1].batch;
    assert!(img.input_ids.is_empty() && !img.pixel_values.is_empty());
    let txt = &a[2].batch;
    assert!(txt.pixel_values.is_empty() && !txt.input_ids.is_empty());
    // Tensors come out with the documented shapes.
    let t = p.to_device(&burn::prelude::Device::flex());
    assert_eq!(t.pixel_values.unwrap().dims(), [4, 3, 32, 32]);
    assert_eq!(t.bool_masked_pos.unwrap().dims(), [4, 16]);
    assert_eq!(t.input_ids_masked.unwrap().dims(), [4, 16]);
}

#[test]
fn resume_gives_exactly_the_next_batches() {
    let cfg = || LoaderConfig {
        mix: Mix::parse("pairs=2,images=1,text=1").unwrap(),
        seed: 9,
        ..Default::default()
    };
    let mut full = DataLoader::new(synthetic_sources(&opts()), builder(3), cfg(), None).unwrap();
    let all: Vec<_> = (0..20).map(|_| full.next_batch().unwrap()).collect();
    // 20 batches of 3 from 20-sample sources: several epochs pass.
    let k = 7;
    let state = all[k].state_after.clone();
    let json = serde_json::to_string(&state).unwrap();
    let mut resumed = DataLoader::new(
        synthetic_sources(&opts()),
        builder(3),
        cfg(),
        Some(serde_json::from_str(&json).unwrap()),
    )
    .unwrap();
    for want in &all[k + 1..] {
        let got = resumed.next_batch().unwrap();
        assert_eq!(got.batch, want.batch);
        assert_eq!(got.state_after, want.state_after);
    }
}

#[test]
fn weighted_mix_follows_weights() {
    let cfg = LoaderConfig {
        mix: Mix::parse("pairs=3,images=1,text=0").unwrap(),
        seed: 1,
        ..Default::default()
    };
    let mut l = DataLoader::new(synthetic_sources(&opts()), builder(2), cfg, None).unwrap();
    let tasks: Vec<Task> = (0..200).map(|_| l.next_batch().unwrap().batch.task).collect();
    let pairs = tasks.iter().filter(|&&t| t == Task::Pairs).count();
    assert!(!tasks.contains(&Task::Text));
    assert!((pairs as f64 / 200.0 - 0.75).abs() < 0.1, "{pairs}");
    assert!(Mix::parse("pairs=0").is_err() && Mix::parse("cats=1").is_err());
}

#[test]
fn webdataset_shards_group_by_key_and_skip_bad_samples() {
    let d = scratch("shards");
    write_tar(
        &d.join("000.tar"),
        &[
            ("a/0001.jpg", png(20, 20, 10)), // PNG bytes under .jpg: decoded by content
            ("a/0001.txt", b"a red circle".to_vec()),
            ("a/0002.png", png(20, 20, 50)),
            ("a/0002.json", br#"{"caption": "a blue square", "url": "x"}"#.to_vec()),
            ("a/0003.jpg", b"not an image".to_vec()),
            ("a/0003.txt", b"corrupt".to_vec()),
            ("a/0004.png", png(20, 20, 90)),
            ("a/0004.txt", b"   ".to_vec()),
            ("a/0005.png", png(20, 20, 90)),
            ("a/0005.txt", vec![0xff, 0xfe, 0x41]),
            ("a/0006.png", png(20, 20, 90)),
            ("a/0006.cls", b"7".to_vec()),
        ],
        None,
    );
    // Second shard: the last member is cut short.
    write_tar(
        &d.join("001.tar"),
        &[
            ("b.png", png(16, 16, 1)),
            ("b.txt", b"two dogs".to_vec()),
            ("c.png", png(300, 300, 2)),
        ],
        Some(1024 + 100),
    );
    assert_eq!(split_key("a/b/0001.seg.jpg"), Some(("a/b/0001", "seg.jpg")));
    assert_eq!(
        expand_braces("d/{000..002}.tar").unwrap(),
        ["d/000.tar", "d/001.tar", "d/002.tar"]
    );
    let pattern = format!("{}/{{000..001}}.tar", d.display());
    let o = SourceOptions {
        shuffle_buffer: 0,
        ..Default::default()
    };
    let sources = BTreeMap::from([(Task::Pairs, vec![open_source(&pattern, Task::Pairs, &o).unwrap()])]);
    let mut l = DataLoader::new(sources, builder(3), LoaderConfig::default(), None).unwrap();
    let b = l.next_batch().unwrap();
    assert_eq!(b.batch.texts.len(), 3);
    let keys = &b.batch.keys;
    assert!(
        keys.contains(&"a/0001".to_string()) && keys.contains(&"a/0002".to_string()),
        "{keys:?}"
    );
    let st = &b.stats[&Task::Pairs];
    assert_eq!(st.skipped.get(&SkipReason::CorruptImage), Some(&1));
    assert_eq!(st.skipped.get(&SkipReason::EmptyCaption), Some(&1));
    assert_eq!(st.skipped.get(&SkipReason::NonUtf8Text), Some(&1));
    assert_eq!(st.skipped.get(&SkipReason::MissingCaption), Some(&1));
    assert_eq!(st.samples, 3);
    // Reading on into the cut shard: the truncated member is counted, the run goes on.
    let b2 = l.next_batch().unwrap();
    let st = &b2.stats[&Task::Pairs];
    assert!(st.skipped.contains_key(&SkipReason::TruncatedMember), "{st:?}");
    // A pattern that matches nothing is an error at start.
    assert!(open_source(&format!("{}/{{005..006}}.tar", d.display()), Task::Pairs, &o).is_err());
}

#[test]
fn manifests_coco_imagefolder_and_text_files() {
    let d = scratch("listed");
    std::fs::write(d.join("x.png"), png(10, 10, 1)).unwrap();
    std::fs::write(d.join("m.csv"), "file,text\nx.png,a cat\nmissing.png,a dog\n").unwrap();
    std::fs::write(d.join("m.tsv"), "image\tcaption\nx.png\ta cat\n").unwrap();
    let mut o = SourceOptions::default();
    o.columns.image = "file".into();
    o.columns.caption = "text".into();
    let mut s = open_source(d.join("m.csv").to_str().unwrap(), Task::Pairs, &o).unwrap();
    s.start_epoch(0);
    let recs: Vec<_> = std::iter::from_fn(|| s.next_record()).collect();
    assert_eq!(recs.len(), 2);
    assert!(recs.iter().any(|r| matches!(
        r,
        flava_data::sources::Record::Skipped {
            reason: SkipReason::UnreadableImage,
            ..
        }
    )));
    assert!(
        open_source(d.join("m.tsv").to_str().unwrap(), Task::Pairs, &o).is_err(),
        "wrong column names are an error"
    );
    assert!(open_source(
        d.join("m.tsv").to_str().unwrap(),
        Task::Pairs,
        &SourceOptions::default()
    )
    .is_ok());

    std::fs::create_dir_all(d.join("coco/imgs")).unwrap();
    std::fs::write(d.join("coco/imgs/1.png"), png(10, 10, 3)).unwrap();
    std::fs::write(
        d.join("coco/ann.json"),
        r#"{"images":[{"id":1,"file_name":"1.png"}],"annotations":[{"image_id":1,"caption":"a"},{"image_id":1,"caption":"b"}]}"#,
    )
    .unwrap();
    let spec = format!(
        "coco:{}:{}",
        d.join("coco/ann.json").display(),
        d.join("coco/imgs").display()
    );
    let mut s = open_source(&spec, Task::Pairs, &o).unwrap();
    s.start_epoch(0);
    assert_eq!(std::iter::from_fn(|| s.next_record()).count(), 2);

    for c in ["cat", "dog"] {
        std::fs::create_dir_all(d.join("folder").join(c)).unwrap();
        std::fs::write(d.join("folder").join(c).join("1.png"), png(8, 8, 7)).unwrap();
    }
    let (entries, classes) = flava_data::sources::read_image_folder(&d.join("folder")).unwrap();
    assert_eq!(
        (entries.len(), classes),
        (2, vec!["cat".to_string(), "dog".to_string()])
    );

    std::fs::write(d.join("t.txt"), "first line\n\nsecond line\n").unwrap();
    std::fs::write(d.join("t.jsonl"), "{\"text\": \"hello\"}\n{\"other\": 1}\n").unwrap();
    let src = BTreeMap::from([(
        Task::Text,
        vec![
            open_source(d.join("t.txt").to_str().unwrap(), Task::Text, &o).unwrap(),
            open_source(d.join("t.jsonl").to_str().unwrap(), Task::Text, &o).unwrap(),
        ],
    )]);
    let mut l = DataLoader::new(src, builder(4), LoaderConfig::default(), None).unwrap();
    let b = l.next_batch().unwrap();
    assert_eq!(b.batch.texts.len(), 4);
    assert!(
        b.stats[&Task::Text].skipped.contains_key(&SkipReason::MissingCaption),
        "the JSONL line without `text` (a missing field, not an empty caption)"
    );
    assert!(open_source(d.join("nope.csv").to_str().unwrap(), Task::Pairs, &o).is_err());
}

#[test]
fn itm_negatives_swap_in_a_different_caption() {
    let mut cfg = builder(8).cfg.clone();
    cfg.itm_negative_prob = 0.5;
    let b = BatchBuilder::new(cfg, Some(tokenizer())).unwrap();
    let sources = BTreeMap::from([(
        Task::Pairs,
        vec![open_source("synthetic", Task::Pairs, &opts()).unwrap()],
    )]);
    let mut l = DataLoader::new(sources, b, LoaderConfig::default(), None).unwrap();
    let (mut neg, mut total) = (0, 0);
    for _ in 0..10 {
        let x = l.next_batch().unwrap().batch;
        let src = flava_data::synthetic::SyntheticSource::new(
            flava_data::synthetic::SyntheticKind::Pairs,
            flava_data::synthetic::Split::Train,
            5,
            20,
            40,
        );
        for (i, key) in x.keys.iter().enumerate() {
            let idx: u64 = key.rsplit('-').next().unwrap().parse().unwrap();
            let own = src.sample(idx).text.unwrap();
            total += 1;
            if x.itm_labels[i] == 0 {
                neg += 1;
                assert_ne!(x.texts[i], own, "a negative must carry another caption");
            } else {
                assert_eq!(x.texts[i], own);
            }
        }
    }
    assert!((neg as f64 / total as f64 - 0.5).abs() < 0.15, "{neg}/{total}");
}

#[test]
fn gzipped_shards_read_like_plain_ones() {
    let d = scratch("gz");
    write_tar(
        &d.join("plain.tar"),
        &[("k1.png", png(8, 8, 1)), ("k1.txt", b"a red square".to_vec())],
        None,
    );
    let tar_bytes = std::fs::read(d.join("plain.tar")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar_bytes).unwrap();
    std::fs::write(d.join("x.tar.gz"), gz.finish().unwrap()).unwrap();
    for name in ["plain.tar", "x.tar.gz"] {
        let recs = flava_data::sources::ShardSource::read_shard(&d.join(name));
        assert_eq!(recs.len(), 1, "{name}");
        let flava_data::sources::Record::Sample(s) = &recs[0] else {
            panic!("{name}")
        };
        assert_eq!((s.key.as_str(), s.text.as_deref()), ("k1", Some("a red square")));
    }
}
