//! Loading and saving HF-format FLAVA directories.
//!
//! A directory holds `config.json` and `model.safetensors` or `pytorch_model.bin` (the official
//! `facebook/flava-full` ships only the `.bin`). Accepted key layouts:
//! `FlavaForPreTraining` (`flava.image_model.…`, heads and codebook beside), `FlavaModel`
//! (`image_model.…`), and the standalone towers (`embeddings.…`, `encoder.…`) for
//! [`load_image_model`]/[`load_text_model`]. Saving writes `config.json` + `model.safetensors`
//! with `FlavaModel` keys, which transformers' `FlavaModel.from_pretrained` loads.

use std::path::{Path, PathBuf};

use burn::prelude::*;
use flava_text::{FlavaTextConfig, TextModel};
use flava_vit::weights::{load_module, module_state_dict, LoadReport, StateDict, WeightsError};
use flava_vit::{FlavaImageConfig, ImageModel};

use crate::config::{ConfigError, FlavaConfig};
use crate::model::FlavaModel;

/// Errors loading or saving a model directory.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A required file is absent.
    #[error("{dir}: no {what} found (looked for {candidates})")]
    MissingFile {
        /// The directory.
        dir: PathBuf,
        /// What was looked for.
        what: &'static str,
        /// File names tried.
        candidates: String,
    },
    /// The configuration is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The weights are unreadable or do not fit the model.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// Writing failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Weight file names tried, in order.
pub const WEIGHT_FILES: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];

/// Finds the weights file of an HF directory (or accepts a file path directly).
pub fn find_weights(path: &Path) -> Result<PathBuf, CheckpointError> {
    if path.is_file() {
        return Ok(path.into());
    }
    WEIGHT_FILES
        .iter()
        .map(|f| path.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| CheckpointError::MissingFile {
            dir: path.into(),
            what: "weights",
            candidates: WEIGHT_FILES.join(" or "),
        })
}

/// Reads `dir/config.json` as a [`FlavaConfig`].
pub fn read_config(dir: &Path) -> Result<FlavaConfig, CheckpointError> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(CheckpointError::MissingFile {
            dir: dir.into(),
            what: "configuration",
            candidates: "config.json".into(),
        });
    }
    Ok(FlavaConfig::from_file(path)?)
}

/// Brings any accepted layout to `FlavaModel` keys (no `flava.` prefix).
pub fn flava_model_keys(sd: &StateDict) -> StateDict {
    if sd.has_prefix("flava.") {
        // FlavaForPreTraining: the model lives under `flava.`; heads and codebook stay unused.
        let mut out = sd.strip_prefix("flava.");
        for (k, v) in &sd.tensors {
            if !k.starts_with("flava.") {
                out.tensors.insert(k.clone(), v.clone());
            }
        }
        out
    } else {
        sd.clone()
    }
}

/// A model loaded from a directory, with the key report.
#[derive(Debug)]
pub struct Pretrained<M> {
    /// The model.
    pub model: M,
    /// Its configuration.
    pub config: FlavaConfig,
    /// Which keys were loaded, missing or unused.
    pub report: LoadReport,
}

/// Builds a model from `config` and loads `sd` into it; missing keys are an error.
pub fn flava_model_from_state_dict(
    config: &FlavaConfig,
    sd: &StateDict,
    device: &Device,
) -> Result<(FlavaModel, LoadReport), CheckpointError> {
    let mut model = FlavaModel::new(config, device);
    let report = load_module(&mut model, &flava_model_keys(sd), false)?;
    Ok((model, report))
}

/// Loads a [`FlavaModel`] from an HF directory (`FlavaForPreTraining` or `FlavaModel` keys).
pub fn load_flava_model(dir: impl AsRef<Path>, device: &Device) -> Result<Pretrained<FlavaModel>, CheckpointError> {
    let dir = dir.as_ref();
    let config = read_config(dir)?;
    let sd = StateDict::from_file(find_weights(dir)?)?;
    let (model, report) = flava_model_from_state_dict(&config, &sd, device)?;
    Ok(Pretrained { model, config, report })
}

/// The keys of one tower, whichever layout the file uses: `flava.{tower}.`, `{tower}.` or none.
fn tower_keys(sd: &StateDict, tower: &str) -> StateDict {
    for prefix in [format!("flava.{tower}."), format!("{tower}.")] {
        if sd.has_prefix(&prefix) {
            return sd.strip_prefix(&prefix);
        }
    }
    sd.clone()
}

