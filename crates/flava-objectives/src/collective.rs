//! The process group a data-parallel job's ranks talk through: rank, world size, all-reduce,
//! all-gather and broadcast of host buffers ([`ProcessGroup`]). MPI implements it in
//! `flava-train` (feature `mpi`); [`SingleProcess`] is the group of one, and [`LocalGroup`] runs
//! the ranks as threads of one process (how the exactness of the distributed step is tested
//! without MPI). An NCCL group for GPU tensors can implement the same trait.
//!
//! On top of the trait: [`all_reduce_gradients`] (gradients flattened in the model's parameter
//! order into buckets, summed over the ranks, registered back) and [`broadcast_module`] (rank
//! 0's weights on every rank, parameter ids kept).

use std::sync::{Arc, Barrier, Mutex};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;

/// Why a collective failed (the transport's message).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("collective {op} failed: {message}")]
pub struct CollectiveError {
    /// The operation (`all_reduce`, `all_gather`, `broadcast`).
    pub op: &'static str,
    /// What went wrong.
    pub message: String,
}

/// The ranks of one job. Every rank calls the same collectives in the same order; each call
/// returns when all ranks made it.
pub trait ProcessGroup: Send + Sync {
    /// This process's rank, `0..world()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world(&self) -> usize;
    /// Sums `buf` elementwise over the ranks, in place (every rank gets the same sum).
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// Every rank's `local` bytes (lengths may differ), in rank order.
    fn all_gather(&self, local: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError>;
    /// `root`'s `buf` on every rank (other ranks' contents and lengths are replaced).
    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError>;
}

impl std::fmt::Debug for dyn ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} of {}", self.rank(), self.world())
    }
}

/// The group of one process: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl ProcessGroup for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn all_gather(&self, local: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        Ok(vec![local.to_vec()])
    }
    fn broadcast(&self, _buf: &mut Vec<u8>, _root: usize) -> Result<(), CollectiveError> {
        Ok(())
    }
}

struct Exchange {
    slots: Mutex<Vec<Vec<u8>>>,
    barrier: Barrier,
}

/// Ranks as threads of one process: [`LocalGroup::new`]`(n)` gives one handle per rank, to be
/// moved into its thread. Sums are taken in rank order, so every rank gets the same bits.
#[derive(Clone)]
pub struct LocalGroup {
    rank: usize,
    world: usize,
    shared: Arc<Exchange>,
}

impl LocalGroup {
    /// The `n` ranks' handles, rank order.
    pub fn new(n: usize) -> Vec<LocalGroup> {
        let shared = Arc::new(Exchange {
            slots: Mutex::new(vec![Vec::new(); n]),
            barrier: Barrier::new(n),
        });
        (0..n)
            .map(|rank| LocalGroup {
                rank,
                world: n,
                shared: shared.clone(),
            })
            .collect()
    }

    fn exchange(&self, mine: Vec<u8>) -> Vec<Vec<u8>> {
        self.shared.slots.lock().unwrap_or_else(|e| e.into_inner())[self.rank] = mine;
        self.shared.barrier.wait();
        let all = self.shared.slots.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // Nobody writes the next round's slot before everyone has read this one.
        self.shared.barrier.wait();
        all
    }
}

impl ProcessGroup for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let all = self.exchange(f32_bytes(buf));
        buf.fill(0.0);
        for part in all {
            for (b, x) in buf.iter_mut().zip(bytes_f32(&part)) {
                *b += x;
            }
        }
        Ok(())
    }
    fn all_gather(&self, local: &[u8]) -> Result<Vec<Vec<u8>>, CollectiveError> {
        Ok(self.exchange(local.to_vec()))
    }
    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<(), CollectiveError> {
        let mut all = self.exchange(if self.rank == root { buf.clone() } else { vec![] });
        *buf = std::mem::take(&mut all[root]);
        Ok(())
    }
}

/// `v` as little-endian bytes.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Little-endian bytes as `f32`s (a trailing partial value is dropped).
pub fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Every rank's `value`, in rank order (JSON on the wire).
pub fn all_gather_json<T: serde::Serialize + serde::de::DeserializeOwned>(
    group: &dyn ProcessGroup,
    value: &T,
) -> Result<Vec<T>, CollectiveError> {
    let bad = |e: serde_json::Error| CollectiveError {
        op: "all_gather",
        message: e.to_string(),
    };
    let mine = serde_json::to_vec(value).map_err(bad)?;
    group
        .all_gather(&mine)?
        .iter()
        .map(|b| serde_json::from_slice(b).map_err(bad))
        .collect()
}

/// Floats per all-reduce call (16 MiB): the gradients go in buckets of this size.
pub const BUCKET_FLOATS: usize = 4 << 20;

/// One parameter's slot in the flattened gradient.
struct Slot {
    len: usize,
    /// This rank's gradient (absent when the parameter got none here).
    local: Option<Vec<f32>>,
    device: Device,
}

