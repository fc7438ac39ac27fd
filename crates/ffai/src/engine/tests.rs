//! Tests of the KV pool and its prefix cache: exact accounting, window release, prefix
//! hits and their refcounts, LRU eviction, hash collisions, and a randomized run against a
//! shadow of the K/V storage that checks every row a query reads.

use super::kv_pool::*;

const G: GroupSpec = GroupSpec::GLOBAL;

fn pool(n_blocks: usize, bs: usize, groups: &[GroupSpec], max_seqs: usize, max_len: usize) -> KvPool {
    let p = KvPool::new(KvPoolConfig::new(n_blocks, bs, groups, max_seqs, max_len)).unwrap();
    p.check_invariants();
    p
}

fn pool_without_prefix(n_blocks: usize, bs: usize, groups: &[GroupSpec]) -> KvPool {
    let mut cfg = KvPoolConfig::new(n_blocks, bs, groups, 4, 1024);
    cfg.prefix_caching = false;
    KvPool::new(cfg).unwrap()
}

/// Reserves and commits `tokens` (one forward of `tokens.len()` rows).
fn run(p: &mut KvPool, s: SeqId, tokens: &[u32]) {
    p.append(s, tokens.len()).unwrap();
    p.commit(s, tokens);
    p.check_invariants();
}

/// Admits `prompt`, computes what was not cached, returns the handle and the hit.
fn admit_and_run(p: &mut KvPool, prompt: &[u32]) -> (SeqId, usize) {
    let (s, cached) = p.add_sequence_with_prompt(prompt).unwrap();
    run(p, s, &prompt[cached..]);
    (s, cached)
}

fn hit(p: &mut KvPool, prompt: &[u32]) -> usize {
    p.lookup_prefix(prompt).positions
}

#[test]
fn config_is_validated() {
    let bad = [
        KvPoolConfig::new(0, 16, &[G], 1, 16),
        KvPoolConfig::new(4, 0, &[G], 1, 16),
        KvPoolConfig::new(4, 16, &[], 1, 16),
        KvPoolConfig::new(4, 16, &[G], 0, 16),
        KvPoolConfig::new(4, 16, &[G], 1, 0),
        KvPoolConfig::new(1 << 30, 16, &[G], 1, 16),
        KvPoolConfig::new(4, 16, &[G], usize::MAX / 2, usize::MAX / 2),
    ];
    for cfg in bad {
        assert!(KvPool::new(cfg.clone()).is_err(), "{cfg:?}");
    }
    let p = pool(4, 16, &[G, GroupSpec::sliding(8)], 2, 100);
    assert_eq!(p.table_stride(), 7);
    assert_eq!(p.raw_tables().len(), 2 * 2 * 7);
    assert!(p.raw_tables().iter().all(|&b| b == NO_BLOCK));
}

#[test]
fn allocation_and_free_accounting() {
    let mut p = pool_without_prefix(8, 4, &[G]);
    assert_eq!((p.free_blocks(), p.used_blocks()), (8, 0));
    let a = p.add_sequence().unwrap();
    assert_eq!(p.block_table(a, 0), &[] as &[u32]);
    p.append(a, 5).unwrap();
    assert_eq!(p.block_table(a, 0), &[0, 1]);
    assert_eq!((p.len(a), p.computed(a), p.free_blocks()), (5, 0, 6));
    p.append(a, 3).unwrap(); // fills block 1: no new block
    assert_eq!((p.block_table(a, 0), p.free_blocks()), (&[0u32, 1][..], 6));
    let b = p.add_sequence().unwrap();
    p.append(b, 4).unwrap();
    assert_eq!(p.block_table(b, 0), &[2]);
    assert_eq!((p.free_blocks(), p.used_blocks(), p.used_ratio()), (5, 3, 3.0 / 8.0));
    p.check_invariants();
    p.free_sequence(a);
    assert_eq!(p.free_blocks(), 7);
    p.check_invariants();
    // Freed blocks come back first (a stack): the most recently freed is block 0.
    let c = p.add_sequence().unwrap();
    p.append(c, 1).unwrap();
    assert_eq!(p.block_table(c, 0), &[0]);
    p.free_sequence(b);
    p.free_sequence(c);
    assert_eq!((p.free_blocks(), p.used_blocks(), p.active_sequences()), (8, 0, 0));
    p.check_invariants();
}

