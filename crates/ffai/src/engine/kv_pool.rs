//! The paged KV cache's bookkeeping: which block of the one preallocated pool holds
//! which positions of which sequence. No tensor memory lives here.
//!
//! # What the backend owns, what the pool owns
//!
//! The backend allocates, once, for every layer, K and V storage of
//! `n_blocks * block_size` rows (`[kv_head, row, head_dim]` or any layout indexed by row).
//! Row `block * block_size + offset` is position `offset` of block `block`. The pool hands
//! out block ids; every layer of a [group](GroupSpec) uses the same ids, so a block id
//! names one row range in the storage of every layer of its group (layers of different
//! groups never share a block: one block id space, each block owned by one group at a
//! time).
//!
//! # Groups and block tables
//!
//! Layers whose attention sees different ranges need different tables: a *global* group
//! (`window == 0`) keeps every position; a *sliding-window* group only the last `window`.
//! Each sequence has one block table per group, a flat `&[u32]` (what a CUDA kernel reads
//! from a device buffer), with absolute positions: entry `i` covers positions
//! `i*bs..(i+1)*bs`, so `slot(pos) = table[pos / bs] * bs + pos % bs` in every group. The
//! table has `ceil(len / bs)` entries; in a window group the entries of blocks that fell
//! out of the window are [`NO_BLOCK`] and those blocks are back in the pool, so a window
//! group's memory follows the window while its indexing stays absolute. All tables live
//! in one preallocated array of `max_seqs * n_groups * table_stride` entries
//! ([`raw_tables`](KvPool::raw_tables)); entries past a sequence's length are `NO_BLOCK`.
//!
//! # A sequence's life, and the two lengths
//!
//! ```text
//! let (seq, cached) = pool.add_sequence_with_prompt(&prompt)?; // len = computed = cached
//! loop {
//!     pool.append(seq, n)?;        // reserve rows for positions len..len+n (all groups)
//!     // forward: write K/V of those positions at pool.slot(seq, g, pos), attend through
//!     // pool.block_table(seq, g)
//!     pool.commit(seq, &tokens);   // those n rows are written; their tokens are these
//! }
//! pool.free_sequence(seq);         // finished, or preempted (re-add it later)
//! ```
//!
//! `len` counts reserved positions, `computed` those whose K/V rows are written (committed).
//! Only `commit` advances `computed`, and only then:
//! * a block that became full (and whose K/V rows are all written) is registered in the
//!   prefix cache, so no sequence can ever share a block before its content exists;
//! * sliding-window groups return blocks that are dead. A query at position `p` sees
//!   positions `p - window + 1 ..= p`. The next query still to run is at `computed` (rows
//!   `computed..len` are reserved but not computed yet, and all later queries see less),
//!   so positions `< computed - window + 1` are dead and a block is released when every
//!   position in it is: block `i` goes when `(i + 1) * bs <= computed - window + 1`. With
//!   a step of `n` rows a window group holds at most `ceil((window - 1 + n) / bs) + 1`
//!   blocks. `append` never releases: within one forward every new row of a chunk is seen
//!   by the chunk's own later queries, so all `n` rows need blocks, as the ring buffer of
//!   the single-sequence decoder holds `window + chunk` rows.
//!
//! # Allocation and atomicity
//!
//! [`append`](KvPool::append) reserves `n` positions in *every* group or changes nothing:
//! it first counts the blocks needed (`n_groups * (ceil((len+n)/bs) - ceil(len/bs))`) and
//! fails with [`AppendError::OutOfBlocks`] if the pool cannot give them. A block comes
//! from the free list, or, when that is empty, by evicting the least recently used cached
//! block nobody references. [`free_blocks`](KvPool::free_blocks) counts both kinds, so it
//! is always `n_blocks - used_blocks`. Every bookkeeping array is sized at construction;
//! `add_sequence*`, `lookup_prefix`, `append`, `commit` and `free_sequence` never
//! allocate.
//!
//! # Prefix caching (see also [`super::prefix_cache`])
//!
//! Every block has a reference count (the tables that hold it). A full, committed block is
//! registered under its content; when its count drops to 0 it stays registered as "free
//! but reusable" on an LRU list, and an allocation evicts the least recently used of those
//! only when the free list is empty. When a sequence is freed its blocks go onto the LRU
//! list deepest first, so a chain's tail is evicted before its head (a block whose parent
//! is gone can never be hit again).
//!
//! [`add_sequence_with_prompt`](KvPool::add_sequence_with_prompt) finds the longest run of
//! cached full blocks matching the prompt and shares them (reference count + 1). The hit is
//! whole blocks and at most `prompt.len() - 1` positions, so the last prompt token is
//! always computed (its logits are needed) and the sequence's first write lands at a block
//! boundary, in a block of its own: a shared block is never written, and a partial block is
//! never shared (nothing needs copying; the cost is recomputing fewer than `block_size`
//! positions more than a token-granular hit would).
//!
//! Which groups take part: the first global group is the *anchor*; its blocks carry the
//! token chain. A hit of `k` blocks (`c = k * bs` positions) also needs, in every other
//! group, the blocks the next query can see: all of `0..k` for a global group, for a
//! window group the blocks from `(c - window + 1) / bs` on (the ones a sequence that had
//! computed `c` positions itself would still hold; those before are `NO_BLOCK`). Blocks of
//! non-anchor groups are cached too (keyed by the anchor content at the same positions),
//! also after a window released them, so they stay findable until evicted. The hit is the
//! largest `k` for which every group has every needed block. So local/global models (Gemma
//! 2/3) get prefix hits, e.g. a chat's next turn whose divergence is recent enough that the
//! window blocks are still cached.
//!
//! Prefix caching is off (hits are always 0, nothing is registered) when the config says
//! so, and when no group is global (an all-sliding-window model has no group that keeps
//! the token chain's blocks; its early blocks are gone soon after they are computed).
//!
//! # Recurrent-state slots
//!
//! A pool created with `n_state_slots > 0` gives every sequence one slot index
//! (`0..n_state_slots`) at admission, for the backend's fixed-size conv/SSM state; no slot
//! left means the sequence cannot be admitted ([`AdmitError::NoStateSlot`]). The slot is
//! returned by `free_sequence`. A preempted sequence restarts from position 0 (or from a
//! kept state, below): its state is recomputed.
//!
//! # Recurrent state and prefix caching
//!
//! A recurrent layer's state at position `c` lives in no block, so cached blocks alone
//! cannot resume a sequence. Such a pool keeps *snapshots*: `n_snapshots` more state slots
//! (`n_state_slots..n_state_slots + n_snapshots`), each holding the state of some sequence
//! at a block boundary `c`, keyed by the prefix id of the anchor block ending at `c` (so it
//! stands for exactly the tokens `0..c`, which the block chain verifies token by token).
//! A sequence admitted with prompt `p` is asked to stop a step at
//! `c = floor((len(p) - 1) / bs) * bs` ([`snapshot_point`](KvPool::snapshot_point)), the
//! longest hit any later prompt can have, and when it has computed `c` positions
//! [`take_snapshot`](KvPool::take_snapshot) names the copy its state needs (its slot to a
//! snapshot slot, the least recently used one). A prefix hit then counts only up to the
//! deepest matched block that has a snapshot, and [`take_restore`](KvPool::take_restore)
//! names the copy that puts it into the new sequence's slot. So an exact repeat of a
//! prompt (and a prompt extending another one, as a chat's next turn does, when the
//! earlier one's boundary is a block boundary of it) resumes from the kept state; any
//! other prefix gets no reuse. Snapshots whose block was evicted can never match again
//! (prefix ids are never reused) and are replaced first by recency.
//!
//! # Preemption
//!
//! The scheduler frees a preempted sequence with `free_sequence` (its full committed blocks
//! stay cached, unreferenced, most recently used) and later re-adds it with prompt plus
//! generated tokens; `add_sequence_with_prompt` then finds those blocks unless they were
//! evicted in between. Sequence handles carry a generation, so a stale [`SeqId`] panics
//! instead of touching a sequence that reused its slot.

