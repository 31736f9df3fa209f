//! The dataset mixer and the loader: picks a task per step (round-robin or by weight, seeded),
//! reads and decodes samples on a pool of worker threads with bounded prefetch, and hands out
//! batches in a deterministic order with the position to resume from after each.
//!
//! **Data shares** (for data parallelism over processes): with `K` shares every source is read
//! as `K` disjoint strided streams (share `k` takes the records `k, k+K, …` of each epoch's
//! order), and the batch of a step is the concatenation, in share order, of `K` sub-batches of
//! `B/K` samples, share `k`'s built from its own stream (skips refilled from it) as batch
//! number `step·K + k`. A process that builds only some shares (a rank of a distributed job)
//! therefore gets exactly its rows of the batch a process building all `K` would get. With
//! `K = 1` this is the plain loader.

use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::batch::{BatchBuilder, BatchError, HostBatch};
use crate::sources::{Record, Source, SourceError};
use crate::stream::{decode, DecodedSample, SampleStream, StreamPosition, StreamStats};
use crate::task::{Task, UnknownTask};

/// How the mixer picks the task of each step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Mix {
    /// pairs, images, text, pairs, … (tasks without sources are left out).
    RoundRobin,
    /// Each step draws a task with these weights.
    Weighted(BTreeMap<Task, f64>),
}

/// Why a `--mix` spec is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MixError {
    /// A part that is not `task=weight`.
    #[error("bad mix `{0}` (want task=weight)")]
    Part(String),
    /// A task name that is not one.
    #[error(transparent)]
    Task(#[from] UnknownTask),
    /// A weight that is not a number ≥ 0.
    #[error("weight of {task} must be a number ≥ 0, got `{weight}`")]
    Weight {
        /// The task.
        task: Task,
        /// What was given.
        weight: String,
    },
    /// Every weight is zero.
    #[error("the mix weights sum to zero")]
    ZeroSum,
}

impl Mix {
    /// Parses `round-robin` or `pairs=W,images=W,text=W`.
    pub fn parse(s: &str) -> Result<Self, MixError> {
        if s == "round-robin" {
            return Ok(Mix::RoundRobin);
        }
        let mut w = BTreeMap::new();
        for part in s.split(',') {
            let (k, v) = part.split_once('=').ok_or_else(|| MixError::Part(part.into()))?;
            let task: Task = k.parse()?;
            let weight = v.trim().parse::<f64>().ok().filter(|v| *v >= 0.0 && v.is_finite());
            let weight = weight.ok_or_else(|| MixError::Weight {
                task,
                weight: v.trim().into(),
            })?;
            w.insert(task, weight);
        }
        if w.values().sum::<f64>() <= 0.0 {
            return Err(MixError::ZeroSum);
        }
        Ok(Mix::Weighted(w))
    }
}

/// Why the loader could not give the next batch.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// A source failed (unreadable, or only unusable records).
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The batch could not be built.
    #[error(transparent)]
    Batch(#[from] BatchError),
    /// No task has a source (or every source's task has weight 0).
    #[error("no data source for any task")]
    NoSources,
    /// The worker threads could not be started.
    #[error("cannot start the data loader's threads: {0}")]
    Threads(String),
    /// The producer thread is gone (it stopped after an error, or panicked).
    #[error("the data loader stopped")]
    Stopped,
    /// The data shares do not fit the batch, the processes or the resumed state.
    #[error("data shares: {0}")]
    Shares(String),
}

/// Per task: the position of each of its sources, and whose turn is next.
pub type SharePositions = BTreeMap<Task, (Vec<StreamPosition>, usize)>;

/// Everything needed to continue the data exactly where a batch left it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixerState {
    /// Batches produced.
    pub step: u64,
    /// The mixer's RNG (weighted mode).
    pub rng: ChaCha8Rng,
    /// Positions of a loader with one share (states written before shares existed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub streams: SharePositions,
    /// How many shares the data is split into (1 for states without shares).
    #[serde(default = "one")]
    pub share_count: usize,
    /// The positions of each share this state knows (a rank knows its own; a merged state all).
    #[serde(default)]
    pub shares: BTreeMap<usize, SharePositions>,
}

fn one() -> usize {
    1
}

impl MixerState {
    /// The positions of share `k` (an old single-share state's are share 0's).
    pub fn share(&self, k: usize) -> Option<&SharePositions> {
        match self.shares.get(&k) {
            Some(p) => Some(p),
            None if k == 0 && self.shares.is_empty() && !self.streams.is_empty() => Some(&self.streams),
            None => None,
        }
    }

