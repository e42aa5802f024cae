//! The pipeline file as written: RON parsed into plain serde types, before any
//! checking against stage kinds. Stage order in the file is kept (it orders output).
//! A key repeated in any map of a stage (`params`, `inputs`, `first`, or a map value
//! inside a parameter) is a syntax error at that key: ron itself would keep the last.
//! Parameters are read into [`Raw`], this module's own value (ron's model, maps kept as
//! vectors): a file of 10^5 stages would otherwise hold a B-tree node per map value.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
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

#[derive(Debug, Clone, Default, Deserialize)]
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
    pub first: Entries<InputDecl>,
    #[serde(default, deserialize_with = "unique_map")]
    pub params: Entries<Raw>,
    #[serde(default, deserialize_with = "unique_map")]
    pub inputs: Entries<InputDecl>,
    /// Overrides the kind's resource class (`Light`, `Heavy`, `Gpu`).
    #[serde(default)]
    pub resources: Option<Resources>,
    /// What a cluster job of this stage asks for (cpus, mem, time, gpus); unset fields
    /// come from the executor's defaults. Not part of the key. Boxed: rare, and a
    /// declaration is kept per stage until it is checked.
    #[serde(default)]
    pub job: Option<Box<crate::slurm::JobResources>>,
    /// Run in the controlling process even under a cluster executor (light stages).
    #[serde(default)]
    pub local: Option<bool>,
}

/// `"stage.output"` or a list of them.
#[derive(Debug, Clone)]
pub enum InputDecl {
    One(String),
    Many(Vec<String>),
}

