//! Kafka consumer-group membership: one group per topic, so that each
//! topic's partitions spread evenly over the instances (one group over
//! both topics balanced their sum: `orders` could come out 6 / 1 / 1 over
//! three instances). `orders` is shared in the group `group_id`,
//! `order-status` in `group_id.status`; each instance runs one consumer in
//! each, with the cooperative-sticky assignor, so a rebalance moves only
//! the partitions that must move. They read no records: every partition
//! they are given is paused at once; the runners and sinks read through
//! the log with explicit offsets from orderflow's checkpoints (Kafka's
//! committed offsets are never used). Their only jobs are the rebalance
//! callbacks:
//! - revoke: runs on that consumer's poll thread and blocks until the
//!   supervisor has stopped the partitions (runners checkpoint first), so
//!   the next owner loads a checkpoint that is current;
//! - assign: hands the new partitions to the supervisor, which claims a
//!   new ownership epoch for each partition before running it.
//!
//! A member cut off for longer than `session_timeout_ms` (paused, network)
//! loses its partitions without a revoke it could act on in time; when it
//! wakes up librdkafka reports them lost, and its runners find their
//! checkpoints fenced by the new owner's epoch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::topic_partition_list::TopicPartitionList;
use tokio::sync::mpsc;

use super::{Change, Membership, Part};
use crate::config::KafkaConfig;
use crate::pipeline::log::Topic;
use crate::pipeline::log::kafka::{client_config, topic_name};
use crate::telemetry::metrics::Metrics;

/// How often the poll thread looks at its stop flag.
const POLL_INTERVAL_MS: u64 = 100;
/// Longest a revocation waits for the partitions to stop. Past it the
/// group moves on without us (the epochs still fence late writes).
const REVOKE_TIMEOUT_MS: u64 = 60_000;

/// The topics that have a group, each balanced on its own.
const GROUPED: [Topic; 2] = [Topic::Orders, Topic::OrderStatus];

/// The consumer group that shares `topic`'s partitions.
fn group_id(config: &KafkaConfig, topic: Topic) -> String {
    match topic {
        Topic::OrderStatus => format!("{}.status", config.group_id),
        _ => config.group_id.clone(),
    }
}

pub struct KafkaGroup {
    config: KafkaConfig,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl KafkaGroup {
    pub fn new(config: &KafkaConfig, metrics: Arc<Metrics>) -> KafkaGroup {
        KafkaGroup {
            config: config.clone(),
            metrics,
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        }
    }

    /// A member of `topic`'s group, subscribed and ready to be polled.
    fn consumer(
        &self,
        topic: Topic,
        changes: mpsc::Sender<Change>,
    ) -> anyhow::Result<BaseConsumer<GroupContext>> {
        let session_ms = self.config.session_timeout_ms;
        let group = group_id(&self.config, topic);
        let consumer: BaseConsumer<GroupContext> = client_config(&self.config)?
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "latest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", session_ms.to_string())
            // A fifth of the session, not Kafka's customary third: a
            // survivor learns of a rebalance at its next heartbeat, and
            // that wait is part of every failover (docs/operations.md).
            .set(
                "heartbeat.interval.ms",
                (session_ms / 5).max(100).to_string(),
            )
            // The poll thread blocks in a revocation for up to REVOKE_TIMEOUT_MS.
            .set(
                "max.poll.interval.ms",
                (REVOKE_TIMEOUT_MS * 2).max(session_ms).to_string(),
            )
            .create_with_context(GroupContext {
                changes,
                topic,
                metrics: self.metrics.clone(),
                first: AtomicBool::new(true),
            })
            .map_err(|e| {
                anyhow::anyhow!("cannot create the Kafka group consumer of {group}: {e}")
            })?;
        let name = topic_name(&self.config.topic_prefix, topic);
        consumer
            .subscribe(&[&name])
            .map_err(|e| anyhow::anyhow!("cannot subscribe to {name} in group {group}: {e}"))?;
        tracing::info!(%group, topic = %name, "joining the Kafka consumer group");
        Ok(consumer)
    }
}

/// One group's consumer: the topic it shares, where its changes go.
struct GroupContext {
    changes: mpsc::Sender<Change>,
    topic: Topic,
    metrics: Arc<Metrics>,
    /// No assignment delivered yet (the next one is the group's first).
    first: AtomicBool,
}

impl GroupContext {
    fn parts(&self, tpl: &TopicPartitionList) -> Vec<Part> {
        let mut parts: Vec<Part> = tpl
            .elements()
            .iter()
            .filter_map(|e| Some((self.topic, u32::try_from(e.partition()).ok()?)))
            .collect();
        parts.sort_unstable();
        parts
    }
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let parts = self.parts(tpl);
        if parts.is_empty() {
            return;
        }
        let lost = consumer.assignment_lost();
        self.metrics
            .rebalances
            .with_label_values(&["revoked", self.topic.name()])
            .inc();
        tracing::info!(?parts, lost, "partitions revoked");
        let (done, stopped) = std::sync::mpsc::sync_channel(1);
        let change = Change::Revoked { parts, lost, done };
        if self.changes.blocking_send(change).is_err() {
            return; // shutting down: the tasks are already stopped
        }
        if stopped
            .recv_timeout(Duration::from_millis(REVOKE_TIMEOUT_MS))
            .is_err()
        {
            tracing::error!(
                timeout_ms = REVOKE_TIMEOUT_MS,
                "revoked partitions did not stop in time; leaving them to the group"
            );
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                // This consumer only holds the membership: fetch nothing.
                if tpl.count() > 0
                    && let Err(e) = consumer.pause(tpl)
                {
                    tracing::warn!(error = %e, "cannot pause the membership consumer");
                }
                let parts = self.parts(tpl);
                self.metrics
                    .rebalances
                    .with_label_values(&["assigned", self.topic.name()])
                    .inc();
                tracing::info!(?parts, "partitions assigned");
                let first = self.first.swap(false, Ordering::SeqCst);
                let _ = self
                    .changes
                    .blocking_send(Change::Assigned { parts, first });
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "consumer group rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
}

impl Membership for KafkaGroup {
    fn groups(&self) -> usize {
        GROUPED.len()
    }

    fn start(&mut self, changes: mpsc::Sender<Change>) -> anyhow::Result<()> {
        for topic in GROUPED {
            let consumer = self.consumer(topic, changes.clone())?;
            let stop = self.stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("kafka-group-{}", topic.name()))
                .spawn(move || poll_until_stopped(consumer, &stop))?;
            self.threads.push(thread);
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Serves the group protocol (heartbeats run on librdkafka's own thread;
/// rebalance callbacks run here) until `stop`, then leaves the group.
fn poll_until_stopped(consumer: BaseConsumer<GroupContext>, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        if let Some(Err(e)) = consumer.poll(Duration::from_millis(POLL_INTERVAL_MS)) {
            tracing::warn!(error = %e, "Kafka group consumer");
        }
    }
    consumer.unsubscribe();
    // Dropping closes the consumer: it leaves the group at once.
    drop(consumer);
}
