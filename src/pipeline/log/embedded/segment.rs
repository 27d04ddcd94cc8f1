//! The on-disk format of one segment file, and its recovery scan.
//!
//! A segment is a sequence of frames, nothing else (no file header, so an
//! empty file is a valid empty segment):
//!
//! ```text
//! frame   = len: u32 LE | crc32c(payload): u32 LE | payload (len bytes)
//! payload = kind flag: u8 | timestamp_ms: u64 LE | key_len: u16 LE | key | value
//! ```
//!
//! Offsets are not stored: the record at index `i` of the segment named
//! `{base_offset:020}.seg` has offset `base_offset + i`. Every function here
//! treats file bytes as untrusted: bad bytes give an error, never a panic,
//! and no allocation is sized by a length field before that length has been
//! checked against the bytes actually present.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use super::io_error;
use crate::pipeline::log::{LogError, RecordKind};

/// `len` + `crc32c`.
pub(super) const FRAME_HEADER_BYTES: usize = 8;
/// Kind flag + timestamp + key length.
pub(super) const PAYLOAD_HEADER_BYTES: usize = 1 + 8 + 2;
/// Upper bound of `LogConfig::max_record_bytes` (key + value) this format
/// accepts; equal to the upper bound `Config::validate` allows. Frames are
/// validated against this fixed bound rather than the configured limit, so
/// lowering `max_record_bytes` never turns existing records into "corrupt".
pub const HARD_MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;
/// Largest `len` a valid frame can carry.
pub(super) const MAX_PAYLOAD_BYTES: usize = PAYLOAD_HEADER_BYTES + HARD_MAX_RECORD_BYTES;
/// Longest key the `u16` key length can describe.
pub(super) const MAX_KEY_BYTES: usize = u16::MAX as usize;
/// One sparse index entry per this many bytes of segment: a lookup then
/// skips at most this much (plus one record) by reading frame headers. At
/// 16 bytes per entry the index costs 0.1% of the data it covers.
pub(super) const INDEX_INTERVAL_BYTES: u64 = 16 * 1024;
/// Buffer of the sequential recovery scan.
const SCAN_BUFFER_BYTES: usize = 256 * 1024;
/// A damaged record in the last segment is a torn tail only if no valid
/// frame follows it. That search holds the rest of the file in memory, so it
/// is bounded: with more than this after the damage, open refuses (Corrupt)
/// rather than guess. A real torn tail is at most the one batch written since
/// the last fsync, far below this.
const RESYNC_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes the resync search may checksum in total (crafted input could make
/// every position look like a long frame); past it, open refuses (Corrupt).
const RESYNC_CRC_BUDGET_BYTES: u64 = 1024 * 1024 * 1024;

const SEGMENT_SUFFIX: &str = ".seg";
/// `{base_offset:020}`: every u64 fits in 20 digits.
const SEGMENT_DIGITS: usize = 20;

/// File name of the segment whose first record has offset `base_offset`.
pub(super) fn segment_file_name(base_offset: u64) -> String {
    format!(
        "{base_offset:0width$}{SEGMENT_SUFFIX}",
        width = SEGMENT_DIGITS
    )
}

/// Whether a directory entry claims to be a segment (by its suffix).
pub(super) fn is_segment_name(name: &str) -> bool {
    name.ends_with(SEGMENT_SUFFIX)
}

/// The base offset of a segment file name, or `None` when the name is not
/// exactly 20 decimal digits + `.seg`.
pub(super) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEGMENT_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Bytes one record takes on disk. The caller has checked the key and value
/// lengths against [`MAX_KEY_BYTES`] and [`HARD_MAX_RECORD_BYTES`].
pub(super) fn frame_bytes(key: &[u8], value: &[u8]) -> usize {
    FRAME_HEADER_BYTES + PAYLOAD_HEADER_BYTES + key.len() + value.len()
}

/// Appends one frame to `buf`. The caller has checked the lengths (see
/// [`frame_bytes`]), so the narrowing casts below cannot truncate. Public
/// so the simulation (`crate::sim`) writes the very frames the writer does.
pub fn encode_frame(
    buf: &mut Vec<u8>,
    kind: RecordKind,
    timestamp_ms: u64,
    key: &[u8],
    value: &[u8],
) {
    let payload_len = PAYLOAD_HEADER_BYTES + key.len() + value.len();
    let start = buf.len();
    buf.reserve(FRAME_HEADER_BYTES + payload_len);
    buf.extend_from_slice(&(payload_len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]); // crc, filled in below once the payload is there
    buf.push(kind as u8);
    buf.extend_from_slice(&timestamp_ms.to_le_bytes());
    buf.extend_from_slice(&(key.len() as u16).to_le_bytes());
    buf.extend_from_slice(key);
    buf.extend_from_slice(value);
    let crc = crc32c::crc32c(&buf[start + FRAME_HEADER_BYTES..]);
    buf[start + 4..start + FRAME_HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
}

/// `(len, crc)` of a frame header.
pub(super) fn parse_header(header: [u8; FRAME_HEADER_BYTES]) -> (u32, u32) {
    let [l0, l1, l2, l3, c0, c1, c2, c3] = header;
    (
        u32::from_le_bytes([l0, l1, l2, l3]),
        u32::from_le_bytes([c0, c1, c2, c3]),
    )
}

/// Whether `len` is a payload length this format can produce.
pub(super) fn payload_len_valid(len: u32) -> bool {
    let len = len as usize;
    (PAYLOAD_HEADER_BYTES..=MAX_PAYLOAD_BYTES).contains(&len)
}

/// A decoded payload, borrowing the frame bytes.
pub struct Payload<'a> {
    pub kind: RecordKind,
    pub timestamp_ms: u64,
    pub key: &'a [u8],
    pub value: &'a [u8],
}

/// What is wrong with a frame. Written by this process and checksummed, a
/// frame fails only when the disk lost or changed it: whether that is a
/// torn tail or corruption is decided by where it is (see
/// [`recover_segment`]).
#[derive(thiserror::Error, Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    #[error("{0} bytes, less than a frame header")]
    ShortHeader(usize),
    #[error("invalid frame length {0}")]
    InvalidLength(u32),
    #[error("frame of {len} bytes runs past the end ({left} bytes left)")]
    PastEnd { len: u32, left: usize },
    #[error("checksum mismatch")]
    Checksum,
    #[error("empty payload")]
    EmptyPayload,
    #[error("unknown record kind flag {0}")]
    UnknownKind(u8),
    #[error("payload shorter than its header")]
    ShortPayload,
    #[error("key length {key_len} exceeds the {left} payload bytes left")]
    KeyPastEnd { key_len: usize, left: usize },
}