#[test]
fn append_is_all_or_nothing() {
    let mut p = pool(5, 4, &[G, GroupSpec::sliding(8)], 2, 12);
    let a = p.add_sequence().unwrap();
    p.append(a, 8).unwrap(); // 2 blocks in each group
    assert_eq!(p.free_blocks(), 1);
    assert_eq!(p.blocks_needed(a, 1), 2);
    assert!(!p.can_append(a, 1));
    let snapshot = |p: &KvPool| (p.raw_tables().to_vec(), p.free_blocks(), p.len(a), p.computed(a));
    let before = snapshot(&p);
    // One group could get its block, the other not: neither does.
    assert_eq!(p.append(a, 1), Err(AppendError::OutOfBlocks { needed: 2, free: 1 }));
    assert_eq!(before, snapshot(&p));
    p.check_invariants();
    assert_eq!(
        p.append(a, 5),
        Err(AppendError::TooLong {
            len: 13,
            max_seq_len: 12
        })
    );
    assert_eq!(before, snapshot(&p));
    p.append(a, 0).unwrap();
    assert!(p.can_append(a, 0));
    assert_eq!(before, snapshot(&p));
    // After committing 8, the next query (at 8) sees 1..=8: block 0 still holds 1..=3.
    p.commit(a, &[1; 8]);
    assert_eq!(p.free_blocks(), 1);
    p.check_invariants();
    p.free_sequence(a);
    let b = p.add_sequence().unwrap();
    assert_eq!(p.append(b, 9), Err(AppendError::OutOfBlocks { needed: 6, free: 5 }));
    assert_eq!(p.len(b), 0);
    p.append(b, 8).unwrap();
    assert_eq!(p.free_blocks(), 1);
    p.check_invariants();
}

#[test]
fn slot_mapping() {
    let mut p = pool_without_prefix(16, 4, &[G, GroupSpec::sliding(100)]);
    let a = p.add_sequence().unwrap();
    let b = p.add_sequence().unwrap();
    p.append(a, 3).unwrap(); // a: global 0, window 1
    p.append(b, 6).unwrap(); // b: global 2, 3; window 4, 5
    p.append(a, 3).unwrap(); // a: global 6, window 7
    assert_eq!(p.block_table(a, 0), &[0, 6]);
    assert_eq!(p.block_table(a, 1), &[1, 7]);
    assert_eq!(p.block_table(b, 0), &[2, 3]);
    assert_eq!(p.block_table(b, 1), &[4, 5]);
    for pos in 0..6 {
        let (global, window) = if pos < 4 { (0, 1) } else { (6, 7) };
        assert_eq!(p.slot(a, 0, pos), global * 4 + pos as u32 % 4);
        assert_eq!(p.slot(a, 1, pos), window * 4 + pos as u32 % 4);
    }
    assert_eq!(p.slot(a, 1, 0), 4);
    assert_eq!(p.slot(a, 1, 5), 7 * 4 + 1);
    assert_eq!(p.slot(b, 0, 5), 3 * 4 + 1);
    assert_eq!(p.slot(b, 1, 3), 4 * 4 + 3);
    // The flat table array: row = seq index, then group, then block.
    let s = p.table_stride();
    let row = |seq: SeqId, g: usize| (seq.index() * 2 + g) * s;
    assert_eq!(&p.raw_tables()[row(b, 1)..row(b, 1) + 3], &[4, 5, NO_BLOCK]);
}

#[test]
#[should_panic(expected = "not reserved")]
fn slot_past_len_panics() {
    let mut p = pool(4, 4, &[G], 1, 16);
    let a = p.add_sequence().unwrap();
    p.append(a, 2).unwrap();
    p.slot(a, 0, 2);
}

#[test]
#[should_panic(expected = "stale")]
fn stale_handle_panics() {
    let mut p = pool(4, 4, &[G], 1, 16);
    let a = p.add_sequence().unwrap();
    p.free_sequence(a);
    let b = p.add_sequence().unwrap();
    assert_eq!(a.index(), b.index());
    p.len(a);
}

#[test]
#[should_panic(expected = "reserved and uncomputed")]
fn commit_past_reserved_panics() {
    let mut p = pool(4, 4, &[G], 1, 16);
    let a = p.add_sequence().unwrap();
    p.append(a, 2).unwrap();
    p.commit(a, &[1, 2, 3]);
}

#[test]
fn sequence_slots_run_out() {
    let mut p = pool(4, 4, &[G], 2, 16);
    let a = p.add_sequence().unwrap();
    let _b = p.add_sequence().unwrap();
    assert_eq!(p.add_sequence(), Err(AdmitError::NoSequenceSlot));
    assert_eq!(p.add_sequence_with_prompt(&[1, 2, 3]), Err(AdmitError::NoSequenceSlot));
    p.free_sequence(a);
    p.add_sequence().unwrap();
    p.check_invariants();
}

#[test]
fn window_releases_exact_blocks_at_exact_positions() {
    // Window 5: a query at p sees p-4..=p. Block i (positions 4i..4i+3) dies when the next
    // query, at `computed`, starts past it: 4i + 3 < computed - 4, i.e. computed >= 4i + 8.
    let w = 5;
    let mut p = pool_without_prefix(16, 4, &[G, GroupSpec::sliding(w)]);
    let a = p.add_sequence().unwrap();
    let mut released_at = Vec::new();
    for pos in 0..20u32 {
        p.append(a, 1).unwrap();
        let before: Vec<u32> = p.block_table(a, 1).to_vec();
        let free_before = p.free_blocks();
        p.commit(a, &[pos]);
        p.check_invariants();
        let after = p.block_table(a, 1);
        let computed = pos as usize + 1;
        assert_eq!(p.first_block(a, 1), computed.saturating_sub(w - 1) / 4);
        for (i, (&x, &y)) in before.iter().zip(after).enumerate() {
            if x != y {
                assert_eq!(y, NO_BLOCK);
                released_at.push((computed, i, x));
                assert_eq!(p.free_blocks(), free_before + 1);
            }
        }
        // Every position the next query sees is still there.
        for q in computed.saturating_sub(w - 1)..computed {
            p.slot(a, 1, q);
        }
        if computed == 8 {
            assert_eq!(p.block_table(a, 0), &[0, 2]);
            assert_eq!(p.block_table(a, 1), &[NO_BLOCK, 3]);
            assert_eq!(p.free_blocks(), 13);
        }
        if computed == 9 {
            // Window block 1 went back at computed 8 and is the next one handed out.
            assert_eq!(p.block_table(a, 0), &[0, 2, 1]);
            assert_eq!(p.block_table(a, 1), &[NO_BLOCK, 3, 4]);
        }
    }
    // (computed, table index, block id)
    assert_eq!(released_at, vec![(8, 0, 1), (12, 1, 3), (16, 2, 4), (20, 3, 5)]);
    // Global blocks are never released.
    assert!(p.block_table(a, 0).iter().all(|&b| b != NO_BLOCK));
}

