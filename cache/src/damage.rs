//! Damaged records: how a file read from the cache is classified (missing, damaged,
//! good), how an entry is judged usable, how damage is reported, and how a damaged
//! file is moved out of the way.
//!
//! The rule everywhere: a record that cannot be read is *missing* plus a warning,
//! never an error that blocks work. A result is recomputed rather than served when in
//! doubt; `fgflow verify` removes what is damaged. Nothing here deletes a record
//! outside `verify`. Only what cannot be a valid record at all (a directory or link
//! where a file should be, a manifest whose bytes do not match its name) is moved into
//! `tmp/` by whoever finds it, so that the re-run can write the real one there (`gc`
//! empties `tmp/`); this is best effort and a read-only cache is left as it is.
//! Damaged refs are set aside only by a writer (`run`, `verify`); readers only warn.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;

use crate::digest::Digest;
use crate::entry::Entry;
use crate::store::{CacheError, Result, Store};

/// A record read from the cache.
#[derive(Debug)]
pub enum Found<T> {
    Missing,
    /// Present but unusable, with why (for messages).
    Damaged(String),
    Good(T),
}

/// What a non-regular file is, for messages.
pub fn file_kind(ft: &fs::FileType) -> &'static str {
    if ft.is_dir() {
        "directory"
    } else if ft.is_symlink() {
        "symbolic link"
    } else if ft.is_file() {
        "file"
    } else {
        crate::capture::special_kind(ft).unwrap_or("special file")
    }
}

/// Read a JSON record. Only a real I/O failure (permissions, the disk) is an error: a
/// file that is not a regular file, or does not parse as `T`, is `Damaged`.
pub fn read_record<T: DeserializeOwned>(path: &Path) -> Result<Found<T>> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Found::Missing),
        Err(e) => return Err(CacheError::Io { path: path.to_path_buf(), source: e }),
    };
    if !meta.file_type().is_file() {
        return Ok(Found::Damaged(format!("is a {}, not a file", file_kind(&meta.file_type()))));
    }
    let bytes = match fs::read(path) {
        Ok(b) => b,
        // Removed between the stat and the read (gc, verify in another process).
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Found::Missing),
        Err(e) => return Err(CacheError::Io { path: path.to_path_buf(), source: e }),
    };
    Ok(match serde_json::from_slice(&bytes) {
        Ok(v) => Found::Good(v),
        Err(_) if bytes.is_empty() => Found::Damaged("empty file".into()),
        Err(e) => Found::Damaged(match e.classify() {
            serde_json::error::Category::Eof => format!("truncated ({e})"),
            serde_json::error::Category::Data => format!("wrong shape ({e})"),
            _ => format!("not JSON ({e})"),
        }),
    })
}

type Sink = Box<dyn Fn(&str) + Send + Sync>;
static SINK: OnceLock<Sink> = OnceLock::new();
static WARNED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

/// Send damage warnings somewhere other than stderr (e.g. through a progress display).
/// Only the first call has an effect.
pub fn set_warning_sink(sink: Sink) {
    let _ = SINK.set(sink);
}

