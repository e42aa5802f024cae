//! What every verb shares: the cache (opened for reading, or created for writing only
//! once a verb knows it will write), the registry of kinds, loading a pipeline (with its
//! errors rendered), the pipeline last used, and the CLI's error type with exit codes.
//!
//! Reading verbs (`status`, `explain`, `ls`, `show`, `diff`, `graph`, `export`) create
//! nothing and write nothing in the cache (no temp dir, no lock file, no stat-cache
//! save), so they work on a read-only cache; the one exception is `status` recording
//! the pipeline it planned in `last-pipeline`, only in an existing cache, only when that
//! changes it, and ignoring failure. `run` creates the cache only after the pipeline is
//! valid and its sources are hashed, so an invalid pipeline changes nothing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use fgflow_cache::{CacheError, HashCounts, StatCache, Store};
use fgflow_engine::{LoadError, Pipeline, Registry, SpecErrors};

use crate::console::esc_block;

pub struct App {
    /// The cache. Only verbs that opened it with [`Access::Write`] (or got it from
    /// [`App::writable`]) write through it.
    pub store: Store,
    pub registry: Registry,
}

/// How a verb uses the cache.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only: nothing is created; an absent cache reads as empty.
    Read,
    /// Created if needed and checked writable before the verb starts (`gc`, `verify`).
    Write,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad usage or an invalid pipeline: exit 2.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Spec(Box<SpecErrors>),
    /// Something went wrong doing the work: exit 1.
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Cache(#[from] CacheError),
}

impl CliError {
    /// Print the error on stderr (control characters escaped) and give the exit code.
    pub fn report(self) -> ExitCode {
        match self {
            CliError::Spec(e) => {
                use std::io::IsTerminal;
                let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
                let _ = write!(std::io::stderr(), "{}", e.render(colour));
                ExitCode::from(2)
            }
            CliError::Usage(m) => {
                let _ = writeln!(std::io::stderr(), "error: {}", esc_block(&m));
                ExitCode::from(2)
            }
            CliError::Cache(CacheError::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            e => {
                let _ = writeln!(std::io::stderr(), "error: {}", esc_block(&e.to_string()));
                ExitCode::from(1)
            }
        }
    }
}

pub type CliResult = Result<ExitCode, CliError>;

/// A cache directory that cannot be used is a usage error (exit 2): the user chose it.
fn unusable_cache(root: &Path, e: CacheError) -> CliError {
    CliError::Usage(format!("cannot use `{}` as the cache directory: {e} (choose another with --cache-dir or FGFLOW_CACHE)", root.display()))
}

impl App {
    pub fn open(cache_dir: Option<PathBuf>, access: Access) -> Result<App, CliError> {
        let root = cache_dir.unwrap_or_else(|| PathBuf::from(".fgflow"));
        if root.as_os_str().is_empty() {
            return Err(CliError::Usage("the cache directory is empty: give a path with --cache-dir or FGFLOW_CACHE".into()));
        }
        let store = match access {
            Access::Read => Store::open_read_only(&root),
            Access::Write => Store::open(&root),
        }
        .map_err(|e| unusable_cache(&root, e))?;
        Ok(App { store, registry: fgflow_stages::registry() })
    }

    /// The cache for writing, created if needed: for `run`, once the pipeline is valid.
    pub fn writable(&self) -> Result<Store, CliError> {
        Store::open(self.store.root()).map_err(|e| unusable_cache(self.store.root(), e))
    }

    pub fn load(&self, file: &Path) -> Result<Pipeline, CliError> {
        match Pipeline::load(file, &self.registry) {
            Ok(p) => Ok(p),
            Err(LoadError::Spec(e)) => Err(CliError::Spec(e)),
            Err(e @ LoadError::Io { .. }) => Err(CliError::Usage(e.to_string())),
        }
    }

    fn last_path(&self) -> PathBuf {
        self.store.root().join("last-pipeline")
    }

