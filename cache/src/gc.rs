//! Garbage collection by reachability and integrity checking of the store.
//!
//! `gc` keeps every entry named by a kept ref (the last run of each stage of each
//! pipeline file that still exists) plus every entry or blob younger than the grace
//! period (a run in progress, or a result the user may still want to revert to), and
//! every blob reachable from kept entries. Damaged entries are left to `verify`. It
//! also cleans what cluster executors keep per key ([`LOGS_DIR`], [`LEASES_DIR`]): job
//! logs and ids of keys no longer kept, and leases nobody holds (never one whose job
//! may still run: the caller, who knows the scheduler, says which through
//! [`LeaseCheck`]).
//!
//! `verify` checks every record and repairs by removal, in one pass that never stops
//! at the first problem: blobs are re-hashed (and removed when their content does not
//! match their name, or when something else sits at their path); entries are removed
//! when unreadable, stored under another key, recorded with a fingerprint that does
//! not hash to their key (through [`VerifyChecks`], which the engine's caller
//! provides), or needing a blob that is missing, corrupt or not a valid manifest;
//! manifests with bad paths are removed; damaged job documents and the stat cache are
//! removed; damaged refs are set aside (`<name>.json.bad-<time>`) for the next run to
//! rebuild. Every problem is listed with the file it concerns.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::damage::{self, Found};
use crate::digest::Digest;
use crate::entry::Entry;
use crate::store::{CacheError, Result, Store};
use crate::tree::Tree;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub entries_kept: usize,
    pub entries_removed: usize,
    pub blobs_kept: usize,
    pub blobs_removed: usize,
    pub bytes_removed: u64,
    pub temp_removed: usize,
    /// Job logs and job-id files (`logs/<key>.log`, `logs/<key>.job`) removed.
    pub logs_removed: usize,
    /// Leases removed (`leases/<key>`, and ones set aside when taken over).
    pub leases_removed: usize,
    /// Leases left because their job may still run or their holder may be alive.
    pub leases_kept: usize,
}

/// Cluster executors' per-key files under the cache root: `<key>.log` (what the job
/// printed) and `<key>.job` (its job id and final state). Named here, below the engine
/// that writes them, so that `gc` can clean them.
pub const LOGS_DIR: &str = "logs";
/// Per-key leases of the controllers submitting them: `leases/<key>`.
pub const LEASES_DIR: &str = "leases";
/// A lease its holder has not touched for this long is not held: holders touch theirs
/// on every polling round, at most 15 s apart.
pub const LEASE_STALE: Duration = Duration::from_secs(120);

/// What `gc` asks about a lease of the cluster executor (the cache knows no scheduler).
pub trait LeaseCheck {
    /// Whether the job the lease names may still be running; when that cannot be told
    /// (no scheduler answers), `true`. Such a lease is never removed.
    fn job_may_run(&self, lease: &Path) -> bool;
    /// Whether the lease's holder is known to be gone (a dead process on this host).
    fn holder_gone(&self, lease: &Path) -> bool;
}

/// Knows nothing: every lease may belong to a running job, so none is removed.
pub struct NoLeaseInfo;
impl LeaseCheck for NoLeaseInfo {
    fn job_may_run(&self, _: &Path) -> bool {
        true
    }
    fn holder_gone(&self, _: &Path) -> bool {
        false
    }
}

/// The kind of record a problem was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    Blob,
    Tree,
    Entry,
    Job,
    Refs,
    StatCache,
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Record::Blob => "blob",
            Record::Tree => "tree manifest",
            Record::Entry => "entry",
            Record::Job => "job",
            Record::Refs => "refs",
            Record::StatCache => "stat cache",
        })
    }
}

/// What `verify` did about a problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Removed,
    SetAside(PathBuf),
    /// Left in place, with why (removing failed, or the bytes are still needed).
    Kept(String),
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Removed => f.write_str("removed"),
            Action::SetAside(to) => write!(f, "set aside as {}", to.display()),
            Action::Kept(why) => write!(f, "kept: {why}"),
        }
    }
}

/// One damaged record: where, what was wrong, what was done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub record: Record,
    pub path: PathBuf,
    pub why: String,
    pub action: Action,
}

