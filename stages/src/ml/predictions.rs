//! The `predictions` artifact: what a model says about every image of a set.
//!
//! ```text
//! predictions/
//!   predictions.safetensors   f32 `probs` [N, C] (rows sum to 1) and f32 `logits` [N, C]
//!                             (after flip TTA and any logit adjustment; probs = softmax(logits))
//!   classes.json              ["class name", ...]   the C columns, in order
//!   ids.json                  ["image id", ...]     the N rows, in the image set's order
//! ```
//!
//! Ensembles, pseudo-labelling and evaluation read it through [`Predictions::read`].

use std::path::Path;

use fgflow_engine::StageError;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

pub const TENSORS_FILE: &str = "predictions.safetensors";
pub const CLASSES_FILE: &str = "classes.json";
pub const IDS_FILE: &str = "ids.json";

#[derive(Debug, Clone, PartialEq)]
pub struct Predictions {
    pub ids: Vec<String>,
    pub classes: Vec<String>,
    /// Row-major [N, C].
    pub probs: Vec<f32>,
    /// Row-major [N, C].
    pub logits: Vec<f32>,
}

impl Predictions {
    /// Probabilities are the row-wise softmax of `logits`.
    pub fn from_logits(ids: Vec<String>, classes: Vec<String>, logits: Vec<f32>) -> Self {
        let c = classes.len().max(1);
        let mut probs = logits.clone();
        for row in probs.chunks_mut(c) {
            softmax_in_place(row);
        }
        Predictions { ids, classes, probs, logits }
    }

    pub fn n(&self) -> usize {
        self.ids.len()
    }

    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    pub fn probs_row(&self, i: usize) -> &[f32] {
        let c = self.num_classes();
        &self.probs[i * c..(i + 1) * c]
    }

    /// Arg-max class index of every row (ties: the lowest index).
    pub fn top1(&self) -> Vec<usize> {
        (0..self.n()).map(|i| argmax(self.probs_row(i))).collect()
    }

    pub fn write(&self, dir: &Path) -> Result<(), StageError> {
        let (n, c) = (self.n(), self.num_classes());
        if self.probs.len() != n * c || self.logits.len() != n * c {
            return Err(StageError::failed(format!("predictions: {} probs and {} logits for {n}x{c}", self.probs.len(), self.logits.len())));
        }
        std::fs::create_dir_all(dir).map_err(|e| StageError::io(format!("creating {}", dir.display()), e))?;
        let probs = f32_bytes(&self.probs);
        let logits = f32_bytes(&self.logits);
        let view = |bytes| TensorView::new(Dtype::F32, vec![n, c], bytes).map_err(StageError::failed);
        let tensors = vec![("logits", view(&logits)?), ("probs", view(&probs)?)];
        let path = dir.join(TENSORS_FILE);
        safetensors::serialize_to_file(tensors, None, &path).map_err(|e| StageError::failed(format!("writing {}: {e}", path.display())))?;
        write_json(&dir.join(CLASSES_FILE), &self.classes)?;
        write_json(&dir.join(IDS_FILE), &self.ids)
    }

    pub fn read(dir: &Path) -> Result<Self, StageError> {
        let classes: Vec<String> = read_json(&dir.join(CLASSES_FILE))?;
        let ids: Vec<String> = read_json(&dir.join(IDS_FILE))?;
        let path = dir.join(TENSORS_FILE);
        let bytes = std::fs::read(&path).map_err(|e| StageError::io(format!("reading {}", path.display()), e))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| StageError::failed(format!("{}: {e}", path.display())))?;
        let (n, c) = (ids.len(), classes.len());
        let get = |name: &str| -> Result<Vec<f32>, StageError> {
            let t = st.tensor(name).map_err(|e| StageError::failed(format!("{}: tensor `{name}`: {e}", path.display())))?;
            if t.dtype() != Dtype::F32 || t.shape() != [n, c] {
                return Err(StageError::failed(format!(
                    "{}: `{name}` is {:?} {:?}, expected F32 [{n}, {c}] (from ids.json and classes.json)",
                    path.display(),
                    t.dtype(),
                    t.shape()
                )));
            }
            Ok(t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        };
        Ok(Predictions { probs: get("probs")?, logits: get("logits")?, ids, classes })
    }
}

pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (j, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = j;
        }
    }
    best
}

pub fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    if sum > 0.0 {
        for v in row.iter_mut() {
            *v = (*v as f64 / sum) as f32;
        }
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub(crate) fn write_json<T: serde::Serialize + ?Sized>(path: &Path, value: &T) -> Result<(), StageError> {
    let text = serde_json::to_string_pretty(value).map_err(StageError::failed)?;
    std::fs::write(path, text).map_err(|e| StageError::io(format!("writing {}", path.display()), e))
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StageError> {
    let text = std::fs::read_to_string(path).map_err(|e| StageError::io(format!("reading {}", path.display()), e))?;
    serde_json::from_str(&text).map_err(|e| StageError::failed(format!("{}: {e}", path.display())))
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_softmax() {
        let dir = tempfile::tempdir().unwrap();
        let p = Predictions::from_logits(
            vec!["a".into(), "b".into()],
            vec!["x".into(), "y".into(), "z".into()],
            vec![0.0, 0.0, 0.0, 1.0, 3.0, 2.0],
        );
        assert!((p.probs[0] - 1.0 / 3.0).abs() < 1e-6);
        assert_eq!(p.top1(), vec![0, 1]);
        p.write(dir.path()).unwrap();
        assert_eq!(Predictions::read(dir.path()).unwrap(), p);
    }
}
