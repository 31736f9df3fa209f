//! The run directory every trainer writes: `checkpoints/step-NNNNNNNN/` (the trainer's records
//! and `state.json`), `metrics.jsonl` (one object per step) and whatever the run adds.
//!
//! Each checkpoint is written to `step-NNNNNNNN.tmp/`, fsynced, given a `manifest.json` with the
//! SHA-256 of every file, and renamed into place, so a run killed mid-write leaves the previous
//! checkpoint as the newest complete one. Resume takes the newest checkpoint that verifies and
//! loads; a damaged one (a bad disk, an edited `state.json`) falls back to the one before, with
//! a message. The newest `keep` checkpoints are kept.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::observer::Observer;
use crate::trainer::{Counters, Objective, Trainer};

/// What a run saves in each checkpoint beside the trainer's records (`state.json`): serialisable,
/// and carrying the trainer's [`Counters`].
pub trait RunState: Serialize + Clone {
    /// Sets the counters (to the trainer's, before a save).
    fn set_counters(&mut self, counters: Counters);
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

/// A resumed checkpoint: what the loader made of it, where it was, and the newer checkpoints
/// that could not be read (each with its reason).
#[derive(Debug)]
pub struct Resumed<T> {
    /// What `load` returned.
    pub value: T,
    /// The checkpoint's step.
    pub step: usize,
    /// The checkpoint's directory.
    pub dir: PathBuf,
    /// Newer checkpoints skipped, with the reason.
    pub skipped: Vec<String>,
}

/// A run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// The run directory at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// `root/name`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The checkpoint directory of `step`.
    pub fn checkpoint_dir(&self, step: usize) -> PathBuf {
        self.root.join("checkpoints").join(format!("step-{step:08}"))
    }

