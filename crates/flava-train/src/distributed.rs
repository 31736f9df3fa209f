//! Data parallelism over processes: how a process learns that a launcher started it as one rank
//! of a job ([`launched_world_size`]), the MPI process group (`MpiGroup`, feature `mpi`), and
//! what rank 0 shares with the other ranks before training: files (the tokenizer and codebook
//! it prepared, the checkpoint it resumes from; [`share_files`]) and the check that every rank
//! runs the same configuration ([`check_same_config`]).
//!
//! Only rank 0 writes into the run directory; the other ranks keep what they receive in a
//! private scratch directory ([`Scratch`]), so no shared filesystem is needed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use flava_objectives::collective::{all_gather_json, CollectiveError};
use flava_objectives::ProcessGroup;

#[cfg(feature = "mpi")]
pub use mpi_group::MpiGroup;

/// The number of processes a launcher started this one among, read from the variables
/// `mpiexec` (MPICH, Intel MPI: `PMI_SIZE`; Open MPI: `OMPI_COMM_WORLD_SIZE`; MVAPICH:
/// `MV2_COMM_WORLD_SIZE`) and Slurm's `srun` (`SLURM_STEP_NUM_TASKS`) set; `None` when none is
/// set (a plain start).
pub fn launched_world_size() -> Option<usize> {
    [
        "PMI_SIZE",
        "OMPI_COMM_WORLD_SIZE",
        "MV2_COMM_WORLD_SIZE",
        "SLURM_STEP_NUM_TASKS",
    ]
    .iter()
    .filter_map(|v| std::env::var(v).ok()?.trim().parse::<usize>().ok())
    .max()
}

/// This process's index among the ranks on its machine, as the launcher tells it (MPICH:
/// `MPI_LOCALRANKID`; Open MPI: `OMPI_COMM_WORLD_LOCAL_RANK`; MVAPICH: `MV2_COMM_WORLD_LOCAL_RANK`;
/// Slurm: `SLURM_LOCALID`).
pub fn local_rank() -> Option<usize> {
    [
        "MPI_LOCALRANKID",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MV2_COMM_WORLD_LOCAL_RANK",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}

/// The device a rank uses for `--device name`: a GPU kind without an index (`cuda`) becomes
/// the `local_rank`-th GPU of the machine (`cuda:3`), so the ranks of one machine do not share
/// one GPU; anything else (`flex`, `cuda:1`) is kept as given.
pub fn rank_device(name: &str, local_rank: Option<usize>) -> String {
    match local_rank {
        Some(i) if name == "cuda" => format!("{name}:{i}"),
        _ => name.to_string(),
    }
}

/// A shared handle on a process group, as a training strategy holds it (equal when it is the
/// same group). Its collectives are timed: [`Group::take_times`] says how long this rank spent
/// in each kind since the last call (waiting for slower ranks included).
#[derive(Clone)]
pub struct Group(Arc<Timed>);

impl Group {
    /// A handle on `group`.
    pub fn new(group: Arc<dyn ProcessGroup>) -> Self {
        Self(Arc::new(Timed {
            inner: group,
            nanos: Default::default(),
        }))
    }

    /// The group (timed).
    pub fn get(&self) -> &dyn ProcessGroup {
        self.0.as_ref()
    }

    /// Seconds spent in all-reduce, all-gather and broadcast since the last call (then zeroed).
    pub fn take_times(&self) -> CommTimes {
        let take = |i: usize| self.0.nanos[i].swap(0, Ordering::Relaxed) as f64 * 1e-9;
        CommTimes {
            all_reduce_s: take(0),
            all_gather_s: take(1),
            broadcast_s: take(2),
        }
    }
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Group({:?})", self.0.inner.as_ref())
    }
}

impl PartialEq for Group {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// Time one rank spent in collectives.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CommTimes {
    /// In all-reduce (the gradients, the presence flags).
    pub all_reduce_s: f64,
    /// In all-gather (batch counts, contrastive features, losses, the step's data status).
    pub all_gather_s: f64,
    /// In broadcast (weights and files at start).
    pub broadcast_s: f64,
}

/// A process group whose collectives add their duration to a counter per kind.
struct Timed {
    inner: Arc<dyn ProcessGroup>,
    nanos: [AtomicU64; 3],
}

impl Timed {
    fn timed<T>(&self, kind: usize, f: impl FnOnce() -> T) -> T {
        let t0 = Instant::now();
        let out = f();
        self.nanos[kind].fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }
}

impl ProcessGroup for Timed {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.timed(0, || self.inner.all_reduce_sum(buf))
    }
    fn all_gather(&self, local: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        self.timed(1, || self.inner.all_gather(local))
    }
    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        self.timed(2, || self.inner.broadcast(buf, root))
    }
}

