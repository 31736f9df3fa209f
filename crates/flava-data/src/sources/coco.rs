//! COCO captions: `captions_*.json` and its image directory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use serde::Deserialize;

use super::{check_file_size, read_err, text_too_long, Entry, SkipReason, SourceError};

/// Reads COCO captions (`annotations/captions_*.json` + image directory): one entry per caption.
pub fn read_coco(annotations: &Path, images: &Path) -> Result<Vec<Entry>, SourceError> {
    #[derive(Deserialize)]
    struct Img {
        id: u64,
        file_name: String,
    }
    #[derive(Deserialize)]
    struct Ann {
        image_id: u64,
        // Any JSON value: a null or non-string caption skips that record, not the whole file.
        #[serde(default)]
        caption: serde_json::Value,
    }
    #[derive(Deserialize)]
    struct Coco {
        images: Vec<Img>,
        annotations: Vec<Ann>,
    }
    check_file_size(annotations)?;
    let f = File::open(annotations).map_err(|e| read_err(annotations, e))?;
    let coco: Coco = serde_json::from_reader(BufReader::new(f)).map_err(|e| read_err(annotations, e))?;
    let files: BTreeMap<u64, String> = coco.images.into_iter().map(|i| (i.id, i.file_name)).collect();
    let out: Vec<Entry> = coco
        .annotations
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            let key = format!("coco:{}:{i}", a.image_id);
            let Some(file) = files.get(&a.image_id) else {
                return Entry::skipped(
                    key,
                    SkipReason::MissingImage,
                    format!("no entry with id {} in `images`", a.image_id),
                );
            };
            let caption = match a.caption {
                serde_json::Value::String(c) => c,
                serde_json::Value::Null => {
                    return Entry::skipped(key, SkipReason::MissingCaption, "the caption is null or absent")
                }
                other => {
                    return Entry::skipped(
                        key,
                        SkipReason::BadJson,
                        format!("the caption is not a string: {other}"),
                    )
                }
            };
            if let Some(detail) = text_too_long(caption.len()) {
                return Entry::skipped(key, SkipReason::TooLarge, detail);
            }
            Entry {
                key,
                image: Some(images.join(file)),
                text: Some(caption),
                label: Some(a.image_id.to_string()),
                skip: None,
            }
        })
        .collect();
    if out.is_empty() {
        return Err(SourceError::NoRecords(format!(
            "{} has no annotations",
            annotations.display()
        )));
    }
    Ok(out)
}
