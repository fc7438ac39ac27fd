//! Panic safety of the worker pool: a panic in a job, on the calling thread or on a
//! worker, must surface to the caller only after every thread has left the closure, must
//! end the region, must never leave anyone waiting, and must leave the pool usable.
//!
//! Every test body runs under `within`, a hang detector: a pool that loses track of a
//! worker makes `run_chunks` (or the pool's `Drop`) wait forever, and that has to show up
//! as a failure, not as a test run that never ends. The thread counts oversubscribe the
//! machine on purpose (workers get descheduled mid-region).

use ffai_kernels::pool::ThreadPool;
use std::any::Any;
use std::panic::{catch_unwind, panic_any, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

const THREADS: [usize; 3] = [2, 4, 8];

/// Generous: the bodies take a few seconds even on a loaded machine. Only a hang gets
/// anywhere near this.
const LIMIT: Duration = Duration::from_secs(120);

/// Runs `body` on its own thread; fails if it has not finished after `LIMIT`, and
/// re-raises its panic (a failed assertion) otherwise.
fn within<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let h = thread::spawn(move || {
        let _ = tx.send(body());
    });
    match rx.recv_timeout(LIMIT) {
        Ok(v) => {
            h.join().unwrap();
            v
        }
        Err(RecvTimeoutError::Disconnected) => resume_unwind(h.join().unwrap_err()),
        // The stuck thread is leaked; the test binary exits anyway once this fails.
        Err(RecvTimeoutError::Timeout) => panic!("hang: the test body did not finish in {LIMIT:?}"),
    }
}

