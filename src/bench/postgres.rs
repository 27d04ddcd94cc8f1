//! The PostgreSQL baseline `orderflow bench` measures orderflow against: the
//! order service teams usually build instead of a stream processor. Orders,
//! their lines and the stock live in three tables; each order is one
//! transaction that locks its SKUs' inventory rows with `SELECT … FOR
//! UPDATE`, checks and decrements stock, asks a payment gateway (simulated in
//! process, as in orderflow's own runs) and commits. Durability is the
//! server's: scripts/postgres runs it with `fsync` and `synchronous_commit`
//! on, so a COMMIT returns once its WAL is on disk, like orderflow's fsynced
//! group commit.
//!
//! Every connection is its own `tokio_postgres::Client`, driven by a spawned
//! task, and runs one order at a time: the benchmark's closed loop keeps each
//! connection busy, the way a service's connection pool would be.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use anyhow::{Context, bail, ensure};
use futures::future::try_join_all;
use tokio::sync::Mutex;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, Statement};

/// Connections a target may hold: the bench's limit, within the
/// `max_connections` scripts/postgres configures (300).
pub const CONNECTIONS: RangeInclusive<usize> = 1..=256;

/// Attempts at one order before a serialization failure or a deadlock is
/// given up on. The sorted lock order leaves neither expected at `READ
/// COMMITTED`; the retry is the usual service's guard, bounded so that a
/// livelock shows as an error, not as a hang.
const MAX_ATTEMPTS: u32 = 5;

/// One order of a workload: lines of (SKU, quantity), and whether its payment is declined.
pub struct PgOrder<'a> {
    pub id: &'a str,
    pub lines: &'a [(&'a str, u32)],
    pub decline: bool,
}

/// How an order ended. A repeated order id gets the first placement's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgOutcome {
    Confirmed,
    OutOfStock,
    Declined,
}

impl PgOutcome {
    /// The `orders.status` text.
    fn status(self) -> &'static str {
        match self {
            PgOutcome::Confirmed => "confirmed",
            PgOutcome::OutOfStock => "out_of_stock",
            PgOutcome::Declined => "declined",
        }
    }

    fn from_status(status: &str) -> anyhow::Result<PgOutcome> {
        Ok(match status {
            "confirmed" => PgOutcome::Confirmed,
            "out_of_stock" => PgOutcome::OutOfStock,
            "declined" => PgOutcome::Declined,
            other => bail!("order has status {other:?}, which no finished placement leaves"),
        })
    }
}

/// A fixed number of connections to one PostgreSQL database.
pub struct PostgresTarget {
    conns: Vec<Mutex<Conn>>,
}

struct Conn {
    client: Client,
    /// Prepared by `setup` (after the tables exist), or by the first `place`
    /// on a schema made earlier.
    statements: Option<Statements>,
}

/// The statements of one placement, prepared once per connection: the
/// server parses and plans each once, and every order only binds values.
struct Statements {
    insert_order: Statement,
    order_status: Statement,
    lock_stock: Statement,
    take_stock: Statement,
    insert_lines: Statement,
    set_status: Statement,
}

impl Statements {
    async fn prepare(client: &Client) -> anyhow::Result<Statements> {
        // `total` is the order's units: the workloads carry no prices.
        let insert_order = client
            .prepare(
                "INSERT INTO orders (id, status, total) VALUES ($1, 'pending', $2) \
                 ON CONFLICT (id) DO NOTHING",
            )
            .await?;
        let order_status = client
            .prepare("SELECT status FROM orders WHERE id = $1")
            .await?;
        // Sorted, so that two orders sharing SKUs lock them in the same
        // order and never deadlock.
        let lock_stock = client
            .prepare(
                "SELECT sku, available FROM inventory WHERE sku = ANY($1::text[]) \
                 ORDER BY sku FOR UPDATE",
            )
            .await?;
        let take_stock = client
            .prepare(
                "UPDATE inventory SET available = available - l.qty, sold = sold + l.qty \
                 FROM unnest($1::text[], $2::bigint[]) AS l(sku, qty) WHERE inventory.sku = l.sku",
            )
            .await?;
        let insert_lines = client
            .prepare(
                "INSERT INTO order_lines (order_id, line_no, sku, quantity) \
                 SELECT $1, l.line_no, l.sku, l.qty \
                 FROM unnest($2::text[], $3::bigint[]) WITH ORDINALITY AS l(sku, qty, line_no)",
            )
            .await?;
        let set_status = client
            .prepare("UPDATE orders SET status = $2 WHERE id = $1")
            .await?;
        Ok(Statements {
            insert_order,
            order_status,
            lock_stock,
            take_stock,
            insert_lines,
            set_status,
        })
    }
}

