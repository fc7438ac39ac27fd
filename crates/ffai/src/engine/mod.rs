//! The batched engine's building blocks (issue 12).

pub mod prefix_cache;
