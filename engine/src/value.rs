//! Canonical parameter values: what a RON parameter becomes after validation, the
//! form that is hashed into keys (sorted maps, floats normalised) and shown by
//! `explain`. Also [`SortedMap`], the small sorted map a checked stage keeps its
//! parameters, inputs and paths in.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::kind::StageError;

/// A validated parameter value. Maps are sorted, so the encoding is canonical. A map
/// is a [`SortedMap`] (serialised as the `BTreeMap` it was): a `command` stage's
/// `outputs` of one entry would otherwise cost a whole B-tree node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
    Map(SortedMap<String, Value>),
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::Int(v as i64)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(v.to_string())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(v)
    }
}
impl<T: Into<Value>> From<Vec<T>> for Value {
    fn from(v: Vec<T>) -> Self {
        Value::List(v.into_iter().map(Into::into).collect())
    }
}

impl fmt::Display for Value {
    /// RON-like rendering, as a user would write it in a pipeline file.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => {
                if x.fract() == 0.0 && x.abs() < 1e15 {
                    write!(f, "{x:.1}")
                } else {
                    write!(f, "{x}")
                }
            }
            Value::Str(s) => write!(f, "{s:?}"),
            Value::List(items) => {
                f.write_str("[")?;
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str("]")
            }
            Value::Map(m) => {
                f.write_str("{")?;
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{k:?}: {v}")?;
                }
                f.write_str("}")
            }
        }
    }
}

/// The validated parameters of one stage, defaults filled in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Params(pub SortedMap<String, Value>);

impl Params {
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name)
    }

    fn need(&self, name: &str) -> Result<&Value, StageError> {
        self.0.get(name).ok_or_else(|| StageError::Param { name: name.into(), msg: "missing".into() })
    }

    fn wrong(name: &str, want: &str, got: &Value) -> StageError {
        StageError::Param { name: name.into(), msg: format!("expected {want}, found {got}") }
    }

    pub fn int(&self, name: &str) -> Result<i64, StageError> {
        match self.need(name)? {
            Value::Int(i) => Ok(*i),
            v => Err(Self::wrong(name, "an integer", v)),
        }
    }

    /// A non-negative integer as `usize`.
    pub fn usize(&self, name: &str) -> Result<usize, StageError> {
        let i = self.int(name)?;
        usize::try_from(i).map_err(|_| StageError::Param { name: name.into(), msg: format!("must be >= 0, found {i}") })
    }

    pub fn float(&self, name: &str) -> Result<f64, StageError> {
        match self.need(name)? {
            Value::Float(x) => Ok(*x),
            Value::Int(i) => Ok(*i as f64),
            v => Err(Self::wrong(name, "a number", v)),
        }
    }

    pub fn bool(&self, name: &str) -> Result<bool, StageError> {
        match self.need(name)? {
            Value::Bool(b) => Ok(*b),
            v => Err(Self::wrong(name, "a bool", v)),
        }
    }

    pub fn str(&self, name: &str) -> Result<&str, StageError> {
        match self.need(name)? {
            Value::Str(s) => Ok(s),
            v => Err(Self::wrong(name, "a string", v)),
        }
    }

    pub fn list(&self, name: &str) -> Result<&[Value], StageError> {
        match self.need(name)? {
            Value::List(l) => Ok(l),
            v => Err(Self::wrong(name, "a list", v)),
        }
    }

    pub fn floats(&self, name: &str) -> Result<Vec<f64>, StageError> {
        self.list(name)?
            .iter()
            .map(|v| match v {
                Value::Float(x) => Ok(*x),
                Value::Int(i) => Ok(*i as f64),
                v => Err(Self::wrong(name, "a list of numbers", v)),
            })
            .collect()
    }

    pub fn ints(&self, name: &str) -> Result<Vec<i64>, StageError> {
        self.list(name)?
            .iter()
            .map(|v| match v {
                Value::Int(i) => Ok(*i),
                v => Err(Self::wrong(name, "a list of integers", v)),
            })
            .collect()
    }

    pub fn strs(&self, name: &str) -> Result<Vec<&str>, StageError> {
        self.list(name)?
            .iter()
            .map(|v| match v {
                Value::Str(s) => Ok(s.as_str()),
                v => Err(Self::wrong(name, "a list of strings", v)),
            })
            .collect()
    }

    pub fn str_map(&self, name: &str) -> Result<BTreeMap<String, String>, StageError> {
        match self.need(name)? {
            Value::Map(m) => m
                .iter()
                .map(|(k, v)| match v {
                    Value::Str(s) => Ok((k.clone(), s.clone())),
                    v => Err(Self::wrong(name, "a map of strings", v)),
                })
                .collect(),
            v => Err(Self::wrong(name, "a map", v)),
        }
    }

    /// Builder for tests: `Params::default().with("epochs", 3)`.
    pub fn with(mut self, name: &str, v: impl Into<Value>) -> Self {
        self.0.insert(name.to_string(), v.into());
        self
    }
}

