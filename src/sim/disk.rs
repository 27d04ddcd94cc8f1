//! The simulated disk of one log partition: the embedded log's segment
//! bytes in memory, written with the production frame encoder, recovered
//! after a crash by the production torn-tail rule.
//!
//! Appends land in the page cache (`bytes` past the durable prefix) until
//! an fsync makes them durable. A crash keeps the durable prefix and a
//! random prefix of the rest (a torn write, possibly mid-frame, possibly
//! with a flipped byte in its last frame); recovery then scans the active
//! segment and truncates the torn tail, as `EmbeddedLog::open` does.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::domain::RecordKind;
use crate::pipeline::log::embedded::segment::{
    CorruptSegment, FrameError, Payload, decode_frame, encode_frame, recover_last_segment,
};
use crate::stages::processor::Input;

/// The simulated disk disagreeing with the production frame code: a bug in
/// the writer's framing or in recovery, which the simulation reports.
#[derive(thiserror::Error, Debug)]
pub enum DiskError {
    #[error("record {offset}: {source}")]
    Frame { offset: u64, source: FrameError },
    #[error("record {offset}: frame of {used} bytes in a slot of {slot}")]
    SlotMismatch {
        offset: u64,
        used: usize,
        slot: usize,
    },
    #[error("recovery refused the segment: {0}")]
    Corrupt(#[from] CorruptSegment),
    #[error("recovery kept {kept_bytes} bytes, not the end of a frame the writer wrote")]
    KeptPartialFrame { kept_bytes: usize },
}

/// A segment is sealed (never scanned again) once it holds this much
/// durable data, so recovery scans only the active one, as in production.
const SEGMENT_BYTES: usize = 16 * 1024;
/// Chance that a crash also flips a bit in the unsynced bytes it keeps.
const FLIP_CHANCE: f64 = 0.25;

/// What a crash did to one partition's bytes.
#[derive(Debug, Default, Clone, Copy)]
pub struct Torn {
    /// Records written but not durable that the crash dropped.
    pub lost_records: u64,
    /// Recovery truncated a torn tail (a partial or damaged frame).
    pub torn_tail: bool,
}

#[derive(Debug, Default)]
pub struct SimDisk {
    bytes: Vec<u8>,
    /// `ends[i]`: byte where record `i`'s frame ends.
    ends: Vec<usize>,
    /// Records made durable by an fsync (or by recovery).
    durable: u64,
    /// First record of the active segment.
    segment_base: u64,
    /// Stamps never go backwards within a partition (as the writer's).
    last_ts: u64,
}

impl SimDisk {
    /// Records written (durable or not).
    pub fn written(&self) -> u64 {
        self.ends.len() as u64
    }

    /// Records a reader sees: only durable ones, as in production.
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// First record of the active segment (the only one a crash touches).
    pub fn segment_base(&self) -> u64 {
        self.segment_base
    }

    pub fn is_synced(&self) -> bool {
        self.durable == self.written()
    }

    fn start_of(&self, record: u64) -> usize {
        match record {
            0 => 0,
            r => self.ends[r as usize - 1],
        }
    }

    /// Appends a record stamped `now_ms` (or the last stamp, if later);
    /// returns its offset.
    pub fn append(&mut self, kind: RecordKind, now_ms: u64, key: &[u8], value: &[u8]) -> u64 {
        let ts = now_ms.max(self.last_ts);
        encode_frame(&mut self.bytes, kind, ts, key, value);
        self.ends.push(self.bytes.len());
        self.last_ts = ts;
        self.written() - 1
    }

    /// Makes everything written durable; true if that was anything.
    pub fn fsync(&mut self) -> bool {
        if self.is_synced() {
            return false;
        }
        self.durable = self.written();
        if self.bytes.len() - self.start_of(self.segment_base) >= SEGMENT_BYTES {
            self.segment_base = self.durable;
        }
        true
    }

    /// The record at `offset` (durable or not), decoded by the production
    /// frame decoder.
    pub fn read(&self, offset: u64) -> Result<Payload<'_>, DiskError> {
        let (start, end) = (self.start_of(offset), self.ends[offset as usize]);
        let (payload, used) = decode_frame(&self.bytes[start..end])
            .map_err(|source| DiskError::Frame { offset, source })?;
        if used != end - start {
            return Err(DiskError::SlotMismatch {
                offset,
                used,
                slot: end - start,
            });
        }
        Ok(payload)
    }

