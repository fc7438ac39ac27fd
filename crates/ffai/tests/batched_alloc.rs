//! The engine's step loop allocates nothing tensor-sized: the KV pools, activations, step
//! metadata and logits are sized when the scheduler is built. An allocator records the
//! largest request made while steps run (prefill chunks, decode, preemption and
//! readmission included); what remains are the small per-token strings and channel
//! nodes of the streamed events.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use common::{real_model, SMOLLM2};
use ffai::engine::{EngineConfig, Event, KvCacheSize, Scheduler, SeqRequest};
use ffai::{GenerationParameters, LoadOptions, Model};

struct Recording;

static ON: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static COUNT: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Recording {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if ON.load(Ordering::Relaxed) {
            LARGEST.fetch_max(l.size(), Ordering::Relaxed);
            COUNT.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's layout is passed on as is.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from `System.alloc` with this layout.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if ON.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new, Ordering::Relaxed);
            COUNT.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as for `dealloc`; `new` is the caller's.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Recording = Recording;

#[test]
fn steps_allocate_nothing_tensor_sized() {
    let m = Model::load(real_model(SMOLLM2).to_str().unwrap(), &LoadOptions::default()).unwrap();
    let text = std::fs::read_to_string("/usr/share/common-licenses/GPL-3").unwrap();
    let ids = m.encode(&text).unwrap();
    // A pool of 20 blocks for 12 sequences of up to ~190 tokens: preemption happens.
    let cfg = EngineConfig::for_model(&*m.lm, 256, 12, 96, Some(KvCacheSize::Tokens(640))).unwrap();
    let mut s = Scheduler::new(&*m.lm, &m.tokenizer, cfg).unwrap();
    let mut rx = Vec::new();
    for i in 0..12 {
        let (tx, r) = mpsc::channel();
        let params = GenerationParameters {
            max_tokens: 40,
            temperature: if i % 2 == 0 { 0.0 } else { 0.8 },
            repetition_penalty: 1.1,
            seed: Some(i as u64),
            stop_on_eos: false,
            ..Default::default()
        };
        let prompt = ids[i * 100..i * 100 + 30 + i * 10].to_vec();
        s.add(SeqRequest { prompt, params }, tx, Arc::new(AtomicBool::new(false)))
            .unwrap();
        rx.push(r);
    }
    // Warm up: the first steps size the per-thread scratch and the samplers' buffers.
    for _ in 0..3 {
        s.step().unwrap();
    }
    ON.store(true, Ordering::Relaxed);
    let mut steps = 0;
    while !s.is_idle() && steps < 10_000 {
        s.step().unwrap();
        steps += 1;
    }
    ON.store(false, Ordering::Relaxed);
    assert!(s.is_idle(), "the scheduler did not finish");
    assert!(s.stats.preemptions > 0, "meant to preempt: {:?}", s.stats);
    let done = rx
        .iter()
        .filter(|r| r.try_iter().any(|e| matches!(e, Event::Done(_))))
        .count();
    assert_eq!(done, 12);
    let (largest, count) = (LARGEST.load(Ordering::Relaxed), COUNT.load(Ordering::Relaxed));
    println!("{steps} steps: {count} allocations, the largest {largest} bytes");
    // One row of logits alone is 196 KiB, a step's activations more: nothing near that.
    assert!(largest <= 16 << 10, "an allocation of {largest} bytes in the step loop");
}
