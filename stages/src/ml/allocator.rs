//! How the process's allocator treats the tensors' buffers. burn's CPU backends allocate
//! a fresh buffer for nearly every op's result and free it soon after; glibc serves
//! buffers above its mmap threshold (128 KiB, raised dynamically up to 32 MiB) with
//! `mmap` and gives them back with `munmap`, so every such op touches new pages and
//! takes a page fault per 4 KiB. Measured on the train_speed example (2 threads, this
//! 2-core machine): 5.4 s of 33 s spent in the kernel predicting with the ViT at batch
//! 256; with buffers kept in the heap, 0.02 s, and prediction 183 -> 217 images/s, ViT
//! training 162 -> 185, CNN training 203 -> 210, peak RSS unchanged (75/150/126 MiB);
//! after the change the benchmark's prediction ran at 220 (`benches/train_speed`).
//!
//! The price: freed memory stays mapped to the process (up to 1 GiB at the top of the
//! heap) instead of going back to the OS between ops. A user who sets `GLIBC_TUNABLES`
//! chose their own settings, and they are left alone.

/// Serve buffers up to 256 MiB from the heap and keep up to 1 GiB of freed memory, on
/// glibc (elsewhere, nothing). Call once, early, before threads allocate.
pub fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        // SAFETY: mallopt only changes glibc's allocation thresholds; it is called before
        // other threads exist, and a refused value leaves the defaults in place. The trim
        // threshold only follows a fixed mmap threshold: set alone, it turns off glibc's
        // dynamic mmap threshold and every large buffer is mapped again (measured: ViT
        // training 162 -> 124 images/s).
        unsafe {
            if libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20) == 1 {
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        }
    }
}
