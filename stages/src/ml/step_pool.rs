//! The thread pool a training run or a prediction pass runs its steps on.
//!
//! Each step (forward, loss, backward, optimiser) runs inside a pool made for the run,
//! rather than on the run's own thread. The kernels' parallel loops then start from a
//! worker of the pool, which takes part in them, and the other workers spin between
//! the step's many short parallel ops instead of the run's thread sleeping and waking
//! them for each (`benches/train_speed`, 2 threads: CNN and ViT training about 6%
//! faster).
//!
//! One pool per run, never the global pool: burn's autodiff holds a graph lock while
//! backward runs the kernels, and a worker waiting inside a kernel may take any job of
//! its pool. In a shared pool that job could be another run's step, which would then
//! wait forever on the lock held further down the same thread's stack (the test suite,
//! which trains many models at once, deadlocked that way). A run's own pool only ever
//! holds its own step, so its workers can only steal parts of that step.

use fgflow_engine::StageError;

/// A run's pool, as many threads as the global pool (`RAYON_NUM_THREADS`, else every
/// core) or as the pool the run was started from.
pub struct StepPool(rayon::ThreadPool);

impl StepPool {
    pub fn new() -> Result<Self, StageError> {
        rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("fgflow-step-{i}"))
            .build()
            .map(StepPool)
            .map_err(|e| StageError::failed(format!("cannot start the threads of the training pool: {e}")))
    }

    /// Run one step on the pool, waiting for it.
    pub fn run<R: Send>(&self, step: impl FnOnce() -> R + Send) -> R {
        self.0.install(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run started inside a pool of n threads steps on n threads, so whoever sizes the
    /// pool a run starts from (a test, a library user) sizes the run.
    #[test]
    fn takes_the_thread_count_of_the_pool_it_is_made_in() {
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let threads = one.install(|| StepPool::new().unwrap().run(rayon::current_num_threads));
        assert_eq!(threads, 1);
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        assert_eq!(three.install(|| StepPool::new().unwrap().run(rayon::current_num_threads)), 3);
    }
}
