//! How a partition's state is written to the state store: a small
//! manifest plus immutable blobs (see docs/design.md, "Snapshots").
//!
//! - stock pages: the SKUs of a run of stock buckets (one page, or more
//!   for a bucket too large for one), rewritten only when a SKU of the run
//!   changed;
//! - finished chunks: [`FINISHED_CHUNK`] entries of the finished set each,
//!   written once when full, dropped whole when all their entries expired;
//! - lane pages: the park lane, rewritten only when it changed;
//! - head pages: everything else, rewritten at every checkpoint.
//!
//! No blob's payload exceeds [`PAGE_BYTES`] (plus a page header), and
//! [`worst_case`] bounds the manifest and the number of blobs from the
//! processor's limits. A checkpoint's cost therefore depends on the state
//! in flight and on what changed since the previous checkpoint, never on
//! how many orders passed before. Every blob carries a header (magic, format, kind,
//! partition) and a CRC-32C: bad bytes give a [`SnapshotError`] naming the
//! partition and the generation, never a panic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::domain::parked::ParkedRecord;
use crate::domain::{Effect, EffectKind, OrderKey};

use super::finished::{Finished, FinishedEntry, FinishedLimits};
use super::processor::Limits;
use super::state::{Hold, OrderRec, PartitionState, STOCK_BUCKETS, Stock, StockTable};

/// Snapshot format version, in the manifest and in every blob.
/// Format 2 lets a stock page hold a run of buckets.
pub const FORMAT: u8 = 2;
/// The oldest format this build reads: format 1 wrote one run per stock
/// bucket, which reads as runs unchanged. A checkpoint writes [`FORMAT`].
const OLDEST_FORMAT: u8 = 1;
const MAGIC: [u8; 4] = *b"OFSS";
const HEADER_BYTES: usize = 4 + 1 + 1 + 4 + 8;
const CRC_BYTES: usize = 4;
/// Largest page payload (head, lane and stock pages; a finished chunk is
/// smaller). Far below every store's value limit.
pub const PAGE_BYTES: usize = 256 * 1024;
/// The index and count in front of a head or lane page.
const PAGE_HEADER_BYTES: usize = 8;
/// Largest blob any checkpoint writes.
pub const MAX_BLOB_BYTES: usize = HEADER_BYTES + PAGE_HEADER_BYTES + PAGE_BYTES + CRC_BYTES;
/// Finished entries per chunk: 8,192 × 24 bytes = 192 KiB.
pub const FINISHED_CHUNK: u64 = 8_192;
const ENTRY_BYTES: usize = 24;

/// Largest encoding of one item of each kind, with every field at its
/// limit (domain::order's lengths, `Message::check`); the tests build such
/// items and check them against these, which makes [`worst_case`] an upper
/// bound, not an estimate.
pub const STOCK_ROW_MAX_BYTES: usize = 112;
/// An order in flight with [`crate::domain::order::MAX_LINES`] lines, its id included.
pub const ORDER_MAX_BYTES: usize = 9_216;
/// A hold with its key.
pub const HOLD_MAX_BYTES: usize = 160;
/// An outbox effect with its key.
pub const EFFECT_MAX_BYTES: usize = 768;
/// A failed effect's mark: its key and reason.
pub const FAILED_EFFECT_MAX_BYTES: usize = 352;
/// A watermark with its key.
pub const WATERMARK_MAX_BYTES: usize = 32;
/// A parked record beyond twice its [`super::state::parked_size`] (its bytes are
/// encoded as arrays of integers: at most two bytes each).
pub const PARKED_OVERHEAD_BYTES: usize = 64;
/// One blob reference in the manifest (with its bucket or chunk number).
const MANIFEST_ENTRY_MAX_BYTES: usize = 32;
/// Largest manifest a configuration may lead to: the manifest is one
/// value in one row, and the smallest limit among the stores (a mutation
/// of half Cassandra's default 32 MiB commit log segment, ScyllaDB's
/// equivalent, the 16 MiB native protocol frame) is four times larger.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// Upper bounds of one checkpoint of a partition within `Limits`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointBounds {
    /// The largest value written: one blob.
    pub blob_bytes: usize,
    /// The manifest (the one row the commit writes).
    pub manifest_bytes: usize,
    /// Blobs a snapshot may reference; a checkpoint writes at most these
    /// and deletes at most as many (one statement each on CQL stores).
    pub blobs: usize,
    /// All bytes a checkpoint may write (every blob rewritten).
    pub bytes: usize,
}

/// The bounds of any checkpoint of a partition of `partitions` under
/// `limits`, whatever the records that led to it.
pub fn worst_case(limits: &Limits, partitions: u32) -> CheckpointBounds {
    let pages = |bytes: usize| bytes.div_ceil(PAGE_BYTES);
    // At most one run per bucket; a run's pages are full but for its
    // last, which a row did not fit.
    let stock_bytes = limits.max_skus.saturating_mul(STOCK_ROW_MAX_BYTES);
    let stock_pages = STOCK_BUCKETS + stock_bytes / (PAGE_BYTES - STOCK_ROW_MAX_BYTES);
    let chunks = limits.finished.max_entries / FINISHED_CHUNK as usize + 2;
    // In flight: orders, holds, effects (admission stops at twice the
    // in-flight bound; each admitted order adds at most two more) and
    // their failure marks, one watermark per partition, the unsealed
    // tail, map headers.
    let head_bytes = limits
        .max_inflight_orders
        .saturating_mul(ORDER_MAX_BYTES + 4 * (EFFECT_MAX_BYTES + FAILED_EFFECT_MAX_BYTES))
        .saturating_add(limits.max_holds.saturating_mul(HOLD_MAX_BYTES))
        .saturating_add(partitions as usize * WATERMARK_MAX_BYTES)
        .saturating_add(FINISHED_CHUNK as usize * ENTRY_BYTES + 64);
    let lane_bytes = limits
        .max_parked_bytes
        .saturating_mul(2)
        .saturating_add(
            limits
                .max_parked_records
                .saturating_mul(PARKED_OVERHEAD_BYTES),
        )
        .saturating_add(8);
    let blobs = stock_pages + chunks + pages(head_bytes) + pages(lane_bytes);
    CheckpointBounds {
        blob_bytes: MAX_BLOB_BYTES,
        // Every reference may also be garbage of the one before.
        manifest_bytes: 64 + 2 * blobs * MANIFEST_ENTRY_MAX_BYTES,
        blobs,
        bytes: blobs.saturating_mul(MAX_BLOB_BYTES),
    }
}

/// A blob in the store: the epoch of the owner that wrote it (so a former
/// owner can never overwrite one the current owner references) and a
/// number unique within that epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BlobRef {
    pub epoch: u64,
    pub id: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Stock = 1,
    Chunk = 2,
    Head = 3,
    Lane = 4,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Stock => "stock page",
            Kind::Chunk => "finished chunk",
            Kind::Head => "head page",
            Kind::Lane => "lane page",
        }
    }
}

