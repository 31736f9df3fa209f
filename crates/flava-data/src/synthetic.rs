//! The built-in synthetic data: deterministic images of coloured shapes with captions generated
//! from the same scene, so a model can learn that the caption says what the image shows.
//!
//! A scene has one to three objects, each a shape (circle, square, triangle, cross) in a colour
//! (red, green, blue, yellow, purple, orange) and a size (small, big) at a position; captions name
//! the objects, their count when two share a kind, and a left/right or above/below relation
//! between the first two. Image-only and text-only streams come from the same generator, and a
//! held-out split of single-object images labelled "colour shape" (24 classes) serves zero-shot
//! evaluation. Every sample is a pure function of `(seed, split, index)`.

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::sources::{rng_for, ImageData, RawSample, Record, Source};

/// Colour names and RGB values.
pub const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 170, 60]),
    ("blue", [40, 80, 220]),
    ("yellow", [235, 210, 40]),
    ("purple", [140, 60, 180]),
    ("orange", [245, 140, 30]),
];

/// Shape names.
pub const SHAPES: [&str; 4] = ["circle", "square", "triangle", "cross"];

/// The zero-shot classes: every "colour shape" pair, in a fixed order.
pub fn class_names() -> Vec<String> {
    COLOURS
        .iter()
        .flat_map(|(c, _)| SHAPES.iter().map(move |s| format!("{c} {s}")))
        .collect()
}

/// One object of a scene.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Object {
    /// Index into [`SHAPES`].
    pub shape: usize,
    /// Index into [`COLOURS`].
    pub colour: usize,
    /// Big (true) or small.
    pub big: bool,
    /// Centre, as a share of the image side.
    pub cx: f32,
    /// Centre, as a share of the image side.
    pub cy: f32,
}

/// Which part of the generator a sample comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Training scenes.
    Train,
    /// Held-out scenes (other indices of the generator).
    HeldOut,
    /// Held-out single-object images with class labels.
    ZeroShot,
}

impl Split {
    fn stream(self) -> u64 {
        match self {
            Split::Train => 11,
            Split::HeldOut => 12,
            Split::ZeroShot => 13,
        }
    }
}

/// Draws the scene of `(seed, split, index)`.
pub fn scene(seed: u64, split: Split, index: u64) -> Vec<Object> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ index);
    rng.set_stream(split.stream());
    // Half the scenes hold one object (a clean colour-shape binding), the rest two or three.
    let n = if split == Split::ZeroShot {
        1
    } else {
        [1, 1, 2, 3][rng.random_range(0..4)]
    };
    let mut objs: Vec<Object> = Vec::new();
    // Rejection sampling, capped so that an unlucky draw cannot loop for long.
    let mut attempts = 0;
    while objs.len() < n && attempts < 1000 {
        attempts += 1;
        let big = rng.random::<bool>();
        let r = radius(big);
        let o = Object {
            shape: rng.random_range(0..SHAPES.len()),
            colour: rng.random_range(0..COLOURS.len()),
            big,
            cx: rng.random_range(r..1.0 - r),
            cy: rng.random_range(r..1.0 - r),
        };
        // Keep objects apart so that each stays visible.
        if objs.iter().all(|p| (p.cx - o.cx).abs() + (p.cy - o.cy).abs() > 0.46) {
            objs.push(o);
        }
    }
    objs
}

/// Object radius as a share of the image side: large enough that shapes span several 8-px
/// patches at 64 px, so a small ViT can tell them apart after minutes of CPU training.
fn radius(big: bool) -> f32 {
    if big {
        0.26
    } else {
        0.16
    }
}

fn inside(o: &Object, x: f32, y: f32) -> bool {
    let r = radius(o.big);
    let (dx, dy) = (x - o.cx, y - o.cy);
    match SHAPES[o.shape] {
        "circle" => dx * dx + dy * dy <= r * r,
        "square" => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
        "triangle" => dy <= r * 0.8 && dy >= -r && dx.abs() <= (dy + r) * 0.6,
        _ => (dx.abs() <= r * 0.3 && dy.abs() <= r) || (dy.abs() <= r * 0.3 && dx.abs() <= r),
    }
}

/// Renders a scene at `size × size` with a light, slightly noisy background.
pub fn render(objs: &[Object], size: u32, noise_seed: u64) -> RgbImage {
    let mut rng = ChaCha8Rng::seed_from_u64(noise_seed);
    RgbImage::from_fn(size, size, |px, py| {
        let (x, y) = ((px as f32 + 0.5) / size as f32, (py as f32 + 0.5) / size as f32);
        let n: i16 = rng.random_range(-12..=12);
        let base = objs
            .iter()
            .rev()
            .find(|o| inside(o, x, y))
            .map_or([225u8, 222, 215], |o| COLOURS[o.colour].1);
        Rgb(base.map(|c| (c as i16 + n).clamp(0, 255) as u8))
    })
}

fn name(o: &Object) -> String {
    format!(
        "{} {} {}",
        if o.big { "big" } else { "small" },
        COLOURS[o.colour].0,
        SHAPES[o.shape]
    )
}

