//! Property tests over every reader of untrusted bytes (tar shards plain and gzipped,
//! safetensors, PyTorch pickles, model configurations, CSV, COCO JSON, JSONL, brace patterns,
//! image files): arbitrary and mutated inputs never panic, abort or hang, and each case's peak
//! heap stays under [`PEAK_LIMIT`] (measured by a counting global allocator).
//!
//! The cases run one after another inside one test, so the allocator sees one reader at a time.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Most extra heap one case may use at its peak.
const PEAK_LIMIT: usize = 256 << 20;
/// Longest one case may take.
const TIME_LIMIT: Duration = Duration::from_secs(10);

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Byte edits: (position, value) overwrites, then an optional cut.
fn edits() -> impl Strategy<Value = (Vec<(usize, u8)>, Option<usize>)> {
    (
        proptest::collection::vec((any::<usize>(), any::<u8>()), 0..24),
        proptest::option::of(any::<usize>()),
    )
}

/// `base` with the edits applied; half the overwrites land in the first `head` bytes, where
/// the headers are.
fn mutate(base: &[u8], head: usize, (writes, cut): &(Vec<(usize, u8)>, Option<usize>)) -> Vec<u8> {
    let mut b = base.to_vec();
    if b.is_empty() {
        return b;
    }
    for (i, (pos, v)) in writes.iter().enumerate() {
        let span = if i % 2 == 0 { head.min(b.len()) } else { b.len() };
        let at = pos % span.max(1);
        b[at] = *v;
    }
    if let Some(c) = cut {
        b.truncate(c % (b.len() + 1));
    }
    b
}