use std::fmt;

use super::prefix_cache::{self, PrefixCache};

/// A block-table entry with no block: a window group's block that fell out of the window.
pub const NO_BLOCK: u32 = u32::MAX;

/// One KV group: the layers that share an attention range and so a block table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupSpec {
    /// 0 = global (every position); otherwise a query sees the last `window` positions.
    pub window: usize,
}

impl GroupSpec {
    pub const GLOBAL: GroupSpec = GroupSpec { window: 0 };

    pub const fn sliding(window: usize) -> GroupSpec {
        GroupSpec { window }
    }
}

/// Everything a pool is sized by; nothing grows afterwards.
#[derive(Clone, Debug)]
pub struct KvPoolConfig {
    /// Blocks in the pool (shared by all groups).
    pub n_blocks: usize,
    /// Positions per block (16–64 in practice).
    pub block_size: usize,
    /// The KV groups (at least one).
    pub groups: Vec<GroupSpec>,
    /// Most sequences at once (rows of the block-table array).
    pub max_seqs: usize,
    /// Most positions of one sequence (the table stride is `ceil(max_seq_len / bs)`; the
    /// tables take `4 * max_seqs * n_groups * stride` bytes, allocated once).
    pub max_seq_len: usize,
    /// Recurrent-state slots (0: the model has none).
    pub n_state_slots: usize,
    /// Slots for kept recurrent states (prefix caching with recurrent state; the backend's
    /// state arrays have `n_state_slots + n_snapshots` slots).
    pub n_snapshots: usize,
    /// Share cached full blocks between sequences with a common prompt prefix.
    pub prefix_caching: bool,
    /// Seeds the block hashes (e.g. a hash of the model's weights and KV dtype).
    pub model_fingerprint: u64,
}

impl KvPoolConfig {
    /// A config with prefix caching on and no recurrent state.
    pub fn new(
        n_blocks: usize,
        block_size: usize,
        groups: &[GroupSpec],
        max_seqs: usize,
        max_seq_len: usize,
    ) -> KvPoolConfig {
        KvPoolConfig {
            n_blocks,
            block_size,
            groups: groups.to_vec(),
            max_seqs,
            max_seq_len,
            n_state_slots: 0,
            n_snapshots: 0,
            prefix_caching: true,
            model_fingerprint: 0,
        }
    }
}

/// A handle to a sequence of a pool: its row in the block-table array and a generation
/// that catches handles kept past `free_sequence`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeqId {
    index: u32,
    generation: u32,
}

impl SeqId {
    /// The sequence's row in [`KvPool::raw_tables`], `0..max_seqs` (reused after free).
    pub fn index(self) -> usize {
        self.index as usize
    }
}

/// Why a sequence could not be admitted. Nothing changed in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdmitError {
    /// `max_seqs` sequences are running.
    NoSequenceSlot,
    /// Every recurrent-state slot is taken.
    NoStateSlot,
}

