//! The pipeline file as written: RON parsed into plain serde types, before any
//! checking against stage kinds. Stage order in the file is kept (it orders output).
//! A key repeated in any map of a stage (`params`, `inputs`, `first`, or a map value
//! inside a parameter) is a syntax error at that key: ron itself would keep the last.

use std::fmt;
use std::marker::PhantomData;

use indexmap::IndexMap;
use serde::de::{MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::diagnostic::{MAX_VALUE_BYTES, shown};

use crate::kind::Resources;

/// `( backend: "flex", stages: { "name": (kind: ..., params: {...}, inputs: {...}) } )`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Default compute backend for backend-sensitive stages (`--backend` overrides).
    #[serde(default)]
    pub backend: Option<String>,
    /// Where stages run: `Local` (the default) or `Slurm(partition: ..., ...)`
    /// (`fgflow run --executor` and its flags override).
    #[serde(default)]
    pub executor: Option<crate::slurm::ExecutorDecl>,
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
    #[serde(default, deserialize_with = "unique_map")]
    pub first: IndexMap<String, InputDecl>,
    #[serde(default, deserialize_with = "params_map")]
    pub params: IndexMap<String, ron::Value>,
    #[serde(default, deserialize_with = "unique_map")]
    pub inputs: IndexMap<String, InputDecl>,
    /// Overrides the kind's resource class (`Light`, `Heavy`, `Gpu`).
    #[serde(default)]
    pub resources: Option<Resources>,
    /// What a cluster job of this stage asks for (cpus, mem, time, gpus); unset fields
    /// come from the executor's defaults. Not part of the key.
    #[serde(default)]
    pub job: Option<crate::slurm::JobResources>,
    /// Run in the controlling process even under a cluster executor (light stages).
    #[serde(default)]
    pub local: Option<bool>,
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

fn duplicate<E: serde::de::Error>(key: &str) -> E {
    E::custom(format!("duplicate key \"{}\": each key may appear once in a map", shown(key, MAX_VALUE_BYTES)))
}

/// A string-keyed map that rejects a repeated key (at the repeated key).
fn unique_map<'de, D: Deserializer<'de>, V: Deserialize<'de>>(d: D) -> Result<IndexMap<String, V>, D::Error> {
    struct M<V>(PhantomData<V>);
    impl<'de, V: Deserialize<'de>> Visitor<'de> for M<V> {
        type Value = IndexMap<String, V>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map with string keys")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = IndexMap::new();
            while let Some(k) = map.next_key::<String>()? {
                if out.contains_key(&k) {
                    return Err(duplicate(&k));
                }
                let v = map.next_value::<V>()?;
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(M(PhantomData))
}

/// `params`: unique keys, and values whose own maps have unique keys too.
fn params_map<'de, D: Deserializer<'de>>(d: D) -> Result<IndexMap<String, ron::Value>, D::Error> {
    Ok(unique_map::<D, Strict>(d)?.into_iter().map(|(k, v)| (k, v.0)).collect())
}

/// A `ron::Value` read like ron's own, except that a map with a repeated key is an error.
struct Strict(ron::Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Strict;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a RON value")
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Strict, E> {
        Ok(Strict(ron::Value::Bool(v)))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Strict, E> {
        Ok(Strict(ron::Value::Number(ron::Number::new(v))))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Strict, E> {
        Ok(Strict(ron::Value::Number(ron::Number::new(v))))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Strict, E> {
        Ok(Strict(ron::Value::Number(ron::Number::new(v))))
    }
    fn visit_char<E: serde::de::Error>(self, v: char) -> Result<Strict, E> {
        Ok(Strict(ron::Value::Char(v)))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Strict, E> {
        Ok(Strict(ron::Value::String(v.to_owned())))
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Strict, E> {
        Ok(Strict(ron::Value::String(v)))
    }
    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Strict, E> {
        Ok(Strict(ron::Value::Bytes(v.to_vec())))
    }
    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Strict, E> {
        Ok(Strict(ron::Value::Bytes(v)))
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<Strict, E> {
        Ok(Strict(ron::Value::Option(None)))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Strict, D::Error> {
        Ok(Strict(ron::Value::Option(Some(Box::new(Strict::deserialize(d)?.0)))))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Strict, E> {
        Ok(Strict(ron::Value::Unit))
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Strict, D::Error> {
        Strict::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Strict(ron::Value::Seq(out)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut out = ron::Map::new();
        while let Some(Strict(k)) = map.next_key()? {
            if out.get(&k).is_some() {
                let shown_key = match &k {
                    ron::Value::String(s) => s.clone(),
                    other => format!("{other:?}"),
                };
                return Err(duplicate(&shown_key));
            }
            let Strict(v) = map.next_value()?;
            out.insert(k, v);
        }
        Ok(Strict(ron::Value::Map(out)))
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

