//! Text files (one sample per line) and JSONL files (a `text` field per line).

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use super::{check_file_size, read_err, Entry, SkipReason, SourceError, NON_UTF8_MARKER};

/// Reads a text file with one sample per line (blank lines are skipped), or JSONL with a `text`
/// field (or `field`). Lines are read in bounded pieces: one longer than `limits.max_text_bytes`
/// becomes a counted skip without being held whole; a malformed JSONL line is a `BadJson` skip,
/// one without the field a `MissingCaption` skip.
pub fn read_texts(path: &Path, field: &str) -> Result<Vec<Entry>, SourceError> {
    use std::io::BufRead;
    check_file_size(path)?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let max = flava_vit::limits::current().max_text_bytes as usize;
    let mut reader = BufReader::new(File::open(path).map_err(|e| read_err(path, e))?);
    let mut out = Vec::new();
    let mut line = Vec::new();
    let mut lineno = 0usize;
    loop {
        // Read one line, keeping at most `max + 1` bytes of it.
        line.clear();
        let mut len = 0usize;
        let mut ended = false;
        loop {
            let buf = reader.fill_buf().map_err(|e| read_err(path, e))?;
            if buf.is_empty() {
                break;
            }
            let (chunk, found) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (&buf[..i], true),
                None => (buf, false),
            };
            let keep = chunk.len().min((max + 1).saturating_sub(line.len()));
            line.extend_from_slice(&chunk[..keep]);
            len += chunk.len();
            let consumed = chunk.len() + usize::from(found);
            reader.consume(consumed);
            if found {
                ended = true;
                break;
            }
        }
        if !ended && len == 0 {
            break;
        }
        lineno += 1;
        let key = format!("{}:{lineno}", path.display());
        if len > max {
            out.push(Entry::skipped(
                key,
                SkipReason::TooLarge,
                format!("line of {len} bytes, over the limit of {max} (limits.max_text_bytes)"),
            ));
            continue;
        }
        let text = match std::str::from_utf8(&line) {
            Ok(s) => s.trim_end_matches('\r').to_string(),
            Err(_) => NON_UTF8_MARKER.to_string(),
        };
        if text.trim().is_empty() {
            continue;
        }
        let text = if jsonl && text != NON_UTF8_MARKER {
            match serde_json::from_str::<serde_json::Value>(&text) {
                Err(e) => {
                    out.push(Entry::skipped(
                        key,
                        SkipReason::BadJson,
                        format!("not a JSON line: {e}"),
                    ));
                    continue;
                }
                Ok(v) => match v.get(field) {
                    Some(serde_json::Value::String(t)) => t.clone(),
                    Some(other) => {
                        out.push(Entry::skipped(
                            key,
                            SkipReason::BadJson,
                            format!("field `{field}` is not a string: {other}"),
                        ));
                        continue;
                    }
                    None => {
                        out.push(Entry::skipped(
                            key,
                            SkipReason::MissingCaption,
                            format!("no `{field}` field"),
                        ));
                        continue;
                    }
                },
            }
        } else {
            text
        };
        out.push(Entry {
            key,
            image: None,
            text: Some(text),
            label: None,
            skip: None,
        });
        if !ended {
            break;
        }
    }
    if out.is_empty() {
        return Err(SourceError::NoRecords(format!(
            "{} has no non-blank lines",
            path.display()
        )));
    }
    Ok(out)
}
