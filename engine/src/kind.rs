//! What a stage kind is: its name, code version, parameter schema, typed input and
//! output ports, resource class, and the body that turns materialised inputs into
//! output directories. The engine owns everything around the body (keys, cache,
//! scheduling); a kind only sees a [`RunContext`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::value::{Params, Value};

/// The type of an artifact flowing along an edge, checked when the graph is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ArtifactType(pub &'static str);

impl ArtifactType {
    /// Accepted by an input of any type (and produced by `command` outputs).
    pub const ANY: ArtifactType = ArtifactType("any");

    pub fn accepts(self, produced: ArtifactType) -> bool {
        self == ArtifactType::ANY || produced == ArtifactType::ANY || self == produced
    }
}

impl fmt::Display for ArtifactType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Parameter types the engine validates before a stage is keyed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParamType {
    Bool,
    Int,
    /// Integers are accepted and normalised to floats, so `1` and `1.0` give one key.
    Float,
    Str,
    /// A string from a fixed set.
    Enum(&'static [&'static str]),
    /// A file or directory, relative to the pipeline file. Its *content* digest goes
    /// into the key (through the stat cache), never the path itself.
    Path,
    List(&'static ParamType),
    /// A map from strings to strings (environment variables, say).
    StrMap,
}

impl fmt::Display for ParamType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamType::Bool => f.write_str("bool"),
            ParamType::Int => f.write_str("integer"),
            ParamType::Float => f.write_str("number"),
            ParamType::Str => f.write_str("string"),
            ParamType::Enum(v) => write!(f, "one of {}", v.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ")),
            ParamType::Path => f.write_str("path"),
            ParamType::List(t) => write!(f, "list of {t}"),
            ParamType::StrMap => f.write_str("map of string to string"),
        }
    }
}

/// One declared parameter. `default: None` means required.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: &'static str,
    pub ty: ParamType,
    pub default: Option<Value>,
    pub doc: &'static str,
}

impl ParamSpec {
    pub fn required(name: &'static str, ty: ParamType, doc: &'static str) -> Self {
        ParamSpec { name, ty, default: None, doc }
    }
    pub fn optional(name: &'static str, ty: ParamType, default: impl Into<Value>, doc: &'static str) -> Self {
        ParamSpec { name, ty, default: Some(default.into()), doc }
    }
}

/// One declared input or output port. An input port named `*` accepts inputs under
/// any name (each one a list).
#[derive(Debug, Clone)]
pub struct PortSpec {
    pub name: String,
    pub ty: ArtifactType,
    /// Accepts a list of references (`["a.model", "b.model"]`), in order.
    pub many: bool,
    pub optional: bool,
    pub doc: &'static str,
}

impl PortSpec {
    pub fn one(name: impl Into<String>, ty: ArtifactType, doc: &'static str) -> Self {
        PortSpec { name: name.into(), ty, many: false, optional: false, doc }
    }
    pub fn many(name: impl Into<String>, ty: ArtifactType, doc: &'static str) -> Self {
        PortSpec { name: name.into(), ty, many: true, optional: false, doc }
    }
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }
}

/// How much of the machine a stage needs; the scheduler never runs two
/// non-`Light` stages at once, whatever `--jobs` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum Resources {
    Light,
    /// Uses every core (training, say).
    Heavy,
    /// Needs the accelerator.
    Gpu,
}

/// The error a stage body returns. Its message and the stage log are shown to the user.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("parameter `{name}`: {msg}")]
    Param { name: String, msg: String },
    #[error("input `{name}`: {msg}")]
    Input { name: String, msg: String },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("{0}")]
    Failed(String),
}

impl StageError {
    /// What `StageKind::validate` returns for the outcome of parsing parameters: no
    /// problem, or the one the parse hit, on its field.
    pub fn field_errors<T>(parsed: Result<T, StageError>) -> Vec<(String, String)> {
        match parsed {
            Ok(_) => Vec::new(),
            Err(StageError::Param { name, msg }) => vec![(name, msg)],
            Err(e) => vec![("params".into(), e.to_string())],
        }
    }

    pub fn failed(msg: impl fmt::Display) -> Self {
        StageError::Failed(msg.to_string())
    }
    pub fn io(context: impl fmt::Display, source: std::io::Error) -> Self {
        StageError::Io { context: context.to_string(), source }
    }
}

