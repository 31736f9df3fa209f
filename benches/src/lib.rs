//! Shared helpers for the criterion benches live here.