impl fmt::Display for AdmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdmitError::NoSequenceSlot => f.write_str("every sequence slot of the KV pool is taken"),
            AdmitError::NoStateSlot => f.write_str("every recurrent-state slot of the KV pool is taken"),
        }
    }
}

impl std::error::Error for AdmitError {}

/// Why [`KvPool::append`] reserved nothing. Nothing changed in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendError {
    /// The pool has `free` blocks (free list plus evictable cached ones); `needed` more
    /// were needed.
    OutOfBlocks { needed: usize, free: usize },
    /// The sequence would exceed the pool's `max_seq_len`.
    TooLong { len: usize, max_seq_len: usize },
}

impl fmt::Display for AppendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AppendError::OutOfBlocks { needed, free } => {
                write!(f, "KV pool out of blocks: {needed} needed, {free} free")
            }
            AppendError::TooLong { len, max_seq_len } => {
                write!(
                    f,
                    "sequence of {len} positions exceeds the KV pool's limit of {max_seq_len}"
                )
            }
        }
    }
}

impl std::error::Error for AppendError {}

/// What [`KvPool::lookup_prefix`] would share for a prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PrefixHit {
    /// Positions that need no computing (a multiple of the block size, < prompt length).
    pub positions: usize,
    /// Blocks that would be shared, over all groups.
    pub blocks: usize,
    /// Of those, blocks nobody references now: admitting takes them out of
    /// [`free_blocks`](KvPool::free_blocks).
    pub revived: usize,
}

/// Counters since the pool was created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Sequences admitted.
    pub admitted: u64,
    /// Prompt positions admitted sequences asked for.
    pub prompt_positions: u64,
    /// Of those, positions served from the prefix cache.
    pub hit_positions: u64,
    /// Cached blocks evicted to satisfy an allocation.
    pub evictions: u64,
}

#[derive(Clone, Copy, Debug)]
struct Seq {
    generation: u32,
    active: bool,
    /// Reserved positions.
    len: usize,
    /// Positions whose K/V rows are written.
    computed: usize,
    /// Recurrent-state slot, or `NO_BLOCK` for none.
    state_slot: u32,
    /// A snapshot slot whose state must be copied into `state_slot` before the sequence
    /// runs (a prefix hit), or `NO_BLOCK`.
    restore: u32,
    /// The position at which the sequence's state is to be kept (0: none).
    snapshot_at: usize,
    /// Chained hash and prefix id of the content up to the last full computed block
    /// (`computed / bs` blocks); the root when none.
    chain_hash: u64,
    chain_id: u64,
}

/// The paged KV cache's bookkeeping. See the [module docs](self).
#[derive(Debug)]
pub struct KvPool {
    n_blocks: usize,
    block_size: usize,
    groups: Vec<GroupSpec>,
    max_seqs: usize,
    max_seq_len: usize,
    /// Entries per block table: `ceil(max_seq_len / block_size)`.
    stride: usize,
    /// The anchor group when prefix caching is on.
    anchor: Option<usize>,
    root_hash: u64,
    refcount: Vec<u32>,
    /// Unreferenced blocks not in the prefix cache (a stack).
    free_list: Vec<u32>,
    /// Blocks with a reference count above 0.
    used: usize,
    cache: PrefixCache,
    seqs: Vec<Seq>,
    free_seqs: Vec<u32>,
    /// `[max_seqs][n_groups][stride]`.
    tables: Vec<u32>,
    /// `[max_seqs][n_groups]`: block index below which a window group holds nothing.
    released: Vec<u32>,
    /// `[max_seqs][block_size]`: tokens of the block being filled (prefix caching only).
    partial: Vec<u32>,
    n_state_slots: usize,
    free_state_slots: Vec<u32>,
    /// Kept recurrent states: per snapshot slot the prefix id it stands for (0: empty) and
    /// when it was last used.
    snapshots: Vec<(u64, u64)>,
    snapshot_clock: u64,
    /// The snapshot the last `match_prefix` ended on.
    hit_snapshot: u32,
    /// `[n_groups][stride]`: a prefix match is built here.
    scratch: Vec<u32>,
    stats: PoolStats,
}

