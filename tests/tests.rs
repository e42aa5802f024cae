//! End-to-end tests of the `fgflow` binary (one test binary, as ripgrep does).

mod cli;
mod contract;
