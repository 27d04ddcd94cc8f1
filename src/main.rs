//! The `orderflow` binary: see `orderflow::cli`.

/// mimalloc: the pipeline allocates many small, short-lived buffers per
/// order across threads, where glibc's malloc showed as a third of all CPU
/// time in the benchmark profile (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    refuse_huge_pages();
    orderflow::cli::main()
}

/// Transparent huge pages off for this process. mimalloc asks for them on
/// its arenas, and the first touch of each 2 MiB page has the kernel zero
/// all of it on the thread that touched it. Checkpoints allocate large
/// buffers every second, which mimalloc returns to the system in between,
/// so the zeroing recurred on the hot path: with huge pages off, p99 at
/// 5,000 orders/s fell from 70–80 ms to 19–34 ms and peak RSS from 330 to
/// 180 MiB (BENCHMARKS.md). Best effort: a kernel without the flag keeps
/// its behaviour.
fn refuse_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and touches
    // no memory of this process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