    /// Remember the pipeline last run or planned, the default for inspecting verbs:
    /// its absolute path, byte for byte (a non-UTF-8 name survives). Only in an existing
    /// cache, only when it changes, and a failure (a read-only cache) is ignored.
    pub fn remember(&self, file: &Path) {
        if !self.store.root().is_dir() {
            return;
        }
        let abs = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
        let bytes = path_bytes(&abs);
        let last = self.last_path();
        if std::fs::read(&last).is_ok_and(|old| old == bytes) {
            return;
        }
        // Temp file + rename: a concurrent reader never sees a half-written name.
        let tmp = self.store.root().join(format!("last-pipeline.tmp{}", std::process::id()));
        if std::fs::write(&tmp, &bytes).is_err() || std::fs::rename(&tmp, &last).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// The pipeline given with `-p`, or the last one run.
    pub fn pipeline_or_last(&self, given: Option<PathBuf>) -> Result<PathBuf, CliError> {
        if let Some(p) = given {
            return Ok(p);
        }
        match std::fs::read(self.last_path()) {
            Ok(bytes) if !bytes.is_empty() => Ok(path_from_bytes(bytes)),
            _ => Err(CliError::Usage("no pipeline given and none run yet in this cache: pass `-p pipelines/NAME.ron`".into())),
        }
    }

    /// `--backend`, else the pipeline's, else the default. An unknown `--backend` is a
    /// usage error (the pipeline's own was checked when it was loaded).
    pub fn backend(&self, flag: Option<String>, p: &Pipeline) -> Result<String, CliError> {
        if let Some(b) = &flag {
            self.registry.check_backend(b).map_err(|m| CliError::Usage(format!("--backend: {m}")))?;
        }
        Ok(flag.or_else(|| p.backend.clone()).unwrap_or_else(|| fgflow_stages::DEFAULT_BACKEND.to_string()))
    }

    /// Resolve and hash the pipeline's `Path` parameters through the stat cache, which
    /// is read but not saved (see [`App::save_stat`]). Also returns what hashing cost.
    pub fn sources(&self, p: &Pipeline) -> Result<(fgflow_engine::Sources, HashCounts, StatCache), CliError> {
        let mut stat = StatCache::load(self.store.root().join("stat-cache.json"));
        let sources = fgflow_engine::resolve_sources(p, &mut stat).map_err(CliError::Spec)?;
        let counts = stat.counts;
        Ok((sources, counts, stat))
    }

    /// Save the stat cache into the (writable) cache.
    pub fn save_stat(&self, mut stat: StatCache) -> Result<(), CliError> {
        stat.save()?;
        Ok(())
    }

    /// A scratch directory outside the cache (removed on drop), for reading verbs.
    pub fn tempdir(&self, prefix: &str) -> Result<Scratch, CliError> {
        let dir = Store::outside_tempdir(&format!("fgflow-{prefix}"))?;
        Ok(Scratch { path: dir.path().to_path_buf(), _guard: Box::new(dir) })
    }
}

/// A temporary directory, removed when dropped.
pub struct Scratch {
    path: PathBuf,
    _guard: Box<dyn std::any::Any>,
}

impl Scratch {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(unix)]
fn path_bytes(p: &Path) -> Vec<u8> {
    use std::os::unix::ffi::OsStrExt;
    p.as_os_str().as_bytes().to_vec()
}

#[cfg(not(unix))]
fn path_bytes(p: &Path) -> Vec<u8> {
    p.to_string_lossy().into_owned().into_bytes()
}

#[cfg(unix)]
fn path_from_bytes(bytes: Vec<u8>) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(bytes))
}

#[cfg(not(unix))]
fn path_from_bytes(bytes: Vec<u8>) -> PathBuf {
    PathBuf::from(String::from_utf8_lossy(&bytes).trim())
}

/// Print to stdout, turning a closed pipe into a quiet success. Control characters
/// other than newlines are escaped: whatever a name or a log holds prints inert.
pub fn out(s: &str) -> Result<(), CliError> {
    let mut o = std::io::stdout().lock();
    o.write_all(esc_block(s).as_bytes()).and_then(|_| o.flush()).map_err(|e| CliError::Cache(CacheError::Io { path: PathBuf::from("<stdout>"), source: e }))
}
