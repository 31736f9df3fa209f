//! The frozen codebook's forward pass on the CPU (flex): every conv as im2col + one gemm per
//! image (images in parallel), the ReLU before a conv folded into its im2col, and the 2×2 max-pool as one
//! pass. Burn's flex conv takes a slow path for the codebook's narrow layers (3, 4 or 16
//! channels): measured on the default run's codebook (hidden 16, 64-px images, batch 32), the
//! 7×7 input conv ran at 12 GFLOP/s and the 16→4 3×3 conv at 7, and the whole tokenisation took
//! 160 ms, about as long as the FLAVA forward pass it feeds. Inference only: the dVAE's own
//! training keeps Burn's differentiable convs.

use burn::nn::conv::Conv2d;
use burn::prelude::*;
use rayon::prelude::*;

use crate::encoder::{EncoderBlock, EncoderGroup, ImageCodebook};

pub(crate) use flava_vit::kernels::on_flex_f32;

/// Host copy of `x`'s values (row-major).
fn values(x: Tensor<4>) -> Vec<f32> {
    x.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 tensor data")
}

/// Columns of one image [c, h, w] for a k×k kernel, stride 1, padding (k−1)/2: `out` is
/// [c·k·k, h·w], row `(ci·k + ky)·k + kx` holding the input shifted by (ky − p, kx − p), zero
/// outside; `relu` applies max(·, 0) on the way.
fn im2col(x: &[f32], c: usize, h: usize, w: usize, k: usize, relu: bool, out: &mut [f32]) {
    let p = (k - 1) / 2;
    let hw = h * w;
    for ci in 0..c {
        let plane = &x[ci * hw..(ci + 1) * hw];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut out[((ci * k + ky) * k + kx) * hw..][..hw];
                for y in 0..h {
                    let dst = &mut row[y * w..(y + 1) * w];
                    let sy = y + ky;
                    if sy < p || sy - p >= h {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &plane[(sy - p) * w..(sy - p + 1) * w];
                    // dst[x] = src[x + kx − p] where that is inside the row.
                    let lo = p.saturating_sub(kx);
                    let hi = (w + p).saturating_sub(kx).min(w);
                    dst[..lo].fill(0.0);
                    dst[hi.max(lo)..].fill(0.0);
                    let (dst, src) = (&mut dst[lo..hi.max(lo)], &src[lo + kx - p..]);
                    let src = &src[..dst.len()];
                    if relu {
                        dst.iter_mut().zip(src).for_each(|(d, &s)| *d = s.max(0.0));
                    } else {
                        dst.copy_from_slice(src);
                    }
                }
            }
        }
    }
}

