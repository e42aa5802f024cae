//! The set of stage kinds a binary knows, by name. The stages crate builds the
//! shipped registry; engine tests build their own.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::kind::StageKind;

#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn StageKind>>,
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
}
