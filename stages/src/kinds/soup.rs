//! The `soup` kind: a model soup (Wortsman et al., 2022) of the epoch checkpoints of
//! one `train` run.
//!
//! - **uniform** (what the seed used: N = 5 for Swin-B, 7 for Swin-L): every tensor of
//!   the model file, parameters *and* buffers (BatchNorm running mean/var, the EQL
//!   statistics), is the element-wise mean of the last N checkpoints' tensors, equal
//!   weights.
//! - **greedy** (the paper's stronger variant): rank the checkpoints by validation
//!   accuracy; start from the best; add each next one only if the soup's validation
//!   accuracy does not drop. Needs `val`. By construction the soup is never worse on
//!   `val` than the best single checkpoint (it may overfit `val`, as the paper notes).
//!
//! # Why average the files, not the modules
//!
//! Checkpoints are saved from `valid()` models (running statistics synchronised) and
//! share one config, so their safetensors hold the same names, dtypes and shapes. The
//! mean is taken there, by tensor name, in f64 (rounded once to f32), which is exact,
//! independent of the backend, and sidesteps burn's trap of BatchNorm statistics
//! shared between module clones. The averaged tensors are then loaded into a freshly
//! initialised classifier and saved with `checkpoint::save_model`, so the output is
//! byte-for-byte the format `train` writes and `predict` reads, and a name or shape that
//! does not fit the config fails here rather than downstream.
//!
//! # Output
//!
//! `model` (MODEL, config of the newest checkpoint that went in) and `report`
//! (`soup.json`: method, the candidates with their validation accuracies, which went
//! in, the soup's validation accuracy; `soup.txt` for people).

use crate::ml::kernels::TrainBackend;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::backend::Backend;
use fgflow_engine::{ParamSpec, ParamType, Params, PortSpec, Resources, RunContext, StageError, StageKind};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::artifact::{self, LabelledSet};
use crate::ml::backend::{BackendJob, dispatch};
use crate::ml::checkpoint::{self, WEIGHTS_FILE};
use crate::ml::model::{Classifier, ModelConfig};
use crate::ml::predictions::write_json;
use crate::ml::train_loop::{Labelled, accuracy};
use crate::types;

pub struct Soup;

pub const REPORT_JSON: &str = "soup.json";
pub const REPORT_TXT: &str = "soup.txt";

/// One candidate checkpoint in `soup.json`. Fields in alphabetical order (sorted keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub dir: String,
    pub epoch: usize,
    pub in_soup: bool,
    /// Accuracy of this checkpoint alone on `val` (null without `val`).
    pub val_acc: Option<f64>,
    /// Greedy only: the soup's accuracy after trying this one (null for the first).
    pub val_acc_with: Option<f64>,
}

/// `soup.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SoupReport {
    /// In the order they were considered (uniform: oldest first; greedy: best first).
    pub candidates: Vec<Candidate>,
    pub ingredients: Vec<usize>,
    pub method: String,
    pub soup_val_acc: Option<f64>,
}

