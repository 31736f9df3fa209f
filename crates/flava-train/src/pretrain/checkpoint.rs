//! Training checkpoints: `OUT/checkpoints/step-NNNNNNNN/` with the model and optimizer (Burn
//! records, full precision) and `state.json` (step, data-mixer position, guard counters).
//! Each is written to `step-NNNNNNNN.tmp/` and renamed when complete, so a run killed mid-write
//! leaves the previous checkpoint as the latest complete one; `.tmp` leftovers are removed.
//! `manifest.json` holds the SHA-256 of every file, so a checkpoint damaged later (a bad disk,
//! a tampered `state.json`) is recognised and resume falls back to the one before.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::Context;
use flava_data::loader::MixerState;
use flava_data::stream::StreamStats;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Everything besides model and optimizer needed to continue exactly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: usize,
    /// Index of the current phase.
    pub phase: usize,
    /// Data position after the last consumed batch of the current phase.
    pub mixer: Option<MixerState>,
    /// Non-finite losses skipped so far.
    pub nonfinite_total: usize,
    /// Non-finite losses in a row at the end.
    pub nonfinite_consecutive: usize,
    /// Samples trained on.
    pub samples: u64,
    /// Training seconds so far.
    pub train_seconds: f64,
    /// Samples and skips per source (`task: source`) over the whole run, resumes included.
    #[serde(default)]
    pub data: BTreeMap<String, StreamStats>,
    /// SHA-256 of the codebook and tokenizer files the run trains with; a resume with other
    /// files is refused.
    #[serde(default)]
    pub fingerprints: BTreeMap<String, String>,
}

/// The SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn manifest_of(dir: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if e.path().is_file() && name != "manifest.json" {
            m.insert(name, sha256_file(&e.path())?);
        }
    }
    Ok(m)
}

/// Checks a checkpoint against its manifest and its name: every file present with its hash,
/// and `state.json`'s step equal to the directory's. Checkpoints written before manifests
/// existed are checked by name only.
pub fn verify_checkpoint(dir: &Path, step: usize) -> anyhow::Result<TrainState> {
    let manifest_path = dir.join("manifest.json");
    if manifest_path.is_file() {
        let text = std::fs::read_to_string(&manifest_path)?;
        let expected: BTreeMap<String, String> =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", manifest_path.display()))?;
        for (name, hash) in &expected {
            let p = dir.join(name);
            if !p.is_file() {
                anyhow::bail!("{} is missing", p.display());
            }
            if &sha256_file(&p)? != hash {
                anyhow::bail!("{} does not match its checksum (damaged or edited)", p.display());
            }
        }
    }
    let state = read_state(dir)?;
    if state.step != step {
        anyhow::bail!(
            "{}: state.json says step {} but the checkpoint is step {step}",
            dir.display(),
            state.step
        );
    }
    Ok(state)
}

/// Testing aid: `FLAVA_CRASH_IN_CHECKPOINT=N` aborts the process half-way through writing the
/// checkpoint of step N (after the model, before the rest), as a SIGKILL would.
const CRASH_ENV: &str = "FLAVA_CRASH_IN_CHECKPOINT";

/// The checkpoint directory of `step`.
pub fn checkpoint_dir(out: &Path, step: usize) -> PathBuf {
    out.join("checkpoints").join(format!("step-{step:08}"))
}

