//! Where the kernels' f32 matrix products run: the `gemm` crate (always there), or a system BLAS
//! opened at run time (`cblas_sgemm` of MKL's `libmkl_rt`, OpenBLAS or BLIS), whichever a probe
//! at first use measures faster on this CPU.
//!
//! Why: which is faster depends on the CPU and the shape. On an Intel Xeon (Emerald Rapids,
//! family 6 model 207, 2 vCPU; best of 11, both cores) the `gemm` crate and MKL were even on the
//! encoders' forward products (about 300 GFLOP/s), MKL ahead on the weight gradient `xᵀ·dy`
//! (270 against 220 GFLOP/s at 128×512×2048) and on attention's small per-head products (103
//! against 77 at 65×65×32, one thread); Debian's OpenBLAS 0.3.21 reached 64. So the choice is made
//! by timing, not by vendor name. Nothing is linked at build time: a library that is not there,
//! or lacks `cblas_sgemm`, leaves the `gemm` crate in charge.
//!
//! `FLAVA_BLAS` picks:
//! - unset or `auto`: open the first BLAS found (the names below through the dynamic loader's
//!   search path, then `$VIRTUAL_ENV/lib` and `$CONDA_PREFIX/lib`, where `pip install mkl` and
//!   conda put `libmkl_rt`), time it against the `gemm` crate on one product, keep the faster;
//! - `off` (or `gemm`): the `gemm` crate only;
//! - a path: that library, without the probe (an error opening it is reported and the `gemm`
//!   crate is used).
//!
//! A library is used only after two checks: its own query says its `cblas_sgemm` takes 32-bit
//! integers (MKL is asked for its LP64 layer; an ILP64 OpenBLAS or BLIS is refused), and a few
//! small products in every operand layout agree with the `gemm` crate's.
//!
//! The BLAS runs single-threaded (MKL's sequential layer, `openblas_set_num_threads(1)`); large
//! products are split into row or column blocks over rayon's threads, as the rest of the
//! kernels are, so that no second thread pool spins beside rayon's.
//!
//! [`record_products`] times every product by shape, layout and threading until it is turned
//! off, and [`take_product_stats`] hands the totals over: how much of a model's time is in its
//! products and how fast each kind runs in place (`flava-bench --products`,
//! `benches/compare_pytorch.py`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use rayon::prelude::*;

/// A strided matrix view: element (r, c) at `ptr + r·rs + c·cs`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct View {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// How a product may use the threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Threads {
    /// One thread: the caller already runs in parallel (attention's per-head products).
    One,
    /// Rayon's threads when the product is large enough.
    All,
}

/// Products smaller than this many multiply-adds run on one thread (as Burn's flex matmul).
const PARALLEL_THRESHOLD: usize = 192 * 192 * 192;

/// Libraries tried by `auto`, in this order (MKL first: where it is there, it was the fastest).
const CANDIDATES: &[&str] = &[
    "libmkl_rt.so.3",
    "libmkl_rt.so.2",
    "libmkl_rt.so",
    "libopenblas.so.0",
    "libopenblas.so",
    "libblis.so.4",
    "libblis.so",
];

/// `cblas_sgemm` (LP64: 32-bit integers).
type CblasSgemm = unsafe extern "C" fn(
    layout: i32,
    trans_a: i32,
    trans_b: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: f32,
    a: *const f32,
    lda: i32,
    b: *const f32,
    ldb: i32,
    beta: f32,
    c: *mut f32,
    ldc: i32,
);

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

/// A BLAS library opened at run time.
pub struct Blas {
    sgemm: CblasSgemm,
    path: String,
    // Keeps the library mapped while `sgemm` is used.
    _lib: libloading::Library,
}

impl std::fmt::Debug for Blas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blas").field("path", &self.path).finish()
    }
}

