//! End-to-end tests of the `fgflow` binary (one test binary, as ripgrep does).

mod cli;
mod contract;
mod fuzz;
mod gpu_script;
mod hostile_cache;
mod hostile_load;
mod hostile_stage;
mod oracle;
mod pretrained;
mod report;
mod seeds;
mod slurm;
mod soak;
