//! A persistent worker pool: threads are spawned once and woken per parallel region.
//!
//! A region is a number of chunks; every thread (the caller included) claims chunks from
//! an atomic counter until none are left. Workers spin briefly on a generation counter
//! before sleeping on a condvar, so back-to-back regions of one decode step cost a cache
//! line handoff rather than a futex wake. A worker must *join* a region before touching
//! its closure, and the caller *closes* the region once all chunks are claimed: a worker
//! that was descheduled (another process on the core) simply finds the region closed,
//! and the caller, having done the work itself, never waits for it.
//!
//! # Panics in a job
//! The closure lives in `run_chunks`' frame and workers call it through a raw pointer,
//! so a panic must never let that frame go away while a worker is still inside the
//! closure, and must never leave anyone waiting for a worker that will not report back.
//! Whichever thread panics (caller or worker) catches it at the edge of its chunk loop,
//! ends the region by pushing the chunk counter to the end (other threads finish the
//! chunk they hold and claim no more), and parks the payload in a slot (the first one
//! wins; later ones are dropped). A worker then counts itself finished as usual and goes
//! back to waiting for the next region, so the pool stays whole. The caller closes the
//! region and waits for every joined worker exactly as on the normal path, and only then
//! re-raises the first payload with `resume_unwind`.
//!
//! Cost on the normal path: `catch_unwind` costs nothing until something unwinds (it
//! adds a landing pad, not instructions on the way through), and a worker reports a panic by
//! setting a high bit of the `finished` counter the caller already waits on, so there
//! is no extra atomic, lock or flag to check per region. The payload slot's mutex is
//! only touched after a panic.

use std::any::Any;
use std::cell::UnsafeCell;
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

/// What a panic carries (`std::panic::catch_unwind`'s error type).
type PanicPayload = Box<dyn Any + Send + 'static>;

/// A type-erased pointer to the job closure plus the function that calls it.
#[derive(Clone, Copy)]
struct Job {
    data: *const (),
    call: unsafe fn(*const (), usize),
    n_chunks: usize,
}

/// High bit of `joined`: the region is closed to latecomers.
const CLOSED: usize = 1 << (usize::BITS - 1);
/// High bit of `finished`: a worker's chunk panicked in this region and its payload may
/// be in `Shared::panic`. The count below it never gets near this bit (it is at most
/// the number of workers).
const PANICKED: usize = 1 << (usize::BITS - 1);

struct Shared {
    /// Bumped once per region; workers try to join when they see a new value.
    generation: AtomicU64,
    /// Next chunk to claim.
    next: AtomicUsize,
    /// Workers that joined the current region, plus CLOSED once the caller closed it.
    joined: AtomicUsize,
    /// Workers that joined and have finished (they have left the closure), plus
    /// PANICKED if one of them caught a panic.
    finished: AtomicUsize,
    /// Workers that are (about to be) asleep on `wake`; `run` only pays for a futex wake
    /// when this is non-zero.
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    /// Written only by `run` between regions (no worker is inside one), read by workers
    /// only after they joined the region that published it.
    job: UnsafeCell<Option<Job>>,
    /// The first panic of the current region, until the caller takes it to re-raise.
    panic: Mutex<Option<PanicPayload>>,
    lock: Mutex<()>,
    wake: Condvar,
    n_threads: usize,
}

