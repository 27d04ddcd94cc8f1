//! `orderflow bench` end to end: the real binary runs each workload for a
//! few seconds and writes its reports; the figures must agree with what
//! the workload offered (the flash sale sells its stock exactly, declines
//! show up as declines, nothing is lost) and the files must be what they
//! claim to be.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::Value;

/// Runs `orderflow bench` with `args` plus short durations and every
/// report file in `dir`; returns the JSON report.
fn bench(dir: &Path, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .arg("bench")
        .args([
            "--seconds",
            "2",
            "--warmup-seconds",
            "1",
            "--partitions",
            "4",
        ])
        .args(["--data-parent", dir.to_str().unwrap()])
        .arg("--json")
        .arg(dir.join("report.json"))
        .arg("--markdown")
        .arg(dir.join("report.md"))
        .arg("--plots")
        .arg(dir)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench {args:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("latency   p50"), "{stdout}");
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

fn status(report: &Value, s: &str) -> u64 {
    report["statuses"][s].as_u64().unwrap_or(0)
}

fn terminal_total(report: &Value) -> u64 {
    report["statuses"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum()
}

/// A flash sale sells exactly its stock and refuses the rest; the report
/// records the machine, the configuration, and writes real PNG plots.
#[test]
fn flash_sale_sells_exactly_its_stock() {
    let dir = tempfile::tempdir().unwrap();
    let r = bench(
        dir.path(),
        &[
            "--workload",
            "flash-sale",
            "--flash-stock",
            "100",
            "--rate",
            "400",
        ],
    );
    assert_eq!(status(&r, "confirmed"), 100, "{}", r["statuses"]);
    assert!(status(&r, "out_of_stock") > 900, "{}", r["statuses"]);
    assert_eq!(r["lost"], 0);
    assert_eq!(r["incomplete"], 0);
    assert_eq!(r["config"]["workload"]["kind"], "flash-sale");
    assert!(r["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(r["peak_rss_mib"].as_f64().unwrap() > 0.0);
    assert!(r["cpu_us_per_order"].as_f64().unwrap() > 0.0);
    assert!(r["latency"]["samples"].as_u64().unwrap() > 0);
    for png in ["latency-percentiles.png", "timeline.png"] {
        let bytes = std::fs::read(dir.path().join(png)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{png} is no PNG");
        assert!(bytes.len() > 10_000, "{png}: {} bytes", bytes.len());
    }
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert!(md.contains("| achieved (orders/s) |"), "{md}");
    assert!(
        md.contains("![latency percentiles](latency-percentiles.png)"),
        "{md}"
    );
}

/// Multi-line orders with declines: every order ends, the declined ones
/// as declines, and no order is lost.
#[test]
fn multi_line_orders_with_declines_all_finish() {
    let dir = tempfile::tempdir().unwrap();
    let r = bench(
        dir.path(),
        &[
            "--workload",
            "multi-line",
            "--decline-ratio",
            "0.2",
            "--rate",
            "300",
            "--skus",
            "50",
        ],
    );
    let total = terminal_total(&r);
    let declined = status(&r, "payment_declined");
    assert!(total >= 900, "{}", r["statuses"]);
    assert!(
        declined * 10 > total && declined * 10 < total * 3,
        "about 20 % declined: {declined} of {total}"
    );
    assert_eq!(
        status(&r, "confirmed") + declined,
        total,
        "{}",
        r["statuses"]
    );
    assert_eq!(r["lost"], 0);
}

/// Saturation with Zipf demand reports a rate, and its timeline covers
/// the run.
#[test]
fn zipf_saturation_reports_a_rate() {
    let dir = tempfile::tempdir().unwrap();
    let r = bench(
        dir.path(),
        &["--workload", "zipf", "--rate", "0", "--max-inflight", "500"],
    );
    assert_eq!(r["mode"], "saturation");
    assert!(r["achieved_rate"].as_f64().unwrap() > 0.0);
    assert!(
        r["timeline"].as_array().unwrap().len() >= 3,
        "{}",
        r["timeline"]
    );
    assert_eq!(status(&r, "confirmed"), terminal_total(&r));
}

/// `--search` bisects open-loop rates below the closed-loop ceiling and
/// measures at the highest one that met the SLO; every verdict agrees
/// with the trial's own figures.
#[test]
fn search_finds_a_sustained_rate() {
    let dir = tempfile::tempdir().unwrap();
    let slo_ms = 2_000.0;
    let r = bench(
        dir.path(),
        &[
            "--search",
            "--search-trials",
            "2",
            "--trial-seconds",
            "1",
            "--slo-p99-ms",
            "2000",
            "--max-inflight",
            "1000",
        ],
    );
    let search = &r["search"];
    let trials = search["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 3, "{search}");
    assert_eq!(trials[0]["rate"], 0, "the first trial is the ceiling");
    let ceiling = search["ceiling_rate"].as_f64().unwrap();
    assert!(ceiling > 0.0, "{search}");
    let first = trials[1]["rate"].as_u64().unwrap();
    assert_eq!(first, (ceiling.round() as u64) / 2, "{search}");
    let mut best = 0;
    for t in &trials[1..] {
        let rate = t["rate"].as_u64().unwrap();
        assert!(rate > 0 && rate as f64 <= ceiling, "{t}");
        let met = t["achieved_rate"].as_f64().unwrap() >= 0.95 * rate as f64
            && t["p99_ms"].as_f64().unwrap() <= slo_ms
            && t["incomplete"] == 0
            && t["lost"] == 0;
        assert_eq!(t["sustainable"].as_bool().unwrap(), met, "{t}");
        if met {
            best = best.max(rate);
        }
    }
    assert!(
        best > 0,
        "half the ceiling is sustained with a 2 s SLO: {search}"
    );
    assert_eq!(search["rate"], best);
    assert_eq!(
        r["config"]["rate"], best,
        "the measured run is at the rate found"
    );
    assert_eq!(r["mode"], "open-loop");
    let held = r["achieved_rate"].as_f64().unwrap() >= 0.95 * best as f64
        && r["latency"]["p99_ms"].as_f64().unwrap() <= slo_ms
        && r["incomplete"] == 0
        && r["lost"] == 0;
    assert_eq!(search["confirmed"], held, "the measured run is judged too");
    assert!(
        r["io_per_order"]
            .as_str()
            .unwrap()
            .contains("orders records")
    );
}

/// Limits are refused with the flag's name and a usage exit code.
#[test]
fn bad_arguments_are_usage_errors() {
    for args in [
        &["--decline-ratio", "2"][..],
        &["--workload", "multi-line", "--max-lines", "9"],
        &["--seconds", "0"],
        &["--rate", "999999999"],
        &["--search", "--search-trials", "0"],
        &["--search", "--slo-p99-ms", "0"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_orderflow"))
            .arg("bench")
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(args[args.len() - 2]), "{args:?}: {err}");
    }
}

/// With `--postgres`, the same flash sale runs against PostgreSQL row
/// locking: it too sells exactly its stock, and the report has the ratio.
#[test]
fn postgres_baseline_runs_the_same_workload() {
    let url = std::env::var("ORDERFLOW_TEST_POSTGRES")
        .expect("ORDERFLOW_TEST_POSTGRES: scripts/test starts PostgreSQL (scripts/postgres)");
    let dir = tempfile::tempdir().unwrap();
    let r = bench(
        dir.path(),
        &[
            "--workload",
            "flash-sale",
            "--flash-stock",
            "50",
            "--rate",
            "200",
            "--postgres",
            &url,
            "--connections",
            "4",
        ],
    );
    let b = &r["baseline"];
    assert_eq!(b["outcomes"]["confirmed"], 50, "{b}");
    assert!(b["outcomes"]["out_of_stock"].as_u64().unwrap() > 400, "{b}");
    assert_eq!(b["stock_conserved"], true);
    assert!(b["latency"]["samples"].as_u64().unwrap() > 0, "{b}");
    let ratio = r["ratio_vs_baseline"].as_f64().unwrap();
    let expected = r["achieved_rate"].as_f64().unwrap() / b["achieved_rate"].as_f64().unwrap();
    assert!((ratio - expected).abs() < 1e-6, "{ratio} vs {expected}");
    let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
    assert!(md.contains("orderflow / PostgreSQL"), "{md}");
}

/// Names starting `bench_` among the Kafka topics and the Cassandra
/// keyspaces: what bench runs create.
fn bench_leftovers(kafka: &str, cassandra: &str) -> BTreeSet<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka)
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(30))
        .unwrap();
    let mut names: BTreeSet<String> = metadata
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    names.extend(runtime.block_on(async {
        let session = ::scylla::client::session_builder::SessionBuilder::new()
            .known_node(cassandra)
            .build()
            .await
            .unwrap();
        let rows = session
            .query_unpaged("SELECT keyspace_name FROM system_schema.keyspaces", ())
            .await
            .unwrap()
            .into_rows_result()
            .unwrap();
        rows.rows::<(String,)>()
            .unwrap()
            .map(|r| r.unwrap().0)
            .collect::<Vec<_>>()
    }));
    names.retain(|n| n.starts_with("bench_"));
    names
}

/// A run on Kafka and Cassandra settles its orders and deletes its topics
/// and keyspace when it ends.
#[test]
fn a_distributed_run_cleans_up_after_itself() {
    let (kafka, cassandra) = (support::kafka_bootstrap(), support::cassandra_contact());
    let before = bench_leftovers(&kafka, &cassandra);
    let dir = tempfile::tempdir().unwrap();
    let args = ["--rate", "200", "--kafka", &kafka, "--scylla", &cassandra];
    let report = bench(dir.path(), &args);
    assert_eq!(report["lost"], 0);
    assert!(status(&report, "confirmed") > 0, "{report}");
    assert_eq!(bench_leftovers(&kafka, &cassandra), before);
}