    /// Complete checkpoints (those with a `state.json`), oldest first.
    pub fn checkpoints(&self) -> Vec<(usize, PathBuf)> {
        let Ok(rd) = std::fs::read_dir(self.root.join("checkpoints")) else {
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

    /// The newest complete checkpoint's step.
    pub fn latest_step(&self) -> Option<usize> {
        self.checkpoints().last().map(|c| c.0)
    }

    /// Removes `.tmp` directories left by an interrupted write; returns how many.
    pub fn remove_partial(&self) -> usize {
        let Ok(rd) = std::fs::read_dir(self.root.join("checkpoints")) else {
            return 0;
        };
        rd.flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .filter(|e| std::fs::remove_dir_all(e.path()).is_ok())
            .count()
    }

    /// Writes the checkpoint of `step` atomically: `write_records(dir)` saves the trainer's
    /// records into the temporary directory, then `state.json` and the manifest are added, the
    /// files fsynced and the directory renamed into place. Keeps the newest `keep`.
    pub fn save_checkpoint<S: Serialize>(
        &self,
        step: usize,
        state: &S,
        keep: usize,
        write_records: impl FnOnce(&Path) -> anyhow::Result<()>,
        observer: &mut dyn Observer,
    ) -> anyhow::Result<PathBuf> {
        let final_dir = self.checkpoint_dir(step);
        let tmp = final_dir.with_extension("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        write_records(&tmp)?;
        let mut state = serde_json::to_value(state)?;
        state["step"] = serde_json::json!(step);
        std::fs::write(tmp.join("state.json"), serde_json::to_string_pretty(&state)?)?;
        let manifest = manifest_of(&tmp)?;
        std::fs::write(tmp.join("manifest.json"), serde_json::to_string_pretty(&manifest)?)?;
        for name in manifest.keys().map(String::as_str).chain(["manifest.json"]) {
            std::fs::File::open(tmp.join(name))?.sync_all()?;
        }
        observer.before_commit(step, &tmp);
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir)?;
        }
        std::fs::rename(&tmp, &final_dir).with_context(|| format!("renaming {} into place", tmp.display()))?;
        let all = self.checkpoints();
        if all.len() > keep.max(1) {
            for (_, dir) in &all[..all.len() - keep.max(1)] {
                std::fs::remove_dir_all(dir).ok();
            }
        }
        observer.on_checkpoint(step, &final_dir);
        Ok(final_dir)
    }

    /// Checks a checkpoint against its manifest and its name (every file present with its
    /// hash, `state.json`'s step equal to the directory's) and returns its state.
    pub fn verify<S: DeserializeOwned>(dir: &Path, step: usize) -> anyhow::Result<S> {
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
        let p = dir.join("state.json");
        let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
        let found = value["step"].as_u64();
        if found != Some(step as u64) {
            anyhow::bail!(
                "{}: state.json says step {} but the checkpoint is step {step}",
                dir.display(),
                found.map_or("none".to_string(), |s| s.to_string())
            );
        }
        serde_json::from_value(value).with_context(|| format!("parsing {}", p.display()))
    }

    /// Resumes from the newest checkpoint that verifies and that `load(dir, state)` accepts,
    /// falling back to older ones (a message names each skipped one). `Ok(None)` when there is
    /// no checkpoint; an error when there are some and none can be read.
    pub fn resume<S: DeserializeOwned, T>(
        &self,
        mut load: impl FnMut(&Path, S) -> anyhow::Result<T>,
        observer: &mut dyn Observer,
    ) -> anyhow::Result<Option<Resumed<T>>> {
        let all = self.checkpoints();
        let mut skipped = Vec::new();
        for (step, dir) in all.iter().rev() {
            match Self::verify::<S>(dir, *step).and_then(|st| load(dir, st)) {
                Ok(value) => {
                    if !skipped.is_empty() {
                        observer.on_message(&format!(
                            "warning: fell back to {} because a newer checkpoint is unreadable: {}",
                            dir.display(),
                            skipped.join("; ")
                        ));
                    }
                    return Ok(Some(Resumed {
                        value,
                        step: *step,
                        dir: dir.clone(),
                        skipped,
                    }));
                }
                Err(e) => skipped.push(format!("{e:#}")),
            }
        }
        if all.is_empty() {
            return Ok(None);
        }
        anyhow::bail!(
            "--resume: no checkpoint in {} can be read: {}",
            self.root.display(),
            skipped.join("; ")
        )
    }

    /// `metrics.jsonl`, cut back to the lines of steps ≤ `resumed_step` (so a resumed run
    /// writes each step once), opened for appending.
    pub fn metrics(&self, resumed_step: usize) -> anyhow::Result<MetricsLog> {
        std::fs::create_dir_all(&self.root).with_context(|| format!("creating {}", self.root.display()))?;
        let path = self.root.join("metrics.jsonl");
        flava_vit::atomic::truncate_metrics(&path, resumed_step as u64)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(MetricsLog { file, path })
    }
}

impl RunDir {
    /// Writes checkpoint `step-N` of `trainer` with `state` (its counters set from the trainer),
    /// keeping the newest `keep`.
    pub fn save_trainer<O: Objective, S: RunState>(
        &self,
        trainer: &Trainer<O>,
        state: &S,
        keep: usize,
        observer: &mut dyn Observer,
    ) -> anyhow::Result<PathBuf> {
        let mut state = state.clone();
        state.set_counters(trainer.counters);
        self.save_checkpoint(
            trainer.step_count(),
            &state,
            keep,
            |dir| trainer.save_records(dir),
            observer,
        )
    }

