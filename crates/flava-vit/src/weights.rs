//! Checkpoint files: read HF/PyTorch state dicts (`.safetensors`, `pytorch_model.bin`) into a
//! [`StateDict`], apply one to a Burn module by key, and write HF-compatible safetensors.
//!
//! The PyTorch `.bin` format (zip + pickle) is read by `burn-store`'s pickle parser, which only
//! interprets the opcodes that describe tensors: loading never executes code from the file.
//! Integer buffers (`position_ids`) are dropped and listed in [`StateDict::ignored`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use burn::module::Module;
#[cfg(feature = "pytorch")]
use burn::store::pytorch_reader;
use burn::store::{bridge, ApplyError, BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter};
use burn::tensor::DType;

/// Errors from reading, applying or writing checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// A PyTorch file, in a build without the `pytorch` feature.
    #[error("{0}: this build reads safetensors only; enable the `pytorch` feature of flava-vit (or flava-fusion), or convert the file with `flava convert`")]
    PytorchDisabled(PathBuf),
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a valid checkpoint (truncated, corrupt, or an unknown format).
    #[error("{path}: not a valid {format} checkpoint: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// `safetensors` or `PyTorch`.
        format: &'static str,
        /// What the parser said.
        message: String,
    },
    /// A tensor in the file has a different shape than the model expects.
    #[error("shape mismatch for `{key}`: the model expects {expected:?}, the checkpoint has {found:?}")]
    ShapeMismatch {
        /// Checkpoint key (HF name).
        key: String,
        /// The model's shape, in PyTorch layout.
        expected: Vec<usize>,
        /// The file's shape.
        found: Vec<usize>,
    },
    /// Tensors the model needs are absent.
    #[error("{} weights missing from the checkpoint, e.g. {}", .keys.len(), .keys.iter().take(5).cloned().collect::<Vec<_>>().join(", "))]
    Missing {
        /// HF names of the missing tensors.
        keys: Vec<String>,
    },
    /// Tensors the model needs are in the file, but not as floats.
    #[error("{} weights have a non-float dtype in the checkpoint (the model needs floats), e.g. {}", .keys.len(), .keys.iter().take(5).cloned().collect::<Vec<_>>().join(", "))]
    NotFloat {
        /// HF names of those tensors.
        keys: Vec<String>,
    },
    /// A tensor is larger than [`crate::limits::Limits::max_tensor_elements`].
    #[error("tensor `{key}` has shape {shape:?} ({elements} elements), over the limit of {limit} (limits.max_tensor_elements)")]
    TooLarge {
        /// Checkpoint key.
        key: String,
        /// Its declared shape.
        shape: Vec<usize>,
        /// Elements it declares.
        elements: u128,
        /// The limit.
        limit: u64,
    },
    /// Any other problem while applying a tensor.
    #[error("cannot load `{key}`: {message}")]
    Apply {
        /// Checkpoint key.
        key: String,
        /// Details.
        message: String,
    },
}

/// A float tensor from a checkpoint, in PyTorch layout, as f32.
#[derive(Debug, Clone)]
pub struct RawTensor {
    /// Shape as stored (PyTorch layout; `[]` for scalars).
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f32>,
}

impl RawTensor {
    /// Wraps values and a shape; panics if they disagree (a programming error, not user input).
    pub fn new(data: Vec<f32>, shape: Vec<usize>) -> Self {
        assert_eq!(data.len(), shape.iter().product::<usize>(), "data/shape mismatch");
        Self { shape, data }
    }
}

/// Named float tensors of a checkpoint, keyed by their HF names.
#[derive(Debug, Clone, Default)]
pub struct StateDict {
    /// The float tensors.
    pub tensors: BTreeMap<String, RawTensor>,
    /// Keys of non-float tensors that were skipped (e.g. `…embeddings.position_ids`).
    pub ignored: Vec<String>,
}

fn to_f32(data: burn::tensor::TensorData) -> Option<RawTensor> {
    let shape = data.shape().to_vec();
    match data.dtype() {
        DType::F32 | DType::F64 | DType::F16 | DType::BF16 | DType::Flex32 => {
            let data = data.convert::<f32>().try_into_vec::<f32>().ok()?;
            Some(RawTensor { shape, data })
        }
        _ => None,
    }
}

