//! Content addressing of full KV blocks: the index behind prefix caching.
//!
//! This file holds the *index* only: which block holds which content, the hash table that
//! finds it, and the least-recently-used list of cached blocks nobody references. The
//! reference counts, the free list and the decision of when to register, share or evict a
//! block live in [`KvPool`](super::KvPool), so all block ownership is in one place.
//!
//! # Keys
//!
//! One group of the pool is the *anchor* (the first global group, `window == 0`). Its
//! blocks carry the token chain:
//!
//! * An anchor block `i` of a sequence holds the K/V of positions `i*bs..(i+1)*bs`, which
//!   depend on *every* token `0..(i+1)*bs`. Its key is `(parent, tokens)`: `parent` is the
//!   *prefix id* of the content of block `i - 1` (0 for the first block) and `tokens` are
//!   the block's own `bs` token ids. Registering it gives the content a fresh prefix id, a
//!   `u64` from a counter that never repeats. By induction a prefix id names exactly one
//!   token prefix, so matching `(parent, tokens)` exactly — not the hash — is what decides
//!   a hit: a hash collision can cost a comparison, never a wrong block.
//! * A block `i` of any other group `g` (a sliding-window group, or a second global group)
//!   holds the same positions computed by other layers. Its key is `(g, prefix id of
//!   anchor block i)`; the anchor already pins the tokens, so no tokens are stored for it.
//!
//! A prefix id outlives nothing: when its block is evicted the id is gone, and entries
//! keyed under it (its children, the same positions of other groups) can no longer be
//! reached by a lookup. They stay in the index, unreachable but harmless, until they are
//! evicted in turn (they are free, so the pool can still take them at any time).
//!
//! # Hash
//!
//! The hash only picks a bucket and filters candidates before the exact comparison. It is
//! chained as issue 12 asks: `hash(block i) = H(hash(block i-1), tokens of block i)`,
//! seeded by the model fingerprint, so the hash of a block names the whole prefix up to
//! its end (useful beyond this index, e.g. for logs or a cache shared between processes).
//! `H` is a small multiply–fold mix written here (each step multiplies two 64-bit words to
//! 128 bits and folds the halves with xor); it is deterministic across runs and platforms.
//! Hash tables use chaining through a per-block `next` link, so the index never allocates
//! after construction.

/// "No block": the end of an intrusive list, an empty bucket.
pub(crate) const NIL: u32 = u32::MAX;

const K0: u64 = 0x9E37_79B9_7F4A_7C15;
const K1: u64 = 0xD6E8_FEB8_6659_FD93;
const K2: u64 = 0xA076_1D64_78BD_642F;
const K3: u64 = 0xE703_7ED1_A0B4_28DB;

/// Multiplies to 128 bits and xors the halves: the mixing step of [`block_hash`].
#[inline]
fn fold_mul(a: u64, b: u64) -> u64 {
    let p = (a as u128) * (b as u128);
    (p as u64) ^ ((p >> 64) as u64)
}

/// The chain's starting value for a model: the "hash of block -1".
pub fn root_hash(model_fingerprint: u64) -> u64 {
    fold_mul(model_fingerprint ^ K2, K3)
}

/// The hash of a block whose predecessor hashes to `parent` and whose own tokens are
/// `tokens` (chained: it depends on every token from position 0 to the block's end).
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = parent;
    let mut pairs = tokens.chunks_exact(2);
    for p in &mut pairs {
        let x = p[0] as u64 | (p[1] as u64) << 32;
        h = fold_mul(x ^ K1, h ^ K0);
    }
    if let [t] = pairs.remainder() {
        h = fold_mul(*t as u64 ^ K2, h ^ K0);
    }
    fold_mul(h ^ tokens.len() as u64, K3)
}

/// The hash under which group `group`'s block at the same positions as an anchor block
/// hashing to `anchor_hash` is filed.
pub fn group_block_hash(anchor_hash: u64, group: u32) -> u64 {
    fold_mul(anchor_hash ^ K1, (group as u64 + 1) ^ K3)
}

/// One block's entry in the index.
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// Whether the block is in the index at all.
    registered: bool,
    /// The group the block belongs to.
    group: u32,
    /// Anchor blocks: the prefix id of the preceding block's content (0 = none).
    /// Other groups: the prefix id of the anchor block at the same positions.
    link: u64,
    /// Anchor blocks: the prefix id naming this block's content. Others: 0.
    prefix_id: u64,
    /// The (masked) hash that picked the bucket.
    hash: u64,
}

const EMPTY: Entry = Entry {
    registered: false,
    group: 0,
    link: 0,
    prefix_id: 0,
    hash: 0,
};

