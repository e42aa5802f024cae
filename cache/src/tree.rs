//! `Tree`: the manifest of a directory artifact (relative path -> blob digest). Its
//! canonical JSON is itself stored as a blob, so an artifact's identity is the digest
//! of its manifest and two byte-identical outputs always get the same digest.
//!
//! A manifest read from the cache is untrusted input (anyone who can write a shared
//! cache can write one), and its paths are joined onto directories we write into
//! (`materialize`, `export`). So a `Tree` cannot be deserialised with a path that could
//! leave its directory or name one file twice: every path goes through [`check_path`]
//! and the whole list through a duplicate / file-under-file check. A manifest that
//! fails is a damaged record, reported with the blob's file name.

use std::collections::HashSet;

use serde::{Deserialize, Deserializer, Serialize};

use crate::digest::Digest;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeFile {
    /// Relative path with `/` separators, checked by [`check_path`] when read.
    #[serde(deserialize_with = "de_path")]
    pub path: String,
    pub digest: Digest,
    pub size: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawTree")]
pub struct Tree {
    /// Sorted by path; the order is part of the canonical encoding.
    pub files: Vec<TreeFile>,
}

/// The manifest as written, before the checks that need the whole list.
#[derive(Deserialize)]
struct RawTree {
    files: Vec<TreeFile>,
}

/// Why a path from a manifest cannot be used. The path is shown escaped and cut
/// short: it comes from a file anyone could have written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadPath {
    #[error("empty path")]
    Empty,
    #[error("path `{}` is absolute", shown(.0))]
    Absolute(String),
    #[error("path `{}` has an empty component", shown(.0))]
    EmptyComponent(String),
    #[error("path `{}` has a `{}` component", shown(.0), .1)]
    Dot(String, &'static str),
    #[error("path `{}` contains a NUL byte", shown(.0))]
    Nul(String),
    #[error("path `{}` contains a backslash", shown(.0))]
    Backslash(String),
    #[error("path `{}` is listed twice", shown(.0))]
    Duplicate(String),
    #[error("path `{}` is a file and also a directory of `{}`", shown(.0), shown(.1))]
    FileAndDir(String, String),
}

/// `s` with control characters escaped, at most 120 characters of it.
fn shown(s: &str) -> String {
    const MAX: usize = 120;
    let mut out: String = s.chars().take(MAX).flat_map(|c| if c.is_control() { c.escape_debug().collect::<Vec<_>>() } else { vec![c] }).collect();
    if s.chars().nth(MAX).is_some() {
        out.push_str(&format!("… ({} bytes)", s.len()));
    }
    out
}

/// Whether `path` is a plain relative path that stays inside the directory it is
/// joined to: `/`-separated, no empty, `.` or `..` component, no NUL, no backslash
/// (a Windows separator, and never produced by capture on Unix without ambiguity).
pub fn check_path(path: &str) -> Result<(), BadPath> {
    let owned = || path.to_string();
    if path.is_empty() {
        return Err(BadPath::Empty);
    }
    if path.starts_with('/') {
        return Err(BadPath::Absolute(owned()));
    }
    if path.contains('\0') {
        return Err(BadPath::Nul(owned()));
    }
    if path.contains('\\') {
        return Err(BadPath::Backslash(owned()));
    }
    for c in path.split('/') {
        match c {
            "" => return Err(BadPath::EmptyComponent(owned())),
            "." => return Err(BadPath::Dot(owned(), ".")),
            ".." => return Err(BadPath::Dot(owned(), "..")),
            _ => {}
        }
    }
    Ok(())
}

fn de_path<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    check_path(&s).map_err(serde::de::Error::custom)?;
    Ok(s)
}

/// No path twice, and no path under another one (`a` and `a/b`): either would make
/// laying the tree out depend on the order of the list.
fn check_unique(files: &[TreeFile]) -> Result<(), BadPath> {
    let mut seen: HashSet<&str> = HashSet::with_capacity(files.len());
    for f in files {
        if !seen.insert(f.path.as_str()) {
            return Err(BadPath::Duplicate(f.path.clone()));
        }
    }
    for f in files {
        for (i, _) in f.path.match_indices('/') {
            if seen.contains(&f.path[..i]) {
                return Err(BadPath::FileAndDir(f.path[..i].to_string(), f.path.clone()));
            }
        }
    }
    Ok(())
}