/// A stage kind. Register it in the stages crate's registry; that is the only other place
/// a new kind touches.
pub trait StageKind: Send + Sync + 'static {
    /// The `kind: "..."` name used in pipeline files.
    fn name(&self) -> &'static str;
    /// Bump to invalidate every cached result of this kind (its code changed numbers).
    fn version(&self) -> u32;
    /// One line for `fgflow kinds` and error messages.
    fn summary(&self) -> &'static str;
    fn params(&self) -> Vec<ParamSpec>;
    fn inputs(&self) -> Vec<PortSpec>;
    /// Outputs may depend on parameters (the `command` kind declares them in its params).
    fn outputs(&self, params: &Params) -> Vec<PortSpec>;
    fn resources(&self, _params: &Params) -> Resources {
        Resources::Light
    }
    /// Whether a stage of this kind runs in the controlling process under a cluster
    /// executor (`--executor slurm`) unless it says `local: false`: cheap kinds whose
    /// job would spend longer in the queue than running. Where a stage runs never
    /// changes its key, so this is not part of any key.
    fn local_by_default(&self) -> bool {
        false
    }
    /// Whether the compute backend changes this kind's numbers (then it is part of the key).
    fn backend_sensitive(&self) -> bool {
        false
    }
    /// Whether the body runs code fgflow does not control (the `command` kind's shell
    /// commands). Such a kind gets private copies of its inputs; the others get hard
    /// links to the read-only blobs, which cost nothing (see `Store::materialize`).
    fn runs_foreign_code(&self) -> bool {
        false
    }
    /// Environment variables whose values are part of the key (the `command` kind's `env`).
    fn env(&self, _params: &Params) -> Vec<String> {
        Vec::new()
    }
    /// Checks across fields, after each field was type-checked: `(field, message)` pairs.
    fn validate(&self, _params: &Params) -> Vec<(String, String)> {
        Vec::new()
    }
    /// Produce every declared output under `ctx.output_dir(name)`.
    fn run(&self, ctx: &RunContext) -> Result<(), StageError>;
    /// Human-readable summary of one output directory, for `fgflow show`.
    fn describe_output(&self, _output: &str, _dir: &Path) -> Option<String> {
        None
    }
}

/// Progress sink a stage body reports to (the console draws a bar from it).
pub trait ProgressSink: Send + Sync {
    fn progress(&self, stage: &str, done: u64, total: u64, message: &str);
}

/// A sink that drops progress reports.
pub struct NoProgress;
impl ProgressSink for NoProgress {
    fn progress(&self, _: &str, _: u64, _: u64, _: &str) {}
}

/// Everything a stage body may touch. Inputs are read-only directories materialised
/// from the cache; outputs are directories the engine captures into the cache after
/// the body returns Ok. Nothing else the body writes survives.
pub struct RunContext<'a> {
    pub stage: String,
    pub params: Params,
    /// The compute backend chosen for this run (`flex`, `ndarray`, `wgpu`, `cuda`).
    pub backend: String,
    pub(crate) inputs: BTreeMap<String, Vec<PathBuf>>,
    pub(crate) sources: BTreeMap<String, Vec<(String, PathBuf)>>,
    pub(crate) out_root: PathBuf,
    pub(crate) scratch: PathBuf,
    pub(crate) log: Mutex<String>,
    pub(crate) progress: &'a dyn ProgressSink,
}

impl<'a> RunContext<'a> {
    /// Build a context by hand: for kinds' own unit tests, and for the executor.
    pub fn new(
        stage: impl Into<String>,
        params: Params,
        backend: impl Into<String>,
        inputs: BTreeMap<String, Vec<PathBuf>>,
        sources: BTreeMap<String, Vec<(String, PathBuf)>>,
        out_root: PathBuf,
        scratch: PathBuf,
        progress: &'a dyn ProgressSink,
    ) -> Self {
        RunContext {
            stage: stage.into(),
            params,
            backend: backend.into(),
            inputs,
            sources,
            out_root,
            scratch,
            log: Mutex::new(String::new()),
            progress,
        }
    }

    /// The directory of a single-valued input.
    pub fn input(&self, name: &str) -> Result<&Path, StageError> {
        match self.inputs.get(name).map(|v| v.as_slice()) {
            Some([one]) => Ok(one),
            Some(_) => Err(StageError::Input { name: name.into(), msg: "expected exactly one artifact".into() }),
            None => Err(StageError::Input { name: name.into(), msg: "not connected".into() }),
        }
    }