impl Blas {
    /// Opens `name` (a path, or a file name for the dynamic loader) and finds `cblas_sgemm`;
    /// asks the library for one thread per call where it has a setting for it.
    pub fn open(name: &str) -> Result<Self, String> {
        // SAFETY: opening a shared library runs its initialisers; BLAS libraries have no
        // initialisers with preconditions on the caller.
        let lib = unsafe { libloading::Library::new(name) }.map_err(|e| format!("{name}: {e}"))?;
        // SAFETY: `cblas_sgemm` has this signature in every LP64 CBLAS.
        let sgemm: CblasSgemm = unsafe { lib.get::<CblasSgemm>(b"cblas_sgemm\0") }
            .map(|f| *f)
            .map_err(|e| format!("{name}: no cblas_sgemm ({e})"))?;
        lp64(&lib).map_err(|e| format!("{name}: {e}"))?;
        // SAFETY: these setters take one int and are called before any product.
        unsafe {
            if let Ok(f) = lib.get::<unsafe extern "C" fn(i32) -> i32>(b"MKL_Set_Threading_Layer\0") {
                f(1); // MKL_THREADING_SEQUENTIAL
            }
            if let Ok(f) = lib.get::<unsafe extern "C" fn(i32)>(b"openblas_set_num_threads\0") {
                f(1);
            }
            if let Ok(f) = lib.get::<unsafe extern "C" fn(i64)>(b"bli_thread_set_num_threads\0") {
                f(1);
            }
        }
        Ok(Self {
            sgemm,
            path: name.to_string(),
            _lib: lib,
        })
    }

    /// The path or name it was opened by.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// One product on the calling thread, or `false` when the strides or sizes do not fit CBLAS
    /// (then nothing was written).
    ///
    /// # Safety
    /// As [`sgemm`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn product(
        &self,
        m: usize,
        n: usize,
        k: usize,
        dst: *mut f32,
        dst_rs: isize,
        a: View,
        b: View,
        accumulate: bool,
    ) -> bool {
        let (Some(a_op), Some(b_op)) = (operand(a, m, k), operand(b, k, n)) else {
            return false;
        };
        let fits = |x: usize| i32::try_from(x).is_ok();
        if !(fits(m) && fits(n) && fits(k) && dst_rs >= n as isize && fits(dst_rs.max(1) as usize)) {
            return false;
        }
        let beta = if accumulate { 1.0 } else { 0.0 };
        // SAFETY: the caller's contract; with beta = 0, BLAS does not read `dst`.
        unsafe {
            (self.sgemm)(
                ROW_MAJOR,
                a_op.0,
                b_op.0,
                m as i32,
                n as i32,
                k as i32,
                1.0,
                a.ptr,
                a_op.1,
                b.ptr,
                b_op.1,
                beta,
                dst,
                dst_rs.max(1) as i32,
            )
        };
        true
    }
}

/// Checks, with each library's own query, that its `cblas_sgemm` takes 32-bit integers (the
/// signature it is called with): an ILP64 build called with 32-bit sizes reads garbage sizes and
/// may crash. MKL's `libmkl_rt` is asked for its LP64 layer; an OpenBLAS built with
/// `USE64BITINT` and a BLIS with 64-bit BLAS integers are refused.
fn lp64(lib: &libloading::Library) -> Result<(), String> {
    // SAFETY: each query has this signature in the library that exports it, takes no pointers
    // (or returns a static NUL-terminated string) and is called before any product.
    unsafe {
        if let Ok(f) = lib.get::<unsafe extern "C" fn(i32) -> i32>(b"MKL_Set_Interface_Layer\0") {
            // MKL_INTERFACE_LP64 = 0; the call returns the layer in force.
            let layer = f(0);
            if layer != 0 {
                return Err(format!(
                    "MKL keeps interface layer {layer}, not LP64 (MKL_INTERFACE_LAYER?)"
                ));
            }
        }
        if let Ok(f) = lib.get::<unsafe extern "C" fn() -> *const std::ffi::c_char>(b"openblas_get_config\0") {
            let config = f();
            if !config.is_null() {
                let config = std::ffi::CStr::from_ptr(config).to_string_lossy();
                if config.contains("USE64BITINT") {
                    return Err(format!("OpenBLAS built with 64-bit integers ({config})"));
                }
            }
        }
        if let Ok(f) = lib.get::<unsafe extern "C" fn() -> i64>(b"bli_info_get_blas_int_type_size\0") {
            let bits = f();
            if bits == 64 {
                return Err("BLIS built with 64-bit BLAS integers".to_string());
            }
        }
    }
    Ok(())
}

