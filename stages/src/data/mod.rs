//! Data stages' machinery: the committed Quick, Draw! drawings, the benchmark built
//! from them (long tail, label noise, open-set images), importing a user's image
//! folder, the deterministic RNG both use, and what `fgflow show` prints for data
//! artifacts. The on-disk format is `crate::artifact`; the stage kinds wrapping this
//! are `kinds::quickdraw` and `kinds::import`.

pub mod benchmark;
pub mod describe;
pub mod import;
pub mod quickdraw;
pub mod rng;