/// The index of cached blocks, sized once for `n_blocks` blocks of `block_size` tokens.
#[derive(Debug)]
pub struct PrefixCache {
    block_size: usize,
    anchor_group: u32,
    entries: Vec<Entry>,
    /// `n_blocks * block_size` token ids: the own tokens of each registered anchor block.
    tokens: Vec<u32>,
    buckets: Vec<u32>,
    bucket_mask: u64,
    next_in_bucket: Vec<u32>,
    lru_prev: Vec<u32>,
    lru_next: Vec<u32>,
    /// Least recently used (evicted first).
    lru_head: u32,
    /// Most recently used.
    lru_tail: u32,
    lru_len: usize,
    registered: usize,
    next_prefix_id: u64,
    /// Applied to every hash; `u64::MAX` except in tests that force collisions.
    hash_mask: u64,
}

impl PrefixCache {
    pub fn new(n_blocks: usize, block_size: usize, anchor_group: u32) -> Self {
        let n_buckets = n_blocks.next_power_of_two().max(1);
        PrefixCache {
            block_size,
            anchor_group,
            entries: vec![EMPTY; n_blocks],
            tokens: vec![0; n_blocks * block_size],
            buckets: vec![NIL; n_buckets],
            bucket_mask: n_buckets as u64 - 1,
            next_in_bucket: vec![NIL; n_blocks],
            lru_prev: vec![NIL; n_blocks],
            lru_next: vec![NIL; n_blocks],
            lru_head: NIL,
            lru_tail: NIL,
            lru_len: 0,
            registered: 0,
            next_prefix_id: 1,
            hash_mask: u64::MAX,
        }
    }

    /// Test hook: mask every hash (e.g. with 0 so every block collides). Only while empty.
    #[cfg(test)]
    pub(crate) fn set_hash_mask(&mut self, mask: u64) {
        assert_eq!(self.registered, 0, "set the hash mask before anything is cached");
        self.hash_mask = mask;
    }

    pub fn anchor_group(&self) -> u32 {
        self.anchor_group
    }

    /// [`block_hash`] under the test mask.
    pub fn hash_block(&self, parent: u64, tokens: &[u32]) -> u64 {
        block_hash(parent, tokens) & self.hash_mask
    }

    /// [`group_block_hash`] under the test mask.
    pub fn hash_group_block(&self, anchor_hash: u64, group: u32) -> u64 {
        group_block_hash(anchor_hash, group) & self.hash_mask
    }

    pub fn is_registered(&self, block: u32) -> bool {
        self.entries[block as usize].registered
    }

    /// The prefix id of a registered anchor block.
    pub fn prefix_id(&self, block: u32) -> u64 {
        let e = &self.entries[block as usize];
        debug_assert!(e.registered && e.group == self.anchor_group);
        e.prefix_id
    }

    /// The chained hash of a registered block.
    pub fn hash(&self, block: u32) -> u64 {
        debug_assert!(self.entries[block as usize].registered);
        self.entries[block as usize].hash
    }

    /// Blocks in the index, referenced or not.
    pub fn registered_blocks(&self) -> usize {
        self.registered
    }

    fn block_tokens(&self, block: u32) -> &[u32] {
        let b = block as usize * self.block_size;
        &self.tokens[b..b + self.block_size]
    }

    fn bucket(&self, hash: u64) -> usize {
        (hash & self.bucket_mask) as usize
    }

    /// The registered anchor block with content `(parent, tokens)`, if any.
    pub fn find_anchor(&self, hash: u64, parent: u64, tokens: &[u32]) -> Option<u32> {
        let mut b = self.buckets[self.bucket(hash)];
        while b != NIL {
            let e = &self.entries[b as usize];
            if e.hash == hash && e.group == self.anchor_group && e.link == parent && self.block_tokens(b) == tokens {
                return Some(b);
            }
            b = self.next_in_bucket[b as usize];
        }
        None
    }

    /// The registered block of `group` at the positions of the anchor content `anchor_id`.
    pub fn find_group_block(&self, hash: u64, group: u32, anchor_id: u64) -> Option<u32> {
        debug_assert_ne!(group, self.anchor_group);
        let mut b = self.buckets[self.bucket(hash)];
        while b != NIL {
            let e = &self.entries[b as usize];
            if e.hash == hash && e.group == group && e.link == anchor_id {
                return Some(b);
            }
            b = self.next_in_bucket[b as usize];
        }
        None
    }

    fn link_into_bucket(&mut self, block: u32, hash: u64) {
        let k = self.bucket(hash);
        self.next_in_bucket[block as usize] = self.buckets[k];
        self.buckets[k] = block;
        self.registered += 1;
    }