/// A snapshot that cannot be read.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("snapshot of partition {partition}, generation {generation}: {detail}")]
pub struct SnapshotError {
    pub partition: u32,
    pub generation: u64,
    pub detail: String,
}

/// What a partition's snapshot consists of. Stored with the offset and the
/// epoch in the store's snapshot row.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u8,
    pub partition: u32,
    /// Checkpoints written so far (this one included).
    pub generation: u64,
    /// The next blob number to use.
    pub next_blob: u64,
    /// Stock pages by the first bucket of their run, in bucket order (a
    /// run's pages in bucket, then SKU order). A run reaches the next run's
    /// first bucket.
    pub stock: Vec<(u16, BlobRef)>,
    /// Head pages in order.
    pub head: Vec<BlobRef>,
    /// Pages of the park lane in order (none when it is empty).
    pub lane: Vec<BlobRef>,
    /// Numbers of the finished entries kept: `finished_first..finished_next`.
    pub finished_first: u64,
    pub finished_next: u64,
    /// Finished chunks by chunk number, in order.
    pub chunks: Vec<(u64, BlobRef)>,
    /// Blobs this checkpoint replaced: deleted once it is committed, and
    /// again by whoever loads it (a crash in between leaks nothing).
    pub garbage: Vec<BlobRef>,
}

impl Manifest {
    /// The manifest of a partition that never checkpointed.
    pub fn empty(partition: u32) -> Manifest {
        Manifest {
            format: FORMAT,
            partition,
            ..Manifest::default()
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        rmp_serde::to_vec(self).expect("a manifest always serializes")
    }

    pub fn decode(partition: u32, bytes: &[u8]) -> Result<Manifest, SnapshotError> {
        let bad = |detail: String| SnapshotError {
            partition,
            generation: 0,
            detail,
        };
        let m: Manifest =
            rmp_serde::from_slice(bytes).map_err(|e| bad(format!("undecodable manifest: {e}")))?;
        let err = |detail: String| SnapshotError {
            partition,
            generation: m.generation,
            detail,
        };
        if !(OLDEST_FORMAT..=FORMAT).contains(&m.format) {
            return Err(err(format!(
                "format {} (this build reads {OLDEST_FORMAT} to {FORMAT})",
                m.format
            )));
        }
        if m.partition != partition {
            return Err(err(format!("the manifest is partition {}'s", m.partition)));
        }
        if m.finished_first > m.finished_next {
            return Err(err("finished range runs backwards".into()));
        }
        Ok(m)
    }

    /// Every blob the snapshot references, in load order.
    pub fn blobs(&self) -> Vec<BlobRef> {
        self.stock
            .iter()
            .map(|(_, b)| *b)
            .chain(self.chunks.iter().map(|(_, b)| *b))
            .chain(self.head.iter().copied())
            .chain(self.lane.iter().copied())
            .collect()
    }

    fn allocate(&mut self, epoch: u64) -> BlobRef {
        let blob = BlobRef {
            epoch,
            id: self.next_blob,
        };
        self.next_blob += 1;
        blob
    }

    fn error(&self, detail: String) -> SnapshotError {
        SnapshotError {
            partition: self.partition,
            generation: self.generation,
            detail,
        }
    }
}

/// One checkpoint: the blobs to write, the manifest to commit after them,
/// and the blobs to delete once it is committed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    pub manifest: Vec<u8>,
    pub blobs: Vec<(BlobRef, Vec<u8>)>,
    pub drop: Vec<BlobRef>,
}

/// Everything but the stock, the sealed finished chunks and the lane.
#[derive(Serialize, Deserialize)]
struct Head<O, H, W, X, F> {
    orders: O,
    holds: H,
    watermarks: W,
    outbox: X,
    /// Number of the first entry of `tail`.
    tail_first: u64,
    /// Finished entries not yet in a chunk: key ++ stamp, 24 bytes each.
    #[serde(with = "serde_bytes_compat")]
    tail: Vec<u8>,
    /// The outbox's failed effects; last and defaulted, so heads written
    /// before it existed still read.
    #[serde(default)]
    failed_effects: F,
}

type HeadOut<'a> = Head<
    &'a BTreeMap<String, OrderRec>,
    &'a BTreeMap<(String, u16), Hold>,
    &'a BTreeMap<u32, (u64, u32)>,
    &'a BTreeMap<(String, EffectKind), Effect>,
    &'a BTreeMap<(String, EffectKind), String>,
>;
type HeadIn = Head<
    BTreeMap<String, OrderRec>,
    BTreeMap<(String, u16), Hold>,
    BTreeMap<u32, (u64, u32)>,
    BTreeMap<(String, EffectKind), Effect>,
    BTreeMap<(String, EffectKind), String>,
>;

/// MessagePack `bin` for the tail (a `Vec<u8>` would be an array of ints).
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(Visitor)
    }
}

fn frame(kind: Kind, partition: u32, generation: u64, payload: &[u8]) -> Vec<u8> {
    assert!(
        payload.len() <= PAGE_HEADER_BYTES + PAGE_BYTES,
        "a {} of {} bytes is over the page limit",
        kind.name(),
        payload.len()
    );
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len() + CRC_BYTES);
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT);
    out.push(kind as u8);
    out.extend_from_slice(&partition.to_le_bytes());
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The payload of a blob of `kind` written for `partition`.
fn unframe<'a>(
    m: &Manifest,
    kind: Kind,
    blob: BlobRef,
    bytes: &'a [u8],
) -> Result<&'a [u8], SnapshotError> {
    let what = |detail: &str| {
        m.error(format!(
            "{} blob ({}, {}): {detail}",
            kind.name(),
            blob.epoch,
            blob.id
        ))
    };
    if bytes.len() < HEADER_BYTES + CRC_BYTES {
        return Err(what(&format!("{} bytes is too short", bytes.len())));
    }
    let (body, crc) = bytes.split_at(bytes.len() - CRC_BYTES);
    let crc = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    if crc32c::crc32c(body) != crc {
        return Err(what("checksum mismatch"));
    }
    if body[..4] != MAGIC || !(OLDEST_FORMAT..=FORMAT).contains(&body[4]) {
        return Err(what("not a snapshot blob of this format"));
    }
    if body[5] != kind as u8 {
        return Err(what(&format!("holds kind {}", body[5])));
    }
    let partition = u32::from_le_bytes(body[6..10].try_into().expect("4 bytes"));
    if partition != m.partition {
        return Err(what(&format!("belongs to partition {partition}")));
    }
    Ok(&body[HEADER_BYTES..])
}

fn entry_bytes(out: &mut Vec<u8>, e: &FinishedEntry) {
    out.extend_from_slice(&e.key.0);
    out.extend_from_slice(&e.stamp.to_le_bytes());
}

fn entries_of(bytes: &[u8]) -> Option<impl Iterator<Item = FinishedEntry> + '_> {
    bytes.len().is_multiple_of(ENTRY_BYTES).then(|| {
        bytes.chunks_exact(ENTRY_BYTES).map(|c| FinishedEntry {
            key: OrderKey(c[..16].try_into().expect("16 bytes")),
            stamp: u64::from_le_bytes(c[16..].try_into().expect("8 bytes")),
        })
    })
}

