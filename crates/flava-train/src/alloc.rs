//! The allocator setting the `flava` binary and the benchmarks make at start.
//!
//! [`tune_allocator`] keeps freed memory in glibc's heap for reuse instead of handing large blocks
//! back to the OS: every training step allocates the same few hundred MB of fresh tensors, and
//! without it each large one is a new `mmap`, zero-filled page by page on first touch, then
//! unmapped (measured in RESULTS.md). Binaries call it once at start; a library never does.

/// Makes glibc's malloc serve every allocation from its heap (no `mmap` per large block) and never
/// trim the heap, so that the buffers of one training step are reused by the next, as PyTorch's
/// CPU allocator effectively does. Process-wide; a no-op on other C libraries. Returns whether
/// both settings were taken.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
        let no_mmap = unsafe { libc::mallopt(libc::M_MMAP_MAX, 0) };
        // SAFETY: as above.
        let no_trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) };
        no_mmap == 1 && no_trim == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_takes_the_allocator_settings() {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        assert!(super::tune_allocator());
        #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
        assert!(!super::tune_allocator());
        // Still allocates and frees large blocks after the change.
        let v = vec![1u8; 64 << 20];
        assert_eq!(v.iter().map(|&b| b as usize).sum::<usize>(), 64 << 20);
    }
}
