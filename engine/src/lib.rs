//! fgflow's engine: pipeline specs (RON), the stage graph (petgraph), fingerprints
//! and keys, the planner (Fresh / Stale / Pending) and the executor. Never depends on
//! burn or on the stage kinds themselves.

pub mod kind;
pub mod registry;
pub mod value;

pub use kind::{ArtifactType, NoProgress, ParamSpec, ParamType, PortSpec, ProgressSink, Resources, RunContext, StageError, StageKind};
pub use registry::Registry;
pub use value::{Params, Value};