#[test]
fn window_memory_follows_the_window() {
    for (w, step) in [(5, 1), (5, 6), (16, 1), (16, 3), (1, 1), (3, 7), (64, 20)] {
        let bs = 4;
        let mut p = pool_without_prefix(200, bs, &[G, GroupSpec::sliding(w)]);
        let a = p.add_sequence().unwrap();
        let bound = (w - 1 + step).div_ceil(bs) + 1;
        let mut peak = 0;
        let steps = 400 / step;
        for t in 0..steps {
            p.append(a, step).unwrap();
            let held = p.block_table(a, 1).iter().filter(|&&b| b != NO_BLOCK).count();
            assert!(held <= bound, "w {w} step {step}: {held} > {bound}");
            peak = peak.max(held);
            let tokens = vec![t as u32; step];
            p.commit(a, &tokens);
        }
        p.check_invariants();
        // The bound is tight enough to mean something: a decode step holds what it needs.
        assert!(peak >= (w - 1 + step) / bs, "w {w} step {step} peak {peak}");
        let global = p.block_table(a, 0).len();
        assert_eq!(global, (steps * step).div_ceil(bs));
        assert_eq!(
            p.used_blocks(),
            global + p.block_table(a, 1).iter().filter(|&&b| b != NO_BLOCK).count()
        );
    }
}

#[test]
fn a_chunk_longer_than_the_window_keeps_its_rows_until_committed() {
    let mut p = pool_without_prefix(32, 4, &[G, GroupSpec::sliding(5)]);
    let a = p.add_sequence().unwrap();
    p.append(a, 20).unwrap();
    assert!(
        p.block_table(a, 1).iter().all(|&b| b != NO_BLOCK),
        "the chunk's own queries read them"
    );
    p.commit(a, &[7; 20]);
    // The next query, at 20, sees 16..=20: only block 4 is left.
    assert_eq!(p.first_block(a, 1), 4);
    assert_eq!(p.block_table(a, 1).iter().filter(|&&b| b != NO_BLOCK).count(), 1);
    p.check_invariants();
}

#[test]
fn prefix_hits_are_whole_blocks_and_leave_a_token_to_compute() {
    let mut p = pool(32, 4, &[G], 8, 64);
    let prompt: Vec<u32> = (1..=10).collect();
    let (a, cached) = admit_and_run(&mut p, &prompt);
    assert_eq!(cached, 0);
    assert_eq!(p.block_table(a, 0), &[0, 1, 2]);
    assert_eq!(p.cached_blocks(), 2, "the partial third block is not cached");
    assert!(p.is_cached(0) && p.is_cached(1) && !p.is_cached(2));
    let cases: &[(&[u32], usize)] = &[
        (&prompt, 8),
        (&prompt[..9], 8),
        (&prompt[..8], 4), // 8 cached, but the last token must be computed
        (&prompt[..5], 4),
        (&prompt[..4], 0),
        (&prompt[..1], 0),
        (&[], 0),
        (&[1, 2, 3, 4, 9, 9, 9, 9, 9], 4),
        (&[0, 2, 3, 4, 5, 6, 7, 8, 9], 0),
        (&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], 8),
    ];
    for &(q, want) in cases {
        let h = p.lookup_prefix(q);
        assert_eq!(h.positions, want, "{q:?}");
        assert_eq!(h.blocks, want / 4);
        assert_eq!(h.revived, 0, "a's blocks are referenced");
        let (s, cached) = p.add_sequence_with_prompt(q).unwrap();
        assert_eq!(cached, want);
        assert_eq!((p.len(s), p.computed(s)), (want, want));
        assert_eq!(p.block_table(s, 0), &p.block_table(a, 0)[..want / 4]);
        p.check_invariants();
        p.free_sequence(s);
    }
    let st = p.stats();
    assert_eq!(st.admitted, 1 + cases.len() as u64);
    assert_eq!(st.hit_positions, cases.iter().map(|c| c.1 as u64).sum::<u64>());
}

