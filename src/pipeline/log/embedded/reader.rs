//! Reading durable records: locate the segment by binary search over base
//! offsets, then the nearest sparse-index entry, then read frames forward.
//!
//! A sequential consumer asks for `from` = where its last read ended, so
//! each partition keeps a few open cursors (file + read buffer + position)
//! keyed by the next offset they would return; such a read continues where
//! the last one stopped without a lookup or a seek.
//!
//! Reading racing the writer on the same file is safe: the writer only ever
//! appends, and a reader never decodes beyond the durable high-watermark it
//! was given. Bytes a read buffer picks up beyond it are simply the prefix
//! of frames that will be complete by the time they are returned.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::segment::{FRAME_HEADER_BYTES, decode_frame, parse_header, payload_len_valid};
use super::{PartitionShared, io_error};
use crate::pipeline::log::{LogError, LogRecord, READ_MAX_BYTES};

/// Read-ahead buffer of a cursor.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// An open position in one segment file.
pub(super) struct ReadCursor {
    pub segment_base: u64,
    path: Arc<Path>,
    reader: BufReader<File>,
    /// Offset of the record at `position`.
    pub next_offset: u64,
    position: u64,
    /// The partition's rollback count when the cursor was opened.
    pub rollbacks: u64,
}

/// Where to find an offset: from the segment list, under its lock.
pub(super) struct Located {
    pub segment_base: u64,
    /// One past the last published record of the segment.
    pub end_offset: u64,
    pub path: Arc<Path>,
    /// Nearest indexed record at or before the offset.
    pub index_offset: u64,
    pub index_position: u64,
}

enum ReadError {
    /// The segment file is gone: retention deleted it after the lookup.
    SegmentGone,
    Log(LogError),
}

impl From<LogError> for ReadError {
    fn from(e: LogError) -> Self {
        ReadError::Log(e)
    }
}

/// Reads up to `max_records` records from `from`, never at or beyond `high`
/// (the durable high-watermark loaded by the caller), and stops once they
/// hold `max_bytes` (one record at least). Blocking file I/O.
pub(super) fn read_records(
    shared: &PartitionShared,
    from: u64,
    max_records: usize,
    max_bytes: usize,
    high: u64,
) -> Result<Vec<LogRecord>, LogError> {
    debug_assert!(max_bytes <= READ_MAX_BYTES);
    let end = high.min(from.saturating_add(max_records as u64));
    let mut records = Vec::with_capacity(
        usize::try_from(end.saturating_sub(from))
            .unwrap_or(0)
            .min(1024),
    );
    let mut cursor = shared.take_cursor(from);
    match read_into(shared, &mut cursor, &mut records, from, end, max_bytes) {
        Ok(()) => {
            if let Some(cursor) = cursor {
                shared.put_cursor(cursor);
            }
            Ok(records)
        }
        Err(ReadError::SegmentGone) => Err(shared.out_of_range(from)),
        Err(ReadError::Log(e)) => Err(e),
    }
}

fn read_into(
    shared: &PartitionShared,
    cursor: &mut Option<ReadCursor>,
    records: &mut Vec<LogRecord>,
    from: u64,
    end: u64,
    max_bytes: usize,
) -> Result<(), ReadError> {
    let mut next = from;
    let mut bytes = 0usize;
    let mut frame = Vec::new();
    while next < end && (records.is_empty() || bytes < max_bytes) {
        let Some(located) = shared.locate(next) else {
            return Err(ReadError::SegmentGone);
        };
        let reusable = cursor
            .as_ref()
            .is_some_and(|c| c.segment_base == located.segment_base && c.next_offset == next);
        if !reusable {
            // Loaded before the file is read: a rollback after this point
            // makes the cursor stale, and `put_cursor` then drops it.
            let rollbacks = shared.rollbacks.load(Ordering::Acquire);
            *cursor = Some(open_cursor(&located, next, rollbacks)?);
        }
        let Some(c) = cursor.as_mut() else {
            return Err(ReadError::SegmentGone);
        };
        let stop = end.min(located.end_offset);
        if stop <= next {
            // The segment list says the offset is here but holds no record
            // for it: only possible if the files changed under us.
            return Err(ReadError::SegmentGone);
        }
        while next < stop && (records.is_empty() || bytes < max_bytes) {
            let record = c.read_record(&mut frame)?;
            bytes += record.size_bytes();
            records.push(record);
            next += 1;
        }
    }
    Ok(())
}

fn open_cursor(located: &Located, offset: u64, rollbacks: u64) -> Result<ReadCursor, ReadError> {
    let file = match File::open(&located.path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(ReadError::SegmentGone),
        Err(e) => return Err(io_error(&located.path, e).into()),
    };
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, file);
    reader
        .seek(SeekFrom::Start(located.index_position))
        .map_err(|e| io_error(&located.path, e))?;
    let mut cursor = ReadCursor {
        segment_base: located.segment_base,
        path: located.path.clone(),
        reader,
        next_offset: located.index_offset,
        position: located.index_position,
        rollbacks,
    };
    while cursor.next_offset < offset {
        cursor.skip_record()?;
    }
    Ok(cursor)
}

impl ReadCursor {
    fn corrupt(&self, detail: impl Into<String>) -> LogError {
        LogError::Corrupt {
            path: self.path.display().to_string(),
            position: self.position,
            offset: self.next_offset,
            detail: detail.into(),
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), LogError> {
        self.reader.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => self.corrupt("segment ends inside a durable record"),
            _ => io_error(&self.path, e),
        })
    }

    /// The header and its payload length, checked before anything is
    /// sized by it.
    fn read_header(&mut self) -> Result<([u8; FRAME_HEADER_BYTES], u32), LogError> {
        let mut header = [0u8; FRAME_HEADER_BYTES];
        self.read_exact(&mut header)?;
        let (len, _) = parse_header(header);
        if !payload_len_valid(len) {
            return Err(self.corrupt(format!("invalid frame length {len}")));
        }
        Ok((header, len))
    }

    fn skip_record(&mut self) -> Result<(), LogError> {
        let (_, len) = self.read_header()?;
        self.reader
            .seek_relative(i64::from(len))
            .map_err(|e| io_error(&self.path, e))?;
        self.position += FRAME_HEADER_BYTES as u64 + u64::from(len);
        self.next_offset += 1;
        Ok(())
    }

    /// Reads and checks the record at the cursor; `frame` is scratch space.
    fn read_record(&mut self, frame: &mut Vec<u8>) -> Result<LogRecord, LogError> {
        let (header, len) = self.read_header()?;
        // A durable frame was checked at open or written by this process;
        // `len` is bounded by MAX_PAYLOAD_BYTES above even if the file
        // changed behind our back.
        frame.clear();
        frame.extend_from_slice(&header);
        frame.resize(FRAME_HEADER_BYTES + len as usize, 0);
        self.read_exact(&mut frame[FRAME_HEADER_BYTES..])?;
        let record = match decode_frame(frame) {
            Ok((p, _)) => LogRecord {
                offset: self.next_offset,
                timestamp_ms: p.timestamp_ms,
                kind: p.kind,
                key: p.key.to_vec(),
                value: p.value.to_vec(),
            },
            Err(detail) => return Err(self.corrupt(detail.to_string())),
        };
        self.position += FRAME_HEADER_BYTES as u64 + u64::from(len);
        self.next_offset += 1;
        Ok(record)
    }
}
