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
//! The choice is made per [`ProductKind`]: forward products (and input gradients), weight
//! gradients, and attention's one-thread per-head products can each go to a different library,
//! so that a BLAS ahead on one kind (MKL on the Xeon's weight gradients) is used for it without
//! slowing the kinds where the `gemm` crate is as fast.
//!
//! `FLAVA_BLAS` picks:
//! - unset or `auto`: open every BLAS found (the names below through the dynamic loader's
//!   search path, then `$VIRTUAL_ENV/lib` and `$CONDA_PREFIX/lib`, where `pip install mkl` and
//!   conda put `libmkl_rt`), time each against the `gemm` crate on two products of each kind,
//!   and send each kind to the library at least 10% faster than the `gemm` crate on it (one
//!   library at most: the one that saves the most);
//! - `off` (or `gemm`): the `gemm` crate only;
//! - a path: that library for every kind, without the probe (an error opening it is reported
//!   and the `gemm` crate is used);
//! - a path, `@`, and kind names (`/v/lib/libmkl_rt.so.3@weight-gradient,per-head`): that
//!   library for those kinds, the `gemm` crate for the others (what `auto` chose, written back
//!   by [`GemmBackend::setting`]).
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

impl View {
    /// Row-major: rows `rs` floats apart, each row's values adjacent.
    pub fn rows(ptr: *const f32, rs: isize) -> Self {
        Self { ptr, rs, cs: 1 }
    }

    /// Column-major (a row-major buffer read as its transpose): columns `cs` floats apart.
    pub fn columns(ptr: *const f32, cs: isize) -> Self {
        Self { ptr, rs: 1, cs }
    }
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

/// The kinds of product the backend routes separately, each to the library a probe measured
/// fastest for it (their operand layouts and sizes stress a library differently).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProductKind {
    /// `a` row-major (`x·W`, the input gradient `dy·Wᵀ`), split over the threads: the encoders'
    /// forward products and input gradients.
    Forward,
    /// `a` read column by column (`xᵀ·dy`), split over the threads: the weight gradients.
    WeightGradient,
    /// One thread, called from inside a parallel loop: attention's per-head products.
    PerHead,
}

impl ProductKind {
    /// Every kind, in the order of [`GemmBackend`]'s routes.
    pub const ALL: [ProductKind; 3] = [Self::Forward, Self::WeightGradient, Self::PerHead];

