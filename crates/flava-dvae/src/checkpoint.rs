//! Loading and saving codebooks: HF `facebook/flava-image-codebook` directories (`blocks.…`), the
//! codebook inside a FLAVA pretraining checkpoint (`image_codebook.blocks.…`), and DALL-E's
//! original key names (`blocks.group_1.block_1.res_path.conv_1.w`).

use std::path::{Path, PathBuf};

use burn::prelude::*;
use flava_vit::weights::{load_module, module_state_dict, write_atomic, LoadReport, StateDict, WeightsError};

use crate::config::FlavaImageCodebookConfig;
use crate::encoder::ImageCodebook;

/// Errors loading a codebook.
#[derive(Debug, thiserror::Error)]
pub enum CodebookError {
    /// A file is missing or the configuration is unreadable.
    #[error("{path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// Why (names the field).
        message: String,
    },
    /// The weights are unreadable or do not fit.
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

/// DALL-E's names → HF's: `group_k.` → `group_k.group.`, `res_path.` → `res_path.path.`,
/// trailing `.w`/`.b` → `.weight`/`.bias`.
pub fn dalle_to_hf_key(k: &str) -> String {
    let mut k = k.to_string();
    if !k.contains(".group.") {
        for g in 1..=4 {
            k = k.replace(&format!("group_{g}."), &format!("group_{g}.group."));
        }
    }
    if !k.contains("res_path.path.") {
        k = k.replace("res_path.", "res_path.path.");
    }
    if let Some(s) = k.strip_suffix(".w") {
        k = format!("{s}.weight");
    } else if let Some(s) = k.strip_suffix(".b") {
        k = format!("{s}.bias");
    }
    k
}

/// HF `group.block_{i}` ↔ our `group.{i-1}`.
fn hf_to_module(k: &str) -> String {
    match k.find(".group.block_") {
        Some(i) => {
            let rest = &k[i + ".group.block_".len()..];
            let (n, tail) = rest.split_at(rest.find('.').unwrap_or(rest.len()));
            match n.parse::<usize>() {
                Ok(n) if n >= 1 => format!("{}.group.{}{tail}", &k[..i], n - 1),
                _ => k.to_string(),
            }
        }
        None => k.to_string(),
    }
}

fn module_to_hf(k: &str) -> String {
    match k.find(".group.") {
        Some(i) => {
            let rest = &k[i + ".group.".len()..];
            let (n, tail) = rest.split_at(rest.find('.').unwrap_or(rest.len()));
            match n.parse::<usize>() {
                Ok(n) => format!("{}.group.block_{}{tail}", &k[..i], n + 1),
                Err(_) => k.to_string(),
            }
        }
        None => k.to_string(),
    }
}

/// Brings any accepted layout to HF codebook keys (`blocks.…`).
pub fn codebook_keys(sd: &StateDict) -> StateDict {
    let base = if sd.has_prefix("image_codebook.") {
        sd.strip_prefix("image_codebook.")
    } else {
        sd.clone()
    };
    let base = if base.has_prefix("model.blocks.") {
        base.strip_prefix("model.")
    } else {
        base
    };
    StateDict {
        tensors: base
            .tensors
            .into_iter()
            .map(|(k, v)| (dalle_to_hf_key(&k), v))
            .collect(),
        ignored: base.ignored,
    }
}

/// Builds a codebook from `cfg` and loads `sd` (any accepted layout) into it.
pub fn codebook_from_state_dict(
    cfg: &FlavaImageCodebookConfig,
    sd: &StateDict,
    device: &Device,
) -> Result<(ImageCodebook, LoadReport), CodebookError> {
    let hf = codebook_keys(sd);
    let renamed = StateDict {
        tensors: hf.tensors.into_iter().map(|(k, v)| (hf_to_module(&k), v)).collect(),
        ignored: hf.ignored,
    };
    let mut model = ImageCodebook::new(cfg, device);
    let mut report = load_module(&mut model, &renamed, false).map_err(|e| match e {
        WeightsError::ShapeMismatch { key, expected, found } => WeightsError::ShapeMismatch {
            key: module_to_hf(&key),
            expected,
            found,
        },
        WeightsError::Missing { keys } => WeightsError::Missing {
            keys: keys.iter().map(|k| module_to_hf(k)).collect(),
        },
        other => other,
    })?;
    for v in [&mut report.applied, &mut report.missing, &mut report.unexpected] {
        *v = v.iter().map(|k| module_to_hf(k)).collect();
    }
    Ok((model, report))
}

