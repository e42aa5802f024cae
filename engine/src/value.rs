//! Canonical parameter values: what a RON parameter becomes after validation, the
//! form that is hashed into keys (sorted maps, floats normalised) and shown by
//! `explain`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::kind::StageError;

/// A validated parameter value. Maps are sorted, so the encoding is canonical.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
    Map(BTreeMap<String, Value>),
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
pub struct Params(pub BTreeMap<String, Value>);

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
