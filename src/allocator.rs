//! The process's memory allocator, set up for training loops.
//!
//! libtorch allocates CPU tensors with malloc. Under glibc's defaults a training step's multi-megabyte
//! activations are either mmap'ed and unmapped on every free, or freed to the top of the heap, which is then
//! trimmed: the next step page-faults and zero-fills the same memory again. `perf` showed the kernel's page
//! fault and page clearing paths at ≈9 % of a step's CPU time. Raising glibc's mmap and trim thresholds keeps
//! freed memory in the heap, where the next step reuses it; peak RSS does not change, since every step needs
//! the same memory again. `lisa bench` measured the step 7–10 % faster, ours and the PyTorch reference's alike.

/// Allocations at or above this many bytes are mmap'ed (32 MiB, glibc's ceiling on 64-bit systems; glibc's
/// default starts at 128 KiB).
pub const MMAP_THRESHOLD_BYTES: i32 = 32 << 20;
/// Free memory at the top of the heap is returned to the kernel only beyond this many bytes (glibc: 128 KiB).
pub const TRIM_THRESHOLD_BYTES: i32 = i32::MAX;

/// The same settings as a `GLIBC_TUNABLES` value, for child processes (the benchmark's reference).
pub fn glibc_tunables() -> String {
    format!("glibc.malloc.mmap_threshold={MMAP_THRESHOLD_BYTES}:glibc.malloc.trim_threshold={TRIM_THRESHOLD_BYTES}")
}

/// The `GLIBC_TUNABLES` a child process should run under: the user's own if they set one, else ours.
pub fn glibc_tunables_for_children() -> String {
    std::env::var("GLIBC_TUNABLES").unwrap_or_else(|_| glibc_tunables())
}

/// Applies the thresholds to this process; `true` when the allocator took them (glibc), `false` where
/// there is no glibc malloc to tune (the settings are then the platform's own).
pub fn keep_freed_memory_for_reuse() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc's <malloc.h>.
        const M_TRIM_THRESHOLD: std::os::raw::c_int = -1;
        const M_MMAP_THRESHOLD: std::os::raw::c_int = -3;
        extern "C" {
            fn mallopt(param: std::os::raw::c_int, value: std::os::raw::c_int) -> std::os::raw::c_int;
        }
        // SAFETY: mallopt only changes allocator parameters; it returns 1 on success and 0 on a bad value.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 && mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_takes_the_thresholds_and_the_tunables_name_them() {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        assert!(keep_freed_memory_for_reuse(), "glibc refused the mmap or trim threshold");
        // Tensors still work after the change, and the child-process form carries the same numbers.
        let t = tch::Tensor::ones([1 << 22], (tch::Kind::Float, tch::Device::Cpu));
        assert_eq!(t.sum(tch::Kind::Float).double_value(&[]), (1 << 22) as f64);
        let s = glibc_tunables();
        assert!(s.contains("mmap_threshold=33554432") && s.contains("trim_threshold=2147483647"), "{s}");
    }
}
