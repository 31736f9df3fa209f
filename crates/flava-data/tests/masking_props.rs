//! Property tests of the BEiT block masking generator.

use flava_data::{BlockMaskConfig, BlockMaskGenerator};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn config() -> impl Strategy<Value = BlockMaskConfig> {
    (
        2usize..20,
        2usize..20,
        0.1f64..1.0,
        any::<prop::sample::Index>(),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(h, w, min_aspect, budget, min)| {
            let budget = budget.index(h * w + 1);
            BlockMaskConfig {
                height: h,
                width: w,
                num_masking_patches: budget,
                min_num_patches: min.index(budget.max(1)) + 1,
                max_num_patches: None,
                min_aspect,
                max_aspect: None,
            }
        })
}

proptest! {
    #[test]
    fn never_exceeds_the_budget_and_stays_in_the_grid(cfg in config(), seed in any::<u64>()) {
        let g = BlockMaskGenerator::new(cfg.clone()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for _ in 0..5 {
            let m = g.generate(&mut rng);
            prop_assert_eq!(m.len(), cfg.height * cfg.width);
            prop_assert!(m.iter().filter(|&&b| b).count() <= cfg.num_masking_patches);
        }
    }

    #[test]
    fn same_seed_same_mask(cfg in config(), seed in any::<u64>()) {
        let g = BlockMaskGenerator::new(cfg).unwrap();
        let a = g.generate(&mut ChaCha8Rng::seed_from_u64(seed));
        let b = g.generate(&mut ChaCha8Rng::seed_from_u64(seed));
        prop_assert_eq!(a, b);
    }
}