/// As `#[serde(untagged)]` would read it (same error), without first buffering every
/// input of the file into serde's generic content tree.
impl<'de> Deserialize<'de> for InputDecl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        fn mismatch<E: serde::de::Error>() -> E {
            E::custom("data did not match any variant of untagged enum InputDecl")
        }
        impl<'de> Visitor<'de> for V {
            type Value = InputDecl;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a reference `stage.output` or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<InputDecl, E> {
                Ok(InputDecl::One(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<InputDecl, E> {
                Ok(InputDecl::One(v))
            }
            fn visit_char<E: serde::de::Error>(self, v: char) -> Result<InputDecl, E> {
                Ok(InputDecl::One(v.to_string()))
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<InputDecl, E> {
                std::str::from_utf8(v).map(|s| InputDecl::One(s.to_owned())).map_err(|_| mismatch())
            }
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<InputDecl, E> {
                Err(mismatch())
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<InputDecl, E> {
                Err(mismatch())
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<InputDecl, E> {
                Err(mismatch())
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<InputDecl, E> {
                Err(mismatch())
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<InputDecl, E> {
                Err(mismatch())
            }
            fn visit_none<E: serde::de::Error>(self) -> Result<InputDecl, E> {
                Err(mismatch())
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<InputDecl, D::Error> {
                d.deserialize_any(IgnoredAny)?;
                Err(mismatch())
            }
            fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<InputDecl, D::Error> {
                d.deserialize_any(IgnoredAny)?;
                Err(mismatch())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<InputDecl, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Err(mismatch())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<InputDecl, A::Error> {
                // The whole list is read before it is judged, as untagged reads a value.
                let mut out = Vec::new();
                let mut all_strings = true;
                while let Some(item) = seq.next_element::<Raw>()? {
                    match item {
                        Raw::Str(s) if all_strings => out.push(s),
                        _ => all_strings = false,
                    }
                }
                if all_strings { Ok(InputDecl::Many(out)) } else { Err(mismatch()) }
            }
        }
        d.deserialize_any(V)
    }
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

/// A map of a declaration as written: entries in file order, each key once. A vector:
/// these maps hold a few entries each, and a hash table per map was most of a parsed
/// declaration's size at 10^5 stages. Lookups scan (a handful of entries).
#[derive(Debug, Clone, PartialEq)]
pub struct Entries<V>(pub Vec<(String, V)>);

impl<V> Default for Entries<V> {
    fn default() -> Self {
        Entries(Vec::new())
    }
}

impl<V> Entries<V> {
    pub fn get(&self, key: &str) -> Option<&V> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Replaces the value of a present key in place (its position kept), else appends,
    /// as `IndexMap::insert` does.
    pub fn insert(&mut self, key: String, value: V) {
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key, value)),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a, V> IntoIterator for &'a Entries<V> {
    type Item = (&'a String, &'a V);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (String, V)>, fn(&'a (String, V)) -> (&'a String, &'a V)>;
    fn into_iter(self) -> Self::IntoIter {
        fn pair<K, V>(e: &(K, V)) -> (&K, &V) {
            (&e.0, &e.1)
        }
        self.0.iter().map(pair as fn(&'a (String, V)) -> (&'a String, &'a V))
    }
}

impl<V> FromIterator<(String, V)> for Entries<V> {
    fn from_iter<I: IntoIterator<Item = (String, V)>>(iter: I) -> Self {
        Entries(iter.into_iter().collect())
    }
}

/// Above this many entries, repeated keys are found through a set rather than a scan,
/// so a hostile map of many keys stays linear.
const SCAN_KEYS: usize = 16;

/// A string-keyed map that rejects a repeated key (at the repeated key).
fn unique_map<'de, D: Deserializer<'de>, V: Deserialize<'de>>(d: D) -> Result<Entries<V>, D::Error> {
    struct M<V>(PhantomData<V>);
    impl<'de, V: Deserialize<'de>> Visitor<'de> for M<V> {
        type Value = Entries<V>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map with string keys")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out: Vec<(String, V)> = Vec::with_capacity(map.size_hint().unwrap_or(0).min(SCAN_KEYS));
            let mut many: Option<std::collections::HashSet<String>> = None;
            while let Some(k) = map.next_key::<String>()? {
                let repeated = match &mut many {
                    Some(set) => !set.insert(k.clone()),
                    None => out.iter().any(|(x, _)| *x == k),
                };
                if repeated {
                    return Err(duplicate(&k));
                }
                let v = map.next_value::<V>()?;
                out.push((k, v));
                if many.is_none() && out.len() > SCAN_KEYS {
                    many = Some(out.iter().map(|(k, _)| k.clone()).collect());
                }
            }
            Ok(Entries(out))
        }
    }
    d.deserialize_map(M(PhantomData))
}

/// A parameter value as written, before its kind says what it must be: ron's value
/// model (a number is an `Int`, `UInt` or `Float` as ron reports it), except that a
/// map is a vector of entries in file order, and a map with a repeated key is an error.
#[derive(Debug, Clone, PartialEq)]
pub enum Raw {
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Char(char),
    Str(String),
    Bytes(Vec<u8>),
    Unit,
    Option(Option<Box<Raw>>),
    Seq(Vec<Raw>),
    Map(Vec<(Raw, Raw)>),
}

impl Raw {
    /// As ron's own value (for messages that show a value the way ron prints it).
    pub fn to_ron(&self) -> ron::Value {
        match self {
            Raw::Bool(b) => ron::Value::Bool(*b),
            Raw::Int(i) => ron::Value::Number(ron::Number::new(*i)),
            Raw::UInt(u) => ron::Value::Number(ron::Number::new(*u)),
            Raw::Float(x) => ron::Value::Number(ron::Number::new(*x)),
            Raw::Char(c) => ron::Value::Char(*c),
            Raw::Str(s) => ron::Value::String(s.clone()),
            Raw::Bytes(b) => ron::Value::Bytes(b.clone()),
            Raw::Unit => ron::Value::Unit,
            Raw::Option(o) => ron::Value::Option(o.as_ref().map(|x| Box::new(x.to_ron()))),
            Raw::Seq(items) => ron::Value::Seq(items.iter().map(Raw::to_ron).collect()),
            Raw::Map(m) => ron::Value::Map(m.iter().map(|(k, v)| (k.to_ron(), v.to_ron())).collect()),
        }
    }
}

/// Keys are the same as ron's values would be (its own equality for numbers).
fn same_key(a: &Raw, b: &Raw) -> bool {
    match (a, b) {
        (Raw::Str(a), Raw::Str(b)) => a == b,
        (Raw::Str(_), _) | (_, Raw::Str(_)) => false,
        _ => a.to_ron() == b.to_ron(),
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a RON value")
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Raw, E> {
        Ok(Raw::Bool(v))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Raw, E> {
        Ok(Raw::Int(v))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Raw, E> {
        Ok(Raw::UInt(v))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Raw, E> {
        Ok(Raw::Float(v))
    }
    fn visit_char<E: serde::de::Error>(self, v: char) -> Result<Raw, E> {
        Ok(Raw::Char(v))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw::Str(v.to_owned()))
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Raw, E> {
        Ok(Raw::Str(v))
    }
    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Raw, E> {
        Ok(Raw::Bytes(v.to_vec()))
    }
    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Raw, E> {
        Ok(Raw::Bytes(v))
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<Raw, E> {
        Ok(Raw::Option(None))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
        Ok(Raw::Option(Some(Box::new(Raw::deserialize(d)?))))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Raw, E> {
        Ok(Raw::Unit)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
        Raw::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(v) = seq.next_element()? {
            out.push(v);
        }
        Ok(Raw::Seq(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        let mut out: Vec<(Raw, Raw)> = Vec::with_capacity(map.size_hint().unwrap_or(0).min(SCAN_KEYS));
        // Past a few entries, keys are compared as ron's ordered values (a float key
        // has no hash of its own).
        let mut many: Option<std::collections::BTreeSet<ron::Value>> = None;
        while let Some(k) = map.next_key::<Raw>()? {
            let repeated = match &mut many {
                Some(set) => !set.insert(k.to_ron()),
                None => out.iter().any(|(x, _)| same_key(x, &k)),
            };
            if repeated {
                let shown_key = match &k {
                    Raw::Str(s) => s.clone(),
                    other => format!("{:?}", other.to_ron()),
                };
                return Err(duplicate(&shown_key));
            }
            let v = map.next_value()?;
            out.push((k, v));
            if many.is_none() && out.len() > SCAN_KEYS {
                many = Some(out.iter().map(|(k, _)| k.to_ron()).collect());
            }
        }
        Ok(Raw::Map(out))
    }
}

/// Parse RON text. On a syntax or shape error returns (message, line, col). A file in
/// the plain subset that `scan` reads is read there (the same result, faster); any
/// other goes to ron, which reports every error.
pub fn parse(src: &str) -> Result<PipelineFile, (String, usize, usize)> {
    if let Some(file) = crate::scan::parse(src) {
        return Ok(file);
    }
    ron::Options::default().with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME).from_str::<PipelineFile>(src).map_err(|e| (e.code.to_string(), e.span.start.line, e.span.start.col))
}

/// Split `"stage.output"`.
pub fn split_ref(r: &str) -> Option<(&str, &str)> {
    let (s, o) = r.rsplit_once('.')?;
    (!s.is_empty() && !o.is_empty()).then_some((s, o))
}