/// `Err` when a declared shape exceeds the tensor-size limit (checked before any allocation).
pub fn check_tensor_size(key: &str, shape: &[usize]) -> Result<(), WeightsError> {
    let limit = crate::limits::current().max_tensor_elements;
    let elements = shape.iter().fold(1u128, |a, &d| a.saturating_mul(d as u128));
    if elements > limit as u128 {
        return Err(WeightsError::TooLarge {
            key: key.into(),
            shape: shape.to_vec(),
            elements,
            limit,
        });
    }
    Ok(())
}

/// Runs a parser that might panic on hostile input and turns a panic into an error.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err("the parser failed on malformed data".to_string()))
}

impl StateDict {
    /// Reads `.safetensors`, or a PyTorch `.bin`/`.pt`/`.pth` (zip or legacy pickle), by extension.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, WeightsError> {
        let path = path.as_ref();
        match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => Self::from_safetensors(path),
            _ => Self::from_pytorch(path),
        }
    }

    /// Reads a safetensors file.
    pub fn from_safetensors(path: &Path) -> Result<Self, WeightsError> {
        let bytes = std::fs::read(path).map_err(|source| WeightsError::Io {
            path: path.into(),
            source,
        })?;
        Self::from_safetensors_bytes(&bytes).map_err(|message| WeightsError::Corrupt {
            path: path.into(),
            format: "safetensors",
            message,
        })
    }

    /// Parses safetensors bytes.
    pub fn from_safetensors_bytes(bytes: &[u8]) -> Result<Self, String> {
        guarded(|| {
            let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
            let mut out = StateDict::default();
            for (name, view) in st.tensors() {
                let shape = view.shape().to_vec();
                check_tensor_size(&name, &shape).map_err(|e| e.to_string())?;
                let dtype = match view.dtype() {
                    safetensors::Dtype::F32 => DType::F32,
                    safetensors::Dtype::F64 => DType::F64,
                    safetensors::Dtype::F16 => DType::F16,
                    safetensors::Dtype::BF16 => DType::BF16,
                    _ => {
                        out.ignored.push(name);
                        continue;
                    }
                };
                let data = burn::tensor::TensorData::from_bytes_vec(view.data().to_vec(), shape, dtype);
                match to_f32(data) {
                    Some(t) => {
                        out.tensors.insert(name, t);
                    }
                    None => out.ignored.push(name),
                }
            }
            Ok(out)
        })
    }

    /// Reads a PyTorch checkpoint without executing any pickled code. A top-level
    /// `state_dict`/`model` entry (training checkpoints) is unwrapped. Needs the `pytorch`
    /// feature; without it, an error that says so.
    #[cfg(not(feature = "pytorch"))]
    pub fn from_pytorch(path: &Path) -> Result<Self, WeightsError> {
        Err(WeightsError::PytorchDisabled(path.into()))
    }

    /// Reads a PyTorch checkpoint without executing any pickled code. A top-level
    /// `state_dict`/`model` entry (training checkpoints) is unwrapped.
    #[cfg(feature = "pytorch")]
    pub fn from_pytorch(path: &Path) -> Result<Self, WeightsError> {
        if let Err(source) = std::fs::metadata(path) {
            return Err(WeightsError::Io {
                path: path.into(),
                source,
            });
        }
        let corrupt = |message: String| WeightsError::Corrupt {
            path: path.into(),
            format: "PyTorch",
            message,
        };
        let tensors = guarded(|| {
            let reader = pytorch_reader::PytorchReader::new(path).map_err(|e| e.to_string())?;
            Ok(reader.into_tensors())
        })
        .map_err(corrupt)?;
        let mut out = StateDict::default();
        for (name, t) in tensors {
            if let Err(WeightsError::TooLarge {
                shape, elements, limit, ..
            }) = check_tensor_size(&name, t.shape())
            {
                return Err(corrupt(format!(
                    "tensor `{name}` declares shape {shape:?} ({elements} elements), over the limit of {limit} (limits.max_tensor_elements)"
                )));
            }
            let data = guarded(|| bridge::into_data(bridge::from_pytorch(t)).map_err(|e| e.to_string()))
                .map_err(|m| corrupt(format!("tensor `{name}`: {m}")))?;
            match to_f32(data) {
                Some(t) => {
                    out.tensors.insert(name, t);
                }
                None => out.ignored.push(name),
            }
        }
        for wrapper in ["state_dict.", "model."] {
            if !out.tensors.is_empty() && out.tensors.keys().all(|k| k.starts_with(wrapper)) {
                out = out.strip_prefix(wrapper);
            }
        }
        out.ignored.sort();
        Ok(out)
    }

    /// Keeps the keys that start with `prefix`, with the prefix removed.
    pub fn strip_prefix(&self, prefix: &str) -> StateDict {
        StateDict {
            tensors: self
                .tensors
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(prefix).map(|k| (k.to_string(), v.clone())))
                .collect(),
            ignored: self.ignored.clone(),
        }
    }

    /// Whether any key starts with `prefix`.
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.tensors.keys().any(|k| k.starts_with(prefix))
    }

    /// Looks a tensor up by HF name.
    pub fn get(&self, key: &str) -> Option<&RawTensor> {
        self.tensors.get(key)
    }

    /// Writes the tensors as an HF-compatible `model.safetensors` (`format = pt` metadata),
    /// atomically: a temporary file in the same directory, then a rename.
    pub fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<(), WeightsError> {
        let path = path.as_ref();
        let bytes: BTreeMap<&String, Vec<u8>> = self
            .tensors
            .iter()
            .map(|(k, t)| (k, t.data.iter().flat_map(|v| v.to_le_bytes()).collect()))
            .collect();
        let views = self
            .tensors
            .iter()
            .map(|(k, t)| {
                let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, t.shape.clone(), &bytes[k])
                    .expect("sizes are consistent by construction");
                (k.clone(), view)
            })
            .collect::<Vec<_>>();
        let metadata = Some(std::collections::HashMap::from([(
            "format".to_string(),
            "pt".to_string(),
        )]));
        let out = safetensors::serialize(views, metadata).map_err(|e| WeightsError::Corrupt {
            path: path.into(),
            format: "safetensors",
            message: e.to_string(),
        })?;
        write_atomic(path, &out)
    }
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename; [`crate::atomic`]), so
/// a crash never leaves a half-written file under the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WeightsError> {
    crate::atomic::write_file(path, bytes).map_err(|source| WeightsError::Io {
        path: path.into(),
        source,
    })
}

