//! The dataset mixer and the loader: picks a task per step (round-robin or by weight, seeded),
//! reads and decodes samples on a pool of worker threads with bounded prefetch, and hands out
//! batches in a deterministic order with the position to resume from after each.

use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::batch::{BatchBuilder, BatchError, HostBatch};
use crate::sources::{Record, Source, SourceError};
use crate::stream::{decode, SampleStream, StreamPosition, StreamStats};
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
}

/// Everything needed to continue the data exactly where a batch left it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixerState {
    /// Batches produced.
    pub step: u64,
    /// The mixer's RNG (weighted mode).
    pub rng: ChaCha8Rng,
    /// Per task: the position of each of its sources, and whose turn is next.
    pub streams: BTreeMap<Task, (Vec<StreamPosition>, usize)>,
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

struct Producer {
    tasks: BTreeMap<Task, (Vec<SampleStream>, usize)>,
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
            streams: self
                .tasks
                .iter()
                .map(|(t, (s, turn))| (*t, (s.iter().map(|x| x.position()).collect(), *turn)))
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
        let want = self.builder.cfg.batch_size;
        let mut samples = Vec::with_capacity(want);
        let (streams, turn) = self.tasks.get_mut(&task).expect("picked tasks have sources");
        while samples.len() < want {
            // Read raw records in order (sources alternate), decode them in parallel.
            let mut raws = Vec::new();
            while raws.len() < want - samples.len() {
                let k = *turn % streams.len();
                *turn += 1;
                match streams[k].next_record()? {
                    Record::Sample(r) => raws.push((k, r)),
                    Record::Skipped { reason, key, detail } => streams[k].count_skip(reason, &key, &detail)?,
                }
            }
            let decoded: Vec<_> = self.pool.install(|| {
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
        let builder = &self.builder;
        let step = self.step;
        let batch = self.pool.install(|| builder.build(task, samples, step))?;
        self.step += 1;
        let stats = self
            .tasks
            .iter()
            .map(|(t, (s, _))| {
                let mut st = StreamStats::default();
                s.iter().for_each(|x| st.merge(&x.stats));
                (*t, st)
            })
            .collect();
        let per_source = self
            .tasks
            .iter()
            .flat_map(|(t, (s, _))| {
                s.iter()
                    .map(move |x| (format!("{}: {}", t.name(), x.describe()), x.stats.clone()))
            })
            .collect();
        Ok(LoadedBatch {
            batch,
            state_after: self.state(),
            stats,
            per_source,
        })
    }
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
        let mut tasks = BTreeMap::new();
        let mut describe = Vec::new();
        for (task, srcs) in sources {
            if srcs.is_empty() {
                continue;
            }
            if let Mix::Weighted(w) = &cfg.mix {
                if w.get(&task).copied().unwrap_or(0.0) <= 0.0 {
                    continue;
                }
            }
            let streams: Vec<SampleStream> = srcs.into_iter().map(SampleStream::new).collect();
            describe.extend(streams.iter().map(|s| format!("{}: {}", task.name(), s.describe())));
            tasks.insert(task, (streams, 0usize));
        }
        if tasks.is_empty() {
            return Err(LoaderError::NoSources);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let mut step = 0;
        if let Some(state) = resume {
            rng = state.rng;
            step = state.step;
            for (task, (positions, turn)) in state.streams {
                if let Some((streams, t)) = tasks.get_mut(&task) {
                    *t = turn;
                    for (s, p) in streams.iter_mut().zip(positions) {
                        s.seek(p)?;
                    }
                }
            }
        }
        let order = tasks.keys().copied().collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.workers.max(1))
            .thread_name(|i| format!("flava-data-{i}"))
            .build()
            .map_err(|e| LoaderError::Threads(e.to_string()))?;
        let mut producer = Producer {
            tasks,
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
