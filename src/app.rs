//! What every verb shares: the opened store, the registry of kinds, loading a
//! pipeline (with its errors rendered), and the CLI's error type with exit codes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use fgflow_cache::{CacheError, Store};
use fgflow_engine::{LoadError, Pipeline, Registry, SpecErrors};

pub struct App {
    pub store: Store,
    pub registry: Registry,
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
    pub fn report(self) -> ExitCode {
        match self {
            CliError::Spec(e) => {
                let report = miette::Report::new_boxed(e);
                let _ = writeln!(std::io::stderr(), "{report:?}");
                ExitCode::from(2)
            }
            CliError::Usage(m) => {
                let _ = writeln!(std::io::stderr(), "error: {m}");
                ExitCode::from(2)
            }
            CliError::Cache(CacheError::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            e => {
                let _ = writeln!(std::io::stderr(), "error: {e}");
                ExitCode::from(1)
            }
        }
    }
}

pub type CliResult = Result<ExitCode, CliError>;

impl App {
    pub fn open(cache_dir: Option<PathBuf>) -> Result<App, CliError> {
        let root = cache_dir.unwrap_or_else(|| PathBuf::from(".fgflow"));
        Ok(App { store: Store::open(root)?, registry: fgflow_stages::registry() })
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

    /// Remember the pipeline last run or planned, the default for inspecting verbs.
    pub fn remember(&self, file: &Path) {
        let abs = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
        let _ = std::fs::write(self.last_path(), abs.to_string_lossy().as_bytes());
    }

    /// The pipeline given with `-p`, or the last one run.
    pub fn pipeline_or_last(&self, given: Option<PathBuf>) -> Result<PathBuf, CliError> {
        if let Some(p) = given {
            return Ok(p);
        }
        std::fs::read_to_string(self.last_path())
            .map(|s| PathBuf::from(s.trim()))
            .map_err(|_| CliError::Usage("no pipeline given and none run yet in this cache: pass `-p pipelines/NAME.ron`".into()))
    }

    pub fn backend(&self, flag: Option<String>, p: &Pipeline) -> String {
        flag.or_else(|| p.backend.clone()).unwrap_or_else(|| fgflow_stages::DEFAULT_BACKEND.to_string())
    }

    /// Resolve and hash the pipeline's `Path` parameters through the stat cache.
    /// Also returns what hashing cost (files from the stat cache vs read).
    pub fn sources(&self, p: &Pipeline) -> Result<(fgflow_engine::Sources, fgflow_cache::HashCounts), CliError> {
        let mut stat = fgflow_cache::StatCache::load(self.store.root().join("stat-cache.json"));
        let sources = fgflow_engine::resolve_sources(p, &mut stat).map_err(CliError::Spec)?;
        stat.save()?;
        Ok((sources, stat.counts))
    }
}

/// Print to stdout, turning a closed pipe into a quiet success.
pub fn out(s: &str) -> Result<(), CliError> {
    let mut o = std::io::stdout().lock();
    o.write_all(s.as_bytes()).and_then(|_| o.flush()).map_err(|e| CliError::Cache(CacheError::Io { path: PathBuf::from("<stdout>"), source: e }))
}