#[test]
fn shared_blocks_are_reference_counted() {
    let mut p = pool(16, 2, &[G], 8, 64);
    let sys = [5, 6, 7, 8, 9, 10]; // 3 full blocks
    let prompt = |tail: u32| -> Vec<u32> { sys.iter().copied().chain([tail, tail]).collect() };
    let (a, _) = admit_and_run(&mut p, &prompt(1));
    assert_eq!(p.block_table(a, 0), &[0, 1, 2, 3]);
    let (b, hb) = admit_and_run(&mut p, &prompt(2));
    let (c, hc) = admit_and_run(&mut p, &prompt(3));
    assert_eq!((hb, hc), (6, 6));
    for blk in 0..3 {
        assert_eq!(p.block_refcount(blk), 3);
    }
    assert_eq!(p.block_table(b, 0), &[0, 1, 2, 4]);
    assert_eq!(p.block_table(c, 0), &[0, 1, 2, 5]);
    assert_eq!(p.used_blocks(), 6);
    p.free_sequence(b);
    assert_eq!(p.block_refcount(0), 2);
    assert_eq!(p.used_blocks(), 5, "b's own block 4 is cached but unreferenced");
    p.free_sequence(a);
    assert_eq!(p.block_refcount(0), 1);
    assert_eq!(p.evictable_blocks(), 2);
    p.free_sequence(c);
    assert_eq!(p.block_refcount(0), 0);
    assert_eq!((p.used_blocks(), p.free_blocks()), (0, 16));
    assert_eq!(
        p.evictable_blocks(),
        6,
        "every full block stays cached, free but reusable"
    );
    p.check_invariants();
    // Reviving them: a lookup reports that they leave the free count.
    let h = p.lookup_prefix(&prompt(1));
    assert_eq!(
        h,
        PrefixHit {
            positions: 6,
            blocks: 3,
            revived: 3
        }
    );
    assert_eq!(p.free_blocks(), 16, "lookup changes nothing");
    let (d, _) = p.add_sequence_with_prompt(&prompt(1)).unwrap();
    assert_eq!((p.free_blocks(), p.block_refcount(2)), (13, 1));
    p.check_invariants();
    p.free_sequence(d);
}

#[test]
fn eviction_is_least_recently_used_deepest_first() {
    let mut p = pool(8, 2, &[G], 4, 16);
    let (a, _) = admit_and_run(&mut p, &[1, 1, 1, 1, 1]); // blocks 0, 1 full; 2 partial
    let (b, _) = admit_and_run(&mut p, &[2, 2, 2, 2, 2]); // 3, 4 full; 5 partial
    p.free_sequence(a);
    p.free_sequence(b);
    // Partial blocks went to the free list; full ones to the LRU list, the deeper block of
    // a sequence before its parent, sequences in the order they were freed.
    assert_eq!(p.eviction_order(), vec![1, 0, 4, 3]);
    assert_eq!(p.free_blocks(), 8);
    // Touch b's prefix: its blocks become the most recently used.
    let (d, hd) = p.add_sequence_with_prompt(&[2, 2, 2, 2, 9]).unwrap();
    assert_eq!(hd, 4);
    assert_eq!(p.eviction_order(), vec![1, 0]);
    p.free_sequence(d);
    assert_eq!(p.eviction_order(), vec![1, 0, 4, 3]);
    let (d, _) = p.add_sequence_with_prompt(&[2, 2, 9]).unwrap();
    p.free_sequence(d);
    assert_eq!(p.eviction_order(), vec![1, 0, 4, 3], "block 3 was touched last");
    let (d, _) = p.add_sequence_with_prompt(&[1, 1, 1]).unwrap();
    p.free_sequence(d);
    assert_eq!(p.eviction_order(), vec![1, 4, 3, 0]);
    // The free list (4 blocks) goes first, then evictions in LRU order.
    let c = p.add_sequence().unwrap();
    p.append(c, 8).unwrap();
    assert_eq!(p.stats().evictions, 0);
    p.append(c, 2).unwrap();
    assert_eq!(p.block_table(c, 0)[4], 1);
    assert_eq!(p.stats().evictions, 1);
    assert!(!p.is_cached(1));
    assert_eq!(hit(&mut p, &[1, 1, 1, 1, 1]), 2, "block 0 is still cached");
    p.append(c, 2).unwrap();
    assert_eq!(p.block_table(c, 0)[5], 4);
    assert_eq!(hit(&mut p, &[2, 2, 2, 2, 2]), 2);
    p.append(c, 4).unwrap();
    assert_eq!(&p.block_table(c, 0)[6..], &[3, 0]);
    assert_eq!((p.free_blocks(), p.cached_blocks(), p.stats().evictions), (0, 0, 4));
    assert_eq!(hit(&mut p, &[1, 1, 1, 1, 1]), 0);
    assert_eq!(
        p.append(c, 1),
        Err(AppendError::TooLong {
            len: 17,
            max_seq_len: 16
        })
    );
    p.check_invariants();
}

