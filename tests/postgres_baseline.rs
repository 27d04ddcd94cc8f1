//! The PostgreSQL baseline of `orderflow bench` (src/bench/postgres.rs)
//! against a real server: the URL in `ORDERFLOW_TEST_POSTGRES`, which
//! `./scripts/test` sets after `scripts/postgres start`. Each test works in a
//! database of its own, so that they run in parallel.

use std::sync::Arc;

use orderflow::bench::postgres::{PgOrder, PgOutcome, PostgresTarget};

/// The server's URL; the tests need one and say how to get it.
fn server_url() -> String {
    match std::env::var("ORDERFLOW_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "ORDERFLOW_TEST_POSTGRES is not set: these tests need a PostgreSQL server. \
             Run `export ORDERFLOW_TEST_POSTGRES=\"$(scripts/postgres start)\"` \
             (./scripts/test does so)"
        ),
    }
}

/// A new, empty database for one test, and its URL: the server's URL with
/// the database name replaced.
async fn fresh_database(test: &str) -> String {
    let url = server_url();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to ORDERFLOW_TEST_POSTGRES={url}: {e}"));
    tokio::spawn(connection);
    let name = format!("orderflow_{test}_{}", std::process::id());
    // Two calls: one query string of several statements is one transaction,
    // and neither statement runs inside one.
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
        .await
        .unwrap();
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url.as_str(), String::new()),
    };
    let (server, _) = base
        .rsplit_once('/')
        .filter(|(server, _)| server.contains("//"))
        .map_or((base, ""), |split| split);
    format!("{server}/{name}{query}")
}

async fn target(test: &str, connections: usize, skus: &[&str], stock: u64) -> PostgresTarget {
    let url = fresh_database(test).await;
    let target = PostgresTarget::connect(&url, connections).await.unwrap();
    let skus: Vec<String> = skus.iter().map(|s| s.to_string()).collect();
    target.setup(&skus, stock).await.unwrap();
    target
}

