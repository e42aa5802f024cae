//! `Entry`: the record of one finished stage execution, stored under its key. It is
//! written last, after every blob it references, so its presence means "complete".

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The key it is stored under; `Store::get_entry` treats a mismatch (an entry
    /// copied over another) as damage, and `verify` also re-hashes the fingerprint.
    pub key: Digest,
    /// Stage name in the pipeline that produced it (informational; not part of the key).
    pub stage: String,
    pub kind: String,
    /// The full preimage of the key, kept so `explain` and `diff` can say what changed.
    pub fingerprint: serde_json::Value,
    /// Output name -> tree digest.
    pub outputs: BTreeMap<String, Digest>,
    /// Blob holding the stage log.
    pub log: Option<Digest>,
    pub created_unix: u64,
    pub duration_ms: u64,
}

impl Entry {
    pub fn blobs(&self) -> impl Iterator<Item = &Digest> {
        self.outputs.values().chain(self.log.iter())
    }
}