#[test]
fn hash_collisions_never_share_wrong_blocks() {
    let mut p = pool(32, 2, &[G], 8, 64);
    p.set_hash_mask(0); // every block hashes to 0: one bucket, every lookup a collision
    let (a, _) = admit_and_run(&mut p, &[1, 2, 3, 4, 5]);
    p.free_sequence(a);
    assert_eq!(p.cached_blocks(), 2);
    assert_eq!(hit(&mut p, &[1, 2, 4, 3, 5]), 2);
    assert_eq!(hit(&mut p, &[2, 1, 3, 4, 5]), 0);
    // [3, 4] is cached, but as the block after [1, 2], not as a first block.
    assert_eq!(hit(&mut p, &[3, 4, 1, 2, 5]), 0);
    assert_eq!(hit(&mut p, &[1, 2, 3, 4, 5]), 4);
    // Same tokens after different parents are different contents.
    let (b, hb) = admit_and_run(&mut p, &[3, 4, 3, 4, 5]);
    assert_eq!(hb, 0);
    assert_eq!(p.cached_blocks(), 4);
    p.free_sequence(b);
    assert_eq!(hit(&mut p, &[3, 4, 3, 4, 9]), 4);
    assert_eq!(hit(&mut p, &[1, 2, 3, 4, 9]), 4);
    assert_eq!(hit(&mut p, &[1, 2, 1, 2, 9]), 2);
    let (c, hc) = p.add_sequence_with_prompt(&[3, 4, 3, 4, 9]).unwrap();
    assert_eq!(p.block_table(c, 0), &[2, 3]);
    assert_eq!(hc, 4);
    p.check_invariants();
}

#[test]
fn the_same_prefix_computed_twice_is_cached_once() {
    let mut p = pool(16, 2, &[G], 4, 64);
    let prompt = [1, 2, 3, 4, 5];
    let (a, _) = p.add_sequence_with_prompt(&prompt).unwrap();
    let (b, _) = p.add_sequence_with_prompt(&prompt).unwrap();
    p.append(a, 5).unwrap();
    p.append(b, 5).unwrap();
    p.commit(a, &prompt);
    p.commit(b, &prompt);
    assert_eq!(p.cached_blocks(), 2);
    assert_eq!(p.block_table(a, 0), &[0, 1, 2]);
    assert_eq!(p.block_table(b, 0), &[3, 4, 5]);
    assert!(!p.is_cached(3) && !p.is_cached(4));
    // b's chain continues from a's blocks: its next full block is findable after them.
    run(&mut p, b, &[6]);
    assert!(p.is_cached(5));
    let (c, hc) = p.add_sequence_with_prompt(&[1, 2, 3, 4, 5, 6, 7]).unwrap();
    assert_eq!(hc, 6);
    assert_eq!(p.block_table(c, 0), &[0, 1, 5]);
    p.free_sequence(b);
    assert_eq!(p.free_blocks(), 16 - 4, "b's own duplicates went to the free list");
    p.check_invariants();
    p.free_sequence(a);
    p.free_sequence(c);
    p.check_invariants();
}

#[test]
fn a_preempted_sequence_comes_back_through_the_cache() {
    let mut p = pool(16, 4, &[G], 4, 64);
    let prompt: Vec<u32> = (100..110).collect();
    let (a, _) = admit_and_run(&mut p, &prompt);
    let mut all = prompt.clone();
    for t in 0..7 {
        p.append(a, 1).unwrap();
        p.commit(a, &[t]);
        all.push(t);
    }
    p.free_sequence(a); // preempted after 17 positions
    let (a2, cached) = p.add_sequence_with_prompt(&all).unwrap();
    assert_eq!(cached, 16);
    run(&mut p, a2, &all[cached..]);
    assert_eq!(p.len(a2), 17);
}

#[test]
fn prefix_hits_with_a_sliding_window_group() {
    // Gemma-like: a window group first, the global group (the anchor) second.
    let w = 6;
    let mut p = pool(64, 4, &[GroupSpec::sliding(w), G], 4, 128);
    let prompt: Vec<u32> = (0..30).map(|i| i * 7 % 11).collect();
    let (a, _) = p.add_sequence_with_prompt(&prompt).unwrap();
    let mut a_window = Vec::new(); // every window block a had, released or not
    for chunk in prompt.chunks(8) {
        p.append(a, chunk.len()).unwrap();
        a_window.extend_from_slice(&p.block_table(a, 0)[a_window.len()..]);
        p.commit(a, chunk);
    }
    let a_global = p.block_table(a, 1).to_vec();
    // At 30 the next query sees 25..=30: window blocks 0..5 are back in the pool (cached).
    assert_eq!(p.first_block(a, 0), 6);
    p.free_sequence(a);
    let mut longer = prompt.clone();
    longer.push(99);
    // Hit 28 (7 blocks): the next query, at 28, sees 23..=28: window blocks 5 and 6.
    let (b, hb) = p.add_sequence_with_prompt(&longer).unwrap();
    assert_eq!(hb, 28);
    assert_eq!(p.block_table(b, 1), &a_global[..7]);
    assert_eq!(p.first_block(b, 0), 5);
    let mut want = vec![NO_BLOCK; 5];
    want.extend_from_slice(&a_window[5..7]);
    assert_eq!(p.block_table(b, 0), &want[..]);
    p.check_invariants();
    run(&mut p, b, &longer[28..]);
    p.free_sequence(b);
    // Released window blocks still serve hits: 16 positions need window blocks 2, 3.
    assert_eq!(hit(&mut p, &prompt[..18]), 16);
    assert_eq!(hit(&mut p, &prompt[..26]), 24);
    // Evict the four oldest: window blocks 0..3 (released first while a ran).
    let lru = p.eviction_order();
    assert_eq!(&lru[..4], &a_window[..4]);
    let e = p.add_sequence().unwrap();
    let free_list = p.free_blocks() - p.evictable_blocks();
    assert_eq!(free_list % 2, 0);
    p.append(e, (free_list + 4) / 2 * 4).unwrap();
    assert_eq!(p.stats().evictions, 4);
    // 16 needs window blocks 2, 3 (gone); 8 needs 0, 1 (gone); 4 needs 0 (gone).
    assert_eq!(hit(&mut p, &prompt[..18]), 0);
    // 24 needs window blocks 4, 5 only.
    assert_eq!(hit(&mut p, &prompt[..26]), 24);
    let (c, hc) = p.add_sequence_with_prompt(&prompt[..26]).unwrap();
    assert_eq!(hc, 24);
    assert_eq!(
        p.block_table(c, 0),
        &[NO_BLOCK, NO_BLOCK, NO_BLOCK, NO_BLOCK, a_window[4], a_window[5]]
    );
    p.check_invariants();
}