struct Flatten<'a> {
    grads: &'a GradientsParams,
    slots: Vec<Slot>,
}

impl ModuleVisitor for Flatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let g = self.grads.get::<D>(param.id);
        let device = g
            .as_ref()
            .map_or_else(|| param.val().without_autodiff().device(), |g| g.device());
        self.slots.push(Slot {
            len: param.shape().num_elements(),
            local: g.map(|g| g.into_data().convert::<f32>().try_into_vec::<f32>().unwrap_or_default()),
            device,
        });
    }
}

struct Unflatten<'a> {
    summed: &'a [f32],
    present: &'a [f32],
    slots: &'a [Slot],
    at: usize,
    offset: usize,
    out: GradientsParams,
}

impl ModuleVisitor for Unflatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let slot = &self.slots[self.at];
        if self.present[self.at] > 0.0 {
            let v = self.summed[self.offset..self.offset + slot.len].to_vec();
            let t = Tensor::<D>::from_data(TensorData::new(v, param.shape()), &slot.device);
            self.out.register(param.id, t);
        }
        self.offset += slot.len;
        self.at += 1;
    }
}

/// The sum over the ranks of every rank's `grads` of `module`'s parameters: flattened in the
/// module's parameter order (the same on every rank), summed in buckets of
/// [`BUCKET_FLOATS`], registered back. A parameter gets a gradient when at least one rank had
/// one (the others count zero), as one process summing micro-batches would.
pub fn all_reduce_gradients<M: Module>(
    group: &dyn ProcessGroup,
    module: &M,
    grads: GradientsParams,
) -> Result<GradientsParams, CollectiveError> {
    if group.world() == 1 {
        return Ok(grads);
    }
    let mut f = Flatten {
        grads: &grads,
        slots: Vec::new(),
    };
    module.visit(&mut f);
    let slots = f.slots;
    drop(grads);
    let mut present: Vec<f32> = slots.iter().map(|s| f32::from(u8::from(s.local.is_some()))).collect();
    group.all_reduce_sum(&mut present)?;
    let total: usize = slots.iter().map(|s| s.len).sum();
    let mut flat = Vec::with_capacity(total);
    for s in &slots {
        match &s.local {
            Some(v) if v.len() == s.len => flat.extend_from_slice(v),
            _ => flat.resize(flat.len() + s.len, 0.0),
        }
    }
    for bucket in flat.chunks_mut(BUCKET_FLOATS) {
        group.all_reduce_sum(bucket)?;
    }
    let mut u = Unflatten {
        summed: &flat,
        present: &present,
        slots: &slots,
        at: 0,
        offset: 0,
        out: GradientsParams::new(),
    };
    module.visit(&mut u);
    Ok(u.out)
}

struct Collect {
    values: Vec<f32>,
}

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let d = param.val().into_data().convert::<f32>();
        self.values.extend(d.try_into_vec::<f32>().unwrap_or_default());
    }
}

struct Replace<'a> {
    values: &'a [f32],
    offset: usize,
}

impl ModuleMapper for Replace<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let n = param.shape().num_elements();
        let v = self.values[self.offset..self.offset + n].to_vec();
        self.offset += n;
        param.map(|t| {
            let grad = t.is_require_grad();
            let new = Tensor::<D>::from_data(TensorData::new(v, t.shape()), &t.device());
            if grad {
                new.require_grad()
            } else {
                new
            }
        })
    }
}

struct Touch;

impl ModuleVisitor for Touch {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let _ = param.val();
    }
}

/// Initialises every lazily initialised parameter of `module` now. Burn draws a new module's
/// random weights on first use; ranks that are threads of one process share the device's
/// generator, so each must draw its weights before the next starts.
pub fn materialize<M: Module>(module: &M) {
    module.visit(&mut Touch);
}

/// `module` with rank `root`'s float weights on every rank (structure and parameter ids are
/// this rank's; a rank whose module has another number of weights gets an error).
pub fn broadcast_module<M: Module>(group: &dyn ProcessGroup, module: M, root: usize) -> Result<M, CollectiveError> {
    if group.world() == 1 {
        return Ok(module);
    }
    let mut c = Collect { values: Vec::new() };
    module.visit(&mut c);
    let n = c.values.len();
    let mut buf = if group.rank() == root {
        f32_bytes(&c.values)
    } else {
        vec![]
    };
    drop(c);
    group.broadcast(&mut buf, root)?;
    let values = bytes_f32(&buf);
    if values.len() != n {
        return Err(CollectiveError {
            op: "broadcast",
            message: format!(
                "rank {root} sent {} weights, rank {} has {n}: the ranks built different models",
                values.len(),
                group.rank()
            ),
        });
    }
    Ok(module.map(&mut Replace {
        values: &values,
        offset: 0,
    }))
}