/// The stock pages of a run of buckets starting at `first`: its rows in
/// (bucket, SKU) order, as MessagePack arrays of `(sku, stock)` behind the
/// first bucket's number, cut so that no page exceeds [`PAGE_BYTES`] (a
/// row is at most [`STOCK_ROW_MAX_BYTES`]).
fn stock_pages<'a>(
    first: u16,
    rows: impl Iterator<Item = (&'a String, &'a Stock)>,
    count_hint: usize,
) -> Vec<Vec<u8>> {
    // bucket, then a MessagePack array32 header (its count filled in last).
    const HEAD: usize = 2 + 5;
    // Sized for the rows, not for a full page (a page-sized buffer each
    // cost the kernel fresh zeroed pages every checkpoint).
    let capacity = (HEAD + count_hint * STOCK_ROW_MAX_BYTES).min(PAGE_BYTES);
    let start = |pages: &mut Vec<Vec<u8>>| {
        let mut page = Vec::with_capacity(capacity);
        page.extend_from_slice(&first.to_le_bytes());
        page.extend_from_slice(&[0xdd, 0, 0, 0, 0]);
        pages.push(page);
    };
    let mut pages = Vec::new();
    let mut count = 0u32;
    let mut row = Vec::with_capacity(STOCK_ROW_MAX_BYTES);
    start(&mut pages);
    for r in rows {
        row.clear();
        rmp_serde::encode::write(&mut row, &r).expect("stock always serializes");
        debug_assert!(row.len() <= STOCK_ROW_MAX_BYTES, "{} bytes", row.len());
        let page = pages.last_mut().expect("started");
        if count > 0 && page.len() + row.len() > PAGE_BYTES {
            page[3..HEAD].copy_from_slice(&count.to_be_bytes());
            count = 0;
            start(&mut pages);
        }
        pages.last_mut().expect("started").extend_from_slice(&row);
        count += 1;
    }
    let page = pages.last_mut().expect("started");
    page[3..HEAD].copy_from_slice(&count.to_be_bytes());
    pages
}

/// The first bucket of its run and the rows of a stock page.
fn stock_rows(
    m: &Manifest,
    blob: BlobRef,
    bytes: &[u8],
) -> Result<(u16, Vec<(String, Stock)>), SnapshotError> {
    let payload = unframe(m, Kind::Stock, blob, bytes)?;
    let bucket = payload
        .get(..2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .ok_or_else(|| m.error(format!("stock page ({}, {}) is empty", blob.epoch, blob.id)))?;
    let rows = rmp_serde::from_slice(&payload[2..])
        .map_err(|e| m.error(format!("stock page of run {bucket}: {e}")))?;
    Ok((bucket, rows))
}

fn chunk_payload(finished: &Finished, chunk: u64) -> Vec<u8> {
    let (from, to) = (chunk * FINISHED_CHUNK, (chunk + 1) * FINISHED_CHUNK);
    let start = from.max(finished.first());
    let mut out = Vec::with_capacity(16 + FINISHED_CHUNK as usize * ENTRY_BYTES);
    out.extend_from_slice(&chunk.to_le_bytes());
    out.extend_from_slice(&start.to_le_bytes());
    for (_, e) in finished.range(from, to) {
        entry_bytes(&mut out, &e);
    }
    out
}

/// `bytes` cut into framed pages of `kind`, each numbered "i of n" so that
/// a loader notices a missing or misplaced one.
fn paged(kind: Kind, partition: u32, generation: u64, bytes: &[u8]) -> Vec<Vec<u8>> {
    let count = bytes.len().div_ceil(PAGE_BYTES);
    bytes
        .chunks(PAGE_BYTES)
        .enumerate()
        .map(|(i, page)| {
            let mut payload = Vec::with_capacity(PAGE_HEADER_BYTES + page.len());
            payload.extend_from_slice(&(i as u32).to_le_bytes());
            payload.extend_from_slice(&(count as u32).to_le_bytes());
            payload.extend_from_slice(page);
            frame(kind, partition, generation, &payload)
        })
        .collect()
}

/// The bytes of pages `refs` of `kind`, joined back in order.
fn joined<'a>(
    m: &Manifest,
    kind: Kind,
    refs: &[BlobRef],
    get: impl Fn(&BlobRef) -> Result<&'a Vec<u8>, SnapshotError>,
) -> Result<Vec<u8>, SnapshotError> {
    let mut out = Vec::new();
    for (i, blob) in refs.iter().enumerate() {
        let payload = unframe(m, kind, *blob, get(blob)?)?;
        let numbers = payload.get(..PAGE_HEADER_BYTES).map(|b| {
            let index = u32::from_le_bytes(b[..4].try_into().expect("4 bytes"));
            let count = u32::from_le_bytes(b[4..].try_into().expect("4 bytes"));
            (index as usize, count as usize)
        });
        if numbers != Some((i, refs.len())) {
            return Err(m.error(format!("{} {i} is out of place: {numbers:?}", kind.name())));
        }
        out.extend_from_slice(&payload[PAGE_HEADER_BYTES..]);
    }
    Ok(out)
}

/// Stock a run of buckets gathers (counted at [`STOCK_ROW_MAX_BYTES`] a
/// row) before the next bucket starts a run of its own. A run of several
/// buckets is one page; a bucket larger than this is a run alone. A
/// partition of a few hundred SKUs is one run, so a checkpoint rewrites one
/// stock page however many of its buckets changed (one statement, not one
/// per bucket, on CQL stores), while a large table keeps runs small enough
/// that a changed SKU rewrites at most this much.
pub const STOCK_RUN_BYTES: usize = 32 * 1024;

/// Consecutive stock buckets `first..end` and the pages holding their
/// rows. A manifest lists a run's pages under its first bucket, and a run
/// reaches the next run's first bucket (the buckets in between are empty).
struct Run {
    first: u16,
    end: u16,
    pages: Vec<BlobRef>,
}

/// The runs a manifest lists, with a run without pages for the empty
/// buckets in front of the first one.
fn runs(m: &Manifest) -> Result<Vec<Run>, SnapshotError> {
    let mut runs = vec![Run {
        first: 0,
        end: STOCK_BUCKETS as u16,
        pages: Vec::new(),
    }];
    for &(first, blob) in &m.stock {
        let last = runs.last_mut().expect("starts with one");
        if first == last.first {
            last.pages.push(blob);
            continue;
        }
        if first < last.first || usize::from(first) >= STOCK_BUCKETS {
            return Err(m.error(format!("stock run {first} is out of order or range")));
        }
        last.end = first;
        runs.push(Run {
            first,
            end: STOCK_BUCKETS as u16,
            pages: vec![blob],
        });
    }
    Ok(runs)
}

/// Stock bytes of buckets `from..to`, counted at the most a row may take.
fn run_bytes(stock: &StockTable, from: u16, to: u16) -> usize {
    (from..to).map(|b| stock.bucket(b).len()).sum::<usize>() * STOCK_ROW_MAX_BYTES
}