#[test]
fn a_second_global_group_must_hold_every_block() {
    let mut p = pool(32, 2, &[G, G], 4, 64);
    let (a, _) = admit_and_run(&mut p, &[1, 2, 3, 4, 5, 6, 7]);
    let (b, hb) = p.add_sequence_with_prompt(&[1, 2, 3, 4, 5, 6, 7]).unwrap();
    assert_eq!(hb, 6);
    assert_eq!(p.block_table(b, 1), &p.block_table(a, 1)[..3]);
    p.check_invariants();
}

#[test]
fn state_slots_limit_admission() {
    let mut cfg = KvPoolConfig::new(16, 4, &[G], 4, 64);
    cfg.n_state_slots = 2;
    cfg.prefix_caching = false;
    let mut p = KvPool::new(cfg).unwrap();
    assert!(!p.prefix_caching());
    let prompt: Vec<u32> = (0..9).collect();
    let (a, _) = admit_and_run(&mut p, &prompt);
    let (b, hb) = admit_and_run(&mut p, &prompt);
    assert_eq!(hb, 0);
    assert_eq!((p.state_slot(a), p.state_slot(b)), (Some(0), Some(1)));
    assert_eq!(p.cached_blocks(), 0);
    assert_eq!(p.add_sequence(), Err(AdmitError::NoStateSlot));
    p.free_sequence(a);
    let c = p.add_sequence().unwrap();
    assert_eq!(p.state_slot(c), Some(0));
    p.check_invariants();
    let q = pool(4, 4, &[G], 1, 16);
    let mut q = q;
    let s = q.add_sequence().unwrap();
    assert_eq!(q.state_slot(s), None);
}

/// Runs `seq` from its computed position to the end of `tokens`, stopping at its snapshot
/// point as the scheduler does; returns the snapshot copy it asked for.
fn run_to_end_with_snapshot(p: &mut KvPool, seq: SeqId, tokens: &[u32]) -> Option<(u32, u32)> {
    let mut copy = None;
    while p.computed(seq) < tokens.len() {
        let from = p.computed(seq);
        let to = match p.snapshot_point(seq) {
            Some(c) if c > from => c,
            _ => tokens.len(),
        };
        p.append(seq, to - from).unwrap();
        p.commit(seq, &tokens[from..to]);
        if let Some(c) = p.take_snapshot(seq) {
            assert!(copy.is_none(), "one snapshot per admission");
            copy = Some(c);
        }
    }
    copy
}

#[test]
fn recurrent_prefix_hits_need_a_kept_state() {
    let mut cfg = KvPoolConfig::new(32, 4, &[G], 2, 64);
    cfg.n_state_slots = 2;
    cfg.n_snapshots = 1;
    let mut p = KvPool::new(cfg).unwrap();
    assert!(p.prefix_caching());
    assert_eq!(p.total_state_slots(), 3);
    let prompt: Vec<u32> = (10..20).collect(); // 10 tokens: kept at 8
    let (a, cached) = p.add_sequence_with_prompt(&prompt).unwrap();
    assert_eq!((cached, p.snapshot_point(a)), (0, Some(8)));
    assert_eq!(p.take_restore(a), None);
    let slot_a = p.state_slot(a).unwrap();
    assert_eq!(run_to_end_with_snapshot(&mut p, a, &prompt), Some((slot_a, 2)));
    assert_eq!(p.snapshot_point(a), None);
    p.free_sequence(a);
    // Blocks are cached, but a prompt sharing only the first block finds no kept state.
    let mut other = prompt[..5].to_vec();
    other.extend([90, 91, 92, 93, 94]);
    assert_eq!(p.lookup_prefix(&other).positions, 0);
    // The exact repeat resumes at 8 from snapshot slot 2, once.
    let (b, cached) = p.add_sequence_with_prompt(&prompt).unwrap();
    assert_eq!(cached, 8);
    assert_eq!(p.snapshot_point(b), None, "nothing more to keep for the same prompt");
    assert_eq!(p.take_restore(b), Some((2, p.state_slot(b).unwrap())));
    assert_eq!(p.take_restore(b), None);
    // A longer prompt extending it resumes there too, and keeps its own point (12) in the
    // one snapshot slot, replacing the older one.
    let mut longer = prompt.clone();
    longer.extend([40, 41, 42, 43, 44]);
    let (c, cached) = p.add_sequence_with_prompt(&longer).unwrap();
    assert_eq!((cached, p.snapshot_point(c)), (8, Some(12)));
    assert_eq!(p.take_restore(c), Some((2, p.state_slot(c).unwrap())));
    let slot_c = p.state_slot(c).unwrap();
    assert_eq!(run_to_end_with_snapshot(&mut p, c, &longer), Some((slot_c, 2)));
    p.free_sequence(c);
    p.free_sequence(b);
    assert_eq!(p.lookup_prefix(&prompt).positions, 0, "the state at 8 was replaced");
    assert_eq!(p.lookup_prefix(&longer).positions, 12);
    p.check_invariants();
}