/// CBLAS's (transpose flag, leading dimension) for a `rows × cols` view, if its strides have
/// one of the two layouts CBLAS takes.
fn operand(v: View, rows: usize, cols: usize) -> Option<(i32, i32)> {
    let ld = |x: isize, min: usize| -> Option<i32> { i32::try_from((x.max(0) as usize).max(min).max(1)).ok() };
    if v.cs == 1 || cols <= 1 {
        // Row-major: rows apart by rs (a single row may have any rs).
        let rs = if rows <= 1 { cols as isize } else { v.rs };
        if rs >= cols as isize {
            return Some((NO_TRANS, ld(rs, cols)?));
        }
    }
    if v.rs == 1 || rows <= 1 {
        // Column-major: the transpose of a row-major `cols × rows`.
        let cs = if cols <= 1 { rows as isize } else { v.cs };
        if cs >= rows as isize {
            return Some((TRANS, ld(cs, rows)?));
        }
    }
    None
}

/// The backend the kernels use in this process.
#[derive(Debug)]
pub struct GemmBackend {
    blas: Option<Blas>,
    note: String,
}

impl GemmBackend {
    /// The BLAS in use, if any (otherwise the `gemm` crate).
    pub fn blas(&self) -> Option<&Blas> {
        self.blas.as_ref()
    }

    /// One line for logs: which library, and why.
    pub fn describe(&self) -> &str {
        &self.note
    }

    /// The `FLAVA_BLAS` value that chooses this backend again without a probe: the library's
    /// path, or `off` for the gemm crate. A run keeps it so that its processes (ranks, resumes)
    /// multiply with the same library: `auto` times the candidates in each process, and two
    /// libraries within the timing noise of each other can be chosen differently from one
    /// process to the next, which changes the last bits of every product.
    pub fn setting(&self) -> String {
        self.blas.as_ref().map_or_else(|| "off".to_string(), |b| b.path.clone())
    }

    /// A backend that uses `blas` for every product it can (tests, benchmarks).
    pub fn with_blas(blas: Blas) -> Self {
        let note = format!("sgemm: {} (chosen by the caller)", blas.path);
        Self { blas: Some(blas), note }
    }

    /// The `gemm` crate only.
    pub fn gemm_crate(note: &str) -> Self {
        Self {
            blas: None,
            note: format!("sgemm: the gemm crate ({note})"),
        }
    }

    /// Chooses as `FLAVA_BLAS` = `setting` says (see the module documentation).
    pub fn from_setting(setting: Option<&str>) -> Self {
        match setting.map(str::trim) {
            Some("off") | Some("gemm") => Self::gemm_crate("FLAVA_BLAS=off"),
            None | Some("") | Some("auto") => Self::auto(),
            Some(path) => match Blas::open(path) {
                Ok(blas) if !agrees_with_gemm_crate(&blas) => {
                    log::warn!("FLAVA_BLAS: {path}: its sgemm disagrees with the gemm crate's; using the gemm crate");
                    Self::gemm_crate(&format!("FLAVA_BLAS={path} computes different products"))
                }
                Ok(blas) => Self {
                    note: format!("sgemm: {path} (FLAVA_BLAS)"),
                    blas: Some(blas),
                },
                Err(e) => {
                    log::warn!("FLAVA_BLAS: {e}; using the gemm crate");
                    Self::gemm_crate(&format!("FLAVA_BLAS could not be opened: {e}"))
                }
            },
        }
    }