/// Rewrites the stock runs holding a `changed` bucket (in order), merged
/// with neighbours small enough to share their pages: the pages of the
/// other runs stay as they are. A table laid out one bucket per run (or
/// grown since) thus packs into fewer runs as its buckets change.
fn write_stock(
    state: &PartitionState,
    manifest: &mut Manifest,
    epoch: u64,
    changed: &[u16],
    blobs: &mut Vec<(BlobRef, Vec<u8>)>,
    garbage: &mut Vec<BlobRef>,
) {
    let touched = |run: &Run| {
        let i = changed.partition_point(|&b| b < run.first);
        changed.get(i).is_some_and(|&b| b < run.end)
    };
    let bytes = |run: &Run| run_bytes(&state.stock, run.first, run.end);
    let mut old = runs(manifest)
        .expect("a written or loaded manifest's runs are in order")
        .into_iter()
        .peekable();
    let mut laid: Vec<Run> = Vec::new();
    while let Some(run) = old.next() {
        if !touched(&run) {
            if !run.pages.is_empty() {
                laid.push(run);
            }
            continue;
        }
        let (mut from, mut to) = (run.first, run.end);
        let mut size = bytes(&run);
        garbage.extend(&run.pages);
        // Untouched runs only ever precede a touched one here: a touched
        // run takes every touched run after it.
        if let Some(before) = laid.pop_if(|b| bytes(b) + size <= STOCK_RUN_BYTES) {
            debug_assert_eq!(before.end, from);
            size += bytes(&before);
            from = before.first;
            garbage.extend(&before.pages);
        }
        while let Some(next) = old.next_if(|n| touched(n) || size + bytes(n) <= STOCK_RUN_BYTES) {
            size += bytes(&next);
            to = next.end;
            garbage.extend(&next.pages);
        }
        lay(state, manifest, epoch, from..to, blobs, &mut laid);
    }
    manifest.stock = laid
        .into_iter()
        .flat_map(|run| run.pages.into_iter().map(move |blob| (run.first, blob)))
        .collect();
}

/// Lays the rows of `buckets` out in new runs of at most
/// [`STOCK_RUN_BYTES`] (a larger bucket alone) and writes their pages.
fn lay(
    state: &PartitionState,
    manifest: &mut Manifest,
    epoch: u64,
    buckets: std::ops::Range<u16>,
    blobs: &mut Vec<(BlobRef, Vec<u8>)>,
    laid: &mut Vec<Run>,
) {
    let (partition, generation) = (manifest.partition, manifest.generation);
    let mut write = |first: u16, end: u16, rows: usize| {
        let skus = (first..end).flat_map(|b| state.stock.bucket(b));
        let pages = stock_pages(first, skus, rows)
            .into_iter()
            .map(|payload| {
                let blob = manifest.allocate(epoch);
                blobs.push((blob, frame(Kind::Stock, partition, generation, &payload)));
                blob
            })
            .collect();
        laid.push(Run { first, end, pages });
    };
    let mut open: Option<(u16, usize)> = None;
    for bucket in buckets.clone() {
        let rows = state.stock.bucket(bucket).len();
        if rows == 0 {
            continue;
        }
        open = match open {
            Some((first, held)) if (held + rows) * STOCK_ROW_MAX_BYTES > STOCK_RUN_BYTES => {
                write(first, bucket, held);
                Some((bucket, rows))
            }
            Some((first, held)) => Some((first, held + rows)),
            None => Some((bucket, rows)),
        };
    }
    if let Some((first, held)) = open {
        write(first, buckets.end, held);
    }
}

/// The next checkpoint of `state`: `manifest` is the last one written (the
/// loaded one after a recovery) and becomes this one's. Blobs get numbers
/// of `epoch`, the writer's ownership epoch.
pub fn checkpoint(state: &mut PartitionState, manifest: &mut Manifest, epoch: u64) -> Checkpoint {
    let changed = state.stock.take_dirty();
    let lane_changed = state.take_lane_changed();
    write(state, manifest, epoch, &changed, lane_changed)
}

/// The checkpoint that rewrites the stock pages of `changed` buckets, and
/// the lane if `lane_changed`.
fn write(
    state: &PartitionState,
    manifest: &mut Manifest,
    epoch: u64,
    changed: &[u16],
    lane_changed: bool,
) -> Checkpoint {
    let partition = manifest.partition;
    manifest.format = FORMAT;
    manifest.generation += 1;
    let generation = manifest.generation;
    let mut blobs = Vec::new();
    let mut garbage = Vec::new();

    write_stock(state, manifest, epoch, changed, &mut blobs, &mut garbage);
    let finished = &state.finished;
    let (first, next) = (finished.first(), finished.next());
    // Chunks whose every entry is gone.
    manifest.chunks.retain(|&(chunk, blob)| {
        let gone = (chunk + 1) * FINISHED_CHUNK <= first;
        if gone {
            garbage.push(blob);
        }
        !gone
    });
    let sealed = next / FINISHED_CHUNK;
    let from_chunk = manifest
        .chunks
        .last()
        .map_or(first / FINISHED_CHUNK, |(c, _)| c + 1)
        .max(first / FINISHED_CHUNK);
    for chunk in from_chunk..sealed {
        let blob = manifest.allocate(epoch);
        let payload = chunk_payload(finished, chunk);
        blobs.push((blob, frame(Kind::Chunk, partition, generation, &payload)));
        manifest.chunks.push((chunk, blob));
    }
    manifest.finished_first = first;
    manifest.finished_next = next;

    let tail_first = (sealed * FINISHED_CHUNK).max(first);
    let mut tail = Vec::with_capacity((next - tail_first) as usize * ENTRY_BYTES);
    for (_, e) in finished.range(tail_first, next) {
        entry_bytes(&mut tail, &e);
    }
    let head: HeadOut<'_> = Head {
        orders: &state.orders,
        holds: &state.holds,
        watermarks: &state.watermarks,
        outbox: &state.outbox,
        tail_first,
        tail,
        failed_effects: &state.failed_effects,
    };
    let head = rmp_serde::to_vec(&head).expect("a head always serializes");
    garbage.append(&mut manifest.head);
    // Never empty: the encoding of a struct has at least its header.
    for page in paged(Kind::Head, partition, generation, &head) {
        let blob = manifest.allocate(epoch);
        blobs.push((blob, page));
        manifest.head.push(blob);
    }

    if lane_changed {
        garbage.append(&mut manifest.lane);
        if !state.parked.is_empty() {
            let lane = rmp_serde::to_vec(&state.parked).expect("the lane always serializes");
            for page in paged(Kind::Lane, partition, generation, &lane) {
                let blob = manifest.allocate(epoch);
                blobs.push((blob, page));
                manifest.lane.push(blob);
            }
        }
    }

    manifest.garbage = garbage.clone();
    let encoded = manifest.encode();
    assert!(
        encoded.len() <= MAX_MANIFEST_BYTES,
        "partition {partition}: a manifest of {} bytes; the limits' worst case must stay under {MAX_MANIFEST_BYTES}",
        encoded.len()
    );
    Checkpoint {
        manifest: encoded,
        blobs,
        drop: garbage,
    }
}