/// A model file held in memory: tensor name -> (dtype, shape, little-endian bytes).
pub type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// Read every tensor of a `model.safetensors`.
pub fn read_tensors(path: &Path) -> Result<Tensors, StageError> {
    let bytes = std::fs::read(path).map_err(|e| StageError::io(format!("reading {}", path.display()), e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| StageError::failed(format!("{}: {e}", path.display())))?;
    Ok(st.tensors().into_iter().map(|(name, t)| (name, (t.dtype(), t.shape().to_vec(), t.data().to_vec()))).collect())
}

/// Element-wise mean of `members` (all with the same names, dtypes and shapes): F32
/// tensors are summed in f64 in the given order, divided by the count and rounded once
/// to f32; tensors of any other dtype (none today) must be identical and are copied.
/// `names[i]` names member i in errors.
pub fn average(members: &[&Tensors], names: &[String]) -> Result<Tensors, StageError> {
    let Some(first) = members.first() else {
        return Err(StageError::failed("a soup needs at least one checkpoint"));
    };
    if let Some((i, extra)) = members.iter().enumerate().find_map(|(i, m)| m.keys().find(|k| !first.contains_key(*k)).map(|k| (i, k))) {
        return Err(StageError::failed(format!("{}: tensor `{extra}` is not in {}", names[i], names[0])));
    }
    let n = members.len() as f64;
    let mut out = Tensors::new();
    for (name, (dtype, shape, bytes)) in first.iter() {
        let mut others = Vec::with_capacity(members.len());
        for (i, m) in members.iter().enumerate() {
            match m.get(name) {
                Some((d, s, b)) if d == dtype && s == shape => others.push(b.as_slice()),
                Some((d, s, _)) => {
                    return Err(StageError::failed(format!(
                        "{}: tensor `{name}` is {d:?} {s:?}, but {dtype:?} {shape:?} in {}",
                        names[i], names[0]
                    )));
                }
                None => return Err(StageError::failed(format!("{}: no tensor `{name}` (present in {})", names[i], names[0]))),
            }
        }
        let averaged = if *dtype == Dtype::F32 {
            let mut sum = vec![0.0f64; bytes.len() / 4];
            for b in &others {
                for (s, c) in sum.iter_mut().zip(b.chunks_exact(4)) {
                    *s += f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64;
                }
            }
            sum.iter().flat_map(|s| ((s / n) as f32).to_le_bytes()).collect()
        } else {
            // Integer or boolean buffers cannot be averaged meaningfully; they are
            // counters or masks that must agree between epochs of one run.
            if let Some(i) = others.iter().position(|b| *b != bytes.as_slice()) {
                return Err(StageError::failed(format!("tensor `{name}` ({dtype:?}) differs between {} and {}: only f32 tensors can be averaged", names[0], names[i])));
            }
            bytes.clone()
        };
        out.insert(name.clone(), (*dtype, shape.clone(), averaged));
    }
    Ok(out)
}

/// Serialise to safetensors bytes (no metadata: `save_model` adds its own).
pub fn to_bytes(t: &Tensors) -> Result<Vec<u8>, StageError> {
    let views = t
        .iter()
        .map(|(name, (dtype, shape, bytes))| TensorView::new(*dtype, shape.clone(), bytes).map(|v| (name.clone(), v)).map_err(StageError::failed))
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, None).map_err(StageError::failed)
}

/// A freshly initialised classifier with `tensors` loaded into it. Fresh (never a clone
/// of another model): burn shares BatchNorm running statistics between clones.
pub fn load_tensors<B: Backend>(config: &ModelConfig, tensors: &Tensors, device: &B::Device, what: &str) -> Result<Classifier<B>, StageError> {
    let mut model = config.init::<B>(0, device);
    let mut store = SafetensorsStore::from_bytes(Some(to_bytes(tensors)?));
    let result = model.load_from(&mut store).map_err(|e| StageError::failed(format!("loading {what}: {e}")))?;
    if !result.errors.is_empty() || !result.missing.is_empty() {
        return Err(StageError::failed(format!(
            "{what}: weights do not match model.json (missing {:?}, errors {:?})",
            result.missing.iter().map(|(p, _)| p).collect::<Vec<_>>(),
            result.errors
        )));
    }
    Ok(model)
}

struct Settings {
    greedy: bool,
    last: usize,
}

fn settings(p: &Params) -> Result<Settings, StageError> {
    let greedy = match p.str("method")? {
        "uniform" => false,
        "greedy" => true,
        other => return Err(StageError::Param { name: "method".into(), msg: format!("unknown method `{other}`") }),
    };
    let last = p.int("last")?;
    if last < 0 {
        return Err(StageError::Param { name: "last".into(), msg: format!("must be 0 (all) or positive, found {last}") });
    }
    Ok(Settings { greedy, last: last as usize })
}

/// One checkpoint of the input, read.
struct Ingredient {
    epoch: usize,
    dir: String,
    config: ModelConfig,
    tensors: Tensors,
}

fn input_err(name: &str, msg: impl Into<String>) -> StageError {
    StageError::Input { name: name.into(), msg: msg.into() }
}

