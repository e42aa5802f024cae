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

/// Pools whose run ended, kept for the next run: their threads, and the memory the
/// allocator keeps for each thread (`allocator`), serve every later run instead of new
/// threads per run each growing their own (a pool per run took the cold `fgia.ron` run
/// from 160 to 445 MiB of peak RSS, `pretrained.ron` to 790 MiB). A run takes a pool
/// no other run holds, so runs never share one.
static IDLE: Mutex<Vec<rayon::ThreadPool>> = Mutex::new(Vec::new());

/// Idle pools kept at most (runs in flight at once in a test binary, say).
const MAX_IDLE: usize = 8;

/// A run's pool, as many threads as the global pool (`RAYON_NUM_THREADS`, else every
/// core) or as the pool the run was started from.
pub struct StepPool(Option<rayon::ThreadPool>);

impl StepPool {
    pub fn new() -> Result<Self, StageError> {
        let threads = rayon::current_num_threads();
        let idle = IDLE.lock().ok().and_then(|mut idle| {
            let i = idle.iter().position(|p| p.current_num_threads() == threads)?;
            Some(idle.swap_remove(i))
        });
        let pool = match idle {
            Some(pool) => pool,
            None => rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("fgflow-step-{i}"))
                .build()
                .map_err(|e| StageError::failed(format!("cannot start the threads of the training pool: {e}")))?,
        };
        Ok(StepPool(Some(pool)))
    }

    /// Run one step on the pool's worker 0, waiting for it; the other workers return to
    /// the pool at once and help with the step's parallel loops.
    pub fn run<R: Send>(&self, step: impl FnOnce() -> R + Send) -> R {
        let Some(pool) = &self.0 else { return step() };
        let step = Mutex::new(Some(step));
        let ran = pool.broadcast(|ctx| if ctx.index() == 0 { step.lock().ok().and_then(|mut s| s.take()).map(|f| f()) } else { None });
        // Worker 0 exists (a pool has at least one thread) and runs the closure once.
        ran.into_iter().next().flatten().expect("worker 0 ran the step")
    }
}

impl Drop for StepPool {
    fn drop(&mut self) {
        if let (Some(pool), Ok(mut idle)) = (self.0.take(), IDLE.lock())
            && idle.len() < MAX_IDLE
        {
            idle.push(pool);
        }
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

    /// A pool whose run ended serves the next run: same threads (a thread count no other
    /// test uses, so no concurrent test takes the idle pool first).
    #[test]
    fn a_later_run_reuses_the_pool_of_an_ended_one() {
        let seven = rayon::ThreadPoolBuilder::new().num_threads(7).build().unwrap();
        seven.install(|| {
            let first = StepPool::new().unwrap();
            let thread = first.run(|| std::thread::current().id());
            drop(first);
            let second = StepPool::new().unwrap();
            assert_eq!(second.run(|| std::thread::current().id()), thread);
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