/// Keeps the thread busy (not asleep) for `d`, like a real chunk of work.
fn busy(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

fn message(p: &(dyn Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "<not a string>".into()
    }
}

/// A normal region right after a panicking one: every chunk exactly once.
fn assert_pool_works(pool: &ThreadPool) {
    for n_chunks in [2, 7, 200] {
        let hits: Vec<AtomicUsize> = (0..n_chunks).map(|_| AtomicUsize::new(0)).collect();
        pool.run_chunks(n_chunks, |c| {
            hits[c].fetch_add(1, SeqCst);
        });
        for (c, h) in hits.iter().enumerate() {
            assert_eq!(h.load(SeqCst), 1, "chunk {c} of {n_chunks} after a panic");
        }
    }
}

/// What one panicking region did.
struct Outcome {
    result: Result<(), Box<dyn Any + Send>>,
    /// Chunk starts or ends seen after `run_chunks` had returned (or unwound).
    late: usize,
    /// Whether the chunk chosen to panic ran at all.
    fired: bool,
}

/// Runs one region of 64 chunks of ~200 us where `should_panic(c, on_caller)` picks the
/// chunk that panics (with "deliberate panic in chunk {c}"). The chunks record into
/// state owned by this frame and passed by reference (`&chunk`), so a chunk still running
/// after `run_chunks` gave control back reads valid memory and is counted in `late`
/// instead of crashing: that is exactly what the pool's join wait must prevent.
fn panicking_region(pool: &ThreadPool, should_panic: impl Fn(usize, bool) -> bool + Sync) -> Outcome {
    let caller = thread::current().id();
    let returned = AtomicBool::new(false);
    let late = AtomicUsize::new(0);
    let started = AtomicUsize::new(0);
    let worker_started = AtomicBool::new(false);
    let fired = AtomicBool::new(false);
    let region_start = Instant::now();
    let chunk = |c: usize| {
        if returned.load(SeqCst) {
            late.fetch_add(1, SeqCst);
        }
        started.fetch_add(1, SeqCst);
        let on_caller = thread::current().id() == caller;
        if !on_caller {
            worker_started.store(true, SeqCst);
        } else {
            // Let a worker in before the caller gets far, so panics happen while other
            // threads are inside the closure (bounded: a worker may never come).
            while !worker_started.load(SeqCst) && region_start.elapsed() < Duration::from_millis(20) {
                std::hint::spin_loop();
            }
        }
        if should_panic(c, on_caller) && !fired.swap(true, SeqCst) {
            panic!("deliberate panic in chunk {c}");
        }
        busy(Duration::from_micros(200));
        if returned.load(SeqCst) {
            late.fetch_add(1, SeqCst);
        }
    };
    // By reference on purpose (see above): the closure's captures stay in this frame.
    #[allow(clippy::needless_borrows_for_generic_args)]
    let result = catch_unwind(AssertUnwindSafe(|| pool.run_chunks(64, &chunk)));
    returned.store(true, SeqCst);
    // Give a chunk that escaped the join wait time to finish and be counted.
    thread::sleep(Duration::from_millis(3));
    Outcome {
        result,
        late: late.load(SeqCst),
        fired: fired.load(SeqCst),
    }
}

fn assert_surfaced(o: &Outcome, expect: &str) {
    assert_eq!(o.late, 0, "a chunk ran after run_chunks returned");
    match &o.result {
        Ok(()) => panic!("the panic ({expect}) did not reach the caller"),
        Err(p) => assert!(message(&**p).starts_with(expect), "wrong payload: {:?}", message(&**p)),
    }
}

#[test]
fn panic_in_chunk_0_surfaces_after_every_thread_left() {
    within(|| {
        for n in THREADS {
            let pool = ThreadPool::new(n);
            for _ in 0..30 {
                let o = panicking_region(&pool, |c, _| c == 0);
                assert!(o.fired);
                assert_surfaced(&o, "deliberate panic in chunk 0");
                assert_pool_works(&pool);
            }
        }
    })
}

#[test]
fn panic_in_a_late_chunk_surfaces_after_every_thread_left() {
    within(|| {
        for n in THREADS {
            let pool = ThreadPool::new(n);
            for _ in 0..30 {
                let o = panicking_region(&pool, |c, _| c == 40);
                assert!(o.fired);
                assert_surfaced(&o, "deliberate panic in chunk 40");
                assert_pool_works(&pool);
            }
        }
    })
}

#[test]
fn panic_on_a_worker_thread_surfaces_on_the_caller() {
    // Pins the panic on a worker (the first chunk one runs), the case where the caller
    // learns of it only through the pool. A worker that dies of it, or never reports
    // finishing, hangs the caller.
    within(|| {
        for n in THREADS {
            let pool = ThreadPool::new(n);
            let mut on_worker = 0;
            for _ in 0..30 {
                let o = panicking_region(&pool, |_, on_caller| !on_caller);
                if o.fired {
                    on_worker += 1;
                    assert_surfaced(&o, "deliberate panic in chunk");
                } else {
                    // No worker got a chunk this time (descheduled): a normal region.
                    assert_eq!(o.late, 0);
                    assert!(o.result.is_ok());
                }
                assert_pool_works(&pool);
            }
            assert!(on_worker > 0, "{n} threads: no worker ever ran a chunk");
        }
    })
}

/// Records how many chunks had started when an unwind passed through its owner.
struct OnUnwind<'a> {
    started: &'a AtomicUsize,
    at_unwind: &'a AtomicUsize,
}

impl Drop for OnUnwind<'_> {
    fn drop(&mut self) {
        self.at_unwind.store(self.started.load(SeqCst), SeqCst);
    }
}

#[test]
fn a_panic_stops_the_region() {
    // Counted from when the unwind leaves the panicking chunk, not from the `panic!`:
    // the panic hook runs first (printing a backtrace under RUST_BACKTRACE=1 can take
    // tens of ms) and no pool can know of the panic before it returns.
    within(|| {
        const N: usize = 200_000;
        for n in THREADS {
            let pool = ThreadPool::new(n);
            for _ in 0..3 {
                let started = AtomicUsize::new(0);
                let at_unwind = AtomicUsize::new(usize::MAX);
                let r = catch_unwind(AssertUnwindSafe(|| {
                    pool.run_chunks(N, |c| {
                        started.fetch_add(1, SeqCst);
                        if c == 3 {
                            let _g = OnUnwind {
                                started: &started,
                                at_unwind: &at_unwind,
                            };
                            panic!("deliberate panic in chunk 3");
                        }
                        busy(Duration::from_micros(5));
                    })
                }));
                let p = r.expect_err("the panic did not reach the caller");
                assert_eq!(message(&*p), "deliberate panic in chunk 3");
                // Anything still going would show up in the count meanwhile.
                thread::sleep(Duration::from_millis(5));
                let (started, at_unwind) = (started.load(SeqCst), at_unwind.load(SeqCst));
                // Otherwise the other threads finished nearly everything while the hook
                // ran, and the check below could not tell a stop from none.
                assert!(
                    at_unwind < N / 2,
                    "{n} threads: {at_unwind} of {N} chunks started during the panic hook"
                );
                // Without the stop, the rest (over N / 2, about a second of work) runs;
                // with it, only what is claimed between the unwind and the stop.
                let after = started - at_unwind;
                assert!(
                    after < N / 10,
                    "{n} threads: {after} chunks started after the unwind began"
                );
                assert_pool_works(&pool);
            }
        }
    })
}