impl StageKind for Soup {
    fn name(&self) -> &'static str {
        "soup"
    }
    fn version(&self) -> u32 {
        // 2: greedy soup scores with the ViT's own LayerNorm/attention (other rounding).
        // 3: scores with the CPU kernels of `train` v6.
        // 4: scores with the vectorised GELU and softmax of `train` v7.
        // 5: scores with Swin-V2's window attention of `train` v8.
        5
    }
    fn summary(&self) -> &'static str {
        "model soup of one run's checkpoints: uniform mean of every weight and buffer, or greedy by validation accuracy"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::optional("method", ParamType::Enum(&["uniform", "greedy"]), "uniform", "uniform mean of the last checkpoints (the seed), or greedy (needs `val`)"),
            ParamSpec::optional("last", ParamType::Int, 0, "use the newest N kept checkpoints (0 = all of them)"),
            ParamSpec::optional("batch_size", ParamType::Int, 256, "greedy: images per forward pass when scoring on `val` (memory only)"),
        ]
    }
    fn inputs(&self) -> Vec<PortSpec> {
        vec![
            PortSpec::one("checkpoints", types::CHECKPOINTS, "the epoch checkpoints of one train run"),
            PortSpec::one("val", types::LABELLED_SET, "validation set: ranks and accepts checkpoints (greedy); reported (uniform)").optional(),
        ]
    }
    fn outputs(&self, _params: &Params) -> Vec<PortSpec> {
        vec![
            PortSpec::one("model", types::MODEL, "the soup, in train's model format (predict loads it)"),
            PortSpec::one("report", types::REPORT, "soup.json / soup.txt: candidates, their val accuracies, which went in"),
        ]
    }
    fn resources(&self, _params: &Params) -> Resources {
        Resources::Heavy
    }
    fn backend_sensitive(&self) -> bool {
        // The uniform mean is backend-free, but greedy decisions rest on accuracies
        // computed on the backend.
        true
    }
    fn validate(&self, params: &Params) -> Vec<(String, String)> {
        let mut errs = StageError::field_errors(settings(params));
        if let Ok(b) = params.int("batch_size")
            && b < 1
        {
            errs.push(("batch_size".into(), "must be at least 1".into()));
        }
        errs
    }

    fn describe_output(&self, output: &str, dir: &Path) -> Option<String> {
        match output {
            "report" => std::fs::read_to_string(dir.join(REPORT_TXT)).ok(),
            "model" => checkpoint::read_config(dir).ok().map(|c| format!("soup: {}", super::train::describe_model(&c))),
            _ => None,
        }
    }

    fn run(&self, ctx: &RunContext) -> Result<(), StageError> {
        let s = settings(&ctx.params)?;
        let batch = ctx.params.usize("batch_size")?.max(1);
        crate::artifact::refuse_oracle(ctx, &[])?;
        let root = ctx.input("checkpoints")?;
        let index = checkpoint::read_index(root).map_err(|e| input_err("checkpoints", e.to_string()))?;
        if index.is_empty() {
            return Err(input_err("checkpoints", "the run kept no checkpoints (train with keep_checkpoints >= 1)"));
        }
        let skip = if s.last == 0 { 0 } else { index.len().saturating_sub(s.last) };
        if s.last > index.len() {
            ctx.log(format!("last = {} but the run kept {} checkpoints: using all of them", s.last, index.len()));
        }
        let mut ingredients = Vec::new();
        for (entry, dir) in index.into_iter().skip(skip) {
            let config = checkpoint::read_config(&dir).map_err(|e| input_err("checkpoints", e.to_string()))?;
            let tensors = read_tensors(&dir.join(WEIGHTS_FILE)).map_err(|e| input_err("checkpoints", e.to_string()))?;
            ingredients.push(Ingredient { epoch: entry.epoch, dir: entry.dir, config, tensors });
        }
        // One run's checkpoints differ only in the epoch they were taken at; anything
        // else means the artifact mixes runs, whose weights do not average meaningfully.
        let base = ingredients[0].config.clone();
        for ing in &ingredients[1..] {
            let mut c = ing.config.clone();
            c.epoch = base.epoch;
            if c != base {
                return Err(input_err("checkpoints", format!("{} has another config than {}: a soup needs checkpoints of one run", ing.dir, ingredients[0].dir)));
            }
        }
        let val = if ctx.has_input("val") { Some(artifact::read_labelled_set(ctx.input("val")?)?) } else { None };
        if let Some(v) = &val
            && v.images.classes != base.classes
        {
            return Err(input_err("val", "its classes differ from the model's"));
        }
        if s.greedy && val.is_none() {
            return Err(input_err("val", "method \"greedy\" ranks checkpoints by validation accuracy: connect `val`"));
        }
        ctx.log(format!(
            "soup: {} of epochs {:?}, backend {}",
            if s.greedy { "greedy" } else { "uniform" },
            ingredients.iter().map(|i| i.epoch).collect::<Vec<_>>(),
            ctx.backend
        ));
        let (report, tensors) = dispatch(&ctx.backend, SoupJob { ctx, greedy: s.greedy, ingredients: &ingredients, val: val.as_ref(), batch })?;
        // The soup's config is the newest ingredient's: its epoch says how far the
        // run had got, and class counts are the same for all.
        let newest = report.ingredients.iter().max().copied().unwrap_or(base.epoch);
        let mut config = base.clone();
        config.epoch = newest;
        dispatch(&ctx.backend, SaveJob { config: &config, tensors: &tensors, dir: ctx.output_dir("model")? })?;
        let out = ctx.output_dir("report")?;
        write_json(&out.join(REPORT_JSON), &report)?;
        let text = report_text(&report);
        ctx.log(text.trim_end());
        std::fs::write(out.join(REPORT_TXT), text).map_err(|e| StageError::io(format!("writing {REPORT_TXT}"), e))
    }
}

