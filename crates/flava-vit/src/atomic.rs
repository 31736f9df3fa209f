//! Writing files and directories atomically: a temporary sibling, `fsync`, then a rename, so a
//! crash or a full disk never leaves a half-written result under the final name.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The temporary sibling of `path` (`name.tmp` beside it).
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

fn sync_dir(dir: &Path) {
    // Makes the rename durable; not every file system supports it, so failures are ignored.
    if let Ok(d) = File::open(if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    }) {
        let _ = d.sync_all();
    }
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename).
pub fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    if let Some(parent) = path.parent() {
        sync_dir(parent);
    }
    result
}

/// A directory written as a whole: everything goes into `final.tmp/`, and [`AtomicDir::commit`]
/// fsyncs it and swaps it in for `final/` (a previous `final/` is kept as `final.old/` until the
/// new one is in place). Dropping it uncommitted removes the temporary directory.
#[derive(Debug)]
pub struct AtomicDir {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl AtomicDir {
    /// Starts writing `target` (a stale `target.tmp/` from an interrupted write is removed).
    pub fn new(target: impl Into<PathBuf>) -> std::io::Result<Self> {
        let target = target.into();
        let tmp = tmp_path(&target);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        Ok(Self {
            tmp,
            target,
            committed: false,
        })
    }

    /// The directory to write into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Fsyncs every file and moves the directory into place; returns the final path.
    pub fn commit(mut self) -> std::io::Result<PathBuf> {
        for e in std::fs::read_dir(&self.tmp)?.flatten() {
            if e.path().is_file() {
                File::open(e.path())?.sync_all()?;
            }
        }
        sync_dir(&self.tmp);
        let mut old_name = self.target.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        old_name.push(".old");
        let old = self.target.with_file_name(old_name);
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        if self.target.exists() {
            std::fs::rename(&self.target, &old)?;
        }
        std::fs::rename(&self.tmp, &self.target)?;
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        if let Some(parent) = self.target.parent() {
            sync_dir(parent);
        }
        self.committed = true;
        Ok(self.target.clone())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Recovers a directory left half-swapped by a crash inside [`AtomicDir::commit`]: if `target`
/// is missing but `target.old/` exists, the old one is put back. Stale `target.tmp/` is removed.
pub fn recover_dir(target: &Path) {
    let mut old_name = target.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    old_name.push(".old");
    let old = target.with_file_name(old_name);
    if !target.exists() && old.is_dir() {
        let _ = std::fs::rename(&old, target);
    } else if old.exists() {
        let _ = std::fs::remove_dir_all(&old);
    }
    let tmp = tmp_path(target);
    if tmp.exists() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
}

/// Keeps the lines of a JSONL metrics file whose `step` is at most `step` (a resumed run
/// rewrites what came after, so every step appears once), rewritten atomically. Lines that are
/// not JSON objects with a `step` (a line torn by a crash) are dropped too.
pub fn truncate_metrics(path: &Path, step: u64) -> std::io::Result<()> {
    if !path.is_file() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path)?;
    let mut kept = String::with_capacity(text.len());
    for line in text.lines() {
        let keep = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["step"].as_u64())
            .is_some_and(|s| s <= step);
        if keep {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    write_file(path, kept.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_directories_appear_whole_or_not_at_all() {
        let root = std::env::temp_dir().join(format!("flava-atomic-{}", std::process::id()));
        std::fs::remove_dir_all(&root).ok();
        std::fs::create_dir_all(&root).unwrap();
        let f = root.join("a.json");
        write_file(&f, b"one").unwrap();
        write_file(&f, b"two").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        assert!(!tmp_path(&f).exists());

        let d = root.join("model");
        let w = AtomicDir::new(&d).unwrap();
        std::fs::write(w.path().join("x"), b"1").unwrap();
        w.commit().unwrap();
        // An abandoned write leaves the committed directory untouched.
        let w = AtomicDir::new(&d).unwrap();
        std::fs::write(w.path().join("x"), b"2").unwrap();
        drop(w);
        assert_eq!(std::fs::read(d.join("x")).unwrap(), b"1");
        assert!(!tmp_path(&d).exists());
        // A crash between the two renames of a commit: the old directory comes back.
        std::fs::rename(&d, root.join("model.old")).unwrap();
        recover_dir(&d);
        assert_eq!(std::fs::read(d.join("x")).unwrap(), b"1");

        let m = root.join("metrics.jsonl");
        std::fs::write(&m, "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n{\"st").unwrap();
        truncate_metrics(&m, 2).unwrap();
        assert_eq!(std::fs::read_to_string(&m).unwrap(), "{\"step\":1}\n{\"step\":2}\n");
        std::fs::remove_dir_all(&root).ok();
    }
}