    /// The name `FLAVA_BLAS` and the logs use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Forward => "forward",
            Self::WeightGradient => "weight-gradient",
            Self::PerHead => "per-head",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The kind of a product with left operand `a` run with `threads`.
    fn of(a: View, threads: Threads) -> Self {
        match (threads, a.cs == 1) {
            (Threads::One, _) => Self::PerHead,
            (Threads::All, true) => Self::Forward,
            (Threads::All, false) => Self::WeightGradient,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The backend the kernels use in this process: at most one BLAS, and which kinds of product go
/// to it (the others run on the `gemm` crate).
#[derive(Debug)]
pub struct GemmBackend {
    blas: Option<Blas>,
    /// Per [`ProductKind::ALL`]: whether that kind goes to `blas`.
    routes: [bool; 3],
    note: String,
}

impl GemmBackend {
    /// The BLAS in use for some kind of product, if any (otherwise the `gemm` crate does all).
    pub fn blas(&self) -> Option<&Blas> {
        self.blas.as_ref()
    }

    /// The BLAS that runs products of `kind`, or `None` for the `gemm` crate.
    pub fn blas_for(&self, kind: ProductKind) -> Option<&Blas> {
        self.blas.as_ref().filter(|_| self.routes[kind.index()])
    }

    /// One line for logs: which library, for which kinds, and why.
    pub fn describe(&self) -> &str {
        &self.note
    }

    /// The `FLAVA_BLAS` value that chooses this backend again without a probe: `off` for the
    /// gemm crate, the library's path when it runs every kind, else `path@kind,kind`. A run
    /// keeps it so that its processes (ranks, resumes) multiply with the same library: `auto`
    /// times the candidates in each process, and two libraries within the timing noise of each
    /// other can be chosen differently from one process to the next, which changes the last bits
    /// of every product.
    pub fn setting(&self) -> String {
        match &self.blas {
            None => "off".to_string(),
            Some(b) if self.routes.iter().all(|&r| r) => b.path.clone(),
            Some(b) => format!("{}@{}", b.path, kind_names(self.routes).join(",")),
        }
    }

    /// A backend that uses `blas` for every product it can (tests, benchmarks).
    pub fn with_blas(blas: Blas) -> Self {
        let note = format!("sgemm: {} (chosen by the caller)", blas.path);
        Self {
            blas: Some(blas),
            routes: [true; 3],
            note,
        }
    }

    /// The `gemm` crate only.
    pub fn gemm_crate(note: &str) -> Self {
        Self {
            blas: None,
            routes: [false; 3],
            note: format!("sgemm: the gemm crate ({note})"),
        }
    }

    /// `blas` for the kinds `routes` marks, the gemm crate for the others; `why` ends the log line.
    fn routed(blas: Blas, routes: [bool; 3], why: &str) -> Self {
        let note = if routes.iter().all(|&r| r) {
            format!("sgemm: {} ({why})", blas.path)
        } else {
            format!(
                "sgemm: {} for {} products, the gemm crate for the others ({why})",
                blas.path,
                kind_names(routes).join(", ")
            )
        };
        Self {
            blas: Some(blas),
            routes,
            note,
        }
    }

    /// Chooses as `FLAVA_BLAS` = `setting` says (see the module documentation).
    pub fn from_setting(setting: Option<&str>) -> Self {
        match setting.map(str::trim) {
            Some("off") | Some("gemm") => Self::gemm_crate("FLAVA_BLAS=off"),
            None | Some("") | Some("auto") => Self::auto(),
            Some(value) => {
                let (path, routes) = split_kinds(value);
                match Blas::open(path) {
                    Ok(blas) if !agrees_with_gemm_crate(&blas) => {
                        log::warn!(
                            "FLAVA_BLAS: {path}: its sgemm disagrees with the gemm crate's; using the gemm crate"
                        );
                        Self::gemm_crate(&format!("FLAVA_BLAS={path} computes different products"))
                    }
                    Ok(blas) => Self::routed(blas, routes, "FLAVA_BLAS"),
                    Err(e) => {
                        log::warn!("FLAVA_BLAS: {e}; using the gemm crate");
                        Self::gemm_crate(&format!("FLAVA_BLAS could not be opened: {e}"))
                    }
                }
            }
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
        let measured: Vec<String> = found
            .iter()
            .zip(&times[1..])
            .map(|(b, t)| format!("{} {}", b.path, rates(t)))
            .collect();
        let measured = format!(
            "one thread, GFLOP/s per kind: the gemm crate {}; {}",
            rates(&times[0]),
            measured.join("; ")
        );
        match choose(&times) {
            None => Self::gemm_crate(&measured),
            Some((i, routes)) => {
                let blas = found
                    .into_iter()
                    .nth(i - 1)
                    .expect("choose returns a candidate's index");
                Self::routed(blas, routes, &measured)
            }
        }
    }
}

/// The names of the kinds `routes` marks.
fn kind_names(routes: [bool; 3]) -> Vec<&'static str> {
    ProductKind::ALL
        .into_iter()
        .filter(|k| routes[k.index()])
        .map(ProductKind::name)
        .collect()
}

/// `path@kind,kind` into the path and the kinds' routes; a value without a valid kind list after
/// its last `@` is a path for every kind (a file name may hold an `@`).
fn split_kinds(value: &str) -> (&str, [bool; 3]) {
    if let Some((path, list)) = value.rsplit_once('@') {
        let kinds: Option<Vec<ProductKind>> = list.split(',').map(|k| ProductKind::from_name(k.trim())).collect();
        if let Some(kinds) = kinds.filter(|k| !k.is_empty() && !path.is_empty()) {
            let mut routes = [false; 3];
            for k in kinds {
                routes[k.index()] = true;
            }
            return (path, routes);
        }
    }
    (value, [true; 3])
}

/// A library must be this much faster than the `gemm` crate on a kind to get it: closer than
/// that is the probe's noise, and the `gemm` crate's results do not depend on what is installed.
/// At 5%, a busy moment on Zen 4 sent the per-head products to OpenBLAS (77 against 72 GFLOP/s
/// in the probe), which was 2-4% slower in the model; MKL's leads on the Xeon (weight gradients
/// 270 against 220, per-head 103 against 77) pass 10%.
const MARGIN: f64 = 0.9;

/// From the probe's seconds per candidate and kind (candidate 0 the `gemm` crate), the library
/// to use and the kinds it runs: for each library, the kinds where it beats the `gemm` crate by
/// [`MARGIN`]; the library that saves the most (summed over those kinds, as fractions of the
/// `gemm` crate's time) wins. `None`: no library beats it on any kind.
fn choose(times: &[[f64; 3]]) -> Option<(usize, [bool; 3])> {
    let ours = times.first()?;
    times
        .iter()
        .enumerate()
        .skip(1)
        .map(|(i, t)| {
            let routes: [bool; 3] = std::array::from_fn(|k| t[k] < ours[k] * MARGIN);
            let saved: f64 = (0..3).filter(|&k| routes[k]).map(|k| 1.0 - t[k] / ours[k]).sum();
            (i, routes, saved)
        })
        .filter(|(_, routes, _)| routes.iter().any(|&r| r))
        .max_by(|x, y| x.2.total_cmp(&y.2))
        .map(|(i, routes, _)| (i, routes))
}

/// The probe's rates per kind, for the logs.
fn rates(seconds: &[f64; 3]) -> String {
    ProductKind::ALL
        .into_iter()
        .map(|k| format!("{} {:.0}", k.name(), PROBE_FLOP[k.index()] / seconds[k.index()] / 1e9))
        .collect::<Vec<_>>()
        .join(", ")
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
    let (m0, n0, k0) = (PROBES[0][0].m, PROBES[0][0].n, PROBES[0][0].k);
    [(37, 29, 41, false), (m0, n0, k0, false), (19, 23, 17, true)]
        .into_iter()
        .all(|(m, n, k, transposed)| {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1).collect();
            // Row-major a and b, or both as transposes (column-major).
            let (av, bv) = if transposed {
                (
                    View::columns(a.as_ptr(), m as isize),
                    View::columns(b.as_ptr(), k as isize),
                )
            } else {
                (View::rows(a.as_ptr(), k as isize), View::rows(b.as_ptr(), n as isize))
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

/// One probe product: its shape, which operands are read column by column (`aᵀ` a weight
/// gradient's, `bᵀ` attention's `kᵀ`), and how many times it runs (small products repeat, so that
/// each kind's time is long enough to measure).
struct ProbeProduct {
    m: usize,
    n: usize,
    k: usize,
    transposed_a: bool,
    transposed_b: bool,
    repeats: usize,
}

/// The probe's products per kind, one thread each: a `tiny` and a `full` encoder layer's
/// forward (`x·W`), their weight gradients (`xᵀ·dy`, fc1's at `tiny`, a square one at `full`),
/// and their per-head attention scores (`q·kᵀ`, 65 and 197 tokens).
const PROBES: [[ProbeProduct; 2]; 3] = [
    [
        ProbeProduct {
            m: 1024,
            n: 512,
            k: 128,
            transposed_a: false,
            transposed_b: false,
            repeats: 1,
        },
        ProbeProduct {
            m: 394,
            n: 768,
            k: 768,
            transposed_a: false,
            transposed_b: false,
            repeats: 1,
        },
    ],
    [
        ProbeProduct {
            m: 128,
            n: 512,
            k: 1024,
            transposed_a: true,
            transposed_b: false,
            repeats: 1,
        },
        ProbeProduct {
            m: 768,
            n: 768,
            k: 394,
            transposed_a: true,
            transposed_b: false,
            repeats: 1,
        },
    ],
    [
        ProbeProduct {
            m: 65,
            n: 65,
            k: 32,
            transposed_a: false,
            transposed_b: true,
            repeats: 64,
        },
        ProbeProduct {
            m: 197,
            n: 197,
            k: 64,
            transposed_a: false,
            transposed_b: true,
            repeats: 8,
        },
    ],
];

/// FLOPs of each kind's probe products.
const PROBE_FLOP: [f64; 3] = {
    let mut flop = [0.0; 3];
    let mut kind = 0;
    while kind < 3 {
        let mut i = 0;
        while i < 2 {
            let p = &PROBES[kind][i];
            flop[kind] += 2.0 * (p.m * p.n * p.k * p.repeats) as f64;
            i += 1;
        }
        kind += 1;
    }
    flop
};

/// Best-of-eight seconds of each kind's probe products for each candidate (`None`: the gemm
/// crate), the candidates taking turns.
fn probe(candidates: &[Option<&Blas>]) -> Vec<[f64; 3]> {
    // Per kind, per product: a, b and the output.
    type Operands = (Vec<f32>, Vec<f32>, Vec<f32>);
    let mut buffers: Vec<Vec<Operands>> = PROBES
        .iter()
        .map(|kind| {
            kind.iter()
                .map(|p| {
                    let a: Vec<f32> = (0..p.m * p.k).map(|i| (i % 13) as f32 * 0.01).collect();
                    let b: Vec<f32> = (0..p.k * p.n).map(|i| (i % 11) as f32 * 0.01).collect();
                    (a, b, vec![0f32; p.m * p.n])
                })
                .collect()
        })
        .collect();
    let mut best = vec![[f64::INFINITY; 3]; candidates.len()];
    for round in 0..9 {
        for (i, &blas) in candidates.iter().enumerate() {
            for (kind, (products, buffers)) in PROBES.iter().zip(buffers.iter_mut()).enumerate() {
                let t = Instant::now();
                for (p, (a, b, c)) in products.iter().zip(buffers.iter_mut()) {
                    let av = if p.transposed_a {
                        View::columns(a.as_ptr(), p.m as isize)
                    } else {
                        View::rows(a.as_ptr(), p.k as isize)
                    };
                    let bv = if p.transposed_b {
                        View::columns(b.as_ptr(), p.k as isize)
                    } else {
                        View::rows(b.as_ptr(), p.n as isize)
                    };
                    for _ in 0..p.repeats {
                        // One thread: the probe runs inside `gemm_backend`'s one-time
                        // initialisation, which rayon's workers may be waiting on (work given to
                        // them would never run).
                        // SAFETY: a holds m·k and b k·n values in their layouts, c is m·n
                        // row-major; all distinct.
                        unsafe {
                            run(
                                blas,
                                p.m,
                                p.n,
                                p.k,
                                c.as_mut_ptr(),
                                p.n as isize,
                                av,
                                bv,
                                false,
                                Threads::One,
                            )
                        };
                    }
                }
                if round > 0 {
                    best[i][kind] = best[i][kind].min(t.elapsed().as_secs_f64());
                }
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
    let blas = gemm_backend().blas_for(ProductKind::of(a, threads));
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
    // Blocks of whole 16-float rows or columns, along the longer side of the output. (Columns
    // for every output 256 or more wide measured even: RESULTS.md, Zen 4, 2026-12-07.)
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
            // Above the parallel threshold: split by rows (the longer side), then by columns.
            (300, 200, 150),
            (150, 300, 160),
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
        let row_major_a = View::rows(a.as_ptr(), k as isize);
        let transposed_a = View::columns(a.as_ptr(), m as isize);
        let bv = View::rows(b.as_ptr(), n as isize);
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

    /// A correct `cblas_sgemm` (row-major, either operand transposed) that counts its calls.
    const COUNTING_SGEMM: &str = "static int calls = 0;\n\
        int fake_calls(void) { return calls; }\n\
        void cblas_sgemm(int l, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,\n\
                         const float *b, int ldb, float beta, float *c, int ldc) {\n\
          calls++;\n\
          for (int i = 0; i < m; i++) for (int j = 0; j < n; j++) {\n\
            float s = 0.0f;\n\
            for (int p = 0; p < k; p++)\n\
              s += (ta == 112 ? a[p * lda + i] : a[i * lda + p]) * (tb == 112 ? b[j * ldb + p] : b[p * ldb + j]);\n\
            c[i * ldc + j] = alpha * s + (beta == 0.0f ? 0.0f : beta * c[i * ldc + j]);\n\
          }\n\
        }\n";

    /// `path@kinds` sends only those kinds to the library (each product's kind decided by its
    /// left operand's layout and threading), and `setting` writes the same value back; a plain
    /// path sends every kind; an `@` not followed by kind names is part of the path.
    #[test]
    fn a_setting_with_kinds_routes_only_those_kinds_to_the_library() {
        let dir = std::env::temp_dir().join(format!("flava-routed-blas-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let lib = fake_blas(&dir, "counting", COUNTING_SGEMM);
        let path = lib.to_string_lossy().to_string();
        let value = format!("{path}@weight-gradient,per-head");
        let backend = GemmBackend::from_setting(Some(&value));
        let blas = backend.blas().expect("the counting library opens and agrees");
        assert_eq!(backend.setting(), value);
        assert!(
            backend.describe().contains("for weight-gradient, per-head products"),
            "{}",
            backend.describe()
        );
        // SAFETY: `fake_calls` takes nothing and returns an int.
        let calls = || unsafe {
            blas._lib
                .get::<unsafe extern "C" fn() -> i32>(b"fake_calls\0")
                .expect("fake_calls")()
        };

        // Below the parallel threshold, so each product is one call.
        let (m, n, k) = (24, 20, 16);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 - 2.0).collect();
        let row_major = View::rows(a.as_ptr(), k as isize);
        let transposed = View::columns(a.as_ptr(), m as isize);
        let bv = View::rows(b.as_ptr(), n as isize);
        let mut want = vec![0f32; m * n];
        let mut got = vec![0f32; m * n];
        for (av, threads, kind, to_blas) in [
            (row_major, Threads::All, ProductKind::Forward, false),
            (transposed, Threads::All, ProductKind::WeightGradient, true),
            (row_major, Threads::One, ProductKind::PerHead, true),
        ] {
            assert_eq!(ProductKind::of(av, threads), kind);
            let before = calls();
            // SAFETY: a holds m·k values in either layout, b k·n, the outputs m·n.
            unsafe {
                run(
                    backend.blas_for(kind),
                    m,
                    n,
                    k,
                    got.as_mut_ptr(),
                    n as isize,
                    av,
                    bv,
                    false,
                    threads,
                );
                gemm_crate(m, n, k, want.as_mut_ptr(), n as isize, av, bv, false);
            }
            assert_eq!(calls() - before, i32::from(to_blas), "{kind:?}");
            assert_eq!(got, want, "{kind:?}: small integers multiply exactly either way");
        }

        let every = GemmBackend::from_setting(Some(&path));
        assert_eq!(every.setting(), path);
        assert!(ProductKind::ALL.into_iter().all(|k| every.blas_for(k).is_some()));
        assert_eq!(split_kinds("/home/a@b/libblas.so"), ("/home/a@b/libblas.so", [true; 3]));
        assert_eq!(
            split_kinds("/x/libblas.so@forward,backward"),
            ("/x/libblas.so@forward,backward", [true; 3])
        );
        assert_eq!(
            split_kinds("/x/libblas.so@forward"),
            ("/x/libblas.so", [true, false, false])
        );
        // Damaged values (an `sgemm.txt` cut short, or edited): no kind list, or no path, is a
        // path that does not open, and the gemm crate does every product.
        assert_eq!(split_kinds("/x/libblas.so@"), ("/x/libblas.so@", [true; 3]));
        assert_eq!(split_kinds("@forward"), ("@forward", [true; 3]));
        assert_eq!(
            split_kinds("/x/libblas.so@forward,"),
            ("/x/libblas.so@forward,", [true; 3])
        );
        for damaged in [
            format!("{path}@"),
            "@per-head".to_string(),
            format!("{path}@weight-grad"),
        ] {
            let backend = GemmBackend::from_setting(Some(&damaged));
            assert!(backend.blas().is_none(), "{damaged}: {}", backend.describe());
            assert!(
                backend.describe().contains("could not be opened"),
                "{}",
                backend.describe()
            );
            assert_eq!(backend.setting(), "off");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    /// `auto`'s rule: a kind goes to a library only when it is 10% faster than the gemm crate on
    /// it, and of two libraries the one that saves more wins.
    #[test]
    fn the_probe_routes_each_kind_to_a_library_only_where_it_is_clearly_faster() {
        let gemm = [1.0, 1.0, 1.0];
        assert_eq!(choose(&[gemm]), None);
        assert_eq!(choose(&[gemm, [0.93, 0.99, 1.2]]), None, "within the margin, or slower");
        assert_eq!(choose(&[gemm, [1.0, 0.8, 0.85]]), Some((1, [false, true, true])));
        assert_eq!(
            choose(&[gemm, [1.0, 0.8, 1.0], [0.5, 1.1, 1.0]]),
            Some((2, [true, false, false])),
            "half the forward time saves more than a fifth of the weight gradients'"
        );
        let times = probe(&[None]);
        assert!(times[0].iter().all(|t| t.is_finite() && *t > 0.0), "{times:?}");
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