impl KvPool {
    /// Builds a pool; every array it will ever use is allocated here.
    pub fn new(cfg: KvPoolConfig) -> crate::Result<KvPool> {
        let KvPoolConfig {
            n_blocks,
            block_size,
            groups,
            max_seqs,
            max_seq_len,
            n_state_slots,
            n_snapshots,
            prefix_caching,
            model_fingerprint,
        } = cfg;
        crate::ensure!(block_size > 0, "KV pool: block size must be positive");
        crate::ensure!(n_blocks > 0, "KV pool: needs at least one block");
        crate::ensure!(
            n_blocks.checked_mul(block_size).is_some_and(|r| r <= u32::MAX as usize),
            "KV pool: {n_blocks} blocks of {block_size} rows exceed 2^32 rows"
        );
        crate::ensure!(!groups.is_empty(), "KV pool: needs at least one KV group");
        crate::ensure!(groups.len() < u32::MAX as usize, "KV pool: too many KV groups");
        crate::ensure!(max_seqs > 0, "KV pool: max_seqs must be positive");
        crate::ensure!(max_seqs < u32::MAX as usize, "KV pool: max_seqs too large");
        crate::ensure!(max_seq_len > 0, "KV pool: max_seq_len must be positive");
        crate::ensure!(
            n_state_slots
                .checked_add(n_snapshots)
                .is_some_and(|n| n < u32::MAX as usize),
            "KV pool: too many state slots"
        );
        let stride = max_seq_len.div_ceil(block_size);
        crate::ensure!(
            stride < u32::MAX as usize,
            "KV pool: max_seq_len {max_seq_len} too large"
        );
        let n_groups = groups.len();
        let table_entries = max_seqs
            .checked_mul(n_groups)
            .and_then(|x| x.checked_mul(stride))
            .filter(|&x| x <= isize::MAX as usize / 4);
        let Some(table_entries) = table_entries else {
            crate::bail!(
                "KV pool: block tables of {max_seqs} sequences × {n_groups} groups × {stride} blocks overflow"
            );
        };
        let anchor = if prefix_caching {
            groups.iter().position(|g| g.window == 0)
        } else {
            None
        };
        let cache = PrefixCache::new(
            n_blocks,
            if anchor.is_some() { block_size } else { 0 },
            anchor.unwrap_or(0) as u32,
        );
        let seq = Seq {
            generation: 0,
            active: false,
            len: 0,
            computed: 0,
            state_slot: NO_BLOCK,
            restore: NO_BLOCK,
            snapshot_at: 0,
            chain_hash: 0,
            chain_id: 0,
        };
        Ok(KvPool {
            n_blocks,
            block_size,
            max_seqs,
            max_seq_len,
            stride,
            anchor,
            root_hash: prefix_cache::root_hash(model_fingerprint),
            refcount: vec![0; n_blocks],
            // Popped from the end: blocks are handed out 0, 1, 2, ... at first.
            free_list: (0..n_blocks as u32).rev().collect(),
            used: 0,
            cache,
            seqs: vec![seq; max_seqs],
            free_seqs: (0..max_seqs as u32).rev().collect(),
            tables: vec![NO_BLOCK; table_entries],
            released: vec![0; max_seqs * n_groups],
            partial: vec![0; if anchor.is_some() { max_seqs * block_size } else { 0 }],
            n_state_slots,
            free_state_slots: (0..n_state_slots as u32).rev().collect(),
            snapshots: vec![(0, 0); if n_state_slots > 0 { n_snapshots } else { 0 }],
            snapshot_clock: 0,
            hit_snapshot: NO_BLOCK,
            scratch: vec![NO_BLOCK; n_groups * stride],
            stats: PoolStats::default(),
            groups,
        })
    }

    // ---- sizes and counters -------------------------------------------------------------

    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn groups(&self) -> &[GroupSpec] {
        &self.groups
    }

    pub fn max_seqs(&self) -> usize {
        self.max_seqs
    }

    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    /// Entries per block table in [`raw_tables`](Self::raw_tables).
    pub fn table_stride(&self) -> usize {
        self.stride
    }

    /// Slots the backend's recurrent state arrays need: the sequences' and the kept ones.
    pub fn total_state_slots(&self) -> usize {
        self.n_state_slots + self.snapshots.len()
    }

    /// Whether prefix caching is on (see the module docs for when it is off).
    pub fn prefix_caching(&self) -> bool {
        self.anchor.is_some()
    }

    /// Blocks an `append` can get: the free list plus cached blocks nobody references
    /// (those are evicted on demand). Always `n_blocks - used_blocks`.
    pub fn free_blocks(&self) -> usize {
        self.n_blocks - self.used
    }

    /// Blocks referenced by at least one sequence.
    pub fn used_blocks(&self) -> usize {
        self.used
    }

    /// `used_blocks / n_blocks`.
    pub fn used_ratio(&self) -> f64 {
        self.used as f64 / self.n_blocks as f64
    }

    /// Blocks in the prefix cache, referenced or not.
    pub fn cached_blocks(&self) -> usize {
        self.cache.registered_blocks()
    }

    /// Cached blocks nobody references (evicted least recently used first).
    pub fn evictable_blocks(&self) -> usize {
        self.cache.lru_len()
    }

    /// The cached blocks nobody references, least recently used (next evicted) first.
    /// Allocates; for tests and diagnostics.
    pub fn eviction_order(&self) -> Vec<u32> {
        self.cache.lru_order()
    }

    /// Sequences admitted and not freed.
    pub fn active_sequences(&self) -> usize {
        self.max_seqs - self.free_seqs.len()
    }

    /// How many block tables hold `block`.
    pub fn block_refcount(&self, block: u32) -> u32 {
        self.refcount[block as usize]
    }

    /// Whether `block` is registered in the prefix cache (full, written, shareable: it
    /// must never be written again while cached).
    pub fn is_cached(&self, block: u32) -> bool {
        self.cache.is_registered(block)
    }

    pub fn stats(&self) -> PoolStats {
        self.stats
    }

    /// Blocks (over all groups) that growing a sequence of `len` positions by `n` takes.
    pub fn blocks_for(&self, len: usize, n: usize) -> usize {
        let bs = self.block_size;
        let grow = len.saturating_add(n).div_ceil(bs) - len.div_ceil(bs);
        grow.saturating_mul(self.groups.len())
    }

    // ---- sequences ----------------------------------------------------------------------

    fn index(&self, seq: SeqId) -> usize {
        let i = seq.index as usize;
        let s = &self.seqs[i];
        assert!(s.active && s.generation == seq.generation, "stale or foreign {seq:?}");
        i
    }

    fn row(&self, si: usize, group: usize) -> usize {
        (si * self.groups.len() + group) * self.stride
    }

    /// First block index a sequence that has computed `computed` positions still needs in
    /// `group`: 0 for a global group; for a window group the block holding position
    /// `computed - window + 1`, the first the next query (at `computed`) sees.
    fn first_live_block(&self, group: usize, computed: usize) -> usize {
        match self.groups[group].window {
            0 => 0,
            w => computed.saturating_sub(w - 1) / self.block_size,
        }
    }

