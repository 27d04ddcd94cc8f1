//! Fault injection into the log's file I/O, for tests. Debug builds only.
//!
//! A full disk can be made for real (a small tmpfs), but a failing fsync
//! cannot, so the writer does its segment writes, fsyncs and rollback
//! truncations through [`Faults`]. In a release build every hook is the
//! plain call and nothing can arm a fault: `cfg(debug_assertions)` compiles
//! the switches out, so a production binary cannot be made to fail this
//! way. Debug builds (`cargo build`, and what `cargo test` builds, the
//! binary its end-to-end tests spawn included) arm faults two ways:
//!
//! - unit tests set them on an open log (`Faults::arm`);
//! - a process started with `ORDERFLOW_DEBUG_LOG_FAULTS=DIR` checks `DIR`
//!   before each operation: while `DIR/fsync` exists every segment fsync
//!   fails with an I/O error, while `DIR/write-enospc` exists every segment
//!   write writes half its bytes and then fails with "no space left".

use std::fs::File;
use std::io::{self, Write};

/// The environment variable naming the trigger directory (debug builds).
#[cfg(debug_assertions)]
const FAULTS_DIR_ENV: &str = "ORDERFLOW_DEBUG_LOG_FAULTS";

/// A fault the log's I/O can be made to suffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fault {
    /// fsync of a segment fails (EIO).
    Fsync = 0,
    /// A segment write stores half its bytes, then fails (ENOSPC).
    WriteEnospc = 1,
    /// Truncating a segment back after a failed write fails (EIO).
    Truncate = 2,
}

#[cfg(debug_assertions)]
impl Fault {
    fn trigger_file(self) -> &'static str {
        match self {
            Fault::Fsync => "fsync",
            Fault::WriteEnospc => "write-enospc",
            Fault::Truncate => "truncate",
        }
    }
}

/// The switches; see the module documentation.
#[derive(Default)]
pub(super) struct Faults {
    #[cfg(debug_assertions)]
    armed: [std::sync::atomic::AtomicBool; 3],
    #[cfg(debug_assertions)]
    trigger_dir: Option<std::path::PathBuf>,
}

impl Faults {
    /// The switches of a process: the trigger directory from the
    /// environment in a debug build, none in a release build.
    pub(super) fn from_env() -> Faults {
        #[cfg(debug_assertions)]
        {
            let trigger_dir = std::env::var_os(FAULTS_DIR_ENV).map(std::path::PathBuf::from);
            if let Some(dir) = &trigger_dir {
                tracing::warn!(dir = %dir.display(), "log fault injection enabled (debug build)");
            }
            Faults {
                trigger_dir,
                ..Faults::default()
            }
        }
        #[cfg(not(debug_assertions))]
        Faults::default()
    }

    /// Arms or disarms `fault` (unit tests).
    #[cfg(all(test, debug_assertions))]
    pub(super) fn arm(&self, fault: Fault, on: bool) {
        self.armed[fault as usize].store(on, std::sync::atomic::Ordering::SeqCst);
    }

    #[cfg(debug_assertions)]
    fn active(&self, fault: Fault) -> bool {
        self.armed[fault as usize].load(std::sync::atomic::Ordering::SeqCst)
            || self
                .trigger_dir
                .as_ref()
                .is_some_and(|dir| dir.join(fault.trigger_file()).exists())
    }

    #[cfg(not(debug_assertions))]
    #[inline(always)]
    fn active(&self, _: Fault) -> bool {
        false
    }

    pub(super) fn write_all(&self, file: &mut File, bytes: &[u8]) -> io::Result<()> {
        if self.active(Fault::WriteEnospc) {
            // Half, so the rollback has a torn frame to remove.
            file.write_all(&bytes[..bytes.len() / 2])?;
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "no space left on device (injected)",
            ));
        }
        file.write_all(bytes)
    }

    pub(super) fn sync_data(&self, file: &File) -> io::Result<()> {
        if self.active(Fault::Fsync) {
            return Err(io::Error::other("input/output error (injected)"));
        }
        file.sync_data()
    }

    pub(super) fn set_len(&self, file: &File, len: u64) -> io::Result<()> {
        if self.active(Fault::Truncate) {
            return Err(io::Error::other("input/output error (injected)"));
        }
        file.set_len(len)
    }
}
