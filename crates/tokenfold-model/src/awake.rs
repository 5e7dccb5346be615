//! Keeping the thread pool's other threads awake through a pass.
//!
//! A forward pass runs dozens of parallel operations (matmuls above all) with serial work between them.
//! An idle rayon worker looks for work for a few rounds and then sleeps, within about 20 µs on this
//! machine, so each parallel operation after a serial stretch first wakes it with a system call and then
//! waits for it to start. Measured with the matmuls of nmm-s's layers at 17 rows (a planned batch-1
//! prefill): 1.95 ms back to back, 2.3–3.2 ms with 20 µs of serial work between them, 1.6 ms with the
//! worker kept awake (docs/performance.md).
//!
//! While an [`Awake`] guard lives, every other thread of the pool runs a job that keeps taking the pool's
//! pending work instead of sleeping. The job ends when the guard is dropped, or after
//! [`IDLE_LIMIT`] without finding work. The limit matters for more than power: rayon may start the job
//! on a thread *inside* a job of the same pass (a thread waiting in a `join` runs its queued jobs), and
//! that pass job cannot finish before the spinning above it stops. Found no work for that long, the
//! spinning thread lets it finish; the pass loses at most that time.
//!
//! A guard does this only when
//! - it is made on a thread of the pool (the CLI's main thread joins the pool), so that a caller outside
//!   the pool never competes for cores with threads that spin;
//! - no other guard is active in the process (one pass at a time spins; nested passes and passes run
//!   from other threads at the same time leave their guards inert);
//! - candle's own elementwise thread pool has no workers (`CANDLE_NUM_THREADS=1`, which the CLI sets):
//!   a thread of that pool woken on a core where a rayon thread spins waited for the scheduler, which cost
//!   milliseconds per operation;
//! - `TOKENFOLD_POOL_SLEEPS` is unset or `0` (set it to let idle threads sleep as usual, for comparison).

use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Whether a guard is active somewhere in the process.
static ACTIVE: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// On a thread that spins for a guard: that guard's stop flag.
    static WATCHING: RefCell<Option<Arc<AtomicBool>>> = const { RefCell::new(None) };
}

/// Spin-loop hints between two looks for work when there was none: a look reads the other threads'
/// queues, and looking without pause would keep pulling their cache lines away from them.
const PAUSE: u32 = 32;

/// How long a spinning thread goes without finding work before it stops spinning (see the module docs):
/// far longer than the serial stretches of a pass (tens of µs), far shorter than a pass.
pub const IDLE_LIMIT: Duration = Duration::from_millis(1);

/// Whether guards keep threads awake (see the module docs), read once. `CANDLE_NUM_THREADS` is read as
/// candle reads it.
fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        let candle_single =
            std::env::var("CANDLE_NUM_THREADS").is_ok_and(|v| v.parse::<usize>() == Ok(1));
        let sleeps = std::env::var("TOKENFOLD_POOL_SLEEPS").is_ok_and(|v| v != "0");
        candle_single && !sleeps
    })
}

/// Keeps the pool's other threads looking for work until dropped (see the module docs). It stays on
/// the thread that made it.
#[must_use = "the threads stay awake only while the guard lives"]
pub struct Awake {
    /// Set on drop to end the spinning jobs; `None` for a guard that started none.
    stop: Option<Arc<AtomicBool>>,
    not_send: PhantomData<*const ()>,
}

impl Awake {
    pub fn new() -> Awake {
        if enabled() {
            Awake::start()
        } else {
            Awake::inert()
        }
    }

    fn inert() -> Awake {
        Awake {
            stop: None,
            not_send: PhantomData,
        }
    }

    /// [`Awake::new`] whatever the environment says.
    pub(crate) fn start() -> Awake {
        let Some(me) = rayon::current_thread_index() else {
            return Awake::inert();
        };
        if rayon::current_num_threads() < 2
            || ACTIVE
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return Awake::inert();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        // A broadcast job runs once on each thread of the pool, this one included: this thread's copy
        // returns at once, since only this thread can end the spinning.
        rayon::spawn_broadcast(move |context| {
            if context.index() != me {
                spin_until_stopped(&flag);
            }
        });
        Awake {
            stop: Some(stop),
            not_send: PhantomData,
        }
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

/// Takes the pool's work on this thread until `flag` (or the flag of a later guard, handed over while
/// spinning) is set, or until [`IDLE_LIMIT`] passes without work. A spinning thread runs the next
/// guard's job from inside its own loop when the next pass starts before it saw its flag: that job only
/// hands its flag over and returns, so that jobs never pile up on the stack and the loop always watches
/// the newest guard.
fn spin_until_stopped(flag: &Arc<AtomicBool>) {
    let already_spinning = WATCHING.with(|w| w.borrow_mut().replace(Arc::clone(flag)).is_some());
    if already_spinning {
        return;
    }
    let mut idle_since = Instant::now();
    loop {
        let stopped = WATCHING.with(|w| {
            w.borrow()
                .as_ref()
                .is_none_or(|f| f.load(Ordering::Acquire))
        });
        if stopped || idle_since.elapsed() > IDLE_LIMIT {
            break;
        }
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle_since = Instant::now();
        } else {
            for _ in 0..PAUSE {
                std::hint::spin_loop();
            }
        }
    }
    WATCHING.with(|w| w.borrow_mut().take());
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
            ACTIVE.store(false, Ordering::Release);
        }
    }
}
