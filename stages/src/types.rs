//! The artifact types that flow between the shipped stage kinds. The engine checks
//! that every input is connected to an output of the same type.

use fgflow_engine::ArtifactType;

/// Images with (possibly noisy) labels and the class list: rows over an image store
/// (`store/`, `rows.safetensors`, `classes.json`; see `artifact`).
pub const LABELLED_SET: ArtifactType = ArtifactType("labelled_set");
/// Unlabelled images (test A, test B): rows over an image store, without labels.
pub const IMAGE_SET: ArtifactType = ArtifactType("image_set");
/// The benchmark's training images with their TRUE labels, open-set images removed: the
/// ceiling the recipe is measured against. No recipe kind accepts this type; only
/// `train`'s own `oracle` input does, and what is trained on it carries the oracle mark
/// (`artifact::ORACLE_FILE`) that the recipe's kinds refuse.
pub const ORACLE_SET: ArtifactType = ArtifactType("oracle_set");
/// Hidden truth only evaluation stages read: true test labels, clean training labels, noise flags.
pub const GROUND_TRUTH: ArtifactType = ArtifactType("ground_truth");
/// Trained weights (safetensors) with the model config beside them.
pub const MODEL: ArtifactType = ArtifactType("model");
/// Several checkpoints of one run (for soups).
pub const CHECKPOINTS: ArtifactType = ArtifactType("checkpoints");
/// Probability and logit matrices over an image set.
pub const PREDICTIONS: ArtifactType = ArtifactType("predictions");
/// Metrics JSON (accuracy, per-class, head/middle/tail).
pub const METRICS: ArtifactType = ArtifactType("metrics");
/// A free-form report (training log, tables).
pub const REPORT: ArtifactType = ArtifactType("report");
