//! Writing any source as WebDataset shards, and inspecting shards.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use crate::sources::{expand_braces, is_remote_spec, ImageData, Record, ShardSource, Source, SourceError};

/// What was written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardReport {
    /// Shard files, in order.
    pub shards: Vec<PathBuf>,
    /// Samples written.
    pub samples: u64,
    /// Records skipped by the source.
    pub skipped: u64,
}

fn append(b: &mut tar::Builder<BufWriter<File>>, name: &str, data: &[u8]) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    b.append_data(&mut h, name, data)
}

/// Writes one epoch of `source` (in its epoch-0 order) as `out/000000.tar`, … with `shard_size`
/// samples each, keys `000000000`, … (img2dataset's layout: `.jpg`/`.png`, `.txt`, `.cls`).
/// Decoded images are stored as PNG; encoded ones are copied as they are.
pub fn write_shards(
    source: &mut dyn Source,
    out: &Path,
    shard_size: usize,
    limit: Option<u64>,
    mut progress: impl FnMut(u64),
) -> std::io::Result<ShardReport> {
    std::fs::create_dir_all(out)?;
    source.start_epoch(0);
    let mut report = ShardReport::default();
    let mut builder: Option<tar::Builder<BufWriter<File>>> = None;
    let mut in_shard = 0;
    while limit.is_none_or(|l| report.samples < l) {
        let Some(rec) = source.next_record() else { break };
        let s = match rec {
            Record::Sample(s) => s,
            Record::Skipped { reason, key, detail } => {
                log::warn!("skipped {key} ({reason:?}): {detail}");
                report.skipped += 1;
                continue;
            }
        };
        if builder.is_none() || in_shard == shard_size.max(1) {
            if let Some(b) = builder.take() {
                finish_shard(b, report.shards.last().expect("a shard is open"))?;
            }
            // Written as `N.tar.tmp` and renamed when complete: a crash leaves no cut shard.
            let path = out.join(format!("{:06}.tar", report.shards.len()));
            builder = Some(tar::Builder::new(BufWriter::new(File::create(tmp_of(&path))?)));
            report.shards.push(path);
            in_shard = 0;
        }
        let b = builder.as_mut().expect("opened above");
        let key = format!("{:09}", report.samples);
        match s.image {
            Some(ImageData::Decoded(img)) => {
                let mut png = std::io::Cursor::new(Vec::new());
                img.write_to(&mut png, image::ImageFormat::Png)
                    .map_err(std::io::Error::other)?;
                append(b, &format!("{key}.png"), png.get_ref())?;
            }
            Some(ImageData::Encoded(bytes)) => {
                let ext = match image::guess_format(&bytes) {
                    Ok(image::ImageFormat::Png) => "png",
                    Ok(image::ImageFormat::WebP) => "webp",
                    _ => "jpg",
                };
                append(b, &format!("{key}.{ext}"), &bytes)?;
            }
            None => {}
        }
        if let Some(t) = &s.text {
            append(b, &format!("{key}.txt"), t.as_bytes())?;
        }
        if let Some(l) = &s.label {
            append(b, &format!("{key}.cls"), l.as_bytes())?;
        }
        report.samples += 1;
        in_shard += 1;
        progress(report.samples);
    }
    if let Some(b) = builder.take() {
        finish_shard(b, report.shards.last().expect("a shard is open"))?;
    }
    Ok(report)
}

fn tmp_of(path: &Path) -> PathBuf {
    flava_vit::atomic::tmp_path(path)
}

/// Ends a shard's tar, fsyncs it and moves it to its final name.
fn finish_shard(b: tar::Builder<BufWriter<File>>, path: &Path) -> std::io::Result<()> {
    let f = b.into_inner()?.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    std::fs::rename(tmp_of(path), path)
}

/// Per-shard summary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardSummary {
    /// The shard.
    pub path: PathBuf,
    /// Samples (grouped by key).
    pub samples: u64,
    /// Samples with an image / a text / a label.
    pub with_image: u64,
    /// Samples with a text.
    pub with_text: u64,
    /// Samples with a label.
    pub with_label: u64,
    /// Skipped records (truncated members, bad JSON, non-UTF-8 text).
    pub skipped: u64,
}

/// Reads shards (a brace pattern or one file, local or URLs) and summarises them; also returns
/// the first sample. A remote shard that cannot be read counts as one skipped record.
pub fn inspect(pattern: &str) -> Result<(Vec<ShardSummary>, Option<String>), SourceError> {
    let locations = expand_braces(pattern)?;
    let remote = locations.iter().any(|l| is_remote_spec(l));
    if !remote && locations.iter().all(|p| !Path::new(p).is_file()) {
        return Err(SourceError::NoMatch(pattern.into()));
    }
    let mut out = Vec::new();
    let mut first = None;
    for l in locations {
        let p = PathBuf::from(&l);
        if !remote && !p.is_file() {
            return Err(SourceError::Read {
                path: p,
                message: "does not exist".into(),
            });
        }
        let mut s = ShardSummary {
            path: p.clone(),
            ..Default::default()
        };
        for r in ShardSource::read_location(&l) {
            match r {
                Record::Sample(x) => {
                    s.samples += 1;
                    s.with_image += x.image.is_some() as u64;
                    s.with_text += x.text.is_some() as u64;
                    s.with_label += x.label.is_some() as u64;
                    if first.is_none() {
                        let size = match &x.image {
                            // The header only: inspecting must not decode a bomb.
                            Some(ImageData::Encoded(b)) => image::ImageReader::new(std::io::Cursor::new(b))
                                .with_guessed_format()
                                .map_err(image::ImageError::IoError)
                                .and_then(|r| r.into_dimensions())
                                .map(|(w, h)| format!("{w}x{h}"))
                                .unwrap_or_else(|e| format!("undecodable ({e})")),
                            Some(ImageData::Decoded(i)) => format!("{}x{}", i.width(), i.height()),
                            None => "none".into(),
                        };
                        let mut m = BTreeMap::new();
                        m.insert("key", x.key.clone());
                        m.insert("image", size);
                        m.insert("text", x.text.clone().unwrap_or_default());
                        m.insert("label", x.label.clone().unwrap_or_default());
                        first = Some(format!("{m:?}"));
                    }
                }
                Record::Skipped { .. } => s.skipped += 1,
            }
        }
        out.push(s);
    }
    Ok((out, first))
}
