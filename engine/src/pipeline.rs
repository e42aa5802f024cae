//! `Pipeline`: a pipeline file checked against the registry. Parameters are
//! type-checked and canonicalised, every input reference resolved and type-checked,
//! and the stages put in a petgraph DAG in topological order. Every problem in the
//! file is collected into one `SpecErrors`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use miette::NamedSource;
use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};

use crate::expand::expand;
use crate::diagnostic::{Locator, MAX_VALUE_BYTES, SpecError, SpecErrors, needs_escape, offset_of, shown};
use crate::kind::{ParamSpec, ParamType, PortSpec, Resources, StageKind};
use crate::registry::Registry;
use crate::spec::{self, InputDecl, Raw};
use crate::value::{Params, SortedMap, Value};

/// The longest stage name accepted (`foreach` names `name@item` included).
pub const MAX_NAME_BYTES: usize = 200;

/// A reference to another stage's output.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct OutputRef {
    pub stage: String,
    pub output: String,
}

impl std::fmt::Display for OutputRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.stage, self.output)
    }
}

/// One checked stage.
pub struct Stage {
    pub name: String,
    pub kind: Arc<dyn StageKind>,
    /// Every parameter, defaults filled in, canonical.
    pub params: Params,
    /// Port -> the outputs feeding it, in file order.
    pub inputs: SortedMap<String, Vec<OutputRef>>,
    pub outputs: Vec<PortSpec>,
    pub resources: Resources,
    /// `Path` parameters: param -> paths as written (relative to the pipeline file).
    pub paths: SortedMap<String, Vec<String>>,
    /// Environment variables whose values are part of the key.
    pub env: Vec<String>,
    /// What a cluster job of this stage asks for (not part of the key).
    pub job: crate::slurm::JobResources,
    /// Runs in the controlling process even under a cluster executor: the stage's
    /// `local:`, else its kind's `local_by_default` (not part of the key).
    pub local: bool,
}

impl Stage {
    /// Stages this one reads from (deduplicated, sorted).
    pub fn upstream(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.inputs.values().flatten().map(|r| r.stage.as_str()).collect();
        v.sort();
        v.dedup();
        v
    }
}

pub struct Pipeline {
    /// The file as given on the command line.
    pub file: PathBuf,
    /// Directory against which `Path` parameters resolve.
    pub dir: PathBuf,
    pub source: Arc<String>,
    pub backend: Option<String>,
    /// The executor the file asks for (`None`: local unless the command line says).
    pub executor: Option<crate::slurm::ExecutorDecl>,
    /// Stages in topological order (ties keep file order).
    pub stages: Vec<Stage>,
    pub graph: DiGraph<String, OutputRef>,
    index: HashMap<String, usize>,
    /// Graph node of each stage, by position in `stages`.
    nodes: Vec<NodeIndex>,
}

