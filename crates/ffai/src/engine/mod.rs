//! The batched engine (issue 12): many sequences in one forward step over a paged KV cache.
//!
//! - [`kv_pool`]: the bookkeeping of the paged cache. [`KvPool`] hands out fixed-size
//!   blocks of one pool allocated once, keeps one block table per sequence and KV group
//!   (global or sliding-window layers), shares full blocks between sequences through the
//!   [`prefix_cache`], and gives each sequence a recurrent-state slot when the model has one.
//!   It owns no tensor memory: the model's [`BatchState`](crate::models::BatchState) holds
//!   the K/V pools and reads the block tables through each step's layout.
//! - [`scheduler`]: continuous batching. [`Scheduler`] admits, plans (decode rows plus
//!   prefill chunks within a token budget), preempts, lays out, runs
//!   [`forward_batch`](crate::models::LanguageModel::forward_batch), samples per sequence
//!   and retires; synchronous, for `ffai batch` and `bench --sequences`.
//! - [`service`]: [`Engine`], a scheduler on its own thread behind a thread-safe
//!   submit / stream / cancel API (what a server sits on).

pub mod kv_pool;
pub mod prefix_cache;
pub mod scheduler;
pub mod service;
#[cfg(test)]
mod tests;

pub use kv_pool::{AdmitError, AppendError, GroupSpec, KvPool, KvPoolConfig, PoolStats, PrefixHit, SeqId, NO_BLOCK};
pub use scheduler::{
    check_request, Completion, EngineConfig, Event, FinishReason, KvCacheSize, Scheduler, SchedulerStats, SeqRequest,
};
pub use service::{Engine, EngineStats, RequestHandle};

/// Most sequences one engine runs at once.
pub const MAX_SEQUENCES: usize = 4096;
/// Most token rows in one step.
pub const MAX_BATCH_TOKENS: usize = 1 << 16;
