//! Garbage collection by reachability and integrity checking of the store.
//!
//! `gc` keeps every entry named by a kept ref (the last run of each stage of each
//! pipeline file that still exists) plus every entry or blob younger than the grace
//! period (a run in progress, or a result the user may still want to revert to), and
//! every blob reachable from kept entries. `verify` re-hashes blobs and drops the
//! corrupt ones together with the entries that reference them.

use std::collections::HashSet;
use std::fs;
use std::time::{Duration, SystemTime};

use crate::digest::Digest;
use crate::store::{CacheError, Result, Store, io_err};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub entries_kept: usize,
    pub entries_removed: usize,
    pub blobs_kept: usize,
    pub blobs_removed: usize,
    pub bytes_removed: u64,
    pub temp_removed: usize,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub blobs_checked: usize,
    pub corrupt_blobs: Vec<Digest>,
    pub dropped_entries: Vec<Digest>,
}

fn older_than(meta: &fs::Metadata, grace: Duration) -> bool {
    meta.modified().ok().and_then(|m| SystemTime::now().duration_since(m).ok()).is_some_and(|age| age > grace)
}

fn blob_files(store: &Store) -> Result<Vec<(Digest, std::path::PathBuf)>> {
    let dir = store.root().join("blobs");
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(&dir).min_depth(2).max_depth(2) {
        let e = e.map_err(|e| CacheError::Io { path: dir.clone(), source: e.into() })?;
        let shard = e.path().parent().and_then(|p| p.file_name()).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        if let Ok(d) = format!("{shard}{}", e.file_name().to_string_lossy()).parse() {
            out.push((d, e.path().to_path_buf()));
        }
    }
    Ok(out)
}

/// Remove what `keep` (entry keys) does not reach. Caller holds the exclusive lock.
pub fn gc(store: &Store, keep: &HashSet<Digest>, grace: Duration, dry_run: bool) -> Result<GcReport> {
    let mut report = GcReport::default();
    let mut live_blobs = HashSet::new();
    for key in store.entry_keys()? {
        let Some(entry) = store.get_entry(&key)? else { continue };
        let path = store.root().join("entries").join(&key.to_hex()[..2]).join(format!("{}.json", &key.to_hex()[2..]));
        let young = fs::metadata(&path).map(|m| !older_than(&m, grace)).unwrap_or(true);
        if keep.contains(&key) || young {
            report.entries_kept += 1;
            for d in entry.blobs() {
                live_blobs.insert(*d);
                // Tree manifests reference file blobs.
                if let Ok(tree) = store.read_tree(d) {
                    live_blobs.extend(tree.files.iter().map(|f| f.digest));
                }
            }
        } else {
            report.entries_removed += 1;
            if !dry_run {
                store.remove_entry(&key)?;
                let _ = store.remove_doc("jobs", &key.to_hex());
            }
        }
    }
    for (d, path) in blob_files(store)? {
        let meta = fs::metadata(&path).map_err(io_err(&path))?;
        if live_blobs.contains(&d) || !older_than(&meta, grace) {
            report.blobs_kept += 1;
        } else {
            report.blobs_removed += 1;
            report.bytes_removed += meta.len();
            if !dry_run {
                fs::remove_file(&path).map_err(io_err(&path))?;
            }
        }
    }
    let tmp = store.root().join("tmp");
    for e in fs::read_dir(&tmp).map_err(io_err(&tmp))?.flatten() {
        if e.metadata().is_ok_and(|m| older_than(&m, grace)) {
            report.temp_removed += 1;
            if !dry_run {
                let p = e.path();
                let _ = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
            }
        }
    }
    Ok(report)
}

/// Re-hash every blob; drop corrupt blobs and every entry that needs a missing one.
pub fn verify(store: &Store) -> Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let mut bad = HashSet::new();
    for (d, path) in blob_files(store)? {
        report.blobs_checked += 1;
        if Digest::of_file(&path).ok() != Some(d) {
            report.corrupt_blobs.push(d);
            bad.insert(d);
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    for key in store.entry_keys()? {
        let Some(entry) = store.get_entry(&key)? else { continue };
        let mut ok = true;
        for d in entry.blobs() {
            match store.read_tree(d) {
                Ok(tree) if Some(*d) != entry.log => ok &= tree.files.iter().all(|f| store.has_blob(&f.digest)),
                Ok(_) => {}
                Err(_) => ok &= store.has_blob(d) && !bad.contains(d),
            }
            ok &= store.has_blob(d);
        }
        if !ok {
            store.remove_entry(&key)?;
            report.dropped_entries.push(key);
        }
    }
    Ok(report)
}