    /// One state holding the shares of all `parts` (the ranks' states after the same step).
    pub fn merge(parts: &[MixerState]) -> Result<MixerState, LoaderError> {
        let first = parts
            .first()
            .ok_or_else(|| LoaderError::Shares("no states to merge".into()))?;
        let mut out = first.clone();
        for p in &parts[1..] {
            if p.step != first.step || p.share_count != first.share_count || p.rng != first.rng {
                return Err(LoaderError::Shares(format!(
                    "the processes' data states disagree (step {} of {} shares vs step {} of {})",
                    p.step, p.share_count, first.step, first.share_count
                )));
            }
            out.shares.extend(p.shares.iter().map(|(k, v)| (*k, v.clone())));
        }
        Ok(out)
    }
}

/// Which shares of the data a loader builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shares {
    /// The number of shares the data is split into (`K`; divides the batch size).
    pub count: usize,
    /// The shares this loader builds, ascending (their sub-batches are concatenated).
    pub take: Vec<usize>,
}

impl Default for Shares {
    fn default() -> Self {
        Self {
            count: 1,
            take: vec![0],
        }
    }
}

impl Shares {
    /// The shares of process `rank` of `world` when the data is split into `count` shares:
    /// a contiguous run of `count / world` (so the processes' rows follow rank order).
    pub fn of_rank(count: usize, rank: usize, world: usize) -> Result<Self, LoaderError> {
        if world == 0 || count == 0 || !count.is_multiple_of(world) || rank >= world {
            return Err(LoaderError::Shares(format!(
                "{count} data shares cannot be split evenly over {world} processes"
            )));
        }
        let per = count / world;
        Ok(Self {
            count,
            take: (rank * per..(rank + 1) * per).collect(),
        })
    }
}

/// A batch with the state to resume after it and the statistics so far.
#[derive(Debug, Clone)]
pub struct LoadedBatch {
    /// The batch.
    pub batch: HostBatch,
    /// Resume from here to get the next batch.
    pub state_after: MixerState,
    /// Samples and skips per task since the loader started.
    pub stats: BTreeMap<Task, StreamStats>,
    /// Samples and skips per source (`task: description`) since the loader started.
    pub per_source: BTreeMap<String, StreamStats>,
}

/// Loader settings.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Task mix.
    pub mix: Mix,
    /// Worker threads for decoding and transforms.
    pub workers: usize,
    /// Batches prepared ahead.
    pub prefetch: usize,
    /// Seed of the mixer.
    pub seed: u64,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            mix: Mix::RoundRobin,
            workers: 2,
            prefetch: 4,
            seed: 0,
        }
    }
}

/// One share's streams: per task, its sources' streams and whose turn is next.
struct Share {
    index: usize,
    tasks: BTreeMap<Task, (Vec<SampleStream>, usize)>,
}

struct Producer {
    shares: Vec<Share>,
    share_count: usize,
    order: Vec<Task>,
    mix: Mix,
    rng: ChaCha8Rng,
    step: u64,
    builder: BatchBuilder,
    pool: rayon::ThreadPool,
}

impl Producer {
    fn state(&self) -> MixerState {
        MixerState {
            step: self.step,
            rng: self.rng.clone(),
            streams: BTreeMap::new(),
            share_count: self.share_count,
            shares: self
                .shares
                .iter()
                .map(|sh| {
                    let pos = sh
                        .tasks
                        .iter()
                        .map(|(t, (s, turn))| (*t, (s.iter().map(|x| x.position()).collect(), *turn)))
                        .collect();
                    (sh.index, pos)
                })
                .collect(),
        }
    }

    fn pick_task(&mut self) -> Task {
        match &self.mix {
            Mix::RoundRobin => self.order[(self.step % self.order.len() as u64) as usize],
            Mix::Weighted(w) => {
                let total: f64 = self.order.iter().map(|t| w.get(t).copied().unwrap_or(0.0)).sum();
                let mut x = self.rng.random::<f64>() * total;
                for t in &self.order {
                    x -= w.get(t).copied().unwrap_or(0.0);
                    if x < 0.0 {
                        return *t;
                    }
                }
                *self.order.last().expect("at least one task")
            }
        }
    }

