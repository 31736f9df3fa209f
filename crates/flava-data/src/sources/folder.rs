//! ImageFolder trees: `root/<class>/<image>`, labelled by folder.

use std::path::{Path, PathBuf};

use super::{read_err, Entry, SourceError, IMAGE_EXTS};

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Reads an ImageFolder tree (`root/<class>/<image>`): entries labelled by folder, classes sorted.
pub fn read_image_folder(root: &Path) -> Result<(Vec<Entry>, Vec<String>), SourceError> {
    let mut classes: Vec<String> = std::fs::read_dir(root)
        .map_err(|e| read_err(root, e))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    classes.sort();
    let mut out = Vec::new();
    for c in &classes {
        let mut files: Vec<PathBuf> = std::fs::read_dir(root.join(c))
            .map_err(|e| read_err(&root.join(c), e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_image(p))
            .collect();
        files.sort();
        out.extend(files.into_iter().map(|p| Entry {
            key: p.display().to_string(),
            image: Some(p),
            text: None,
            label: Some(c.clone()),
            skip: None,
        }));
    }
    if out.is_empty() {
        return Err(SourceError::NoMatch(format!(
            "{} (no class folders with images)",
            root.display()
        )));
    }
    Ok((out, classes))
}