    fn auto() -> Self {
        let (found, wrong): (Vec<Blas>, Vec<Blas>) = find_blas().into_iter().partition(agrees_with_gemm_crate);
        for blas in &wrong {
            log::warn!("{}: its sgemm disagrees with the gemm crate's; not used", blas.path);
        }
        if found.is_empty() {
            return Self::gemm_crate(if wrong.is_empty() {
                "no BLAS library found"
            } else {
                "no BLAS library found that computes the same products"
            });
        }
        // Alternating rounds, so that a busy moment of the machine falls on every candidate.
        let mut candidates: Vec<Option<&Blas>> = vec![None];
        candidates.extend(found.iter().map(Some));
        let times = probe(&candidates);
        let ours = times[0];
        let mut timed: Vec<(f64, Blas)> = times[1..].iter().copied().zip(found).collect();
        timed.sort_by(|x, y| x.0.total_cmp(&y.0));
        let others: Vec<String> = timed
            .iter()
            .map(|(t, b)| format!("{} {:.0}", b.path, PROBE_FLOP / t / 1e9))
            .collect();
        let (best, blas) = timed.swap_remove(0);
        let gflops = |t: f64| PROBE_FLOP / t / 1e9;
        if best < ours * 0.95 {
            let note = format!(
                "sgemm: {} ({:.0} GFLOP/s on one thread in the probe; the gemm crate {:.0}; measured: {})",
                blas.path,
                gflops(best),
                gflops(ours),
                others.join(", ")
            );
            Self { blas: Some(blas), note }
        } else {
            Self::gemm_crate(&format!(
                "{:.0} GFLOP/s on one thread in the probe; measured: {}",
                gflops(ours),
                others.join(", ")
            ))
        }
    }
}

/// Every candidate library that opens and has `cblas_sgemm`, each file once.
fn find_blas() -> Vec<Blas> {
    let mut names: Vec<PathBuf> = CANDIDATES.iter().map(PathBuf::from).collect();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(dir) = std::env::var_os(var) {
            let lib = Path::new(&dir).join("lib");
            names.extend(CANDIDATES.iter().map(|n| lib.join(n)));
        }
    }
    let mut found: Vec<Blas> = Vec::new();
    let mut seen: Vec<usize> = Vec::new();
    for name in names {
        if let Ok(blas) = Blas::open(&name.to_string_lossy()) {
            // Two names of one file (a symlink, a soname) give one function address.
            let address = blas.sgemm as usize;
            if !seen.contains(&address) {
                seen.push(address);
                found.push(blas);
            }
        }
    }
    found
}

/// Whether `blas` computes the probe's first product and a small odd-sized one with every
/// operand layout as the gemm crate does (within 1e-4 of the largest value): a library is only
/// timed, and chosen, once its results are right.
fn agrees_with_gemm_crate(blas: &Blas) -> bool {
    let (m0, n0, k0) = PROBES[0];
    [(37, 29, 41, false), (m0, n0, k0, false), (19, 23, 17, true)]
        .into_iter()
        .all(|(m, n, k, transposed)| {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1).collect();
            // Row-major a and b, or both as transposes (column-major).
            let (av, bv) = if transposed {
                (
                    View {
                        ptr: a.as_ptr(),
                        rs: 1,
                        cs: m as isize,
                    },
                    View {
                        ptr: b.as_ptr(),
                        rs: 1,
                        cs: k as isize,
                    },
                )
            } else {
                (
                    View {
                        ptr: a.as_ptr(),
                        rs: k as isize,
                        cs: 1,
                    },
                    View {
                        ptr: b.as_ptr(),
                        rs: n as isize,
                        cs: 1,
                    },
                )
            };
            let (mut ours, mut theirs) = (vec![0f32; m * n], vec![f32::NAN; m * n]);
            // SAFETY: a holds m·k and b k·n values in either layout; the outputs hold m·n; k > 0.
            unsafe {
                gemm_crate(m, n, k, ours.as_mut_ptr(), n as isize, av, bv, false);
                if !blas.product(m, n, k, theirs.as_mut_ptr(), n as isize, av, bv, false) {
                    return false;
                }
            }
            let top = ours.iter().fold(0f32, |t, v| t.max(v.abs()));
            ours.iter()
                .zip(&theirs)
                .all(|(o, t)| (o - t).abs() <= 1e-4 * top.max(1.0))
        })
}

/// The probe's products (one thread each): a `tiny` encoder layer's forward and a `full` one's.
const PROBES: [(usize, usize, usize); 2] = [(1024, 512, 128), (394, 768, 768)];
const PROBE_FLOP: f64 =
    2.0 * (PROBES[0].0 * PROBES[0].1 * PROBES[0].2 + PROBES[1].0 * PROBES[1].1 * PROBES[1].2) as f64;

