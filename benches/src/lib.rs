//! Shared pieces of the benchmarks: the synthetic inputs that the criterion benches, the
//! `flava-bench` timer and `compare_pytorch.py` all use, and the training step they time.

pub mod inputs;
pub mod step;