    fn next_batch(&mut self) -> Result<LoadedBatch, LoaderError> {
        let task = self.pick_task();
        let want = self.builder.cfg.batch_size / self.share_count;
        let mut parts = Vec::with_capacity(self.shares.len());
        for share in &mut self.shares {
            let samples = fill(share, task, want, &self.pool)?;
            let builder = &self.builder;
            let index = self.step * self.share_count as u64 + share.index as u64;
            parts.push(self.pool.install(|| builder.build(task, samples, index))?);
        }
        let batch = HostBatch::concat(parts);
        self.step += 1;
        let mut stats: BTreeMap<Task, StreamStats> = BTreeMap::new();
        let mut per_source: BTreeMap<String, StreamStats> = BTreeMap::new();
        for sh in &self.shares {
            for (t, (s, _)) in &sh.tasks {
                for x in s {
                    stats.entry(*t).or_default().merge(&x.stats);
                    per_source
                        .entry(format!("{}: {}", t.name(), x.describe()))
                        .or_default()
                        .merge(&x.stats);
                }
            }
        }
        Ok(LoadedBatch {
            batch,
            state_after: self.state(),
            stats,
            per_source,
        })
    }
}

/// `want` usable samples of `task` from `share`'s streams: raw records read in order (sources
/// alternate), decoded in parallel, skips counted and refilled.
fn fill(
    share: &mut Share,
    task: Task,
    want: usize,
    pool: &rayon::ThreadPool,
) -> Result<Vec<DecodedSample>, LoaderError> {
    let mut samples = Vec::with_capacity(want);
    let (streams, turn) = share.tasks.get_mut(&task).expect("picked tasks have sources");
    while samples.len() < want {
        let mut raws = Vec::new();
        while raws.len() < want - samples.len() {
            let k = *turn % streams.len();
            *turn += 1;
            match streams[k].next_record()? {
                Record::Sample(r) => raws.push((k, r)),
                Record::Skipped { reason, key, detail } => streams[k].count_skip(reason, &key, &detail)?,
            }
        }
        let decoded: Vec<_> = pool.install(|| {
            raws.into_par_iter()
                .map(|(k, r)| (k, r.key.clone(), decode(r, task)))
                .collect()
        });
        for (k, key, d) in decoded {
            match d {
                Ok(s) => {
                    streams[k].count_sample();
                    samples.push(s);
                }
                Err((reason, detail)) => streams[k].count_skip(reason, &key, &detail)?,
            }
        }
    }
    Ok(samples)
}

/// Produces batches on a background thread, `prefetch` ahead, in a deterministic order.
pub struct DataLoader {
    rx: Receiver<Result<LoadedBatch, LoaderError>>,
    handle: Option<JoinHandle<()>>,
    describe: Vec<String>,
}

impl DataLoader {
    /// Starts the loader over `sources` (per task), optionally resuming from `resume`.
    pub fn new(
        sources: BTreeMap<Task, Vec<Box<dyn Source>>>,
        builder: BatchBuilder,
        cfg: LoaderConfig,
        resume: Option<MixerState>,
    ) -> Result<Self, LoaderError> {
        let mut sources = Some(sources);
        Self::with_shares(
            Shares::default(),
            |_| Ok(sources.take().unwrap_or_default()),
            builder,
            cfg,
            resume,
        )
    }