/// Best-of-eight seconds of the probe products for each candidate (`None`: the gemm crate),
/// the candidates taking turns.
fn probe(candidates: &[Option<&Blas>]) -> Vec<f64> {
    let mut buffers: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = PROBES
        .iter()
        .map(|&(m, n, k)| {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.01).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i % 11) as f32 * 0.01).collect();
            (a, b, vec![0f32; m * n])
        })
        .collect();
    let mut best = vec![f64::INFINITY; candidates.len()];
    for round in 0..9 {
        for (i, &blas) in candidates.iter().enumerate() {
            let t = Instant::now();
            for (&(m, n, k), (a, b, c)) in PROBES.iter().zip(buffers.iter_mut()) {
                let av = View {
                    ptr: a.as_ptr(),
                    rs: k as isize,
                    cs: 1,
                };
                let bv = View {
                    ptr: b.as_ptr(),
                    rs: n as isize,
                    cs: 1,
                };
                // One thread: the probe runs inside `gemm_backend`'s one-time initialisation,
                // which rayon's workers may be waiting on (work given to them would never run).
                // SAFETY: a is m·k, b is k·n, c is m·n, all row-major and distinct.
                unsafe { run(blas, m, n, k, c.as_mut_ptr(), n as isize, av, bv, false, Threads::One) };
            }
            if round > 0 {
                best[i] = best[i].min(t.elapsed().as_secs_f64());
            }
        }
    }
    best
}

static BACKEND: OnceLock<GemmBackend> = OnceLock::new();

/// The process's backend, chosen at first use from `FLAVA_BLAS` (see the module documentation).
pub fn gemm_backend() -> &'static GemmBackend {
    BACKEND.get_or_init(|| GemmBackend::from_setting(std::env::var("FLAVA_BLAS").ok().as_deref()))
}

/// Sets the process's backend before its first product; `false` if one was already chosen.
pub fn set_gemm_backend(backend: GemmBackend) -> bool {
    BACKEND.set(backend).is_ok()
}

/// `dst[m×n] (+)= a[m×k]·b[k×n]`: `dst` row-major with row stride `dst_rs`; `accumulate` adds
/// to what `dst` holds, otherwise `dst` is only written.
///
/// # Safety
/// Every element the shapes and strides reach must be inside its buffer; `dst` overlaps neither
/// input nor memory another thread writes meanwhile; without `accumulate`, k > 0.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    a: View,
    b: View,
    accumulate: bool,
    threads: Threads,
) {
    // Chosen (and probed) before the clock starts: the first product does not carry the probe.
    let blas = gemm_backend().blas();
    let started = RECORDING.load(Ordering::Relaxed).then(Instant::now);
    // SAFETY: the caller's contract.
    unsafe { run(blas, m, n, k, dst, dst_rs, a, b, accumulate, threads) }
    if let Some(t) = started {
        record(m, n, k, a, b, threads, t.elapsed().as_secs_f64());
    }
}

/// Whether [`sgemm`] adds each product to [`PRODUCTS`] (off: one relaxed load per product).
static RECORDING: AtomicBool = AtomicBool::new(false);

/// Products recorded since the last [`take_product_stats`], by shape, layout and threading.
static PRODUCTS: Mutex<Vec<ProductStat>> = Mutex::new(Vec::new());

/// How an operand of a product is laid out: `a·b` has both row-major, `aᵀ` an operand read
/// column by column (a weight gradient's `xᵀ·dy`), `bᵀ` the input gradient's `dy·Wᵀ`.
fn layout(a: View, b: View) -> &'static str {
    match (a.cs == 1, b.cs == 1) {
        (true, true) => "a·b",
        (false, true) => "aᵀ·b",
        (true, false) => "a·bᵀ",
        (false, false) => "aᵀ·bᵀ",
    }
}

fn record(m: usize, n: usize, k: usize, a: View, b: View, threads: Threads, seconds: f64) {
    let (layout, parallel) = (layout(a, b), threads == Threads::All);
    // A poisoned lock only means another recording thread panicked; the counts are still sums.
    let mut all = PRODUCTS.lock().unwrap_or_else(|e| e.into_inner());
    match all
        .iter_mut()
        .find(|p| (p.m, p.n, p.k, p.layout, p.parallel) == (m, n, k, layout, parallel))
    {
        Some(p) => {
            p.calls += 1;
            p.seconds += seconds;
        }
        None => all.push(ProductStat {
            m,
            n,
            k,
            layout,
            parallel,
            calls: 1,
            seconds,
        }),
    }
}