/// A rank's private directory (under the system's temporary directory), removed when dropped.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// A fresh, empty directory for `rank` of this process.
    pub fn new(rank: usize) -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("flava-rank{rank}-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path).ok();
        }
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.path).ok();
    }
}

/// What travels in [`share_files`]: root's files, or why root could not read them.
#[derive(serde::Serialize, serde::Deserialize)]
struct Manifest {
    /// File names and sizes, in the order their bytes follow the manifest.
    files: Vec<(String, u64)>,
    /// Root's error, when it failed (the other ranks fail with it).
    error: Option<String>,
}

/// Rank 0's `files` on every rank. Rank 0 reads them (the argument is ignored on the other
/// ranks) and gets its own paths back; every other rank writes them into `dest` under their
/// file names and gets those paths. Rank 0's error (its `files` argument, or a file it cannot
/// read) fails every rank with its message. Every rank must call it at the same point.
pub fn share_files(
    group: &dyn ProcessGroup,
    files: anyhow::Result<Vec<PathBuf>>,
    dest: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    let root = group.rank() == 0;
    let mut buf = Vec::new();
    let files = if root { files } else { Ok(vec![]) };
    if root {
        // Each file's name and bytes, or the first error.
        let read = || -> anyhow::Result<Vec<(String, Vec<u8>)>> {
            let mut out = Vec::new();
            for f in files.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))? {
                let name = f
                    .file_name()
                    .with_context(|| format!("{} has no file name", f.display()))?
                    .to_string_lossy()
                    .to_string();
                out.push((
                    name,
                    std::fs::read(f).with_context(|| format!("reading {}", f.display()))?,
                ));
            }
            Ok(out)
        };
        let (manifest, bytes) = match read() {
            Ok(named) => {
                let files = named.iter().map(|(n, b)| (n.clone(), b.len() as u64)).collect();
                (
                    Manifest { files, error: None },
                    named.into_iter().map(|(_, b)| b).collect(),
                )
            }
            Err(e) => (
                Manifest {
                    files: vec![],
                    error: Some(format!("{e:#}")),
                },
                vec![],
            ),
        };
        let head = serde_json::to_vec(&manifest)?;
        buf.extend((head.len() as u64).to_le_bytes());
        buf.extend(head);
        bytes.into_iter().for_each(|b| buf.extend(b));
    }
    group.broadcast(&mut buf, 0)?;
    let (manifest, contents) = unpack(&buf)?;
    if let Some(e) = manifest.error {
        anyhow::bail!("rank 0: {e}");
    }
    if root {
        return files;
    }
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut out = Vec::new();
    for ((name, _), bytes) in manifest.files.iter().zip(contents) {
        let p = dest.join(name);
        std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
        out.push(p);
    }
    Ok(out)
}

/// The manifest of a bundle [`share_files`] received and each file's bytes, checked whole before
/// anything is written: the lengths add up to the bundle exactly, and every name stays inside
/// the destination (not empty, `.` or `..`, no separator or NUL) and comes once. A damaged or
/// hostile bundle is an error that says what is wrong, never a panic or a file outside `dest`.
fn unpack(buf: &[u8]) -> anyhow::Result<(Manifest, Vec<&[u8]>)> {
    let bad = |why: String| anyhow::anyhow!("rank 0 sent a damaged file bundle ({} bytes): {why}", buf.len());
    let (head, rest) = match buf.split_first_chunk::<8>() {
        Some((head, rest)) => (u64::from_le_bytes(*head), rest),
        None => return Err(bad("no 8-byte header".into())),
    };
    let head_len = usize::try_from(head)
        .ok()
        .filter(|&n| n <= rest.len())
        .ok_or_else(|| bad(format!("its manifest of {head} bytes runs past the end")))?;
    let (head, mut body) = rest.split_at(head_len);
    let manifest: Manifest = serde_json::from_slice(head).map_err(|e| bad(format!("its manifest: {e}")))?;
    let mut contents = Vec::with_capacity(manifest.files.len());
    let mut seen = std::collections::HashSet::new();
    for (name, len) in &manifest.files {
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\', '\0']) {
            return Err(bad(format!("a file named {name:?}")));
        }
        if !seen.insert(name.as_str()) {
            return Err(bad(format!("{name:?} twice")));
        }
        let len = usize::try_from(*len)
            .ok()
            .filter(|&n| n <= body.len())
            .ok_or_else(|| bad(format!("{name} of {len} bytes, {} left", body.len())))?;
        let (bytes, tail) = body.split_at(len);
        contents.push(bytes);
        body = tail;
    }
    if !body.is_empty() {
        return Err(bad(format!("{} bytes after the last file", body.len())));
    }
    Ok((manifest, contents))
}

