//! ffai-kernels: the compute layer. Weight formats (`quant`), plain slice kernels
//! (`ops`), the backend seam (`backend`) and its CPU implementation (`cpu`) with a
//! persistent worker pool (`pool`). Nothing here knows what a model is.

pub mod backend;
pub mod cpu;
pub mod cuda;
pub mod ops;
pub mod pool;
pub mod quant;
pub mod ssm;