#[test]
fn all_sliding_models_have_no_prefix_caching() {
    let mut p = pool(16, 2, &[GroupSpec::sliding(4)], 4, 64);
    assert!(!p.prefix_caching());
    let (a, _) = admit_and_run(&mut p, &[1, 2, 3, 4, 5]);
    assert_eq!(p.cached_blocks(), 0);
    assert_eq!(hit(&mut p, &[1, 2, 3, 4, 5]), 0);
    p.free_sequence(a);
    assert_eq!(p.free_blocks(), 16);
}

// ---- randomized: the pool against a shadow of the K/V storage --------------------------

/// splitmix64: a fixed-seed generator, enough for a test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

struct Live {
    id: SeqId,
    /// Prompt plus generated tokens; positions `..computed` have K/V rows.
    tokens: Vec<u32>,
    prompt_len: usize,
    target_len: usize,
}

/// A request's work: a prompt and how long it grows by decoding.
struct Request {
    tokens: Vec<u32>,
    prompt_len: usize,
    target_len: usize,
}

/// Runs requests through the pool like a continuous-batching scheduler would, with the
/// K/V storage replaced by a shadow that records, for every row, the token prefix whose
/// K/V it holds. Every row a query reads is checked against the sequence's own tokens;
/// every write must go to a block nobody else holds and the cache does not hold.
/// Returns (preemptions, the pool's counters).
fn simulate(
    seed: u64,
    bs: usize,
    groups: &[GroupSpec],
    n_blocks: usize,
    mask: Option<u64>,
    vocab: u32,
) -> (usize, PoolStats) {
    let max_len = 48;
    let max_seqs = 6;
    let mut p = KvPool::new(KvPoolConfig::new(n_blocks, bs, groups, max_seqs, max_len)).unwrap();
    if let Some(m) = mask {
        p.set_hash_mask(m);
    }
    let ng = groups.len();
    assert!(n_blocks >= ng * max_len.div_ceil(bs), "one sequence must always fit");
    let mut rng = Rng(seed);
    let mut shadow: Vec<Vec<Option<Vec<u32>>>> = vec![vec![None; n_blocks * bs]; ng];
    let systems: Vec<Vec<u32>> = (0..3)
        .map(|_| {
            (0..4 + rng.below(20))
                .map(|_| rng.below(vocab as usize) as u32)
                .collect()
        })
        .collect();
    let mut waiting: Vec<Request> = Vec::new();
    let mut live: Vec<Live> = Vec::new();
    let (mut finished, mut submitted, mut preemptions) = (0, 0, 0);
    for step in 0.. {
        // New requests: a shared system prompt (or not) and a random tail.
        if submitted < 120 && rng.below(3) == 0 {
            let mut tokens = if rng.below(4) > 0 {
                systems[rng.below(systems.len())].clone()
            } else {
                Vec::new()
            };
            for _ in 0..1 + rng.below(16) {
                tokens.push(rng.below(vocab as usize) as u32);
            }
            tokens.truncate(max_len - 1);
            let prompt_len = tokens.len();
            let target_len = (prompt_len + 1 + rng.below(16)).min(max_len);
            waiting.push(Request {
                tokens,
                prompt_len,
                target_len,
            });
            submitted += 1;
        }
        // Admit the oldest waiting request when a slot is free.
        if !waiting.is_empty() && live.len() < max_seqs && rng.below(2) == 0 {
            let r = waiting.remove(0);
            let peek = p.lookup_prefix(&r.tokens);
            let free = p.free_blocks();
            let (id, cached) = p.add_sequence_with_prompt(&r.tokens).unwrap();
            assert_eq!(cached, peek.positions);
            assert_eq!(p.free_blocks(), free - peek.revived);
            assert_eq!(cached % bs, 0);
            assert!(cached == 0 || cached < r.tokens.len());
            assert_eq!((p.len(id), p.computed(id)), (cached, cached));
            // The shared rows hold exactly this sequence's prefix.
            for (g, rows) in shadow.iter().enumerate() {
                for q in p.first_block(id, g) * bs..cached {
                    let s = p.slot(id, g, q) as usize;
                    assert_eq!(rows[s].as_deref(), Some(&r.tokens[..=q]), "seed {seed}: hit row {q}");
                }
            }
            live.push(Live {
                id,
                tokens: r.tokens,
                prompt_len: r.prompt_len,
                target_len: r.target_len,
            });
        }
        // One sequence runs a forward: a prefill chunk, or one decoded token.
        if !live.is_empty() {
            let li = rng.below(live.len());
            let id = live[li].id;
            let computed = p.computed(id);
            let n = if computed < live[li].tokens.len() {
                (1 + rng.below(12)).min(live[li].tokens.len() - computed)
            } else {
                live[li].tokens.push(rng.below(vocab as usize) as u32);
                1
            };
            let before = (p.raw_tables().to_vec(), p.free_blocks(), p.eviction_order());
            match p.append(id, n) {
                Err(AppendError::OutOfBlocks { needed, free }) => {
                    assert!(needed > free);
                    assert_eq!(before, (p.raw_tables().to_vec(), p.free_blocks(), p.eviction_order()));
                    if computed == live[li].tokens.len() - 1 && live[li].tokens.len() > live[li].prompt_len {
                        live[li].tokens.pop(); // the decoded token waits for its turn
                    }
                    // Preempt the most recently admitted sequence; it comes back later.
                    let victim = live.pop().unwrap();
                    p.free_sequence(victim.id);
                    preemptions += 1;
                    waiting.insert(
                        0,
                        Request {
                            tokens: victim.tokens,
                            prompt_len: victim.prompt_len,
                            target_len: victim.target_len,
                        },
                    );
                }
                Err(e) => panic!("seed {seed}: {e}"),
                Ok(()) => {
                    let tokens = live[li].tokens.clone();
                    for pos in computed..computed + n {
                        for (g, spec) in groups.iter().enumerate() {
                            let s = p.slot(id, g, pos);
                            let b = s / bs as u32;
                            assert_eq!(p.block_refcount(b), 1, "seed {seed}: write into a shared block");
                            assert!(!p.is_cached(b), "seed {seed}: write into a cached block");
                            shadow[g][s as usize] = Some(tokens[..=pos].to_vec());
                            // The query at `pos` reads its window (after the chunk's writes up
                            // to itself; causal order within the chunk).
                            let lo = if spec.window == 0 {
                                0
                            } else {
                                (pos + 1).saturating_sub(spec.window)
                            };
                            for q in lo..=pos {
                                let s = p.slot(id, g, q) as usize;
                                assert_eq!(shadow[g][s].as_deref(), Some(&tokens[..=q]), "seed {seed}: row {q}");
                            }
                        }
                    }
                    p.commit(id, &tokens[computed..computed + n]);
                    let (len, computed) = (p.len(id), p.computed(id));
                    for (g, spec) in groups.iter().enumerate() {
                        if spec.window > 0 {
                            let held = p.block_table(id, g).iter().filter(|&&b| b != NO_BLOCK).count();
                            assert!(held <= (spec.window - 1 + len - computed).div_ceil(bs) + 1);
                        }
                    }
                    if p.computed(id) >= live[li].target_len {
                        let done = live.remove(li);
                        assert_eq!(done.tokens.len(), done.target_len);
                        p.free_sequence(done.id);
                        finished += 1;
                    }
                }
            }
        }
        p.check_invariants();
        if submitted == 120 && finished == submitted {
            break;
        }
        assert!(step < 40_000, "seed {seed}: no progress");
    }
    // Drain: never deadlock, never drop a request.
    assert_eq!(
        finished,
        submitted,
        "seed {seed}: {} live, {} waiting",
        live.len(),
        waiting.len()
    );
    assert_eq!((p.used_blocks(), p.free_blocks()), (0, n_blocks));
    let st = p.stats();
    assert!(st.hit_positions > 0, "seed {seed}: the run should hit the prefix cache");
    (preemptions, st)
}

