//! A persistent worker pool: threads are spawned once and woken per parallel region.
//!
//! A region is a number of chunks; every thread (the caller included) claims chunks from
//! an atomic counter until none are left. Workers spin briefly on a generation counter
//! before sleeping on a condvar, so back-to-back regions of one decode step cost a cache
//! line handoff rather than a futex wake. A worker must *join* a region before touching
//! its closure, and the caller *closes* the region once all chunks are claimed: a worker
//! that was descheduled (another process on the core) simply finds the region closed,
//! and the caller, having done the work itself, never waits for it.

use std::cell::UnsafeCell;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// A type-erased pointer to the job closure plus the function that calls it.
#[derive(Clone, Copy)]
struct Job {
    data: *const (),
    call: unsafe fn(*const (), usize),
    n_chunks: usize,
}

/// High bit of `joined`: the region is closed to latecomers.
const CLOSED: usize = 1 << (usize::BITS - 1);

struct Shared {
    /// Bumped once per region; workers try to join when they see a new value.
    generation: AtomicU64,
    /// Next chunk to claim.
    next: AtomicUsize,
    /// Workers that joined the current region, plus CLOSED once the caller closed it.
    joined: AtomicUsize,
    /// Workers that joined and have finished.
    finished: AtomicUsize,
    /// Workers that are (about to be) asleep on `wake`; `run` only pays for a futex wake
    /// when this is non-zero.
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    /// Written only by `run` between regions (no worker is inside one), read by workers
    /// only after they joined the region that published it.
    job: UnsafeCell<Option<Job>>,
    lock: Mutex<()>,
    wake: Condvar,
    n_threads: usize,
}

// SAFETY: the job pointer refers to a `Sync` closure that `run_chunks` keeps alive while
// any joined worker may call it, so moving `Shared` (and its pointer) across threads is sound.
unsafe impl Send for Shared {}
// SAFETY: `job` is the only non-Sync field. It is written while the region is closed
// and no joined worker is running (finished == joined), then the region is opened with a
// SeqCst store; a worker reads it only after a successful join (SeqCst RMW on `joined`),
// which orders the read after the write. So accesses never race.
unsafe impl Sync for Shared {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises `run_chunks` calls from different threads.
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
            next: AtomicUsize::new(0),
            joined: AtomicUsize::new(CLOSED),
            finished: AtomicUsize::new(0),
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
                    .spawn(move || worker_loop(&s))
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