impl Pipeline {
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.index.get(name).map(|&i| &self.stages[i])
    }

    pub fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Stages that read from `name`, directly, in pipeline order. Follows the graph's
    /// edges, so asking for every stage's dependents costs the size of the graph.
    pub fn downstream(&self, name: &str) -> Vec<&str> {
        let Some(&i) = self.index.get(name) else { return Vec::new() };
        let mut positions: Vec<usize> =
            self.graph.neighbors_directed(self.nodes[i], petgraph::Direction::Outgoing).filter_map(|n| self.index.get(&self.graph[n]).copied()).collect();
        positions.sort_unstable();
        positions.dedup();
        positions.into_iter().map(|j| self.stages[j].name.as_str()).collect()
    }

    /// Load and check a pipeline file.
    pub fn load(file: &Path, registry: &Registry) -> Result<Pipeline, LoadError> {
        let src = std::fs::read_to_string(file).map_err(|e| LoadError::Io { path: file.to_path_buf(), source: e })?;
        Self::from_source(file, src, registry).map_err(LoadError::Spec)
    }

    pub fn from_source(file: &Path, src: String, registry: &Registry) -> Result<Pipeline, Box<SpecErrors>> {
        let name = file.display().to_string();
        let mk = |errors: Vec<SpecError>, src: &String| {
            Box::new(SpecErrors { file: name.clone(), source_code: NamedSource::new(&name, src.clone()), errors })
        };
        let parsed = match spec::parse(&src) {
            Ok(p) => p,
            Err((message, line, col)) => {
                let off = offset_of(&src, line, col);
                // ron reports a repeated key just after it: point at the key itself.
                let span = if message.starts_with("duplicate key") { key_before(&src, off).unwrap_or((off, 1)) } else { (off, 1) };
                let err = SpecError {
                    message: format!("invalid RON: {message}"),
                    span: span.into(),
                    label: "here".into(),
                    help: Some("a pipeline is `( stages: { \"name\": (kind: \"...\", params: {...}, inputs: {...}) } )`".into()),
                };
                return Err(mk(vec![err], &src));
            }
        };
        let spec::PipelineFile { backend, executor, stages: declared } = parsed;
        // The declarations are consumed as they are checked: the parsed file is not
        // kept beside the checked stages. The locator wants the declared names only
        // for a file it cannot lex, with an error to report: it parses them again then.
        let expanded = expand(declared);
        let reparsed_names = std::iter::once(()).flat_map(|()| spec::parse(&src).map(|f| f.stages.0.into_iter().map(|(n, _)| n)).into_iter().flatten());
        let loc = Locator::new(&src, reparsed_names).with_aliases(&expanded.origin);
        let mut errors = Vec::new();
        let mut err = |span: miette::SourceSpan, message: String, label: &str, help: Option<String>| {
            errors.push(SpecError { message, span, label: label.into(), help });
        };
        for (name, section, field, message) in &expanded.errors {
            err(loc.field(name, section, field.as_deref()), message.clone(), "here", None);
        }
        if let Some(Err(msg)) = backend.as_deref().map(|b| registry.check_backend(b)) {
            err(loc.top_level("backend"), msg, "unknown backend", None);
        }
        if expanded.stages.is_empty() && expanded.errors.is_empty() {
            err(loc.top_level("stages"), "the pipeline declares no stage".into(), "empty", Some("a pipeline needs at least one stage that is not a template".into()));
        }
        // The names are taken out of the declarations (not the declarations copied):
        // `seen` below keeps one copy of each name, each stage the other.
        let mut decls = expanded.stages;
        let mut names: Vec<String> = decls.iter_mut().map(|(n, _)| std::mem::take(n)).collect();

        // Pass 1: kinds and parameters, stage by stage. Each declaration's parameters
        // are converted and dropped here; what pass 2 reads (inputs, resources) stays.
        // Name -> position of its first declaration in `names`: the one name lookup of
        // the load (outputs, graph nodes and references all go through positions).
        let mut seen: HashMap<String, usize> = HashMap::with_capacity(names.len());
        let mut schemas: HashMap<&'static str, KindSchema> = HashMap::new();
        let mut checked: Vec<(usize, Option<Arc<dyn StageKind>>, Params, SortedMap<String, Vec<String>>)> = Vec::with_capacity(names.len());
        // Which of the kind's parameters the stage wrote (converted or not): reused.
        let mut written: Vec<bool> = Vec::new();
        for (at, (sname, (_, decl))) in names.iter().zip(decls.iter_mut()).enumerate() {
            let decl_params = std::mem::take(&mut decl.params);
            let decl_kind = decl.kind.take().unwrap_or_default();
            let decl_kind = decl_kind.as_str();
            match seen.entry(sname.clone()) {
                std::collections::hash_map::Entry::Occupied(_) => {
                    err(loc.stage(sname), format!("stage `{sname}` is defined twice"), "second definition", Some("stage names must be unique".into()));
                    continue;
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(at);
                }
            }
            if sname.contains('.') || sname.is_empty() || sname.chars().any(|c| c.is_control() || needs_escape(c)) {
                err(loc.stage(sname), format!("stage name `{sname}` must be non-empty and contain no `.` and no control characters"), "bad name", None);
            } else if sname.len() > MAX_NAME_BYTES {
                // Names are printed in aligned columns and kept in refs: a bound keeps
                // every table printable (a width over 65535 panics in `format!`).
                let shown = crate::diagnostic::clip(sname, 40);
                err(loc.stage(sname), format!("stage name `{shown}` is {} bytes long: at most {MAX_NAME_BYTES}", sname.len()), "name too long", None);
            }
            let Some(kind) = registry.get(decl_kind) else {
                err(
                    loc.field(sname, "kind", None),
                    format!("stage `{sname}`: unknown kind `{decl_kind}`"),
                    "unknown kind",
                    Some(format!("known kinds: {}", registry.names().join(", "))),
                );
                checked.push((at, None, Params::default(), SortedMap::new()));
                continue;
            };
            let schema = schemas.entry(kind.name()).or_insert_with(|| KindSchema::of(&**kind));
            let specs = &schema.params;
            // One canonical form for every parameter, written or defaulted: the value
            // goes through `convert`, then `Path` values are set aside as sources. So
            // writing a default explicitly never changes a key.
            let mut params = SortedMap::with_capacity(specs.len());
            written.clear();
            written.resize(specs.len(), false);
            for (pname, raw) in decl_params.0 {
                let Some(at_spec) = specs.iter().position(|p| p.name == pname) else {
                    let known: Vec<&str> = specs.iter().map(|p| p.name).collect();
                    err(
                        loc.field(sname, "params", Some(&pname)),
                        format!("stage `{sname}`: unknown parameter `{pname}` for kind `{decl_kind}`"),
                        "unknown parameter",
                        Some(if known.is_empty() { "this kind takes no parameters".into() } else { format!("parameters of `{decl_kind}`: {}", known.join(", ")) }),
                    );
                    continue;
                };
                let ps = &specs[at_spec];
                written[at_spec] = true;
                match convert(raw, &ps.ty) {
                    Ok(v) => {
                        params.insert(pname, v);
                    }
                    Err(msg) => err(
                        loc.field(sname, "params", Some(&pname)),
                        format!("stage `{sname}`: parameter `{pname}`: expected {}, {msg}", ps.ty),
                        "wrong type",
                        (!ps.doc.is_empty()).then(|| format!("`{pname}`: {}", ps.doc)),
                    ),
                }
            }
            for ((ps, default), &given) in specs.iter().zip(&schema.defaults).zip(&written) {
                if given {
                    continue;
                }
                match default {
                    Some(d) => match d {
                        Ok(v) => {
                            params.insert(ps.name.to_string(), v.clone());
                        }
                        Err(msg) => err(
                            loc.stage(sname),
                            format!("kind `{decl_kind}`: the default of parameter `{}` is not a {}: {msg}", ps.name, ps.ty),
                            "in this stage",
                            Some("a bug in the stage kind: give the parameter explicitly".into()),
                        ),
                    },
                    None => err(
                        loc.stage(sname),
                        format!("stage `{sname}`: missing required parameter `{}` ({})", ps.name, ps.ty),
                        "in this stage",
                        (!ps.doc.is_empty()).then(|| format!("`{}`: {}", ps.name, ps.doc)),
                    ),
                }
            }
            let paths: SortedMap<String, Vec<String>> =
                specs.iter().filter_map(|ps| params.get(ps.name).and_then(|v| path_strings(v, &ps.ty)).map(|list| (ps.name.to_string(), list))).collect();
            let params = Params(params);
            if specs.iter().all(|ps| params.0.contains_key(ps.name)) {
                for (field, msg) in kind.validate(&params) {
                    err(loc.field(sname, "params", Some(&field)), format!("stage `{sname}`: parameter `{field}`: {msg}"), "invalid value", None);
                }
            }
            checked.push((at, Some(kind.clone()), params, paths));
        }

        // Pass 2: inputs, now that every stage's outputs are known.
        // By position in `names`: the outputs of each checked stage, and its position
        // among the stages (`usize::MAX`: none, e.g. an unknown kind).
        let mut outputs_of: Vec<Option<Vec<PortSpec>>> = (0..names.len()).map(|_| None).collect();
        let mut stage_at = vec![usize::MAX; names.len()];
        for (at, k, p, _) in &checked {
            if let Some(k) = k {
                outputs_of[*at] = Some(k.outputs(p));
            }
        }
        let mut stages = Vec::with_capacity(checked.len());
        let mut stage_names_at = Vec::with_capacity(checked.len());
        for (at, kind, params, paths) in checked {
            let Some(kind) = kind else { continue };
            stage_at[at] = stages.len();
            stage_names_at.push(at);
            let (sname, decl) = (std::mem::take(&mut names[at]), &mut decls[at].1);
            let decl_inputs = std::mem::take(&mut decl.inputs);
            let decl_kind = kind.name();
            let ports = &schemas[kind.name()].inputs;
            let mut inputs = SortedMap::with_capacity(decl_inputs.len());
            for (port, decl_in) in &decl_inputs {
                // A `*` port accepts inputs under any name (the `command` kind's).
                let Some(ps) = ports.iter().find(|p| &p.name == port).or_else(|| ports.iter().find(|p| p.name == "*")) else {
                    let known: Vec<&str> = ports.iter().map(|p| p.name.as_str()).collect();
                    err(
                        loc.field(&sname, "inputs", Some(port)),
                        format!("stage `{sname}`: unknown input `{port}` for kind `{decl_kind}`"),
                        "unknown input",
                        Some(if known.is_empty() { "this kind takes no inputs".into() } else { format!("inputs of `{decl_kind}`: {}", known.join(", ")) }),
                    );
                    continue;
                };
                if let (InputDecl::Many(_), false) = (decl_in, ps.many) {
                    err(loc.field(&sname, "inputs", Some(port)), format!("stage `{sname}`: input `{port}` takes one artifact, not a list"), "a list", None);
                    continue;
                }
                let written = decl_in.refs();
                let mut refs = Vec::with_capacity(written.len());
                for r in written {
                    // Located only when there is an error to report.
                    let span = || loc.field(&sname, "inputs", Some(port));
                    let Some((up, out)) = spec::split_ref(r) else {
                        err(span(), format!("stage `{sname}`: input `{port}`: `{r}` is not of the form \"stage.output\""), "bad reference", None);
                        continue;
                    };
                    let Some(up_outputs) = seen.get(up).and_then(|&u| outputs_of[u].as_ref()) else {
                        if seen.contains_key(up) {
                            continue; // its own error (e.g. unknown kind) was reported
                        }
                        err(span(), format!("stage `{sname}`: input `{port}` refers to a missing stage `{up}`"), "no such stage", Some(format!("stages: {}", seen.keys().cloned().collect::<std::collections::BTreeSet<_>>().into_iter().collect::<Vec<_>>().join(", "))));
                        continue;
                    };
                    let Some(op) = up_outputs.iter().find(|o| o.name == out) else {
                        err(
                            span(),
                            format!("stage `{sname}`: input `{port}`: stage `{up}` has no output `{out}`"),
                            "no such output",
                            Some(format!("outputs of `{up}`: {}", up_outputs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>().join(", "))),
                        );
                        continue;
                    };
                    if !ps.ty.accepts(op.ty) {
                        err(span(), format!("stage `{sname}`: input `{port}` expects `{}` but `{r}` is `{}`", ps.ty, op.ty), "type mismatch", None);
                        continue;
                    }
                    refs.push(OutputRef { stage: up.to_string(), output: out.to_string() });
                }
                inputs.insert(port.clone(), refs);
            }
            for ps in ports {
                if ps.name != "*" && !ps.optional && !decl_inputs.contains_key(&ps.name) {
                    err(loc.stage(&sname), format!("stage `{sname}`: missing input `{}` ({})", ps.name, ps.ty), "in this stage", (!ps.doc.is_empty()).then(|| ps.doc.to_string()));
                }
            }
            // Filled in from `outputs_of` once no input refers to it any more.
            let outputs = Vec::new();
            let resources = decl.resources.unwrap_or_else(|| kind.resources(&params));
            let env = kind.env(&params);
            let (job, local) = (decl.job.take().map(|j| *j).unwrap_or_default(), decl.local.unwrap_or_else(|| kind.local_by_default()));
            stages.push(Stage { name: sname, kind, params, inputs, outputs, resources, paths, env, job, local });
        }

        drop((decls, names));
        for (s, &at) in stages.iter_mut().zip(&stage_names_at) {
            s.outputs = outputs_of[at].take().unwrap_or_default();
        }
        drop((outputs_of, stage_names_at));

        // Pass 3: the graph (node i is stage i). Cycles are reported with their path.
        let mut graph = DiGraph::with_capacity(stages.len(), stages.len());
        for s in &stages {
            graph.add_node(s.name.clone());
        }
        for (i, s) in stages.iter().enumerate() {
            for r in s.inputs.values().flatten() {
                // Every reference kept in pass 2 names a checked stage.
                if let Some(&from) = seen.get(r.stage.as_str()).map(|&u| &stage_at[u]).filter(|&&j| j != usize::MAX) {
                    graph.add_edge(NodeIndex::new(from), NodeIndex::new(i), r.clone());
                }
            }
        }
        drop(stage_at);
        // Kahn's algorithm leaves out exactly the stages on or behind a cycle.
        let order = file_ordered_topo(&graph);
        if order.len() != graph.node_count() {
            for scc in tarjan_scc(&graph) {
                let cyclic = scc.len() > 1 || graph.contains_edge(scc[0], scc[0]);
                if cyclic {
                    let cycle = cycle_path(&graph, &scc);
                    err(loc.stage(&cycle[0]), format!("the stages form a cycle: {}", cycle.join(" -> ")), "part of a cycle", Some("a pipeline must be a DAG: remove one of these inputs".into()));
                }
            }
        }
        if !errors.is_empty() {
            return Err(mk(errors, &src));
        }
        // It borrows `src`, which the pipeline takes over below.
        drop(loc);
        // Stages are usually declared upstream first: then file order is already
        // topological and nothing is moved.
        let (stages, nodes): (Vec<Stage>, Vec<NodeIndex>) = if order.iter().enumerate().all(|(i, n)| n.index() == i) {
            (stages, order)
        } else {
            let mut by_node: Vec<Option<Stage>> = stages.into_iter().map(Some).collect();
            order.iter().filter_map(|n| by_node[n.index()].take().map(|s| (s, *n))).unzip()
        };
        // Without errors, every declared name is a stage at its own position in file
        // order: `seen` is already the index unless the stages were reordered.
        let mut index = seen;
        if nodes.iter().enumerate().any(|(i, n)| n.index() != i) {
            for (i, s) in stages.iter().enumerate() {
                if let Some(slot) = index.get_mut(s.name.as_str()) {
                    *slot = i;
                }
            }
        }
        let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
        Ok(Pipeline { file: file.to_path_buf(), dir, source: Arc::new(src), backend, executor, stages, graph, index, nodes })
    }
}

