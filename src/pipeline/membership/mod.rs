//! Partition ownership: which `orders` and `order-status` partitions this
//! instance runs. Embedded, one process owns them all for its whole life
//! ([`Static`]); distributed, one Kafka consumer group per topic shares
//! its partitions among the instances and moves them when one joins,
//! leaves or dies ([`kafka::KafkaGroup`]). The supervisor (`crate::pipeline::supervisor`)
//! starts and stops the partition tasks on each [`Change`].

pub mod kafka;

use tokio::sync::mpsc;

use crate::pipeline::log::Topic;

/// A topic partition.
pub type Part = (Topic, u32);

/// A change of the partitions this instance owns.
#[derive(Debug)]
pub enum Change {
    /// Start these partitions (each runner claims a new ownership epoch).
    /// `first`: the first assignment of one of the membership's groups;
    /// the instance is ready once every group's first one has recovered.
    Assigned { parts: Vec<Part>, first: bool },
    /// Stop these partitions (runners checkpoint first), then answer on
    /// `done`: the group hands them to another instance only after that,
    /// so two owners never run at once unless this one was cut off
    /// (`lost`: its session expired, its epoch is already fenced).
    Revoked {
        parts: Vec<Part>,
        lost: bool,
        done: std::sync::mpsc::SyncSender<()>,
    },
}

/// Who decides which partitions this instance owns.
pub trait Membership: Send {
    /// How many groups deliver assignments independently (each sends one
    /// `first` assignment).
    fn groups(&self) -> usize;

    /// Starts delivering changes on `changes`; the first is the initial
    /// assignment.
    fn start(&mut self, changes: mpsc::Sender<Change>) -> anyhow::Result<()>;

    /// Leaves (once the partition tasks have stopped), so that the others
    /// take over at once instead of after a session timeout.
    fn leave(&mut self);
}

/// Embedded: every partition of both topics, from start to shutdown.
pub struct Static {
    pub parts: Vec<Part>,
}

impl Static {
    pub fn all(orders_partitions: u32, status_partitions: u32) -> Static {
        let orders = (0..orders_partitions).map(|p| (Topic::Orders, p));
        let status = (0..status_partitions).map(|p| (Topic::OrderStatus, p));
        Static {
            parts: orders.chain(status).collect(),
        }
    }
}

impl Membership for Static {
    fn groups(&self) -> usize {
        1
    }

    fn start(&mut self, changes: mpsc::Sender<Change>) -> anyhow::Result<()> {
        changes
            .try_send(Change::Assigned {
                parts: self.parts.clone(),
                first: true,
            })
            .map_err(|e| anyhow::anyhow!("cannot deliver the initial assignment: {e}"))
    }

    fn leave(&mut self) {}
}
