//! fgflow's engine: pipeline specs (RON), the stage graph (petgraph), fingerprints
//! and keys, the planner (Fresh / Stale / Pending) and the executor. Never depends on
//! burn or on the stage kinds themselves.

pub mod diagnostic;
pub mod exec;
pub mod expand;
pub mod fingerprint;
pub mod job;
pub mod kind;
pub mod pipeline;
pub mod plan;
pub mod registry;
mod scan;
pub mod slurm;
pub mod spec;
pub mod value;

pub use diagnostic::{SpecError, SpecErrors};
pub use exec::{Event, Executor, LocalExecutor, MAX_JOBS, Observer, Outcome, RunOptions, StageResult, run, run_with, workers_for};
pub use fingerprint::{Fingerprint, Recorded, SCHEMA};
pub use job::{Job, JobError};
pub use kind::{ArtifactType, NoProgress, ParamSpec, ParamType, PortSpec, ProgressSink, Resources, RunContext, StageError, StageKind};
pub use pipeline::{LoadError, OutputRef, Pipeline, Stage};
pub use plan::{Planned, Reason, Refs, Source, Sources, Status, plan, resolve_sources};
pub use registry::Registry;
pub use value::{Params, Value};
