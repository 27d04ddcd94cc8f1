//! Property tests of the partition processor in the simulated world of
//! `orderflow::sim`: N partitions on simulated disks, random orders
//! (single- and multi-SKU), restocks, declines, gateway failures and
//! outages, and random crash points (a partition's unsynced log tail is
//! torn, its processor is rebuilt from its last checkpoint and replays the
//! tail, re-emitting what it emitted before). After every step the
//! invariants of docs/design.md hold; at the end every order is terminal, money
//! and stock agree, and replaying each partition from offset 0 gives the
//! live state hash.

use orderflow::domain::Status;
use orderflow::sim::{SimConfig, Step, World, run_steps, sku_count};
use proptest::prelude::*;

const PARTITIONS: u32 = 4;

fn step_strategy(n: u32) -> impl Strategy<Value = Step> {
    let skus = sku_count(n) as u16;
    prop_oneof![
        4 => (0u32..40, prop::collection::vec((0..skus, 1u32..4), 1..4), prop::bool::weighted(0.2))
            .prop_map(|(id, lines, decline)| Step::Place { id, lines, decline }),
        1 => (0..skus, 0u64..20).prop_map(|(sku, available)| Step::Restock { sku, available }),
        6 => (0..n, 1u32..8).prop_map(|(p, count)| Step::Process { p, count }),
        3 => (1u32..4, any::<u64>()).prop_map(|(count, entropy)| Step::Effects { count, entropy }),
        3 => (0..n).prop_map(|p| Step::Fsync { p }),
        1 => (1u64..500).prop_map(|ms| Step::Advance { ms }),
        1 => (0..n).prop_map(|p| Step::Checkpoint { p }),
        1 => (0..n, any::<u64>()).prop_map(|(p, entropy)| Step::Crash { p, entropy }),
        1 => any::<u64>().prop_map(|entropy| Step::CrashAll { entropy }),
        1 => prop::bool::ANY.prop_map(|down| Step::Outage { down }),
    ]
}

/// Stock of every SKU, made durable, before the random steps.
fn stocked(n: u32, available: u64) -> Vec<Step> {
    (0..sku_count(n) as u16)
        .map(|sku| Step::Restock { sku, available })
        .chain((0..n).map(|p| Step::Fsync { p }))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Random orders, restocks, declines, gateway outages and crash points
    /// keep every invariant, and replay from 0 matches the live state.
    #[test]
    fn invariants_hold_across_crashes(random in prop::collection::vec(step_strategy(PARTITIONS), 1..200)) {
        let mut steps = stocked(PARTITIONS, 10);
        steps.extend(random);
        let config = SimConfig::new(0, steps.len() as u64, PARTITIONS);
        if let Err(v) = run_steps(&config, &steps) {
            prop_assert!(false, "invariant `{}` broken at step {}: {}", v.invariant, v.step, v.detail);
        }
    }
}

/// A multi-SKU order whose second line is short is compensated: the first
/// line's stock comes back and the order ends out_of_stock.
#[test]
fn saga_compensates() {
    let mut w = World::new(PARTITIONS, None);
    let steps = [
        Step::Restock {
            sku: 0,
            available: 5,
        },
        Step::Restock {
            sku: 1,
            available: 1,
        },
        Step::Place {
            id: 1,
            lines: vec![(0, 2), (1, 3)],
            decline: false,
        },
    ];
    for step in &steps {
        w.step(step).unwrap();
    }
    w.drain().unwrap();
    w.check_final().unwrap();
    assert_eq!(w.status("o1"), Some(Status::OutOfStock));
    let sku0 = w.sku(0).to_owned();
    assert_eq!(w.stock(&sku0).map(|s| s.available), Some(5));
}