const SCHEMA: &str = "
DROP TABLE IF EXISTS order_lines, orders, inventory;
-- reserved: stock held for orders awaiting payment. One transaction reserves
-- and settles here, so it stays 0; the column is the usual schema's.
CREATE TABLE inventory (
    sku text PRIMARY KEY,
    available bigint NOT NULL CHECK (available >= 0),
    reserved bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    sold bigint NOT NULL DEFAULT 0 CHECK (sold >= 0)
);
CREATE TABLE orders (
    id text PRIMARY KEY,
    status text NOT NULL,
    total bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE order_lines (
    order_id text NOT NULL REFERENCES orders (id),
    line_no bigint NOT NULL,
    sku text NOT NULL,
    quantity bigint NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, line_no)
);
";

impl PostgresTarget {
    /// Connects `connections` clients (each its own connection, driven by a spawned task).
    pub async fn connect(url: &str, connections: usize) -> anyhow::Result<PostgresTarget> {
        ensure!(
            CONNECTIONS.contains(&connections),
            "PostgreSQL connections must be in {}..={}, not {connections}",
            CONNECTIONS.start(),
            CONNECTIONS.end()
        );
        let conns = try_join_all((0..connections).map(|i| async move {
            let (client, connection) = tokio_postgres::connect(url, NoTls)
                .await
                .with_context(|| format!("connecting to PostgreSQL at {url} (connection {i})"))?;
            tokio::spawn(async move {
                // Ends without error when the client is dropped; an error
                // here also fails that client's next call, which reports it.
                if let Err(e) = connection.await {
                    tracing::warn!(connection = i, error = %e, "PostgreSQL connection closed");
                }
            });
            anyhow::Ok(Mutex::new(Conn {
                client,
                statements: None,
            }))
        }))
        .await?;
        Ok(PostgresTarget { conns })
    }

    /// (Re)creates the schema: `inventory(sku text primary key, available bigint, reserved bigint, sold bigint)`, `orders(id text primary key, status text, total bigint, …)`, `order_lines(…)`, and sets every SKU's stock.
    pub async fn setup(&self, skus: &[String], stock_per_sku: u64) -> anyhow::Result<()> {
        let stock = i64::try_from(stock_per_sku).with_context(|| {
            format!("stock per SKU {stock_per_sku} exceeds PostgreSQL's bigint")
        })?;
        {
            let mut first = self.conns[0].lock().await;
            first.statements = None;
            first
                .client
                .batch_execute(SCHEMA)
                .await
                .context("creating the PostgreSQL baseline's tables")?;
            let fill = first
                .client
                .prepare("INSERT INTO inventory (sku, available) SELECT unnest($1::text[]), $2")
                .await?;
            first
                .client
                .execute(&fill, &[&skus, &stock])
                .await
                .context("setting the PostgreSQL baseline's stock")?;
        }
        // Statements prepared before the tables were dropped would name the
        // old ones: prepare again, on every connection.
        try_join_all(self.conns.iter().map(|conn| async move {
            let mut conn = conn.lock().await;
            conn.statements = Some(Statements::prepare(&conn.client).await?);
            anyhow::Ok(())
        }))
        .await
        .context("preparing the PostgreSQL baseline's statements")?;
        Ok(())
    }

    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Places one order on connection `conn` as the typical service would: one transaction; `INSERT … ON CONFLICT DO NOTHING` on orders for idempotency; `SELECT … FROM inventory WHERE sku = ANY($1) ORDER BY sku FOR UPDATE` (sorted lock order, so no deadlocks); if any line lacks stock: status out_of_stock; else decrement available / increment sold, insert lines; declined payments (decide from `decline`, a simulated gateway in process) set status declined and leave stock untouched; COMMIT. Retries serialization/deadlock errors (40001/40P01) a bounded number of times. Prepared statements only.
    ///
    /// A repeated id changes nothing and answers the first placement's
    /// outcome. An unknown SKU counts as out of stock.
    pub async fn place(&self, conn: usize, order: &PgOrder<'_>) -> anyhow::Result<PgOutcome> {
        let Some(conn) = self.conns.get(conn) else {
            bail!(
                "connection {conn} out of range: this target has {}",
                self.conns.len()
            );
        };
        ensure!(!order.id.is_empty(), "an order needs an id");
        ensure!(!order.lines.is_empty(), "order {} has no lines", order.id);
        ensure!(
            order.lines.iter().all(|&(_, quantity)| quantity > 0),
            "order {} has a line of quantity 0",
            order.id
        );
        // One row update per SKU: a SKU on two lines takes their sum.
        let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
        for &(sku, quantity) in order.lines {
            *wanted.entry(sku).or_default() += i64::from(quantity);
        }
        let line_skus: Vec<&str> = order.lines.iter().map(|&(sku, _)| sku).collect();
        let line_quantities: Vec<i64> = order.lines.iter().map(|&(_, q)| i64::from(q)).collect();
        let placement = Placement {
            id: order.id,
            decline: order.decline,
            total: line_quantities.iter().sum(),
            skus: wanted.keys().copied().collect(),
            quantities: wanted.values().copied().collect(),
            line_skus,
            line_quantities,
        };

        let mut conn = conn.lock().await;
        let Conn { client, statements } = &mut *conn;
        if statements.is_none() {
            *statements = Some(
                Statements::prepare(client)
                    .await
                    .context("preparing the PostgreSQL baseline's statements (has setup run?)")?,
            );
        }
        let statements = statements.as_ref().expect("prepared above");
        let mut attempt = 1;
        loop {
            match placement.run(client, statements).await {
                Ok(outcome) => return Ok(outcome),
                Err(e) if attempt < MAX_ATTEMPTS && retryable(&e) => attempt += 1,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "placing order {} (attempt {attempt} of {MAX_ATTEMPTS})",
                            order.id
                        )
                    });
                }
            }
        }
    }

    /// Sums for a consistency check after a run: (available, sold) over all SKUs and confirmed orders.
    ///
    /// That is (Σ available, Σ sold, number of confirmed orders).
    pub async fn totals(&self) -> anyhow::Result<(u64, u64, u64)> {
        let conn = self.conns[0].lock().await;
        let stock = conn
            .client
            .prepare(
                "SELECT coalesce(sum(available), 0)::bigint, coalesce(sum(sold), 0)::bigint \
                 FROM inventory",
            )
            .await?;
        let confirmed = conn
            .client
            .prepare("SELECT count(*) FROM orders WHERE status = 'confirmed'")
            .await?;
        let row = conn.client.query_one(&stock, &[]).await?;
        let (available, sold): (i64, i64) = (row.get(0), row.get(1));
        let confirmed: i64 = conn.client.query_one(&confirmed, &[]).await?.get(0);
        Ok((
            u64::try_from(available).context("negative available stock")?,
            u64::try_from(sold).context("negative sold count")?,
            u64::try_from(confirmed)?,
        ))
    }
}

