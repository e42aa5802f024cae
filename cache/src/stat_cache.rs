//! `StatCache`: remembers the digest of each source file under its (size, mtime,
//! ctime, inode), like git's index, so an unchanged dataset of 10^5 files costs a
//! `stat` per file, not a re-hash. Any doubt (a changed field, or an mtime too close
//! to the moment it was recorded to rule out a same-tick rewrite) means re-hashing.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::damage::Found;
use crate::digest::Digest;
use crate::store::{CacheError, Result, io_err};

/// An mtime within this window of the recording time is "racy" (git's term): the file
/// could have been rewritten within the same timestamp tick after we hashed it. File
/// timestamps come from the kernel's coarse clock (a few ms per tick), so 50 ms is a
/// wide margin that still trusts a file hashed right after a `touch` on the next run.
const RACY_NS: i128 = 50_000_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Stat {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
    dev: u64,
}

impl Stat {
    fn of(meta: &fs::Metadata) -> Stat {
        Stat {
            size: meta.size(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
            ino: meta.ino(),
            dev: meta.dev(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    stat: Stat,
    recorded_ns: i128,
    digest: Digest,
}

/// What hashing a source cost: files whose digest came from the cache vs were read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HashCounts {
    pub cached: u64,
    pub hashed: u64,
    pub bytes_hashed: u64,
}

#[derive(Debug, Default)]
pub struct StatCache {
    path: Option<PathBuf>,
    records: BTreeMap<String, Record>,
    dirty: bool,
    pub counts: HashCounts,
}

fn now_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

impl StatCache {
    /// Load from `path`. A missing file is an empty cache; a damaged one is discarded
    /// with a warning (it is only an optimisation: sources are re-hashed once) and
    /// rewritten by the next `save`.
    pub fn load(path: impl Into<PathBuf>) -> StatCache {
        let path = path.into();
        let (records, dirty) = match crate::damage::read_record(&path) {
            Ok(Found::Good(records)) => (records, false),
            Ok(Found::Missing) => (BTreeMap::new(), false),
            Ok(Found::Damaged(why)) => {
                crate::damage::warn(&path, &format!("damaged stat cache discarded ({why}); sources are re-hashed once"));
                // A directory in its place would stop `save` from renaming over it.
                if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                    let _ = crate::damage::set_aside(&path);
                }
                (BTreeMap::new(), true)
            }
            Err(e) => {
                crate::damage::warn(&path, &format!("stat cache not read ({e}); sources are re-hashed"));
                (BTreeMap::new(), false)
            }
        };
        StatCache { path: Some(path), records, dirty, counts: HashCounts::default() }
    }

    /// Why the stat cache file at `path` is damaged, if it is (for `verify`).
    pub fn problem(path: &Path) -> Option<String> {
        match crate::damage::read_record::<BTreeMap<String, Record>>(path) {
            Ok(Found::Damaged(why)) => Some(why),
            // Missing is fine; unreadable (permissions) is not damage.
            _ => None,
        }
    }

    /// Write back if anything changed (temp file + rename).
    pub fn save(&mut self) -> Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        if !self.dirty {
            return Ok(());
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let bytes = serde_json::to_vec(&self.records).map_err(|source| CacheError::Json { path: path.clone(), source })?;
        fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))?;
        self.dirty = false;
        Ok(())
    }

    /// A file's digest from its record when its stat still matches (and is not racy),
    /// else hashed, with the record to keep. Reads `self` only, so many run at once.
    fn probe(&self, path: &Path) -> Result<(Digest, Option<(String, Record)>, u64)> {
        let meta = fs::metadata(path).map_err(io_err(path))?;
        let stat = Stat::of(&meta);
        let key = path.to_string_lossy().into_owned();
        if let Some(r) = self.records.get(&key)
            && r.stat == stat
            && r.recorded_ns - stat.mtime_ns > RACY_NS
        {
            return Ok((r.digest, None, 0));
        }
        let digest = Digest::of_file(path).map_err(io_err(path))?;
        let size = stat.size;
        Ok((digest, Some((key, Record { stat, recorded_ns: now_ns(), digest })), size))
    }

    fn keep(&mut self, probed: (Digest, Option<(String, Record)>, u64)) -> Digest {
        let (digest, record, size) = probed;
        match record {
            None => self.counts.cached += 1,
            Some((key, r)) => {
                self.counts.hashed += 1;
                self.counts.bytes_hashed += size;
                self.records.insert(key, r);
                self.dirty = true;
            }
        }
        digest
    }

    /// Digest of one file's content.
    pub fn file_digest(&mut self, path: &Path) -> Result<Digest> {
        let probed = self.probe(path)?;
        Ok(self.keep(probed))
    }

