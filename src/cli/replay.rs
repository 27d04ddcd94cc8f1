//! `orderflow replay`: rebuilds each partition's state from its log, from
//! offset 0 up to the last checkpoint, with every output and effect
//! suppressed, and compares its hash with the checkpointed state
//! (invariant 5). Runs on a stopped instance's data directory (it takes the
//! same lock as `run`).

use std::sync::Arc;

use anyhow::Context as _;
use serde::Serialize;

use crate::app::lock_data_dir;
use crate::config::Config;
use crate::pipeline::log::Topic;
use crate::pipeline::log::embedded::EmbeddedLog;
use crate::pipeline::runner::{load_state, replay};
use crate::pipeline::store::embedded::EmbeddedStore;
use crate::sinks::metrics::Metrics;

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
    let _lock = lock_data_dir(&config.data_dir)?;
    let topics = [
        (Topic::Orders, config.partitions),
        (Topic::OrderStatus, config.status_partitions),
    ];
    let log = EmbeddedLog::open(
        &config.data_dir.join("log"),
        &topics,
        &config.log,
        Arc::new(Metrics::new()),
    )
    .context("opening the log")?;
    let store = EmbeddedStore::open(&config.data_dir.join("state.redb"))
        .context("opening the state store")?;
    let mut all_match = true;
    for partition in (0..config.partitions).filter(|p| only.is_none_or(|o| o == *p)) {
        let (live, next_offset) = load_state(&store, partition).await?;
        let replayed = replay(&log, partition, next_offset, config.processor.retention()).await?;
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
