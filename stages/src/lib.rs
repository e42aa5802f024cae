//! fgflow's stage kinds. burn lives only in this crate. `registry()` is the one place
//! kinds are registered; adding a kind touches its own module and one line here.

pub mod artifact;
pub mod data;
pub mod kinds;
pub mod store;
pub mod ml;
pub mod types;

use fgflow_engine::Registry;

/// The compute backend used when neither `--backend` nor the pipeline names one
/// (chosen by measurement: see ARCHITECTURE.md).
pub const DEFAULT_BACKEND: &str = "flex";

/// Every stage kind the shipped binary knows, and every backend name it accepts
/// (those not compiled in are accepted here and fail with their own clear error).
pub fn registry() -> Registry {
    let mut r = Registry::new();
    kinds::register_all(&mut r);
    r.set_backends(ml::backend::BACKENDS);
    r
}
