//! `flava embed --data SOURCE --out DIR`: clip-retrieval's layout, rows equal to `flava embed
//! --json` on the same images and captions (f32: 1e-5; f16: its rounding, 2^-10 relative),
//! hostile rows skipped and counted, metadata row for row, a stopped run resumed to the same
//! bytes as one run, and refusals of mismatched settings.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use burn::prelude::Device;
use flava_train::bulk_embed::{run, BulkEmbedConfig, Dtype, FeatureKind};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::RowAccessor;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn model() -> PathBuf {
    fixtures().join("embed_model")
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flava-bulk-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const GOOD: [(&str, &str); 5] = [
    ("photo_256x256.jpg", "a photo of a cat"),
    ("landscape_300x200.png", "a red square above a blue circle"),
    ("rgba_80x64.png", "two dogs playing"),
    ("portrait_97x131.png", "a small green triangle"),
    ("grey_120x90.png", "a picture of the dog"),
];

/// A CSV of the good images interleaved with a missing file and a truncated PNG.
fn hostile_csv(dir: &Path) -> PathBuf {
    let mut lines = vec!["image,caption".to_string()];
    for (i, (img, cap)) in GOOD.iter().enumerate() {
        std::fs::copy(fixtures().join("processor").join(img), dir.join(img)).unwrap();
        lines.push(format!("{img},{cap}"));
        if i == 1 {
            lines.push("missing.png,a caption whose image is gone".into());
        }
        if i == 3 {
            let png = std::fs::read(fixtures().join("processor/rgba_80x64.png")).unwrap();
            std::fs::write(dir.join("cut.png"), &png[..png.len() / 3]).unwrap();
            lines.push("cut.png,a caption whose image is cut".into());
        }
    }
    let csv = dir.join("pairs.csv");
    std::fs::write(&csv, lines.join("\n") + "\n").unwrap();
    csv
}

/// A `.npy` file: shape and f32 values (`<f4` or `<f2`).
fn read_npy(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}", path.display());
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(header.contains("'fortran_order': False"), "{header}");
    let shape_text = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let shape: Vec<usize> = shape_text
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let data = &bytes[10 + header_len..];
    let values: Vec<f32> = if header.contains("'<f4'") {
        data.chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    } else {
        assert!(header.contains("'<f2'"), "{header}");
        data.chunks(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect()
    };
    assert_eq!(values.len(), shape.iter().product::<usize>());
    (shape, values)
}

/// Rows of a metadata part: (key, caption, label).
fn read_metadata(path: &Path) -> Vec<(String, Option<String>, Option<String>)> {
    let reader = SerializedFileReader::new(File::open(path).unwrap()).unwrap();
    reader
        .get_row_iter(None)
        .unwrap()
        .map(|row| {
            let row = row.unwrap();
            let get = |i: usize| row.get_string(i).ok().cloned();
            (get(0).unwrap(), get(1), get(2))
        })
        .collect()
}

/// `flava embed --json` on the good images and captions: (image rows, text rows).
fn reference(dir: &Path) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flava"));
    cmd.args(["embed", "--json", "--model"]).arg(model());
    for (img, cap) in GOOD {
        cmd.arg("--image").arg(dir.join(img)).args(["--text", cap]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = |k: &str| serde_json::from_value::<Vec<Vec<f32>>>(v[k].clone()).unwrap();
    (rows("image_features"), rows("text_features"))
}

fn parts(out: &Path, kind: &str, n: usize) -> Vec<Vec<f32>> {
    let mut rows = Vec::new();
    for p in 0..n {
        let (shape, v) = read_npy(&out.join(format!("{kind}/{kind}_{p}.npy")));
        rows.extend(v.chunks(shape[1]).map(<[f32]>::to_vec));
    }
    rows
}

fn worst(a: &[Vec<f32>], b: &[Vec<f32>], relative: bool) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            x.iter()
                .zip(y)
                .map(|(p, q)| (p - q).abs() / if relative { q.abs().max(1e-3) } else { 1.0 })
        })
        .fold(0.0, f32::max)
}