    /// Starts a loader that builds `shares.take` of `shares.count` data shares (see the module
    /// docs); `sources(k)` opens the sources once more for share `k` (the same specs and seed
    /// each time: share `k` reads every `count`-th record of them).
    pub fn with_shares(
        shares: Shares,
        mut sources: impl FnMut(usize) -> Result<BTreeMap<Task, Vec<Box<dyn Source>>>, LoaderError>,
        builder: BatchBuilder,
        cfg: LoaderConfig,
        resume: Option<MixerState>,
    ) -> Result<Self, LoaderError> {
        let batch = builder.cfg.batch_size;
        if shares.count == 0 || !batch.is_multiple_of(shares.count) || shares.take.is_empty() {
            return Err(LoaderError::Shares(format!(
                "{} shares of a batch of {batch} (the share count must divide the batch size)",
                shares.count
            )));
        }
        if let Some(k) = shares.take.iter().find(|&&k| k >= shares.count) {
            return Err(LoaderError::Shares(format!("share {k} of {}", shares.count)));
        }
        let mut describe = Vec::new();
        let mut built = Vec::new();
        for &k in &shares.take {
            let mut tasks = BTreeMap::new();
            for (task, srcs) in sources(k)? {
                if srcs.is_empty() {
                    continue;
                }
                if let Mix::Weighted(w) = &cfg.mix {
                    if w.get(&task).copied().unwrap_or(0.0) <= 0.0 {
                        continue;
                    }
                }
                let streams: Vec<SampleStream> = srcs
                    .into_iter()
                    .map(|s| SampleStream::strided(s, k, shares.count))
                    .collect();
                if k == shares.take[0] {
                    describe.extend(streams.iter().map(|s| format!("{}: {}", task.name(), s.describe())));
                }
                tasks.insert(task, (streams, 0usize));
            }
            if tasks.is_empty() {
                return Err(LoaderError::NoSources);
            }
            built.push(Share { index: k, tasks });
        }
        let order: Vec<Task> = built[0].tasks.keys().copied().collect();
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut step = 0;
        if let Some(state) = resume {
            if state.share_count != shares.count {
                return Err(LoaderError::Shares(format!(
                    "the checkpoint's data is split into {} share(s), this run into {}; resume with the run's share count (--data-shares {})",
                    state.share_count, shares.count, state.share_count
                )));
            }
            rng = state.rng.clone();
            step = state.step;
            for share in &mut built {
                let positions = state.share(share.index).ok_or_else(|| {
                    LoaderError::Shares(format!("the checkpoint has no position for data share {}", share.index))
                })?;
                for (task, (positions, turn)) in positions {
                    if let Some((streams, t)) = share.tasks.get_mut(task) {
                        *t = *turn;
                        for (s, p) in streams.iter_mut().zip(positions) {
                            s.seek(*p)?;
                        }
                    }
                }
            }
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.workers.max(1))
            .thread_name(|i| format!("flava-data-{i}"))
            .build()
            .map_err(|e| LoaderError::Threads(e.to_string()))?;
        let mut producer = Producer {
            shares: built,
            share_count: shares.count,
            order,
            mix: cfg.mix,
            rng,
            step,
            builder,
            pool,
        };
        let (tx, rx) = sync_channel(cfg.prefetch.max(1));
        let handle = std::thread::Builder::new()
            .name("flava-data-producer".into())
            .spawn(move || loop {
                let item = producer.next_batch();
                let stop = item.is_err();
                if tx.send(item).is_err() || stop {
                    break;
                }
            })
            .map_err(|e| LoaderError::Threads(e.to_string()))?;
        Ok(Self {
            rx,
            handle: Some(handle),
            describe,
        })
    }

    /// One line per source, for logs.
    pub fn describe(&self) -> &[String] {
        &self.describe
    }

    /// The next batch (blocks until it is ready).
    pub fn next_batch(&mut self) -> Result<LoadedBatch, LoaderError> {
        self.rx.recv().map_err(|_| LoaderError::Stopped)?
    }
}

impl Drop for DataLoader {
    fn drop(&mut self) {
        // Unblock the producer (its send fails once the receiver is gone), then join it.
        let (_tx, rx) = sync_channel(1);
        drop(std::mem::replace(&mut self.rx, rx));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_specs_parse_or_say_what_is_wrong() {
        let Mix::Weighted(w) = Mix::parse("pairs=2, images=1,text=0").unwrap() else {
            panic!("weighted")
        };
        assert_eq!(
            w.into_iter().collect::<Vec<_>>(),
            [(Task::Pairs, 2.0), (Task::Images, 1.0), (Task::Text, 0.0)]
        );
        assert_eq!(Mix::parse("round-robin").unwrap(), Mix::RoundRobin);
        assert_eq!(Mix::parse("pairs").unwrap_err(), MixError::Part("pairs".into()));
        assert_eq!(
            Mix::parse("image=1").unwrap_err(),
            MixError::Task(UnknownTask("image".into()))
        );
        assert_eq!(
            Mix::parse("text=-1").unwrap_err(),
            MixError::Weight {
                task: Task::Text,
                weight: "-1".into()
            }
        );
        assert_eq!(
            Mix::parse("text=NaN").unwrap_err().to_string(),
            "weight of text must be a number ≥ 0, got `NaN`"
        );
        assert_eq!(Mix::parse("pairs=0,text=0").unwrap_err(), MixError::ZeroSum);
        for t in Task::ALL {
            assert_eq!(t.name().parse::<Task>().unwrap(), t);
            assert_eq!(t.to_string(), t.name());
        }
    }
}