    /// Registers an anchor block (which must not be registered, and whose content must
    /// not be: check with [`find_anchor`](Self::find_anchor) first). Returns its new
    /// prefix id.
    pub fn insert_anchor(&mut self, block: u32, hash: u64, parent: u64, tokens: &[u32]) -> u64 {
        debug_assert!(!self.is_registered(block));
        debug_assert!(self.find_anchor(hash, parent, tokens).is_none());
        let id = self.next_prefix_id;
        self.next_prefix_id += 1;
        self.entries[block as usize] = Entry {
            registered: true,
            group: self.anchor_group,
            link: parent,
            prefix_id: id,
            hash,
        };
        let b = block as usize * self.block_size;
        self.tokens[b..b + self.block_size].copy_from_slice(tokens);
        self.link_into_bucket(block, hash);
        id
    }

    /// Registers a non-anchor block (same preconditions as `insert_anchor`).
    pub fn insert_group_block(&mut self, block: u32, hash: u64, group: u32, anchor_id: u64) {
        debug_assert!(!self.is_registered(block));
        debug_assert!(self.find_group_block(hash, group, anchor_id).is_none());
        self.entries[block as usize] = Entry {
            registered: true,
            group,
            link: anchor_id,
            prefix_id: 0,
            hash,
        };
        self.link_into_bucket(block, hash);
    }

    /// Takes a block out of the index (it must be registered and not on the LRU list).
    pub fn remove(&mut self, block: u32) {
        debug_assert!(self.is_registered(block));
        let k = self.bucket(self.entries[block as usize].hash);
        let next = self.next_in_bucket[block as usize];
        if self.buckets[k] == block {
            self.buckets[k] = next;
        } else {
            let mut b = self.buckets[k];
            while self.next_in_bucket[b as usize] != block {
                b = self.next_in_bucket[b as usize];
                debug_assert_ne!(b, NIL, "registered block missing from its bucket");
            }
            self.next_in_bucket[b as usize] = next;
        }
        self.next_in_bucket[block as usize] = NIL;
        self.entries[block as usize] = EMPTY;
        self.registered -= 1;
    }

    /// Cached blocks that nobody references (the LRU list).
    pub fn lru_len(&self) -> usize {
        self.lru_len
    }

    /// Appends a block as the most recently used.
    pub fn lru_push(&mut self, block: u32) {
        let i = block as usize;
        debug_assert!(self.lru_prev[i] == NIL && self.lru_next[i] == NIL && self.lru_head != block);
        self.lru_prev[i] = self.lru_tail;
        self.lru_next[i] = NIL;
        if self.lru_tail == NIL {
            self.lru_head = block;
        } else {
            self.lru_next[self.lru_tail as usize] = block;
        }
        self.lru_tail = block;
        self.lru_len += 1;
    }

    /// Takes a block off the LRU list (it is referenced again).
    pub fn lru_remove(&mut self, block: u32) {
        let i = block as usize;
        let (p, n) = (self.lru_prev[i], self.lru_next[i]);
        if p == NIL {
            debug_assert_eq!(self.lru_head, block);
            self.lru_head = n;
        } else {
            self.lru_next[p as usize] = n;
        }
        if n == NIL {
            debug_assert_eq!(self.lru_tail, block);
            self.lru_tail = p;
        } else {
            self.lru_prev[n as usize] = p;
        }
        self.lru_prev[i] = NIL;
        self.lru_next[i] = NIL;
        self.lru_len -= 1;
    }

    /// Takes the least recently used block off the list and out of the index.
    pub fn evict_oldest(&mut self) -> Option<u32> {
        let b = self.lru_head;
        if b == NIL {
            return None;
        }
        self.lru_remove(b);
        self.remove(b);
        Some(b)
    }

    /// The LRU list, least recently used first (for checks and tests; allocates).
    pub fn lru_order(&self) -> Vec<u32> {
        let mut v = Vec::with_capacity(self.lru_len);
        let mut b = self.lru_head;
        while b != NIL {
            v.push(b);
            b = self.lru_next[b as usize];
        }
        v
    }

