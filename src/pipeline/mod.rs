//! The pipeline: the log and state-store traits with their backends, the
//! partition runner that drives the pure processor, checkpoints, the effect
//! executor and intake.

pub mod backlog;
pub mod effects;
pub mod intake;
pub mod inventory;
pub mod log;
pub mod membership;
pub mod parked;
pub mod restart;
pub mod runner;
pub mod sink;
pub mod store;
pub mod supervisor;
pub mod tokens;

/// Whether an I/O error means the disk (or the user's quota) is full: a
/// condition that passes once space is freed, unlike other I/O errors.
pub(crate) fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}