    /// Admits an empty sequence (no prefix lookup).
    pub fn add_sequence(&mut self) -> Result<SeqId, AdmitError> {
        self.add_sequence_with_prompt(&[]).map(|(s, _)| s)
    }

    /// Admits a sequence whose prompt is `prompt` and shares the longest run of cached
    /// full blocks it starts with. Returns the handle and the positions already present
    /// (`len` and `computed` start there; the caller computes `prompt[cached..]`). The
    /// prompt is not stored: its tokens reach the pool through [`commit`](Self::commit).
    pub fn add_sequence_with_prompt(&mut self, prompt: &[u32]) -> Result<(SeqId, usize), AdmitError> {
        if self.free_seqs.is_empty() {
            return Err(AdmitError::NoSequenceSlot);
        }
        if self.n_state_slots > 0 && self.free_state_slots.is_empty() {
            return Err(AdmitError::NoStateSlot);
        }
        let (k, chain_hash, chain_id) = self.match_prefix(prompt);
        let si = self.free_seqs.pop().unwrap() as usize;
        let state_slot = if self.n_state_slots > 0 {
            self.free_state_slots.pop().unwrap()
        } else {
            NO_BLOCK
        };
        let cached = k * self.block_size;
        let mut restore = NO_BLOCK;
        if k > 0 && self.n_state_slots > 0 {
            restore = self.hit_snapshot;
            self.snapshot_clock += 1;
            self.snapshots[(restore as usize) - self.n_state_slots].1 = self.snapshot_clock;
        }
        // Where this prompt's state is to be kept: its longest possible hit.
        let snapshot_at = if self.anchor.is_some() && !self.snapshots.is_empty() {
            let c = prompt.len().saturating_sub(1) / self.block_size * self.block_size;
            if c > cached {
                c
            } else {
                0
            }
        } else {
            0
        };
        for g in 0..self.groups.len() {
            let (row, srow) = (self.row(si, g), g * self.stride);
            for i in 0..k {
                let b = self.scratch[srow + i];
                self.tables[row + i] = b;
                if b != NO_BLOCK {
                    self.take_ref(b);
                }
            }
            self.released[si * self.groups.len() + g] = self.first_live_block(g, cached) as u32;
        }
        let s = &mut self.seqs[si];
        *s = Seq {
            generation: s.generation,
            active: true,
            len: cached,
            computed: cached,
            state_slot,
            restore,
            snapshot_at,
            chain_hash,
            chain_id,
        };
        self.stats.admitted += 1;
        self.stats.prompt_positions += prompt.len() as u64;
        self.stats.hit_positions += cached as u64;
        let id = SeqId {
            index: si as u32,
            generation: s.generation,
        };
        Ok((id, cached))
    }

    /// What admitting `prompt` now would share, without admitting it (the LRU order is
    /// untouched; `&mut` only for the scratch space).
    pub fn lookup_prefix(&mut self, prompt: &[u32]) -> PrefixHit {
        let (k, _, _) = self.match_prefix(prompt);
        let mut hit = PrefixHit {
            positions: k * self.block_size,
            ..PrefixHit::default()
        };
        for g in 0..self.groups.len() {
            for &b in &self.scratch[g * self.stride..g * self.stride + k] {
                if b != NO_BLOCK {
                    hit.blocks += 1;
                    hit.revived += (self.refcount[b as usize] == 0) as usize;
                }
            }
        }
        hit
    }

