//! # flava-objectives
//!
//! FLAVA's pretraining heads and its six losses: global contrastive, masked multimodal image and
//! text, image-text matching, masked image and masked language modelling, computed only on masked
//! positions and equal in value and gradient to HF `FlavaForPreTraining`. The heads and losses
//! arrive with the objectives issue; the crate exists now so that the workspace layout is final.
