//! A persistent worker pool: threads are spawned once and woken per parallel region.
//!
//! `run(f)` executes `f(thread_index, n_threads)` on every thread (the caller is thread
//! 0) and returns when all have finished. Workers spin briefly on an atomic generation
//! counter before sleeping on a condvar, so back-to-back regions inside one decode step
//! cost a cache-line handoff rather than a futex wake.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// A type-erased pointer to the job closure plus the function that calls it.
#[derive(Clone, Copy)]
struct Job {
    data: *const (),
    call: unsafe fn(*const (), usize, usize),
}

// SAFETY: the pointer is only dereferenced while `run` keeps the closure alive and the
// closure is `Sync`, so sharing it across the worker threads is sound.
unsafe impl Send for Job {}

struct Shared {
    generation: AtomicU64,
    remaining: AtomicUsize,
    shutdown: AtomicBool,
    job: Mutex<Option<Job>>,
    wake: Condvar,
    n_threads: usize,
}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises `run` calls from different threads.
    run_lock: Mutex<()>,
}

/// How long a worker spins waiting for the next region before it sleeps.
const SPIN_ITERS: u32 = 20_000;

impl ThreadPool {
    /// A pool of `n_threads` threads in total (the calling thread counts as one).
    pub fn new(n_threads: usize) -> ThreadPool {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            remaining: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            job: Mutex::new(None),
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
        let n = self.shared.n_threads;
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
        let job = Job {
            data: &f as *const F as *const (),
            call: trampoline::<F>,
        };
        {
            let mut slot = self.shared.job.lock().unwrap_or_else(|e| e.into_inner());
            *slot = Some(job);
            self.shared.remaining.store(n - 1, Ordering::Release);
            self.shared.generation.fetch_add(1, Ordering::AcqRel);
        }
        self.shared.wake.notify_all();
        f(0, n);
        // Wait for the workers; they finish within the same region, so spin then yield.
        let mut spins = 0u32;
        while self.shared.remaining.load(Ordering::Acquire) != 0 {
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
        let job = loop {
            if s.shutdown.load(Ordering::Acquire) {
                return;
            }
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break *s.job.lock().unwrap_or_else(|e| e.into_inner());
            }
            spins += 1;
            if spins < SPIN_ITERS {
                std::hint::spin_loop();
            } else {
                let guard = s.job.lock().unwrap_or_else(|e| e.into_inner());
                if s.generation.load(Ordering::Acquire) == seen && !s.shutdown.load(Ordering::Acquire) {
                    drop(s.wake.wait(guard).unwrap_or_else(|e| e.into_inner()));
                }
                spins = 0;
            }
        };
        if let Some(job) = job {
            // SAFETY: `run` published this job for the current generation and does not
            // return (dropping the closure) until `remaining` reaches zero below.
            unsafe { (job.call)(job.data, index, s.n_threads) };
        }
        s.remaining.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        {
            let _slot = self.shared.job.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.shutdown.store(true, Ordering::Release);
        }
        self.shared.wake.notify_all();
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
