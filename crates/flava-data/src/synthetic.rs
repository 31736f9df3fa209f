//! The built-in synthetic data: deterministic images of coloured shapes with captions generated
//! from the same scene, so a model can learn that the caption says what the image shows.
//!
//! A scene has one to three objects, each a shape (circle, square, triangle, cross) in a colour
//! (red, green, blue, yellow, purple, orange), a fill pattern (plain, striped, dotted, checked)
//! and a size (small, big) at a position; captions name the objects ("a big red striped
//! circle"), their count when two share a kind, and a left/right or above/below relation between
//! the first two. Image-only and text-only streams come from the same generator, and a held-out
//! split of single-object images labelled "colour pattern" (24 classes) serves zero-shot
//! evaluation. Every sample is a pure function of `(seed, split, index)`.
//!
//! Why patterns: a tiny ViT trained for minutes does not learn shapes. Trained supervised on
//! these images (PyTorch, transformers' `FlavaImageModel` at the `tiny` sizes, batch 32, lr 1e-3),
//! it told the four shapes apart 33% of the time after 400 steps (chance 25%) but the four
//! patterns 99.6% of the time after 300. Patterns have a period of 8 px at 64 px, one per patch
//! and aligned with the codebook's 8-px tokens, so the dVAE can also represent them.
//!
//! Training scenes come in *contrast groups* of [`GROUP`] consecutive indices: the same layout,
//! colours and sizes, each member with the shapes rotated by one. Each scene alone is drawn from
//! the same distribution as a held-out one, but a batch that keeps groups together holds scenes
//! that only shape tells apart: hard negatives for the contrastive and ITM losses. Without them
//! colour and size separate almost every pair of a batch, and a small model learns no shape in
//! minutes. Epoch shuffles move whole groups.

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

/// Fill pattern names: full colour; horizontal stripes; dots; a checkerboard (half-period 4 px at
/// 64 px; the rest of the object is a light tint of its colour).
pub const PATTERNS: [&str; 4] = ["plain", "striped", "dotted", "checked"];

/// The zero-shot classes: every "colour pattern" pair, in a fixed order.
pub fn class_names() -> Vec<String> {
    COLOURS
        .iter()
        .flat_map(|(c, _)| PATTERNS.iter().map(move |p| format!("{c} {p}")))
        .collect()
}

/// Default zero-shot prompt templates for [`class_names`]: the class in captions of every shape,
/// averaged as CLIP does, so that the class embedding does not favour one shape.
pub fn class_templates() -> Vec<String> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| format!("a {} {{}} {s}", if i % 2 == 0 { "big" } else { "small" }))
        .collect()
}

/// One object of a scene.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Object {
    /// Index into [`SHAPES`].
    pub shape: usize,
    /// Index into [`COLOURS`].
    pub colour: usize,
    /// Index into [`PATTERNS`].
    pub pattern: usize,
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

/// Scenes per contrast group of the training split (one per shape and pattern).
pub const GROUP: u64 = SHAPES.len() as u64;

/// Draws the scene of `(seed, split, index)`. Training scenes of one contrast group share
/// everything but their shapes and patterns, which member `index % GROUP` rotates by its number.
pub fn scene(seed: u64, split: Split, index: u64) -> Vec<Object> {
    if split == Split::Train {
        let (group, member) = (index / GROUP, index % GROUP);
        let mut objs = draw_scene(seed, split, group);
        for o in &mut objs {
            o.shape = (o.shape + member as usize) % SHAPES.len();
            o.pattern = (o.pattern + member as usize) % PATTERNS.len();
        }
        return objs;
    }
    draw_scene(seed, split, index)
}

