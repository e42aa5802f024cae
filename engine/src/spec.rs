//! The pipeline file as written: RON parsed into plain serde types, before any
//! checking against stage kinds. Stage order in the file is kept (it orders output).

use std::fmt;

use indexmap::IndexMap;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::kind::Resources;

/// `( backend: "flex", stages: { "name": (kind: ..., params: {...}, inputs: {...}) } )`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Default compute backend for backend-sensitive stages (`--backend` overrides).
    #[serde(default)]
    pub backend: Option<String>,
    pub stages: StageMap,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageDecl {
    /// Required, unless inherited through `extends`.
    #[serde(default)]
    pub kind: Option<String>,
    /// Inherit kind, params, inputs and resources from another declaration (this
    /// one's entries win), like the seed's `_base_` configs.
    #[serde(default)]
    pub extends: Option<String>,
    /// A declaration that only serves as a base for `extends`: not a stage itself.
    #[serde(default)]
    pub template: bool,
    /// Expand into one stage per item, named `name@item`; `{item}`, `{index}` and
    /// `{prev_item}` are substituted in strings (a string that is exactly `{index}`
    /// becomes that integer).
    #[serde(default)]
    pub foreach: Option<Vec<String>>,
    /// Inputs of the first item, replacing those that mention `{prev_item}`.
    #[serde(default)]
    pub first: IndexMap<String, InputDecl>,
    #[serde(default)]
    pub params: IndexMap<String, ron::Value>,
    #[serde(default)]
    pub inputs: IndexMap<String, InputDecl>,
    /// Overrides the kind's resource class (`Light`, `Heavy`, `Gpu`).
    #[serde(default)]
    pub resources: Option<Resources>,
}

/// `"stage.output"` or a list of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum InputDecl {
    One(String),
    Many(Vec<String>),
}

impl InputDecl {
    pub fn refs(&self) -> Vec<&str> {
        match self {
            InputDecl::One(s) => vec![s.as_str()],
            InputDecl::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// Stages in file order; duplicate names are kept so they can be reported.
#[derive(Debug, Default)]
pub struct StageMap(pub Vec<(String, StageDecl)>);

impl<'de> Deserialize<'de> for StageMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StageMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of stage name to stage")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StageMap, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, StageDecl>()? {
                    out.push((k, v));
                }
                Ok(StageMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Parse RON text. On a syntax or shape error returns (message, line, col).
pub fn parse(src: &str) -> Result<PipelineFile, (String, usize, usize)> {
    ron::Options::default().with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME).from_str::<PipelineFile>(src).map_err(|e| (e.code.to_string(), e.span.start.line, e.span.start.col))
}

/// Split `"stage.output"`.
pub fn split_ref(r: &str) -> Option<(&str, &str)> {
    let (s, o) = r.rsplit_once('.')?;
    (!s.is_empty() && !o.is_empty()).then_some((s, o))
}