/// Rank 0's `value` on every rank (JSON on the wire; the other ranks' arguments are ignored).
pub fn broadcast_json<T: serde::Serialize + serde::de::DeserializeOwned>(
    group: &dyn ProcessGroup,
    value: &T,
) -> anyhow::Result<T> {
    let mut buf = if group.rank() == 0 {
        serde_json::to_vec(value)?
    } else {
        vec![]
    };
    group.broadcast(&mut buf, 0)?;
    Ok(serde_json::from_slice(&buf)?)
}

/// The regular files directly inside `dir`, sorted by name.
pub fn files_in(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    Ok(v)
}

/// `Err` on every rank unless every rank's `config` (the run's configuration as text) equals
/// rank 0's; the message names the first rank that differs and its first differing line.
pub fn check_same_config(group: &dyn ProcessGroup, config: &str) -> anyhow::Result<()> {
    let all: Vec<String> = all_gather_json(group, &config.to_string())?;
    for (rank, c) in all.iter().enumerate().skip(1) {
        if c != &all[0] {
            let line = c
                .lines()
                .zip(all[0].lines())
                .find(|(a, b)| a != b)
                .map_or_else(String::new, |(a, b)| {
                    format!(": rank 0 has `{b}`, rank {rank} has `{a}`")
                });
            anyhow::bail!(
                "the ranks were started with different configurations{line}; give every rank the same options"
            );
        }
    }
    Ok(())
}

#[cfg(feature = "mpi")]
mod mpi_group {
    use std::sync::Mutex;

    use flava_objectives::collective::CollectiveError;
    use flava_objectives::ProcessGroup;
    use mpi::collective::SystemOperation;
    use mpi::datatype::PartitionMut;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;

    /// Elements per MPI call: counts are 32-bit, so larger buffers go in pieces.
    const CHUNK: usize = 1 << 30;

    /// `MPI_COMM_WORLD` as a [`ProcessGroup`]. Collectives are host-buffer MPI calls, one at a
    /// time (a lock; MPI initialised with `MPI_THREAD_SERIALIZED`). Dropping it finalises MPI.
    pub struct MpiGroup {
        world: Mutex<SimpleCommunicator>,
        rank: usize,
        size: usize,
        // Last: MPI is finalised when the universe drops, after the communicator.
        _universe: mpi::environment::Universe,
    }

    // The communicator is a handle used under the lock only, and MPI was initialised for calls
    // from any thread one at a time.
    unsafe impl Send for MpiGroup {}
    unsafe impl Sync for MpiGroup {}

