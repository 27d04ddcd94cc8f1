//! Heap allocations and CPU time per order in the partition processor
//! alone (no log, no I/O, one thread), counted by a global allocator that
//! wraps the system's: the hot path's own cost, without the runtime's.
//!
//! One order is the records a single-line order makes on its partition:
//! the order's JSON, the payment result, and the capture's completion,
//! applied with `Processor::apply` exactly as the runner applies them. The
//! records are encoded before counting starts, so only processing counts.
//!
//! Run: `cargo bench --bench allocs -- --orders 200000`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use clap::Parser;
use orderflow::domain::{EffectKind, Envelope, Message, PaymentOutcome, RecordKind};
use orderflow::stages::processor::Input;
use orderflow::stages::{Output, PartitionState, Processor};

/// Counts every allocation (and reallocation) and the bytes asked for.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: delegates every call to `System` unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Parser, Debug)]
#[command(about = "orderflow processor allocations and CPU per order")]
struct Args {
    /// Orders measured (after as many again to warm up).
    #[arg(long, default_value_t = 200_000)]
    orders: u64,
    /// Distinct SKUs, all on the one partition measured.
    #[arg(long, default_value_t = 1000)]
    skus: u32,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The records of one single-line order, in log order.
struct OrderRecords {
    key: Vec<u8>,
    order: Vec<u8>,
    payment: Vec<u8>,
    captured: Vec<u8>,
}

fn order_records(n: u64, skus: u32) -> OrderRecords {
    let sku = format!("SKU-{:05}", n % u64::from(skus));
    let order_id = format!("al-{n}");
    let order = serde_json::json!({
        "order_id": order_id, "customer_id": "c-1", "currency": "USD",
        "lines": [{"sku": sku, "quantity": 1, "unit_price": 1999}],
        "payment": {"token": "tok_visa"}
    });
    let payment = Message::PaymentResult {
        order_id: order_id.clone(),
        outcome: PaymentOutcome::Authorized {
            payment_id: format!("pi_{n}"),
        },
    };
    let captured = Message::EffectDone {
        order_id,
        kind: EffectKind::Capture,
    };
    OrderRecords {
        key: sku.into_bytes(),
        order: serde_json::to_vec(&order).expect("json"),
        payment: Envelope::new(None, payment).encode(),
        captured: Envelope::new(None, captured).encode(),
    }
}

/// Applies `orders`, starting at log offset `*offset`; the output is
/// cleared after each record, as the runner hands it on.
fn apply_all(p: &mut Processor, orders: &[OrderRecords], offset: &mut u64, out: &mut Output) {
    for o in orders {
        for (kind, value) in [
            (RecordKind::OrderJson, &o.order),
            (RecordKind::Internal, &o.payment),
            (RecordKind::Internal, &o.captured),
        ] {
            p.apply(
                Input {
                    offset: *offset,
                    // Log time advances 1 ms per record: deterministic.
                    timestamp_ms: 1_700_000_000_000 + *offset,
                    kind,
                    key: &o.key,
                    value,
                },
                out,
            );
            *offset += 1;
            out.clear();
        }
    }
}

fn main() {
    let args = Args::parse();
    let mut p = Processor::new(0, 1, PartitionState::default());
    let mut out = Output::default();
    let mut offset = 0;
    for s in 0..args.skus {
        let sku = format!("SKU-{s:05}");
        let set = Envelope::new(
            None,
            Message::SetStock {
                sku: sku.clone(),
                available: 1_000_000_000,
            },
        )
        .encode();
        p.apply(
            Input {
                offset,
                timestamp_ms: 1_700_000_000_000,
                kind: RecordKind::Internal,
                key: sku.as_bytes(),
                value: &set,
            },
            &mut out,
        );
        offset += 1;
        out.clear();
    }
    let warm: Vec<OrderRecords> = (0..args.orders)
        .map(|n| order_records(n, args.skus))
        .collect();
    let measured: Vec<OrderRecords> = (args.orders..2 * args.orders)
        .map(|n| order_records(n, args.skus))
        .collect();
    apply_all(&mut p, &warm, &mut offset, &mut out);

    let (allocs, bytes) = (
        ALLOCS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    );
    let start = Instant::now();
    apply_all(&mut p, &measured, &mut offset, &mut out);
    let took = start.elapsed();
    let allocs = ALLOCS.load(Ordering::Relaxed) - allocs;
    let bytes = BYTES.load(Ordering::Relaxed) - bytes;

    let n = args.orders as f64;
    let confirmed = measured
        .iter()
        .filter(|o| {
            let id =
                serde_json::from_slice::<serde_json::Value>(&o.order).expect("json")["order_id"]
                    .as_str()
                    .map(str::to_owned)
                    .expect("id");
            p.state
                .orders
                .get(&id)
                .is_some_and(|r| r.status.as_str() == "confirmed")
        })
        .count();
    assert_eq!(
        confirmed as u64, args.orders,
        "every measured order must confirm"
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "allocs",
            "orders": args.orders,
            "skus": args.skus,
            "allocations_per_order": allocs as f64 / n,
            "bytes_allocated_per_order": bytes as f64 / n,
            "ns_per_order": took.as_nanos() as f64 / n,
        })
    );
}