/// One order's parameters, bound the same on every attempt.
struct Placement<'a> {
    id: &'a str,
    decline: bool,
    total: i64,
    /// Distinct SKUs in ascending order, and the quantity wanted of each.
    skus: Vec<&'a str>,
    quantities: Vec<i64>,
    /// The order's lines as given.
    line_skus: Vec<&'a str>,
    line_quantities: Vec<i64>,
}

impl Placement<'_> {
    /// One attempt: a transaction, committed, or rolled back when it errs
    /// (dropping an unfinished `Transaction` sends ROLLBACK).
    async fn run(&self, client: &mut Client, st: &Statements) -> anyhow::Result<PgOutcome> {
        let tx = client.transaction().await?;
        // The primary key makes a repeated id wait for the first placement's
        // transaction and then insert nothing: that order's outcome stands.
        if tx
            .execute(&st.insert_order, &[&self.id, &self.total])
            .await?
            == 0
        {
            let row = tx.query_one(&st.order_status, &[&self.id]).await?;
            tx.commit().await?;
            return PgOutcome::from_status(row.get(0));
        }
        let rows = tx.query(&st.lock_stock, &[&self.skus]).await?;
        let enough = self
            .skus
            .iter()
            .zip(&self.quantities)
            .all(|(sku, &wanted)| {
                rows.iter()
                    .find(|row| row.get::<_, &str>(0) == *sku)
                    .is_some_and(|row| row.get::<_, i64>(1) >= wanted)
            });
        let outcome = if !enough {
            PgOutcome::OutOfStock
        } else if self.decline {
            // The gateway's answer, with the rows still locked, as a service
            // that authorizes inside its transaction has it.
            PgOutcome::Declined
        } else {
            tx.execute(&st.take_stock, &[&self.skus, &self.quantities])
                .await?;
            tx.execute(
                &st.insert_lines,
                &[&self.id, &self.line_skus, &self.line_quantities],
            )
            .await?;
            PgOutcome::Confirmed
        };
        tx.execute(&st.set_status, &[&self.id, &outcome.status()])
            .await?;
        tx.commit().await?;
        Ok(outcome)
    }
}

/// Serialization failures and deadlocks: the transaction was rolled back and
/// may simply be run again.
fn retryable(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<tokio_postgres::Error>().and_then(|e| e.code()),
        Some(code) if *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED
    )
}
