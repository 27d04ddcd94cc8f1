//! The park lane end to end on the real binary: an order that fails
//! processing (the debug build's fault seam) is parked with the orders
//! behind it on its SKU while other SKUs flow; after a restart without the
//! fault, `orderflow parked retry` processes them in their original order.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::*;

const POISON: &str = "cus-poison";

fn listed(base: &str) -> Vec<Value> {
    let text = parked_cli(base, &["list"]).expect("parked list");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Places an order; returns its tracking token.
fn post(base: &str, body: &Value) -> String {
    let r = client()
        .post(format!("{base}/v1/orders"))
        .json(body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    let answer: Value = r.json().unwrap();
    answer["tracking_token"].as_str().unwrap().to_owned()
}

/// The order as its customer sees it (with its tracking token).
fn tracked(base: &str, id: &str, token: &str) -> Value {
    let r = client()
        .get(format!("{base}/v1/orders/{id}"))
        .bearer_auth(token)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().unwrap()
}

fn metric(base: &str, name: &str) -> f64 {
    metrics_text(base)
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Poison order parked with its SKU's later orders; other keys flow; retry after the fix keeps the order.
#[test]
fn poison_is_parked_and_retry_keeps_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_server(dir.path(), &[("ORDERFLOW_FAULT_POISON_CUSTOMER", POISON)]);
    let base = server.base.clone();
    set_stock(&base, "PK-A", 2);
    set_stock(&base, "PK-B", 10);
    let mut poison = order_body("pk-1", "PK-A", 1);
    poison["customer_id"] = POISON.into();
    let tokens = [
        post(&base, &poison),
        post(&base, &order_body("pk-2", "PK-A", 1)),
        post(&base, &order_body("pk-3", "PK-A", 1)),
    ];
    for i in 0..5 {
        post(&base, &order_body(&format!("pk-b{i}"), "PK-B", 1));
    }
    // Other keys keep flowing while PK-A's orders wait.
    wait_until(Duration::from_secs(60), "PK-B orders confirmed", || {
        (0..5).all(|i| {
            order_view(&base, &format!("pk-b{i}")).is_some_and(|v| v["status"] == "confirmed")
        })
    });
    wait_until(Duration::from_secs(30), "three records parked", || {
        listed(&base).len() == 3
    });
    let lane = listed(&base);
    let ids: Vec<&str> = lane
        .iter()
        .map(|r| r["order_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["pk-1", "pk-2", "pk-3"], "{lane:?}");
    assert!(lane[0]["reason"].as_str().unwrap().contains("injected"));
    assert!(lane[1]["reason"].as_str().unwrap().contains("waits behind"));
    // Intake took them (`accepted` for their customers), the processor
    // has not run them.
    for (id, token) in ["pk-1", "pk-2", "pk-3"].iter().zip(&tokens) {
        let v = tracked(&base, id, token);
        assert_eq!(
            (&v["status"], v["history"].as_array().unwrap().len()),
            (&Value::from("accepted"), 0),
            "{id} must not be processed yet: {v}"
        );
    }
    assert_eq!(metric(&base, "orderflow_parked_records"), 3.0);
    let position = format!("{}:{}", lane[0]["partition"], lane[0]["offset"]);
    let shown = parked_cli(&base, &["show", &position]).unwrap();
    assert!(shown.contains("pk-1"), "{shown}");
    assert_eq!(stock(&base, "PK-A")["available"], 2);

    // The fault is fixed (restart without it); the lane survived.
    assert!(server.terminate().success());
    let server = start_server(dir.path(), &[]);
    let base = server.base.clone();
    assert_eq!(listed(&base).len(), 3);
    let ok = parked_cli(&base, &["retry"]).is_ok();
    assert!(ok, "parked retry failed");
    wait_until(Duration::from_secs(60), "parked orders processed", || {
        ["pk-1", "pk-2", "pk-3"].iter().all(|id| {
            order_view(&base, id).is_some_and(|v| is_terminal(v["status"].as_str().unwrap()))
        })
    });
    // In their original order: the first two get the two units.
    let status = |id: &str| order_view(&base, id).unwrap()["status"].clone();
    assert_eq!(status("pk-1"), "confirmed");
    assert_eq!(status("pk-2"), "confirmed");
    assert_eq!(status("pk-3"), "out_of_stock");
    wait_until(Duration::from_secs(30), "lane empty", || {
        listed(&base).is_empty()
    });
    wait_until(Duration::from_secs(30), "gauge at zero", || {
        metric(&base, "orderflow_parked_records") == 0.0
    });
    let s = stock(&base, "PK-A");
    assert_eq!(
        (s["available"].clone(), s["sold"].clone()),
        (0.into(), 2.into()),
        "{s}"
    );
}

/// A parked record can be dropped: it leaves the lane unprocessed.
#[test]
fn drop_removes_a_parked_record() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), &[("ORDERFLOW_FAULT_POISON_CUSTOMER", POISON)]);
    let base = server.base.clone();
    set_stock(&base, "PK-D", 5);
    let mut poison = order_body("pd-1", "PK-D", 1);
    poison["customer_id"] = POISON.into();
    let poison_token = post(&base, &poison);
    wait_until(Duration::from_secs(30), "parked", || {
        listed(&base).len() == 1
    });
    let r = &listed(&base)[0];
    let position = format!("{}:{}", r["partition"], r["offset"]);
    let ok = parked_cli(&base, &["drop", &position]).is_ok();
    assert!(ok);
    wait_until(Duration::from_secs(30), "dropped", || {
        listed(&base).is_empty()
    });
    // The key flows again; the dropped order never ran.
    post(&base, &order_body("pd-2", "PK-D", 1));
    wait_until(Duration::from_secs(30), "pd-2 confirmed", || {
        order_view(&base, "pd-2").is_some_and(|v| v["status"] == "confirmed")
    });
    assert_eq!(
        tracked(&base, "pd-1", &poison_token)["history"],
        Value::Array(vec![])
    );
    let ok = parked_cli(&base, &["show", "999:0"]).is_ok();
    assert!(!ok, "an unknown partition is an error");
}

/// `replay --diff` lists exactly the orders this binary decides otherwise:
/// here those a faulty run parked, which a replay without the fault runs.
#[test]
fn replay_diff_lists_orders_decided_differently() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_server(dir.path(), &[("ORDERFLOW_FAULT_POISON_CUSTOMER", POISON)]);
    let base = server.base.clone();
    set_stock(&base, "PK-A", 2);
    set_stock(&base, "PK-B", 10);
    let mut poison = order_body("df-1", "PK-A", 1);
    poison["customer_id"] = POISON.into();
    post(&base, &poison);
    post(&base, &order_body("df-2", "PK-A", 1));
    for i in 0..3 {
        post(&base, &order_body(&format!("df-b{i}"), "PK-B", 1));
    }
    wait_until(Duration::from_secs(60), "PK-B orders confirmed", || {
        (0..3).all(|i| {
            order_view(&base, &format!("df-b{i}")).is_some_and(|v| v["status"] == "confirmed")
        })
    });
    wait_until(Duration::from_secs(30), "two records parked", || {
        listed(&base).len() == 2
    });
    assert!(server.terminate().success());

    let out = Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .args(["replay", "--diff"])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (summary, diffs) = lines.split_last().unwrap();
    let ids: Vec<&str> = diffs
        .iter()
        .map(|d| d["order_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["df-1", "df-2"], "{text}");
    assert!(
        diffs
            .iter()
            .all(|d| d["recorded"] == "parked" && d["replayed"] != "parked"),
        "{text}"
    );
    assert_eq!(summary["differ"], 2, "{text}");
    assert!(summary["orders"].as_u64().unwrap() >= 5, "{text}");
}

/// `orders-parked` is an audit trail kept up to `log.retention_bytes`:
/// after many park events its oldest segments are gone, while the lane
/// itself (in the checkpoints) still lists the parked record.
#[test]
fn orders_parked_is_trimmed_by_retention() {
    use orderflow::config::LogConfig;
    use orderflow::pipeline::log::embedded::EmbeddedLog;
    use orderflow::pipeline::log::{Log, Topic};
    use orderflow::telemetry::metrics::Metrics;

    const RETRIES: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("orderflow.toml");
    std::fs::write(
        &config,
        "partitions = 1\nstatus_partitions = 1\n[log]\nsegment_size_bytes = 4096\nretention_bytes = 4096\nmax_record_bytes = 2048\n[checkpoint]\nevery_messages = 1\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let env = [
        ("ORDERFLOW_FAULT_POISON_CUSTOMER", POISON),
        ("ORDERFLOW_CONFIG", config.to_str().unwrap()),
    ];
    let mut server = start_server(&data, &env);
    let base = server.base.clone();
    set_stock(&base, "PK-R", 5);
    let mut poison = order_body("pr-1", "PK-R", 1);
    poison["customer_id"] = POISON.into();
    post(&base, &poison);
    wait_until(Duration::from_secs(30), "parked", || {
        listed(&base).len() == 1
    });
    // Each retry parks the record again: two events (retried, parked).
    for _ in 0..RETRIES {
        let ok = parked_cli(&base, &["retry"]).is_ok();
        assert!(ok, "parked retry failed");
    }
    assert!(server.terminate().success(), "drained");

    let server = start_server(&data, &env);
    assert_eq!(listed(&server.base).len(), 1, "the lane kept its record");
    drop(server);
    let log = EmbeddedLog::open(
        &data.join("log"),
        &[
            (Topic::Orders, 1),
            (Topic::OrderStatus, 1),
            (Topic::Parked, 1),
        ],
        &LogConfig {
            segment_size_bytes: 4096,
            retention_bytes: 4096,
            max_record_bytes: 2048,
            ..LogConfig::default()
        },
        std::sync::Arc::new(Metrics::new()),
    )
    .unwrap();
    let offsets = futures::executor::block_on(log.offsets(Topic::Parked, 0));
    let (low, high) = offsets.unwrap();
    assert!(high > 2 * RETRIES as u64, "every event was written: {high}");
    assert!(
        low > 0,
        "retention deleted the oldest segments: {low}..{high}"
    );
    let bytes: u64 = std::fs::read_dir(data.join("log").join("orders-parked"))
        .unwrap()
        .flat_map(|e| walk(&e.unwrap().path()))
        .sum();
    assert!(bytes < 4 * 4096, "orders-parked holds {bytes} bytes");
}

/// Total size of the files under `path`.
fn walk(path: &std::path::Path) -> Vec<u64> {
    if path.is_dir() {
        std::fs::read_dir(path)
            .unwrap()
            .flat_map(|e| walk(&e.unwrap().path()))
            .collect()
    } else {
        vec![std::fs::metadata(path).unwrap().len()]
    }
}