/// `entry .fgflow/entries/ab/cd….json: truncated (…); removed, its stage will re-run`
impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}; {}", self.record, self.path.display(), self.why, self.action)?;
        let then = match (self.record, &self.action) {
            (Record::Entry, Action::Removed) => ", its stage will re-run",
            (Record::Refs, Action::SetAside(_)) => ", the next run rebuilds it",
            (Record::StatCache, Action::Removed) => ", sources are re-hashed once",
            _ => "",
        };
        f.write_str(then)
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub blobs_checked: usize,
    pub entries_checked: usize,
    pub documents_checked: usize,
    /// Blobs removed: content not matching the name, not a file, or a bad manifest.
    pub corrupt_blobs: Vec<Digest>,
    /// Entries removed (damaged themselves, or needing a removed or missing blob).
    pub dropped_entries: Vec<Digest>,
    /// Every problem, in the order found.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks that need to know what entries and documents mean (the engine's types).
/// The defaults check nothing beyond what the cache itself knows.
pub trait VerifyChecks {
    /// The key `entry`'s recorded fingerprint hashes to; `None` when it cannot be
    /// recomputed here (an entry of another schema), `Some(Err(why))` when the
    /// recorded fingerprint is damaged.
    fn entry_key(&self, _entry: &Entry) -> Option<std::result::Result<Digest, String>> {
        None
    }
    /// Whether the document `dir/name.json` has the right shape (`Err(why)` if not).
    fn document(&self, _dir: &str, _name: &str, _doc: &serde_json::Value) -> std::result::Result<(), String> {
        Ok(())
    }
}

/// No checks beyond the cache's own.
pub struct NoChecks;
impl VerifyChecks for NoChecks {}

fn older_than(meta: &fs::Metadata, grace: Duration) -> bool {
    // `now - mtime` compared with `grace`, never `now - grace`: a huge grace cannot overflow.
    meta.modified().ok().and_then(|m| SystemTime::now().duration_since(m).ok()).is_some_and(|age| age > grace)
}

/// `(name, path)` of everything two levels under `dir` (`dir/ab/cdef…`), the layout of
/// blobs and entries, whatever its type.
fn sharded_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(dir).min_depth(2).max_depth(2).sort_by_file_name() {
        let e = e.map_err(|e| CacheError::Io { path: dir.to_path_buf(), source: e.into() })?;
        let shard = e.path().parent().and_then(|p| p.file_name()).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        out.push((format!("{shard}{}", e.file_name().to_string_lossy()), e.path().to_path_buf()));
    }
    Ok(out)
}

fn blob_files(store: &Store) -> Result<Vec<(Digest, PathBuf)>> {
    Ok(sharded_files(&store.root().join("blobs"))?.into_iter().filter_map(|(name, p)| name.parse().ok().map(|d| (d, p))).collect())
}

fn entry_files(store: &Store) -> Result<Vec<(Digest, PathBuf)>> {
    Ok(sharded_files(&store.root().join("entries"))?
        .into_iter()
        .filter_map(|(name, p)| name.strip_suffix(".json").and_then(|n| n.parse().ok()).map(|d| (d, p)))
        .collect())
}

/// Remove what `keep` (entry keys) does not reach. Caller holds the exclusive lock.
/// Leaves every lease in place (see [`gc_with`]).
pub fn gc(store: &Store, keep: &HashSet<Digest>, grace: Duration, dry_run: bool) -> Result<GcReport> {
    gc_with(store, keep, grace, dry_run, &NoLeaseInfo)
}

