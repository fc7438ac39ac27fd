//! The batched engine's building blocks (issue 12). So far the bookkeeping layer of the
//! paged KV cache: [`KvPool`] hands out fixed-size blocks of one pool allocated once, keeps
//! one block table per sequence and KV group (global or sliding-window layers), shares
//! full blocks between sequences through the [`prefix_cache`], and gives each sequence a
//! recurrent-state slot when the model has one. It owns no tensor memory: the backend
//! allocates `n_blocks * block_size` K/V rows per layer and reads the block tables (flat
//! `u32` slices) this module maintains. A continuous-batching scheduler drives it: admit
//! with [`KvPool::add_sequence_with_prompt`], reserve each step's rows with
//! [`KvPool::append`] (all or nothing; on failure preempt someone with
//! [`KvPool::free_sequence`]), report written rows with [`KvPool::commit`].

pub mod kv_pool;
pub mod prefix_cache;
#[cfg(test)]
mod tests;

pub use kv_pool::{AdmitError, AppendError, GroupSpec, KvPool, KvPoolConfig, PoolStats, PrefixHit, SeqId, NO_BLOCK};
