//! Loading pretrained weights from a safetensors file into any module by tensor name
//! (the module's field path, `blocks.3.depthwise.bn.gamma`), with a report of what was
//! loaded, what the file lacks (left as initialised: "new") and what the module does
//! not use (the ImageNet classifier, typically). A tensor whose shape differs is an
//! error naming it and both shapes: a wrong file must not train silently from half its
//! weights.
//!
//! Written with the `safetensors` crate and a `ModuleMapper` rather than burn-store's
//! `load_from`, so the report and the error message are ours and the file may hold
//! tensors the module has no place for.
//!
//! Checkpoints of other layouts come through a name map (`load_pretrained_named`:
//! Swin-V2 reads timm's names with `swinv2::timm_name`) or a conversion of the tensors
//! read (`read_tensors` + `load_tensors`: the ViT splits timm's fused `qkv`, transposes
//! torch's linear weights and resamples `pos_embed`, `vit::adapt_checkpoint`). Which
//! backbone tensors may be missing from a file is the backbone's rule
//! (`model::Backbone::load_pretrained`).

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use fgflow_engine::StageError;
use burn_store::pytorch::{PytorchError, PytorchReader};
use safetensors::{Dtype, SafeTensors};

/// What a load did, by tensor name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    pub loaded: Vec<String>,
    /// In the module, not in the file: kept as initialised.
    pub new: Vec<String>,
    /// In the file, not in the module.
    pub unused: Vec<String>,
}

impl LoadReport {
    pub fn summary(&self) -> String {
        let list = |v: &[String]| if v.is_empty() { "none".to_string() } else { v.join(", ") };
        format!("{} tensors loaded; new (initialised here): {}; unused from the file: {}", self.loaded.len(), list(&self.new), list(&self.unused))
    }
}

/// A tensor of a weights file: its shape and, when it is a float tensor, its values as
/// f32 (half and double precision are converted).
#[derive(Debug, Clone, PartialEq)]
pub struct FileTensor {
    pub shape: Vec<usize>,
    /// `Err(dtype)` for a tensor of another type (integer buffers such as BatchNorm's
    /// `num_batches_tracked`): an error only if the module uses it.
    pub values: Result<Vec<f32>, String>,
}

/// The tensors of a weights file by name.
pub type FileTensors = BTreeMap<String, FileTensor>;

/// Read every tensor of a weights file: safetensors, or a PyTorch checkpoint written by
/// `torch.save` (its zip format, PyTorch 1.6 and later), whose `state_dict` entry is
/// taken when it has one (MMPretrain and mmengine keep the weights there, beside `meta`).
/// The format is recognised by content, not by the file's extension.
pub fn read_tensors(path: &Path) -> Result<FileTensors, StageError> {
    let mut head = [0u8; 9];
    let n = std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .map_err(|e| StageError::io(format!("reading {}", path.display()), e))?;
    let head = &head[..n];
    // safetensors: an 8-byte header length, then the JSON header.
    let safetensors = head.len() == 9 && head[8] == b'{';
    // torch.save: a zip archive, or (before PyTorch 1.6) a pickle, protocol 2.
    if !safetensors && head.starts_with(b"PK\x03\x04") {
        read_torch(path)
    } else if !safetensors && head.starts_with(&[0x80, 0x02]) {
        Err(StageError::failed(format!(
            "{}: a PyTorch checkpoint in the legacy format (torch.save before PyTorch 1.6), which fgflow does not read: \
             nothing in it tells a cut-short file from a whole one. Re-save it with a current PyTorch \
             (`torch.save(torch.load(f), f)`) or convert it to safetensors",
            path.display()
        )))
    } else {
        read_safetensors(path)
    }
}

fn read_safetensors(path: &Path) -> Result<FileTensors, StageError> {
    let bytes = std::fs::read(path).map_err(|e| StageError::io(format!("reading {}", path.display()), e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| StageError::failed(format!("{}: not a safetensors file ({e}) nor a PyTorch checkpoint", path.display())))?;
    Ok(st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = if view.dtype() == Dtype::F32 {
                Ok(view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
            } else {
                Err(format!("{:?}", view.dtype()))
            };
            (name, FileTensor { shape: view.shape().to_vec(), values })
        })
        .collect())
}

