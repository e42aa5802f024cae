//! `Tree`: the manifest of a directory artifact (relative path -> blob digest). Its
//! canonical JSON is itself stored as a blob, so an artifact's identity is the digest
//! of its manifest and two byte-identical outputs always get the same digest.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeFile {
    /// Relative path with `/` separators.
    pub path: String,
    pub digest: Digest,
    pub size: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    /// Sorted by path; the order is part of the canonical encoding.
    pub files: Vec<TreeFile>,
}

impl Tree {
    pub fn new(mut files: Vec<TreeFile>) -> Tree {
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Tree { files }
    }

    pub fn canonical_bytes(&self) -> Vec<u8> {
        // Field order is fixed by the struct and files are sorted: the encoding is canonical.
        serde_json::to_vec(self).expect("a tree always serialises")
    }

    pub fn digest(&self) -> Digest {
        Digest::of_bytes(&self.canonical_bytes())
    }

    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}