    /// Digest of a file, or of a directory's listing (relative path + content digest of
    /// every file, sorted). Only content and relative names count, never the location.
    /// A directory's files are looked up and, where needed, hashed on every core (a
    /// folder of 10^5 images is mostly small files, which one thread would hash one by
    /// one); the first error in file order is the one reported.
    pub fn path_digest(&mut self, path: &Path) -> Result<Digest> {
        let meta = fs::metadata(path).map_err(io_err(path))?;
        if meta.is_file() {
            return self.file_digest(path);
        }
        // Files are hashed; a symbolic link is not followed, but what it points to is
        // part of the listing, so re-pointing one (a reader that follows links sees
        // other bytes) changes the digest.
        enum Item {
            File(PathBuf),
            Link(PathBuf),
        }
        let mut items = Vec::new();
        for entry in walkdir::WalkDir::new(path).sort_by_file_name() {
            let entry = entry.map_err(|e| CacheError::Io { path: path.to_path_buf(), source: e.into() })?;
            let kind = entry.file_type();
            if !kind.is_file() && !kind.is_symlink() {
                continue;
            }
            let rel = entry.path().strip_prefix(path).expect("walkdir yields paths under its root").to_string_lossy().into_owned();
            let item = if kind.is_symlink() {
                Item::Link(fs::read_link(entry.path()).map_err(io_err(entry.path()))?)
            } else {
                Item::File(entry.into_path())
            };
            items.push((rel, item));
        }
        let probed: Vec<Option<Result<_>>> = {
            use rayon::prelude::*;
            let this = &*self;
            items.par_iter().map(|(_, item)| if let Item::File(p) = item { Some(this.probe(p)) } else { None }).collect()
        };
        let mut listing = Vec::new();
        for ((rel, item), p) in items.iter().zip(probed) {
            listing.extend_from_slice(rel.as_bytes());
            listing.push(0);
            match (item, p) {
                (Item::Link(target), _) => {
                    listing.extend_from_slice(b"-> ");
                    listing.extend_from_slice(target.to_string_lossy().as_bytes());
                    listing.push(0);
                }
                (Item::File(_), Some(p)) => {
                    let d = self.keep(p?);
                    listing.extend_from_slice(&d.0);
                }
                (Item::File(_), None) => unreachable!("every file is probed"),
            }
        }
        Ok(Digest::of_bytes(&listing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_files_are_not_rehashed_and_touched_ones_are_rehashed_once() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("data.bin");
        fs::write(&f, b"hello").unwrap();
        // Age the file so it is not racy.
        let old = SystemTime::now() - std::time::Duration::from_secs(60);
        fs::File::options().write(true).open(&f).unwrap().set_modified(old).unwrap();
        let cache_path = dir.path().join("stat.json");
        let mut c = StatCache::load(&cache_path);
        let d1 = c.file_digest(&f).unwrap();
        c.save().unwrap();
        let mut c = StatCache::load(&cache_path);
        assert_eq!(c.file_digest(&f).unwrap(), d1);
        assert_eq!(c.counts, HashCounts { cached: 1, hashed: 0, bytes_hashed: 0 });
        // A touch changes the stat: one re-hash, same digest.
        fs::File::options().write(true).open(&f).unwrap().set_modified(old + std::time::Duration::from_secs(1)).unwrap();
        assert_eq!(c.file_digest(&f).unwrap(), d1);
        assert_eq!(c.counts.hashed, 1);
        // A content change with the same size is caught by mtime/ctime.
        fs::write(&f, b"jello").unwrap();
        assert_ne!(c.file_digest(&f).unwrap(), d1);
    }

    #[cfg(unix)]
    #[test]
    fn re_pointing_a_symbolic_link_changes_the_directory_digest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join("a.png"), b"a").unwrap();
        fs::write(root.join("b.png"), b"b").unwrap();
        std::os::unix::fs::symlink("a.png", root.join("link.png")).unwrap();
        let mut c = StatCache::default();
        let first = c.path_digest(&root).unwrap();
        fs::remove_file(root.join("link.png")).unwrap();
        std::os::unix::fs::symlink("b.png", root.join("link.png")).unwrap();
        assert_ne!(c.path_digest(&root).unwrap(), first, "a reader following the link now sees other bytes");
    }

    #[test]
    fn directory_digest_ignores_location_but_not_names() {
        let dir = tempfile::tempdir().unwrap();
        for root in ["a", "b"] {
            fs::create_dir_all(dir.path().join(root).join("x")).unwrap();
            fs::write(dir.path().join(root).join("x/1.png"), b"p").unwrap();
        }
        let mut c = StatCache::default();
        assert_eq!(c.path_digest(&dir.path().join("a")).unwrap(), c.path_digest(&dir.path().join("b")).unwrap());
        fs::rename(dir.path().join("b/x/1.png"), dir.path().join("b/x/2.png")).unwrap();
        assert_ne!(c.path_digest(&dir.path().join("a")).unwrap(), c.path_digest(&dir.path().join("b")).unwrap());
    }
}
