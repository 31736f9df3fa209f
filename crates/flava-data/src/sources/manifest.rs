//! CSV/TSV manifests: one image path and one caption per row.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{check_file_size, read_err, text_too_long, Entry, SkipReason, SourceError, NON_UTF8_MARKER};

/// Column names of a CSV/TSV manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestColumns {
    /// Image path column (relative paths are resolved against the manifest's directory).
    pub image: String,
    /// Caption column.
    pub caption: String,
}

impl Default for ManifestColumns {
    fn default() -> Self {
        Self {
            image: "image".into(),
            caption: "caption".into(),
        }
    }
}

/// Reads a CSV (`,`) or TSV (`\t`, by extension) manifest with a header row.
pub fn read_manifest(path: &Path, cols: &ManifestColumns) -> Result<Vec<Entry>, SourceError> {
    check_file_size(path)?;
    let tsv = path.extension().is_some_and(|e| e == "tsv");
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(if tsv { b'\t' } else { b',' })
        .flexible(true)
        .from_path(path)
        .map_err(|e| read_err(path, e))?;
    let headers = rdr.headers().map_err(|e| read_err(path, e))?.clone();
    let find = |name: &str| {
        headers.iter().position(|h| h == name).ok_or_else(|| {
            read_err(
                path,
                format!(
                    "no column `{name}` (columns: {})",
                    headers.iter().collect::<Vec<_>>().join(", ")
                ),
            )
        })
    };
    let (ci, cc) = (find(&cols.image)?, find(&cols.caption)?);
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (row, rec) in rdr.byte_records().enumerate() {
        let rec = rec.map_err(|e| read_err(path, e))?;
        let key = format!("{}:{}", path.display(), row + 2);
        if let Some(detail) = rec.get(cc).and_then(|b| text_too_long(b.len())) {
            out.push(Entry::skipped(key, SkipReason::TooLarge, detail));
            continue;
        }
        let img = rec.get(ci).map(|b| base.join(String::from_utf8_lossy(b).as_ref()));
        // Non-UTF-8 captions are kept as lossy text here and rejected at decode time.
        let text = rec.get(cc).map(|b| match std::str::from_utf8(b) {
            Ok(s) => s.to_string(),
            Err(_) => NON_UTF8_MARKER.to_string(),
        });
        out.push(Entry {
            key,
            image: img,
            text,
            label: None,
            skip: None,
        });
    }
    if out.is_empty() {
        return Err(SourceError::NoRecords(format!(
            "{} has a header but no rows",
            path.display()
        )));
    }
    Ok(out)
}
