//! The planner: for every stage, Fresh (its key has an entry), Stale (with the reasons,
//! against the last run of that stage) or Pending (its key is known only once an
//! upstream stage has re-run). Also resolves and hashes `Path` sources, and keeps the
//! per-pipeline refs (stage -> key of its last run) that reasons are computed against.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use fgflow_cache::{CacheError, Digest, StatCache, Store};
use serde::{Deserialize, Serialize};

use crate::diagnostic::{Locator, SpecError, SpecErrors};
use crate::fingerprint::{Fingerprint, Recorded, SCHEMA};
use crate::pipeline::{Pipeline, Stage};
use crate::value::Value;

/// A resolved `Path` parameter element.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Source {
    pub written: String,
    pub path: PathBuf,
    pub digest: Digest,
}

/// Stage -> param -> sources. A `Path` parameter whose list is empty has no entry
/// (every stage has one, often empty, so a map is not allocated for nothing); the
/// stage's `paths` say which parameters are paths ([`stage_sources`]).
pub type Sources = HashMap<String, BTreeMap<String, Vec<Source>>>;

/// Every `Path` parameter of `stage` with its sources, empty lists included: what
/// a job of the stage is given.
pub fn stage_sources(stage: &Stage, sources: &Sources) -> BTreeMap<String, Vec<Source>> {
    let resolved = sources.get(&stage.name);
    stage.paths.keys().map(|k| (k.clone(), resolved.and_then(|r| r.get(k)).cloned().unwrap_or_default())).collect()
}

/// Hash every `Path` parameter of the pipeline (through the stat cache). A missing
/// path is reported like any other error in the file.
pub fn resolve_sources(p: &Pipeline, stat: &mut StatCache) -> Result<Sources, Box<SpecErrors>> {
    let loc = Locator::new(&p.source, p.stages.iter().map(|s| s.name.clone()));
    let mut out = Sources::with_capacity(p.stages.len());
    let mut errors = Vec::new();
    for s in &p.stages {
        let mut per = BTreeMap::new();
        for (param, list) in &s.paths {
            let mut v = Vec::new();
            for written in list {
                let path = p.dir.join(written);
                match stat.path_digest(&path) {
                    Ok(digest) => v.push(Source { written: written.clone(), path: std::path::absolute(&path).unwrap_or(path), digest }),
                    Err(e) => errors.push(SpecError {
                        message: format!("stage `{}`: parameter `{param}`: cannot read `{written}` ({e})", s.name),
                        span: loc.field(&s.name, "params", Some(param)),
                        label: "path relative to the pipeline file".into(),
                        help: None,
                    }),
                }
            }
            if !v.is_empty() {
                per.insert(param.clone(), v);
            }
        }
        out.insert(s.name.clone(), per);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        let name = p.file.display().to_string();
        Err(Box::new(SpecErrors { file: name.clone(), source_code: miette::NamedSource::new(name, p.source.to_string()), errors }))
    }
}

/// Why a stage must run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    /// No run of this stage is recorded for this pipeline file.
    NeverRun,
    /// Same key as the last run, but its entry is gone (gc, verify).
    NotInCache,
    Schema { old: u32, new: u32 },
    Kind { old: String, new: String },
    KindVersion { old: u32, new: u32 },
    Param { name: String, old: Option<Value>, new: Option<Value> },
    Source { param: String, old: Vec<Digest>, new: Vec<Digest> },
    Input { port: String, from: Vec<String>, old: Vec<Digest>, new: Vec<Digest> },
    Env { name: String, old: Option<String>, new: Option<String> },
    Backend { old: Option<String>, new: Option<String> },
    /// Pending: this upstream stage will run first.
    Upstream { stage: String },
    /// Its key was computed but differs from the last run in no recorded field.
    KeyChanged,
}

fn short_list(ds: &[Digest]) -> String {
    ds.iter().map(|d| d.short()).collect::<Vec<_>>().join(",")
}