/// Which checkpoint keys were used, missing or left over when loading a module.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// HF keys loaded into the model.
    pub applied: Vec<String>,
    /// HF keys the model has but the checkpoint lacks.
    pub missing: Vec<String>,
    /// Checkpoint keys the model does not use (e.g. pretraining heads when loading `FlavaModel`).
    pub unexpected: Vec<String>,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} tensors loaded", self.applied.len())?;
        if !self.missing.is_empty() {
            write!(f, ", {} missing ({})", self.missing.len(), preview(&self.missing))?;
        }
        if !self.unexpected.is_empty() {
            write!(f, ", {} unused ({})", self.unexpected.len(), preview(&self.unexpected))?;
        }
        Ok(())
    }
}

fn preview(keys: &[String]) -> String {
    let mut s = keys.iter().take(3).cloned().collect::<Vec<_>>().join(", ");
    if keys.len() > 3 {
        s.push_str(", …");
    }
    s
}

/// Maps between HF checkpoint names and Burn module paths. The module trees mirror the HF key
/// tree, so only these differ: `LayerNorm` sub-modules (Rust field `layer_norm`); LayerNorm
/// `weight`/`bias` (Burn `gamma`/`beta`) are renamed by burn-store's adapters.
fn hf_to_burn_path(key: &str) -> String {
    key.replace(".LayerNorm.", ".layer_norm.")
}

fn burn_to_hf_path(path: &str) -> String {
    path.replace(".layer_norm.", ".LayerNorm.")
}