/// A map kept as one vector sorted by key: iteration, `Debug` and serde behave as a
/// `BTreeMap`'s (so canonical encodings and keys are the same), but a map of a few
/// entries costs a few entries, not a whole B-tree node (about 0.5 KiB). A checked
/// stage holds several such maps; at 10^5 stages the nodes dominated memory.
/// Lookups are binary searches; inserting out of order is linear, which is what the
/// small maps of a stage need (bulk building goes through `FromIterator`, a sort).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SortedMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for SortedMap<K, V> {
    fn default() -> Self {
        SortedMap(Vec::new())
    }
}

impl<K: Ord, V> SortedMap<K, V> {
    pub fn new() -> Self {
        SortedMap(Vec::new())
    }

    pub fn with_capacity(n: usize) -> Self {
        SortedMap(Vec::with_capacity(n))
    }

    fn find<Q: Ord + ?Sized>(&self, key: &Q) -> Result<usize, usize>
    where
        K: std::borrow::Borrow<Q>,
    {
        self.0.binary_search_by(|(k, _)| k.borrow().cmp(key))
    }

    /// The position of `key`, for lookups: a scan of a few entries compares for
    /// equality (a length check rejects most keys), cheaper than ordering them.
    fn position<Q: Ord + ?Sized>(&self, key: &Q) -> Option<usize>
    where
        K: std::borrow::Borrow<Q>,
    {
        if self.0.len() <= 8 { self.0.iter().position(|(k, _)| k.borrow() == key) } else { self.find(key).ok() }
    }

    /// Inserts or replaces, returning the value replaced (as `BTreeMap::insert`).
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    pub fn get<Q: Ord + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: std::borrow::Borrow<Q>,
    {
        self.position(key).map(|i| &self.0[i].1)
    }

    pub fn get_mut<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: std::borrow::Borrow<Q>,
    {
        self.position(key).map(|i| &mut self.0[i].1)
    }

    pub fn contains_key<Q: Ord + ?Sized>(&self, key: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
    {
        self.position(key).is_some()
    }

    pub fn remove<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
    {
        self.find(key).ok().map(|i| self.0.remove(i).1)
    }
}

impl<K, V> SortedMap<K, V> {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn clear(&mut self) {
        self.0.clear()
    }

    /// Entries in key order.
    pub fn iter(&self) -> Iter<'_, K, V> {
        fn pair<K, V>(e: &(K, V)) -> (&K, &V) {
            (&e.0, &e.1)
        }
        self.0.iter().map(pair as fn(&(K, V)) -> (&K, &V))
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &K> + ExactSizeIterator {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &V> + ExactSizeIterator {
        self.0.iter().map(|(_, v)| v)
    }

    pub fn values_mut(&mut self) -> impl DoubleEndedIterator<Item = &mut V> + ExactSizeIterator {
        self.0.iter_mut().map(|(_, v)| v)
    }
}

/// Borrowing iterator of a [`SortedMap`], in key order.
pub type Iter<'a, K, V> = std::iter::Map<std::slice::Iter<'a, (K, V)>, fn(&'a (K, V)) -> (&'a K, &'a V)>;

impl<'a, K, V> IntoIterator for &'a SortedMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = Iter<'a, K, V>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<K, V> IntoIterator for SortedMap<K, V> {
    type Item = (K, V);
    type IntoIter = std::vec::IntoIter<(K, V)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for SortedMap<K, V> {
    /// A repeated key keeps its last value, as collecting into a `BTreeMap` does.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut v: Vec<(K, V)> = iter.into_iter().collect();
        // Stable: among equal keys the last one collected ends up last.
        v.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(K, V)> = Vec::with_capacity(v.len());
        for (k, x) in v {
            match out.last_mut() {
                Some(last) if last.0 == k => last.1 = x,
                _ => out.push((k, x)),
            }
        }
        out.shrink_to_fit();
        SortedMap(out)
    }
}

impl<K: Ord, V> Extend<(K, V)> for SortedMap<K, V> {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

impl<K: Ord, V> From<BTreeMap<K, V>> for SortedMap<K, V> {
    fn from(m: BTreeMap<K, V>) -> Self {
        SortedMap(m.into_iter().collect())
    }
}

impl<K: Ord, V, const N: usize> From<[(K, V); N]> for SortedMap<K, V> {
    fn from(a: [(K, V); N]) -> Self {
        a.into_iter().collect()
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for SortedMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<K: Serialize, V: Serialize> Serialize for SortedMap<K, V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de, K: Ord + Deserialize<'de>, V: Deserialize<'de>> Deserialize<'de> for SortedMap<K, V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(BTreeMap::<K, V>::deserialize(d)?.into())
    }
}