fn report_text(r: &SoupReport) -> String {
    let pct = |v: Option<f64>| v.map(|a| format!("{:.2}%", 100.0 * a)).unwrap_or_else(|| "-".into());
    let mut s = String::new();
    let _ = writeln!(s, "{} soup of {} checkpoints (epochs {:?}); soup val acc {}", r.method, r.ingredients.len(), r.ingredients, pct(r.soup_val_acc));
    let _ = writeln!(s, "  {:>5} {:>9} {:>13} {:>7}", "epoch", "val acc", "soup with it", "in");
    for c in &r.candidates {
        let _ = writeln!(s, "  {:>5} {:>9} {:>13} {:>7}", c.epoch, pct(c.val_acc), pct(c.val_acc_with), if c.in_soup { "yes" } else { "no" });
    }
    s
}

fn labelled(set: &LabelledSet) -> Result<Labelled<'_>, StageError> {
    Ok(Labelled { images: &set.images, labels: &set.labels })
}

struct SoupJob<'a, 'c> {
    ctx: &'a RunContext<'c>,
    greedy: bool,
    ingredients: &'a [Ingredient],
    val: Option<&'a LabelledSet>,
    batch: usize,
}

impl BackendJob for SoupJob<'_, '_> {
    type Output = (SoupReport, Tensors);
    fn run<B: TrainBackend>(self, device: B::Device) -> Result<(SoupReport, Tensors), StageError> {
        let SoupJob { ctx, greedy, ingredients, val, batch } = self;
        let names: Vec<String> = ingredients.iter().map(|i| format!("checkpoint {}", i.dir)).collect();
        let config = &ingredients[0].config;
        // Inference only: no autodiff.
        let score = |tensors: &Tensors, what: &str| -> Result<Option<f64>, StageError> {
            match val {
                None => Ok(None),
                Some(v) => {
                    let model = load_tensors::<B::InnerBackend>(config, tensors, &device, what)?;
                    accuracy(&model, config, labelled(v)?, batch).map(Some)
                }
            }
        };
        let total = ingredients.len() as u64 * if greedy { 2 } else { 1 };
        let mut singles = Vec::with_capacity(ingredients.len());
        for (k, (ing, name)) in ingredients.iter().zip(&names).enumerate() {
            ctx.progress(k as u64, total, "scoring checkpoints");
            singles.push(score(&ing.tensors, name)?);
        }
        if !greedy {
            let all: Vec<&Tensors> = ingredients.iter().map(|i| &i.tensors).collect();
            let soup = average(&all, &names)?;
            let soup_val_acc = score(&soup, "the uniform soup")?;
            let candidates = ingredients
                .iter()
                .zip(&singles)
                .map(|(i, &v)| Candidate { dir: i.dir.clone(), epoch: i.epoch, in_soup: true, val_acc: v, val_acc_with: None })
                .collect();
            let report = SoupReport { candidates, ingredients: ingredients.iter().map(|i| i.epoch).collect(), method: "uniform".into(), soup_val_acc };
            return Ok((report, soup));
        }
        // Greedy: best first; ties keep the newer checkpoint first (later epochs have
        // seen the full schedule).
        let mut order: Vec<usize> = (0..ingredients.len()).collect();
        order.sort_by(|&a, &b| {
            let (va, vb) = (singles[a].unwrap_or(0.0), singles[b].unwrap_or(0.0));
            vb.total_cmp(&va).then(ingredients[b].epoch.cmp(&ingredients[a].epoch))
        });
        let mut chosen = vec![order[0]];
        let mut best = singles[order[0]];
        let mut soup = ingredients[order[0]].tensors.clone();
        let mut candidates = vec![Candidate { dir: ingredients[order[0]].dir.clone(), epoch: ingredients[order[0]].epoch, in_soup: true, val_acc: singles[order[0]], val_acc_with: None }];
        for (k, &j) in order.iter().enumerate().skip(1) {
            ctx.progress((ingredients.len() + k) as u64, total, "greedy soup");
            let mut trial = chosen.clone();
            trial.push(j);
            let members: Vec<&Tensors> = trial.iter().map(|&i| &ingredients[i].tensors).collect();
            let trial_names: Vec<String> = trial.iter().map(|&i| names[i].clone()).collect();
            let candidate = average(&members, &trial_names)?;
            let acc = score(&candidate, &format!("the soup with {}", names[j]))?;
            // "Does not drop": equal accuracy is accepted, as in the paper's >=.
            let accept = acc.unwrap_or(0.0) >= best.unwrap_or(0.0);
            ctx.log(format!("greedy: + epoch {} -> val acc {:.4} ({})", ingredients[j].epoch, acc.unwrap_or(0.0), if accept { "kept" } else { "rejected" }));
            if accept {
                chosen = trial;
                best = acc;
                soup = candidate;
            }
            candidates.push(Candidate { dir: ingredients[j].dir.clone(), epoch: ingredients[j].epoch, in_soup: accept, val_acc: singles[j], val_acc_with: acc });
        }
        let mut epochs: Vec<usize> = chosen.iter().map(|&i| ingredients[i].epoch).collect();
        epochs.sort_unstable();
        Ok((SoupReport { candidates, ingredients: epochs, method: "greedy".into(), soup_val_acc: best }, soup))
    }
}

