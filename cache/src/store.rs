//! `Store`: the content-addressed store on disk.
//!
//! Layout under the cache root (default `.fgflow/` in the working directory):
//! ```text
//! blobs/ab/cdef…      file contents and tree manifests, read-only, named by digest
//! entries/ab/cdef….json   one Entry per stage key (the run cache: every key ever run)
//! refs/<id>.json      per pipeline file: stage name -> key of its last run (for explain, gc)
//! jobs/<key>.json     what is needed to run a key in another process
//! locks/              per-key lock files; `lock` is the cache-wide lock
//! tmp/                staging: every write goes here first, then is renamed into place
//! stat-cache.json     (path, size, mtime, inode) -> digest of source files
//! ```
//! Every write is temp file + rename, and an entry is written after the blobs it
//! references, so a crash at any point leaves no entry pointing at a missing or
//! partial blob (at most unreferenced blobs and temp files, which `gc` removes).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::damage::Found;
use crate::digest::Digest;
use crate::entry::Entry;
use crate::lock::FileLock;
use crate::tree::{Tree, TreeFile};

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {source}", path.display())]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{}: is a {what}, not a regular file: only files are stored", path.display())]
    NotAFile { path: PathBuf, what: &'static str },
    #[error("blob {0} is missing from the cache (run `fgflow verify`)")]
    MissingBlob(Digest),
    #[error("no cache entry matches `{0}`")]
    NoMatch(String),
    #[error("`{prefix}` is ambiguous: it matches {count} entries")]
    Ambiguous { prefix: String, count: usize },
}

pub type Result<T> = std::result::Result<T, CacheError>;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io { path: path.to_path_buf(), source }
}

/// How `Store::materialize` lays files out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Materialize {
    /// Hard links to the blobs.
    Link,
    /// Private copies.
    Copy,
}

