//! AdamW's update as one pass over each parameter on the CPU (flex): the moments, the bias
//! corrections and the parameter step computed element by element in one loop, in the same f32
//! operations and order as Burn's `AdamW` (so the results are the same bits, and its state type
//! and checkpoint records are kept). Burn's AdamW makes about a dozen tensor passes per
//! parameter, each allocating: 2–4x PyTorch's fused AdamW on the training steps of
//! `benches/compare_pytorch.py`. Other devices use Burn's AdamW itself.

use burn::backend::DispatchDevice;
use burn::optim::{AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, Optimizer};
use burn::prelude::*;
use burn::tensor::DType;
use rayon::prelude::*;

/// Adam with decoupled weight decay done elsewhere (`weight_decay` 0 here; see
/// [`crate::optim::apply_weight_decay`]), fused on flex.
#[derive(Clone)]
pub struct FusedAdamW {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    /// Burn's AdamW with the same settings, for devices other than flex.
    fallback: AdamW,
}

impl FusedAdamW {
    /// AdamW with these betas and epsilon and no weight decay.
    pub fn new(beta_1: f32, beta_2: f32, epsilon: f32) -> Self {
        let fallback = AdamWConfig::new()
            .with_beta_1(beta_1)
            .with_beta_2(beta_2)
            .with_epsilon(epsilon)
            .with_weight_decay(0.0)
            .build();
        Self {
            beta_1,
            beta_2,
            epsilon,
            fallback,
        }
    }
}

fn on_flex_f32<const D: usize>(t: &Tensor<D>) -> bool {
    matches!(t.device().without_autodiff().as_dispatch(), DispatchDevice::Flex(_)) && t.dtype() == DType::F32
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().expect("f32 tensor data")
}

/// Elements per rayon task.
const CHUNK: usize = 1 << 14;

impl Optimizer for FusedAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        if !(on_flex_f32(&tensor) && on_flex_f32(&grad)) {
            return self.fallback.step(lr, tensor, grad, state);
        }
        let device = tensor.device();
        let shape = tensor.shape();
        let mut theta = values(tensor);
        let g = values(grad);
        let (b1, b2, eps) = (self.beta_1, self.beta_2, self.epsilon);
        let (f1, f2) = (1.0 - b1, 1.0 - b2);
        let (time, mut m, mut v, fresh) = match state {
            Some(s) => (
                s.momentum.time + 1,
                values(s.momentum.moment_1),
                values(s.momentum.moment_2),
                false,
            ),
            None => (1, vec![0f32; g.len()], vec![0f32; g.len()], true),
        };
        // As Burn: bias corrections in f32 with `powi`, the learning rate as an f32 scalar.
        let c1 = 1f32 - b1.powi(time as i32);
        let c2 = 1f32 - b2.powi(time as i32);
        let lr = lr as f32;
        theta
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((theta, m), v), g)| {
                for (((p, m), v), &g) in theta.iter_mut().zip(m).zip(v).zip(g) {
                    if fresh {
                        *m = g * f1;
                        *v = (g * g) * f2;
                    } else {
                        *m = *m * b1 + g * f1;
                        *v = *v * b2 + (g * g) * f2;
                    }
                    let delta = (*m / c1) / ((*v / c2).sqrt() + eps);
                    *p -= delta * lr;
                }
            });
        let tensor = |x: Vec<f32>| Tensor::<D>::from_data(TensorData::new(x, shape.clone()), &device);
        let momentum = AdaptiveMomentumState {
            time,
            moment_1: tensor(m),
            moment_2: tensor(v),
            max_moment_2: None,
        };
        (tensor(theta), Some(AdamWState { momentum }))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        <AdamW as Optimizer>::to_device(state, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Five steps of the fused update give the same bits as Burn's AdamW (parameters and both
    /// moments), from no state and through the state, on 40 000 values (several rayon chunks).
    #[test]
    fn fused_adamw_matches_burns_bit_for_bit() {
        let device = Device::flex();
        let n = 40_000;
        let fused = FusedAdamW::new(0.9, 0.999, 1e-8);
        let burn = AdamWConfig::new()
            .with_beta_1(0.9)
            .with_beta_2(0.999)
            .with_epsilon(1e-8)
            .with_weight_decay(0.0)
            .build();
        let init: Vec<f32> = (0..n)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.2)
            .collect();
        let mut p1 = Tensor::<1>::from_data(TensorData::new(init.clone(), [n]), &device);
        let mut p2 = p1.clone();
        let (mut s1, mut s2) = (None, None);
        for step in 0..5 {
            let g: Vec<f32> = (0..n)
                .map(|i| (((i * 31 + step * 17) % 997) as f32 / 997.0 - 0.5) * 10f32.powi(step - 3))
                .collect();
            let g = Tensor::<1>::from_data(TensorData::new(g, [n]), &device);
            let lr = 1e-3 * (step + 1) as f64;
            (p1, s1) = fused.step(lr, p1, g.clone(), s1);
            (p2, s2) = burn.step(lr, p2, g, s2);
            let bits = |t: &Tensor<1>| -> Vec<u32> { values(t.clone()).iter().map(|v| v.to_bits()).collect() };
            assert_eq!(bits(&p1), bits(&p2), "parameters after step {step}");
            let (a, b) = (s1.as_ref().unwrap(), s2.as_ref().unwrap());
            assert_eq!(a.momentum.time, b.momentum.time);
            assert_eq!(bits(&a.momentum.moment_1), bits(&b.momentum.moment_1), "first moment");
            assert_eq!(bits(&a.momentum.moment_2), bits(&b.momentum.moment_2), "second moment");
        }
        assert!(
            values(p1).iter().zip(&init).any(|(a, b)| a != b),
            "the parameters moved"
        );
    }
}
