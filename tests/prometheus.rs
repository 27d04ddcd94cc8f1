//! The metrics as an analyst sees them: a real Prometheus (Debian's
//! `prometheus`, named by `ORDERFLOW_TEST_PROMETHEUS`, which `./scripts/test`
//! sets up) scrapes a real `orderflow run` on the embedded backend while
//! orders confirm, run out of stock and are declined; the business metrics
//! must reach Prometheus with the expected values, and every query of the
//! Grafana dashboard must evaluate.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Server, client, order_body, order_view, set_stock, start_server, wait_until};

/// How long Prometheus may take to show a value: several scrapes (1 s
/// apart) after the orders settled, with room for a slow machine.
const DEADLINE: Duration = Duration::from_secs(60);
/// Payment latency of the simulator: keeps orders in flight over a few
/// scrapes, so the in-flight gauges are seen above zero.
const GATEWAY_LATENCY_MS: u64 = 4_000;

const HOT: &str = "SKU-HOT";
const COLD: &str = "SKU-COLD";
const PLENTY: &str = "SKU-PLENTY";

/// A Prometheus process scraping one target; its log is printed if the
/// test fails while it runs.
struct Prometheus {
    child: Child,
    base: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let binary = std::env::var("ORDERFLOW_TEST_PROMETHEUS").unwrap_or_else(|_| {
            panic!(
                "ORDERFLOW_TEST_PROMETHEUS is not set: it must name Prometheus's server binary. \
                 Run ./scripts/test, or: apt-get install prometheus && \
                 export ORDERFLOW_TEST_PROMETHEUS=/usr/bin/prometheus"
            )
        });
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: orderflow\n    scrape_interval: 1s\n    \
                 scrape_timeout: 1s\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        // A port that was free a moment ago: Prometheus cannot report the
        // one it bound, and a clash fails the start loudly below.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.path().join("prometheus.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(&binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {binary}: {e}"));
        let mut prom = Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + DEADLINE;
        loop {
            let ready = client()
                .get(format!("{}/-/ready", prom.base))
                .send()
                .is_ok_and(|r| r.status() == 200);
            if ready {
                return prom;
            }
            if let Ok(Some(status)) = prom.child.try_wait() {
                panic!("Prometheus exited ({status}):\n{}", prom.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus not ready:\n{}",
                prom.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The JSON answer of an instant query (`status` may be `error`).
    fn query(&self, promql: &str) -> Value {
        client()
            .get(format!("{}/api/v1/query", self.base))
            .query(&[("query", promql)])
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    /// Labels → value of every sample a successful query returned.
    fn samples(&self, promql: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let answer = self.query(promql);
        assert_eq!(answer["status"], "success", "{promql}: {answer}");
        answer["data"]["result"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .map(|r| {
                        let labels = serde_json::from_value(r["metric"].clone()).unwrap();
                        let value = r["value"][1].as_str().unwrap().parse().unwrap();
                        (labels, value)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Polls a single-valued query until `ok` holds of its value.
    fn wait_for(&self, promql: &str, what: &str, ok: impl Fn(f64) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        let mut last = None;
        loop {
            let samples = self.samples(promql);
            if let [(_, v)] = samples.as_slice() {
                if ok(*v) {
                    return;
                }
                last = Some(*v);
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: `{promql}` last gave {last:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_eq(&self, promql: &str, expected: f64) {
        self.wait_for(promql, &format!("= {expected}"), |v| v == expected);
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- Prometheus log ---\n{}", self.log_text());
        }
    }
}

/// Prints orderflow's output if the test fails (the server is dropped
/// after this guard, so the output is complete).
struct ShowOutputOnFailure<'a>(&'a Server);

impl Drop for ShowOutputOnFailure<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- orderflow output ---\n{}", self.0.output_text());
        }
    }
}

fn place(base: &str, body: &Value) {
    let r = client()
        .post(format!("{base}/v1/orders"))
        .json(body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().unwrap_or_default());
}

fn with_token(mut body: Value, token: &str) -> Value {
    body["payment"]["token"] = token.into();
    body
}

/// Every `expr` of the dashboard's panels (rows nest panels too), with its title.
fn dashboard_queries() -> Vec<(String, String)> {
    fn walk(panels: &[Value], out: &mut Vec<(String, String)>) {
        for p in panels {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((p["title"].as_str().unwrap_or("").to_owned(), e.to_owned()));
                }
            }
            walk(p["panels"].as_array().map_or(&[], |v| v), out);
        }
    }
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/grafana/dashboards/orderflow.json");
    let dash: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let mut out = Vec::new();
    walk(dash["panels"].as_array().unwrap(), &mut out);
    out
}

/// Grafana's variables as docker/check replaces them, longest name first.
fn concrete(expr: &str) -> String {
    let mut e = expr.to_owned();
    for (var, value) in [
        ("$__rate_interval", "1m"),
        ("$__interval", "1m"),
        ("$__range", "1h"),
        ("$instance", ".*"),
    ] {
        e = e.replace(var, value);
    }
    assert!(!e.contains('$'), "unknown Grafana variable in {expr}");
    e
}

/// Orders that confirm, run out of stock and are declined show up in a real Prometheus with the right values, and every dashboard query evaluates.
#[test]
fn business_metrics_reach_prometheus_and_dashboard_queries_evaluate() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("orderflow.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlatency_ms = {GATEWAY_LATENCY_MS}\n[metrics]\ntop_out_of_stock_skus = 2\n"
        ),
    )
    .unwrap();
    let server = start_server(
        &dir.path().join("data"),
        &[("ORDERFLOW_CONFIG", config.to_str().unwrap())],
    );
    let _show = ShowOutputOnFailure(&server);
    let base = server.base.clone();
    let prom = Prometheus::start(base.trim_start_matches("http://"));
    prom.wait_eq("up{job=\"orderflow\"}", 1.0);

    set_stock(&base, PLENTY, 100);
    set_stock(&base, HOT, 2);
    set_stock(&base, COLD, 0);
    let mut expected: Vec<(String, &str)> = Vec::new();
    for i in 0..3 {
        let id = format!("ok-{i}");
        place(&base, &order_body(&id, PLENTY, 1));
        expected.push((id, "confirmed"));
    }
    for (i, token) in ["tok_chargeDeclined", "tok_chargeDeclinedInsufficientFunds"]
        .iter()
        .enumerate()
    {
        let id = format!("declined-{i}");
        place(&base, &with_token(order_body(&id, PLENTY, 1), token));
        expected.push((id, "payment_declined"));
    }
    // HOT refuses 5 orders (4 alone, 1 in a two-SKU saga whose held
    // PLENTY line is released: a compensation), COLD one: with k = 2 both
    // have series, HOT first.
    for i in 0..4 {
        let id = format!("hot-{i}");
        place(&base, &order_body(&id, HOT, 5));
        expected.push((id, "out_of_stock"));
    }
    let mut saga = order_body("saga-0", PLENTY, 1);
    saga["lines"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"sku": HOT, "quantity": 5, "unit_price": 500}));
    place(&base, &saga);
    expected.push(("saga-0".into(), "out_of_stock"));
    place(&base, &order_body("cold-0", COLD, 1));
    expected.push(("cold-0".into(), "out_of_stock"));

    // While the five payments wait on the slow gateway, they are in flight.
    prom.wait_for(
        "max_over_time(orderflow_sagas_in_flight[10m])",
        "five orders in flight at once",
        |v| v >= 5.0,
    );
    prom.wait_for(
        "max_over_time(orderflow_saga_oldest_age_seconds[10m])",
        "the oldest order in flight ageing",
        |v| v >= 1.0,
    );

    wait_until(DEADLINE, "every order terminal", || {
        expected.iter().all(|(id, _)| {
            order_view(&base, id)
                .is_some_and(|v| support::is_terminal(v["status"].as_str().unwrap_or("")))
        })
    });
    for (id, status) in &expected {
        assert_eq!(order_view(&base, id).unwrap()["status"], *status, "{id}");
    }

    prom.wait_eq("sum(orderflow_orders_total{status=\"accepted\"})", 11.0);
    prom.wait_eq("sum(orderflow_orders_total{status=\"confirmed\"})", 3.0);
    prom.wait_eq(
        "sum(orderflow_orders_total{status=\"out_of_stock\", reason=\"insufficient_stock\"})",
        6.0,
    );
    // Declines by reason: the simulator's decline codes.
    prom.wait_eq(
        "sum(orderflow_orders_total{status=\"payment_declined\", reason=\"generic_decline\"})",
        1.0,
    );
    prom.wait_eq(
        "sum(orderflow_orders_total{status=\"payment_declined\", reason=\"insufficient_funds\"})",
        1.0,
    );
    prom.wait_eq(
        "sum(orderflow_order_duration_seconds_count{status=\"confirmed\"})",
        3.0,
    );
    // Confirmed orders waited for the gateway's latency.
    prom.wait_for(
        "sum(orderflow_order_duration_seconds_sum{status=\"confirmed\"}) / 3",
        "placed → confirmed of at least the gateway latency",
        |v| v >= GATEWAY_LATENCY_MS as f64 / 1000.0,
    );
    prom.wait_eq(
        "sum(orderflow_saga_compensations_total{status=\"payment_declined\", action=\"release_stock\"})",
        2.0,
    );
    prom.wait_eq(
        "sum(orderflow_saga_compensations_total{status=\"out_of_stock\", action=\"release_stock\"})",
        1.0,
    );
    prom.wait_eq(
        "sum(orderflow_saga_compensations_total{action=\"void_payment\"})",
        0.0,
    );
    prom.wait_eq("orderflow_out_of_stock_top_skus{sku=\"SKU-HOT\"}", 5.0);
    prom.wait_eq("orderflow_out_of_stock_top_skus{sku=\"SKU-COLD\"}", 1.0);
    let top = prom.samples("topk(1, orderflow_out_of_stock_top_skus)");
    assert_eq!(top.len(), 1, "{top:?}");
    assert_eq!(top[0].0.get("sku").map(String::as_str), Some(HOT));
    prom.wait_eq("count(orderflow_out_of_stock_top_skus)", 2.0);
    prom.wait_eq("sum(orderflow_sagas_in_flight)", 0.0);
    prom.wait_eq("max(orderflow_saga_oldest_age_seconds)", 0.0);

    let queries = dashboard_queries();
    assert!(
        queries.len() > 30,
        "dashboard queries found: {}",
        queries.len()
    );
    let mut failed = Vec::new();
    for (title, expr) in &queries {
        let answer = prom.query(&concrete(expr));
        if answer["status"] != "success" {
            failed.push(format!("{title}: {expr}: {answer}"));
            continue;
        }
        // The saga-health panels must show data for this traffic, not only parse.
        let saga_panel = [
            "orderflow_saga",
            "orderflow_out_of_stock_top_skus",
            "orderflow_order_duration",
        ]
        .iter()
        .any(|m| expr.contains(m));
        let empty = answer["data"]["result"]
            .as_array()
            .is_none_or(|r| r.is_empty());
        if saga_panel && empty {
            failed.push(format!("{title}: {expr}: no data"));
        }
    }
    assert!(
        failed.is_empty(),
        "dashboard queries failed:\n{}",
        failed.join("\n")
    );
}