fn opt<T: fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map(|x| x.to_string()).unwrap_or_else(|| "(none)".into())
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NeverRun => f.write_str("never run"),
            Reason::NotInCache => f.write_str("result no longer in the cache"),
            Reason::Schema { old, new } => write!(f, "key schema {old} -> {new}"),
            Reason::Kind { old, new } => write!(f, "kind `{old}` -> `{new}`"),
            Reason::KindVersion { old, new } => write!(f, "code version of the kind {old} -> {new}"),
            Reason::Param { name, old, new } => write!(f, "param `{name}`: {} -> {}", opt(old), opt(new)),
            Reason::Source { param, old, new } => write!(f, "content of `{param}` changed ({} -> {})", short_list(old), short_list(new)),
            Reason::Input { port, from, old, new } if old.is_empty() => write!(f, "input `{port}` from `{}` connected ({})", from.join("`, `"), short_list(new)),
            Reason::Input { port, old, new, .. } if new.is_empty() => write!(f, "input `{port}` disconnected (was {})", short_list(old)),
            Reason::Input { port, from, old, new } => {
                write!(f, "input `{port}` from `{}` changed ({} -> {})", from.join("`, `"), short_list(old), short_list(new))
            }
            Reason::Env { name, old, new } => write!(f, "env `{name}`: {} -> {}", opt(old), opt(new)),
            Reason::Backend { old, new } => write!(f, "backend {} -> {}", opt(old), opt(new)),
            Reason::Upstream { stage } => write!(f, "waits for `{stage}`"),
            Reason::KeyChanged => f.write_str("key changed"),
        }
    }
}

/// Field-by-field difference between the last recorded run and now. `new.inputs` may
/// be partial (a pending stage): then inputs are not compared.
pub fn diff(old: &Recorded, new: &Fingerprint, origins: &BTreeMap<String, Vec<String>>, compare_inputs: bool) -> Vec<Reason> {
    let o = &old.fingerprint;
    let mut r = Vec::new();
    if o.schema != new.schema {
        r.push(Reason::Schema { old: o.schema, new: new.schema });
    }
    if o.kind != new.kind {
        r.push(Reason::Kind { old: o.kind.clone(), new: new.kind.clone() });
    } else if o.kind_version != new.kind_version {
        r.push(Reason::KindVersion { old: o.kind_version, new: new.kind_version });
    }
    let names: std::collections::BTreeSet<&String> = o.params.keys().chain(new.params.keys()).collect();
    for name in names {
        let (a, b) = (o.params.get(name), new.params.get(name));
        if a != b {
            r.push(Reason::Param { name: name.clone(), old: a.cloned(), new: b.cloned() });
        }
    }
    let names: std::collections::BTreeSet<&String> = o.sources.keys().chain(new.sources.keys()).collect();
    for name in names {
        let (a, b) = (o.sources.get(name).cloned().unwrap_or_default(), new.sources.get(name).cloned().unwrap_or_default());
        if a != b {
            r.push(Reason::Source { param: name.clone(), old: a, new: b });
        }
    }
    if compare_inputs {
        let names: std::collections::BTreeSet<&String> = o.inputs.keys().chain(new.inputs.keys()).collect();
        for name in names {
            let (a, b) = (o.inputs.get(name).cloned().unwrap_or_default(), new.inputs.get(name).cloned().unwrap_or_default());
            if a != b {
                let from = origins.get(name).or_else(|| old.origins.get(name)).cloned().unwrap_or_default();
                r.push(Reason::Input { port: name.clone(), from, old: a, new: b });
            }
        }
    }
    let names: std::collections::BTreeSet<&String> = o.env.keys().chain(new.env.keys()).collect();
    for name in names {
        let (a, b) = (o.env.get(name).cloned().flatten(), new.env.get(name).cloned().flatten());
        if a != b {
            r.push(Reason::Env { name: name.clone(), old: a, new: b });
        }
    }
    if o.backend != new.backend {
        r.push(Reason::Backend { old: o.backend.clone(), new: new.backend.clone() });
    }
    r
}