/// [`gc`], removing the leases `leases` says are not in use.
pub fn gc_with(store: &Store, keep: &HashSet<Digest>, grace: Duration, dry_run: bool, leases: &dyn LeaseCheck) -> Result<GcReport> {
    let mut report = GcReport::default();
    let mut live_blobs = HashSet::new();
    let mut kept_keys = keep.clone();
    for (key, path) in entry_files(store)? {
        // A damaged entry is `verify`'s to report and remove; gc neither keeps its
        // blobs alive on its word nor deletes it silently.
        let Found::Good(entry) = store.read_entry(&key)? else { continue };
        let young = fs::metadata(&path).map(|m| !older_than(&m, grace)).unwrap_or(true);
        if keep.contains(&key) || young {
            report.entries_kept += 1;
            kept_keys.insert(key);
            for d in entry.blobs() {
                live_blobs.insert(*d);
            }
            for d in entry.outputs.values() {
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
        let Ok(meta) = fs::symlink_metadata(&path) else { continue };
        if live_blobs.contains(&d) || !older_than(&meta, grace) {
            report.blobs_kept += 1;
        } else {
            report.blobs_removed += 1;
            report.bytes_removed += meta.len();
            if !dry_run {
                damage::remove_any(&path).map_err(|source| CacheError::Io { path: path.clone(), source })?;
            }
        }
    }
    let tmp = store.root().join("tmp");
    let mut old: Vec<PathBuf> = fs::read_dir(&tmp).map_err(|source| CacheError::Io { path: tmp.clone(), source })?.flatten().filter(|e| e.metadata().is_ok_and(|m| older_than(&m, grace))).map(|e| e.path()).collect();
    // Documents set aside as damaged (`refs/x.json.bad-<time>`) go the way of temp files.
    for dir in ["refs", "jobs"] {
        if let Ok(rd) = fs::read_dir(store.root().join(dir)) {
            old.extend(rd.flatten().filter(|e| e.file_name().to_string_lossy().contains(".json.bad-") && e.metadata().is_ok_and(|m| older_than(&m, grace))).map(|e| e.path()));
        }
    }
    for p in old {
        report.temp_removed += 1;
        if !dry_run {
            let _ = damage::remove_any(&p);
        }
    }
    let held = gc_leases(store, grace, dry_run, leases, &mut report);
    gc_logs(store, &kept_keys, &held, grace, dry_run, &mut report);
    Ok(report)
}

/// Age of a file by its mtime; `None` when it cannot be told (then it is kept).
fn age(meta: &fs::Metadata) -> Option<Duration> {
    meta.modified().ok().and_then(|m| SystemTime::now().duration_since(m).ok())
}

/// Removes leases nobody holds: never one whose job may still run; otherwise one whose
/// holder is gone, or untouched for longer than both the grace and [`LEASE_STALE`].
/// Leases set aside by a take-over (`<key>.stale-<pid>`) go after the grace. Returns
/// the keys whose lease stays.
fn gc_leases(store: &Store, grace: Duration, dry_run: bool, leases: &dyn LeaseCheck, report: &mut GcReport) -> HashSet<String> {
    let mut held = HashSet::new();
    let Ok(rd) = fs::read_dir(store.root().join(LEASES_DIR)) else { return held };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        let Ok(meta) = fs::symlink_metadata(&path) else { continue };
        let Some(age) = age(&meta) else {
            held.insert(name);
            continue;
        };
        let remove = if name.parse::<Digest>().is_ok() {
            let unheld = leases.holder_gone(&path) || (age > grace && age > LEASE_STALE);
            let remove = meta.is_file() && !leases.job_may_run(&path) && unheld;
            if !remove {
                report.leases_kept += 1;
                held.insert(name);
            }
            remove
        } else {
            name.contains(".stale-") && age > grace
        };
        if remove {
            report.leases_removed += 1;
            if !dry_run {
                let _ = damage::remove_any(&path);
            }
        }
    }
    held
}

/// Removes job logs and job-id files of keys neither kept nor under a lease, older
/// than the grace, and the launcher's leftover temp files. Anything else in the
/// directory (the launcher script itself) is left alone.
fn gc_logs(store: &Store, kept: &HashSet<Digest>, held: &HashSet<String>, grace: Duration, dry_run: bool, report: &mut GcReport) {
    let Ok(rd) = fs::read_dir(store.root().join(LOGS_DIR)) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(meta) = e.metadata() else { continue };
        if !age(&meta).is_some_and(|a| a > grace) {
            continue;
        }
        let stem = name.strip_suffix(".log").or_else(|| name.strip_suffix(".job"));
        let remove = match stem.map(|s| (s, s.parse::<Digest>())) {
            Some((hex, Ok(key))) => !kept.contains(&key) && !held.contains(hex),
            _ => {
                // The launcher script is written to a temp name first.
                if name.starts_with(".exec-job.sh.") {
                    report.temp_removed += 1;
                    if !dry_run {
                        let _ = damage::remove_any(&e.path());
                    }
                }
                continue;
            }
        };
        if remove {
            report.logs_removed += 1;
            if !dry_run {
                let _ = damage::remove_any(&e.path());
            }
        }
    }
}