/// What checking a stage needs of its kind that does not depend on the stage: the
/// parameter and input schemas and the canonical defaults, asked of the kind once
/// per load rather than once per stage (a kind's schema is fixed).
struct KindSchema {
    params: Vec<ParamSpec>,
    /// Parallel to `params`: the default, converted as a written value would be
    /// (`None`: required; `Err`: a default that does not fit its type).
    defaults: Vec<Option<Result<Value, String>>>,
    inputs: Vec<PortSpec>,
}

impl KindSchema {
    fn of(kind: &dyn StageKind) -> KindSchema {
        let params = kind.params();
        let defaults = params.iter().map(|ps| ps.default.as_ref().map(|d| convert(to_raw(d), &ps.ty))).collect();
        KindSchema { params, defaults, inputs: kind.inputs() }
    }
}

/// Topological order that keeps file order among independent stages (Kahn's algorithm
/// with the smallest ready index first), so output and scheduling follow the file.
/// Stages on a cycle, and those downstream of one, are left out. (petgraph's
/// `toposort` orders by DFS.)
fn file_ordered_topo(graph: &DiGraph<String, OutputRef>) -> Vec<NodeIndex> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let mut indegree: Vec<usize> = graph.node_indices().map(|n| graph.neighbors_directed(n, petgraph::Direction::Incoming).count()).collect();
    let mut ready: BinaryHeap<Reverse<usize>> = graph.node_indices().filter(|n| indegree[n.index()] == 0).map(|n| Reverse(n.index())).collect();
    let mut order = Vec::with_capacity(graph.node_count());
    while let Some(Reverse(i)) = ready.pop() {
        let n = NodeIndex::new(i);
        order.push(n);
        for m in graph.neighbors_directed(n, petgraph::Direction::Outgoing) {
            indegree[m.index()] -= 1;
            if indegree[m.index()] == 0 {
                ready.push(Reverse(m.index()));
            }
        }
    }
    order
}

