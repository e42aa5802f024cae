//! `Job`: everything needed to execute one stage key, stored in the cache
//! (`jobs/<key>.json`) before it runs. `execute` loads the inputs from the cache, runs
//! the kind and stores its outputs, then the entry; it is what the local executor
//! calls in-process and what `fgflow exec-job KEY` calls in a separate process (the
//! seam for a cluster executor over a shared cache).

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use fgflow_cache::{CacheError, Digest, Entry, Materialize, Store};
use serde::{Deserialize, Serialize};

use crate::fingerprint::Recorded;
use crate::kind::{ProgressSink, RunContext};
use crate::plan::Source;
use crate::registry::Registry;
use crate::value::Params;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub key: Digest,
    pub stage: String,
    pub kind: String,
    /// All parameters, `Path` ones included (as written).
    pub params: Params,
    pub backend: String,
    pub sources: BTreeMap<String, Vec<Source>>,
    pub recorded: Recorded,
}

/// A failed execution: the error and the stage's log.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    pub message: String,
    pub log: String,
}

impl From<CacheError> for JobError {
    fn from(e: CacheError) -> Self {
        JobError { message: e.to_string(), log: String::new() }
    }
}

impl Job {
    pub fn save(&self, store: &Store) -> Result<(), CacheError> {
        store.put_doc("jobs", &self.key.to_hex(), self)
    }

    /// The job recorded for `key`; a record that names another key (copied over it)
    /// is not this key's job.
    pub fn load(store: &Store, key: &Digest) -> Result<Option<Job>, CacheError> {
        Ok(store.get_doc::<Job>("jobs", &key.to_hex())?.filter(|j| j.key == *key))
    }

    /// Run the stage and record its entry. On error nothing is recorded: the cache is
    /// as it was, apart from unreferenced blobs that gc removes.
    pub fn execute(&self, store: &Store, registry: &Registry, progress: &dyn ProgressSink) -> Result<Entry, JobError> {
        let started = Instant::now();
        let kind = registry.get(&self.kind).ok_or_else(|| JobError { message: format!("unknown stage kind `{}`", self.kind), log: String::new() })?;
        let tmp = store.tempdir(&format!("run-{}-", self.key.short()))?;
        let how = if kind.runs_foreign_code() { Materialize::Copy } else { Materialize::Link };
        let mut inputs = BTreeMap::new();
        // Linked blobs share their inode with the stage's input files: stamp them, so a
        // body that writes to an input (a bug) is caught before anything is recorded.
        let mut linked = Vec::new();
        for (port, digests) in &self.recorded.fingerprint.inputs {
            let mut dirs = Vec::new();
            for (i, d) in digests.iter().enumerate() {
                let dir = tmp.path().join("in").join(port).join(i.to_string());
                let tree = store.materialize(d, &dir, how)?;
                if how == Materialize::Link {
                    for f in &tree.files {
                        linked.push((format!("{port}/{}", f.path), f.digest, store.blob_stamp(&f.digest)));
                    }
                }
                dirs.push(dir);
            }
            inputs.insert(port.clone(), dirs);
        }
        let sources = self.sources.iter().map(|(k, v)| (k.clone(), v.iter().map(|s| (s.written.clone(), s.path.clone())).collect())).collect();
        let out_root = tmp.path().join("out");
        let scratch = tmp.path().join("scratch");
        for d in [&out_root, &scratch] {
            std::fs::create_dir_all(d).map_err(|e| JobError { message: format!("{}: {e}", d.display()), log: String::new() })?;
        }
        let ctx = RunContext::new(self.stage.clone(), self.params.clone(), self.backend.clone(), inputs, sources, out_root.clone(), scratch, progress);
        // A stage that panics (a bug, or a library's) fails alone instead of taking
        // down the other stages running beside it.
        let result = catch_unwind(AssertUnwindSafe(|| kind.run(&ctx)));
        let log = ctx.take_log();
        let fail = |message: String, log: &str| JobError { message, log: log.to_string() };
        let mut damaged: Vec<(&str, Digest)> = Vec::new();
        for (name, digest, stamp) in &linked {
            if store.blob_stamp(digest) != *stamp && !damaged.iter().any(|(_, d)| d == digest) {
                // Other stages must not be served it; the stage that made it re-runs.
                store.discard_blob(digest).map_err(|e| fail(e.to_string(), &log))?;
                damaged.push((name, *digest));
            }
        }
        if let Some((name, _)) = damaged.first() {
            let more = if damaged.len() > 1 { format!(" (and {} more)", damaged.len() - 1) } else { String::new() };
            let message = format!("the stage wrote to its input file `{name}`{more}, which is shared with the cache: inputs are read-only; the damaged blobs were removed, so the stages that produced them will re-run");
            return Err(fail(message, &log));
        }
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(fail(e.to_string(), &log)),
            Err(panic) => {
                let msg = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "unknown panic".into());
                return Err(fail(format!("stage panicked: {msg}"), &log));
            }
        }
        let params = &self.params;
        let declared = kind.outputs(params);
        let mut outputs = BTreeMap::new();
        for port in &declared {
            let dir: PathBuf = out_root.join(&port.name);
            if !dir.is_dir() {
                if port.optional {
                    continue;
                }
                return Err(fail(format!("the stage did not produce its output `{}`", port.name), &log));
            }
            // Links inside the stage's own directory become copies of their targets;
            // links anywhere else are refused, never followed and never dropped.
            fgflow_cache::capture::resolve_links(&dir, &[tmp.path()]).map_err(|e| fail(format!("output `{}`: {e}", port.name), &log))?;
            let (d, _) = store.put_tree(&dir, true).map_err(|e| fail(e.to_string(), &log))?;
            outputs.insert(port.name.clone(), d);
        }
        if let Ok(rd) = std::fs::read_dir(&out_root) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !declared.iter().any(|p| p.name == name) {
                    return Err(fail(format!("the stage wrote an undeclared output `{name}`"), &log));
                }
            }
        }
        let log_blob = if log.is_empty() { None } else { Some(store.put_bytes(log.as_bytes()).map_err(|e| fail(e.to_string(), &log))?) };
        let entry = Entry {
            key: self.key,
            stage: self.stage.clone(),
            kind: self.kind.clone(),
            fingerprint: serde_json::to_value(&self.recorded).expect("a fingerprint always serialises"),
            outputs,
            log: log_blob,
            created_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            duration_ms: started.elapsed().as_millis() as u64,
        };
        store.put_entry(&entry).map_err(|e| fail(e.to_string(), &log))?;
        Ok(entry)
    }
}
