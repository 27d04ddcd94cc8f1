//! Bytes per tracked order in the read model: the embedded store's file
//! growth when the tracking sink applies the statuses of N orders (each
//! accepted → reserved → paid → confirmed, as the pipeline emits them), in
//! the sink's batch size. Order ids have the shape HTTP intake gives them.
//!
//! Run: `cargo bench --bench read_model -- --orders 200000`

use clap::Parser;
use orderflow::domain::{Status, StatusEvent};
use orderflow::pipeline::store::StateStore;
use orderflow::pipeline::store::embedded::EmbeddedStore;

#[derive(Parser, Debug)]
struct Args {
    /// Orders to track.
    #[arg(long, default_value_t = 200_000)]
    orders: u64,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Events per store transaction: the tracking sink's batch.
const BATCH_EVENTS: usize = 4096;
/// Status path of a confirmed order.
const PATH: [Status; 4] = [
    Status::Accepted,
    Status::Reserved,
    Status::Paid,
    Status::Confirmed,
];

/// An id like intake's: "ord-" + 32 hex characters.
fn order_id(n: u64) -> String {
    format!(
        "ord-{:032x}",
        u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
    )
}

/// Orders handled together: a batch carries one step of each of them, so
/// every view is rewritten once per status, as in the pipeline.
const ORDERS_PER_ROUND: u64 = (BATCH_EVENTS / PATH.len()) as u64;

fn events(orders: u64) -> Vec<StatusEvent> {
    let mut out = Vec::with_capacity(orders as usize * PATH.len());
    for first in (0..orders).step_by(ORDERS_PER_ROUND as usize) {
        let round = first..(first + ORDERS_PER_ROUND).min(orders);
        for (i, status) in PATH.iter().enumerate() {
            out.extend(round.clone().map(|n| StatusEvent {
                order_id: order_id(n),
                seq: i as u32 + 1,
                status: *status,
                reason: None,
                at_ms: 1_800_000_000_000 + n + i as u64 * 20,
                refused_skus: Vec::new(),
                released_lines: 0,
            }));
        }
    }
    out
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("state.redb");
        let store = EmbeddedStore::open(&path)?;
        let empty = std::fs::metadata(&path)?.len();
        let all = events(args.orders);
        let mut position = 0u64;
        for batch in all.chunks(BATCH_EVENTS) {
            position += batch.len() as u64;
            store.apply_tracking("tracking", &[(0, position)], batch).await?;
        }
        let sample = store
            .get_tracking(&order_id(args.orders / 2))
            .await?
            .ok_or_else(|| anyhow::anyhow!("a tracked order is missing"))?;
        assert_eq!(sample.status, Status::Confirmed);
        drop(store);
        let size = std::fs::metadata(&path)?.len();
        let per_order = (size - empty) as f64 / args.orders as f64;
        println!(
            "read model: {} orders, {} statuses each, store file {} -> {} bytes: {per_order:.0} bytes per tracked order",
            args.orders,
            PATH.len(),
            empty,
            size
        );
        anyhow::Ok(())
    })
}
