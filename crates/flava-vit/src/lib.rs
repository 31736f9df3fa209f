//! # flava-vit
//!
//! The transformer building blocks of FLAVA (Singh et al., CVPR 2022) in Burn:
//!
//! - [`encoder`]: the pre-LN transformer layer and encoder shared by the image, text and
//!   multimodal towers (HF `FlavaLayer`/`FlavaEncoder`), and the tanh [`encoder::Pooler`];
//! - [`vit`]: the ViT image encoder (HF `FlavaImageModel`) with mask-token blending and
//!   bicubic position-embedding interpolation;
//! - [`kernels`]: exact GELU and row-wise softmax cross-entropy for the flex backend, vectorised,
//!   each with its own backward pass;
//! - [`limits`]: the resource limits every reader checks before it allocates; [`atomic`]:
//!   files and directories written whole or not at all;
//! - [`config`]: `FlavaImageConfig`, read from an HF `config.json` as it is;
//! - [`weights`]: reading PyTorch/safetensors checkpoints, applying them by HF key, and writing
//!   HF-compatible safetensors.
//!
//! ```no_run
//! use burn::prelude::*;
//! use flava_vit::{FlavaImageConfig, ImageModel};
//! let device = Device::flex();
//! let cfg = FlavaImageConfig { image_size: 32, patch_size: 8, hidden_size: 64,
//!     num_hidden_layers: 2, num_attention_heads: 4, intermediate_size: 128, ..Default::default() };
//! let model = ImageModel::new(&cfg, &device);
//! let out = model.forward(Tensor::zeros([1, 3, 32, 32], &device), None, false, false);
//! assert_eq!(out.last_hidden_state.dims(), [1, 17, 64]);
//! ```

pub mod atomic;
pub mod config;
pub mod encoder;
pub mod kernels;
pub mod limits;
pub mod norm;
pub mod vit;
pub mod weights;

pub use config::{FlavaImageConfig, InvalidConfig};
pub use encoder::{Encoder, EncoderConfig, EncoderOutput, HiddenAct, Layer, Pooler, Positions};
pub use limits::LimitError;
pub use norm::LayerNorm;
pub use vit::ImageModel;
pub use weights::{load_module, module_state_dict, LoadReport, RawTensor, StateDict, WeightsError};
