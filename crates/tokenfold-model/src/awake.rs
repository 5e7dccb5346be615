//! Keeping the thread pool's other threads awake through a pass.
//!
//! A forward pass runs dozens of parallel operations (matmuls above all) with serial work between them.
//! An idle rayon worker looks for work for a few rounds and then sleeps, within about 20 µs on this
//! machine, so each parallel operation after a serial stretch first wakes it with a system call and then
//! waits for it to start. Measured with the matmuls of nmm-s's layers at 17 rows (a planned batch-1
//! prefill): 1.6 ms back to back, 2.3 ms with 20 µs of serial work between them, 1.6 ms again with the
//! worker kept awake (docs/performance.md).
//!
//! While an [`Awake`] guard lives, every other thread of the pool runs a job that keeps taking the pool's
//! pending work and never sleeps; the job ends once the guard is dropped. A guard does this only when
//! - it is made on a thread of the pool (the CLI's main thread joins the pool), so that a caller outside
//!   the pool never competes for cores with threads that spin;
//! - candle's own elementwise thread pool has no workers (`CANDLE_NUM_THREADS=1`, which the CLI sets):
//!   a thread of that pool woken on a core where a rayon thread spins waits for the scheduler, which cost
//!   milliseconds per operation;
//! - `TOKENFOLD_POOL_SLEEPS` is unset or `0` (set it to let idle threads sleep as usual, for comparison).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

thread_local! {
    /// Whether this thread holds an active guard: nested guards (a pass inside a pass) do nothing.
    static HOLDING: Cell<bool> = const { Cell::new(false) };
}

/// Spin-loop hints between two looks for work when there was none: a look reads the other threads'
/// queues, and looking without pause would keep pulling their cache lines away from them.
const PAUSE: u32 = 32;

/// Whether guards keep threads awake (see the module docs), read once.
fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        let candle_single = std::env::var("CANDLE_NUM_THREADS").is_ok_and(|v| v.trim() == "1");
        let sleeps = std::env::var("TOKENFOLD_POOL_SLEEPS").is_ok_and(|v| v != "0");
        candle_single && !sleeps
    })
}

/// Keeps the pool's other threads looking for work until dropped (see the module docs).
#[must_use = "the threads stay awake only while the guard lives"]
pub struct Awake {
    /// Set on drop to end the spinning jobs; `None` for a guard that started none.
    stop: Option<Arc<AtomicBool>>,
}

impl Awake {
    pub fn new() -> Awake {
        if enabled() {
            Awake::start()
        } else {
            Awake { stop: None }
        }
    }

    /// [`Awake::new`] whatever the environment says.
    pub(crate) fn start() -> Awake {
        let inert = Awake { stop: None };
        let Some(me) = rayon::current_thread_index() else {
            return inert;
        };
        if rayon::current_num_threads() < 2 || HOLDING.get() {
            return inert;
        }
        HOLDING.set(true);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        // A broadcast job runs once on each thread of the pool, this one included: this thread's copy
        // returns at once, since only this thread can end the spinning.
        rayon::spawn_broadcast(move |context| {
            if context.index() == me {
                return;
            }
            while !flag.load(Ordering::Acquire) {
                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    for _ in 0..PAUSE {
                        std::hint::spin_loop();
                    }
                }
            }
        });
        Awake { stop: Some(stop) }
    }

    /// Whether this guard keeps other threads awake.
    pub fn is_active(&self) -> bool {
        self.stop.is_some()
    }

    /// The flag that ends the spinning, for tests: each spinning job holds a clone until it ends.
    #[cfg(test)]
    pub(crate) fn stop_flag(&self) -> Option<Arc<AtomicBool>> {
        self.stop.clone()
    }
}

impl Default for Awake {
    fn default() -> Awake {
        Awake::new()
    }
}

impl Drop for Awake {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.store(true, Ordering::Release);
            HOLDING.set(false);
        }
    }
}
