//! `orderflow replay`: rebuilds each partition's state from its log, from
//! offset 0 up to the last checkpoint, with every output and effect
//! suppressed, and compares its hash with the checkpointed state
//! (invariant 5). It reads the deployment's own backends, as `run` opens
//! them: embedded, a stopped instance's data directory (it takes the same
//! lock as `run`); distributed, the Kafka topics and the ScyllaDB
//! checkpoints, while the instances run. With `--order ID` it tells that
//! order's story instead (see `story`); with `--diff DIR` it lists the
//! orders whose outcome this binary would decide differently from DIR's
//! checkpoint (embedded).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::app::{lock_data_dir, lock_if_local, open_log, open_store};
use crate::config::Config;
use crate::pipeline::runner::{RunnerError, load_state, replay};
use crate::pipeline::store::StateStore;
use crate::stages::PartitionState;
use crate::stages::processor::Limits;
use crate::telemetry::metrics::Metrics;

use super::story;

/// One partition's verdict, printed as a JSON line.
#[derive(Debug, Serialize)]
pub struct PartitionReplay {
    pub partition: u32,
    pub next_offset: u64,
    pub checkpoint_hash: String,
    pub replay_hash: String,
    pub matches: bool,
}

/// Replays `only` (or every partition); prints one line each and returns
/// whether every hash matched.
pub async fn run(config: &Config, only: Option<u32>) -> anyhow::Result<bool> {
    if let Some(p) = only {
        anyhow::ensure!(
            p < config.partitions,
            "partition {p} does not exist (there are {})",
            config.partitions
        );
    }
    let _lock = lock_if_local(config)?;
    let metrics = Arc::new(Metrics::new());
    let log = open_log(config, &metrics).await?;
    let store = open_store(config, &metrics).await?;
    let mut all_match = true;
    for partition in (0..config.partitions).filter(|p| only.is_none_or(|o| o == *p)) {
        let limits = config.processor.limits();
        let (live, next_offset) = checkpoint(store.as_ref(), partition, &limits).await?;
        let replayed = replay(log.as_ref(), partition, next_offset, limits).await?;
        let (checkpoint_hash, replay_hash) = (live.hash(), replayed.hash());
        let matches = checkpoint_hash == replay_hash;
        let report = PartitionReplay {
            partition,
            next_offset,
            checkpoint_hash,
            replay_hash,
            matches,
        };
        all_match &= report.matches;
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(all_match)
}

/// Prints the story of `order_id` (text, or one JSON line per step);
/// returns whether any record concerned it.
pub async fn order_story(config: &Config, order_id: &str, json: bool) -> anyhow::Result<bool> {
    let _lock = lock_if_local(config)?;
    let log = open_log(config, &Arc::new(Metrics::new())).await?;
    let steps = story::collect(log.as_ref(), order_id, config.processor.limits()).await?;
    if json {
        for step in &steps {
            println!("{}", serde_json::to_string(step)?);
        }
    } else {
        print!("{}", story::render(order_id, &steps));
    }
    if steps.is_empty() {
        eprintln!("no record of the log concerns order {order_id}");
    }
    Ok(!steps.is_empty())
}

/// Checkpoint loads before giving up while the owner replaces blobs.
const CHECKPOINT_LOADS: u32 = 5;

/// Partition `partition`'s checkpointed state and the offset it covers.
/// A running owner may replace the checkpoint between the read of its
/// manifest and of its blobs (and delete the old blobs): load it again.
async fn checkpoint(
    store: &dyn StateStore,
    partition: u32,
    limits: &Limits,
) -> Result<(PartitionState, u64), RunnerError> {
    let mut loads = 1;
    loop {
        match load_state(store, partition, limits).await {
            Ok((state, next_offset, _)) => return Ok((state, next_offset)),
            Err(RunnerError::BadCheckpoint { .. }) if loads < CHECKPOINT_LOADS => loads += 1,
            Err(e) => return Err(e),
        }
    }
}

/// An order this binary decides differently from the checkpoint. A
/// finished order is remembered by its key only (the first 16 bytes of
/// SHA-256 of its id, in hex), so that is what names it.
#[derive(Debug, Serialize)]
pub struct OutcomeDiff {
    pub order_id: String,
    pub partition: u32,
    /// What the checkpoint holds: `status (seq N)`, `parked`, or `absent`.
    pub recorded: String,
    /// What replaying the same records with this binary gives.
    pub replayed: String,
}

/// Replays the log of the stopped instance in `dir` up to each partition's
/// checkpoint with this binary and prints one JSON line per order whose
/// outcome differs, then a summary line; returns whether none differs.
pub async fn diff(config: &Config, dir: &Path) -> anyhow::Result<bool> {
    let config = Config {
        data_dir: dir.to_owned(),
        ..config.clone()
    };
    anyhow::ensure!(
        config.kafka.is_none() && config.scylla.is_none(),
        "--diff compares the data directory of a stopped embedded instance; this configuration is distributed"
    );
    let _lock = lock_data_dir(&config.data_dir)?;
    let metrics = Arc::new(Metrics::new());
    let (log, store) = (
        open_log(&config, &metrics).await?,
        open_store(&config, &metrics).await?,
    );
    let (mut orders, mut differ) = (0usize, 0usize);
    let limits = config.processor.limits();
    for partition in 0..config.partitions {
        let (recorded, next_offset, _) = load_state(store.as_ref(), partition, &limits).await?;
        let replayed = replay(log.as_ref(), partition, next_offset, limits).await?;
        let (was, now) = (outcomes(&recorded), outcomes(&replayed));
        let ids: BTreeSet<&String> = was.keys().chain(now.keys()).collect();
        orders += ids.len();
        for id in ids {
            let absent = || "absent".to_owned();
            let was = was.get(id).cloned().unwrap_or_else(absent);
            let now = now.get(id).cloned().unwrap_or_else(absent);
            if was != now {
                differ += 1;
                let d = OutcomeDiff {
                    order_id: id.clone(),
                    partition,
                    recorded: was,
                    replayed: now,
                };
                println!("{}", serde_json::to_string(&d)?);
            }
        }
    }
    println!(
        "{}",
        serde_json::json!({"orders": orders, "differ": differ, "data_dir": dir})
    );
    Ok(differ == 0)
}

/// Every order's outcome in one partition's state: in flight (by id),
/// parked (by id), finished (by key, in hex).
fn outcomes(state: &PartitionState) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (_, e) in state.finished.iter() {
        let outcome = if e.confirmed() {
            "confirmed"
        } else {
            "not confirmed"
        };
        out.insert(hex::encode(e.key.0), format!("finished ({outcome})"));
    }
    for p in state.parked.values() {
        if let Some(id) = &p.order_id {
            out.insert(id.clone(), "parked".to_owned());
        }
    }
    for (id, rec) in &state.orders {
        out.insert(id.clone(), format!("{} (seq {})", rec.status, rec.seq));
    }
    out
}
