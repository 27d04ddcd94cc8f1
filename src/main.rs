//! The `orderflow` binary: see `orderflow::cli`.

/// mimalloc: the pipeline allocates many small, short-lived buffers per
/// order across threads, where glibc's malloc showed as a third of all CPU
/// time in the benchmark profile (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    orderflow::cli::main()
}
