//! The thread pool a training run or a prediction pass runs its steps on.
//!
//! Each step (forward, loss, backward, optimiser) runs inside a pool made for the run,
//! rather than on the run's own thread. The kernels' parallel loops then start from a
//! worker of the pool, which takes part in them, and the other workers spin between
//! the step's many short parallel ops instead of the run's thread sleeping and waking
//! them for each (`benches/train_speed`, 2 threads: CNN and ViT training about 6%
//! faster).
//!
//! Every step runs on the same thread of the pool, its worker 0 (the others take part
//! in the step's parallel loops): burn's `RunningState` (BatchNorm's running mean and
//! variance) keeps one pending update per thread and averages them, so steps landing on
//! different workers averaged the statistics of different steps, in hash-map order
//! (the running statistics, and so every prediction, changed from run to run; found
//! by the soak test's clean runs disagreeing).
//!
//! One pool per run, never the global pool: burn's autodiff holds a graph lock while
//! backward runs the kernels, and a worker waiting inside a kernel may take any job of
//! its pool. In a shared pool that job could be another run's step, which would then
//! wait forever on the lock held further down the same thread's stack (the test suite,
//! which trains many models at once, deadlocked that way). A run's own pool only ever
//! holds its own step, so its workers can only steal parts of that step.

use std::sync::Mutex;

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

    /// Run one step on the pool's worker 0, waiting for it; the other workers return to
    /// the pool at once and help with the step's parallel loops.
    pub fn run<R: Send>(&self, step: impl FnOnce() -> R + Send) -> R {
        let step = Mutex::new(Some(step));
        let ran = self.0.broadcast(|ctx| if ctx.index() == 0 { step.lock().ok().and_then(|mut s| s.take()).map(|f| f()) } else { None });
        // Worker 0 exists (a pool has at least one thread) and runs the closure once.
        ran.into_iter().next().flatten().expect("worker 0 ran the step")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::module::RunningState;
    use burn::tensor::Tensor;
    use rayon::prelude::*;

    /// Every step runs on one thread, so burn's per-thread running state holds exactly
    /// the last update (steps spread over workers averaged them).
    #[test]
    fn steps_run_on_one_thread_so_running_state_keeps_the_last_update() {
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        three.install(|| {
            let pool = StepPool::new().unwrap();
            let state = RunningState::new(Tensor::<Flex, 1>::zeros([1], &Default::default()));
            let mut threads = std::collections::HashSet::new();
            for step in 1..=40 {
                pool.run(|| {
                    threads.insert(std::thread::current().id());
                    // Some parallel work inside the step, as a training step has.
                    let _: f64 = (0..10_000).into_par_iter().map(|i| i as f64).sum();
                    state.update(Tensor::<Flex, 1>::from_floats([step as f32], &Default::default()));
                });
            }
            assert_eq!(threads.len(), 1);
            let value = pool.run(|| state.value_sync()).into_data().to_vec::<f32>().unwrap();
            assert_eq!(value, vec![40.0]);
        });
    }

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
