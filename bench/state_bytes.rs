//! Bytes of state per remembered order, for BENCHMARKS.md:
//! - the processor's finished set (what makes a repeated order id one
//!   order): bytes per entry in a snapshot (its chunks and tail) and in
//!   memory (ring and index, as allocated);
//! - the tracking read model: bytes per tracked order in memory (heap
//!   growth while N confirmed orders are applied, 4 statuses each).
//!
//! Run: `cargo bench --bench state_bytes -- --orders 1000000`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use clap::Parser;
use orderflow::domain::{OrderKey, Status, StatusEvent};
use orderflow::sinks::tracking::model::{ModelLimits, PartitionModel};
use orderflow::stages::PartitionState;
use orderflow::stages::finished::{Finished, FinishedLimits};
use orderflow::stages::snapshot;

/// Counts live heap bytes (the read model's growth).
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[derive(Parser, Debug)]
struct Args {
    /// Orders to remember.
    #[arg(long, default_value_t = 1_000_000)]
    orders: u64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const PATH: [Status; 4] = [
    Status::Accepted,
    Status::Reserved,
    Status::Paid,
    Status::Confirmed,
];

/// An id like intake makes: "ord-" + 26 letters.
fn order_id(n: u64) -> String {
    let mut id = String::from("ord-");
    let mut x = u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
    for _ in 0..26 {
        id.push(char::from(b'a' + (x % 26) as u8));
        x /= 26;
    }
    id
}

fn finished_set(orders: u64) {
    let limits = FinishedLimits {
        max_age_ms: u64::MAX / 4,
        max_entries: orders as usize,
    };
    let before = LIVE.load(Ordering::Relaxed);
    let mut finished = Finished::new(limits);
    for n in 0..orders {
        finished.insert(
            OrderKey::of(&order_id(n)),
            1_800_000_000_000 + n,
            n % 2 == 0,
        );
    }
    let heap = LIVE.load(Ordering::Relaxed) - before;
    let mut state = PartitionState::default();
    state.finished = finished;
    let (manifest, blobs) = snapshot::full(&state, 0);
    let stored: usize = blobs.values().map(Vec::len).sum::<usize>() + manifest.encode().len();
    println!(
        "finished set: {orders} orders, snapshot {stored} bytes ({:.1} bytes per order, {} chunks), \
         memory {heap} bytes ({:.1} bytes per order)",
        stored as f64 / orders as f64,
        manifest.chunks.len(),
        heap as f64 / orders as f64,
    );
}

fn read_model(orders: u64) {
    let limits = ModelLimits {
        max_orders: orders as usize,
        retention_ms: u64::MAX / 4,
    };
    let before = LIVE.load(Ordering::Relaxed);
    let mut model = PartitionModel::new(limits, 0);
    let mut offset = 0;
    for n in 0..orders {
        for (i, status) in PATH.iter().enumerate() {
            let event = StatusEvent {
                order_id: order_id(n),
                seq: i as u32 + 1,
                status: *status,
                reason: None,
                at_ms: 1_800_000_000_000 + n + i as u64 * 20,
                refused_skus: Vec::new(),
                released_lines: 0,
                src: None,
                email: None,
            };
            model.apply(offset, Some(&event));
            offset += 1;
        }
    }
    let heap = LIVE.load(Ordering::Relaxed) - before;
    assert_eq!(model.len() as u64, orders);
    assert_eq!(
        model.get(&order_id(orders / 2)).map(|v| v.status),
        Some(Status::Confirmed)
    );
    println!(
        "read model: {orders} confirmed orders, memory {heap} bytes ({:.1} bytes per order)",
        heap as f64 / orders as f64
    );
}

fn main() {
    let args = Args::parse();
    finished_set(args.orders);
    read_model(args.orders);
}
