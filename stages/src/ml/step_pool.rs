//! The thread pool a training run or a prediction pass runs its steps on.
//!
//! Each step (forward, loss, backward, optimiser) runs inside a pool made for the run,
//! rather than on the run's own thread. The kernels' parallel loops then start from a
//! worker of the pool, which takes part in them, instead of the run's thread sleeping
//! and waking the workers for each (`benches/train_speed`, 2 threads: CNN and ViT
//! training about 6% faster).
//!
//! While a step runs, the other workers stay in it: they take the tasks of its parallel
//! loops as they appear (`rayon::yield_now`), spinning up to [`SPIN`] after their last
//! task and then napping [`NAP`] between looks, so that a serial stretch leaves the
//! core to the loader's threads. Left to rayon, a worker spins a few rounds and then
//! sleeps, so the serial work between two kernels (burn's autodiff bookkeeping, flex's
//! one-thread element-wise ops) put it to sleep and the next kernel's loop started
//! without it (ViT training +8%, measured against the same build with the wait off).
//!
//! The wait gives up after [`GIVE_UP`] without a task. rayon may hand a worker its part
//! of the step's broadcast while that worker waits inside one of the step's own tasks
//! (a task that started a parallel loop and waits for a part another worker took): a
//! wait for the step's end there, on top of a task the step waits for, never ends (a
//! CI run hung so). Bounded, it ends once the step has no task left to give it, and the
//! task under it goes on.
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fgflow_engine::StageError;

/// Pools whose run ended, kept for the next run: their threads, and the memory the
/// allocator keeps for each thread (`allocator`), serve every later run instead of new
/// threads per run each growing their own (a pool per run took the cold `fgia.ron` run
/// from 160 to 445 MiB of peak RSS, `pretrained.ron` to 790 MiB). A run takes a pool
/// no other run holds, so runs never share one.
static IDLE: Mutex<Vec<rayon::ThreadPool>> = Mutex::new(Vec::new());

/// How long a worker waiting in a step spins for its next task before it naps: longer
/// than most serial stretches between two kernels of a step.
const SPIN: Duration = Duration::from_micros(200);
/// A nap between looks for a task once the spin is over (the loader's threads get the
/// core meanwhile).
const NAP: Duration = Duration::from_micros(50);
/// How long a worker waits in a step without a task before it goes back to rayon's own
/// idle loop: longer than the serial stretches of a training step (giving up after 2 ms
/// lost half the gain on the ViT), and what a wait that could not end costs instead.
const GIVE_UP: Duration = Duration::from_millis(5);
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

    /// Run one step on the pool's worker 0, waiting for it; the other workers take the
    /// step's parallel tasks while it runs (the module's doc says why).
    pub fn run<R: Send>(&self, step: impl FnOnce() -> R + Send) -> R {
        let Some(pool) = &self.0 else { return step() };
        let step = Mutex::new(Some(step));
        let done = AtomicBool::new(false);
        let ran = pool.broadcast(|ctx| {
            if ctx.index() == 0 {
                // Set when the step ends, by returning or by panicking.
                let _done = SetOnDrop(&done);
                step.lock().ok().and_then(|mut s| s.take()).map(|f| f())
            } else {
                take_tasks_until(&done);
                None
            }
        });
        // Worker 0 exists (a pool has at least one thread) and runs the closure once.
        ran.into_iter().next().flatten().expect("worker 0 ran the step")
    }
}

/// Take the pool's tasks until `done` is set or none has come for [`GIVE_UP`].
fn take_tasks_until(done: &AtomicBool) {
    let mut last_task = Instant::now();
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            last_task = Instant::now();
            continue;
        }
        let idle = last_task.elapsed();
        if idle < SPIN {
            std::hint::spin_loop();
        } else if idle < GIVE_UP {
            std::thread::sleep(NAP);
        } else {
            return;
        }
    }
}

struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
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

    /// `f`'s result, run on a thread of its own: a hang fails the test with `what` after
    /// `seconds` instead of blocking the test binary.
    fn ends_within<T: Send + 'static>(seconds: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(seconds)).expect(what)
    }

    /// A step that panics ends its run's step instead of leaving the other workers
    /// waiting for it: the panic reaches the caller, and the pool takes the next step.
    #[test]
    fn a_panicking_step_reaches_the_caller_and_the_pool_goes_on() {
        let outcome = ends_within(60, "the pool hung after a panicking step", || {
            let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
            three.install(|| {
                let pool = StepPool::new().unwrap();
                let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    pool.run(|| {
                        let _: f64 = (0..10_000).into_par_iter().map(|i| i as f64).sum();
                        panic!("a bad step")
                    })
                }))
                .is_err();
                (panicked, pool.run(|| 7))
            })
        });
        assert_eq!(outcome, (true, 7));
    }

    /// A worker handed the wait inside one of the step's own tasks (so the step cannot
    /// end until the wait does) comes back: the wait ends without the step's end once
    /// no task comes (it waited for the step's end alone once, and a CI run hung).
    #[test]
    fn a_wait_inside_a_task_the_step_waits_for_ends() {
        ends_within(60, "a wait whose step cannot end never returned", || {
            let two = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            let never = AtomicBool::new(false);
            two.install(|| take_tasks_until(&never));
        });
    }

    /// A step whose parallel tasks start parallel loops of their own (a convolution's
    /// chunks, each a gemm that splits again) ends, step after step, with the sums a
    /// serial loop gives.
    #[test]
    fn a_step_whose_tasks_nest_parallel_loops_ends() {
        let total = ends_within(120, "a step hung", || {
            let two = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            two.install(|| {
                let pool = StepPool::new().unwrap();
                (0..2000u64)
                    .map(|step| {
                        pool.run(|| {
                            (0..8u64)
                                .into_par_iter()
                                .map(|chunk| (0..2000u64).into_par_iter().map(|i| i ^ chunk ^ step).sum::<u64>())
                                .sum::<u64>()
                        })
                    })
                    .fold(0u64, u64::wrapping_add)
            })
        });
        let expected: u64 = (0..2000u64)
            .map(|step| (0..8u64).map(|chunk| (0..2000u64).map(|i| i ^ chunk ^ step).sum::<u64>()).sum::<u64>())
            .fold(0, u64::wrapping_add);
        assert_eq!(total, expected);
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