impl TryFrom<RawTree> for Tree {
    type Error = BadPath;
    fn try_from(raw: RawTree) -> Result<Tree, BadPath> {
        check_unique(&raw.files)?;
        Ok(Tree { files: raw.files })
    }
}

impl Tree {
    pub fn new(mut files: Vec<TreeFile>) -> Tree {
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Tree { files }
    }

    /// Check a tree built in memory (e.g. from a stage's output) the way reading it
    /// back will: what capture would store must be readable again.
    pub fn check(&self) -> Result<(), BadPath> {
        for f in &self.files {
            check_path(&f.path)?;
        }
        check_unique(&self.files)
    }

    pub fn canonical_bytes(&self) -> Vec<u8> {
        // Field order is fixed by the struct and files are sorted: the encoding is canonical.
        serde_json::to_vec(self).expect("a tree always serialises")
    }

    pub fn digest(&self) -> Digest {
        Digest::of_bytes(&self.canonical_bytes())
    }

    /// Total bytes; saturates, since the sizes come from a file anyone could edit.
    pub fn total_size(&self) -> u64 {
        self.files.iter().fold(0u64, |a, f| a.saturating_add(f.size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(paths: &[&str]) -> String {
        let d = Digest::of_bytes(b"x").to_hex();
        let files: Vec<String> = paths.iter().map(|p| format!(r#"{{"path":{},"digest":"{d}","size":1}}"#, serde_json::to_string(p).unwrap())).collect();
        format!(r#"{{"files":[{}]}}"#, files.join(","))
    }

    #[test]
    fn hostile_paths_cannot_be_deserialised() {
        for bad in ["../../../tmp/x", "a/../../x", "/etc/passwd", "", "a//b", "a/", "./a", "a/.", "..", "a\u{0}b", "a\\b", "..\\x"] {
            let err = serde_json::from_str::<Tree>(&manifest(&[bad])).expect_err(bad);
            assert!(err.to_string().contains("path") && err.to_string().contains("line"), "{bad:?}: {err}");
        }
        let long = format!("{}\u{1b}[31m", "../".repeat(100_000));
        let err = serde_json::from_str::<Tree>(&manifest(&[&long])).unwrap_err().to_string();
        assert!(err.len() < 400 && !err.contains('\u{1b}') && err.contains("300005 bytes"), "cut short and escaped: {err}");
        let err = serde_json::from_str::<Tree>(&manifest(&["a", "a"])).unwrap_err();
        assert!(err.to_string().contains("listed twice"), "{err}");
        let err = serde_json::from_str::<Tree>(&manifest(&["a", "a/b"])).unwrap_err();
        assert!(err.to_string().contains("also a directory"), "{err}");
        // Not a tree at all: an error, not a panic.
        for junk in ["", "{", "[]", "{\"files\":3}", "{\"files\":[{\"path\":\"a\"}]}", "null"] {
            assert!(serde_json::from_str::<Tree>(junk).is_err(), "{junk}");
        }
    }

    #[test]
    fn ordinary_paths_round_trip() {
        let t: Tree = serde_json::from_str(&manifest(&["a.txt", "sub/b.bin", "sub/c/d", ".hidden", "a..b", "ü ñ"])).unwrap();
        assert_eq!(t.files.len(), 6);
        assert!(t.check().is_ok());
        let back: Tree = serde_json::from_slice(&t.canonical_bytes()).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn sizes_from_a_forged_manifest_do_not_overflow() {
        let d = Digest::of_bytes(b"x");
        let t = Tree::new(vec![TreeFile { path: "a".into(), digest: d, size: u64::MAX }, TreeFile { path: "b".into(), digest: d, size: 5 }]);
        assert_eq!(t.total_size(), u64::MAX);
    }
}