/// [`verify_with`] without the engine's checks.
pub fn verify(store: &Store) -> Result<VerifyReport> {
    verify_with(store, &NoChecks)
}

/// Check every record, remove (or set aside) every damaged one, and report them all.
/// Caller holds the exclusive lock. `Err` only when the cache cannot be listed.
pub fn verify_with(store: &Store, checks: &dyn VerifyChecks) -> Result<VerifyReport> {
    let mut v = Verifier { store, report: VerifyReport::default(), bad: HashSet::new(), trees: HashMap::new() };
    v.blobs()?;
    let (file_blobs, bad_trees) = v.entries(checks)?;
    v.bad_manifests(bad_trees, &file_blobs);
    v.documents("jobs", Record::Job, checks)?;
    v.documents("refs", Record::Refs, checks)?;
    v.stat_cache();
    Ok(v.report)
}

struct Verifier<'a> {
    store: &'a Store,
    report: VerifyReport,
    /// Blobs removed as corrupt.
    bad: HashSet<Digest>,
    /// Manifests already read: their file digests, or why they cannot be used.
    trees: HashMap<Digest, std::result::Result<Vec<Digest>, TreeError>>,
}

#[derive(Debug, Clone)]
enum TreeError {
    /// The manifest blob is missing or was removed as corrupt.
    Missing,
    /// It is there but not a valid manifest.
    Invalid(String),
}