/// The caption of a scene, e.g. "a big red circle left of a small blue square".
pub fn caption(objs: &[Object], variant: u64) -> String {
    let article = |s: &str| {
        if s.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        }
    };
    let a = name(&objs[0]);
    if objs.len() == 1 {
        let templates = ["{a}", "a picture of {a}", "{a} on a grey background"];
        let t = templates[(variant % templates.len() as u64) as usize];
        return t.replace("{a}", &format!("{} {a}", article(&a)));
    }
    let b = name(&objs[1]);
    let (o0, o1) = (&objs[0], &objs[1]);
    let rel = if (o0.cx - o1.cx).abs() >= (o0.cy - o1.cy).abs() {
        if o0.cx < o1.cx {
            "left of"
        } else {
            "right of"
        }
    } else if o0.cy < o1.cy {
        "above"
    } else {
        "below"
    };
    let mut s = format!("{} {a} {rel} {} {b}", article(&a), article(&b));
    if objs.len() == 3 {
        let c = name(&objs[2]);
        s = format!("{s} and {} {c}", article(&c));
    }
    if objs.len() >= 2 && o0.shape == o1.shape && o0.colour == o1.colour {
        s = format!("two {} {}s: {s}", COLOURS[o0.colour].0, SHAPES[o0.shape]);
    }
    s
}

/// What the synthetic source yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyntheticKind {
    /// Image + caption.
    Pairs,
    /// Images only.
    Images,
    /// Captions only.
    Text,
    /// Single-object images with their class label (zero-shot evaluation).
    Classes,
}

/// The synthetic source: `len` samples per epoch, reshuffled each epoch.
pub struct SyntheticSource {
    kind: SyntheticKind,
    split: Split,
    seed: u64,
    len: u64,
    image_size: u32,
    order: Vec<u64>,
    next: usize,
}

impl SyntheticSource {
    /// `len` samples of `kind` from `split`, rendered at `image_size`.
    pub fn new(kind: SyntheticKind, split: Split, seed: u64, len: u64, image_size: u32) -> Self {
        let split = if kind == SyntheticKind::Classes {
            Split::ZeroShot
        } else {
            split
        };
        Self {
            kind,
            split,
            seed,
            len,
            image_size,
            order: (0..len).collect(),
            next: 0,
        }
    }

    /// The sample at `index` (independent of epoch and order).
    pub fn sample(&self, index: u64) -> RawSample {
        let objs = scene(self.seed, self.split, index);
        let key = format!("synthetic-{:?}-{index}", self.split).to_lowercase();
        let img = || {
            Some(ImageData::Decoded(render(
                &objs,
                self.image_size,
                self.seed ^ index.rotate_left(17),
            )))
        };
        let text = || Some(caption(&objs, index));
        match self.kind {
            SyntheticKind::Pairs => RawSample {
                key,
                image: img(),
                text: text(),
                label: None,
            },
            SyntheticKind::Images => RawSample {
                key,
                image: img(),
                text: None,
                label: None,
            },
            SyntheticKind::Text => RawSample {
                key,
                image: None,
                text: text(),
                label: None,
            },
            SyntheticKind::Classes => {
                let o = objs[0];
                RawSample {
                    key,
                    image: img(),
                    text: None,
                    label: Some(format!("{} {}", COLOURS[o.colour].0, SHAPES[o.shape])),
                }
            }
        }
    }
}

impl Source for SyntheticSource {
    fn describe(&self) -> String {
        format!("synthetic {:?} ({:?}, {} samples)", self.kind, self.split, self.len).to_lowercase()
    }

    fn start_epoch(&mut self, epoch: u64) {
        use rand::seq::SliceRandom;
        self.order = (0..self.len).collect();
        self.order.shuffle(&mut rng_for(self.seed, epoch, 4));
        self.next = 0;
    }

    fn next_record(&mut self) -> Option<Record> {
        let i = *self.order.get(self.next)?;
        self.next += 1;
        Some(Record::Sample(self.sample(i)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_captions_describe_the_scene() {
        let s = SyntheticSource::new(SyntheticKind::Pairs, Split::Train, 7, 100, 64);
        let (a, b) = (s.sample(3), s.sample(3));
        assert_eq!(a.text, b.text);
        let (Some(ImageData::Decoded(ia)), Some(ImageData::Decoded(ib))) = (a.image, b.image) else {
            panic!()
        };
        assert_eq!(ia, ib);
        for i in 0..50 {
            let objs = scene(7, Split::Train, i);
            let c = caption(&objs, i);
            for o in &objs {
                assert!(c.contains(COLOURS[o.colour].0) && c.contains(SHAPES[o.shape]), "{c}");
            }
        }
    }

    #[test]
    fn objects_are_visible_in_the_image() {
        let objs = scene(1, Split::Train, 5);
        let img = render(&objs, 64, 0);
        for o in &objs {
            let p = img.get_pixel((o.cx * 64.0) as u32, (o.cy * 64.0) as u32).0;
            let want = COLOURS[o.colour].1;
            assert!(
                p.iter().zip(want).all(|(a, b)| (*a as i16 - b as i16).abs() <= 12),
                "{p:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn zero_shot_split_has_24_classes_and_labels() {
        assert_eq!(class_names().len(), 24);
        let s = SyntheticSource::new(SyntheticKind::Classes, Split::ZeroShot, 0, 10, 32);
        let l = s.sample(0).label.unwrap();
        assert!(class_names().contains(&l));
    }
}