/// A concrete cycle through a strongly connected component, ending where it starts.
fn cycle_path(graph: &DiGraph<String, OutputRef>, scc: &[NodeIndex]) -> Vec<String> {
    let start = *scc.iter().min_by_key(|n| n.index()).expect("an SCC is never empty");
    let mut path = vec![start];
    let mut cur = start;
    loop {
        let next = graph.neighbors(cur).filter(|n| scc.contains(n)).min_by_key(|n| n.index()).expect("every node of an SCC has a successor inside it");
        if let Some(i) = path.iter().position(|&p| p == next) {
            let mut cyc: Vec<String> = path[i..].iter().map(|n| graph[*n].clone()).collect();
            cyc.push(graph[next].clone());
            return cyc;
        }
        path.push(next);
        cur = next;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read pipeline file {}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Spec(Box<SpecErrors>),
}

/// Type-check and canonicalise one value as written, moving its strings.
fn convert(v: Raw, ty: &ParamType) -> Result<Value, String> {
    let found = |v: &Raw| -> String {
        match v {
            Raw::Bool(b) => format!("found `{b}`"),
            Raw::Int(_) | Raw::UInt(_) | Raw::Float(_) => format!("found `{}`", number_text(v)),
            Raw::Str(s) => format!("found \"{}\"", shown(s, MAX_VALUE_BYTES)),
            Raw::Seq(_) => "found a list".into(),
            Raw::Map(_) => "found a map".into(),
            Raw::Unit => "found `()`".into(),
            Raw::Option(_) => "found an option".into(),
            Raw::Char(c) => format!("found '{}'", shown(&c.to_string(), MAX_VALUE_BYTES)),
            Raw::Bytes(_) => "found bytes".into(),
        }
    };
    match (ty, v) {
        (ParamType::Bool, Raw::Bool(b)) => Ok(Value::Bool(b)),
        (ParamType::Int, v @ (Raw::Int(_) | Raw::UInt(_) | Raw::Float(_))) => int_of(&v).map(Value::Int).ok_or_else(|| found(&v)),
        (ParamType::Float, v @ (Raw::Int(_) | Raw::UInt(_) | Raw::Float(_))) => {
            let x = float_of(&v);
            if x.is_finite() { Ok(Value::Float(x)) } else { Err(format!("{} (must be finite)", found(&v))) }
        }
        (ParamType::Str, Raw::Str(s)) => Ok(Value::Str(s)),
        (ParamType::Enum(options), Raw::Str(s)) => {
            if options.contains(&s.as_str()) { Ok(Value::Str(s)) } else { Err(found(&Raw::Str(s))) }
        }
        (ParamType::Path, Raw::Str(s)) if !s.is_empty() => Ok(Value::Str(s)),
        (ParamType::List(t), Raw::Seq(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                out.push(convert(item, t).map_err(|e| format!("element {i}: {e}"))?);
            }
            Ok(Value::List(out))
        }
        (ParamType::StrMap, Raw::Map(m)) => {
            // Keys are unique (a repeated one is a syntax error), so collecting only sorts.
            let mut out = Vec::with_capacity(m.len());
            for (k, val) in m {
                match (k, val) {
                    (Raw::Str(k), Raw::Str(s)) => out.push((k, Value::Str(s))),
                    _ => return Err("found a map with non-string keys or values".into()),
                }
            }
            Ok(Value::Map(out.into_iter().collect()))
        }
        (_, v) => Err(found(&v)),
    }
}

/// The quoted key whose text starts at `off` (ron points just inside the quote).
fn key_before(src: &str, off: usize) -> Option<(usize, usize)> {
    let at = off.checked_sub(1).filter(|&at| src.as_bytes().get(at) == Some(&b'"'))?;
    Some((at, crate::diagnostic::token_len(src, at).max(1)))
}

/// A canonical value back as written, so defaults go through the same `convert` as
/// written values.
fn to_raw(v: &Value) -> Raw {
    match v {
        Value::Bool(b) => Raw::Bool(*b),
        Value::Int(i) => Raw::Int(*i),
        Value::Float(x) => Raw::Float(*x),
        Value::Str(s) => Raw::Str(s.clone()),
        Value::List(items) => Raw::Seq(items.iter().map(to_raw).collect()),
        Value::Map(m) => Raw::Map(m.iter().map(|(k, x)| (Raw::Str(k.clone()), to_raw(x))).collect()),
    }
}

/// A written number as an integer, if it is one (ron reads `1.0` as a float).
fn int_of(n: &Raw) -> Option<i64> {
    match *n {
        Raw::Int(x) => Some(x),
        Raw::UInt(x) => i64::try_from(x).ok(),
        _ => None,
    }
}

fn float_of(n: &Raw) -> f64 {
    match *n {
        Raw::Int(x) => x as f64,
        Raw::UInt(x) => x as f64,
        Raw::Float(x) => x,
        _ => f64::NAN,
    }
}

fn number_text(n: &Raw) -> String {
    int_of(n).map(|i| i.to_string()).unwrap_or_else(|| float_of(n).to_string())
}

/// The path strings of a `Path` or `List(Path)` parameter.
fn path_strings(v: &Value, ty: &ParamType) -> Option<Vec<String>> {
    match (ty, v) {
        (ParamType::Path, Value::Str(s)) => Some(vec![s.clone()]),
        (ParamType::List(ParamType::Path), Value::List(items)) => {
            Some(items.iter().filter_map(|i| if let Value::Str(s) = i { Some(s.clone()) } else { None }).collect())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind::{ArtifactType, ParamSpec, RunContext, StageError};

    /// A step of a chain: one optional input, one output, one string parameter.
    struct Step;
    impl StageKind for Step {
        fn name(&self) -> &'static str {
            "step"
        }
        fn version(&self) -> u32 {
            1
        }
        fn summary(&self) -> &'static str {
            "a chain step"
        }
        fn params(&self) -> Vec<ParamSpec> {
            vec![ParamSpec::required("v", ParamType::Str, "")]
        }
        fn inputs(&self) -> Vec<PortSpec> {
            vec![PortSpec::one("prev", ArtifactType("t"), "").optional()]
        }
        fn outputs(&self, _: &Params) -> Vec<PortSpec> {
            vec![PortSpec::one("out", ArtifactType("t"), "")]
        }
        fn run(&self, _: &RunContext) -> Result<(), StageError> {
            Ok(())
        }
    }

    fn chain(n: usize, bad: &[usize]) -> String {
        let mut s = String::from("(\n    stages: {\n");
        for i in 0..n {
            let param = if bad.contains(&i) { "w" } else { "v" };
            let input = if i == 0 { String::new() } else { format!("inputs: {{ \"prev\": \"s{}.out\" }}, ", i - 1) };
            s.push_str(&format!("        \"s{i}\": (kind: \"step\", {input}params: {{ \"{param}\": \"x{i}\" }}),\n"));
        }
        s.push_str("    },\n)\n");
        s
    }

    fn registry() -> Registry {
        let mut r = Registry::new();
        r.register(Step);
        r
    }

    /// Loading a valid file never searches its text for names (that was quadratic in
    /// the number of stages); a file with errors is indexed once, however many errors.
    #[test]
    fn loading_scans_the_text_only_to_report_errors_and_then_once() {
        let r = registry();
        let before = crate::diagnostic::text_scans();
        let p = Pipeline::from_source(Path::new("chain.ron"), chain(3000, &[]), &r).expect("a valid chain");
        assert_eq!(p.stages.len(), 3000);
        assert_eq!(crate::diagnostic::text_scans(), before, "a valid pipeline must load without locating anything");
        assert_eq!(p.downstream("s10"), vec!["s11"]);
        assert!(p.downstream("s2999").is_empty());

        let src = chain(3000, &[5, 1500, 2999]);
        let before = crate::diagnostic::text_scans();
        let errs = Pipeline::from_source(Path::new("chain.ron"), src.clone(), &r).err().expect("three bad stages");
        assert_eq!(crate::diagnostic::text_scans(), before + 1, "one index of the text for all errors");
        // Each unknown parameter and each missing one, at its own stage's line.
        let lines = errs.lines();
        assert_eq!(lines.len(), 6, "{lines:#?}");
        for i in [5usize, 1500, 2999] {
            let line = i + 3;
            assert!(lines.iter().any(|l| l.starts_with(&format!("chain.ron:{line}:")) && l.contains(&format!("stage `s{i}`: unknown parameter `w`"))), "{lines:#?}");
        }
    }
}