#[test]
fn randomized_against_a_shadow_kv_store() {
    let w = GroupSpec::sliding;
    for seed in 0..6 {
        // Global only, roomy (no preemption) and tight (one long sequence nearly fills it).
        let (pre, st) = simulate(seed, 4, &[G], 64, None, 4);
        assert_eq!(pre, 0);
        assert!(st.evictions > 0);
        // (block size, groups, blocks, hash mask, vocabulary)
        type Case<'a> = (usize, &'a [GroupSpec], usize, Option<u64>, u32);
        let tight: [Case; 6] = [
            (4, &[G], 14, None, 3),
            // Local/global, the anchor second; odd windows; block sizes 1 and 3.
            (4, &[w(6), G], 40, None, 4),
            (3, &[G, w(5), w(9)], 60, None, 3),
            (1, &[w(3), G], 100, None, 2),
            // Hashes collide: every lookup walks candidates and must compare tokens.
            (2, &[G, w(4)], 56, Some(0), 3),
            (4, &[G], 20, Some(3), 2),
        ];
        for (bs, groups, n, mask, vocab) in tight {
            let (pre, st) = simulate(seed, bs, groups, n, mask, vocab);
            assert!(
                pre > 0 && st.evictions > 0 && st.hit_positions > 0,
                "{groups:?}: {pre} {st:?}"
            );
        }
    }
}