    /// Panics unless the buckets, counts and LRU links agree (for tests; allocates).
    pub fn check(&self) {
        let n = self.entries.len();
        let mut seen = vec![false; n];
        let mut count = 0;
        for (k, &head) in self.buckets.iter().enumerate() {
            let mut b = head;
            while b != NIL {
                assert!(!seen[b as usize], "block {b} twice in the index");
                seen[b as usize] = true;
                let e = &self.entries[b as usize];
                assert!(e.registered, "unregistered block {b} in a bucket");
                assert_eq!(self.bucket(e.hash), k, "block {b} in the wrong bucket");
                count += 1;
                b = self.next_in_bucket[b as usize];
            }
        }
        assert_eq!(count, self.registered, "registered count");
        for (b, e) in self.entries.iter().enumerate() {
            assert_eq!(e.registered, seen[b], "block {b} registered flag vs buckets");
        }
        let order = self.lru_order();
        assert_eq!(order.len(), self.lru_len, "LRU length");
        let mut prev = NIL;
        for &b in &order {
            assert!(
                self.entries[b as usize].registered,
                "uncached block {b} on the LRU list"
            );
            assert_eq!(self.lru_prev[b as usize], prev, "LRU back link of {b}");
            prev = b;
        }
        assert_eq!(self.lru_tail, prev, "LRU tail");
    }

    /// Whether `block` is on the LRU list.
    pub fn in_lru(&self, block: u32) -> bool {
        let i = block as usize;
        self.lru_prev[i] != NIL || self.lru_next[i] != NIL || self.lru_head == block
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_chained_and_deterministic() {
        let r = root_hash(7);
        assert_eq!(r, root_hash(7));
        assert_ne!(r, root_hash(8), "the model fingerprint seeds the chain");
        let a = block_hash(r, &[1, 2, 3, 4]);
        assert_eq!(a, block_hash(r, &[1, 2, 3, 4]));
        assert_ne!(a, block_hash(r, &[1, 2, 4, 3]), "order matters");
        assert_ne!(a, block_hash(r, &[1, 2, 3]), "length matters");
        assert_ne!(a, block_hash(root_hash(8), &[1, 2, 3, 4]), "the parent matters");
        let b = block_hash(a, &[5, 6, 7, 8]);
        assert_ne!(b, block_hash(block_hash(r, &[1, 2, 3, 5]), &[5, 6, 7, 8]), "chained");
        assert_ne!(group_block_hash(a, 1), group_block_hash(a, 2));
        // Pinned values (computed independently): the hash must not change between runs,
        // builds or platforms.
        assert_eq!(block_hash(root_hash(0), &[1, 2, 3]), 0xb996_176a_0243_89de);
        assert_eq!(
            block_hash(block_hash(root_hash(7), &[1, 2, 3, 4]), &[5, 6, 7, 8]),
            0xd45a_c11b_dc0c_64a4
        );
    }

    #[test]
    fn hash_spreads_small_inputs() {
        // Every 2-token block over a 64-token vocabulary: no collisions in 64 bits, and the
        // low bits (the bucket) spread evenly.
        let r = root_hash(0);
        let mut seen = std::collections::HashSet::new();
        let mut low = [0usize; 16];
        for a in 0..64 {
            for b in 0..64 {
                let h = block_hash(r, &[a, b]);
                assert!(seen.insert(h));
                low[(h & 15) as usize] += 1;
            }
        }
        for &c in &low {
            assert!((192..=320).contains(&c), "bucket spread {low:?}");
        }
    }

    #[test]
    fn insert_find_remove_and_lru() {
        let mut c = PrefixCache::new(8, 2, 0);
        c.set_hash_mask(0); // everything in one bucket: lookups rely on the exact keys
        let h = c.hash_block(0, &[1, 2]);
        let id0 = c.insert_anchor(3, h, 0, &[1, 2]);
        let id1 = c.insert_anchor(5, h, id0, &[1, 2]);
        assert_ne!(id0, id1);
        assert_eq!(c.find_anchor(h, 0, &[1, 2]), Some(3));
        assert_eq!(c.find_anchor(h, id0, &[1, 2]), Some(5));
        assert_eq!(c.find_anchor(h, 0, &[2, 1]), None);
        assert_eq!(c.find_anchor(h, id1, &[1, 2]), None);
        c.insert_group_block(6, h, 1, id0);
        assert_eq!(c.find_group_block(h, 1, id0), Some(6));
        assert_eq!(c.find_group_block(h, 1, id1), None);
        assert_eq!(c.find_group_block(h, 2, id0), None);
        c.check();
        for b in [5, 3, 6] {
            c.lru_push(b);
        }
        c.lru_remove(3);
        assert_eq!(c.lru_order(), vec![5, 6]);
        c.check();
        assert_eq!(c.evict_oldest(), Some(5));
        assert!(!c.is_registered(5));
        assert_eq!(c.find_anchor(h, id0, &[1, 2]), None);
        assert_eq!(c.registered_blocks(), 2);
        c.remove(3);
        c.check();
        assert_eq!(c.evict_oldest(), Some(6));
        assert_eq!(c.evict_oldest(), None);
        assert_eq!(c.registered_blocks(), 0);
        c.check();
    }
}