/// The kernels' matrix products of one shape, layout and threading, as recorded between
/// [`record_products`]`(true)` and [`take_product_stats`]: where a model's time goes in its
/// products, and how fast each kind runs in place (against the machine's sgemm peak).
#[derive(Clone, Debug, PartialEq)]
pub struct ProductStat {
    /// Output rows.
    pub m: usize,
    /// Output columns.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// `a·b`, `aᵀ·b` (a weight gradient), `a·bᵀ` (an input gradient) or `aᵀ·bᵀ`.
    pub layout: &'static str,
    /// Split over rayon's threads (the caller waits for all of it); `false`: one thread, called
    /// from inside a parallel loop (attention's per-head products), so `seconds` sums the threads'.
    pub parallel: bool,
    /// How many products of this kind ran.
    pub calls: usize,
    /// Their summed duration, seconds.
    pub seconds: f64,
}

impl ProductStat {
    /// Multiply-adds times two, over all calls.
    pub fn flops(&self) -> f64 {
        2.0 * (self.m * self.n * self.k) as f64 * self.calls as f64
    }

    /// Achieved GFLOP/s (per calling thread where not `parallel`).
    pub fn gflops(&self) -> f64 {
        self.flops() / self.seconds.max(1e-12) / 1e9
    }
}

/// Starts (`true`) or stops recording every product of the kernels (see [`ProductStat`]).
/// Recording costs two clock reads and a lock per product; it is off unless asked for.
pub fn record_products(on: bool) {
    RECORDING.store(on, Ordering::Relaxed);
}

/// The products recorded so far, longest total first, and forgets them.
pub fn take_product_stats() -> Vec<ProductStat> {
    let mut all = std::mem::take(&mut *PRODUCTS.lock().unwrap_or_else(|e| e.into_inner()));
    all.sort_by(|x, y| y.seconds.total_cmp(&x.seconds));
    all
}

/// A pointer that rayon's tasks may share (each writes its own block).
#[derive(Clone, Copy)]
struct Shared<T>(T);
// SAFETY: used only for the disjoint blocks of one product, read-only inputs.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