    /// Finds the longest usable cached prefix of `prompt` in whole blocks, at most
    /// `prompt.len() - 1` positions. Fills `scratch[g][0..k]` with the blocks to share
    /// (`NO_BLOCK` below a window group's first live block) and returns `k` and the chain
    /// state after block `k - 1`.
    fn match_prefix(&mut self, prompt: &[u32]) -> (usize, u64, u64) {
        let root = (self.root_hash, 0);
        let Some(anchor) = self.anchor else {
            return (0, root.0, root.1);
        };
        if prompt.len() < 2 {
            return (0, root.0, root.1);
        }
        let bs = self.block_size;
        let k_max = ((prompt.len() - 1) / bs).min(self.stride);
        let arow = anchor * self.stride;
        let (mut h, mut id) = root;
        let mut k = 0;
        while k < k_max {
            let tokens = &prompt[k * bs..(k + 1) * bs];
            let hk = self.cache.hash_block(h, tokens);
            let Some(b) = self.cache.find_anchor(hk, id, tokens) else {
                break;
            };
            self.scratch[arow + k] = b;
            (h, id) = (hk, self.cache.prefix_id(b));
            k += 1;
        }
        // With recurrent state, a hit must end where a state was kept.
        self.hit_snapshot = NO_BLOCK;
        let recurrent = self.n_state_slots > 0;
        if recurrent {
            k = self.kept_state_below(arow, k);
        }
        // Every other group needs its blocks from its first live block to k - 1. A missing
        // block i caps the hit at k = i (then block i is not needed); recheck every group,
        // since a smaller hit needs a window group's earlier blocks (and, with recurrent
        // state, another kept state).
        'retry: loop {
            for g in (0..self.groups.len()).filter(|&g| g != anchor) {
                let lo = self.first_live_block(g, k * bs);
                let grow = g * self.stride;
                for i in (lo..k).rev() {
                    let a = self.scratch[arow + i];
                    let (ah, aid) = (self.cache.hash(a), self.cache.prefix_id(a));
                    let hg = self.cache.hash_group_block(ah, g as u32);
                    match self.cache.find_group_block(hg, g as u32, aid) {
                        Some(b) => self.scratch[grow + i] = b,
                        None => {
                            k = i;
                            if recurrent {
                                k = self.kept_state_below(arow, k);
                            }
                            continue 'retry;
                        }
                    }
                }
                self.scratch[grow..grow + lo].fill(NO_BLOCK);
            }
            break;
        }
        if k == 0 {
            return (0, root.0, root.1);
        }
        let last = self.scratch[arow + k - 1];
        (k, self.cache.hash(last), self.cache.prefix_id(last))
    }

    /// The largest `k' <= k` whose matched anchor block `k' - 1` has a kept state (recorded
    /// in `hit_snapshot`), or 0.
    fn kept_state_below(&mut self, arow: usize, k: usize) -> usize {
        for k2 in (1..=k).rev() {
            let id = self.cache.prefix_id(self.scratch[arow + k2 - 1]);
            if let Some(j) = self.snapshots.iter().position(|&(sid, _)| sid == id) {
                self.hit_snapshot = (self.n_state_slots + j) as u32;
                return k2;
            }
        }
        self.hit_snapshot = NO_BLOCK;
        0
    }

    /// Where the scheduler must end a step of `seq` so that its state there can be kept
    /// (see the module docs): `Some(c)` until the sequence has computed `c` positions.
    pub fn snapshot_point(&self, seq: SeqId) -> Option<usize> {
        let s = &self.seqs[self.index(seq)];
        (s.snapshot_at > s.computed).then_some(s.snapshot_at)
    }

    /// The copy a newly admitted sequence's state needs before it runs: `(snapshot slot,
    /// its slot)` after a prefix hit on a kept state, once.
    pub fn take_restore(&mut self, seq: SeqId) -> Option<(u32, u32)> {
        let si = self.index(seq);
        let s = &mut self.seqs[si];
        let src = std::mem::replace(&mut s.restore, NO_BLOCK);
        (src != NO_BLOCK).then_some((src, s.state_slot))
    }

    /// When `seq` has computed exactly its snapshot point: records a kept state for the
    /// block chain up to there and returns the copy to make, `(its slot, snapshot slot)`
    /// (the least recently used snapshot slot is reused), once. None when there is
    /// nothing to keep or the same prefix is kept already.
    pub fn take_snapshot(&mut self, seq: SeqId) -> Option<(u32, u32)> {
        let si = self.index(seq);
        let s = self.seqs[si];
        if s.snapshot_at == 0 || s.computed != s.snapshot_at || self.snapshots.is_empty() {
            return None;
        }
        self.seqs[si].snapshot_at = 0;
        let id = s.chain_id;
        if id == 0 {
            return None;
        }
        self.snapshot_clock += 1;
        if let Some(e) = self.snapshots.iter_mut().find(|e| e.0 == id) {
            e.1 = self.snapshot_clock;
            return None;
        }
        // Empty slots have last-used 0, so they go first.
        let j = (0..self.snapshots.len()).min_by_key(|&j| self.snapshots[j].1)?;
        self.snapshots[j] = (id, self.snapshot_clock);
        Some((s.state_slot, (self.n_state_slots + j) as u32))
    }

    /// Positions reserved for the sequence (`append`ed).
    pub fn len(&self, seq: SeqId) -> usize {
        self.seqs[self.index(seq)].len
    }

    /// Positions whose K/V rows are written (`commit`ted); `len - computed` are pending.
    pub fn computed(&self, seq: SeqId) -> usize {
        self.seqs[self.index(seq)].computed
    }

    /// The sequence's recurrent-state slot, if the pool has state slots.
    pub fn state_slot(&self, seq: SeqId) -> Option<u32> {
        let s = self.seqs[self.index(seq)].state_slot;
        (s != NO_BLOCK).then_some(s)
    }

    /// Blocks (over all groups) that `append(seq, n)` would take.
    pub fn blocks_needed(&self, seq: SeqId, n: usize) -> usize {
        self.blocks_for(self.len(seq), n)
    }

    /// Whether `append(seq, n)` would succeed.
    pub fn can_append(&self, seq: SeqId, n: usize) -> bool {
        let len = self.len(seq);
        len.saturating_add(n) <= self.max_seq_len && self.blocks_for(len, n) <= self.free_blocks()
    }

    /// Reserves positions `len..len + n` in every group, taking blocks as needed; all or
    /// nothing. Never releases window blocks (see the module docs).
    pub fn append(&mut self, seq: SeqId, n: usize) -> Result<(), AppendError> {
        let si = self.index(seq);
        let len = self.seqs[si].len;
        let new_len = len.saturating_add(n);
        if new_len > self.max_seq_len {
            return Err(AppendError::TooLong {
                len: new_len,
                max_seq_len: self.max_seq_len,
            });
        }
        let needed = self.blocks_for(len, n);
        if needed > self.free_blocks() {
            return Err(AppendError::OutOfBlocks {
                needed,
                free: self.free_blocks(),
            });
        }
        let (from, to) = (len.div_ceil(self.block_size), new_len.div_ceil(self.block_size));
        for g in 0..self.groups.len() {
            let row = self.row(si, g);
            for i in from..to {
                self.tables[row + i] = self.alloc();
            }
        }
        self.seqs[si].len = new_len;
        Ok(())
    }

    /// Marks the next `tokens.len()` reserved positions computed (their K/V rows are
    /// written) with these token ids. Full blocks are registered in the prefix cache and
    /// window groups release the blocks no query can see any more. Panics if more than the
    /// reserved positions are committed.
    pub fn commit(&mut self, seq: SeqId, tokens: &[u32]) {
        let si = self.index(seq);
        let s = self.seqs[si];
        assert!(
            tokens.len() <= s.len - s.computed,
            "commit of {} positions with {} reserved and uncomputed",
            tokens.len(),
            s.len - s.computed
        );
        if self.anchor.is_some() {
            let bs = self.block_size;
            let mut rest = tokens;
            while !rest.is_empty() {
                let computed = self.seqs[si].computed;
                let off = computed % bs;
                let take = (bs - off).min(rest.len());
                self.partial[si * bs + off..si * bs + off + take].copy_from_slice(&rest[..take]);
                rest = &rest[take..];
                self.seqs[si].computed = computed + take;
                if off + take == bs {
                    self.complete_block(si, computed / bs);
                }
            }
        } else {
            self.seqs[si].computed += tokens.len();
        }
        self.release_dead(si);
    }

    /// Block `i` of sequence `si` is full and computed: registers its blocks (unless the
    /// same content is cached already) and advances the sequence's chain.
    fn complete_block(&mut self, si: usize, i: usize) {
        let anchor = self.anchor.unwrap();
        let bs = self.block_size;
        let tokens = &self.partial[si * bs..(si + 1) * bs];
        let (parent_hash, parent_id) = (self.seqs[si].chain_hash, self.seqs[si].chain_id);
        let h = self.cache.hash_block(parent_hash, tokens);
        let a = self.tables[self.row(si, anchor) + i];
        debug_assert!(a != NO_BLOCK && !self.cache.is_registered(a));
        // The same content may be cached by another sequence that computed it at the same
        // time; then this block stays unregistered and the chain continues from that one.
        let id = match self.cache.find_anchor(h, parent_id, tokens) {
            Some(e) => self.cache.prefix_id(e),
            None => self.cache.insert_anchor(a, h, parent_id, tokens),
        };
        for g in (0..self.groups.len()).filter(|&g| g != anchor) {
            let b = self.tables[self.row(si, g) + i];
            if b == NO_BLOCK || self.cache.is_registered(b) {
                continue;
            }
            let hg = self.cache.hash_group_block(h, g as u32);
            if self.cache.find_group_block(hg, g as u32, id).is_none() {
                self.cache.insert_group_block(b, hg, g as u32, id);
            }
        }
        self.seqs[si].chain_hash = h;
        self.seqs[si].chain_id = id;
    }

    /// Returns the window groups' blocks that no query of the sequence can see any more.
    fn release_dead(&mut self, si: usize) {
        let computed = self.seqs[si].computed;
        for g in 0..self.groups.len() {
            if self.groups[g].window == 0 {
                continue;
            }
            let live = self.first_live_block(g, computed);
            let r = si * self.groups.len() + g;
            let row = self.row(si, g);
            for i in self.released[r] as usize..live {
                let b = std::mem::replace(&mut self.tables[row + i], NO_BLOCK);
                if b != NO_BLOCK {
                    self.release_ref(b);
                }
            }
            self.released[r] = self.released[r].max(live as u32);
        }
    }

    /// Frees a sequence (finished or preempted): releases its blocks (cached ones stay
    /// cached, deepest first on the LRU list), its state slot and its handle.
    pub fn free_sequence(&mut self, seq: SeqId) {
        let si = self.index(seq);
        let n = self.seqs[si].len.div_ceil(self.block_size);
        for i in (0..n).rev() {
            for g in 0..self.groups.len() {
                let e = self.row(si, g) + i;
                let b = std::mem::replace(&mut self.tables[e], NO_BLOCK);
                if b != NO_BLOCK {
                    self.release_ref(b);
                }
            }
        }
        let ng = self.groups.len();
        self.released[si * ng..(si + 1) * ng].fill(0);
        let s = &mut self.seqs[si];
        if s.state_slot != NO_BLOCK {
            self.free_state_slots.push(s.state_slot);
        }
        s.active = false;
        s.len = 0;
        s.computed = 0;
        s.state_slot = NO_BLOCK;
        s.restore = NO_BLOCK;
        s.snapshot_at = 0;
        s.generation = s.generation.wrapping_add(1);
        self.free_seqs.push(si as u32);
    }

    // ---- what the backend reads ---------------------------------------------------------

    /// The sequence's block table in `group`: `ceil(len / bs)` entries, entry `i` the
    /// block of positions `i*bs..(i+1)*bs`, [`NO_BLOCK`] where a window released it.
    pub fn block_table(&self, seq: SeqId, group: usize) -> &[u32] {
        let si = self.index(seq);
        let row = self.row(si, group);
        &self.tables[row..row + self.seqs[si].len.div_ceil(self.block_size)]
    }

    /// First entry of `block_table(seq, group)` that is not `NO_BLOCK` (0 for a global
    /// group): the first block a window group still holds.
    pub fn first_block(&self, seq: SeqId, group: usize) -> usize {
        let si = self.index(seq);
        self.released[si * self.groups.len() + group] as usize
    }

    /// The storage row of position `pos` in `group`: `block * block_size + pos % block_size`
    /// (what a K/V write uses). Panics if `pos` is not reserved or its block was released.
    pub fn slot(&self, seq: SeqId, group: usize, pos: usize) -> u32 {
        let si = self.index(seq);
        assert!(pos < self.seqs[si].len, "position {pos} not reserved");
        let b = self.tables[self.row(si, group) + pos / self.block_size];
        assert_ne!(b, NO_BLOCK, "position {pos} fell out of group {group}'s window");
        b * self.block_size as u32 + (pos % self.block_size) as u32
    }

    /// Every block table: `[max_seqs][n_groups][table_stride]`, row `SeqId::index`;
    /// entries past a sequence's length and of free rows are `NO_BLOCK`. A backend can
    /// mirror this to device memory as is.
    pub fn raw_tables(&self) -> &[u32] {
        &self.tables
    }

    // ---- blocks -------------------------------------------------------------------------

    /// Takes a block for writing: from the free list, else by evicting the least recently
    /// used unreferenced cached block. The caller checked `free_blocks() > 0`.
    fn alloc(&mut self) -> u32 {
        let b = match self.free_list.pop() {
            Some(b) => b,
            None => {
                self.stats.evictions += 1;
                self.cache.evict_oldest().expect("alloc with no free block")
            }
        };
        debug_assert_eq!(self.refcount[b as usize], 0);
        self.refcount[b as usize] = 1;
        self.used += 1;
        b
    }

    /// One more table holds a (cached) block.
    fn take_ref(&mut self, b: u32) {
        let r = &mut self.refcount[b as usize];
        if *r == 0 {
            self.cache.lru_remove(b);
            self.used += 1;
        }
        *r += 1;
    }

    /// One table fewer holds a block; at 0 it goes to the LRU list if cached, else to the
    /// free list.
    fn release_ref(&mut self, b: u32) {
        let r = &mut self.refcount[b as usize];
        debug_assert!(*r > 0);
        *r -= 1;
        if *r == 0 {
            self.used -= 1;
            if self.cache.is_registered(b) {
                self.cache.lru_push(b);
            } else {
                self.free_list.push(b);
            }
        }
    }

    // ---- checks -------------------------------------------------------------------------

    /// Panics unless every count, list and table agrees (allocates; for tests, and for a
    /// scheduler's debug builds).
    pub fn check_invariants(&self) {
        let (bs, ng) = (self.block_size, self.groups.len());
        let mut refs = vec![0u32; self.n_blocks];
        let mut group_of = vec![usize::MAX; self.n_blocks];
        let mut state_slots = vec![false; self.n_state_slots];
        for (si, s) in self.seqs.iter().enumerate() {
            let nb = s.len.div_ceil(bs);
            if !s.active {
                assert_eq!((s.len, s.computed, s.state_slot), (0, 0, NO_BLOCK), "free row {si}");
            }
            assert!(s.computed <= s.len && s.len <= self.max_seq_len, "seq {si} lengths");
            if self.n_state_slots > 0 && s.active {
                let slot = s.state_slot as usize;
                assert!(slot < self.n_state_slots && !state_slots[slot], "seq {si} state slot");
                state_slots[slot] = true;
            }
            for g in 0..ng {
                let row = &self.tables[self.row(si, g)..self.row(si, g) + self.stride];
                let lo = self.released[si * ng + g] as usize;
                assert_eq!(lo, self.first_live_block(g, s.computed), "seq {si} group {g} released");
                for (i, &b) in row.iter().enumerate() {
                    if i >= nb || i < lo {
                        assert_eq!(b, NO_BLOCK, "seq {si} group {g} entry {i} should be empty");
                        continue;
                    }
                    assert!((b as usize) < self.n_blocks, "seq {si} group {g} entry {i}: {b}");
                    refs[b as usize] += 1;
                    assert!(
                        group_of[b as usize] == usize::MAX || group_of[b as usize] == g,
                        "block {b} in two groups"
                    );
                    group_of[b as usize] = g;
                    if self.cache.is_registered(b) || self.refcount[b as usize] > 1 {
                        // Shared or shareable: full and written; nobody may write it.
                        assert!(self.cache.is_registered(b), "shared block {b} not cached");
                        assert!(
                            (i + 1) * bs <= s.computed,
                            "seq {si} holds cached block {b} not yet full"
                        );
                    }
                }
            }
        }
        assert_eq!(refs, self.refcount, "reference counts vs tables");
        let used = self.refcount.iter().filter(|&&r| r > 0).count();
        assert_eq!(used, self.used, "used count");
        let mut on_free = vec![false; self.n_blocks];
        for &b in &self.free_list {
            assert!(!on_free[b as usize], "block {b} twice on the free list");
            on_free[b as usize] = true;
            assert_eq!(self.refcount[b as usize], 0, "referenced block {b} on the free list");
            assert!(!self.cache.is_registered(b), "cached block {b} on the free list");
        }
        self.cache.check();
        for b in 0..self.n_blocks as u32 {
            let r = self.refcount[b as usize];
            assert_eq!(
                self.cache.in_lru(b),
                r == 0 && self.cache.is_registered(b),
                "block {b} LRU membership"
            );
        }
        assert_eq!(
            self.free_list.len() + self.cache.lru_len() + self.used,
            self.n_blocks,
            "block accounting"
        );
        assert_eq!(self.free_blocks(), self.n_blocks - used);
        assert_eq!(self.active_sequences(), self.seqs.iter().filter(|s| s.active).count());
        assert_eq!(
            self.free_state_slots.len() + state_slots.iter().filter(|&&x| x).count(),
            self.n_state_slots
        );
        if self.anchor.is_none() {
            assert_eq!(self.cache.registered_blocks(), 0);
        }
    }

    #[cfg(test)]
    pub(crate) fn set_hash_mask(&mut self, mask: u64) {
        self.cache.set_hash_mask(mask);
        self.root_hash &= mask;
    }
}
