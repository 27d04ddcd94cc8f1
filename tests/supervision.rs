//! Supervision of partition tasks on the real binary: a runner that panics
//! (the debug build's fault seam) is restarted from its checkpoint and
//! counted; one that keeps panicking turns the instance not ready and its
//! partition's orders are refused instead of accepted for nobody.

mod support;

use std::path::Path;
use std::time::Duration;

use orderflow::pipeline::log::partition_for_key;
use serde_json::Value;
use support::*;

/// `partitions` of the default configuration the server runs with.
const PARTITIONS: u32 = 8;
const PANIC_ENV: &str = "ORDERFLOW_FAULT_PANIC_RUNNER";

/// Short back-offs so restarts take milliseconds; the third death within
/// a minute gives up.
const SUPERVISOR_TOML: &str = "[supervisor]
restart_initial_backoff_ms = 10
restart_max_backoff_ms = 100
max_deaths = 2
death_window_ms = 60000
";

fn start(dir: &Path, partition: u32, panics: u32) -> Server {
    let config = dir.join("orderflow.toml");
    std::fs::write(&config, SUPERVISOR_TOML).unwrap();
    let fault = format!("{partition}:{panics}");
    let config = config.to_str().unwrap();
    start_server(
        &dir.join("data"),
        &[("ORDERFLOW_CONFIG", config), (PANIC_ENV, &fault)],
    )
}

fn partition_of(sku: &str) -> u32 {
    partition_for_key(sku.as_bytes(), PARTITIONS)
}

/// A SKU whose orders go to another partition than `partition`.
fn sku_not_on(partition: u32) -> String {
    (0..)
        .map(|i| format!("SV-OTHER-{i}"))
        .find(|sku| partition_of(sku) != partition)
        .unwrap()
}

/// Places an order; returns the status and the body.
fn post(base: &str, body: &Value) -> (u16, Value) {
    let r = client()
        .post(format!("{base}/v1/orders"))
        .json(body)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn restarts(base: &str, partition: u32) -> f64 {
    let label = format!("partition=\"{partition}\"");
    metric_sum(
        base,
        "orderflow_task_restarts_total",
        &["task=\"runner\"", &label],
    )
}

/// A runner that panics twice is restarted twice, counted, and then processes the partition's orders.
#[test]
fn panicking_runner_is_restarted_and_processes_orders() {
    let dir = tempfile::tempdir().unwrap();
    let sku = "SV-A";
    let p = partition_of(sku);
    let server = start(dir.path(), p, 2);
    let base = server.base.clone();
    // The stock change is the partition's first batch: it panics twice.
    set_stock(&base, sku, 5);
    wait_until(Duration::from_secs(30), "two restarts counted", || {
        restarts(&base, p) == 2.0
    });
    let (status, answer) = post(&base, &order_body("sv-1", sku, 1));
    assert_eq!(status, 202, "{answer}");
    wait_until(Duration::from_secs(30), "sv-1 confirmed", || {
        order_view(&base, "sv-1").is_some_and(|v| v["status"] == "confirmed")
    });
    assert_eq!(restarts(&base, p), 2.0);
    let ready = client().get(format!("{base}/readyz")).send().unwrap();
    assert_eq!(ready.status(), 200);
    let out = server.output_text();
    assert!(
        out.contains("partition task panicked; restarting it from its checkpoint")
            && out.contains("injected fault"),
        "no error line naming the panic:\n{out}"
    );
}

/// A runner that keeps panicking makes `/readyz` fail naming it, and its partition's orders are refused while others are taken.
#[test]
fn runner_that_keeps_dying_turns_the_instance_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let sku = "SV-B";
    let p = partition_of(sku);
    let server = start(dir.path(), p, 1_000);
    let base = server.base.clone();
    // Taken while the runner still lives; processing it kills the runner.
    let (status, answer) = post(&base, &order_body("sv-b-1", sku, 1));
    assert_eq!(status, 202, "{answer}");
    let mut reason = String::new();
    wait_until(Duration::from_secs(30), "readyz failing", || {
        let r = client().get(format!("{base}/readyz")).send().unwrap();
        let failing = r.status() == 503;
        reason = r.text().unwrap_or_default();
        failing && reason.contains("down")
    });
    let task = format!("runner of orders partition {p} died 3 times");
    assert!(reason.contains(&task), "{reason}");
    let (status, answer) = post(&base, &order_body("sv-b-2", sku, 1));
    assert_eq!(
        (status, answer["code"].as_str()),
        (503, Some("overloaded")),
        "{answer}"
    );
    let (status, answer) = post(&base, &order_body("sv-c-1", &sku_not_on(p), 1));
    assert_eq!(status, 202, "other partitions still take orders: {answer}");
    assert_eq!(restarts(&base, p), 2.0);
    let down = format!("partition=\"{p}\"");
    assert_eq!(
        metric_sum(&base, "orderflow_task_down", &["task=\"runner\"", &down]),
        1.0
    );
    let shed = metric_sum(
        &base,
        "orderflow_intake_shed_total",
        &["reason=\"partition_down\""],
    );
    assert_eq!(shed, 1.0);
}