/// A complete snapshot of `state` from nothing (every blob written): what
/// the simulation checks loads back after every step, and what tests use.
pub fn full(state: &PartitionState, partition: u32) -> (Manifest, BTreeMap<BlobRef, Vec<u8>>) {
    let buckets: Vec<u16> = (0..STOCK_BUCKETS as u16)
        .filter(|b| !state.stock.bucket(*b).is_empty())
        .collect();
    let mut manifest = Manifest::empty(partition);
    let cp = write(state, &mut manifest, 0, &buckets, true);
    (manifest, cp.blobs.into_iter().collect())
}

/// The stock pages of the run covering `sku`'s bucket (none if no run
/// does): one of them holds its counters, if it has any.
pub fn stock_pages_of(manifest: &Manifest, sku: &str) -> Vec<BlobRef> {
    let bucket = StockTable::bucket_of(sku);
    let to = manifest.stock.partition_point(|(b, _)| *b <= bucket);
    let Some(&(first, _)) = to.checked_sub(1).map(|last| &manifest.stock[last]) else {
        return Vec::new();
    };
    let from = manifest.stock.partition_point(|(b, _)| *b < first);
    manifest.stock[from..to]
        .iter()
        .map(|(_, blob)| *blob)
        .collect()
}

/// The counters of `sku` in the stock page `blob` (one [`stock_pages_of`]
/// named).
pub fn stock_in_page(
    manifest: &Manifest,
    blob: BlobRef,
    bytes: &[u8],
    sku: &str,
) -> Result<Option<Stock>, SnapshotError> {
    let (_, rows) = stock_rows(manifest, blob, bytes)?;
    Ok(rows
        .into_iter()
        .find(|(s, _)| s == sku)
        .map(|(_, stock)| stock))
}

/// The park lane a manifest describes, from its lane pages (`blobs` must
/// hold every one of `manifest.lane`): what operators list.
pub fn parked_lane(
    manifest: &Manifest,
    blobs: &BTreeMap<BlobRef, Vec<u8>>,
) -> Result<BTreeMap<u64, ParkedRecord>, SnapshotError> {
    let m = manifest;
    if m.lane.is_empty() {
        return Ok(BTreeMap::new());
    }
    let lane = joined(m, Kind::Lane, &m.lane, |blob| present(m, blobs, blob))?;
    rmp_serde::from_slice(&lane).map_err(|e| m.error(format!("undecodable lane: {e}")))
}

/// The failed captures and voids of a checkpoint, with their reasons
/// (`blobs` must hold the manifest's head pages).
pub fn failed_effects(
    manifest: &Manifest,
    blobs: &BTreeMap<BlobRef, Vec<u8>>,
) -> Result<Vec<(Effect, String)>, SnapshotError> {
    let m = manifest;
    let head = joined(m, Kind::Head, &m.head, |blob| present(m, blobs, blob))?;
    let head: HeadIn =
        rmp_serde::from_slice(&head).map_err(|e| m.error(format!("undecodable head: {e}")))?;
    let mut outbox = head.outbox;
    Ok(head
        .failed_effects
        .into_iter()
        .filter_map(|(key, reason)| Some((outbox.remove(&key)?, reason)))
        .collect())
}

fn present<'a>(
    m: &Manifest,
    blobs: &'a BTreeMap<BlobRef, Vec<u8>>,
    blob: &BlobRef,
) -> Result<&'a Vec<u8>, SnapshotError> {
    blobs
        .get(blob)
        .ok_or_else(|| m.error(format!("blob ({}, {}) is missing", blob.epoch, blob.id)))
}

