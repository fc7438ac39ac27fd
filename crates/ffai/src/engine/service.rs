//! [`Engine`]: a [`Scheduler`] on a thread of its own, behind a thread-safe API: `submit`
//! returns a [`RequestHandle`] whose events stream as the sequence runs; `cancel` (or
//! dropping the handle) ends it at the next step. The step loop blocks when there is
//! nothing to do and otherwise takes new requests between steps, so they join the running
//! batch at once (continuous batching).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::scheduler::{check_request, Completion, EngineConfig, Event, Scheduler, SchedulerStats, SeqRequest};
use crate::error::{Error, Result};
use crate::Model;

enum Cmd {
    Submit {
        req: Box<SeqRequest>,
        /// The request's grammar, compiled by `submit` (so the engine thread never
        /// compiles one: a large grammar would stall every running sequence).
        constraint: Option<Box<crate::constrain::Constraint>>,
        events: Sender<Event>,
        cancel: Arc<AtomicBool>,
    },
    Shutdown,
}

/// A snapshot of the engine's state (for metrics).
#[derive(Clone, Debug, Default)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    /// Blocks of the KV pool in use, 0..=1.
    pub kv_usage: f64,
    pub scheduler: SchedulerStats,
    /// The last step error, if any (the sequences of that step were ended).
    pub last_error: Option<String>,
}

pub struct Engine {
    model: Arc<Model>,
    cfg: EngineConfig,
    windows: Vec<usize>,
    tx: Mutex<Option<Sender<Cmd>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<Mutex<EngineStats>>,
}

/// One submitted request: its events, and its cancel flag. Dropping it cancels.
pub struct RequestHandle {
    events: Receiver<Event>,
    cancel: Arc<AtomicBool>,
}

impl RequestHandle {
    /// The next event; `None` once the sequence is done (after `Done`) or the engine
    /// stopped.
    pub fn recv(&self) -> Option<Event> {
        self.events.recv().ok()
    }

    /// The next event within `timeout`: `Ok(None)` when none came in time, `Err` when the
    /// stream ended.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Event>> {
        match self.events.recv_timeout(timeout) {
            Ok(e) => Ok(Some(e)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(Error::new("the engine stopped")),
        }
    }

    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    /// Waits for the end and returns the completion.
    pub fn wait(self) -> Result<Completion> {
        while let Some(e) = self.recv() {
            if let Event::Done(c) = e {
                return Ok(c);
            }
        }
        Err(Error::new("the engine stopped before the request finished"))
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

impl Engine {
    /// Sizes the engine's pools and starts its step loop; errors (a pool that does not
    /// fit, a model without a batched forward) come back here.
    pub fn start(model: Arc<Model>, cfg: EngineConfig) -> Result<Engine> {
        let (tx, rx) = mpsc::channel::<Cmd>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let (m, c, st) = (model.clone(), cfg.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name("ffai-engine".into())
            .spawn(move || {
                let mut sched = match Scheduler::new(&*m.lm, &m.tokenizer, c) {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                step_loop(&mut sched, &rx, &st);
            })
            .map_err(|e| Error::new(format!("cannot start the engine thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(Error::new("the engine thread ended while starting"));
            }
        }
        Ok(Engine {
            windows: model.lm.kv_windows(),
            model,
            cfg,
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            stats,
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Checks and queues a request. Errors (an empty or too long prompt, a bad token id,
    /// bad sampling parameters, a sequence the pool could never hold) come back here.
    pub fn submit(&self, req: SeqRequest) -> Result<RequestHandle> {
        check_request(&*self.model.lm, &self.cfg, &self.windows, &req)?;
        // A schema or grammar that does not compile is the request's error, here; the
        // compiled grammar goes to the engine with the request.
        let constraint = match &req.params.response_format {
            Some(f) => Some(Box::new(crate::constrain::Constraint::new(&self.model.tokenizer, f)?)),
            None => None,
        };
        let (events, rx) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let sent = tx.as_ref().is_some_and(|tx| {
            tx.send(Cmd::Submit {
                req: Box::new(req),
                constraint,
                events,
                cancel: cancel.clone(),
            })
            .is_ok()
        });
        if sent {
            Ok(RequestHandle { events: rx, cancel })
        } else {
            Err(Error::new("the engine is not running"))
        }
    }

    pub fn stats(&self) -> EngineStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Cancels what runs and waits, stops the step loop and joins it.
    pub fn shutdown(&self) {
        if let Some(tx) = self.tx.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(Cmd::Shutdown);
        }
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn step_loop(sched: &mut Scheduler<'_>, rx: &Receiver<Cmd>, stats: &Mutex<EngineStats>) {
    let mut stopping = false;
    loop {
        // Idle: block for the next command. Busy: take what has arrived, then step.
        let first = if sched.is_idle() {
            match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => return,
            }
        } else {
            None
        };
        for cmd in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            match cmd {
                Cmd::Submit {
                    req,
                    constraint,
                    events,
                    cancel,
                } => {
                    if stopping {
                        cancel.store(true, Ordering::Relaxed);
                    }
                    // Checked at submit; a failure here drops `events`, which the handle
                    // sees as the engine stopping.
                    let _ = sched.add_compiled(*req, constraint.map(|c| *c), events, cancel);
                }
                Cmd::Shutdown => stopping = true,
            }
        }
        if stopping {
            sched.cancel_all();
        }
        let result = sched.step();
        let rows = *result.as_ref().unwrap_or(&0);
        {
            let mut st = stats.lock().unwrap_or_else(|e| e.into_inner());
            st.running = sched.n_running();
            st.waiting = sched.n_waiting();
            st.kv_usage = sched.pool().used_ratio();
            st.scheduler = sched.stats;
            if let Err(e) = result {
                st.last_error = Some(e.to_string());
            }
        }
        if stopping && sched.is_idle() {
            return;
        }
        if rows == 0 && !sched.is_idle() {
            // Nothing could run (not expected: the oldest sequence always fits); do not
            // spin.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
