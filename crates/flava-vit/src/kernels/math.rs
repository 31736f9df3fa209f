//! erf and exp in f32 written so that the compiler vectorises them (no table lookups, no
//! branches), for the GELU and softmax kernels.

// erf(x) ≈ x·P(x²)/Q(x²) on [-4, 4] (±1 outside in f32): the rational approximation of Eigen's
// `generic_fast_erf_float` (also TensorFlow's and XLA's).
const ERF_ALPHA: [f32; 7] = [
    -2.726_142_3e-10,
    2.770_681_4e-8,
    -2.101_024e-6,
    -5.692_506_4e-5,
    -7.349_906e-4,
    -2.954_600_1e-3,
    -1.609_603_3e-2,
];
const ERF_BETA: [f32; 5] = [
    -1.456_607_2e-5,
    -2.133_740_6e-4,
    -1.682_827e-3,
    -7.373_329_2e-3,
    -1.426_474e-2,
];

#[inline(always)]
pub(super) fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = ERF_ALPHA[0];
    for &a in &ERF_ALPHA[1..] {
        p = p.mul_add(x2, a);
    }
    let mut q = ERF_BETA[0];
    for &b in &ERF_BETA[1..] {
        q = q.mul_add(x2, b);
    }
    x * p / q
}

/// `exp(t)` for `t ≤ 0` (t below -87 gives exp(-87), ~1e-38): Cody-Waite reduction to
/// `2^n·exp(r)`, |r| ≤ ln2/2, and a degree-7 Taylor polynomial (relative error ~1e-8 before
/// rounding).
#[inline(always)]
pub(super) fn exp_nonpositive(t: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5·2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let t = t.max(-87.0);
    let y = t * LOG2E + ROUND;
    let n = y - ROUND;
    let r = t - n * LN2_HI - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p * r + c;
    }
    // `y` is ROUND + n exactly (ulp 1 there, |n| ≤ 126), so its bits minus ROUND's are n: 2^n
    // from integer lanes. (`n as i32` is a saturating conversion that does not vectorise: it
    // went lane by lane and made the GELU gradient 4x the GELU.)
    let n_int = (y.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    p * scale
}