/// Through burn-store's PyTorch reader, which follows the stored strides of each
/// tensor (views over permuted storage read as written). That reader fills a tensor
/// whose bytes are missing with zeros rather than failing, so the archive is checked
/// first: every entry read to its end, which verifies its CRC-32 (a file cut short or
/// damaged fails here, naming the entry). The legacy format (before PyTorch 1.6) has no
/// such check to lean on and is refused.
fn read_torch(path: &Path) -> Result<FileTensors, StageError> {
    let fail = |e: &dyn std::fmt::Display| StageError::failed(format!("{}: not a readable PyTorch checkpoint: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| StageError::io(format!("reading {}", path.display()), e))?;
    let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| fail(&e))?;
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(|e| fail(&e))?;
        let name = entry.name().to_string();
        std::io::copy(&mut entry, &mut std::io::sink()).map_err(|e| fail(&format!("entry `{name}`: {e}")))?;
    }
    let reader = match PytorchReader::with_top_level_key(path, "state_dict") {
        Ok(r) => r,
        Err(PytorchError::KeyNotFound(_)) => PytorchReader::new(path).map_err(|e| fail(&e))?,
        Err(e) => return Err(fail(&e)),
    };
    reader
        .into_tensors()
        .into_iter()
        .map(|(name, snap)| {
            let shape: Vec<usize> = snap.shape.iter().copied().collect();
            let values = if snap.dtype.is_float() {
                let data = snap.to_data().map_err(|e| fail(&format!("tensor `{name}`: {e:?}")))?;
                Ok(data.convert::<f32>().into_vec::<f32>().map_err(|e| fail(&format!("tensor `{name}`: {e:?}")))?)
            } else {
                Err(format!("{:?}", snap.dtype))
            };
            Ok((name, FileTensor { shape, values }))
        })
        .collect()
}

/// Load every tensor of `module` that `path` names. Errors on an unreadable file, a
/// non-f32 tensor the module would use, or a shape mismatch.
pub fn load_pretrained<B: Backend, M: Module<B>>(module: M, path: &Path) -> Result<(M, LoadReport), StageError> {
    load_pretrained_named(module, path, &|name: &str| name.to_string())
}

/// [`load_pretrained`] where the file names a parameter `file_name(field path)` (timm's
/// `norm1.weight` for our `norm1.gamma`); the report uses the file's names.
pub fn load_pretrained_named<B: Backend, M: Module<B>>(module: M, path: &Path, file_name: &dyn Fn(&str) -> String) -> Result<(M, LoadReport), StageError> {
    let file = read_tensors(path)?;
    load_tensors(module, &file, file_name).map_err(|e| StageError::failed(format!("{}: {e}", path.display())))
}

/// Load `module`'s parameters from tensors already read (and possibly converted, as
/// the ViT does with timm's layout); the error names the tensor, not the file.
pub fn load_tensors<B: Backend, M: Module<B>>(module: M, file: &FileTensors, file_name: &dyn Fn(&str) -> String) -> Result<(M, LoadReport), String> {
    let mut loader = Loader { file, file_name, path: Vec::new(), report: LoadReport::default(), error: None };
    let module = module.map(&mut loader);
    if let Some(e) = loader.error {
        return Err(e);
    }
    let mut report = loader.report;
    let used: std::collections::BTreeSet<&String> = report.loaded.iter().collect();
    report.unused = file.keys().filter(|k| !used.contains(k)).cloned().collect();
    Ok((module, report))
}

struct Loader<'a> {
    file: &'a FileTensors,
    file_name: &'a dyn Fn(&str) -> String,
    path: Vec<String>,
    report: LoadReport,
    /// The first problem; later tensors are left alone once there is one.
    error: Option<String>,
}

impl<B: Backend> ModuleMapper<B> for Loader<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let name = (self.file_name)(&self.path.join("."));
        let (id, tensor, mapper) = param.consume();
        if self.error.is_some() {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let Some(FileTensor { shape, values }) = self.file.get(&name) else {
            self.report.new.push(name);
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let want: Vec<usize> = tensor.shape().iter().copied().collect();
        if *shape != want {
            self.error = Some(format!("tensor `{name}` has shape {shape:?} in the file, the model needs {want:?}"));
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let values = match values {
            Ok(v) => v.clone(),
            Err(dtype) => {
                self.error = Some(format!("tensor `{name}` is {dtype}, not a float tensor"));
                return Param::from_mapped_value(id, tensor, mapper);
            }
        };
        let require_grad = tensor.is_require_grad();
        let fresh = Tensor::<B, D>::from_data(TensorData::new(values, want), &tensor.device());
        self.report.loaded.push(name);
        Param::from_mapped_value(id, fresh.set_require_grad(require_grad), mapper)
    }
}