    /// Runs `f(c)` for every chunk c in 0..n_chunks, spread over the pool's threads, and
    /// returns when all are done.
    pub fn run_chunks<F: Fn(usize) + Sync>(&self, n_chunks: usize, f: F) {
        let s = &*self.shared;
        if s.n_threads == 1 || n_chunks <= 1 {
            (0..n_chunks).for_each(f);
            return;
        }
        let _guard = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        unsafe fn trampoline<F: Fn(usize)>(p: *const (), c: usize) {
            // SAFETY: `p` was made from `&F` in `run_chunks`, which outlives every call.
            let f = unsafe { &*(p as *const F) };
            f(c)
        }
        // SAFETY: the previous region is closed and every worker that joined it has
        // finished (we waited), so nobody reads `job` until the region opens below.
        unsafe {
            *s.job.get() = Some(Job {
                data: &f as *const F as *const (),
                call: trampoline::<F>,
                n_chunks,
            })
        };
        s.next.store(0, Ordering::SeqCst);
        s.finished.store(0, Ordering::SeqCst);
        s.joined.store(0, Ordering::SeqCst); // open
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        loop {
            let c = s.next.fetch_add(1, Ordering::Relaxed);
            if c >= n_chunks {
                break;
            }
            f(c);
        }
        // All chunks are claimed: close the region and wait only for workers that
        // joined it (they may still be running a chunk).
        let joined = s.joined.fetch_or(CLOSED, Ordering::SeqCst) & !CLOSED;
        let mut spins = 0u32;
        while s.finished.load(Ordering::Acquire) != joined {
            spins += 1;
            if spins < SPIN_ITERS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        // `f` may now be dropped: no worker holds the pointer any more.
    }

    /// Runs `f(range)` over `0..len` cut into pieces that are multiples of `align`
    /// (except the last), a few per thread so a slow thread is compensated.
    pub fn for_ranges<F: Fn(Range<usize>) + Sync>(&self, len: usize, align: usize, f: F) {
        let align = align.max(1);
        let units = len.div_ceil(align);
        let n_chunks = units.min(4 * self.shared.n_threads).max(1);
        self.run_chunks(n_chunks, |c| {
            let r = split_range(units, c, n_chunks, 1);
            f((r.start * align).min(len)..(r.end * align).min(len))
        });
    }

    /// Compatibility form: `f(i, n)` for i in 0..n with n = the thread count.
    pub fn run<F: Fn(usize, usize) + Sync>(&self, f: F) {
        let n = self.shared.n_threads;
        self.run_chunks(n, |c| f(c, n));
    }
}

fn worker_loop(s: &Shared) {
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
                // Announce the sleep before the final check so `run_chunks` either sees
                // us sleeping (and wakes us) or we see its new generation.
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
        // Join unless the caller already closed the region (it did all the work).
        if s.joined.fetch_add(1, Ordering::SeqCst) & CLOSED != 0 {
            continue;
        }
        // SAFETY: we joined an open region, so `job` holds its job and stays valid until
        // we bump `finished` (the caller waits for every joined worker).
        if let Some(job) = unsafe { *s.job.get() } {
            loop {
                let c = s.next.fetch_add(1, Ordering::Relaxed);
                if c >= job.n_chunks {
                    break;
                }
                // SAFETY: the closure is alive until `finished` counts us (see above).
                unsafe { (job.call)(job.data, c) };
            }
        }
        s.finished.fetch_add(1, Ordering::Release);
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

/// The half-open range of `0..len` that part `i` of `n` should take, in chunks that
/// are multiples of `align` (except the last).
pub fn split_range(len: usize, i: usize, n: usize, align: usize) -> Range<usize> {
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
    fn every_chunk_runs_exactly_once() {
        let pool = ThreadPool::new(3);
        for n_chunks in [0, 1, 2, 3, 7, 100] {
            for _ in 0..300 {
                let hits: Vec<AtomicUsize> = (0..n_chunks).map(|_| AtomicUsize::new(0)).collect();
                pool.run_chunks(n_chunks, |c| {
                    hits[c].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn ranges_cover_everything_once() {
        let pool = ThreadPool::new(2);
        for len in [0, 1, 17, 64, 1000] {
            let hits: Vec<AtomicUsize> = (0..len).map(|_| AtomicUsize::new(0)).collect();
            pool.for_ranges(len, 16, |r| {
                assert!(r.start.is_multiple_of(16));
                for i in r {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "len {len}");
        }
    }

    #[test]
    fn workers_wake_after_sleeping_and_help() {
        let pool = ThreadPool::new(2);
        let mut helped = false;
        for _ in 0..20 {
            // Long enough for the worker to stop spinning and go to sleep.
            std::thread::sleep(std::time::Duration::from_millis(5));
            let main = std::thread::current().id();
            let other = AtomicUsize::new(0);
            pool.run_chunks(64, |_| {
                std::thread::sleep(std::time::Duration::from_micros(200));
                if std::thread::current().id() != main {
                    other.fetch_add(1, Ordering::Relaxed);
                }
            });
            helped |= other.load(Ordering::Relaxed) > 0;
        }
        assert!(helped, "the worker never took a chunk");
    }

    #[test]
    fn regions_finish_when_a_worker_cannot_run() {
        // More pools than cores, all busy at once: regions must still complete (the
        // caller does the work a descheduled worker would have done).
        let handles: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    let pool = ThreadPool::new(3);
                    let total = AtomicUsize::new(0);
                    for _ in 0..200 {
                        pool.run_chunks(8, |c| {
                            total.fetch_add(c, Ordering::Relaxed);
                        });
                    }
                    total.load(Ordering::Relaxed)
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 200 * 28);
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