#[allow(clippy::too_many_arguments)]
unsafe fn run(
    blas: Option<&Blas>,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    a: View,
    b: View,
    accumulate: bool,
    threads: Threads,
) {
    if m == 0 || n == 0 {
        return;
    }
    let big = m.saturating_mul(n).saturating_mul(k) >= PARALLEL_THRESHOLD;
    let parts = if threads == Threads::All && big {
        rayon::current_num_threads()
    } else {
        1
    };
    // Blocks of whole 16-float rows or columns, along the longer side of the output.
    let along_rows = m >= n;
    let len = if along_rows { m } else { n };
    let block = len.div_ceil(parts).next_multiple_of(16).max(1);
    let blocks = len.div_ceil(block);
    let (dst_p, a_p, b_p) = (Shared(dst), Shared(a), Shared(b));
    let one = move |i: usize| {
        let (dst, a, b) = (dst_p, a_p, b_p);
        let start = i * block;
        let size = block.min(len - start);
        // SAFETY: block i covers rows (or columns) start..start+size of the output, inside
        // the shapes the caller vouched for; blocks are disjoint.
        unsafe {
            let (bm, bn, d, a, b) = if along_rows {
                let a = View {
                    ptr: a.0.ptr.offset(start as isize * a.0.rs),
                    ..a.0
                };
                (size, n, dst.0.offset(start as isize * dst_rs), a, b.0)
            } else {
                let b = View {
                    ptr: b.0.ptr.offset(start as isize * b.0.cs),
                    ..b.0
                };
                (m, size, dst.0.add(start), a.0, b)
            };
            if !blas.is_some_and(|blas| blas.product(bm, bn, k, d, dst_rs, a, b, accumulate)) {
                gemm_crate(bm, bn, k, d, dst_rs, a, b, accumulate);
            }
        }
    };
    if blocks == 1 {
        one(0);
    } else {
        (0..blocks).into_par_iter().for_each(one);
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn gemm_crate(m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: isize, a: View, b: View, accumulate: bool) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        av: (isize, isize),
        b: &[f32],
        bv: (isize, isize),
    ) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for r in 0..m {
            for c in 0..n {
                out[r * n + c] = (0..k)
                    .map(|i| {
                        a[(r as isize * av.0 + i as isize * av.1) as usize] as f64
                            * b[(i as isize * bv.0 + c as isize * bv.1) as usize] as f64
                    })
                    .sum();
            }
        }
        out
    }

    /// Every layout the kernels pass (row- and column-major operands, a row stride wider than
    /// the output, accumulation, one thread or split into blocks) against an f64 reference, for
    /// the gemm crate and, where one can be opened, a system BLAS (`FLAVA_TEST_BLAS` names it;
    /// `FLAVA_REQUIRE_BLAS=1` makes its absence a failure, as CI sets after installing
    /// OpenBLAS). Tolerance 2e-5 of the sum of |products|.
    #[test]
    fn products_match_an_f64_reference_in_every_layout() {
        let blas = match std::env::var("FLAVA_TEST_BLAS") {
            Ok(path) => Some(Blas::open(&path).expect("FLAVA_TEST_BLAS opens")),
            Err(_) => find_blas().into_iter().next(),
        };
        if std::env::var("FLAVA_REQUIRE_BLAS").as_deref() == Ok("1") {
            assert!(
                blas.is_some(),
                "FLAVA_REQUIRE_BLAS=1 but no BLAS library could be opened"
            );
        }
        let shapes = [
            (1, 1, 1),
            (3, 5, 7),
            (1, 70, 33),
            (70, 1, 20),
            (257, 190, 64),
            (300, 200, 150),
        ];
        for blas in [None, blas.as_ref()] {
            for &(m, n, k) in &shapes {
                for (a_t, b_t, wide, acc, threads) in [
                    (false, false, false, false, Threads::All),
                    (true, false, false, true, Threads::All),
                    (false, true, true, false, Threads::One),
                    (true, true, true, true, Threads::All),
                ] {
                    let a: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
                    let b: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 24.0).collect();
                    let av = if a_t { (1, m as isize) } else { (k as isize, 1) };
                    let bv = if b_t { (1, k as isize) } else { (n as isize, 1) };
                    let dst_rs = if wide { n + 3 } else { n };
                    let start = 0.5f32;
                    let mut dst = vec![start; m * dst_rs];
                    let view = |p: &[f32], s: (isize, isize)| View {
                        ptr: p.as_ptr(),
                        rs: s.0,
                        cs: s.1,
                    };
                    // SAFETY: the buffers hold what the shapes and strides reach.
                    unsafe {
                        run(
                            blas,
                            m,
                            n,
                            k,
                            dst.as_mut_ptr(),
                            dst_rs as isize,
                            view(&a, av),
                            view(&b, bv),
                            acc,
                            threads,
                        )
                    };
                    let want = reference(m, n, k, &a, av, &b, bv);
                    let scale = 4.0 * k as f64;
                    for r in 0..m {
                        for c in 0..n {
                            let w = want[r * n + c] + if acc { start as f64 } else { 0.0 };
                            let got = dst[r * dst_rs + c] as f64;
                            assert!(
                                (got - w).abs() <= 2e-5 * scale,
                                "{} {m}x{n}x{k} a_t={a_t} b_t={b_t} acc={acc}: ({r},{c}) {got} vs {w}",
                                blas.map_or("gemm crate", |b| b.path())
                            );
                        }
                        for c in n..dst_rs {
                            assert_eq!(dst[r * dst_rs + c], start, "padding column written");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn recorded_products_count_each_shape_layout_and_threading() {
        // A shape no other test uses: tests of this binary may run products meanwhile.
        let (m, n, k) = (41, 43, 47);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32).collect();
        let mut dst = vec![0f32; m * n];
        let row_major_a = View {
            ptr: a.as_ptr(),
            rs: k as isize,
            cs: 1,
        };
        let transposed_a = View {
            ptr: a.as_ptr(),
            rs: 1,
            cs: m as isize,
        };
        let bv = View {
            ptr: b.as_ptr(),
            rs: n as isize,
            cs: 1,
        };
        let product = |a: View, threads: Threads, dst: &mut [f32]| {
            // SAFETY: a holds m·k values in either layout, b k·n, dst m·n.
            unsafe { sgemm(m, n, k, dst.as_mut_ptr(), n as isize, a, bv, false, threads) }
        };
        record_products(true);
        product(row_major_a, Threads::All, &mut dst);
        product(row_major_a, Threads::All, &mut dst);
        product(transposed_a, Threads::One, &mut dst);
        record_products(false);
        product(row_major_a, Threads::All, &mut dst);
        let ours: Vec<ProductStat> = take_product_stats()
            .into_iter()
            .filter(|p| (p.m, p.n, p.k) == (m, n, k))
            .collect();
        assert_eq!(ours.len(), 2, "{ours:?}");
        let forward = ours.iter().find(|p| p.layout == "a·b").expect("a·b recorded");
        assert_eq!(
            (forward.calls, forward.parallel),
            (2, true),
            "the call after recording stopped is not counted"
        );
        assert_eq!(forward.flops(), 4.0 * (m * n * k) as f64);
        let gradient = ours.iter().find(|p| p.layout == "aᵀ·b").expect("aᵀ·b recorded");
        assert_eq!((gradient.calls, gradient.parallel), (1, false));
        assert!(forward.seconds > 0.0 && gradient.seconds > 0.0);
        assert!(
            forward.gflops().is_finite() && forward.gflops() > 0.0,
            "{}",
            forward.gflops()
        );
        assert!(
            take_product_stats().iter().all(|p| (p.m, p.n, p.k) != (m, n, k)),
            "taking forgets"
        );
    }

    #[test]
    fn settings() {
        assert!(GemmBackend::from_setting(Some("off")).blas().is_none());
        let missing = GemmBackend::from_setting(Some("/nonexistent/libblas.so"));
        assert!(missing.blas().is_none());
        assert!(
            missing.describe().contains("could not be opened"),
            "{}",
            missing.describe()
        );
        assert!(Blas::open("/nonexistent/libblas.so").is_err());
    }

    /// Builds a shared library from C source with the system C compiler (the linker Rust uses).
    fn fake_blas(dir: &Path, name: &str, source: &str) -> PathBuf {
        let c = dir.join(format!("{name}.c"));
        let lib = dir.join(format!("lib{name}.so"));
        std::fs::write(&c, source).expect("write the C source");
        let status = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(&lib)
            .arg(&c)
            .status()
            .expect("run cc");
        assert!(status.success(), "cc failed on {name}");
        lib
    }

    /// Hostile libraries: one that says it was built with 64-bit integers (an ILP64 OpenBLAS) is
    /// refused before any product; one whose `cblas_sgemm` computes wrong values is refused by
    /// name (`FLAVA_BLAS=path`), and the gemm crate does the products.
    #[test]
    fn libraries_with_64_bit_integers_or_wrong_products_are_refused() {
        let dir = std::env::temp_dir().join(format!("flava-fake-blas-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let sgemm = "void cblas_sgemm(int l, int ta, int tb, int m, int n, int k, float alpha, \
                     const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) \
                     { for (int i = 0; i < m; i++) for (int j = 0; j < n; j++) c[i * ldc + j] = 1.0f; }";
        let ilp64 = fake_blas(
            &dir,
            "ilp64",
            &format!("{sgemm}\nconst char *openblas_get_config(void) {{ return \"OpenBLAS 0.3 USE64BITINT\"; }}\n"),
        );
        let err = Blas::open(&ilp64.to_string_lossy()).expect_err("an ILP64 library is refused");
        assert!(err.contains("64-bit integers"), "{err}");

        let wrong = fake_blas(&dir, "wrong", &format!("{sgemm}\n"));
        let blas = Blas::open(&wrong.to_string_lossy()).expect("it opens");
        assert!(!agrees_with_gemm_crate(&blas), "a library that writes ones is wrong");
        let backend = GemmBackend::from_setting(Some(&wrong.to_string_lossy()));
        assert!(backend.blas().is_none(), "{}", backend.describe());
        assert!(
            backend.describe().contains("computes different products"),
            "{}",
            backend.describe()
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