fn draw_scene(seed: u64, split: Split, index: u64) -> Vec<Object> {
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
            pattern: rng.random_range(0..PATTERNS.len()),
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

/// Whether the pattern shows the full colour at `(x, y)` (shares of the side); cells are 1/16
/// of the side (4 px at 64 px).
fn pattern_on(pattern: usize, x: f32, y: f32) -> bool {
    let (cx, cy) = ((x * 16.0).floor() as i32, (y * 16.0).floor() as i32);
    match PATTERNS[pattern] {
        "plain" => true,
        "striped" => cy % 2 == 0,
        "dotted" => cx % 2 == 0 && cy % 2 == 0,
        _ => (cx + cy) % 2 == 0,
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
            .map_or([225u8, 222, 215], |o| {
                let c = COLOURS[o.colour].1;
                if pattern_on(o.pattern, x, y) {
                    c
                } else {
                    // A light tint: 45% colour, 55% white.
                    c.map(|v| (0.45 * v as f32 + 0.55 * 255.0).round() as u8)
                }
            });
        Rgb(base.map(|c| (c as i16 + n).clamp(0, 255) as u8))
    })
}

fn name(o: &Object) -> String {
    format!(
        "{} {} {} {}",
        if o.big { "big" } else { "small" },
        COLOURS[o.colour].0,
        PATTERNS[o.pattern],
        SHAPES[o.shape]
    )
}

/// The caption of a scene, e.g. "a big red striped circle left of a small blue plain square".
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

/// A passage of the text-only corpus: a caption, or (every other index) a question about the
/// scene followed by its answer, e.g. "what colour is the circle? red". A text corpus holds
/// questions as well as descriptions; without them the tokenizer trained on this corpus would
/// spell question words letter by letter and a pretrained model would meet them first in
/// fine-tuning.
pub fn text_passage(objs: &[Object], seed: u64, index: u64) -> String {
    if index.is_multiple_of(2) {
        return caption(objs, index);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ index.rotate_left(29) ^ 0x7465_7874);
    let (q, a) = crate::tasks::synthetic_question(objs, &mut rng);
    format!("{q} {a}")
}

