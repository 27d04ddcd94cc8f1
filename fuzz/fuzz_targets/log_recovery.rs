//! The embedded log's recovery over segment files holding arbitrary bytes
//! (what a crash, a torn write or a bad disk leaves): `EmbeddedLog::open`
//! scans, truncates a torn tail or refuses with an error; whatever it keeps
//! must read back in full, and appends must go on right after it.
//!
//! Input: `flags: u8 | rest`. Without bit 0, `rest` is the only segment.
//! With it, `rest` is `first_len: u32 LE | first segment | last segment`,
//! the last based where the first's valid frames end (one further with
//! bit 1: a gap, which open must refuse).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use orderflow::config::LogConfig;
use orderflow::pipeline::log::embedded::EmbeddedLog;
use orderflow::pipeline::log::embedded::segment::decode_frame;
use orderflow::pipeline::log::{Log, Record, RecordKind, Topic};
use orderflow::telemetry::metrics::Metrics;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

fn metrics() -> Arc<Metrics> {
    static METRICS: OnceLock<Arc<Metrics>> = OnceLock::new();
    METRICS.get_or_init(|| Arc::new(Metrics::new())).clone()
}

/// A directory of this process, in memory where the machine has one: every
/// input is written to disk and recovery truncates (and syncs) torn tails.
fn work_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        base.join(format!("orderflow-fuzz-log-recovery-{}", std::process::id()))
    })
}

fn valid_frames(mut bytes: &[u8]) -> u64 {
    let mut n = 0;
    while let Ok((_, used)) = decode_frame(bytes) {
        bytes = &bytes[used..];
        n += 1;
    }
    n
}

fn segments(data: &[u8]) -> Option<Vec<(u64, &[u8])>> {
    let (&flags, rest) = data.split_first()?;
    if flags & 1 == 0 {
        return Some(vec![(0, rest)]);
    }
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let len = (u32::from_le_bytes(*len) as usize).min(rest.len());
    let (first, last) = rest.split_at(len);
    let base = valid_frames(first) + u64::from(flags >> 1 & 1);
    Some(vec![(0, first), (base, last)])
}

fn config() -> LogConfig {
    LogConfig {
        segment_size_bytes: 1 << 20,
        retention_bytes: 1 << 30,
        max_record_bytes: 4096,
        append_queue_depth: 16,
        max_batch_records: 16,
        fsync: false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(segments) = segments(data) else {
        return;
    };
    let root = work_dir();
    let _ = std::fs::remove_dir_all(root);
    let partition_dir = root.join("orders").join("00000");
    std::fs::create_dir_all(&partition_dir).expect("create the partition dir");
    for (base, bytes) in &segments {
        std::fs::write(partition_dir.join(format!("{base:020}.seg")), bytes)
            .expect("write a segment");
    }
    let Ok(log) = EmbeddedLog::open(root, &[(Topic::Orders, 1)], &config(), metrics()) else {
        return;
    };
    runtime().block_on(async {
        let (low, high) = log.offsets(Topic::Orders, 0).await.expect("offsets of an open log");
        let mut next = low;
        while next < high {
            let records = log
                .read(Topic::Orders, 0, next, 64, Duration::ZERO)
                .await
                .expect("a recovered record reads back");
            assert!(!records.is_empty(), "no record at {next} below high {high}");
            for r in records {
                assert_eq!(r.offset, next);
                next += 1;
            }
        }
        let record = Record {
            kind: RecordKind::Internal,
            key: b"k".to_vec(),
            value: b"after recovery".to_vec(),
        };
        let at = log
            .append(Topic::Orders, 0, vec![record.clone()])
            .await
            .expect("append after recovery");
        assert_eq!(at, high);
        let back = log
            .read(Topic::Orders, 0, at, 1, Duration::ZERO)
            .await
            .expect("the appended record reads back");
        assert_eq!((back[0].kind, &back[0].key, &back[0].value), (record.kind, &record.key, &record.value));
        log.close().await;
    });
});