/// Loads the state a manifest describes from its blobs (`blobs` must hold
/// every one [`Manifest::blobs`] lists).
pub fn restore(
    manifest: &Manifest,
    blobs: &BTreeMap<BlobRef, Vec<u8>>,
    limits: FinishedLimits,
) -> Result<PartitionState, SnapshotError> {
    let m = manifest;
    let get = |blob: &BlobRef| present(m, blobs, blob);
    let mut state = PartitionState::default();
    for run in runs(m)? {
        for blob in &run.pages {
            let (held, rows) = stock_rows(m, *blob, get(blob)?)?;
            if held != run.first {
                return Err(m.error(format!(
                    "a stock page of run {} holds run {held}",
                    run.first
                )));
            }
            state
                .stock
                .restore_rows(run.first..run.end, rows)
                .map_err(|e| m.error(e.to_string()))?;
        }
    }

    let head = joined(m, Kind::Head, &m.head, get)?;
    let head: HeadIn =
        rmp_serde::from_slice(&head).map_err(|e| m.error(format!("undecodable head: {e}")))?;

    let mut entries = Vec::new();
    let mut expected = m.finished_first;
    let mut take = |start: u64, list: &[u8], what: &str| -> Result<(), SnapshotError> {
        let list = entries_of(list).ok_or_else(|| m.error(format!("{what}: ragged entries")))?;
        for (number, entry) in (start..).zip(list) {
            if number < expected {
                continue; // expired since the chunk was written
            }
            if number != expected {
                return Err(m.error(format!(
                    "{what}: finished entry {number} where {expected} was expected"
                )));
            }
            entries.push(entry);
            expected += 1;
        }
        Ok(())
    };
    for (chunk, blob) in &m.chunks {
        let payload = unframe(m, Kind::Chunk, *blob, get(blob)?)?;
        if payload.len() < 16 || u64::from_le_bytes(payload[..8].try_into().expect("8")) != *chunk {
            return Err(m.error(format!("chunk {chunk} holds another chunk")));
        }
        let start = u64::from_le_bytes(payload[8..16].try_into().expect("8 bytes"));
        take(start, &payload[16..], &format!("chunk {chunk}"))?;
    }
    take(head.tail_first, &head.tail, "head")?;
    if expected != m.finished_next {
        return Err(m.error(format!(
            "finished entries end at {expected}, the manifest says {}",
            m.finished_next
        )));
    }
    state.finished = Finished::restore(limits, m.finished_first, entries);
    state.orders = head.orders;
    state.holds = head.holds;
    state.watermarks = head.watermarks;
    state.outbox = head.outbox;
    state.failed_effects = head.failed_effects;
    if let Some((order_id, kind)) = state
        .failed_effects
        .keys()
        .find(|k| !state.outbox.contains_key(*k))
    {
        return Err(m.error(format!(
            "failed effect {order_id}:{} is not in the outbox",
            kind.as_str()
        )));
    }
    state.parked = parked_lane(m, blobs)?;
    state.reindex();
    state.check_stock().map_err(|e| m.error(e.to_string()))?;
    // Loaded as written: nothing to rewrite until something changes.
    state.stock.take_dirty();
    Ok(state)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::domain::Status;
    use crate::stages::state::{Saga, SagaLine};

    fn limits() -> FinishedLimits {
        FinishedLimits {
            max_age_ms: u64::MAX / 4,
            max_entries: 100_000,
        }
    }

    fn sample(skus: usize, finished: u64, in_flight: usize) -> PartitionState {
        let mut s = PartitionState::default();
        s.finished = Finished::new(limits());
        for i in 0..skus {
            s.stock.insert(
                format!("SKU-{i}"),
                Stock {
                    available: i as u64,
                    reserved: 1,
                    sold: 2,
                    supplied: i as u64 + 3,
                },
            );
            s.holds.insert(
                (format!("o{i}"), 0),
                Hold {
                    sku: format!("SKU-{i}"),
                    quantity: 1,
                },
            );
        }
        for n in 0..finished {
            s.finished
                .insert(OrderKey::of(&format!("f{n}")), 1_000 + n, n % 3 == 0);
        }
        for i in 0..in_flight {
            s.orders.insert(
                format!("o{i}"),
                OrderRec {
                    seq: 2,
                    status: Status::Reserved,
                    saga: Some(Saga {
                        lines: vec![SagaLine {
                            sku: "SKU-0".into(),
                            quantity: 1,
                            state: crate::stages::state::LineState::Held,
                        }],
                        home_key: "SKU-0".into(),
                        amount: 100,
                        currency: "USD".into(),
                        token: String::new(),
                        authorizing: true,
                        email: Some("a@example.com".into()),
                    }),
                },
            );
        }
        s.watermarks.insert(3, (10, 1));
        s
    }

    /// Applies a checkpoint to a blob map, as a store would.
    fn apply(blobs: &mut BTreeMap<BlobRef, Vec<u8>>, cp: &Checkpoint) {
        blobs.extend(cp.blobs.iter().cloned());
        for b in &cp.drop {
            blobs.remove(b);
        }
    }

    /// A full snapshot loads back to an equal state with the same hash.
    #[test]
    fn full_snapshot_round_trips() {
        let s = sample(50, 20_000, 30);
        let (m, blobs) = full(&s, 4);
        let m = Manifest::decode(4, &m.encode()).unwrap();
        let back = restore(&m, &blobs, limits()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.hash(), s.hash());
        assert_eq!(m.chunks.len(), 2, "20,000 entries: two full chunks");
    }

    /// Incremental checkpoints write only what changed; chunks are written
    /// once and dropped whole; what the store holds stays loadable.
    #[test]
    fn incremental_checkpoints() {
        let mut s = sample(3, 0, 0);
        let mut m = Manifest::empty(1);
        let mut store = BTreeMap::new();
        let first = checkpoint(&mut s, &mut m, 7);
        apply(&mut store, &first);
        assert_eq!(
            first.blobs.len(),
            2,
            "one stock page (one run) and one head page"
        );

        // Nothing changed: only the head page is rewritten.
        let second = checkpoint(&mut s, &mut m, 7);
        assert_eq!(second.blobs.len(), 1);
        assert_eq!(second.drop.len(), 1, "the old head page");
        apply(&mut store, &second);

        // One SKU changes, 20,000 orders finish: one stock page, two chunks.
        s.stock.get_mut("SKU-1").unwrap().available += 1;
        s.stock.get_mut("SKU-1").unwrap().supplied += 1;
        for n in 0..20_000 {
            s.finished.insert(OrderKey::of(&format!("x{n}")), n, false);
        }
        let third = checkpoint(&mut s, &mut m, 8);
        assert_eq!(third.blobs.len(), 1 + 2 + 1);
        assert!(third.blobs.iter().all(|(b, _)| b.epoch == 8));
        apply(&mut store, &third);
        let loaded = Manifest::decode(1, &third.manifest).unwrap();
        assert_eq!(restore(&loaded, &store, limits()).unwrap(), s);

        // The count limit drops the oldest: the first chunk goes whole.
        s.finished.set_limits(FinishedLimits {
            max_age_ms: u64::MAX / 4,
            max_entries: 10_000,
        });
        let fourth = checkpoint(&mut s, &mut m, 8);
        assert_eq!(m.chunks.len(), 1);
        assert!(fourth.drop.contains(&third.blobs[1].0));
        apply(&mut store, &fourth);
        let loaded = Manifest::decode(1, &fourth.manifest).unwrap();
        let back = restore(&loaded, &store, s.finished.limits()).unwrap();
        assert_eq!(back, s);
        assert_eq!(store.len(), m.blobs().len(), "no blob leaked");
    }

    /// A large in-flight state is cut into head pages under the page limit.
    #[test]
    fn head_pages_are_bounded() {
        let s = sample(1, 0, 10_000);
        let (m, blobs) = full(&s, 0);
        assert!(m.head.len() > 1, "{} head pages", m.head.len());
        assert!(blobs.values().all(|b| b.len() <= MAX_BLOB_BYTES));
        assert_eq!(restore(&m, &blobs, limits()).unwrap(), s);
    }

    /// Every kind of damage is an error naming the partition and generation.
    #[test]
    fn damage_is_a_clear_error() {
        let s = sample(2, 10_000, 2);
        let (m, blobs) = full(&s, 2);
        for blob in m.blobs() {
            let mut bad = blobs.clone();
            bad.get_mut(&blob).unwrap()[HEADER_BYTES] ^= 1;
            let e = restore(&m, &bad, limits()).unwrap_err();
            assert_eq!((e.partition, e.generation), (2, 1));
            assert!(e.to_string().contains("checksum mismatch"), "{e}");
            let mut gone = blobs.clone();
            gone.remove(&blob);
            assert!(
                restore(&m, &gone, limits())
                    .unwrap_err()
                    .detail
                    .contains("missing")
            );
        }
        assert!(
            Manifest::decode(3, &m.encode())
                .unwrap_err()
                .detail
                .contains("partition 2")
        );
        assert!(Manifest::decode(2, b"\x93garbage").is_err());
        // A stock page of another partition is refused.
        let (other, other_blobs) = full(&s, 5);
        let mut mixed = blobs.clone();
        mixed.insert(m.stock[0].1, other_blobs[&other.stock[0].1].clone());
        let e = restore(&m, &mixed, limits()).unwrap_err();
        assert!(e.detail.contains("partition 5"), "{e}");
    }

    /// Every item at its field limits encodes within the constants that
    /// `worst_case` sums, and the defaults' manifest bound is far below the
    /// stores' limits.
    #[test]
    fn worst_case_items_fit_their_bounds() {
        use crate::domain::RecordKind;
        use crate::domain::order::{
            MAX_EMAIL_LEN, MAX_ID_LEN, MAX_LINES, MAX_SKU_LEN, MAX_TOKEN_LEN,
        };
        use crate::stages::state::{LineState, parked_size};
        let id = "i".repeat(MAX_ID_LEN);
        let sku = "s".repeat(MAX_SKU_LEN);
        let token = "t".repeat(MAX_TOKEN_LEN);
        let size = |v: &dyn erased::Encode| v.len();
        let row = (
            sku.clone(),
            Stock {
                available: u64::MAX,
                reserved: u64::MAX,
                sold: u64::MAX,
                supplied: u64::MAX,
            },
        );
        assert!(
            size(&row) <= STOCK_ROW_MAX_BYTES,
            "stock row: {}",
            size(&row)
        );
        let order = (
            id.clone(),
            OrderRec {
                seq: u32::MAX,
                status: Status::PaymentFailed,
                saga: Some(Saga {
                    lines: (0..MAX_LINES)
                        .map(|_| SagaLine {
                            sku: sku.clone(),
                            quantity: u32::MAX,
                            state: LineState::Pending,
                        })
                        .collect(),
                    home_key: sku.clone(),
                    amount: u64::MAX,
                    currency: "USD".into(),
                    token: token.clone(),
                    authorizing: true,
                    email: Some("e".repeat(MAX_EMAIL_LEN)),
                }),
            },
        );
        assert!(size(&order) <= ORDER_MAX_BYTES, "order: {}", size(&order));
        let hold = (
            (id.clone(), u16::MAX),
            Hold {
                sku: sku.clone(),
                quantity: u32::MAX,
            },
        );
        assert!(size(&hold) <= HOLD_MAX_BYTES, "hold: {}", size(&hold));
        let effect = (
            (id.clone(), EffectKind::Authorize),
            Effect {
                order_id: id.clone(),
                kind: EffectKind::Authorize,
                reply_key: sku.clone(),
                amount: u64::MAX,
                currency: "USD".into(),
                token: token.clone(),
                payment_id: token.clone(),
            },
        );
        assert!(
            size(&effect) <= EFFECT_MAX_BYTES,
            "effect: {}",
            size(&effect)
        );
        let failed = ((id.clone(), EffectKind::Capture), token.clone());
        assert!(
            size(&failed) <= FAILED_EFFECT_MAX_BYTES,
            "failed effect: {}",
            size(&failed)
        );
        let watermark = (u32::MAX, (u64::MAX, u32::MAX));
        assert!(
            size(&watermark) <= WATERMARK_MAX_BYTES,
            "watermark: {}",
            size(&watermark)
        );
        let parked = ParkedRecord {
            partition: u32::MAX,
            offset: u64::MAX,
            timestamp_ms: u64::MAX,
            kind: RecordKind::Internal,
            key: vec![0xff; 300],
            value: vec![0xff; 5_000],
            reason: "r".repeat(400),
            order_id: Some(id.clone()),
        };
        let entry = (u64::MAX, parked.clone());
        assert!(
            size(&entry) <= 2 * parked_size(&parked) + PARKED_OVERHEAD_BYTES,
            "parked: {}",
            size(&entry)
        );
        let blob = BlobRef {
            epoch: u64::MAX,
            id: u64::MAX,
        };
        assert!(size(&(u64::MAX, blob)) <= MANIFEST_ENTRY_MAX_BYTES);

        let defaults = worst_case(&Limits::default(), 1024);
        assert!(
            defaults.manifest_bytes <= MAX_MANIFEST_BYTES / 8,
            "{defaults:?}"
        );
        assert_eq!(defaults.blob_bytes, MAX_BLOB_BYTES);
        const { assert!(MAX_BLOB_BYTES < 300 * 1024) };
    }

    /// SKUs that all fall into one bucket are cut into several stock pages
    /// under the page limit, and load back.
    #[test]
    fn a_crowded_bucket_spans_pages() {
        let mut s = PartitionState::default();
        let bucket = StockTable::bucket_of("seed");
        let crowd = (0u64..)
            .map(|n| format!("{n:0>64}"))
            .filter(|sku| StockTable::bucket_of(sku) == bucket)
            .take(3_000);
        for sku in crowd {
            s.stock.insert(
                sku,
                Stock {
                    available: u64::MAX / 4,
                    reserved: u64::MAX / 4,
                    sold: u64::MAX / 4,
                    supplied: u64::MAX / 4 * 3,
                },
            );
        }
        let (m, blobs) = full(&s, 0);
        assert!(m.stock.len() >= 2, "{} pages", m.stock.len());
        assert!(blobs.values().all(|b| b.len() <= MAX_BLOB_BYTES));
        let back = restore(&m, &blobs, limits()).unwrap();
        assert_eq!(back, s);
        let sku = s.stock.iter().last().unwrap().0.clone();
        let pages = stock_pages_of(&m, &sku);
        assert_eq!(pages.len(), m.stock.len());
        let found = pages
            .iter()
            .find_map(|p| stock_in_page(&m, *p, &blobs[p], &sku).unwrap());
        assert_eq!(found.map(|s| s.available), Some(u64::MAX / 4));
    }

    /// The lane has pages of its own, rewritten only when it changed, and
    /// readable without the rest of the snapshot.
    #[test]
    fn lane_pages_are_written_when_the_lane_changes() {
        use crate::domain::RecordKind;
        let record = |offset: u64| ParkedRecord {
            partition: 1,
            offset,
            timestamp_ms: 5,
            kind: RecordKind::Internal,
            key: b"k".to_vec(),
            value: vec![offset as u8; 100_000],
            reason: "bad".into(),
            order_id: None,
        };
        let mut s = sample(1, 0, 1);
        let mut m = Manifest::empty(1);
        let mut store = BTreeMap::new();
        apply(&mut store, &checkpoint(&mut s, &mut m, 1));
        assert!(m.lane.is_empty(), "an empty lane has no pages");
        for offset in 0..4 {
            s.park(offset, record(offset));
        }
        apply(&mut store, &checkpoint(&mut s, &mut m, 1));
        assert!(m.lane.len() >= 2, "400 KB of lane: {} pages", m.lane.len());
        let lane = m.lane.clone();
        let cp = checkpoint(&mut s, &mut m, 1);
        assert_eq!(m.lane, lane, "unchanged: the same pages");
        assert_eq!(cp.blobs.len(), m.head.len());
        apply(&mut store, &cp);
        assert_eq!(parked_lane(&m, &store).unwrap(), s.parked);
        s.unpark(2);
        apply(&mut store, &checkpoint(&mut s, &mut m, 1));
        assert_ne!(m.lane, lane);
        assert_eq!(parked_lane(&m, &store).unwrap().len(), 3);
        assert_eq!(restore(&m, &store, limits()).unwrap(), s);
        assert_eq!(store.len(), m.blobs().len(), "no blob leaked");
    }

    /// MessagePack sizes of any serializable value, for the bounds test.
    mod erased {
        pub trait Encode {
            fn len(&self) -> usize;
        }
        impl<T: serde::Serialize> Encode for T {
            fn len(&self) -> usize {
                rmp_serde::to_vec(self).unwrap().len()
            }
        }
    }

    /// `n` SKUs with small counters.
    fn table(n: usize) -> PartitionState {
        let mut s = PartitionState::default();
        for i in 0..n {
            let stock = Stock::default().with_available(i as u64).unwrap();
            s.stock.insert(format!("SKU-{i}"), stock);
        }
        s
    }

    /// The counters `sku` has in a stored snapshot, found as a reader
    /// looking up one SKU finds them.
    fn stored(m: &Manifest, blobs: &BTreeMap<BlobRef, Vec<u8>>, sku: &str) -> Option<Stock> {
        stock_pages_of(m, sku)
            .iter()
            .find_map(|p| stock_in_page(m, *p, &blobs[p], sku).unwrap())
    }

    /// A large table is cut into runs of at most STOCK_RUN_BYTES, each one
    /// page; a changed SKU rewrites its run's page only.
    #[test]
    fn stock_runs_are_bounded_and_rewritten_alone() {
        let mut s = table(3_000);
        let mut m = Manifest::empty(0);
        let mut store = BTreeMap::new();
        apply(&mut store, &checkpoint(&mut s, &mut m, 1));
        let least = 3_000 * STOCK_ROW_MAX_BYTES / STOCK_RUN_BYTES;
        assert!(
            (least..2 * least).contains(&m.stock.len()),
            "{} runs",
            m.stock.len()
        );
        let firsts: std::collections::BTreeSet<u16> = m.stock.iter().map(|(b, _)| *b).collect();
        assert_eq!(firsts.len(), m.stock.len(), "one page per run");

        s.stock.get_mut("SKU-7").unwrap().supplied += 1;
        s.stock.get_mut("SKU-7").unwrap().available += 1;
        let cp = checkpoint(&mut s, &mut m, 1);
        assert_eq!(cp.blobs.len(), 2, "the run of SKU-7 and the head page");
        assert_eq!(cp.drop.len(), 2);
        apply(&mut store, &cp);
        let m = Manifest::decode(0, &cp.manifest).unwrap();
        assert_eq!(restore(&m, &store, limits()).unwrap(), s);
        for i in (0..3_000).step_by(97).chain([7]) {
            let sku = format!("SKU-{i}");
            assert_eq!(
                stored(&m, &store, &sku).as_ref(),
                s.stock.get(&sku),
                "{sku}"
            );
        }
        assert_eq!(stored(&m, &store, "SKU-none"), None);
    }

    /// A blob as format 1 framed it (the same bytes under another number).
    fn format_1(mut blob: Vec<u8>) -> Vec<u8> {
        blob[4] = 1;
        let body = blob.len() - CRC_BYTES;
        let crc = crc32c::crc32c(&blob[..body]);
        blob[body..].copy_from_slice(&crc.to_le_bytes());
        blob
    }

    /// A format 1 snapshot, laid out one bucket per page, loads unchanged
    /// and packs into one run once its SKUs change.
    #[test]
    fn bucket_pages_load_and_pack_into_runs() {
        let s = table(100);
        let mut m = Manifest::empty(0);
        (m.format, m.generation) = (1, 1);
        let mut store = BTreeMap::new();
        for bucket in 0..STOCK_BUCKETS as u16 {
            let rows = s.stock.bucket(bucket);
            if rows.is_empty() {
                continue;
            }
            for payload in stock_pages(bucket, rows.iter(), rows.len()) {
                let blob = m.allocate(1);
                store.insert(blob, format_1(frame(Kind::Stock, 0, 1, &payload)));
                m.stock.push((bucket, blob));
            }
        }
        let (_, head) = full(&s, 0);
        // The last blob a full snapshot writes is its head page.
        let (_, head_bytes) = head.into_iter().next_back().unwrap();
        let head_blob = m.allocate(1);
        m.head.push(head_blob);
        store.insert(head_blob, format_1(head_bytes));
        let mut future = m.clone();
        future.format = FORMAT + 1;
        let refused = Manifest::decode(0, &future.encode()).unwrap_err();
        assert!(
            refused
                .detail
                .contains("format 3 (this build reads 1 to 2)"),
            "{refused}"
        );
        let pages = m.stock.len();
        assert!(pages > 50, "{pages} one-bucket pages");
        let mut back = restore(&m, &store, limits()).unwrap();
        assert_eq!(back, s);
        assert_eq!(stored(&m, &store, "SKU-42").as_ref(), s.stock.get("SKU-42"));

        // Taking a SKU's counters to change marks its bucket changed.
        for i in 0..100 {
            back.stock.get_mut(&format!("SKU-{i}")).unwrap();
        }
        let cp = checkpoint(&mut back, &mut m, 2);
        assert_eq!(m.stock.len(), 1, "one run");
        assert_eq!(m.format, FORMAT);
        assert_eq!(cp.drop.len(), pages + 1, "every old page and the head");
        apply(&mut store, &cp);
        assert_eq!(store.len(), m.blobs().len(), "no blob leaked");
        assert_eq!(restore(&m, &store, limits()).unwrap(), s);
    }

    /// Unconserved stock in a snapshot is refused at load.
    #[test]
    fn unconserved_stock_is_refused() {
        let mut s = sample(1, 0, 0);
        s.holds.clear();
        s.stock.get_mut("SKU-0").unwrap().sold = u64::MAX;
        let (m, blobs) = full(&s, 0);
        let e = restore(&m, &blobs, limits()).unwrap_err();
        assert!(e.detail.contains("conservation"), "{e}");
    }

    proptest! {
        /// Arbitrary bytes in place of any blob never panic the loader.
        #[test]
        fn arbitrary_blob_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400), which in 0usize..8) {
            let s = sample(2, 9_000, 1);
            let (m, mut blobs) = full(&s, 0);
            let all = m.blobs();
            let target = all[which % all.len()];
            let mut framed = bytes.clone();
            if which % 2 == 0 {
                // Valid frame, arbitrary payload.
                let kind = if m.head.contains(&target) { Kind::Head } else if m.chunks.iter().any(|c| c.1 == target) { Kind::Chunk } else { Kind::Stock };
                framed = frame(kind, 0, 1, &bytes);
            }
            blobs.insert(target, framed);
            let _ = restore(&m, &blobs, limits());
        }

        /// Through any sequence of new and changed SKUs, each checkpoint
        /// loads back to the state, leaks no blob, and finds every SKU.
        #[test]
        fn stock_runs_round_trip(steps in prop::collection::vec((0usize..600, prop::collection::vec(any::<u16>(), 0..40)), 1..8)) {
            let mut s = PartitionState::default();
            let mut m = Manifest::empty(0);
            let mut store = BTreeMap::new();
            let mut skus = 0;
            for (new, changes) in steps {
                for i in skus..skus + new {
                    s.stock.insert(format!("S{i}"), Stock::default().with_available(1).unwrap());
                }
                skus += new;
                for c in changes.iter().filter(|_| skus > 0) {
                    let stock = s.stock.get_mut(&format!("S{}", usize::from(*c) % skus)).unwrap();
                    stock.supplied += 1;
                    stock.available += 1;
                }
                let cp = checkpoint(&mut s, &mut m, 1);
                apply(&mut store, &cp);
                let loaded = Manifest::decode(0, &cp.manifest).unwrap();
                prop_assert_eq!(&restore(&loaded, &store, limits()).unwrap(), &s);
                prop_assert_eq!(store.len(), m.blobs().len());
                for i in (0..skus).step_by(53) {
                    let sku = format!("S{i}");
                    prop_assert_eq!(stored(&m, &store, &sku), s.stock.get(&sku).cloned());
                }
            }
        }
    }
}