/// Splits a payload into its fields.
pub(super) fn decode_payload(payload: &[u8]) -> Result<Payload<'_>, FrameError> {
    let Some((&flag, rest)) = payload.split_first() else {
        return Err(FrameError::EmptyPayload);
    };
    let kind = RecordKind::from_flag(flag).ok_or(FrameError::UnknownKind(flag))?;
    let Some((timestamp, rest)) = rest.split_first_chunk::<8>() else {
        return Err(FrameError::ShortPayload);
    };
    let Some((key_len, rest)) = rest.split_first_chunk::<2>() else {
        return Err(FrameError::ShortPayload);
    };
    let key_len = u16::from_le_bytes(*key_len) as usize;
    if key_len > rest.len() {
        return Err(FrameError::KeyPastEnd {
            key_len,
            left: rest.len(),
        });
    }
    let (key, value) = rest.split_at(key_len);
    Ok(Payload {
        kind,
        timestamp_ms: u64::from_le_bytes(*timestamp),
        key,
        value,
    })
}

/// Decodes the frame at the start of `bytes` (header, length, checksum,
/// payload) and returns it with the bytes it took. Public so the fuzz
/// target drives the very decoder the reader uses.
pub fn decode_frame(bytes: &[u8]) -> Result<(Payload<'_>, usize), FrameError> {
    let Some((header, rest)) = bytes.split_first_chunk::<FRAME_HEADER_BYTES>() else {
        return Err(FrameError::ShortHeader(bytes.len()));
    };
    let (len, crc) = parse_header(*header);
    if !payload_len_valid(len) {
        return Err(FrameError::InvalidLength(len));
    }
    let Some(payload) = rest.get(..len as usize) else {
        return Err(FrameError::PastEnd {
            len,
            left: rest.len(),
        });
    };
    if crc32c::crc32c(payload) != crc {
        return Err(FrameError::Checksum);
    }
    let record = decode_payload(payload)?;
    Ok((record, FRAME_HEADER_BYTES + payload.len()))
}