/// What a blob looked like when a stage was handed it: any change of size or mtime
/// afterwards means something wrote to it (a hard link shares the inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobStamp {
    size: u64,
    mtime_ns: i128,
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Open (creating if needed) the store at `root` for writing. Fails when `root` is
    /// not a directory or cannot be created, or when nothing can be written in it, so a
    /// verb that writes learns it before it starts work.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        Self::usable_root(&root)?;
        for sub in ["blobs", "entries", "refs", "jobs", "locks", "tmp"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        // Keep the cache out of git and out of backups, whatever the user's .gitignore says.
        let ignore = root.join(".gitignore");
        if !ignore.exists() {
            fs::write(&ignore, "*\n").map_err(io_err(&ignore))?;
        }
        let tag = root.join("CACHEDIR.TAG");
        if !tag.exists() {
            fs::write(&tag, "Signature: 8a477f597d28d172789f06886806bc55\n# fgflow cache: see `fgflow gc`\n")
                .map_err(io_err(&tag))?;
        }
        // Existing directories open without a write; prove one is possible.
        let tmp = root.join("tmp");
        tempfile::NamedTempFile::new_in(&tmp).map_err(io_err(&tmp))?;
        Ok(Store { root })
    }

    /// Open the store at `root` for reading only: nothing is created or written, so
    /// reading verbs work on a read-only cache. An absent `root` reads as an empty
    /// cache; a `root` that exists but is not a directory is an error.
    pub fn open_read_only(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        Self::usable_root(&root)?;
        Ok(Store { root })
    }

    /// `Ok` when `root` is a directory or does not exist (yet).
    fn usable_root(root: &Path) -> Result<()> {
        match fs::metadata(root) {
            Ok(m) if !m.is_dir() => Err(CacheError::Io { path: root.to_path_buf(), source: io::Error::new(io::ErrorKind::NotADirectory, "exists and is not a directory") }),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CacheError::Io { path: root.to_path_buf(), source: e }),
        }
    }

    /// A temporary directory outside any cache (removed on drop), for verbs that must
    /// not write into the cache, such as `show` laying out an output to describe it.
    pub fn outside_tempdir(prefix: &str) -> Result<tempfile::TempDir> {
        tempfile::Builder::new().prefix(prefix).tempdir().map_err(io_err(&std::env::temp_dir()))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn sharded(&self, dir: &str, d: &Digest, ext: &str) -> PathBuf {
        let hex = d.to_hex();
        self.root.join(dir).join(&hex[..2]).join(format!("{}{ext}", &hex[2..]))
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.sharded("blobs", d, "")
    }

    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// A fresh temp directory inside the store (same filesystem, so renames are atomic).
    pub fn tempdir(&self, prefix: &str) -> Result<tempfile::TempDir> {
        let tmp = self.root.join("tmp");
        tempfile::Builder::new().prefix(prefix).tempdir_in(&tmp).map_err(io_err(&tmp))
    }

    fn temp_file(&self) -> Result<tempfile::NamedTempFile> {
        let tmp = self.root.join("tmp");
        tempfile::NamedTempFile::new_in(&tmp).map_err(io_err(&tmp))
    }

    /// Move a finished temp file to `dest` (creating the shard dir). Losing a race to
    /// another writer of the same content is fine: the content is identical.
    fn publish(&self, tmp: tempfile::NamedTempFile, dest: &Path, read_only: bool) -> Result<()> {
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        if read_only {
            // An explicit mode, not "the current one minus write bits": a file moved in
            // from a stage keeps whatever mode the stage gave it (0600, 0755...).
            let mode = crate::capture::blob_mode(&self.root);
            fs::set_permissions(tmp.path(), fs::Permissions::from_mode(mode)).map_err(io_err(tmp.path()))?;
        }
        tmp.persist(dest).map_err(|e| CacheError::Io { path: dest.to_path_buf(), source: e.error })?;
        Ok(())
    }

    /// Whether a blob file is at `dest`. Anything else found there (a directory, a
    /// link: damage) is moved aside into `tmp/` so the blob can be written again.
    fn blob_in_place(&self, dest: &Path) -> Result<bool> {
        match fs::symlink_metadata(dest) {
            Ok(m) if m.file_type().is_file() => Ok(true),
            Ok(_) => {
                let aside = self.root.join("tmp").join(format!("damaged-{}", dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()));
                fs::rename(dest, &aside).map_err(io_err(dest))?;
                Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(CacheError::Io { path: dest.to_path_buf(), source: e }),
        }
    }

    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest> {
        let d = Digest::of_bytes(bytes);
        let dest = self.blob_path(&d);
        if !self.blob_in_place(&dest)? {
            let mut tmp = self.temp_file()?;
            tmp.write_all(bytes).map_err(io_err(tmp.path()))?;
            self.publish(tmp, &dest, true)?;
        }
        Ok(d)
    }

    /// Store a file's content. `move_in` renames it into the store (it must be ours to
    /// take, e.g. a stage output under `tmp/`); otherwise it is copied. A file with
    /// other hard links is copied even when `move_in`: its inode is shared with a file
    /// outside (`ln ~/notes.txt o.txt`), which must neither become a read-only blob nor
    /// be able to change one later. Symbolic links and special files are refused.
    pub fn put_file(&self, path: &Path, move_in: bool) -> Result<(Digest, u64)> {
        let meta = fs::symlink_metadata(path).map_err(io_err(path))?;
        if !meta.file_type().is_file() {
            let what = if meta.file_type().is_symlink() { "symbolic link" } else { crate::capture::special_kind(&meta.file_type()).unwrap_or("directory") };
            return Err(CacheError::NotAFile { path: path.to_path_buf(), what });
        }
        let take = move_in && meta.nlink() == 1;
        let size = meta.len();
        let d = Digest::of_file(path).map_err(io_err(path))?;
        let dest = self.blob_path(&d);
        if !self.blob_in_place(&dest)? {
            let tmp = self.temp_file()?;
            if take {
                fs::rename(path, tmp.path()).map_err(io_err(path))?;
            } else {
                fs::copy(path, tmp.path()).map_err(io_err(path))?;
            }
            self.publish(tmp, &dest, true)?;
        }
        // Moving in means the name is consumed, whether or not the inode was taken.
        if move_in && path.exists() {
            fs::remove_file(path).map_err(io_err(path))?;
        }
        Ok((d, size))
    }

    /// The blob's size and mtime, to check later that nothing wrote to it.
    pub fn blob_stamp(&self, d: &Digest) -> Option<BlobStamp> {
        let m = fs::symlink_metadata(self.blob_path(d)).ok()?;
        Some(BlobStamp { size: m.len(), mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()) })
    }

    /// Remove a blob found damaged; entries that need it become incomplete, so their
    /// stages re-run instead of serving it.
    pub fn discard_blob(&self, d: &Digest) -> Result<()> {
        let p = self.blob_path(d);
        match fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(CacheError::Io { path: p, source: e }),
            _ => Ok(()),
        }
    }

    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>> {
        let p = self.blob_path(d);
        // Never through a link or into a directory that took a blob's place.
        match fs::symlink_metadata(&p) {
            Ok(m) if !m.file_type().is_file() => return Err(CacheError::NotAFile { path: p, what: crate::damage::file_kind(&m.file_type()) }),
            _ => {}
        }
        fs::read(&p).map_err(|e| if e.kind() == io::ErrorKind::NotFound { CacheError::MissingBlob(*d) } else { CacheError::Io { path: p, source: e } })
    }

    /// Capture every file under `dir` (moved in) as a tree; returns the tree's digest.
    pub fn put_tree(&self, dir: &Path, move_in: bool) -> Result<(Digest, Tree)> {
        let mut files = Vec::new();
        for entry in walkdir::WalkDir::new(dir).sort_by_file_name() {
            let entry = entry.map_err(|e| CacheError::Io { path: dir.to_path_buf(), source: e.into() })?;
            // Directories are implied by their files' paths (an empty one is not kept,
            // as in git); anything else is refused by `put_file`, never skipped.
            if entry.file_type().is_dir() {
                continue;
            }
            let rel = entry.path().strip_prefix(dir).expect("walkdir yields paths under its root");
            // A lossy conversion would give two names one path, or change a name on the
            // way back out: refuse names that are not UTF-8.
            let Some(rel) = rel.to_str().map(str::to_string) else {
                let e = io::Error::new(io::ErrorKind::InvalidData, "the file name is not UTF-8: rename it");
                return Err(CacheError::Io { path: entry.path().to_path_buf(), source: e });
            };
            let (digest, size) = self.put_file(entry.path(), move_in)?;
            files.push(TreeFile { path: rel, digest, size });
        }
        let tree = Tree::new(files);
        // A name the reader would refuse (`a\b`, two spellings of one path) fails the
        // capture now, not every later read of the manifest.
        tree.check().map_err(|e| CacheError::Io { path: dir.to_path_buf(), source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()) })?;
        let d = self.put_bytes(&tree.canonical_bytes())?;
        Ok((d, tree))
    }

    /// A tree manifest; its paths are checked as it is parsed (see `tree.rs`), so a
    /// damaged or forged one is an error naming the blob, never a path outside.
    pub fn read_tree(&self, d: &Digest) -> Result<Tree> {
        let bytes = self.read_blob(d)?;
        serde_json::from_slice(&bytes).map_err(|source| CacheError::Json { path: self.blob_path(d), source })
    }

    /// Lay a tree out under `dest`: as hard links to the read-only blobs (copies when
    /// linking is impossible) with `Materialize::Link`, for code fgflow trusts not to
    /// write its inputs; as private copies with `Materialize::Copy`, for code it does
    /// not control (root ignores the blobs' read-only mode, and an owner can chmod
    /// them). `fs::copy` uses `copy_file_range`, which shares extents on filesystems
    /// that can (btrfs, XFS), so a copy is free there.
    pub fn materialize(&self, d: &Digest, dest: &Path, how: Materialize) -> Result<Tree> {
        let tree = self.read_tree(d)?;
        fs::create_dir_all(dest).map_err(io_err(dest))?;
        for f in &tree.files {
            let target = dest.join(&f.path);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            let blob = self.blob_path(&f.digest);
            if !blob.exists() {
                return Err(CacheError::MissingBlob(f.digest));
            }
            if how == Materialize::Copy || fs::hard_link(&blob, &target).is_err() {
                fs::copy(&blob, &target).map_err(io_err(&target))?;
            }
        }
        Ok(tree)
    }

    fn write_json<T: Serialize>(&self, dest: &Path, value: &T) -> Result<()> {
        let mut tmp = self.temp_file()?;
        // One write(2): serialising straight into the unbuffered file costs hundreds.
        let bytes = serde_json::to_vec_pretty(value).map_err(|source| CacheError::Json { path: dest.to_path_buf(), source })?;
        tmp.write_all(&bytes).map_err(io_err(dest))?;
        if std::env::var_os("FGFLOW_FSYNC").is_some() {
            tmp.as_file().sync_all().map_err(io_err(dest))?;
        }
        self.publish(tmp, dest, false)
    }

    /// `None` when missing; a damaged file (not a file, or not a `T`) is `CacheError::Json`.
    fn read_json<T: DeserializeOwned>(&self, path: &Path) -> Result<Option<T>> {
        match crate::damage::read_record(path)? {
            Found::Good(v) => Ok(Some(v)),
            Found::Missing => Ok(None),
            Found::Damaged(why) => Err(CacheError::Json { path: path.to_path_buf(), source: serde::de::Error::custom(why) }),
        }
    }

    fn entry_path(&self, key: &Digest) -> PathBuf {
        self.sharded("entries", key, ".json")
    }

    /// Record a finished execution. Call only after every blob it names is stored.
    pub fn put_entry(&self, entry: &Entry) -> Result<()> {
        debug_assert!(entry.blobs().all(|d| self.has_blob(d)));
        self.write_json(&self.entry_path(&entry.key), entry)
    }

    /// The entry of `key` if it can be served: readable, really the entry of `key`,
    /// and every blob it needs present. A damaged one is `None` (the stage re-runs and
    /// its new entry replaces it) with a warning naming the file, once per process;
    /// `Err` only for I/O failures such as permissions.
    pub fn get_entry(&self, key: &Digest) -> Result<Option<Entry>> {
        let path = self.entry_path(key);
        match crate::damage::usable_entry(self, key, &path, true)? {
            Found::Good(e) => Ok(Some(e)),
            Found::Missing => Ok(None),
            Found::Damaged(why) => {
                crate::damage::warn(&path, &format!("{why}; treated as missing, its stage re-runs (`fgflow verify` removes damaged records)"));
                Ok(None)
            }
        }
    }

    /// Whether `get_entry` would serve an entry: "fresh" means usable, not "a file is there".
    pub fn has_entry(&self, key: &Digest) -> bool {
        matches!(self.get_entry(key), Ok(Some(_)))
    }

    pub fn remove_entry(&self, key: &Digest) -> Result<()> {
        let p = self.entry_path(key);
        crate::damage::remove_any(&p).map_err(|source| CacheError::Io { path: p, source })
    }

    /// Keys of every entry in the store.
    pub fn entry_keys(&self) -> Result<Vec<Digest>> {
        let dir = self.root.join("entries");
        let mut keys = Vec::new();
        // Reading verbs do not create the cache: no directory, no entries.
        if !dir.is_dir() {
            return Ok(keys);
        }
        for e in walkdir::WalkDir::new(&dir).min_depth(2).max_depth(2) {
            let e = e.map_err(|e| CacheError::Io { path: dir.clone(), source: e.into() })?;
            let shard = e.path().parent().and_then(|p| p.file_name()).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let name = e.file_name().to_string_lossy();
            if let Some(rest) = name.strip_suffix(".json") {
                if let Ok(d) = format!("{shard}{rest}").parse() {
                    keys.push(d);
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// The unique entry key starting with `prefix` (at least 4 hex digits).
    pub fn resolve_prefix(&self, prefix: &str) -> Result<Digest> {
        let p = prefix.to_ascii_lowercase();
        let matches: Vec<Digest> = if p.len() >= 2 {
            self.entry_keys()?.into_iter().filter(|k| k.to_hex().starts_with(&p)).collect()
        } else {
            Vec::new()
        };
        match matches.as_slice() {
            [one] => Ok(*one),
            [] => Err(CacheError::NoMatch(prefix.to_string())),
            many => Err(CacheError::Ambiguous { prefix: prefix.to_string(), count: many.len() }),
        }
    }

    /// Small JSON documents under `refs/` or `jobs/`.
    pub fn put_doc<T: Serialize>(&self, dir: &str, name: &str, value: &T) -> Result<()> {
        self.write_json(&self.doc_path(dir, name)?, value)
    }

    /// `None` when missing; a damaged document is `CacheError::Json` naming the file.
    pub fn get_doc<T: DeserializeOwned>(&self, dir: &str, name: &str) -> Result<Option<T>> {
        self.read_json(&self.doc_path(dir, name)?)
    }

    /// Names of the documents in `dir`.
    pub fn doc_names(&self, dir: &str) -> Result<Vec<String>> {
        let d = self.root.join(dir);
        let mut names = Vec::new();
        for e in fs::read_dir(&d).map_err(io_err(&d))? {
            let e = e.map_err(io_err(&d))?;
            if let Some(n) = e.file_name().to_string_lossy().strip_suffix(".json") {
                names.push(n.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    pub fn remove_doc(&self, dir: &str, name: &str) -> Result<()> {
        let p = self.doc_path(dir, name)?;
        crate::damage::remove_any(&p).map_err(io_err(&p))
    }

    /// Held shared by runs, exclusively by gc and verify.
    pub fn lock_shared(&self) -> Result<FileLock> {
        let p = self.root.join("lock");
        FileLock::shared(&p).map_err(io_err(&p))
    }

    pub fn lock_exclusive(&self) -> Result<FileLock> {
        let p = self.root.join("lock");
        FileLock::exclusive(&p).map_err(io_err(&p))
    }

    /// Held while a key executes: a second process blocks here, then finds the entry.
    pub fn lock_key(&self, key: &Digest) -> Result<FileLock> {
        let p = self.root.join("locks").join(key.to_hex());
        FileLock::exclusive(&p).map_err(io_err(&p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trees_round_trip_and_identical_content_gives_identical_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("c")).unwrap();
        let a = dir.path().join("a");
        fs::create_dir_all(a.join("sub")).unwrap();
        fs::write(a.join("x.txt"), "x").unwrap();
        fs::write(a.join("sub/y.bin"), [1u8, 2, 3]).unwrap();
        let (d1, tree) = store.put_tree(&a, false).unwrap();
        assert_eq!(tree.files.len(), 2);
        assert_eq!(tree.files[0].path, "sub/y.bin");
        let (d2, _) = store.put_tree(&a, true).unwrap();
        assert_eq!(d1, d2);
        assert!(!a.join("x.txt").exists(), "moved in");
        let out = dir.path().join("out");
        store.materialize(&d1, &out, Materialize::Link).unwrap();
        assert_eq!(fs::read(out.join("sub/y.bin")).unwrap(), vec![1, 2, 3]);
        assert!(fs::metadata(out.join("x.txt")).unwrap().permissions().readonly());
    }

    #[test]
    fn entries_and_prefixes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let key = Digest::of_bytes(b"k");
        assert!(store.get_entry(&key).unwrap().is_none());
        let e = Entry {
            key,
            stage: "s".into(),
            kind: "k".into(),
            fingerprint: serde_json::json!({}),
            outputs: Default::default(),
            log: None,
            created_unix: 0,
            duration_ms: 0,
        };
        store.put_entry(&e).unwrap();
        assert_eq!(store.get_entry(&key).unwrap().unwrap(), e);
        assert_eq!(store.resolve_prefix(&key.to_hex()[..6]).unwrap(), key);
        assert!(matches!(store.resolve_prefix("zz"), Err(CacheError::NoMatch(_))));
    }
}
