//! Exact GELU, `0.5·x·(1 + erf(x/√2))`, and its gradient, element-wise over slices.

use super::math::{erf, exp_nonpositive};

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
// 1/√(2π)
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

#[inline(always)]
pub(super) fn gelu_one(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * FRAC_1_SQRT_2))
}

#[inline(always)]
pub(super) fn gelu_grad_one(x: f32, g: f32) -> f32 {
    let cdf = 0.5 * (1.0 + erf(x * FRAC_1_SQRT_2));
    let pdf = FRAC_1_SQRT_2PI * exp_nonpositive(-0.5 * x * x);
    g * (cdf + x * pdf)
}

multiversion!(pub(super) gelu_slice(x: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(x) {
        *o = gelu_one(x);
    }
});

multiversion!(pub(super) gelu_in_place(x: &mut [f32]) {
    for x in x.iter_mut() {
        *x = gelu_one(*x);
    }
});

multiversion!(pub(super) gelu_grad_slice(x: &[f32], g: &[f32], out: &mut [f32]) {
    for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
        *o = gelu_grad_one(x, g);
    }
});