/// What the synthetic source yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyntheticKind {
    /// Image + caption.
    Pairs,
    /// Images only.
    Images,
    /// Text only: captions, and questions about scenes with their answers ([`text_passage`]).
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
                text: Some(text_passage(&objs, self.seed, index)),
                label: None,
            },
            SyntheticKind::Classes => {
                let o = objs[0];
                RawSample {
                    key,
                    image: img(),
                    text: None,
                    label: Some(format!("{} {}", COLOURS[o.colour].0, PATTERNS[o.pattern])),
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
        // Shuffle whole contrast groups so that their members stay neighbours in a batch.
        let group = if self.split == Split::Train { GROUP } else { 1 };
        let mut groups: Vec<u64> = (0..self.len.div_ceil(group)).collect();
        groups.shuffle(&mut rng_for(self.seed, epoch, 4));
        self.order = groups
            .into_iter()
            .flat_map(|g| g * group..((g + 1) * group).min(self.len))
            .collect();
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
                assert!(
                    c.contains(COLOURS[o.colour].0) && c.contains(SHAPES[o.shape]) && c.contains(PATTERNS[o.pattern]),
                    "{c}"
                );
            }
        }
    }

    #[test]
    fn the_text_corpus_alternates_captions_and_answered_questions() {
        let s = SyntheticSource::new(SyntheticKind::Text, Split::Train, 7, 100, 64);
        let answers = crate::tasks::synthetic_vqa_answers();
        for i in 0..40 {
            let text = s.sample(i).text.unwrap();
            let objs = scene(7, Split::Train, i);
            if i.is_multiple_of(2) {
                assert_eq!(text, caption(&objs, i));
            } else {
                let (q, a) = text.rsplit_once("? ").unwrap_or_else(|| panic!("{text}"));
                assert!(answers.contains(&a.to_string()), "{text}");
                assert!(!q.is_empty());
            }
        }
        assert_eq!(s.sample(5).text, s.sample(5).text);
    }

    #[test]
    fn objects_are_visible_in_the_image() {
        let objs = scene(1, Split::Train, 5);
        let img = render(&objs, 64, 0);
        for o in &objs {
            let (px, py) = ((o.cx * 64.0) as u32, (o.cy * 64.0) as u32);
            let p = img.get_pixel(px, py).0;
            let c = COLOURS[o.colour].1;
            let on = pattern_on(o.pattern, (px as f32 + 0.5) / 64.0, (py as f32 + 0.5) / 64.0);
            let want = if on {
                c
            } else {
                c.map(|v| (0.45 * v as f32 + 0.55 * 255.0).round() as u8)
            };
            assert!(
                p.iter().zip(want).all(|(a, b)| (*a as i16 - b as i16).abs() <= 12),
                "{p:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn patterns_have_a_period_of_8_pixels_at_64() {
        let o = |pattern| Object {
            shape: 1,
            colour: 0,
            pattern,
            big: true,
            cx: 0.5,
            cy: 0.5,
        };
        // Red channel: 220 on, 0.45·220 + 0.55·255 ≈ 239 off; noise ±12 blurs that, so compare
        // the green channel (40 on, ≈ 158 off).
        let on = |img: &RgbImage, x: u32, y: u32| img.get_pixel(x, y).0[1] < 100;
        let plain = render(&[o(0)], 64, 0);
        let striped = render(&[o(1)], 64, 0);
        let dotted = render(&[o(2)], 64, 0);
        let checked = render(&[o(3)], 64, 0);
        for (x, y) in [(24, 24), (28, 24), (24, 28), (28, 28), (32, 36), (36, 36)] {
            let (cx, cy) = (x / 4, y / 4);
            assert!(on(&plain, x, y));
            assert_eq!(on(&striped, x, y), cy % 2 == 0, "striped at {x},{y}");
            assert_eq!(on(&dotted, x, y), cx % 2 == 0 && cy % 2 == 0, "dotted at {x},{y}");
            assert_eq!(on(&checked, x, y), (cx + cy) % 2 == 0, "checked at {x},{y}");
        }
    }

    #[test]
    fn contrast_groups_differ_only_in_shape_and_stay_together() {
        for g in 0..20 {
            let members: Vec<_> = (0..GROUP).map(|m| scene(3, Split::Train, g * GROUP + m)).collect();
            for (m, objs) in members.iter().enumerate().skip(1) {
                assert_eq!(objs.len(), members[0].len());
                for (o, first) in objs.iter().zip(&members[0]) {
                    assert_eq!(
                        (o.colour, o.big, o.cx, o.cy),
                        (first.colour, first.big, first.cx, first.cy)
                    );
                    assert_eq!(o.shape, (first.shape + m) % SHAPES.len());
                    assert_eq!(o.pattern, (first.pattern + m) % PATTERNS.len());
                }
            }
        }
        // Epoch orders are permutations; with whole groups, members stay neighbours.
        for len in [22, 24] {
            let mut s = SyntheticSource::new(SyntheticKind::Pairs, Split::Train, 3, len, 16);
            s.start_epoch(1);
            let mut sorted = s.order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..len).collect::<Vec<_>>());
            assert_ne!(s.order, sorted);
            if len % GROUP == 0 {
                for chunk in s.order.chunks(GROUP as usize) {
                    assert!(chunk.iter().all(|i| i / GROUP == chunk[0] / GROUP), "{:?}", s.order);
                }
            }
        }
        // Held-out scenes are independent draws.
        let h: Vec<_> = (0..GROUP).map(|i| scene(3, Split::HeldOut, i)).collect();
        assert!(h
            .windows(2)
            .any(|w| w[0][0].colour != w[1][0].colour || w[0][0].cx != w[1][0].cx));
    }

    #[test]
    fn zero_shot_split_has_24_classes_and_labels() {
        assert_eq!(class_names().len(), 24);
        let s = SyntheticSource::new(SyntheticKind::Classes, Split::ZeroShot, 0, 10, 32);
        let l = s.sample(0).label.unwrap();
        assert!(class_names().contains(&l));
    }
}