/// A sparse index entry: the record with `offset` starts at byte `position`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct IndexEntry {
    pub offset: u64,
    pub position: u64,
}

/// What the recovery scan learnt about a segment.
#[derive(Debug)]
pub(super) struct ScannedSegment {
    pub record_count: u64,
    /// Valid bytes (the file size after any truncation).
    pub size_bytes: u64,
    /// Always starts with `(base_offset, 0)`.
    pub index: Vec<IndexEntry>,
    pub last_timestamp_ms: Option<u64>,
}

/// Reads a whole segment, checking every frame, and builds its sparse index.
///
/// Damage in a segment that is not the partition's last is [`LogError::Corrupt`]:
/// it was fsynced before the next segment was started, so no crash explains
/// it. In the last segment, damage at byte `p` is a torn tail (a write cut
/// short by a crash: a frame running past the end of the file, a final
/// frame with a bad checksum or length, zero bytes the file system left)
/// exactly when no valid frame starts anywhere after `p`; the file is then
/// truncated to `p` and a warning names the file and the bytes dropped.
/// Damage followed by a valid frame is a corrupt middle: Corrupt, since
/// dropping acknowledged records silently would break "nothing acknowledged
/// is lost".
pub(super) fn recover_segment(
    path: &Path,
    base_offset: u64,
    is_last: bool,
) -> Result<ScannedSegment, LogError> {
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    let file_len = file.metadata().map_err(|e| io_error(path, e))?.len();
    let mut reader = BufReader::with_capacity(SCAN_BUFFER_BYTES, file);
    let mut position: u64 = 0;
    let mut record_count: u64 = 0;
    let mut index = vec![IndexEntry {
        offset: base_offset,
        position: 0,
    }];
    let mut last_index_position: u64 = 0;
    let mut last_timestamp_ms = None;
    let mut payload = Vec::new();

    let damage: Option<FrameError> = loop {
        let remaining = file_len - position;
        if remaining == 0 {
            break None;
        }
        if remaining < FRAME_HEADER_BYTES as u64 {
            break Some(FrameError::ShortHeader(remaining as usize));
        }
        let mut header = [0u8; FRAME_HEADER_BYTES];
        reader
            .read_exact(&mut header)
            .map_err(|e| io_error(path, e))?;
        let (len, crc) = parse_header(header);
        if !payload_len_valid(len) {
            break Some(FrameError::InvalidLength(len));
        }
        let available = remaining - FRAME_HEADER_BYTES as u64;
        if u64::from(len) > available {
            break Some(FrameError::PastEnd {
                len,
                left: available as usize,
            });
        }
        // `len` is now bounded by the bytes present in the file.
        payload.resize(len as usize, 0);
        reader
            .read_exact(&mut payload)
            .map_err(|e| io_error(path, e))?;
        if crc32c::crc32c(&payload) != crc {
            break Some(FrameError::Checksum);
        }
        let record = match decode_payload(&payload) {
            Ok(record) => record,
            Err(detail) => break Some(detail),
        };
        if position - last_index_position >= INDEX_INTERVAL_BYTES {
            index.push(IndexEntry {
                offset: base_offset + record_count,
                position,
            });
            last_index_position = position;
        }
        last_timestamp_ms = Some(record.timestamp_ms);
        record_count += 1;
        position += FRAME_HEADER_BYTES as u64 + u64::from(len);
    };
    drop(reader);

    let scanned = ScannedSegment {
        record_count,
        size_bytes: position,
        index,
        last_timestamp_ms,
    };
    let Some(detail) = damage else {
        return Ok(scanned);
    };
    let corrupt = |detail: String| LogError::Corrupt {
        path: path.display().to_string(),
        position,
        offset: base_offset + record_count,
        detail,
    };
    if !is_last {
        return Err(corrupt(format!(
            "{detail} (in a segment that is not the last, so not a torn write)"
        )));
    }
    match find_valid_frame_after(path, position, file_len)? {
        Resync::NoneFound => {}
        Resync::FoundAt(next) => {
            return Err(corrupt(format!(
                "{detail}; a valid record follows at byte {next}, so this is not a torn tail"
            )));
        }
        Resync::GaveUp(why) => return Err(corrupt(format!("{detail}; {why}"))),
    }
    let dropped_bytes = file_len - position;
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| io_error(path, e))?;
    file.set_len(position).map_err(|e| io_error(path, e))?;
    file.sync_all().map_err(|e| io_error(path, e))?;
    tracing::warn!(
        file = %path.display(),
        dropped_bytes,
        kept_records = record_count,
        reason = %detail,
        "truncated a torn tail left by an interrupted write"
    );
    Ok(scanned)
}