/// Loads the tensors of `sd` into `module`, matching HF names to the module's field paths.
///
/// Linear weights are transposed ([out, in] → [in, out]) and LayerNorm weight/bias renamed by
/// burn-store's `PyTorchToBurnAdapter`; 0-d tensors (`logit_scale`) fill `[1]` parameters.
/// A shape mismatch is an error naming the key and both shapes. Missing keys are an error unless
/// `allow_missing`; unexpected keys are only reported.
pub fn load_module<M: Module + ModuleSnapshot>(
    module: &mut M,
    sd: &StateDict,
    allow_missing: bool,
) -> Result<LoadReport, WeightsError> {
    let tensors = sd
        .tensors
        .iter()
        .map(|(k, t)| {
            let shape = if t.shape.is_empty() { vec![1] } else { t.shape.clone() };
            let data = burn::tensor::TensorData::new(t.data.clone(), shape);
            bridge::from_data(data, hf_to_burn_path(k), None)
        })
        .collect::<Vec<_>>();
    let result = module.apply(tensors, None, Some(Box::new(PyTorchToBurnAdapter)), false);
    if let Some(err) = result.errors.into_iter().next() {
        return Err(match err {
            ApplyError::ShapeMismatch { path, expected, found } => {
                let key = burn_to_hf_path(&path);
                // Report both shapes in PyTorch layout: Linear weights are stored transposed.
                let (mut expected, mut found) = (expected.to_vec(), found.to_vec());
                let file_shape = sd.get(&key).map(|t| t.shape.clone());
                if let Some(fs) = file_shape {
                    if fs.len() == 2 && found.len() == 2 && fs != found {
                        expected.reverse();
                    }
                    found = fs;
                }
                WeightsError::ShapeMismatch { key, expected, found }
            }
            other => {
                let (key, message) = match &other {
                    ApplyError::DTypeMismatch { path, .. }
                    | ApplyError::AdapterError { path, .. }
                    | ApplyError::LoadError { path, .. } => (burn_to_hf_path(path), other.to_string()),
                    ApplyError::ShapeMismatch { .. } => unreachable!(),
                };
                WeightsError::Apply { key, message }
            }
        });
    }
    let report = LoadReport {
        applied: result.applied.iter().map(|p| burn_to_hf_path(p)).collect(),
        missing: result.missing.iter().map(|(p, _)| burn_to_hf_path(p)).collect(),
        unexpected: result.unused.iter().map(|p| burn_to_hf_path(p)).collect(),
    };
    if !allow_missing && !report.missing.is_empty() {
        let not_float: Vec<String> = report
            .missing
            .iter()
            .filter(|k| sd.ignored.contains(k))
            .cloned()
            .collect();
        if !not_float.is_empty() {
            return Err(WeightsError::NotFloat { keys: not_float });
        }
        return Err(WeightsError::Missing { keys: report.missing });
    }
    Ok(report)
}

/// Collects a module's parameters under HF names in PyTorch layout (Linear weights [out, in],
/// LayerNorm `weight`/`bias`). `scalars` lists keys stored as 0-d tensors by HF (`logit_scale`).
pub fn module_state_dict<M: Module + ModuleSnapshot>(module: &M, prefix: &str, scalars: &[&str]) -> StateDict {
    let mut out = StateDict::default();
    for t in module.collect(None, Some(Box::new(BurnToPyTorchAdapter)), true) {
        let name = format!("{prefix}{}", burn_to_hf_path(&t.name));
        let data = bridge::into_data(t).expect("in-memory module tensors are readable");
        let mut raw = to_f32(data).expect("module parameters are float");
        if scalars.contains(&name.as_str()) && raw.data.len() == 1 {
            raw.shape.clear();
        }
        out.tensors.insert(name, raw);
    }
    out
}

/// Integer tensors by name: shape and values.
pub type IntTensors = BTreeMap<String, (Vec<usize>, Vec<i64>)>;

/// Integer tensors of a safetensors file (token ids, masks, labels), as i64 with their shapes.
/// Float tensors are left out; use [`StateDict`] for those.
pub fn read_int_tensors(path: impl AsRef<Path>) -> Result<IntTensors, WeightsError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| WeightsError::Io {
        path: path.into(),
        source,
    })?;
    let corrupt = |message: String| WeightsError::Corrupt {
        path: path.into(),
        format: "safetensors",
        message,
    };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let vals: Vec<i64> = match view.dtype() {
            safetensors::Dtype::I64 => d
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            safetensors::Dtype::I32 => d
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            safetensors::Dtype::U8 | safetensors::Dtype::BOOL => d.iter().map(|&v| v as i64).collect(),
            _ => continue,
        };
        out.insert(name, (view.shape().to_vec(), vals));
    }
    Ok(out)
}