/// The per-pipeline record of the last run of each stage (`refs/<id>.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Refs {
    /// Absolute path of the pipeline file (gc keeps refs whose file still exists).
    #[serde(with = "raw_path")]
    pub pipeline: PathBuf,
    pub stages: BTreeMap<String, Digest>,
}

pub fn refs_id(pipeline_file: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let abs = std::path::absolute(pipeline_file).unwrap_or_else(|_| pipeline_file.to_path_buf());
    Digest::of_bytes(abs.as_os_str().as_bytes()).to_hex()[..16].to_string()
}

/// A path as JSON without loss: a string when it is UTF-8 (every path in practice, and
/// readable), else its raw bytes as an array (a file name is any bytes on Unix).
mod raw_path {
    use std::ffi::OsString;
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::path::PathBuf;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Written {
        Text(String),
        Bytes(Vec<u8>),
    }

    pub fn serialize<S: Serializer>(p: &PathBuf, s: S) -> Result<S::Ok, S::Error> {
        match p.to_str() {
            Some(t) => Written::Text(t.to_string()),
            None => Written::Bytes(p.as_os_str().as_bytes().to_vec()),
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        Ok(match Written::deserialize(d)? {
            Written::Text(t) => PathBuf::from(t),
            Written::Bytes(b) => PathBuf::from(OsString::from_vec(b)),
        })
    }
}

/// The refs of a pipeline file, for a run (which rewrites them at its end). Refs are
/// an optimisation (reasons, gc roots): a damaged file is set aside with a warning and
/// read as empty, and the run rebuilds it; only an I/O failure such as permissions
/// is an error.
pub fn load_refs(store: &Store, pipeline_file: &Path) -> Result<Refs, CacheError> {
    read_refs(store, pipeline_file, true)
}

/// `load_refs` for readers (`plan`): a damaged file is only warned about.
fn read_refs(store: &Store, pipeline_file: &Path, set_aside: bool) -> Result<Refs, CacheError> {
    let abs = std::path::absolute(pipeline_file).unwrap_or_else(|_| pipeline_file.to_path_buf());
    Ok(store.get_doc_lenient("refs", &refs_id(pipeline_file), set_aside)?.unwrap_or(Refs { pipeline: abs, stages: BTreeMap::new() }))
}

pub fn save_refs(store: &Store, pipeline_file: &Path, refs: &Refs) -> Result<(), CacheError> {
    store.put_doc("refs", &refs_id(pipeline_file), refs)
}

/// The fingerprint of a stage given its upstream outputs; `None` for inputs whose
/// producer has no known outputs yet (the stage is pending). `sources` are the
/// stage's resolved `Path` parameters; one missing from it has no content (an empty
/// list), and every `Path` parameter of the stage is recorded.
pub fn fingerprint(
    stage: &Stage,
    sources: &BTreeMap<String, Vec<Source>>,
    outputs: &HashMap<String, BTreeMap<String, Digest>>,
    backend: &str,
) -> (Fingerprint, BTreeMap<String, Vec<String>>, bool) {
    let mut complete = true;
    let mut inputs = BTreeMap::new();
    let mut origins = BTreeMap::new();
    for (port, refs) in &stage.inputs {
        let mut ds = Vec::new();
        for r in refs {
            match outputs.get(&r.stage).and_then(|o| o.get(&r.output)) {
                Some(d) => ds.push(*d),
                None => complete = false,
            }
        }
        inputs.insert(port.clone(), ds);
        origins.insert(port.clone(), refs.iter().map(|r| r.to_string()).collect());
    }
    let params = stage.params.0.iter().filter(|(k, _)| !stage.paths.contains_key(*k)).map(|(k, v)| (k.clone(), v.clone())).collect();
    let fp = Fingerprint {
        schema: SCHEMA,
        kind: stage.kind.name().to_string(),
        kind_version: stage.kind.version(),
        params,
        sources: stage.paths.keys().map(|k| (k.clone(), sources.get(k).map(|v| v.iter().map(|s| s.digest).collect()).unwrap_or_default())).collect(),
        inputs,
        env: stage.env.iter().map(|n| (n.clone(), std::env::var(n).ok())).collect(),
        backend: stage.kind.backend_sensitive().then(|| backend.to_string()),
    };
    (fp, origins, complete)
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Fresh,
    Stale,
    Pending,
}

#[derive(Debug, Clone, Serialize)]
pub struct Planned {
    pub name: String,
    pub status: Status,
    pub key: Option<Digest>,
    pub reasons: Vec<Reason>,
    /// The last recorded run of this stage, if any. Boxed: most stages of a long
    /// pipeline have none, and a recorded fingerprint is a few hundred bytes.
    #[serde(skip)]
    pub previous: Option<Box<(Digest, Recorded)>>,
}

/// Plan every stage without running anything. Linear in the pipeline: a stage's
/// fingerprint is computed only when it decides something (its key, or the reasons
/// against its last run), and is not kept once it has.
pub fn plan(p: &Pipeline, store: &Store, sources: &Sources, backend: &str) -> Result<Vec<Planned>, CacheError> {
    let refs = read_refs(store, &p.file, false)?;
    let mut outputs: HashMap<String, BTreeMap<String, Digest>> = HashMap::new();
    let mut status_of: HashMap<&str, Status> = HashMap::with_capacity(p.stages.len());
    let mut out = Vec::with_capacity(p.stages.len());
    let empty = BTreeMap::new();
    for s in &p.stages {
        let fingerprint = || fingerprint(s, sources.get(&s.name).unwrap_or(&empty), &outputs, backend);
        let previous = match refs.stages.get(&s.name) {
            Some(k) => store.get_entry(k)?.and_then(|e| serde_json::from_value::<Recorded>(e.fingerprint).ok().map(|r| Box::new((*k, r)))),
            None => None,
        };
        let waiting: Vec<&str> = s.upstream().into_iter().filter(|u| status_of.get(*u) != Some(&Status::Fresh)).collect();
        // Every upstream stage is fresh: the key is known unless an upstream entry
        // lacks an output this stage reads.
        let keyed = if waiting.is_empty() { Some(fingerprint()).filter(|(_, _, complete)| *complete) } else { None };
        let planned = match keyed {
            None => {
                let mut reasons: Vec<Reason> = waiting.iter().map(|u| Reason::Upstream { stage: u.to_string() }).collect();
                if let Some((_, rec)) = previous.as_deref() {
                    let (fp, origins, _) = fingerprint();
                    reasons.extend(diff(rec, &fp, &origins, false));
                }
                Planned { name: s.name.clone(), status: Status::Pending, key: None, reasons, previous }
            }
            Some((fp, origins, _)) => {
                let key = fp.key();
                if let Some(entry) = store.get_entry(&key)? {
                    outputs.insert(s.name.clone(), entry.outputs);
                    Planned { name: s.name.clone(), status: Status::Fresh, key: Some(key), reasons: vec![], previous }
                } else {
                    let reasons = stale_reasons(previous.as_deref(), &fp, &origins, key, refs.stages.get(&s.name));
                    Planned { name: s.name.clone(), status: Status::Stale, key: Some(key), reasons, previous }
                }
            }
        };
        status_of.insert(&s.name, planned.status.clone());
        out.push(planned);
    }
    Ok(out)
}

/// Reasons a keyed stage has no entry.
pub fn stale_reasons(previous: Option<&(Digest, Recorded)>, fp: &Fingerprint, origins: &BTreeMap<String, Vec<String>>, key: Digest, last: Option<&Digest>) -> Vec<Reason> {
    match (previous, last) {
        (Some((_, rec)), _) => {
            let r = diff(rec, fp, origins, true);
            if r.is_empty() { vec![Reason::KeyChanged] } else { r }
        }
        (None, Some(k)) if *k == key => vec![Reason::NotInCache],
        (None, Some(_)) => vec![Reason::NotInCache],
        (None, None) => vec![Reason::NeverRun],
    }
}
