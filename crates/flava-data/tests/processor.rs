//! The image processor against HF `FlavaImageProcessor` (Pillow backend, `do_convert_rgb=True`) on
//! images of several sizes, aspect ratios and modes (written by `scripts/make_fixtures.py`).
//! The resized 8-bit images must be identical (Pillow-exact resampling); the float outputs of the
//! first image within 1e-6 (rescale and normalise arithmetic).

use std::path::PathBuf;

use flava_data::processor::{load_image, ImageProcessor};
use flava_vit::weights::{read_int_tensors, StateDict};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/processor")
}

fn to_u8(v: &[f32], mean: [f32; 3], std: [f32; 3], map: bool) -> Vec<i64> {
    let plane = v.len() / 3;
    v.iter()
        .enumerate()
        .map(|(i, &x)| {
            let c = i / plane;
            let x = if map { (x - 0.1) / 0.8 } else { x };
            ((x * std[c] + mean[c]) * 255.0).round() as i64
        })
        .collect()
}

#[test]
fn resized_pixels_equal_hf_for_every_image() {
    let p = ImageProcessor::from_file(dir().join("preprocessor_config.json")).unwrap();
    let names: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(dir().join("images.json")).unwrap()).unwrap();
    let ints = read_int_tensors(dir().join("expected.safetensors")).unwrap();
    assert_eq!(names.len(), 9);
    for name in &names {
        let key = name.split('.').next().unwrap();
        let img = load_image(dir().join(name)).unwrap();
        let (px, w, h) = p.preprocess(&img);
        assert_eq!((w, h), (224, 224));
        let (cb, cw, ch) = p.preprocess_codebook(&img);
        assert_eq!((cw, ch), (112, 112));
        let c = &p.config;
        let got = to_u8(&px, c.image_mean, c.image_std, false);
        let want = &ints[&format!("{key}.pixels_u8")].1;
        let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).max().unwrap();
        assert_eq!(worst, 0, "{name}: encoder pixels differ by up to {worst} grey levels");
        let got = to_u8(&cb, [0.0; 3], [1.0; 3], true);
        let want = &ints[&format!("{key}.codebook_u8")].1;
        let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).max().unwrap();
        assert_eq!(worst, 0, "{name}: codebook pixels differ by up to {worst} grey levels");
    }
}

#[test]
fn float_outputs_equal_hf() {
    let p = ImageProcessor::from_file(dir().join("preprocessor_config.json")).unwrap();
    let floats = StateDict::from_file(dir().join("expected.safetensors")).unwrap();
    let img = load_image(dir().join("landscape_300x200.png")).unwrap();
    for (got, key) in [
        (p.preprocess(&img).0, "landscape_300x200.pixel_values"),
        (p.preprocess_codebook(&img).0, "landscape_300x200.codebook_pixel_values"),
    ] {
        let want = &floats.get(key).unwrap().data;
        let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-6, "{key}: max |diff| {diff:e}");
    }
}

#[test]
fn unreadable_image_is_an_error_naming_the_file() {
    let bad = std::env::temp_dir().join(format!("flava-bad-{}.png", std::process::id()));
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\n truncated").unwrap();
    let err = load_image(&bad).unwrap_err().to_string();
    assert!(err.contains("flava-bad-"), "{err}");
    std::fs::remove_file(bad).ok();
    assert!(load_image("/nonexistent/x.png").is_err());
}

#[test]
fn bad_preprocessor_field_is_named() {
    let f = std::env::temp_dir().join(format!("flava-pp-{}.json", std::process::id()));
    std::fs::write(&f, r#"{"image_mean": "zero"}"#).unwrap();
    let err = ImageProcessor::from_file(&f).unwrap_err().to_string();
    assert!(err.contains("image_mean"), "{err}");
    std::fs::remove_file(f).ok();
}

#[test]
fn truncated_jpeg_is_an_error_not_a_grey_image() {
    let bytes = std::fs::read(dir().join("photo_256x256.jpg")).unwrap();
    for keep in [0.3, 0.7, 0.95] {
        let cut = &bytes[..(bytes.len() as f64 * keep) as usize];
        assert!(flava_data::processor::decode_image(cut).is_err(), "kept {keep}");
    }
}