    /// The record at `offset` as the processor takes it.
    pub fn input(&self, offset: u64) -> Result<Input<'_>, DiskError> {
        let r = self.read(offset)?;
        Ok(Input {
            offset,
            timestamp_ms: r.timestamp_ms,
            kind: r.kind,
            key: r.key,
            value: r.value,
        })
    }

    /// A power loss at this point; `entropy` decides how much of the
    /// unsynced tail the disk kept. `tear_durable` is the injected bug of
    /// the simulation's self-test: the crash also cuts into the last durable
    /// record of the active segment. The error is recovery refusing the
    /// bytes (a corrupt segment).
    pub fn crash(&mut self, entropy: u64, tear_durable: bool) -> Result<Torn, DiskError> {
        let mut rng = StdRng::seed_from_u64(entropy);
        let written = self.written();
        let durable_bytes = self.start_of(self.durable);
        let keep_extra = rng.random_range(0..=self.bytes.len() - durable_bytes);
        let flip = rng.random_bool(FLIP_CHANCE);
        let flip_pick: u64 = rng.random();
        let keep = if tear_durable && self.durable > self.segment_base {
            self.start_of(self.durable - 1) + 1
        } else {
            durable_bytes + keep_extra
        };
        self.bytes.truncate(keep);
        if flip && keep > durable_bytes {
            self.flip_in_last_frame(keep, durable_bytes, flip_pick);
        }
        let segment_start = self.start_of(self.segment_base);
        let recovered = recover_last_segment(&self.bytes[segment_start..])?;
        let kept = self.segment_base + recovered.record_count;
        self.bytes.truncate(segment_start + recovered.valid_bytes);
        self.ends.truncate(kept as usize);
        if self.start_of(kept) != self.bytes.len() {
            return Err(DiskError::KeptPartialFrame {
                kept_bytes: self.bytes.len(),
            });
        }
        self.durable = kept;
        self.last_ts = match kept {
            0 => 0,
            k => self.read(k - 1)?.timestamp_ms,
        };
        Ok(Torn {
            lost_records: written - kept,
            torn_tail: recovered.torn.is_some(),
        })
    }

    /// Flips one bit in the last (possibly partial) frame of the kept
    /// bytes, never in the durable prefix: damage that recovery must treat
    /// as a torn tail. Damage further back, followed by valid frames, is
    /// what a crash cannot cause (production refuses it as corrupt).
    fn flip_in_last_frame(&mut self, keep: usize, durable_bytes: usize, pick: u64) {
        let containing = self.ends.partition_point(|&end| end < keep) as u64;
        let frame_start = self.start_of(containing).max(durable_bytes);
        let span = (keep - frame_start) as u64;
        let at = frame_start + (pick % span) as usize;
        self.bytes[at] ^= 1 << ((pick >> 32) % 8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk_with(records: usize, synced: usize) -> SimDisk {
        let mut d = SimDisk::default();
        for i in 0..records {
            if i == synced {
                d.fsync();
            }
            d.append(
                RecordKind::Internal,
                i as u64,
                b"k",
                format!("value-{i}").as_bytes(),
            );
        }
        if synced >= records {
            d.fsync();
        }
        d
    }

    /// A crash never loses durable records, keeps a prefix of the rest and
    /// every kept record reads back.
    #[test]
    fn crash_keeps_the_durable_prefix() {
        for entropy in 0..200 {
            let mut d = disk_with(10, 4);
            let torn = d.crash(entropy, false).unwrap();
            assert!(d.durable() >= 4 && d.written() == d.durable());
            assert_eq!(torn.lost_records, 10 - d.durable());
            for i in 0..d.durable() {
                assert_eq!(d.read(i).unwrap().value, format!("value-{i}").as_bytes());
            }
        }
    }

    /// The injected bug does lose a durable record.
    #[test]
    fn tear_durable_loses_one() {
        let mut d = disk_with(5, 5);
        d.crash(7, true).unwrap();
        assert_eq!(d.durable(), 4);
    }
}
