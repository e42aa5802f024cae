//! The set of stage kinds a binary knows, by name, and the compute backend names it
//! accepts. The stages crate builds the shipped registry; engine tests build their own.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::kind::StageKind;

#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn StageKind>>,
    /// Backend names a pipeline or `--backend` may give; empty: any name (engine tests).
    backends: Vec<&'static str>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register a kind; a second kind with the same name replaces the first.
    pub fn register(&mut self, kind: impl StageKind) -> &mut Self {
        self.kinds.insert(kind.name(), Arc::new(kind));
        self
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn StageKind>> {
        self.kinds.get(name)
    }

    /// Kind names, sorted (for "unknown kind" errors and `fgflow kinds`).
    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.keys().copied().collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn StageKind>> {
        self.kinds.values()
    }

    /// The backend names a pipeline may ask for (every one the stage kinds know, also
    /// those not compiled into this binary: they fail with their own clear error).
    pub fn set_backends(&mut self, names: &[&'static str]) -> &mut Self {
        self.backends = names.to_vec();
        self
    }

    pub fn backends(&self) -> &[&'static str] {
        &self.backends
    }

    /// `Err` with the list of valid names when `name` is not a known backend.
    pub fn check_backend(&self, name: &str) -> Result<(), String> {
        if self.backends.is_empty() || self.backends.contains(&name) {
            Ok(())
        } else {
            Err(format!("unknown backend \"{}\": expected one of {}", crate::diagnostic::shown(name, crate::diagnostic::MAX_VALUE_BYTES), self.backends.iter().map(|b| format!("\"{b}\"")).collect::<Vec<_>>().join(", ")))
        }
    }
}