/// Complete checkpoints, oldest first.
pub fn list_checkpoints(out: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(out.join("checkpoints")) else {
        return vec![];
    };
    let mut v: Vec<(usize, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path().join("state.json").is_file().then(|| (step, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// Removes `.tmp` directories left by an interrupted write; returns how many.
pub fn remove_partial(out: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(out.join("checkpoints")) else {
        return 0;
    };
    rd.flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .filter(|e| std::fs::remove_dir_all(e.path()).is_ok())
        .count()
}

/// Writes a checkpoint atomically; `write_records(dir)` saves the model and optimizer into
/// `dir`. Keeps the newest `keep` checkpoints.
pub fn save_checkpoint(
    out: &Path,
    state: &TrainState,
    keep: usize,
    write_records: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<PathBuf> {
    let final_dir = checkpoint_dir(out, state.step);
    let tmp = final_dir.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    write_records(&tmp)?;
    if std::env::var(CRASH_ENV).ok().and_then(|v| v.parse::<usize>().ok()) == Some(state.step) {
        eprintln!("{CRASH_ENV}={}: aborting in the middle of the checkpoint", state.step);
        std::process::abort();
    }
    let json = serde_json::to_string_pretty(state)?;
    std::fs::write(tmp.join("state.json"), json)?;
    let manifest = manifest_of(&tmp)?;
    std::fs::write(tmp.join("manifest.json"), serde_json::to_string_pretty(&manifest)?)?;
    for name in manifest.keys().map(String::as_str).chain(["manifest.json"]) {
        std::fs::File::open(tmp.join(name))?.sync_all()?;
    }
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir).with_context(|| format!("renaming {} into place", tmp.display()))?;
    let all = list_checkpoints(out);
    if all.len() > keep.max(1) {
        for (_, dir) in &all[..all.len() - keep.max(1)] {
            std::fs::remove_dir_all(dir).ok();
        }
    }
    Ok(final_dir)
}

/// Reads `state.json` of a checkpoint.
pub fn read_state(dir: &Path) -> anyhow::Result<TrainState> {
    let p = dir.join("state.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: usize) -> TrainState {
        TrainState {
            step,
            ..Default::default()
        }
    }

    #[test]
    fn a_damaged_or_edited_checkpoint_is_recognised() {
        let out = std::env::temp_dir().join(format!("flava-ckpt-verify-{}", std::process::id()));
        std::fs::remove_dir_all(&out).ok();
        let dir = save_checkpoint(&out, &state(10), 2, |d| {
            Ok(std::fs::write(d.join("model.mpk"), b"weights")?)
        })
        .unwrap();
        assert_eq!(verify_checkpoint(&dir, 10).unwrap(), state(10));
        // A flipped byte in the model.
        std::fs::write(dir.join("model.mpk"), b"weightz").unwrap();
        let e = verify_checkpoint(&dir, 10).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        // A state.json whose step was edited (manifest removed, so only the name check acts).
        std::fs::write(dir.join("model.mpk"), b"weights").unwrap();
        std::fs::remove_file(dir.join("manifest.json")).unwrap();
        std::fs::write(dir.join("state.json"), serde_json::to_string(&state(99)).unwrap()).unwrap();
        let e = verify_checkpoint(&dir, 10).unwrap_err().to_string();
        assert!(e.contains("step 99"), "{e}");
        std::fs::remove_dir_all(&out).ok();
    }

    #[test]
    fn keeps_the_newest_and_ignores_partial_writes() {
        let out = std::env::temp_dir().join(format!("flava-ckpt-{}", std::process::id()));
        std::fs::remove_dir_all(&out).ok();
        for s in [10, 20, 30] {
            save_checkpoint(&out, &state(s), 2, |d| Ok(std::fs::write(d.join("model.mpk"), b"m")?)).unwrap();
        }
        let steps: Vec<usize> = list_checkpoints(&out).iter().map(|c| c.0).collect();
        assert_eq!(steps, [20, 30]);
        // A write that died before state.json: not a checkpoint, removed on the next start.
        std::fs::create_dir_all(out.join("checkpoints/step-00000040.tmp")).unwrap();
        std::fs::create_dir_all(out.join("checkpoints/step-00000050")).unwrap();
        assert_eq!(list_checkpoints(&out).last().unwrap().0, 30);
        assert_eq!(remove_partial(&out), 1);
        assert_eq!(
            read_state(&list_checkpoints(&out).last().unwrap().1).unwrap(),
            state(30)
        );
        std::fs::remove_dir_all(&out).ok();
    }
}