#[test]
fn every_chunk_panicking_reraises_one_of_them() {
    // Several threads panic in the same region: one payload is re-raised, the others
    // are dropped, and the count of finished workers still adds up.
    within(|| {
        for n in THREADS {
            let pool = ThreadPool::new(n);
            for _ in 0..50 {
                let r = catch_unwind(AssertUnwindSafe(|| {
                    pool.run_chunks(64, |c| {
                        busy(Duration::from_micros(50));
                        panic!("deliberate panic in chunk {c}");
                    })
                }));
                let p = r.expect_err("the panic did not reach the caller");
                assert!(message(&*p).starts_with("deliberate panic in chunk"));
                assert_pool_works(&pool);
            }
        }
    })
}

static DROP_PANICS: AtomicUsize = AtomicUsize::new(0);

/// A panic payload whose `Drop` panics too, unless defused.
struct Bomb {
    armed: bool,
}

impl Drop for Bomb {
    fn drop(&mut self) {
        if self.armed {
            DROP_PANICS.fetch_add(1, SeqCst);
            panic!("deliberate panic while dropping a payload");
        }
    }
}

#[test]
fn a_payload_that_panics_when_dropped_does_not_kill_a_worker() {
    // Every chunk panics with a Bomb; the pool drops all but the first payload, on
    // whichever thread caught it. If that second panic escaped a worker, the worker
    // would die without reporting finished and the caller would wait forever.
    within(|| {
        for n in THREADS {
            let pool = ThreadPool::new(n);
            for _ in 0..50 {
                let r = catch_unwind(AssertUnwindSafe(|| {
                    pool.run_chunks(64, |_| {
                        busy(Duration::from_micros(50));
                        panic_any(Bomb { armed: true });
                    })
                }));
                let mut bomb = r
                    .expect_err("the panic did not reach the caller")
                    .downcast::<Bomb>()
                    .expect("the payload comes back unchanged");
                bomb.armed = false;
                assert_pool_works(&pool);
            }
        }
        // Otherwise the test would pass without exercising what it is about.
        assert!(DROP_PANICS.load(SeqCst) > 0, "no second payload was ever dropped");
    })
}

#[test]
fn dropping_the_pool_while_unwinding_does_not_hang() {
    within(|| {
        for n in THREADS {
            for _ in 0..20 {
                let r = catch_unwind(|| {
                    // The pool is dropped by the unwind out of this closure.
                    let pool = ThreadPool::new(n);
                    pool.run_chunks(64, |c| {
                        busy(Duration::from_micros(50));
                        if c == 5 {
                            panic!("deliberate panic in chunk 5");
                        }
                    });
                });
                assert_eq!(message(&*r.unwrap_err()), "deliberate panic in chunk 5");
            }
        }
    })
}

#[test]
fn another_caller_is_unaffected_by_a_panicking_one() {
    // Two threads share one pool: one keeps panicking, the other runs normal regions
    // (they take turns on the pool's run lock) and must always see every chunk once.
    within(|| {
        let pool = ThreadPool::new(4);
        thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..200 {
                    let r = catch_unwind(AssertUnwindSafe(|| {
                        pool.run_chunks(16, |c| {
                            if c == 7 {
                                panic!("deliberate panic in chunk 7");
                            }
                        })
                    }));
                    assert!(r.is_err());
                }
            });
            s.spawn(|| {
                for _ in 0..200 {
                    assert_pool_works(&pool);
                }
            });
        });
    })
}