// SAFETY: the job pointer refers to a `Sync` closure that `run_chunks` keeps alive while
// any joined worker may call it (it waits for all of them before returning, and before
// re-raising a panic), so moving `Shared` (and its pointer) across threads is sound.
unsafe impl Send for Shared {}
// SAFETY: `job` is the only non-Sync field. It is written while the region is closed
// and no joined worker is running (finished == joined), then the region is opened with a
// SeqCst store; a worker reads it only after a successful join (SeqCst RMW on `joined`),
// which orders the read after the write. So accesses never race.
unsafe impl Sync for Shared {}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises `run_chunks` calls from different threads. A panicking job does not
    /// poison it: the guard is released before the panic is re-raised, and the region
    /// state it protects is consistent again by then anyway.
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
            panic: Mutex::new(None),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            n_threads,
        });
        // Built first so that if a spawn fails, the panic below drops the pool and its
        // `Drop` stops the workers already started instead of leaving them spinning.
        let mut pool = ThreadPool {
            shared,
            workers: Vec::with_capacity(n_threads - 1),
            run_lock: Mutex::new(()),
        };
        for i in 1..n_threads {
            let s = pool.shared.clone();
            let w = std::thread::Builder::new()
                .name(format!("ffai-worker-{i}"))
                .spawn(move || worker_loop(&s))
                .expect("spawning a worker thread");
            pool.workers.push(w);
        }
        pool
    }

    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// Runs `f(c)` for every chunk c in 0..n_chunks, spread over the pool's threads, and
    /// returns when all are done.
    ///
    /// If `f` panics, on this thread or on a worker, no thread claims another chunk once
    /// the panic is caught (chunks already claimed still run, and the panic hook, which
    /// runs first, may take a while), so which chunks ran is unspecified. `run_chunks`
    /// returns only once no thread is inside `f` any
    /// more, whether it returns normally or unwinds, so `f` may borrow from the caller's
    /// frame and hand out `&mut` pieces of it. It then re-raises the first panic on the
    /// calling thread with its original payload (`resume_unwind`: the panic hook already
    /// ran where the panic happened, so the message is printed once); payloads of later
    /// panics in the same region are dropped. The pool stays usable afterwards. Like
    /// threads of `std::thread::scope`, other threads may keep running their current chunk
    /// against state the panicking chunk left half-updated; `f` being `Sync` means that
    /// state is behind its own synchronisation.
    pub fn run_chunks<F: Fn(usize) + Sync>(&self, n_chunks: usize, f: F) {
        let s = &*self.shared;
        if s.n_threads == 1 || n_chunks <= 1 {
            // No worker ever sees this closure: a panic just unwinds from here.
            (0..n_chunks).for_each(f);
            return;
        }
        // Poisoning carries no information here: no panic unwinds while this guard is
        // held (see below), and a region always ends with every worker out of it.
        let guard = self.run_lock.lock().unwrap_or_else(PoisonError::into_inner);
        unsafe fn trampoline<F: Fn(usize)>(p: *const (), c: usize) {
            // SAFETY: `p` was made from `&F` in `run_chunks`, which does not return or
            // unwind (dropping `f`) while any joined worker can still get here.
            let f = unsafe { &*(p as *const F) };
            f(c)
        }
        // SAFETY: the previous region is closed and every worker that joined it has
        // finished (we waited, also when it panicked), so nobody reads `job` until the
        // region opens below.
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
            let _l = s.lock.lock().unwrap_or_else(PoisonError::into_inner);
            s.wake.notify_all();
        }
        // Caught so that we still close the region and wait for the workers below
        // before anything leaves this frame. AssertUnwindSafe: the panic is re-raised
        // on this same thread below, so whoever catches it sees exactly what they would
        // have seen had `f` been called directly.
        let mine = catch_unwind(AssertUnwindSafe(|| loop {
            let c = s.next.fetch_add(1, Ordering::Relaxed);
            if c >= n_chunks {
                break;
            }
            f(c);
        }));
        let caller_panicked = match mine {
            Ok(()) => false,
            Err(payload) => {
                s.stop_and_record(n_chunks, payload);
                true
            }
        };
        // All chunks are claimed (or the region was ended): close the region and wait
        // only for workers that joined it (they may still be running a chunk). A joined
        // worker always counts itself finished, even after a panic, so this ends.
        let joined = s.joined.fetch_or(CLOSED, Ordering::SeqCst) & !CLOSED;
        let mut spins = 0u32;
        let finished = loop {
            let fin = s.finished.load(Ordering::Acquire);
            if fin & !PANICKED == joined {
                break fin;
            }
            spins += 1;
            if spins < SPIN_ITERS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        };
        // `f` may now be dropped: no worker holds the pointer any more.
        if caller_panicked || finished & PANICKED != 0 {
            // Whoever panicked stored a payload before we could observe it (our own
            // above; a worker's before its Release increment that our Acquire load saw).
            let payload = s.panic.lock().unwrap_or_else(PoisonError::into_inner).take();
            drop(guard);
            resume_unwind(payload.expect("a panicking region records its payload"));
        }
    }

    /// Runs `f(range)` over `0..len` cut into pieces that are multiples of `align`
    /// (except the last), a few per thread so a slow thread is compensated. A panic in
    /// `f` is handled as in [`run_chunks`](Self::run_chunks).
    pub fn for_ranges<F: Fn(Range<usize>) + Sync>(&self, len: usize, align: usize, f: F) {
        let align = align.max(1);
        let units = len.div_ceil(align);
        let n_chunks = units.min(4 * self.shared.n_threads).max(1);
        self.run_chunks(n_chunks, |c| {
            let r = split_range(units, c, n_chunks, 1);
            f((r.start * align).min(len)..(r.end * align).min(len))
        });
    }

    /// Compatibility form: `f(i, n)` for i in 0..n with n = the thread count. A panic in
    /// `f` is handled as in [`run_chunks`](Self::run_chunks).
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
                let guard = s.lock.lock().unwrap_or_else(PoisonError::into_inner);
                if s.generation.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst) {
                    drop(s.wake.wait(guard).unwrap_or_else(PoisonError::into_inner));
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
            // Caught here so the worker survives for the next region and, above all,
            // still reaches the `finished` increment the caller is waiting for.
            // AssertUnwindSafe: the payload goes to the caller, who re-raises it.
            let run = catch_unwind(AssertUnwindSafe(|| loop {
                let c = s.next.fetch_add(1, Ordering::Relaxed);
                if c >= job.n_chunks {
                    break;
                }
                // SAFETY: the closure is alive until `finished` counts us (see above).
                unsafe { (job.call)(job.data, c) };
            }));
            if let Err(payload) = run {
                s.stop_and_record(job.n_chunks, payload);
                // Before the increment below, in the same variable, so the caller's
                // load that sees our count sees the flag too.
                s.finished.fetch_or(PANICKED, Ordering::Relaxed);
            }
        }
        // Last touch of the region: after this the caller may free the closure.
        s.finished.fetch_add(1, Ordering::Release);
    }
}

impl Shared {
    /// After a chunk panicked: end the region (every later claim sees the counter at the
    /// end) and keep the payload if it is the region's first.
    fn stop_and_record(&self, n_chunks: usize, payload: PanicPayload) {
        // A plain store is enough: only this region's claims read `next` (the caller
        // resets it only after every joined thread has finished), and any value
        // >= n_chunks ends them.
        self.next.store(n_chunks, Ordering::Relaxed);
        let mut slot = self.panic.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(payload);
            return;
        }
        drop(slot);
        // A payload's own `Drop` may panic; that must not escape and kill a worker
        // before it reports finished (the caller would wait forever), so it is caught,
        // and what that second panic carries is leaked rather than risk a third.
        if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
            std::mem::forget(again);
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        // No region is in flight (`&mut self`), and every region, panicking or not,
        // ended with its joined workers out of the closure; a job's panic never kills a
        // worker. So each worker is spinning or asleep and exits once it sees this.
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _l = self.shared.lock.lock().unwrap_or_else(PoisonError::into_inner);
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