/// `conv(relu?(x))` for a stride-1 conv with "same" padding: x [n, c, h, w] → [n, o, h, w]. One
/// task per image: its columns [c·k·k, h·w] (a 1×1 conv without ReLU reads the image itself),
/// then `W [o, c·k·k] · columns` straight into the image's output planes, then the bias.
fn conv(conv: &Conv2d, x: Tensor<4>, relu: bool) -> Tensor<4> {
    let [n, c, h, w] = x.dims();
    let [o, _, k, _] = conv.weight.dims();
    let device = x.device();
    let (ckk, hw) = (c * k * k, h * w);
    let weight = values(conv.weight.val().detach());
    let bias = conv.bias.as_ref().map(|b| {
        let b = b.val().detach();
        values(b.reshape([1, 1, 1, o]))
    });
    let data = values(x);
    let mut out = vec![0f32; n * o * hw];
    // Images in parallel, each gemm on one thread; a batch smaller than the pool splits gemms.
    let parallelism = if n >= rayon::current_num_threads() {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(0)
    };
    out.par_chunks_mut(o * hw)
        .enumerate()
        .for_each_init(Vec::new, |cols: &mut Vec<f32>, (i, out)| {
            let img = &data[i * c * hw..(i + 1) * c * hw];
            let rhs: &[f32] = if k == 1 && !relu {
                img
            } else {
                cols.resize(ckk * hw, 0.0);
                if k == 1 {
                    cols.iter_mut().zip(img).for_each(|(d, &s)| *d = s.max(0.0));
                } else {
                    im2col(img, c, h, w, k, relu, cols);
                }
                cols
            };
            assert_eq!(rhs.len(), ckk * hw);
            assert_eq!(weight.len(), o * ckk);
            // SAFETY: `out` is [o, hw], `weight` [o, ckk] and `rhs` [ckk, hw], all row-major and
            // of those lengths (checked above), so every access gemm makes with these strides is
            // in bounds; `out` is written only (read_dst = false) and aliases neither input.
            unsafe {
                gemm::gemm(
                    o,
                    hw,
                    ckk,
                    out.as_mut_ptr(),
                    1,
                    hw as isize,
                    false,
                    weight.as_ptr(),
                    1,
                    ckk as isize,
                    rhs.as_ptr(),
                    1,
                    hw as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
            if let Some(b) = &bias {
                for (plane, &b) in out.chunks_exact_mut(hw).zip(b) {
                    plane.iter_mut().for_each(|v| *v += b);
                }
            }
        });
    Tensor::from_data(TensorData::new(out, [n, o, h, w]), &device)
}

/// 2×2 max-pool, stride 2 (h and w even, as the codebook's are): [n, c, h, w] → [n, c, h/2, w/2].
fn max_pool_2x2(x: Tensor<4>) -> Tensor<4> {
    let [n, c, h, w] = x.dims();
    let device = x.device();
    let data = values(x);
    let (h2, w2) = (h / 2, w / 2);
    let mut out = vec![0f32; n * c * h2 * w2];
    out.par_chunks_mut(h2 * w2).enumerate().for_each(|(plane, o)| {
        let src = &data[plane * h * w..(plane + 1) * h * w];
        for y in 0..h2 {
            let (r0, r1) = (&src[2 * y * w..(2 * y + 1) * w], &src[(2 * y + 1) * w..(2 * y + 2) * w]);
            for (x, o) in o[y * w2..(y + 1) * w2].iter_mut().enumerate() {
                // `max` would pass over NaN; a NaN pixel stays NaN, as in Burn's pool.
                let v = [r0[2 * x], r0[2 * x + 1], r1[2 * x], r1[2 * x + 1]];
                *o = if v.iter().any(|v| v.is_nan()) {
                    f32::NAN
                } else {
                    v.iter().copied().fold(f32::NEG_INFINITY, f32::max)
                };
            }
        }
    });
    Tensor::from_data(TensorData::new(out, [n, c, h2, w2]), &device)
}

fn block(b: &EncoderBlock, x: Tensor<4>) -> Tensor<4> {
    let p = &b.res_path.path;
    let r = conv(&p.conv_1, x.clone(), true);
    let r = conv(&p.conv_2, r, true);
    let r = conv(&p.conv_3, r, true);
    let r = conv(&p.conv_4, r, true);
    let id = match &b.id_path {
        Some(c) => conv(c, x, false),
        None => x,
    };
    id + r * b.post_gain
}

fn group(g: &EncoderGroup, mut x: Tensor<4>) -> Tensor<4> {
    for b in &g.group {
        x = block(b, x);
    }
    if g.pool {
        x = max_pool_2x2(x);
    }
    x
}

/// [`ImageCodebook::forward`] without autodiff, by the kernels above: [B, 3, H, W] → logits
/// [B, vocab, H/8, W/8].
pub(crate) fn forward(cb: &ImageCodebook, x: Tensor<4>) -> Tensor<4> {
    let b = &cb.blocks;
    let x = conv(&b.input, x.detach(), false);
    let x = group(&b.group_4, group(&b.group_3, group(&b.group_2, group(&b.group_1, x))));
    conv(&b.output.conv, x, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FlavaImageCodebookConfig;

    /// The im2col forward equals Burn's conv forward on random codebooks (hidden 16 with one
    /// block per group, as the default run's; hidden 8 with two blocks), 32-px images with
    /// values outside [0, 1] too, on a plain and an autodiff flex device. Tolerance 1e-5 relative
    /// to the logits' scale (f32 sums in another order); the tokens agree.
    #[test]
    fn frozen_forward_matches_burns_convs() {
        for (hidden, blocks) in [(16, 1), (8, 2)] {
            let cfg = FlavaImageCodebookConfig {
                hidden_size: hidden,
                num_blocks_per_group: blocks,
                vocab_size: 64,
                ..Default::default()
            };
            for device in [Device::flex(), Device::flex().autodiff()] {
                device.seed(7);
                let cb = ImageCodebook::new(&cfg, &device);
                let x = Tensor::<4>::random([3, 3, 32, 32], burn::tensor::Distribution::Uniform(-0.5, 1.5), &device);
                let want = cb.forward(x.clone());
                let got = forward(&cb, x.clone());
                assert_eq!(got.dims(), want.dims());
                let scale = want.clone().abs().max().into_scalar::<f32>();
                let err = (got - want).abs().max().into_scalar::<f32>();
                assert!(
                    err <= 1e-5 * scale,
                    "hidden {hidden}, {blocks} blocks: max error {err} at scale {scale}"
                );
                let t: Vec<i64> = cb
                    .tokens(x.clone())
                    .into_data()
                    .convert::<i64>()
                    .try_into_vec()
                    .unwrap();
                let t0: Vec<i64> = cb
                    .forward(x)
                    .argmax(1)
                    .reshape([3, 16])
                    .into_data()
                    .convert::<i64>()
                    .try_into_vec()
                    .unwrap();
                assert_eq!(t, t0);
            }
        }
    }

    /// im2col of a 3×3 kernel on a 2×3 image, written out by hand (zero padding, ReLU).
    #[test]
    fn im2col_shifts_with_zero_padding() {
        let x = [1.0, -2.0, 3.0, 4.0, 5.0, -6.0];
        let mut out = vec![9f32; 9 * 6];
        im2col(&x, 1, 2, 3, 3, true, &mut out);
        // Row (ky, kx) = (1, 1) is the image itself (ReLU applied).
        assert_eq!(&out[4 * 6..5 * 6], &[1.0, 0.0, 3.0, 4.0, 5.0, 0.0]);
        // (0, 0): shifted down-right by one, zero where it leaves the image.
        assert_eq!(&out[0..6], &[0.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
        // (2, 2): shifted up-left.
        assert_eq!(&out[8 * 6..9 * 6], &[5.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }
}
