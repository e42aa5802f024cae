//! `Fingerprint` and `Key`: everything that determines a stage's result, and its hash.
//!
//! | field          | why it is there                                                    |
//! |----------------|--------------------------------------------------------------------|
//! | `schema`       | bump [`SCHEMA`] to invalidate every cache entry of every kind      |
//! | `kind`         | the stage kind's name                                              |
//! | `kind_version` | the kind's code version (bumped when its numbers change)           |
//! | `params`       | canonical parameters, defaults filled in, `Path` params left out   |
//! | `sources`      | content digest of each `Path` parameter (never the path or mtime)  |
//! | `inputs`       | digest of each input artifact, per port, in order                  |
//! | `env`          | values of the environment variables the kind declares              |
//! | `backend`      | compute backend, only for kinds whose numbers depend on it          |
//!
//! The key is blake3 over the canonical JSON of this struct (fields in declaration
//! order, maps sorted, floats in shortest round-trip form). Where an input came from
//! (`origins`) is kept beside it for `explain`, but is not hashed: renaming an
//! upstream stage does not re-run its consumers.

use std::collections::BTreeMap;

use fgflow_cache::Digest;
use serde::{Deserialize, Serialize};

use crate::value::Value;

/// Bump to invalidate every cached result (a change in how keys are computed).
pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub schema: u32,
    pub kind: String,
    pub kind_version: u32,
    pub params: BTreeMap<String, Value>,
    pub sources: BTreeMap<String, Vec<Digest>>,
    pub inputs: BTreeMap<String, Vec<Digest>>,
    pub env: BTreeMap<String, Option<String>>,
    pub backend: Option<String>,
}

impl Fingerprint {
    pub fn key(&self) -> Digest {
        let mut bytes = b"fgflow-key\0".to_vec();
        bytes.extend(serde_json::to_vec(self).expect("fingerprints always serialise: floats are finite"));
        Digest::of_bytes(&bytes)
    }
}

/// What the entry stores: the fingerprint and, unhashed, where each input came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recorded {
    pub fingerprint: Fingerprint,
    /// Port -> `stage.output` of each input, parallel to `fingerprint.inputs`.
    pub origins: BTreeMap<String, Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp() -> Fingerprint {
        Fingerprint {
            schema: SCHEMA,
            kind: "k".into(),
            kind_version: 1,
            params: BTreeMap::from([("b".into(), Value::Float(1.0)), ("a".into(), Value::Int(2))]),
            sources: BTreeMap::new(),
            inputs: BTreeMap::new(),
            env: BTreeMap::new(),
            backend: None,
        }
    }

    #[test]
    fn key_ignores_insertion_order_and_sees_every_field() {
        let a = fp();
        let mut b = fp();
        b.params = BTreeMap::from([("a".into(), Value::Int(2)), ("b".into(), Value::Float(1.0))]);
        assert_eq!(a.key(), b.key());
        b.params.insert("a".into(), Value::Int(3));
        assert_ne!(a.key(), b.key());
        let mut c = fp();
        c.backend = Some("flex".into());
        assert_ne!(a.key(), c.key());
        let mut d = fp();
        d.kind_version = 2;
        assert_ne!(a.key(), d.key());
    }
}