impl Verifier<'_> {
    fn remove(&mut self, record: Record, path: &Path, why: String) -> bool {
        let (action, removed) = match damage::remove_any(path) {
            Ok(()) => (Action::Removed, true),
            Err(e) => (Action::Kept(format!("could not remove it: {e}")), false),
        };
        self.report.problems.push(Problem { record, path: path.to_path_buf(), why, action });
        removed
    }

    fn blobs(&mut self) -> Result<()> {
        for (d, path) in blob_files(self.store)? {
            self.report.blobs_checked += 1;
            let why = match fs::symlink_metadata(&path) {
                Ok(m) if !m.file_type().is_file() => Some(format!("is a {}, not a file", damage::file_kind(&m.file_type()))),
                Ok(_) => match Digest::of_file(&path) {
                    Ok(actual) if actual == d => None,
                    Ok(_) => Some("content does not match its name".to_string()),
                    Err(e) => Some(format!("unreadable: {e}")),
                },
                Err(_) => continue,
            };
            if let Some(why) = why {
                self.remove(Record::Blob, &path, why);
                self.bad.insert(d);
                self.report.corrupt_blobs.push(d);
            }
        }
        Ok(())
    }

    fn blob_ok(&self, d: &Digest) -> bool {
        !self.bad.contains(d) && fs::symlink_metadata(self.store.blob_path(d)).is_ok_and(|m| m.file_type().is_file())
    }

    /// The file digests of manifest `d`, or why it cannot be used.
    fn tree(&mut self, d: &Digest) -> std::result::Result<Vec<Digest>, TreeError> {
        if let Some(t) = self.trees.get(d) {
            return t.clone();
        }
        let t = if !self.blob_ok(d) {
            Err(TreeError::Missing)
        } else {
            match self.store.read_blob(d).map_err(|e| e.to_string()).and_then(|b| serde_json::from_slice::<Tree>(&b).map_err(|e| e.to_string())) {
                Ok(tree) => Ok(tree.files.iter().map(|f| f.digest).collect()),
                Err(e) => Err(TreeError::Invalid(e)),
            }
        };
        self.trees.insert(*d, t.clone());
        t
    }

    /// Check every entry; returns the blobs valid entries use as file content (or
    /// logs), and the manifests found invalid with why.
    fn entries(&mut self, checks: &dyn VerifyChecks) -> Result<(HashSet<Digest>, HashMap<Digest, String>)> {
        let mut file_blobs = HashSet::new();
        let mut bad_trees = HashMap::new();
        for (key, path) in entry_files(self.store)? {
            self.report.entries_checked += 1;
            let why = match damage::read_record::<Entry>(&path) {
                Ok(Found::Missing) => continue,
                Ok(Found::Damaged(why)) => Some(why),
                Err(e) => Some(e.to_string()),
                Ok(Found::Good(entry)) => self.entry_problem(&key, &entry, checks, &mut bad_trees).or_else(|| {
                    for d in entry.outputs.values() {
                        file_blobs.extend(self.trees.get(d).and_then(|t| t.as_ref().ok()).into_iter().flatten().copied());
                    }
                    file_blobs.extend(entry.log);
                    None
                }),
            };
            if let Some(why) = why {
                self.remove(Record::Entry, &path, why);
                self.report.dropped_entries.push(key);
            }
        }
        Ok((file_blobs, bad_trees))
    }

    fn entry_problem(&mut self, key: &Digest, entry: &Entry, checks: &dyn VerifyChecks, bad_trees: &mut HashMap<Digest, String>) -> Option<String> {
        if entry.key != *key {
            return Some(format!("holds the entry of key {}, not of the key it is stored under: copied over it?", entry.key));
        }
        match checks.entry_key(entry) {
            Some(Err(why)) => return Some(format!("recorded fingerprint unreadable: {why}")),
            Some(Ok(k)) if k != *key => return Some(format!("its recorded fingerprint hashes to {k}, not to its key")),
            _ => {}
        }
        for (name, d) in &entry.outputs {
            match self.tree(d) {
                Err(TreeError::Missing) => return Some(format!("output `{name}` needs blob {d}, which is missing or was corrupt")),
                Err(TreeError::Invalid(why)) => {
                    let msg = format!("output `{name}`: tree manifest {d} is damaged: {why}");
                    bad_trees.insert(*d, why);
                    return Some(msg);
                }
                Ok(files) => {
                    if let Some(f) = files.iter().find(|f| !self.blob_ok(f)) {
                        return Some(format!("output `{name}` needs blob {f}, which is missing or was corrupt"));
                    }
                }
            }
        }
        match entry.log {
            Some(d) if !self.blob_ok(&d) => Some(format!("its log needs blob {d}, which is missing or was corrupt")),
            _ => None,
        }
    }

    /// Remove manifests with bad paths, unless the same bytes are a valid entry's file
    /// content (a blob is named by its content, not by what it is used for).
    fn bad_manifests(&mut self, bad_trees: HashMap<Digest, String>, file_blobs: &HashSet<Digest>) {
        let mut bad: Vec<(Digest, String)> = bad_trees.into_iter().collect();
        bad.sort();
        for (d, why) in bad {
            let path = self.store.blob_path(&d);
            if file_blobs.contains(&d) {
                self.report.problems.push(Problem { record: Record::Tree, path, why, action: Action::Kept("it is also a file of a valid output".into()) });
            } else if self.remove(Record::Tree, &path, why) {
                self.bad.insert(d);
                self.report.corrupt_blobs.push(d);
            }
        }
    }

    fn documents(&mut self, dir: &str, record: Record, checks: &dyn VerifyChecks) -> Result<()> {
        for name in self.store.doc_names(dir)? {
            let Ok(path) = self.store.doc_path(dir, &name) else { continue };
            self.report.documents_checked += 1;
            let why = match damage::read_record::<serde_json::Value>(&path) {
                Ok(Found::Missing) => continue,
                Ok(Found::Damaged(why)) => why,
                Err(e) => e.to_string(),
                Ok(Found::Good(doc)) => {
                    // A job is stored under its key: one copied over another is damage too.
                    let wrong_key = record == Record::Job && doc.get("key").and_then(|k| k.as_str()) != Some(name.as_str());
                    match checks.document(dir, &name, &doc) {
                        Err(why) => why,
                        Ok(()) if wrong_key => format!("is not the job of key {name}"),
                        Ok(()) => continue,
                    }
                }
            };
            if record == Record::Refs {
                let action = match damage::set_aside(&path) {
                    Ok(to) => Action::SetAside(to),
                    Err(e) => Action::Kept(format!("could not set it aside: {e}")),
                };
                self.report.problems.push(Problem { record, path, why, action });
            } else {
                self.remove(record, &path, why);
            }
        }
        Ok(())
    }

    fn stat_cache(&mut self) {
        let path = self.store.root().join("stat-cache.json");
        if let Some(why) = crate::stat_cache::StatCache::problem(&path) {
            self.remove(Record::StatCache, &path, why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::TreeFile;

    fn entry(store: &Store, key: Digest, content: &str) -> Entry {
        let src = tempfile::tempdir().unwrap();
        fs::write(src.path().join("o.txt"), content).unwrap();
        let (tree, _) = store.put_tree(src.path(), false).unwrap();
        let e = Entry {
            key,
            stage: "s".into(),
            kind: "k".into(),
            fingerprint: serde_json::json!({}),
            outputs: [("o".to_string(), tree)].into(),
            log: None,
            created_unix: 0,
            duration_ms: 0,
        };
        store.put_entry(&e).unwrap();
        e
    }

    fn entry_path(store: &Store, key: &Digest) -> PathBuf {
        damage::entry_file(store, key)
    }

    fn make_writable(p: &Path) {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(p, fs::Permissions::from_mode(0o644)).unwrap();
    }

    #[test]
    fn verify_reports_and_removes_every_damaged_record_in_one_pass() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let keys: Vec<Digest> = (0..7).map(|i| Digest::of_bytes(format!("k{i}").as_bytes())).collect();
        let entries: Vec<Entry> = keys.iter().enumerate().map(|(i, k)| entry(&store, *k, &format!("content {i}"))).collect();
        // 0 truncated, 1 empty, 2 garbage, 3 wrong shape, 4 a directory.
        let p0 = entry_path(&store, &keys[0]);
        let text = fs::read_to_string(&p0).unwrap();
        fs::write(&p0, &text[..text.len() / 2]).unwrap();
        fs::write(entry_path(&store, &keys[1]), "").unwrap();
        fs::write(entry_path(&store, &keys[2]), [0xff, 0x00, 0x13, 0x37]).unwrap();
        fs::write(entry_path(&store, &keys[3]), r#"{"hello": [1, 2]}"#).unwrap();
        let p4 = entry_path(&store, &keys[4]);
        fs::remove_file(&p4).unwrap();
        fs::create_dir_all(p4.join("x")).unwrap();
        // 5: copied over by entry 6.
        fs::copy(entry_path(&store, &keys[6]), entry_path(&store, &keys[5])).unwrap();
        // 6: its file blob became a directory.
        let tree = store.read_tree(&entries[6].outputs["o"]).unwrap();
        let blob = store.blob_path(&tree.files[0].digest);
        fs::remove_file(&blob).unwrap();
        fs::create_dir(&blob).unwrap();
        // A garbage job document and a garbage refs document.
        fs::write(store.root().join("jobs/abc.json"), "{").unwrap();
        fs::write(store.root().join("refs/0123.json"), "garbage").unwrap();
        fs::write(store.root().join("stat-cache.json"), "[1,").unwrap();

        let r = verify(&store).unwrap();
        let entry_problems = r.problems.iter().filter(|p| p.record == Record::Entry).count();
        assert_eq!(entry_problems, 7, "{:#?}", r.problems);
        assert_eq!(r.dropped_entries.len(), 7);
        assert_eq!(r.corrupt_blobs, vec![tree.files[0].digest]);
        assert!(r.problems.iter().any(|p| p.record == Record::Job && p.action == Action::Removed));
        assert!(r.problems.iter().any(|p| p.record == Record::Refs && matches!(p.action, Action::SetAside(_))));
        assert!(r.problems.iter().any(|p| p.record == Record::StatCache));
        let why = |k: &Digest| r.problems.iter().find(|p| p.path == entry_path(&store, k)).unwrap().why.clone();
        assert!(why(&keys[0]).contains("truncated"), "{}", why(&keys[0]));
        assert!(why(&keys[1]).contains("empty"), "{}", why(&keys[1]));
        assert!(why(&keys[3]).contains("wrong shape"), "{}", why(&keys[3]));
        assert!(why(&keys[4]).contains("directory"), "{}", why(&keys[4]));
        assert!(why(&keys[5]).contains("copied"), "{}", why(&keys[5]));
        assert!(r.problems.iter().all(|p| !matches!(p.action, Action::Kept(_))), "{:#?}", r.problems);
        // Everything is gone or set aside: a second pass is clean.
        let again = verify(&store).unwrap();
        assert!(again.is_clean(), "{:#?}", again.problems);
        assert!(store.entry_keys().unwrap().is_empty());
    }

    #[test]
    fn forged_manifests_are_removed_and_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let key = Digest::of_bytes(b"k");
        let mut e = entry(&store, key, "x");
        let file = store.read_tree(&e.outputs["o"]).unwrap().files[0].digest;
        // A manifest whose name matches its content, as anyone who can write the cache could make.
        let forged = format!(r#"{{"files":[{{"path":"../../../tmp/x","digest":"{file}","size":1}}]}}"#);
        let d = store.put_bytes(forged.as_bytes()).unwrap();
        e.outputs.insert("o".into(), d);
        store.put_entry(&e).unwrap();
        let err = store.read_tree(&d).unwrap_err().to_string();
        assert!(err.contains("`..`") && err.contains(&store.blob_path(&d).display().to_string()), "{err}");
        assert!(store.get_entry(&key).unwrap().is_none(), "a forged manifest makes the entry unusable");
        assert!(!store.has_entry(&key));
        let r = verify(&store).unwrap();
        assert_eq!(r.dropped_entries, vec![key]);
        assert_eq!(r.corrupt_blobs, vec![d]);
        assert!(!store.blob_path(&d).exists());
        assert!(store.has_blob(&file), "the file it named is not the forger's to remove");
        assert!(verify(&store).unwrap().is_clean());
    }

    #[test]
    fn get_entry_treats_damage_as_missing_and_clears_the_way_for_the_rerun() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let key = Digest::of_bytes(b"k");
        let e = entry(&store, key, "x");
        assert_eq!(store.get_entry(&key).unwrap(), Some(e.clone()));
        // A file blob replaced by a directory: missing, and moved out of the way so the
        // re-run can store the blob again.
        let file = store.read_tree(&e.outputs["o"]).unwrap().files[0].digest;
        let blob = store.blob_path(&file);
        make_writable(&blob);
        fs::remove_file(&blob).unwrap();
        fs::create_dir(&blob).unwrap();
        assert!(store.get_entry(&key).unwrap().is_none());
        assert!(!blob.exists());
        let e2 = entry(&store, key, "x");
        assert_eq!(store.get_entry(&key).unwrap(), Some(e2));
        // Garbage over the entry: missing, then overwritten by the next put.
        fs::write(entry_path(&store, &key), "{\"key\":").unwrap();
        assert!(store.get_entry(&key).unwrap().is_none());
        assert!(!store.has_entry(&key));
        // Another key's entry copied over it: missing.
        let other = Digest::of_bytes(b"other");
        entry(&store, other, "y");
        fs::copy(entry_path(&store, &other), entry_path(&store, &key)).unwrap();
        assert!(store.get_entry(&key).unwrap().is_none());
    }

    #[test]
    fn gc_skips_damaged_entries_and_survives_a_directory_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let key = Digest::of_bytes(b"k");
        entry(&store, key, "x");
        fs::write(entry_path(&store, &key), "garbage").unwrap();
        let odd = store.blob_path(&Digest::of_bytes(b"nothing"));
        fs::create_dir_all(odd.join("inner")).unwrap();
        let r = gc(&store, &HashSet::new(), Duration::ZERO, false).unwrap();
        assert_eq!(r.entries_kept + r.entries_removed, 0);
        assert!(!odd.exists());
        let r = gc(&store, &HashSet::new(), Duration::MAX, true).unwrap();
        assert_eq!(r.blobs_removed, 0, "nothing is older than the longest grace");
    }

    /// Says, per lease file name, whether its job may run and whether its holder is gone.
    struct Told(Vec<(String, bool, bool)>);
    impl LeaseCheck for Told {
        fn job_may_run(&self, lease: &Path) -> bool {
            self.0.iter().any(|(n, run, _)| lease.ends_with(n) && *run)
        }
        fn holder_gone(&self, lease: &Path) -> bool {
            self.0.iter().any(|(n, _, gone)| lease.ends_with(n) && *gone)
        }
    }

    fn aged(path: &Path, by: Duration) {
        let f = fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - by).unwrap();
    }

    #[test]
    fn gc_cleans_job_logs_of_unkept_keys_and_leases_nobody_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (kept, dropped, failed, leased) = (Digest::of_bytes(b"kept"), Digest::of_bytes(b"dropped"), Digest::of_bytes(b"failed"), Digest::of_bytes(b"leased"));
        entry(&store, kept, "a");
        entry(&store, dropped, "b");
        // An entry gc removes (old, not kept): its job's log and id go with it.
        aged(&entry_path(&store, &dropped), Duration::from_secs(3 * 86400));
        let logs = dir.path().join(LOGS_DIR);
        let leases = dir.path().join(LEASES_DIR);
        fs::create_dir_all(&logs).unwrap();
        fs::create_dir_all(&leases).unwrap();
        let day = Duration::from_secs(86400);
        for k in [kept, dropped, failed, leased] {
            for ext in ["log", "job"] {
                let p = logs.join(format!("{}.{ext}", k.to_hex()));
                fs::write(&p, "x").unwrap();
                aged(&p, 2 * day);
            }
        }
        let young = logs.join(format!("{}.log", Digest::of_bytes(b"young").to_hex()));
        fs::write(&young, "x").unwrap();
        fs::write(logs.join("exec-job.sh"), "#!/bin/sh").unwrap();
        aged(&logs.join("exec-job.sh"), 2 * day);
        // Leases: `leased` names a job still running (kept whatever its age); `gone`
        // was held by a dead process (removed at once); `old` is untouched for two days
        // (removed); `fresh` was touched just now by a live controller (kept).
        let lease = |k: &str, by: Duration| {
            let p = leases.join(k);
            fs::write(&p, "job 1\n").unwrap();
            aged(&p, by);
        };
        let (gone, old, fresh) = (Digest::of_bytes(b"gone").to_hex(), Digest::of_bytes(b"old").to_hex(), Digest::of_bytes(b"fresh").to_hex());
        lease(&leased.to_hex(), 2 * day);
        lease(&gone, Duration::ZERO);
        lease(&old, 2 * day);
        lease(&fresh, Duration::ZERO);
        lease(&format!("{fresh}.stale-12"), 2 * day);
        let told = Told(vec![(leased.to_hex(), true, true), (gone.clone(), false, true)]);
        let keep: HashSet<Digest> = [kept].into();
        let dry = gc_with(&store, &keep, day, true, &told).unwrap();
        assert_eq!((dry.logs_removed, dry.leases_removed, dry.leases_kept), (4, 3, 2), "{dry:?}");
        assert!(leases.join(&gone).exists(), "a dry run removes nothing");
        let r = gc_with(&store, &keep, day, false, &told).unwrap();
        assert_eq!(r, dry);
        let left = |d: &Path| {
            let mut v: Vec<String> = fs::read_dir(d).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
            v.sort();
            v
        };
        let mut want_logs = vec![format!("{}.job", kept.to_hex()), format!("{}.log", kept.to_hex()), format!("{}.job", leased.to_hex()), format!("{}.log", leased.to_hex()), young.file_name().unwrap().to_string_lossy().into_owned(), "exec-job.sh".into()];
        want_logs.sort();
        assert_eq!(left(&logs), want_logs, "logs of the kept entry, of a key under a lease, young ones and the launcher stay");
        let mut want_leases = vec![leased.to_hex(), fresh.clone()];
        want_leases.sort();
        assert_eq!(left(&leases), want_leases);
        // Without a scheduler to ask, no lease is removed.
        let r = gc(&store, &keep, Duration::ZERO, false).unwrap();
        assert_eq!((r.leases_removed, r.leases_kept), (0, 2));
    }

    #[test]
    fn tree_files_under_files_are_damage_not_a_crash() {
        let d = Digest::of_bytes(b"x");
        let t = Tree { files: vec![TreeFile { path: "a".into(), digest: d, size: 1 }, TreeFile { path: "a/b".into(), digest: d, size: 1 }] };
        let bytes = serde_json::to_vec(&t).unwrap();
        assert!(serde_json::from_slice::<Tree>(&bytes).is_err());
    }
}