enum Resync {
    NoneFound,
    FoundAt(u64),
    GaveUp(String),
}

/// Looks for a valid frame starting anywhere in `(damaged_at, file_len)`.
fn find_valid_frame_after(path: &Path, damaged_at: u64, file_len: u64) -> Result<Resync, LogError> {
    let tail_len = file_len - damaged_at;
    if tail_len > RESYNC_MAX_BYTES {
        return Ok(Resync::GaveUp(format!(
            "{tail_len} bytes follow the damage, more than the {RESYNC_MAX_BYTES} a torn tail is searched in"
        )));
    }
    let mut file = File::open(path).map_err(|e| io_error(path, e))?;
    file.seek(SeekFrom::Start(damaged_at))
        .map_err(|e| io_error(path, e))?;
    let mut tail = Vec::with_capacity(tail_len as usize);
    file.take(tail_len)
        .read_to_end(&mut tail)
        .map_err(|e| io_error(path, e))?;
    Ok(resync(&tail, damaged_at))
}

/// Looks for a valid frame starting anywhere in `tail` after its first
/// byte; `tail` starts at the damage, byte `damaged_at` of the segment.
fn resync(tail: &[u8], damaged_at: u64) -> Resync {
    let mut crc_budget_bytes = RESYNC_CRC_BUDGET_BYTES;
    for start in 1..tail.len() {
        let Some((header, body)) = tail[start..].split_first_chunk::<FRAME_HEADER_BYTES>() else {
            break;
        };
        let (len, crc) = parse_header(*header);
        if !payload_len_valid(len) || len as usize > body.len() {
            continue;
        }
        let payload = &body[..len as usize];
        // Cheap structural checks first: most positions fail them.
        if decode_payload(payload).is_err() {
            continue;
        }
        crc_budget_bytes = match crc_budget_bytes.checked_sub(u64::from(len)) {
            Some(left) => left,
            None => {
                return Resync::GaveUp(
                    "the search for a following valid record exceeded its budget".into(),
                );
            }
        };
        if crc32c::crc32c(payload) == crc {
            return Resync::FoundAt(damaged_at + start as u64);
        }
    }
    Resync::NoneFound
}

/// What recovery keeps of a partition's last segment.
#[derive(Debug, PartialEq, Eq)]
pub struct RecoveredTail {
    /// Whole valid frames kept.
    pub record_count: u64,
    /// Bytes kept: the segment is truncated to this length.
    pub valid_bytes: usize,
    /// Why bytes after `valid_bytes` were dropped as a torn tail, if any.
    pub torn: Option<FrameError>,
}

/// A last segment damaged other than by a torn write: its records cannot be
/// trusted, so recovery refuses it rather than drop acknowledged records.
#[derive(thiserror::Error, Clone, Debug, PartialEq, Eq)]
pub enum CorruptSegment {
    #[error(
        "{damage}; {tail_bytes} bytes follow the damage, more than the {RESYNC_MAX_BYTES} a torn tail is searched in"
    )]
    TailTooLong {
        damage: FrameError,
        tail_bytes: usize,
    },
    #[error(
        "{damage} at byte {position}; a valid record follows at byte {next}, so this is not a torn tail"
    )]
    RecordFollows {
        damage: FrameError,
        position: usize,
        next: u64,
    },
    #[error("{damage}; {why}")]
    Unsearchable { damage: FrameError, why: String },
}

impl CorruptSegment {
    /// Data the disk lost or changed: an operator restores it, retrying cannot help.
    pub fn fault(&self) -> crate::domain::fault::Fault {
        crate::domain::fault::Fault::Internal
    }
}