fn read_json_config(path: &Path, sub: Option<&str>) -> Result<FlavaImageCodebookConfig, CodebookError> {
    let err = |message: String| CodebookError::Config {
        path: path.into(),
        message,
    };
    let json = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&json).map_err(|e| err(e.to_string()))?;
    let part = match sub.and_then(|s| v.get(s)) {
        Some(p) => p.clone(),
        None => v,
    };
    let cfg: FlavaImageCodebookConfig =
        serde_path_to_error::deserialize(part).map_err(|e| err(format!("field `{}`: {}", e.path(), e.inner())))?;
    cfg.validate().map_err(|e| err(e.to_string()))?;
    Ok(cfg)
}

/// Loads a codebook from a directory: an HF codebook (`config.json` of model_type
/// `flava_image_codebook`) or a full FLAVA directory (its `image_codebook_config` and
/// `image_codebook.` weights). A weights file path with DALL-E names needs `config` instead.
pub fn load_codebook(
    dir: impl AsRef<Path>,
    device: &Device,
) -> Result<(ImageCodebook, FlavaImageCodebookConfig, LoadReport), CodebookError> {
    let dir = dir.as_ref();
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        return Err(CodebookError::Config {
            path: cfg_path,
            message: "missing (a codebook or FLAVA directory needs config.json)".into(),
        });
    }
    let cfg = read_json_config(&cfg_path, Some("image_codebook_config"))?;
    let weights = ["model.safetensors", "pytorch_model.bin"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
        .ok_or_else(|| CodebookError::Config {
            path: dir.into(),
            message: "no model.safetensors or pytorch_model.bin".into(),
        })?;
    let sd = StateDict::from_file(weights)?;
    let (model, report) = codebook_from_state_dict(&cfg, &sd, device)?;
    Ok((model, cfg, report))
}

/// Writes an HF-compatible codebook directory (`config.json` + `model.safetensors`, keys
/// `blocks.…`), loadable by `FlavaImageCodebook.from_pretrained` and by FLAVA's trainer.
pub fn save_codebook(
    model: &ImageCodebook,
    cfg: &FlavaImageCodebookConfig,
    dir: impl AsRef<Path>,
) -> Result<(), CodebookError> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| CodebookError::Config {
        path: dir.into(),
        message: e.to_string(),
    })?;
    let mut v = serde_json::to_value(cfg).expect("config serialises");
    v["model_type"] = "flava_image_codebook".into();
    v["architectures"] = serde_json::json!(["FlavaImageCodebook"]);
    write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&v).expect("json").as_bytes(),
    )?;
    codebook_state_dict(model, "").save_safetensors(dir.join("model.safetensors"))?;
    Ok(())
}

/// The codebook's weights under HF names (`{prefix}blocks.…`), PyTorch layout; with prefix
/// `image_codebook.` they fit inside a `FlavaForPreTraining` checkpoint.
pub fn codebook_state_dict(model: &ImageCodebook, prefix: &str) -> StateDict {
    let sd = module_state_dict(model, "", &[]);
    StateDict {
        tensors: sd
            .tensors
            .into_iter()
            .map(|(k, v)| (format!("{prefix}{}", module_to_hf(&k)), v))
            .collect(),
        ignored: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_mappings() {
        assert_eq!(
            dalle_to_hf_key("blocks.group_2.block_1.res_path.conv_3.w"),
            "blocks.group_2.group.block_1.res_path.path.conv_3.weight"
        );
        assert_eq!(dalle_to_hf_key("blocks.input.b"), "blocks.input.bias");
        let hf = "blocks.group_3.group.block_2.res_path.path.conv_1.weight";
        assert_eq!(hf_to_module(hf), "blocks.group_3.group.1.res_path.path.conv_1.weight");
        assert_eq!(module_to_hf(&hf_to_module(hf)), hf);
    }
}