    /// The end of a training loop: the observer told, the metrics flushed, `state`'s counters set
    /// from the trainer, and a checkpoint of the last step unless the newest one is that step.
    pub fn finish<O: Objective, S: RunState>(
        &self,
        trainer: &Trainer<O>,
        state: &mut S,
        keep: usize,
        metrics: &mut MetricsLog,
        observer: &mut dyn Observer,
    ) -> anyhow::Result<()> {
        observer.on_train_end();
        metrics.flush()?;
        state.set_counters(trainer.counters);
        if self.latest_step() != Some(trainer.step_count()) {
            self.save_trainer(trainer, state, keep, observer)?;
        }
        Ok(())
    }
}

/// `metrics.jsonl` open for appending.
#[derive(Debug)]
pub struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    /// Appends one JSON line.
    pub fn write(&mut self, line: &serde_json::Value) -> anyhow::Result<()> {
        writeln!(self.file, "{line}").with_context(|| format!("writing {}", self.path.display()))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes to the OS.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        Ok(self.file.flush()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observer::Quiet;

    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    struct St {
        step: usize,
        note: String,
    }

    fn st(step: usize) -> St {
        St { step, note: "x".into() }
    }

    fn scratch(name: &str) -> RunDir {
        let d = std::env::temp_dir().join(format!("flava-rundir-{name}-{}", std::process::id()));
        std::fs::remove_dir_all(&d).ok();
        RunDir::new(d)
    }

    fn model(d: &Path) -> anyhow::Result<()> {
        Ok(std::fs::write(d.join("model.mpk"), b"weights")?)
    }

    #[test]
    fn a_damaged_or_edited_checkpoint_is_recognised() {
        let run = scratch("verify");
        let dir = run.save_checkpoint(10, &st(10), 2, model, &mut Quiet).unwrap();
        assert_eq!(RunDir::verify::<St>(&dir, 10).unwrap(), st(10));
        std::fs::write(dir.join("model.mpk"), b"weightz").unwrap();
        let e = RunDir::verify::<St>(&dir, 10).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        // A state.json whose step was edited (manifest removed, so only the name check acts).
        std::fs::write(dir.join("model.mpk"), b"weights").unwrap();
        std::fs::remove_file(dir.join("manifest.json")).unwrap();
        std::fs::write(dir.join("state.json"), serde_json::to_string(&st(99)).unwrap()).unwrap();
        let e = RunDir::verify::<St>(&dir, 10).unwrap_err().to_string();
        assert!(e.contains("step 99"), "{e}");
        std::fs::remove_dir_all(run.path()).ok();
    }

    #[test]
    fn keeps_the_newest_ignores_partial_writes_and_falls_back() {
        let run = scratch("keep");
        for s in [10, 20, 30] {
            run.save_checkpoint(s, &st(s), 2, model, &mut Quiet).unwrap();
        }
        let steps: Vec<usize> = run.checkpoints().iter().map(|c| c.0).collect();
        assert_eq!(steps, [20, 30]);
        // A write that died before state.json: not a checkpoint, removed on the next start.
        std::fs::create_dir_all(run.join("checkpoints/step-00000040.tmp")).unwrap();
        std::fs::create_dir_all(run.join("checkpoints/step-00000050")).unwrap();
        assert_eq!(run.latest_step(), Some(30));
        assert_eq!(run.remove_partial(), 1);
        // The newest damaged: resume takes step 20 and says why.
        std::fs::write(run.checkpoint_dir(30).join("model.mpk"), b"garbage").unwrap();
        let mut seen = crate::observer::Collect::default();
        let r = run.resume(|_, s: St| Ok(s.step), &mut seen).unwrap().unwrap();
        assert_eq!((r.value, r.step, r.skipped.len()), (20, 20, 1));
        assert!(seen.messages[0].contains("fell back"), "{:?}", seen.messages);
        // All damaged: an error naming them.
        std::fs::write(run.checkpoint_dir(20).join("model.mpk"), b"garbage").unwrap();
        let e = run.resume(|_, s: St| Ok(s.step), &mut Quiet).unwrap_err().to_string();
        assert!(e.contains("no checkpoint") && e.contains("checksum"), "{e}");
        std::fs::remove_dir_all(run.path()).ok();
    }

    #[test]
    fn metrics_are_cut_back_to_the_resumed_step() {
        let run = scratch("metrics");
        let mut m = run.metrics(0).unwrap();
        for s in 1..=5 {
            m.write(&serde_json::json!({ "step": s })).unwrap();
        }
        drop(m);
        let mut m = run.metrics(3).unwrap();
        m.write(&serde_json::json!({ "step": 4 })).unwrap();
        drop(m);
        let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, [1, 2, 3, 4]);
        std::fs::remove_dir_all(run.path()).ok();
    }
}
