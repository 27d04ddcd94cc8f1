//! Crash recovery of the embedded log's segment files: a torn tail is
//! truncated, damage anywhere else refuses to open.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use orderflow::config::LogConfig;
use orderflow::pipeline::log::embedded::EmbeddedLog;
use orderflow::pipeline::log::{Log, LogError, Record, RecordKind, Topic};
use orderflow::telemetry::metrics::Metrics;

/// Frame of `record(i)`: header 8 + payload header 11 + key 1 + value 10.
const FRAME_BYTES: u64 = 30;

fn config(segment_size_bytes: u64) -> LogConfig {
    LogConfig {
        segment_size_bytes,
        max_record_bytes: 1024,
        ..LogConfig::default()
    }
}

fn open(dir: &Path, config: &LogConfig) -> Result<EmbeddedLog, LogError> {
    EmbeddedLog::open(dir, &[(Topic::Orders, 2)], config, Arc::new(Metrics::new()))
}

fn record(i: u64) -> Record {
    Record {
        kind: RecordKind::OrderJson,
        key: b"k".to_vec(),
        value: format!("{i:010}").into_bytes(),
    }
}

/// Writes `n` records to partition 0, one append each, and closes the log.
async fn write_records(dir: &Path, config: &LogConfig, n: u64) {
    let log = open(dir, config).unwrap();
    for i in 0..n {
        assert_eq!(
            log.append(Topic::Orders, 0, vec![record(i)]).await.unwrap(),
            i
        );
    }
    log.close().await;
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("orders").join("00000"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// Reads partition 0 from 0 to its high-watermark and checks every record.
async fn assert_intact(log: &EmbeddedLog, expected: u64) {
    assert_eq!(log.offsets(Topic::Orders, 0).await.unwrap(), (0, expected));
    let mut next = 0;
    while next < expected {
        let batch = log
            .read(Topic::Orders, 0, next, 16, Duration::ZERO)
            .await
            .unwrap();
        assert!(!batch.is_empty());
        for r in batch {
            assert_eq!(
                (r.offset, r.key.as_slice(), r.value),
                (next, &b"k"[..], record(next).value)
            );
            next += 1;
        }
    }
}

fn append_bytes(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(bytes).unwrap();
}

fn flip_byte(path: &Path, position: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[position as usize] ^= 0x55;
    std::fs::write(path, bytes).unwrap();
}

/// Bytes chopped off the end of the last segment: reopen drops only the cut
/// record, and the next append takes its offset.
#[tokio::test]
async fn torn_tail_chopped_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(1 << 20);
    write_records(dir.path(), &config, 50).await;
    let last = segments(dir.path()).pop().unwrap();
    let len = std::fs::metadata(&last).unwrap().len();
    assert_eq!(len, 50 * FRAME_BYTES);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .unwrap()
        .set_len(len - 3)
        .unwrap();

    let log = open(dir.path(), &config).unwrap();
    assert_intact(&log, 49).await;
    assert_eq!(
        std::fs::metadata(&last).unwrap().len(),
        49 * FRAME_BYTES,
        "truncated to the last whole record"
    );
    assert_eq!(
        log.append(Topic::Orders, 0, vec![record(49)])
            .await
            .unwrap(),
        49
    );
    assert_intact(&log, 50).await;
    log.close().await;
    assert_intact(&open(dir.path(), &config).unwrap(), 50).await;
}

/// Half a frame (or zeros) appended after the last record: dropped on
/// reopen, every record kept, appends continue at the right offset.
#[tokio::test]
async fn torn_tail_garbage_half_frame_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(1 << 20);
    write_records(dir.path(), &config, 50).await;
    let last = segments(dir.path()).pop().unwrap();

    // A frame header announcing 100 bytes, then only 20 of them.
    let mut half_frame = Vec::new();
    half_frame.extend_from_slice(&100u32.to_le_bytes());
    half_frame.extend_from_slice(&0xDEAD_BEEFu32.to_le_bytes());
    half_frame.extend_from_slice(&[0xAB; 20]);
    append_bytes(&last, &half_frame);
    let log = open(dir.path(), &config).unwrap();
    assert_intact(&log, 50).await;
    assert_eq!(
        log.append(Topic::Orders, 0, vec![record(50)])
            .await
            .unwrap(),
        50
    );
    log.close().await;

    // Zeros a file system may leave after a crash.
    append_bytes(&last, &[0; 4096]);
    let log = open(dir.path(), &config).unwrap();
    assert_intact(&log, 51).await;

    // A whole frame with a bad checksum, the last thing in the file.
    log.close().await;
    let mut bad_crc = std::fs::read(&last).unwrap()[..FRAME_BYTES as usize].to_vec();
    bad_crc[4] ^= 1;
    append_bytes(&last, &bad_crc);
    let log = open(dir.path(), &config).unwrap();
    assert_intact(&log, 51).await;
    assert_eq!(
        log.append(Topic::Orders, 0, vec![record(51)])
            .await
            .unwrap(),
        51
    );
}

