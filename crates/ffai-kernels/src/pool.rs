//! A persistent worker pool: threads are spawned once and woken per parallel region.
//!
//! `run(f)` executes `f(thread_index, n_threads)` on every thread (the caller is thread
//! 0) and returns when all have finished. Workers spin briefly on an atomic generation
//! counter before sleeping on a condvar, so back-to-back regions inside one decode step
//! cost a cache-line handoff rather than a futex wake.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// A type-erased pointer to the job closure plus the function that calls it.
#[derive(Clone, Copy)]
struct Job {
    data: *const (),
    call: unsafe fn(*const (), usize, usize),
}

struct Shared {
    /// Bumped once per region; workers run the job when they see a new value.
    generation: AtomicU64,
    /// Workers still running the current region.
    remaining: AtomicUsize,
    /// Workers that are (about to be) asleep on `wake`; `run` only pays for a futex wake
    /// when this is non-zero.
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    /// Written only by `run` while no worker is running a job (remaining == 0), read by
    /// workers only after they observe the generation that published it.
    job: UnsafeCell<Option<Job>>,
    lock: Mutex<()>,
    wake: Condvar,
    n_threads: usize,
}

// SAFETY: the job pointer refers to a `Sync` closure that `run` keeps alive while any
// worker may call it, so moving the `Shared` (and its pointer) across threads is sound.
unsafe impl Send for Shared {}
// SAFETY: `job` is the only non-Sync field; its accesses are ordered by `generation`
// (Release in `run`, Acquire in workers) and `remaining` (workers finish reading before
// decrementing it; `run` writes only after it reached zero), so no access races.
unsafe impl Sync for Shared {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises `run` calls from different threads.
    run_lock: Mutex<()>,
}

/// How long a worker spins waiting for the next region before it sleeps (~0.1-0.5 ms):
/// long enough to bridge the gaps between ops of one decode step, short enough not to
/// burn a core between requests.
const SPIN_ITERS: u32 = 20_000;

impl ThreadPool {
    /// A pool of `n_threads` threads in total (the calling thread counts as one).
    pub fn new(n_threads: usize) -> ThreadPool {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            remaining: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            job: UnsafeCell::new(None),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            n_threads,
        });
        let workers = (1..n_threads)
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("ffai-worker-{i}"))
                    .spawn(move || worker_loop(&s, i))
                    .expect("spawning a worker thread")
            })
            .collect();
        ThreadPool {
            shared,
            workers,
            run_lock: Mutex::new(()),
        }
    }

    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// Runs `f(i, n)` for i in 0..n on the pool's n threads and waits for all of them.
    pub fn run<F: Fn(usize, usize) + Sync>(&self, f: F) {
        let s = &*self.shared;
        let n = s.n_threads;
        if n == 1 {
            f(0, 1);
            return;
        }
        let _guard = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        unsafe fn trampoline<F: Fn(usize, usize)>(p: *const (), i: usize, n: usize) {
            // SAFETY: `p` was made from `&F` in `run`, which outlives every call.
            let f = unsafe { &*(p as *const F) };
            f(i, n)
        }
        // SAFETY: every worker finished the previous region (remaining was 0 when the
        // last `run` returned) and none reads `job` until the generation below changes.
        unsafe {
            *s.job.get() = Some(Job {
                data: &f as *const F as *const (),
                call: trampoline::<F>,
            })
        };
        s.remaining.store(n - 1, Ordering::SeqCst);
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        f(0, n);
        // The workers finish within the same region: spin, then yield.
        let mut spins = 0u32;
        while s.remaining.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < SPIN_ITERS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // `f` may now be dropped: no worker holds the pointer any more.
    }
}

fn worker_loop(s: &Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0u32;
        loop {
            if s.shutdown.load(Ordering::Acquire) {
                return;
            }
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            spins += 1;
            if spins < SPIN_ITERS {
                std::hint::spin_loop();
            } else {
                // Announce the sleep before the final check so `run` either sees us
                // sleeping (and wakes us) or we see its new generation.
                s.sleepers.fetch_add(1, Ordering::SeqCst);
                let guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                if s.generation.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst) {
                    drop(s.wake.wait(guard).unwrap_or_else(|e| e.into_inner()));
                } else {
                    drop(guard);
                }
                s.sleepers.fetch_sub(1, Ordering::SeqCst);
                spins = 0;
            }
        }
        // SAFETY: the generation we just observed was published after `job` was written
        // (Release/Acquire), and `run` does not touch it again until `remaining` is 0.
        if let Some(job) = unsafe { *s.job.get() } {
            // SAFETY: `run` keeps the closure alive until every worker decremented `remaining`.
            unsafe { (job.call)(job.data, index, s.n_threads) };
        }
        s.remaining.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _l = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// The half-open range of `0..len` that thread `i` of `n` should take, in chunks that
/// are multiples of `align` (except the last).
pub fn split_range(len: usize, i: usize, n: usize, align: usize) -> std::ops::Range<usize> {
    let align = align.max(1);
    let units = len.div_ceil(align);
    let per = units / n;
    let extra = units % n;
    let start_u = i * per + i.min(extra);
    let end_u = start_u + per + usize::from(i < extra);
    (start_u * align).min(len)..(end_u * align).min(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once_per_region() {
        let pool = ThreadPool::new(3);
        for _ in 0..1000 {
            let hits: Vec<AtomicUsize> = (0..3).map(|_| AtomicUsize::new(0)).collect();
            pool.run(|i, n| {
                assert_eq!(n, 3);
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn workers_wake_after_sleeping() {
        let pool = ThreadPool::new(2);
        for _ in 0..3 {
            // Long enough for the worker to stop spinning and go to sleep.
            std::thread::sleep(std::time::Duration::from_millis(30));
            let hit = AtomicUsize::new(0);
            pool.run(|i, _| {
                if i == 1 {
                    hit.fetch_add(1, Ordering::Relaxed);
                }
            });
            assert_eq!(hit.load(Ordering::Relaxed), 1);
        }
    }

    #[test]
    fn split_range_covers_everything_once() {
        for len in [0, 1, 7, 64, 100, 1000] {
            for n in 1..5 {
                for align in [1, 4, 32] {
                    let mut covered = vec![0u8; len];
                    for i in 0..n {
                        let r = split_range(len, i, n, align);
                        assert!(r.start.is_multiple_of(align) || r.start == len);
                        for c in &mut covered[r] {
                            *c += 1;
                        }
                    }
                    assert!(covered.iter().all(|&c| c == 1), "len {len} n {n} align {align}");
                }
            }
        }
    }
}
