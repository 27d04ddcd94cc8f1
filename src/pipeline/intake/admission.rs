//! Admission control: whether intake takes a new order now or sheds it
//! before it costs a log append (see the module documentation of
//! `pipeline::intake` for the limits and why they sit here).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::config::IntakeConfig;
use crate::pipeline::backlog::Backlog;
use crate::telemetry::metrics::Metrics;

/// The memory guard reads the resident set size at most this often: often
/// enough to stop a surge within a fraction of a second, rarely enough
/// that reading `/proc` never shows in a profile.
pub const RSS_READ_EVERY_MS: u64 = 100;

/// The limit that shed an order (`orderflow_intake_shed_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shed {
    /// `intake.max_inflight` orders were being taken already.
    Inflight,
    /// The order's partition was more than `intake.max_backlog_records` behind.
    Backlog,
    /// The process was above `intake.max_rss_bytes`.
    Memory,
    /// The order's partition runner died and is not running again yet.
    Down,
}

impl Shed {
    pub fn as_str(self) -> &'static str {
        match self {
            Shed::Inflight => "inflight",
            Shed::Backlog => "backlog",
            Shed::Memory => "memory",
            Shed::Down => "partition_down",
        }
    }
}

/// The resident set size of this process, from `/proc/self/statm` (Linux);
/// `None` where it cannot be read.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok().filter(|p| *p > 0)?)
}

/// Sheds new orders while the process is above its memory bound. The
/// reading is refreshed by whichever order comes once it is older than
/// [`RSS_READ_EVERY_MS`], so an idle process reads nothing.
pub(super) struct MemoryGuard {
    max_rss_bytes: u64,
    started: Instant,
    next_read_ms: AtomicU64,
    over: AtomicBool,
    gauge: prometheus::IntGauge,
}

impl MemoryGuard {
    fn new(max_rss_bytes: u64, gauge: prometheus::IntGauge) -> MemoryGuard {
        if max_rss_bytes > 0 && resident_bytes().is_none() {
            tracing::warn!(
                "`intake.max_rss_bytes` is set but /proc/self/statm is unreadable here: no memory bound applies"
            );
        }
        MemoryGuard {
            max_rss_bytes,
            started: Instant::now(),
            next_read_ms: AtomicU64::new(0),
            over: AtomicBool::new(false),
            gauge,
        }
    }

    pub(super) fn over(&self) -> bool {
        if self.max_rss_bytes == 0 {
            return false;
        }
        let now = self.started.elapsed().as_millis() as u64;
        let due = self.next_read_ms.load(Ordering::Relaxed);
        // One reader per period: the others use the last reading.
        if now >= due
            && self
                .next_read_ms
                .compare_exchange(
                    due,
                    now + RSS_READ_EVERY_MS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
            && let Some(rss) = resident_bytes()
        {
            self.gauge.set(i64::try_from(rss).unwrap_or(i64::MAX));
            self.over.store(rss > self.max_rss_bytes, Ordering::Relaxed);
        }
        self.over.load(Ordering::Relaxed)
    }
}

/// Intake's limits; see the module documentation.
pub(super) struct Admission {
    pub(super) inflight: Semaphore,
    pub(super) max_backlog_records: u64,
    /// `None`: nothing reports partition progress (intake alone, in tests).
    pub(super) backlog: Option<Arc<Backlog>>,
    pub(super) memory: MemoryGuard,
}

impl Admission {
    pub(super) fn new(
        config: &IntakeConfig,
        backlog: Option<Arc<Backlog>>,
        metrics: &Metrics,
    ) -> Admission {
        Admission {
            inflight: Semaphore::new(config.max_inflight),
            max_backlog_records: config.max_backlog_records,
            backlog,
            memory: MemoryGuard::new(config.max_rss_bytes, metrics.process_resident_bytes.clone()),
        }
    }
}

/// An order being taken: holds its `intake.max_inflight` slot.
pub(super) struct Taking<'a> {
    pub(super) _permit: SemaphorePermit<'a>,
    pub(super) gauge: &'a prometheus::IntGauge,
}

impl Drop for Taking<'_> {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}