/// Reads a tower's configuration: a standalone config.json, or the sub-config of a FLAVA one.
fn tower_config<T: serde::de::DeserializeOwned>(dir: &Path, sub: &str) -> Result<T, CheckpointError> {
    let path = dir.join("config.json");
    let json = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
        path: path.clone(),
        source,
    })?;
    let value: serde_json::Value = serde_json::from_str(&json).map_err(|e| ConfigError::Field {
        path: path.clone(),
        field: ".".into(),
        message: e.to_string(),
    })?;
    let part = value.get(sub).cloned().unwrap_or(value);
    serde_path_to_error::deserialize(part).map_err(|e| {
        CheckpointError::Config(ConfigError::Field {
            path,
            field: format!("{sub}.{}", e.path()),
            message: e.inner().to_string(),
        })
    })
}

/// Loads a standalone image tower (`FlavaImageModel`, or the image part of a FLAVA directory).
pub fn load_image_model(
    dir: impl AsRef<Path>,
    device: &Device,
) -> Result<(ImageModel, FlavaImageConfig, LoadReport), CheckpointError> {
    let dir = dir.as_ref();
    let cfg: FlavaImageConfig = tower_config(dir, "image_config")?;
    cfg.validate().map_err(ConfigError::from)?;
    let sd = tower_keys(&StateDict::from_file(find_weights(dir)?)?, "image_model");
    let mut model = ImageModel::new(&cfg, device);
    let report = load_module(&mut model, &sd, false)?;
    Ok((model, cfg, report))
}

/// Loads a standalone text tower (`FlavaTextModel`, or the text part of a FLAVA directory).
pub fn load_text_model(
    dir: impl AsRef<Path>,
    device: &Device,
) -> Result<(TextModel, FlavaTextConfig, LoadReport), CheckpointError> {
    let dir = dir.as_ref();
    let cfg: FlavaTextConfig = tower_config(dir, "text_config")?;
    cfg.validate().map_err(ConfigError::from)?;
    let sd = tower_keys(&StateDict::from_file(find_weights(dir)?)?, "text_model");
    let mut model = TextModel::new(&cfg, device);
    let report = load_module(&mut model, &sd, false)?;
    Ok((model, cfg, report))
}

/// The model's parameters under `FlavaModel` keys, in PyTorch layout (`logit_scale` 0-d).
pub fn flava_model_state_dict(model: &FlavaModel) -> StateDict {
    module_state_dict(model, "", &["logit_scale"])
}

/// Writes an HF model directory: `config.json` (with `architectures: [architecture]`) and
/// `model.safetensors` holding `sd`, creating `dir`.
pub fn save_model_dir(
    sd: &StateDict,
    config: &FlavaConfig,
    architecture: &str,
    dir: impl AsRef<Path>,
) -> Result<(), CheckpointError> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Io {
        path: dir.into(),
        source,
    })?;
    let cfg_path = dir.join("config.json");
    flava_vit::weights::write_atomic(&cfg_path, config.to_json_pretty(architecture).as_bytes())?;
    sd.save_safetensors(dir.join("model.safetensors"))?;
    Ok(())
}

/// Writes `config.json` and `model.safetensors` (FlavaModel keys) into `dir`, creating it.
pub fn save_flava_model(
    model: &FlavaModel,
    config: &FlavaConfig,
    dir: impl AsRef<Path>,
) -> Result<(), CheckpointError> {
    save_model_dir(&flava_model_state_dict(model), config, "FlavaModel", dir)
}

/// Converts a checkpoint file (`.bin`, `.pt` or `.safetensors`) to safetensors, keeping every
/// float tensor and key as they are. Returns how many tensors were written and the keys of
/// non-float buffers that were dropped.
pub fn convert_to_safetensors(input: &Path, output: &Path) -> Result<(usize, Vec<String>), CheckpointError> {
    let sd = StateDict::from_file(input)?;
    if sd.tensors.is_empty() {
        // Writing it would replace a good `model.safetensors` with an empty one.
        return Err(CheckpointError::Weights(WeightsError::Corrupt {
            path: input.into(),
            format: "PyTorch",
            message: format!(
                "holds no float tensors{}; nothing written",
                if sd.ignored.is_empty() {
                    String::new()
                } else {
                    format!(" (only {})", sd.ignored.join(", "))
                }
            ),
        }));
    }
    sd.save_safetensors(output)?;
    Ok((sd.tensors.len(), sd.ignored.clone()))
}