/// Places `orders` (id, lines) round-robin over every connection at once, each
/// connection one order at a time; returns the outcomes in `orders`' order.
async fn place_all(
    target: Arc<PostgresTarget>,
    orders: Vec<(String, Vec<(&'static str, u32)>)>,
) -> Vec<PgOutcome> {
    let orders = Arc::new(orders);
    let connections = target.connections();
    let tasks: Vec<_> = (0..connections)
        .map(|conn| {
            let (target, orders) = (target.clone(), orders.clone());
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for i in (conn..orders.len()).step_by(connections) {
                    let (id, lines) = &orders[i];
                    let order = PgOrder {
                        id,
                        lines,
                        decline: false,
                    };
                    outcomes.push((i, target.place(conn, &order).await.unwrap()));
                }
                outcomes
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.extend(task.await.unwrap());
    }
    outcomes.sort_by_key(|&(i, _)| i);
    outcomes.into_iter().map(|(_, outcome)| outcome).collect()
}

fn count(outcomes: &[PgOutcome], which: PgOutcome) -> u64 {
    outcomes.iter().filter(|&&o| o == which).count() as u64
}

/// Concurrent orders on one hot SKU with less stock than demand sell exactly the stock, never more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_sku_never_oversells() {
    const STOCK: u64 = 50;
    let target = Arc::new(target("hot_sku", 8, &["HOT", "COLD"], STOCK).await);
    let orders = (0..200)
        .map(|i| (format!("hot-{i}"), vec![("HOT", 1)]))
        .collect();
    let outcomes = place_all(target.clone(), orders).await;

    let (available, sold, confirmed) = target.totals().await.unwrap();
    // COLD is untouched: its stock is in `available` too.
    assert_eq!(sold, STOCK * 2 - available, "sold == stock set − available");
    assert_eq!(sold, STOCK, "the hot SKU sells out, and no more");
    assert_eq!(confirmed, sold, "one unit per confirmed order");
    assert_eq!(count(&outcomes, PgOutcome::Confirmed), STOCK);
    assert_eq!(count(&outcomes, PgOutcome::OutOfStock), 200 - STOCK);
}

/// Orders naming the same two SKUs in opposite line order neither deadlock nor oversell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_sku_orders_lock_in_one_order() {
    const STOCK: u64 = 40;
    let target = Arc::new(target("multi_sku", 8, &["A", "B"], STOCK).await);
    let orders = (0..100)
        .map(|i| {
            let lines = if i % 2 == 0 {
                vec![("A", 1), ("B", 1)]
            } else {
                vec![("B", 1), ("A", 1)]
            };
            (format!("pair-{i}"), lines)
        })
        .collect();
    let outcomes = place_all(target.clone(), orders).await;

    let (available, sold, confirmed) = target.totals().await.unwrap();
    assert_eq!((available, sold), (0, 2 * STOCK), "both SKUs sell out");
    assert_eq!(confirmed, STOCK, "two units per confirmed order");
    assert_eq!(count(&outcomes, PgOutcome::Confirmed), STOCK);
    assert_eq!(count(&outcomes, PgOutcome::OutOfStock), 100 - STOCK);
}

/// Declined payments leave stock untouched; stock is checked before payment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declines_leave_stock_untouched() {
    let target = target("declines", 2, &["SKU-1", "SKU-2"], 10).await;
    for i in 0..5 {
        let order = PgOrder {
            id: &format!("declined-{i}"),
            lines: &[("SKU-1", 3), ("SKU-2", 1)],
            decline: true,
        };
        assert_eq!(
            target.place(i % 2, &order).await.unwrap(),
            PgOutcome::Declined
        );
    }
    assert_eq!(
        target.totals().await.unwrap(),
        (20, 0, 0),
        "stock untouched"
    );

    let too_many = PgOrder {
        id: "declined-anyway",
        lines: &[("SKU-1", 11)],
        decline: true,
    };
    assert_eq!(
        target.place(0, &too_many).await.unwrap(),
        PgOutcome::OutOfStock,
        "no payment without the stock"
    );
    let paid = PgOrder {
        id: "paid",
        lines: &[("SKU-1", 3)],
        decline: false,
    };
    assert_eq!(target.place(1, &paid).await.unwrap(), PgOutcome::Confirmed);
    assert_eq!(target.totals().await.unwrap(), (17, 3, 1));
}

/// An id placed again, even concurrently, is one order: the first placement's outcome, stock taken once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_ids_are_one_order() {
    let target = Arc::new(target("repeats", 8, &["SKU-1"], 10).await);
    let first = PgOrder {
        id: "order-1",
        lines: &[("SKU-1", 3)],
        decline: false,
    };
    assert_eq!(target.place(0, &first).await.unwrap(), PgOutcome::Confirmed);
    // Changed lines or payment do not make it another order.
    let changed = PgOrder {
        id: "order-1",
        lines: &[("SKU-1", 5)],
        decline: true,
    };
    assert_eq!(
        target.place(1, &changed).await.unwrap(),
        PgOutcome::Confirmed
    );
    assert_eq!(target.totals().await.unwrap(), (7, 3, 1));

    // Eight connections race to place one new id.
    let orders = (0..8)
        .map(|_| ("order-2".to_owned(), vec![("SKU-1", 2)]))
        .collect();
    let outcomes = place_all(target.clone(), orders).await;
    assert!(
        outcomes.iter().all(|&o| o == PgOutcome::Confirmed),
        "{outcomes:?}"
    );
    assert_eq!(target.totals().await.unwrap(), (5, 5, 2));
}

/// Connection counts outside 1..=256 are refused with a clear error.
#[tokio::test]
async fn connection_count_is_bounded() {
    let url = server_url();
    for connections in [0, 257] {
        let error = match PostgresTarget::connect(&url, connections).await {
            Ok(_) => panic!("{connections} connections accepted"),
            Err(e) => e.to_string(),
        };
        assert!(error.contains("1..=256"), "{error}");
    }
}
