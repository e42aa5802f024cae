//! The stages crate's integration tests, in one binary: each test binary links burn's
//! rlibs and instantiates its generic model code again, so six binaries cost minutes of
//! a cold `cargo test` that one does not. Each module is one former test file; run one
//! with `cargo test --release -p fgflow-stages --test stages ml::`.

mod support;

mod data;
mod efficientnet;
mod ml;
mod recipe;
mod recipe_ml;
mod timm_parity;