#[test]
fn pairs_in_clip_retrieval_layout_match_flava_embed_and_skip_hostile_rows() {
    let dir = scratch("pairs");
    let csv = hostile_csv(&dir);
    let (want_img, want_txt) = reference(&dir);
    let device = Device::flex();
    let out = dir.join("emb32");
    let cfg = BulkEmbedConfig {
        dtype: Dtype::F32,
        part_size: 2,
        batch_size: 3,
        ..BulkEmbedConfig::new(model(), csv.to_str().unwrap())
    };
    let s = run(&cfg, &out, false, false, None, &device).unwrap();
    assert_eq!((s.parts, s.samples, s.skipped, s.records), (3, 5, 2, 7));
    assert!(s.finished);
    let (img, txt) = (parts(&out, "img_emb", 3), parts(&out, "text_emb", 3));
    let (di, dt) = (worst(&img, &want_img, false), worst(&txt, &want_txt, false));
    eprintln!("bulk vs flava embed: image {di:.1e}, text {dt:.1e}");
    assert!(di <= 1e-5 && dt <= 1e-5, "image {di}, text {dt}");
    // Metadata: one row per embedding row, in order, with its caption.
    let meta: Vec<_> = (0..3)
        .flat_map(|p| read_metadata(&out.join(format!("metadata/metadata_{p}.parquet"))))
        .collect();
    assert_eq!(meta.len(), 5);
    // Keys are `file:line`; lines 4 and 7 were the skipped rows.
    for (((key, caption, label), (_, cap)), line) in meta.iter().zip(GOOD).zip([2, 3, 5, 6, 8]) {
        assert!(key.ends_with(&format!("pairs.csv:{line}")), "{key}");
        assert_eq!(caption.as_deref(), Some(cap));
        assert_eq!(*label, None);
    }

    // float16 (the default), normalised: rows of unit length, the f32 values to f16 rounding.
    let out16 = dir.join("emb16");
    let cfg16 = BulkEmbedConfig {
        normalize: true,
        ..BulkEmbedConfig::new(model(), csv.to_str().unwrap())
    };
    let s16 = run(&cfg16, &out16, false, false, None, &device).unwrap();
    assert_eq!((s16.parts, s16.samples), (1, 5));
    let img16 = parts(&out16, "img_emb", 1);
    let unit: Vec<Vec<f32>> = want_img
        .iter()
        .map(|r| {
            let n = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            r.iter().map(|x| x / n).collect()
        })
        .collect();
    let d16 = worst(&img16, &unit, true);
    assert!(d16 <= 1.0 / 1024.0, "f16 relative error {d16}");

    // CLS features are the towers' hidden width, not the projection's.
    let cls = BulkEmbedConfig {
        features: FeatureKind::Cls,
        task: flava_data::task::Task::Text,
        ..BulkEmbedConfig::new(model(), csv.to_str().unwrap())
    };
    let sc = run(&cls, &dir.join("cls"), false, false, None, &device).unwrap();
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model().join("config.json")).unwrap()).unwrap();
    assert_eq!(sc.dim as u64, cfg_json["text_config"]["hidden_size"].as_u64().unwrap());
    assert!(!dir.join("cls/img_emb/img_emb_0.npy").exists());
    // Text-only does not decode images: the cut PNG's caption is embedded; the row whose file is
    // missing is still skipped by the manifest reader, which opens every row's file.
    assert_eq!((sc.samples, sc.skipped), (6, 1));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_stopped_run_resumes_to_the_same_bytes_and_settings_are_checked() {
    let dir = scratch("resume");
    let csv = hostile_csv(&dir);
    let device = Device::flex();
    let cfg = BulkEmbedConfig {
        part_size: 2,
        batch_size: 2,
        ..BulkEmbedConfig::new(model(), csv.to_str().unwrap())
    };
    let whole = dir.join("whole");
    run(&cfg, &whole, false, false, None, &device).unwrap();
    let sliced = dir.join("sliced");
    let first = run(&cfg, &sliced, false, false, Some(1), &device).unwrap();
    assert_eq!((first.parts, first.samples, first.finished), (1, 2, false));
    assert!(!sliced.join("img_emb/img_emb_1.npy").exists());
    // Not resuming over an existing run is refused; other settings are refused on resume.
    let err = format!("{:#}", run(&cfg, &sliced, false, false, None, &device).unwrap_err());
    assert!(err.contains("--resume") && err.contains("--force"), "{err}");
    let other = BulkEmbedConfig {
        normalize: true,
        ..cfg.clone()
    };
    let err = format!("{:#}", run(&other, &sliced, true, false, None, &device).unwrap_err());
    assert!(err.contains("other settings"), "{err}");
    // A different batch size is fine, and resuming gives what one run gives.
    let resumed_cfg = BulkEmbedConfig {
        batch_size: 3,
        ..cfg.clone()
    };
    let s = run(&resumed_cfg, &sliced, true, false, None, &device).unwrap();
    assert_eq!((s.parts, s.samples, s.skipped, s.finished), (3, 5, 2, true));
    for p in 0..3 {
        for f in [
            format!("img_emb/img_emb_{p}.npy"),
            format!("text_emb/text_emb_{p}.npy"),
            format!("metadata/metadata_{p}.parquet"),
        ] {
            assert_eq!(
                std::fs::read(whole.join(&f)).unwrap(),
                std::fs::read(sliced.join(&f)).unwrap(),
                "{f}"
            );
        }
    }
    // A finished run resumed does nothing; --force starts over.
    assert_eq!(run(&cfg, &sliced, true, false, None, &device).unwrap().samples, 5);
    let forced = run(&other, &sliced, false, true, None, &device).unwrap();
    assert_eq!((forced.parts, forced.samples), (3, 5));

    // An all-bad source is an error, not an empty success.
    let bad = dir.join("bad.csv");
    std::fs::write(&bad, "image,caption\nmissing.png,x\ncut.png,y\n").unwrap();
    let err = format!(
        "{:#}",
        run(
            &BulkEmbedConfig::new(model(), bad.to_str().unwrap()),
            &dir.join("none"),
            false,
            false,
            None,
            &device
        )
        .unwrap_err()
    );
    assert!(err.contains("no usable sample") && err.contains("2 skipped"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn images_of_an_image_folder_keep_their_labels() {
    let dir = scratch("folder");
    let out = dir.join("out");
    let status = Command::new(env!("CARGO_BIN_EXE_flava"))
        .args([
            "embed",
            "--task",
            "images",
            "--dtype",
            "f32",
            "--part-size",
            "3",
            "--model",
        ])
        .arg(model())
        .arg("--data")
        .arg(fixtures().join("tasks/imagefolder"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let (shape, _) = read_npy(&out.join("img_emb/img_emb_0.npy"));
    assert_eq!(shape[0], 3);
    let (shape1, _) = read_npy(&out.join("img_emb/img_emb_1.npy"));
    assert_eq!(shape1[0], 1);
    assert!(!out.join("text_emb/text_emb_0.npy").exists());
    let labels: Vec<Option<String>> = (0..2)
        .flat_map(|p| read_metadata(&out.join(format!("metadata/metadata_{p}.parquet"))))
        .map(|(_, _, l)| l)
        .collect();
    let mut sorted: Vec<String> = labels.into_iter().map(Option::unwrap).collect();
    sorted.sort();
    assert_eq!(sorted, ["cat", "cat", "dog", "dog"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