/// Report damage found in `path`, once per file and process: a run may look at the
/// same entry several times (plan, then reuse, then after taking its lock).
pub fn warn(path: &Path, message: &str) {
    {
        let mut g = WARNED.lock().unwrap_or_else(|e| e.into_inner());
        if !g.get_or_insert_with(HashSet::new).insert(path.to_path_buf()) {
            return;
        }
    }
    // Messages can quote bytes from a damaged file: never let them drive the terminal.
    let line: String = format!("warning: {}: {message}", path.display()).chars().flat_map(|c| if c.is_control() { c.escape_debug().collect::<Vec<_>>() } else { vec![c] }).collect();
    match SINK.get() {
        Some(sink) => sink(&line),
        None => eprintln!("{line}"),
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Rename a damaged document to `<name>.bad-<unix time>` beside it (a fresh name:
/// `.1`, `.2`... if taken), so that it stops being read but can still be looked at.
pub fn set_aside(path: &Path) -> io::Result<PathBuf> {
    let stamp = unix_now();
    let base = format!("{}.bad-{stamp}", path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    let mut dest = path.with_file_name(&base);
    let mut n = 0;
    while fs::symlink_metadata(&dest).is_ok() {
        n += 1;
        dest = path.with_file_name(format!("{base}.{n}"));
    }
    fs::rename(path, &dest)?;
    Ok(dest)
}

/// Move something that is not a valid record out of its path into `tmp/` (where `gc`
/// removes it), so a re-run can write the real record there. Best effort.
pub(crate) fn move_to_tmp(store: &Store, path: &Path) -> io::Result<PathBuf> {
    static N: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let dest = store.root().join("tmp").join(format!("damaged-{name}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    fs::rename(path, &dest)?;
    Ok(dest)
}

/// Remove whatever is at `path` (a file, a link, or a directory tree).
pub(crate) fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether the blob `d` is present as a regular file. Something else at its path is
/// moved to `tmp/` (when `repair`), since no writer would ever put it there and it
/// would stop the real blob from being stored again.
fn blob_problem(store: &Store, d: &Digest, repair: bool) -> Option<String> {
    let path = store.blob_path(d);
    match fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_file() => None,
        Ok(m) => {
            let kind = file_kind(&m.file_type());
            let moved = if repair && move_to_tmp(store, &path).is_ok() { " (moved to tmp/)" } else { "" };
            Some(format!("blob {} is a {kind}, not a file{moved}", path.display()))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Some(format!("blob {} is missing", path.display())),
        Err(e) => Some(format!("blob {}: {e}", path.display())),
    }
}

/// Why the tree `d` (an entry's output) cannot be laid out, if it cannot: its
/// manifest is missing, not a file, or not a valid manifest, or one of its files is
/// missing. A manifest whose bytes do not hash to its name is moved to `tmp/` (when
/// `repair`): it is corrupt whoever references it.
pub(crate) fn tree_problem(store: &Store, d: &Digest, repair: bool) -> Option<String> {
    if let Some(p) = blob_problem(store, d, repair) {
        return Some(p);
    }
    let path = store.blob_path(d);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) => return Some(format!("tree manifest {}: {e}", path.display())),
    };
    let tree: crate::tree::Tree = match serde_json::from_slice(&bytes) {
        Ok(t) => t,
        Err(e) => {
            let corrupt = Digest::of_bytes(&bytes) != *d;
            let moved = if corrupt && repair && move_to_tmp(store, &path).is_ok() { " (moved to tmp/)" } else { "" };
            return Some(format!("tree manifest {} is damaged: {e}{moved}", path.display()));
        }
    };
    tree.files.iter().find_map(|f| blob_problem(store, &f.digest, repair).map(|p| format!("file `{}`: {p}", f.path)))
}

/// An entry that can be served: it parses, it is the entry of `key` (not one copied
/// over it), and every blob it needs is present (output manifests valid, their files
/// and the log present as regular files). Contents are not re-hashed here; that is
/// `verify`'s job.
pub(crate) fn usable_entry(store: &Store, key: &Digest, path: &Path, repair: bool) -> Result<Found<Entry>> {
    let entry = match read_record::<Entry>(path)? {
        Found::Good(e) => e,
        Found::Missing => return Ok(Found::Missing),
        Found::Damaged(why) => {
            // A directory at an entry's path would stop the re-run from writing it.
            if repair && fs::symlink_metadata(path).is_ok_and(|m| !m.file_type().is_file()) {
                let _ = move_to_tmp(store, path);
            }
            return Ok(Found::Damaged(format!("damaged cache entry: {why}")));
        }
    };
    if entry.key != *key {
        return Ok(Found::Damaged(format!("holds the entry of another key ({}), not of {}: copied over it?", entry.key, key)));
    }
    for (name, d) in &entry.outputs {
        if let Some(p) = tree_problem(store, d, repair) {
            return Ok(Found::Damaged(format!("output `{name}`: {p}")));
        }
    }
    if let Some(p) = entry.log.as_ref().and_then(|d| blob_problem(store, d, repair)) {
        return Ok(Found::Damaged(format!("log: {p}")));
    }
    Ok(Found::Good(entry))
}

/// A document name (`refs/<name>.json`, `jobs/<name>.json`) must be one plain file name.
pub(crate) fn check_doc_name(dir: &Path, name: &str) -> Result<()> {
    let ok = !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0']);
    if ok {
        Ok(())
    } else {
        Err(CacheError::Io { path: dir.join(name), source: io::Error::new(io::ErrorKind::InvalidInput, "not a plain document name") })
    }
}

/// The file of `key`'s entry (the layout of `store.rs`: `entries/ab/cdef….json`).
pub(crate) fn entry_file(store: &Store, key: &Digest) -> PathBuf {
    let hex = key.to_hex();
    store.root().join("entries").join(&hex[..2]).join(format!("{}.json", &hex[2..]))
}

impl Store {
    /// Path of the document `name` under `refs/` or `jobs/`; `name` must be a plain
    /// file name (no separator, `..` or NUL), whoever it came from.
    pub fn doc_path(&self, dir: &str, name: &str) -> Result<PathBuf> {
        check_doc_name(&self.root().join(dir), name)?;
        Ok(self.root().join(dir).join(format!("{name}.json")))
    }

    /// The entry of `key` as stored, without checking its blobs (for `gc`, `verify`).
    pub fn read_entry(&self, key: &Digest) -> Result<Found<Entry>> {
        read_record(&entry_file(self, key))
    }

    /// For documents that are only an optimisation (refs): a damaged one reads as
    /// missing, with a warning naming the file, so that the caller rebuilds it. With
    /// `set_aside` (a writer, which is about to rebuild it) it is also renamed to
    /// `<name>.json.bad-<unix time>`; readers leave the cache as it is.
    pub fn get_doc_lenient<T: DeserializeOwned>(&self, dir: &str, name: &str, set_aside_damaged: bool) -> Result<Option<T>> {
        let path = self.doc_path(dir, name)?;
        match read_record(&path)? {
            Found::Good(v) => Ok(Some(v)),
            Found::Missing => Ok(None),
            Found::Damaged(why) => {
                let what = match set_aside_damaged.then(|| set_aside(&path)) {
                    Some(Ok(to)) => format!("set aside as {}", to.display()),
                    Some(Err(e)) => format!("could not set it aside ({e})"),
                    None => "the next run sets it aside".into(),
                };
                warn(&path, &format!("damaged ({why}): ignored and rebuilt; {what}"));
                Ok(None)
            }
        }
    }
}