/// With several segments only the last one is repaired; earlier ones are read as they are.
#[tokio::test]
async fn torn_tail_in_last_of_many_segments() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(10 * FRAME_BYTES);
    write_records(dir.path(), &config, 95).await;
    let files = segments(dir.path());
    assert_eq!(files.len(), 10);
    let last = files.last().unwrap();
    let len = std::fs::metadata(last).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(last)
        .unwrap()
        .set_len(len - FRAME_BYTES - 1)
        .unwrap();

    let log = open(dir.path(), &config).unwrap();
    assert_intact(&log, 93).await;
    assert_eq!(
        log.append(Topic::Orders, 0, vec![record(93)])
            .await
            .unwrap(),
        93
    );
}

/// A flipped byte in an early record (followed by intact ones) is corruption:
/// open fails with an error naming the file and the record's offset.
#[tokio::test]
async fn corrupt_middle_fails_open() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(1 << 20);
    write_records(dir.path(), &config, 50).await;
    let segment = segments(dir.path()).pop().unwrap();
    flip_byte(&segment, 2 * FRAME_BYTES + 25); // inside record 2's value

    let err = open(dir.path(), &config).err().expect("open must fail");
    match &err {
        LogError::Corrupt {
            path,
            position,
            offset,
            ..
        } => {
            assert_eq!(Path::new(path), segment);
            assert_eq!((*position, *offset), (2 * FRAME_BYTES, 2));
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    let message = err.to_string();
    assert!(
        message.contains(&segment.display().to_string()) && message.contains("offset 2"),
        "{message}"
    );
    assert_eq!(
        std::fs::metadata(&segment).unwrap().len(),
        50 * FRAME_BYTES,
        "nothing truncated"
    );

    // A length field blown up so the frame seems to run past the end of the
    // file is still recognised: intact records follow it.
    flip_byte(&segment, 2 * FRAME_BYTES + 25);
    flip_byte(&segment, 3 * FRAME_BYTES + 3);
    let err = open(dir.path(), &config).err().expect("open must fail");
    assert!(matches!(err, LogError::Corrupt { offset: 3, .. }), "{err}");
}

/// Damage in a segment that is not the last, even at its very end, is corruption.
#[tokio::test]
async fn damage_in_earlier_segment_fails_open() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(10 * FRAME_BYTES);
    write_records(dir.path(), &config, 35).await;
    let first = segments(dir.path()).remove(0);
    let len = std::fs::metadata(&first).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&first)
        .unwrap()
        .set_len(len - 1)
        .unwrap();

    let err = open(dir.path(), &config).err().expect("open must fail");
    assert!(matches!(&err, LogError::Corrupt { offset: 9, .. }), "{err}");
    assert!(
        err.to_string().contains(&first.display().to_string()),
        "{err}"
    );
}

/// A segment file whose name is not a base offset is an error naming it.
#[tokio::test]
async fn unparseable_segment_name_fails_open() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(1 << 20);
    write_records(dir.path(), &config, 3).await;
    let stray = dir.path().join("orders").join("00000").join("0001.seg");
    std::fs::write(&stray, b"").unwrap();
    let err = open(dir.path(), &config).err().expect("open must fail");
    assert!(
        err.to_string().contains(&stray.display().to_string()),
        "{err}"
    );
}
