//! The KV pool through its public API: the step loop of a batched engine allocates
//! nothing (counted by a global allocator), and a scheduler-shaped run over a pool too
//! small for all sequences at once finishes every request.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use ffai::engine::{AppendError, GroupSpec, KvPool, KvPoolConfig, SeqId, NO_BLOCK};

/// Counts allocations of the current thread only (the test harness runs others).
struct Counting;

thread_local! {
    static ALLOCS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> usize {
    ALLOCS.with(|c| c.get())
}

/// One round of a batched engine's work: admit requests (with prefix hits), run prefill
/// chunks and decode steps, read tables and slots, fail an append, free. Returns a
/// checksum so nothing is optimized away.
fn round(p: &mut KvPool, prompts: &[Vec<u32>], seqs: &mut [Option<SeqId>], r: usize) -> u64 {
    let mut sum = 0u64;
    for (i, prompt) in prompts.iter().enumerate() {
        let hit = p.lookup_prefix(prompt);
        let (s, cached) = p.add_sequence_with_prompt(prompt).unwrap();
        assert_eq!(cached, hit.positions);
        let mut at = cached;
        while at < prompt.len() {
            let n = 5.min(prompt.len() - at);
            if let Err(AppendError::OutOfBlocks { .. }) = p.append(s, n) {
                break;
            }
            for g in 0..p.groups().len() {
                sum += p.slot(s, g, at) as u64;
                sum += p.block_table(s, g).iter().filter(|&&b| b != NO_BLOCK).count() as u64;
            }
            p.commit(s, &prompt[at..at + n]);
            at += n;
        }
        seqs[i] = Some(s);
    }
    // Decode: one token per sequence per step until the pool is full, then free the
    // newest, as a scheduler's preemption would.
    for step in 0..40u32 {
        for s in seqs.iter().flatten() {
            if p.can_append(*s, 1) && p.append(*s, 1).is_ok() {
                p.commit(*s, &[step + r as u32 % 3]);
                sum += p.len(*s) as u64 + p.used_ratio().to_bits() % 7;
            } else {
                assert!(p.append(*s, 1000).is_err());
            }
        }
    }
    for s in seqs.iter_mut().rev() {
        if let Some(s) = s.take() {
            p.free_sequence(s);
        }
    }
    sum + p.stats().evictions
}

#[test]
fn the_step_loop_does_not_allocate() {
    let mut cfg = KvPoolConfig::new(96, 4, &[GroupSpec::sliding(12), GroupSpec::GLOBAL], 8, 256);
    cfg.model_fingerprint = 42;
    let mut p = KvPool::new(cfg).unwrap();
    let system: Vec<u32> = (0..23).collect();
    let prompts: Vec<Vec<u32>> = (0..6u32)
        .map(|i| {
            system
                .iter()
                .copied()
                .chain((0..3 + i * 5).map(|t| 100 + t * i))
                .collect()
        })
        .collect();
    let mut seqs = vec![None; prompts.len()];
    // Warm-up touches everything once (nothing in the pool should need it; the harness's
    // thread-locals and lazy statics do).
    let mut sum = round(&mut p, &prompts, &mut seqs, 0);
    let before = allocations();
    for r in 1..200 {
        sum = sum.wrapping_add(round(&mut p, &prompts, &mut seqs, r));
    }
    let after = allocations();
    assert_eq!(
        after - before,
        0,
        "allocations in 199 rounds of admit/append/commit/free"
    );
    // The counter does see this thread's allocations.
    let v: Vec<u8> = Vec::with_capacity(1);
    assert_eq!(allocations(), after + 1);
    drop(v);
    assert!(sum > 0);
    let st = p.stats();
    assert!(st.hit_positions > 0 && st.evictions > 0, "{st:?}");
    p.check_invariants();
    assert_eq!(p.used_blocks(), 0);
}

#[test]
fn a_pool_too_small_for_everyone_finishes_every_request() {
    // 10 requests of up to 40 positions; the pool holds about two of them at once.
    let bs = 4;
    let mut p = KvPool::new(KvPoolConfig::new(24, bs, &[GroupSpec::GLOBAL], 4, 64)).unwrap();
    let mut waiting: Vec<(Vec<u32>, usize)> = (0..10u32)
        .map(|i| ((0..10 + i).map(|t| t % 5 + i % 2).collect(), 40))
        .collect();
    let mut running: Vec<(SeqId, Vec<u32>, usize)> = Vec::new();
    let (mut done, mut steps, mut preemptions) = (0, 0, 0);
    while done < 10 {
        steps += 1;
        assert!(steps < 10_000, "no progress");
        // Admit in order while a sequence slot is free and its next chunk fits.
        while let Some((prompt, target)) = waiting.first() {
            let hit = p.lookup_prefix(prompt);
            if p.active_sequences() == p.max_seqs()
                || p.blocks_for(hit.positions, prompt.len() - hit.positions) + hit.revived > p.free_blocks()
            {
                break;
            }
            let (s, _) = p.add_sequence_with_prompt(prompt).unwrap();
            let (prompt, target) = (prompt.clone(), *target);
            waiting.remove(0);
            running.push((s, prompt, target));
        }
        // One step for every running sequence, oldest first: its prompt rest, or a token.
        let mut i = 0;
        while i < running.len() {
            let (s, tokens, target) = &mut running[i];
            let computed = p.computed(*s);
            if computed == tokens.len() {
                tokens.push(computed as u32 % 7);
            }
            let n = tokens.len() - computed;
            match p.append(*s, n) {
                Ok(()) => {
                    p.commit(*s, &tokens[computed..]);
                    if p.computed(*s) == *target {
                        p.free_sequence(*s);
                        running.remove(i);
                        done += 1;
                        continue;
                    }
                    i += 1;
                }
                Err(AppendError::OutOfBlocks { .. }) => {
                    // Preempt the most recently admitted; it recomputes later, with hits.
                    // Its tokens (prompt, generated, and a sampled one not yet run) come
                    // back as its prompt.
                    let (v, tokens, target) = running.pop().unwrap();
                    p.free_sequence(v);
                    waiting.insert(0, (tokens, target));
                    preemptions += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
        p.check_invariants();
    }
    assert_eq!(p.used_blocks(), 0);
    assert!(preemptions > 0);
    assert!(p.stats().hit_positions > 0);
}