    impl MpiGroup {
        /// Initialises MPI (once per process) and joins `MPI_COMM_WORLD`.
        pub fn init() -> anyhow::Result<Self> {
            let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Serialized)
                .ok_or_else(|| anyhow::anyhow!("MPI was already initialised in this process"))?;
            if threading < mpi::Threading::Serialized {
                anyhow::bail!("the MPI library does not support MPI_THREAD_SERIALIZED (it offers {threading:?})");
            }
            let world = universe.world();
            let (rank, size) = (world.rank() as usize, world.size() as usize);
            // A panic on one rank ends the job instead of leaving the others waiting.
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                previous(info);
                eprintln!("error: rank {rank} panicked; aborting the MPI job");
                // SAFETY: MPI is initialised; MPI_Abort may be called from any thread.
                unsafe {
                    mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 101);
                }
            }));
            Ok(Self {
                world: Mutex::new(world),
                rank,
                size,
                _universe: universe,
            })
        }

        /// Ends every rank of the job with `code` (MPI_Abort): a rank that cannot go on brings
        /// the others down instead of leaving them waiting in a collective.
        pub fn abort(&self, code: i32) -> ! {
            let w = self.world.lock().unwrap_or_else(|e| e.into_inner());
            w.abort(code)
        }

        fn comm(&self) -> std::sync::MutexGuard<'_, SimpleCommunicator> {
            self.world.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    fn too_large(op: &'static str, n: usize) -> CollectiveError {
        CollectiveError {
            op,
            message: format!("{n} bytes in one all-gather exceed MPI's 32-bit counts"),
        }
    }

    impl ProcessGroup for MpiGroup {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world(&self) -> usize {
            self.size
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
            let w = self.comm();
            for part in buf.chunks_mut(CHUNK) {
                let send = part.to_vec();
                w.all_reduce_into(&send[..], part, SystemOperation::sum());
            }
            Ok(())
        }
        fn all_gather(&self, local: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
            let w = self.comm();
            let n = i32::try_from(local.len()).map_err(|_| too_large("all_gather", local.len()))?;
            let mut counts = vec![0i32; self.size];
            w.all_gather_into(&n, &mut counts[..]);
            let total: usize = counts.iter().map(|&c| c as usize).sum();
            if total > i32::MAX as usize {
                return Err(too_large("all_gather", total));
            }
            let displs: Vec<i32> = counts
                .iter()
                .scan(0i32, |at, &c| {
                    let d = *at;
                    *at += c;
                    Some(d)
                })
                .collect();
            let mut all = vec![0u8; total];
            {
                let mut p = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
                w.all_gather_varcount_into(local, &mut p);
            }
            Ok(counts
                .iter()
                .zip(&displs)
                .map(|(&c, &d)| all[d as usize..(d + c) as usize].to_vec())
                .collect())
        }
        fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
            let w = self.comm();
            let r = w.process_at_rank(root as i32);
            let mut len = buf.len() as u64;
            r.broadcast_into(&mut len);
            buf.resize(len as usize, 0);
            for part in buf.chunks_mut(CHUNK) {
                r.broadcast_into(part);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rank_of_a_machine_takes_its_own_gpu() {
        assert_eq!(rank_device("cuda", Some(3)), "cuda:3");
        assert_eq!(rank_device("cuda", None), "cuda");
        assert_eq!(rank_device("cuda:1", Some(3)), "cuda:1", "an explicit index is kept");
        assert_eq!(rank_device("flex", Some(3)), "flex");
    }

    /// Rank 1 of 2, whose every broadcast delivers `bytes` (what a damaged or hostile rank 0
    /// could send).
    struct Replay {
        bytes: Vec<u8>,
    }

    impl ProcessGroup for Replay {
        fn rank(&self) -> usize {
            1
        }
        fn world(&self) -> usize {
            2
        }
        fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
            Ok(())
        }
        fn all_gather(&self, local: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
            Ok(vec![self.bytes.clone(), local.to_vec()])
        }
        fn broadcast(&self, buf: &mut Vec<u8>, _root: usize) -> Result<(), CollectiveError> {
            buf.clone_from(&self.bytes);
            Ok(())
        }
    }

    /// A bundle as rank 0 frames it: the manifest's length (u64 LE), the manifest, the bytes.
    fn bundle(manifest: &str, body: &[u8]) -> Vec<u8> {
        let mut b = (manifest.len() as u64).to_le_bytes().to_vec();
        b.extend(manifest.as_bytes());
        b.extend(body);
        b
    }

    /// `share_files(files, dest)` on two ranks run as threads (`LocalGroup`), in rank order.
    fn share_on_two_ranks(files: &[PathBuf], dest: &Path) -> Vec<anyhow::Result<Vec<PathBuf>>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = flava_objectives::collective::LocalGroup::new(2)
                .into_iter()
                .map(|g| s.spawn(move || share_files(&g, Ok(files.to_vec()), dest)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn rank_0_files_arrive_on_the_other_ranks_byte_for_byte() {
        let send = Scratch::new(9100).unwrap();
        let recv = Scratch::new(9101).unwrap();
        let (a, b) = (send.path().join("tokenizer.json"), send.path().join("empty.bin"));
        std::fs::write(&a, b"{\"model\": 1}").unwrap();
        std::fs::write(&b, b"").unwrap();
        let dest = recv.path().join("got");
        let results = share_on_two_ranks(&[a.clone(), b.clone()], &dest);
        assert_eq!(
            results[0].as_ref().unwrap(),
            &vec![a.clone(), b.clone()],
            "rank 0 keeps its paths"
        );
        let got = results[1].as_ref().unwrap();
        assert_eq!(got, &vec![dest.join("tokenizer.json"), dest.join("empty.bin")]);
        assert_eq!(std::fs::read(&got[0]).unwrap(), b"{\"model\": 1}");
        assert_eq!(std::fs::read(&got[1]).unwrap(), b"");

        // Rank 0's error (a file it cannot read) fails both ranks with its message.
        let missing = send.path().join("missing.bin");
        let results = share_on_two_ranks(&[missing], &dest);
        for r in results {
            let e = format!("{:#}", r.unwrap_err());
            assert!(e.contains("missing.bin"), "{e}");
        }
    }

    /// Hostile bundles: truncated, lying lengths (as large as u64 allows), a manifest that is not
    /// JSON, names that would leave the destination or repeat, bytes left over. Each is an error
    /// naming the damage, and nothing is written.
    #[test]
    fn a_damaged_bundle_is_an_error_and_writes_nothing() {
        let scratch = Scratch::new(9102).unwrap();
        let dest = scratch.path().join("dest");
        let mut huge_head = u64::MAX.to_le_bytes().to_vec();
        huge_head.extend(b"{}");
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", vec![], "no 8-byte header"),
            ("7 bytes", vec![1; 7], "no 8-byte header"),
            ("manifest length u64::MAX", huge_head, "runs past the end"),
            (
                "manifest longer than the bundle",
                {
                    let mut b = bundle(r#"{"files":[],"error":null}"#, b"");
                    b[0] += 1;
                    b
                },
                "runs past the end",
            ),
            ("manifest not JSON", bundle("{files", b""), "its manifest"),
            (
                "file longer than the bundle",
                bundle(r#"{"files":[["a",5]],"error":null}"#, b"abcd"),
                "a of 5 bytes, 4 left",
            ),
            (
                "file length u64::MAX",
                bundle(r#"{"files":[["a",18446744073709551615]],"error":null}"#, b"x"),
                "left",
            ),
            (
                "bytes after the last file",
                bundle(r#"{"files":[["a",1]],"error":null}"#, b"xy"),
                "1 bytes after",
            ),
            (
                "parent directory",
                bundle(r#"{"files":[["..",1]],"error":null}"#, b"x"),
                "named \"..\"",
            ),
            (
                "a path",
                bundle(r#"{"files":[["../escape",1]],"error":null}"#, b"x"),
                "named",
            ),
            (
                "a Windows path",
                bundle(r#"{"files":[["a\\b",1]],"error":null}"#, b"x"),
                "named",
            ),
            (
                "empty name",
                bundle(r#"{"files":[["",0]],"error":null}"#, b""),
                "named \"\"",
            ),
            (
                "a NUL",
                bundle(r#"{"files":[["a\u0000b",1]],"error":null}"#, b"x"),
                "named",
            ),
            (
                "a name twice",
                bundle(r#"{"files":[["a",1],["a",1]],"error":null}"#, b"xy"),
                "twice",
            ),
        ];
        for (what, bytes, expect) in cases {
            let e = share_files(&Replay { bytes }, Ok(vec![]), &dest).expect_err(what);
            let e = format!("{e:#}");
            assert!(e.contains("damaged file bundle") && e.contains(expect), "{what}: {e}");
            assert!(!dest.exists(), "{what}: nothing is written");
            assert!(!scratch.path().join("escape").exists(), "{what}");
        }
        // The same framing, well formed, is received.
        let good = bundle(r#"{"files":[["a",2],["b",0]],"error":null}"#, b"xy");
        let got = share_files(&Replay { bytes: good }, Ok(vec![]), &dest).unwrap();
        assert_eq!(std::fs::read(&got[0]).unwrap(), b"xy");
        assert_eq!(std::fs::read(&got[1]).unwrap(), b"");
    }
}