/// Load the averaged tensors into a fresh model and save it in train's format.
struct SaveJob<'a> {
    config: &'a ModelConfig,
    tensors: &'a Tensors,
    dir: PathBuf,
}

impl BackendJob for SaveJob<'_> {
    type Output = ();
    fn run<B: TrainBackend>(self, device: B::Device) -> Result<(), StageError> {
        let model = load_tensors::<B::InnerBackend>(self.config, self.tensors, &device, "the soup")?;
        checkpoint::save_model(&model, self.config, &self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(name: &str, values: &[f32]) -> Tensors {
        let mut t = Tensors::new();
        t.insert(name.into(), (Dtype::F32, vec![values.len()], values.iter().flat_map(|v| v.to_le_bytes()).collect()));
        t
    }

    fn values(t: &Tensors, name: &str) -> Vec<f32> {
        t[name].2.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    #[test]
    fn average_is_the_elementwise_mean() {
        let (a, b, c) = (one("w", &[1.0, 2.0, -3.0]), one("w", &[3.0, 2.0, 0.0]), one("w", &[2.0, 5.0, 0.0]));
        let names = vec!["a".to_string(), "b".into(), "c".into()];
        let m = average(&[&a, &b, &c], &names).unwrap();
        assert_eq!(values(&m, "w"), vec![2.0, 3.0, -1.0]);
        // A soup of one is that checkpoint, bit for bit.
        assert_eq!(average(&[&a], &names[..1]).unwrap(), a);
    }

    #[test]
    fn mismatched_checkpoints_are_named() {
        let (a, b) = (one("w", &[1.0, 2.0]), one("v", &[1.0, 2.0]));
        let err = average(&[&a, &b], &["first".into(), "second".into()]).unwrap_err().to_string();
        assert!(err.contains("second") && err.contains("`v`"), "{err}");
        let c = one("w", &[1.0]);
        let err = average(&[&a, &c], &["first".into(), "second".into()]).unwrap_err().to_string();
        assert!(err.contains("[1]") && err.contains("[2]"), "{err}");
    }

    #[test]
    fn params_are_checked() {
        let p = Params::default().with("method", "greedy").with("last", -1).with("batch_size", 0);
        let errs = Soup.validate(&p);
        assert!(errs.iter().any(|(n, _)| n == "last") && errs.iter().any(|(n, _)| n == "batch_size"), "{errs:?}");
    }
}