    /// The directories of a list input, in the order the pipeline file gives them
    /// (empty when an optional input is not connected).
    pub fn inputs(&self, name: &str) -> &[PathBuf] {
        self.inputs.get(name).map(|v| v.as_slice()).unwrap_or(&[])
    }

    /// Names of the connected input ports.
    pub fn input_names(&self) -> Vec<String> {
        self.inputs.keys().cloned().collect()
    }

    pub fn has_input(&self, name: &str) -> bool {
        self.inputs.get(name).is_some_and(|v| !v.is_empty())
    }

    /// The absolute path of a `Path` parameter.
    pub fn source(&self, param: &str) -> Result<&Path, StageError> {
        match self.sources.get(param).map(|v| v.as_slice()) {
            Some([(_, p)]) => Ok(p),
            _ => Err(StageError::Param { name: param.into(), msg: "not a single path".into() }),
        }
    }

    /// `(path as written, absolute path)` of each element of a `List(Path)` parameter.
    pub fn sources(&self, param: &str) -> &[(String, PathBuf)] {
        self.sources.get(param).map(|v| v.as_slice()).unwrap_or(&[])
    }

    /// The directory to write output `name` into (created on first call).
    pub fn output_dir(&self, name: &str) -> Result<PathBuf, StageError> {
        let dir = self.out_root.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| StageError::io(format!("creating output `{name}`"), e))?;
        Ok(dir)
    }

    /// A private scratch directory, removed after the stage.
    pub fn scratch_dir(&self) -> &Path {
        &self.scratch
    }

    /// Append a line to the stage log (stored with the result, printed on failure).
    pub fn log(&self, line: impl fmt::Display) {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.push_str(&line.to_string());
        log.push('\n');
    }

    pub fn progress(&self, done: u64, total: u64, message: &str) {
        self.progress.progress(&self.stage, done, total, message);
    }

    pub fn take_log(&self) -> String {
        std::mem::take(&mut *self.log.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Pipeline, Registry};
    use std::collections::HashMap;

    macro_rules! kind {
        ($t:ident, $name:literal $(, $extra:item)*) => {
            struct $t;
            impl StageKind for $t {
                fn name(&self) -> &'static str {
                    $name
                }
                fn version(&self) -> u32 {
                    1
                }
                fn summary(&self) -> &'static str {
                    ""
                }
                fn params(&self) -> Vec<ParamSpec> {
                    vec![]
                }
                fn inputs(&self) -> Vec<PortSpec> {
                    vec![]
                }
                fn outputs(&self, _: &Params) -> Vec<PortSpec> {
                    vec![PortSpec::one("out", ArtifactType::ANY, "")]
                }
                fn run(&self, _: &RunContext) -> Result<(), StageError> {
                    Ok(())
                }
                $($extra)*
            }
        };
    }
    kind!(Cheap, "cheap", fn local_by_default(&self) -> bool { true });
    // Says nothing: the trait's default (a job under a cluster executor).
    kind!(Costly, "costly");

    #[test]
    fn local_comes_from_the_kind_unless_the_stage_says_and_is_not_keyed() {
        let mut reg = Registry::new();
        reg.register(Cheap).register(Costly);
        let src = r#"(stages: {
            "a": (kind: "cheap"), "b": (kind: "cheap", local: false),
            "c": (kind: "costly"), "d": (kind: "costly", local: true),
        })"#;
        let p = Pipeline::from_source(Path::new("p.ron"), src.into(), &reg).unwrap();
        let local: Vec<(&str, bool)> = p.stages.iter().map(|s| (s.name.as_str(), s.local)).collect();
        assert_eq!(local, [("a", true), ("b", false), ("c", false), ("d", true)]);
        // Where a stage runs is not part of its key: `a` and `b` (same kind and params,
        // one local and one not) share one key, as do `c` and `d`.
        let key = |name: &str| crate::plan::fingerprint(p.stage(name).unwrap(), &BTreeMap::new(), &HashMap::new(), "flex").0.key();
        assert_eq!(key("a"), key("b"));
        assert_eq!(key("c"), key("d"));
    }
}
