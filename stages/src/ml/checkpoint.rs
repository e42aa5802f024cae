//! Model artifacts on disk, device-free, so a model trained on one backend loads on
//! any other:
//!
//! ```text
//! model/                       (a `model` artifact; also each checkpoint)
//!   model.safetensors          f32 tensors named by module path (burn-store)
//!   model.json                 ModelConfig: sizes, classes, image shape, class counts
//! checkpoints/                 (a `checkpoints` artifact)
//!   index.json                 [{"epoch": 9, "dir": "epoch-0009", "val_acc": 0.71}, ...] oldest first
//!   epoch-0009/model.{safetensors,json}
//! ```
//!
//! Save the inference model (`model.valid()` for an autodiff one): `valid()`
//! synchronises BatchNorm running statistics, which otherwise lag one update.

use std::path::{Path, PathBuf};

use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::backend::Backend;
use fgflow_engine::StageError;
use serde::{Deserialize, Serialize};

use super::model::{Classifier, MODEL_FORMAT, ModelConfig};

pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "model.json";
pub const INDEX_FILE: &str = "index.json";

/// Write weights and config into `dir` (created if needed).
pub fn save_model<B: Backend>(model: &Classifier<B>, config: &ModelConfig, dir: &Path) -> Result<(), StageError> {
    std::fs::create_dir_all(dir).map_err(|e| StageError::io(format!("creating {}", dir.display()), e))?;
    let json = serde_json::to_string_pretty(config).map_err(StageError::failed)?;
    std::fs::write(dir.join(CONFIG_FILE), json).map_err(|e| StageError::io(format!("writing {}", dir.join(CONFIG_FILE).display()), e))?;
    let path = dir.join(WEIGHTS_FILE);
    // burn's default metadata is a HashMap of three entries, serialised in a random
    // order: identical weights would give different bytes (and cache digests). One
    // entry has only one order.
    let mut store = SafetensorsStore::from_file(&path)
        .overwrite(true)
        .clear_metadata()
        .metadata("fgflow_model_format", MODEL_FORMAT.to_string());
    model.save_into(&mut store).map_err(|e| StageError::failed(format!("saving weights to {}: {e}", path.display())))
}

/// Read `model.json` of a model directory.
pub fn read_config(dir: &Path) -> Result<ModelConfig, StageError> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| StageError::io(format!("reading {}", path.display()), e))?;
    let config: ModelConfig =
        serde_json::from_str(&text).map_err(|e| StageError::failed(format!("{}: not a model config: {e}", path.display())))?;
    if config.format != MODEL_FORMAT {
        return Err(StageError::failed(format!("{}: model format {} (this fgflow reads {MODEL_FORMAT})", path.display(), config.format)));
    }
    config.check().map_err(|e| StageError::failed(format!("{}: {e}", path.display())))?;
    Ok(config)
}

/// Rebuild the classifier described by `model.json` and load its weights.
pub fn load_model<B: Backend>(dir: &Path, device: &B::Device) -> Result<(Classifier<B>, ModelConfig), StageError> {
    let config = read_config(dir)?;
    let mut model = config.init::<B>(0, device);
    let path = dir.join(WEIGHTS_FILE);
    if !path.is_file() {
        return Err(StageError::failed(format!("{} is missing", path.display())));
    }
    let mut store = SafetensorsStore::from_file(&path);
    let result = model
        .load_from(&mut store)
        .map_err(|e| StageError::failed(format!("loading weights from {}: {e}", path.display())))?;
    if !result.errors.is_empty() || !result.missing.is_empty() {
        return Err(StageError::failed(format!(
            "{}: weights do not match model.json (missing {:?}, errors {:?})",
            path.display(),
            result.missing.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            result.errors
        )));
    }
    Ok((model, config))
}

/// One entry of `checkpoints/index.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointEntry {
    pub epoch: usize,
    pub dir: String,
    pub val_acc: Option<f64>,
}

pub fn checkpoint_dir_name(epoch: usize) -> String {
    format!("epoch-{epoch:04}")
}

pub fn write_index(root: &Path, entries: &[CheckpointEntry]) -> Result<(), StageError> {
    let json = serde_json::to_string_pretty(entries).map_err(StageError::failed)?;
    std::fs::write(root.join(INDEX_FILE), json).map_err(|e| StageError::io(format!("writing {}", root.join(INDEX_FILE).display()), e))
}

/// The checkpoints of a `checkpoints` artifact, oldest first, with their directories.
pub fn read_index(root: &Path) -> Result<Vec<(CheckpointEntry, PathBuf)>, StageError> {
    let path = root.join(INDEX_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| StageError::io(format!("reading {}", path.display()), e))?;
    let entries: Vec<CheckpointEntry> =
        serde_json::from_str(&text).map_err(|e| StageError::failed(format!("{}: not a checkpoint index: {e}", path.display())))?;
    Ok(entries.into_iter().map(|e| { let d = root.join(&e.dir); (e, d) }).collect())
}