/// Runs `f` on `cases` values of `strategy`, checking the time and peak heap of each.
fn check<S: Strategy>(name: &str, cases: u32, strategy: S, f: impl Fn(S::Value))
where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let ran = std::cell::Cell::new(0u32);
    runner
        .run(&strategy, |v| {
            ran.set(ran.get() + 1);
            let base = CURRENT.load(Ordering::Relaxed);
            PEAK.store(base, Ordering::Relaxed);
            let t0 = Instant::now();
            f(v);
            let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
            prop_assert!(peak < PEAK_LIMIT, "{name}: peak heap {} MB", peak >> 20);
            prop_assert!(t0.elapsed() < TIME_LIMIT, "{name}: took {:?}", t0.elapsed());
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(ran.get() >= cases, "{name}: only {} of {cases} cases ran", ran.get());
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn jpeg(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

fn shard_bytes() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("000.png", png(8, 8)),
        ("000.txt", b"a caption".to_vec()),
        ("001.jpg", jpeg(8, 8)),
        ("001.json", br#"{"caption": "another"}"#.to_vec()),
        ("001.cls", b"3".to_vec()),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn readers_survive_arbitrary_and_mutated_bytes() {
    // Images up to 16 M pixels (48 MB of RGB): a declared size within the limit is decoded, so
    // the peak of a case is bounded by the limit, and this one keeps it well under PEAK_LIMIT.
    flava_vit::limits::set(flava_vit::limits::Limits {
        max_image_pixels: 16 << 20,
        ..Default::default()
    });
    let dir = std::env::temp_dir().join(format!("flava-fuzz-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    let arbitrary = || proptest::collection::vec(any::<u8>(), 0..4096);

    // Tar shards, plain and gzipped: every record is a sample or a counted skip.
    let shard = shard_bytes();
    check("tar", 384, edits(), |e| {
        let p = write(&dir, "s.tar", &mutate(&shard, 1536, &e));
        let _ = flava_data::sources::ShardSource::read_shard(&p);
    });
    let gz = gzip(&shard);
    check("tar.gz", 256, edits(), |e| {
        let p = write(&dir, "s.tar.gz", &mutate(&gz, 64, &e));
        let _ = flava_data::sources::ShardSource::read_shard(&p);
    });
    check("tar (arbitrary)", 128, arbitrary(), |b| {
        let p = write(&dir, "a.tar", &b);
        let _ = flava_data::sources::ShardSource::read_shard(&p);
    });

    // Images: header-declared sizes are checked before decoding.
    let (p8, j8) = (png(16, 16), jpeg(16, 16));
    check("png", 384, edits(), |e| {
        let _ = flava_data::processor::decode_image(&mutate(&p8, 40, &e));
    });
    check("jpeg", 384, edits(), |e| {
        let _ = flava_data::processor::decode_image(&mutate(&j8, 200, &e));
    });

    // Decompression bombs: small files declaring huge images (any size up to 65500 per side).
    check(
        "image bombs",
        64,
        (1000u16..=65500, 1000u16..=65500, any::<bool>()),
        |(w, h, as_png)| {
            let mut b = if as_png { png(16, 16) } else { jpeg(16, 16) };
            if as_png {
                b[16..20].copy_from_slice(&(w as u32).to_be_bytes());
                b[20..24].copy_from_slice(&(h as u32).to_be_bytes());
            } else {
                let sof = b.windows(2).position(|m| m == [0xFF, 0xC0]).unwrap();
                b[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
                b[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
            }
            let r = flava_data::processor::decode_image(&b);
            if (w as u64) * (h as u64) > flava_vit::limits::current().max_image_pixels {
                assert!(r.is_err(), "{w}x{h} was decoded");
            }
        },
    );

    // safetensors: the header's offsets and shapes are validated against the file.
    let st = std::fs::read(fixtures().join("tiny_image_model/model.safetensors")).unwrap();
    check("safetensors", 256, edits(), |e| {
        let _ = flava_vit::StateDict::from_safetensors_bytes(&mutate(&st, 2048, &e));
    });
    check("safetensors (arbitrary)", 128, arbitrary(), |b| {
        let _ = flava_vit::StateDict::from_safetensors_bytes(&b);
    });

    // PyTorch zip + pickle: only tensor records are interpreted; sizes checked first.
    let pt = std::fs::read(fixtures().join("codebook_dalle_keys.pt")).unwrap();
    check("pickle", 192, edits(), |e| {
        let p = write(&dir, "m.pt", &mutate(&pt, pt.len(), &e));
        let _ = flava_vit::StateDict::from_pytorch(&p);
    });

    // Model configurations: sizes are checked before anything is built.
    let cfg = std::fs::read(fixtures().join("tiny/config.json")).unwrap();
    check("config", 384, edits(), |e| {
        let text = String::from_utf8_lossy(&mutate(&cfg, cfg.len(), &e)).into_owned();
        let _ = flava_fusion::FlavaConfig::from_json_str(&text, Path::new("config.json"));
    });
    check("config sizes", 256, (0usize..6, any::<u64>()), |(field, v)| {
        let key = [
            "hidden_size",
            "num_hidden_layers",
            "intermediate_size",
            "image_size",
            "vocab_size",
            "patch_size",
        ][field];
        let mut j: serde_json::Value = serde_json::from_slice(&cfg).unwrap();
        j["image_config"][key] = serde_json::json!(v);
        if let Ok(c) = flava_fusion::FlavaConfig::from_json_str(&j.to_string(), Path::new("config.json")) {
            assert!(c.parameter_estimate() <= flava_vit::limits::current().max_parameters as u128);
        }
    });

    // CSV manifests, COCO annotations, text and JSONL files.
    let cols = flava_data::sources::ManifestColumns::default();
    let csv = b"image,caption\na.png,a cat\n\"b.png\",\"a, quoted\ndog\"\nc.png\n".to_vec();
    check("csv", 256, edits(), |e| {
        let p = write(&dir, "m.csv", &mutate(&csv, csv.len(), &e));
        let _ = flava_data::sources::read_manifest(&p, &cols);
    });
    let coco = serde_json::json!({
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
        "annotations": [{"image_id": 1, "caption": "a cat"}, {"image_id": 2, "caption": null}]
    })
    .to_string()
    .into_bytes();
    check("coco", 256, edits(), |e| {
        let p = write(&dir, "c.json", &mutate(&coco, coco.len(), &e));
        let _ = flava_data::sources::read_coco(&p, &dir);
    });
    let jsonl = b"{\"text\": \"one\"}\n{\"text\": \"two\", \"x\": [1, 2]}\nnot json\n{\"text\": null}\n".to_vec();
    check("jsonl", 256, edits(), |e| {
        let p = write(&dir, "t.jsonl", &mutate(&jsonl, jsonl.len(), &e));
        let _ = flava_data::sources::read_texts(&p, "text");
    });
    check("text (arbitrary)", 128, arbitrary(), |b| {
        let p = write(&dir, "t.txt", &b);
        let _ = flava_data::sources::read_texts(&p, "text");
    });

    // Brace patterns: an expansion within bounds, or an error.
    check("braces", 1024, "[{}.,0-9a-c/]{0,24}", |pattern| {
        if let Ok(v) = flava_data::sources::expand_braces(&pattern) {
            assert!(v.len() as u64 <= flava_data::sources::MAX_BRACE_EXPANSION);
        }
    });
    std::fs::remove_dir_all(&dir).ok();
}