/// [`recover_segment`]'s decision for a partition's last segment held in
/// memory: the same frame checks ([`decode_frame`]) and the same torn-tail
/// rule (damage is a torn tail only if no valid frame follows it, else the
/// segment is corrupt). Public for the simulation (`crate::sim`), whose
/// disk is a byte buffer.
pub fn recover_last_segment(bytes: &[u8]) -> Result<RecoveredTail, CorruptSegment> {
    let mut position = 0;
    let mut record_count = 0;
    let damage = loop {
        if position == bytes.len() {
            break None;
        }
        match decode_frame(&bytes[position..]) {
            Ok((_, used)) => {
                position += used;
                record_count += 1;
            }
            Err(detail) => break Some(detail),
        }
    };
    let recovered = |torn| RecoveredTail {
        record_count,
        valid_bytes: position,
        torn,
    };
    let Some(damage) = damage else {
        return Ok(recovered(None));
    };
    let tail = &bytes[position..];
    if tail.len() as u64 > RESYNC_MAX_BYTES {
        return Err(CorruptSegment::TailTooLong {
            damage,
            tail_bytes: tail.len(),
        });
    }
    match resync(tail, position as u64) {
        Resync::NoneFound => Ok(recovered(Some(damage))),
        Resync::FoundAt(next) => Err(CorruptSegment::RecordFollows {
            damage,
            position,
            next,
        }),
        Resync::GaveUp(why) => Err(CorruptSegment::Unsearchable { damage, why }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A frame decodes to what was encoded, and its length matches `frame_bytes`.
    #[test]
    fn frame_round_trip() {
        let mut buf = Vec::new();
        encode_frame(
            &mut buf,
            RecordKind::Internal,
            1_700_000_000_123,
            b"SKU-1",
            b"value",
        );
        assert_eq!(buf.len(), frame_bytes(b"SKU-1", b"value"));
        let header: [u8; FRAME_HEADER_BYTES] = buf[..FRAME_HEADER_BYTES].try_into().unwrap();
        let (len, crc) = parse_header(header);
        assert_eq!(len as usize, buf.len() - FRAME_HEADER_BYTES);
        assert_eq!(crc, crc32c::crc32c(&buf[FRAME_HEADER_BYTES..]));
        let p = decode_payload(&buf[FRAME_HEADER_BYTES..]).unwrap();
        assert_eq!(
            (p.kind, p.timestamp_ms, p.key, p.value),
            (
                RecordKind::Internal,
                1_700_000_000_123,
                &b"SKU-1"[..],
                &b"value"[..]
            )
        );
    }

    /// Segment names are exactly 20 digits + `.seg`; anything else is refused.
    #[test]
    fn segment_names() {
        assert_eq!(segment_file_name(42), "00000000000000000042.seg");
        assert_eq!(
            parse_segment_name(&segment_file_name(u64::MAX)),
            Some(u64::MAX)
        );
        for bad in [
            "42.seg",
            "0000000000000000004x.seg",
            "00000000000000000042.seg.bak",
            "99999999999999999999.seg",
        ] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
    }

    proptest! {
        /// No byte sequence makes the payload decoder panic.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_payload(&bytes);
        }

        /// No file content makes recovery panic; it either keeps a prefix of
        /// valid frames or reports an error.
        #[test]
        fn recovery_never_panics(
            good in 0usize..4,
            garbage in proptest::collection::vec(any::<u8>(), 0..96),
            is_last in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(segment_file_name(0));
            let mut bytes = Vec::new();
            for i in 0..good {
                encode_frame(&mut bytes, RecordKind::OrderJson, i as u64, b"k", b"v");
            }
            let good_len = bytes.len() as u64;
            bytes.extend_from_slice(&garbage);
            std::fs::write(&path, &bytes).unwrap();
            let in_memory = recover_last_segment(&bytes);
            if let Ok(scanned) = recover_segment(&path, 0, is_last) {
                prop_assert!(scanned.record_count >= good as u64);
                prop_assert!(scanned.size_bytes >= good_len);
                prop_assert_eq!(std::fs::metadata(&path).unwrap().len(), scanned.size_bytes);
            }
            if is_last {
                std::fs::write(&path, &bytes).unwrap();
                let on_disk = recover_segment(&path, 0, true);
                // The simulation's in-memory recovery decides as the file scan does.
                match (on_disk, in_memory) {
                    (Ok(d), Ok(m)) => {
                        prop_assert_eq!(d.record_count, m.record_count);
                        prop_assert_eq!(d.size_bytes, m.valid_bytes as u64);
                        prop_assert_eq!(m.torn.is_some(), m.valid_bytes < bytes.len());
                    }
                    (Err(_), Err(_)) => {}
                    (d, m) => prop_assert!(false, "file scan {:?}, in memory {:?}", d.map(|s| s.record_count), m),
                }
            }
        }
    }
}
