//! The `orderflow` binary: see `orderflow::cli`.

fn main() -> std::process::ExitCode {
    orderflow::cli::main()
}
