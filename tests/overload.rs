//! Intake's admission control end to end, on an in-process instance with
//! small limits: more concurrent clients than the limits allow get 429/503
//! with `Retry-After` and a problem+json body, every order answered 202
//! still reaches a terminal status (sagas included: shedding happens before
//! the log, so payment results and saga messages are never refused), the
//! instance stays up, and a normal order is taken again after the burst.
//! Nothing here is timed: the limits are small enough that a burst always
//! exceeds them, and every wait polls with a deadline.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use orderflow::app::{App, start};
use orderflow::config::{Config, IntakeConfig, MIN_RSS_BOUND_BYTES, Secret};
use orderflow::pipeline::log::{Topic, partition_for_key};
use reqwest::{Client, StatusCode, header};
use serde_json::{Value, json};

const ADMIN: &str = "overload-admin-token";
const DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(20);
const TERMINAL: [&str; 5] = [
    "confirmed",
    "rejected",
    "out_of_stock",
    "payment_declined",
    "payment_failed",
];
/// SKUs in play, each on its own partition (of the default 8).
const SKU_COUNT: usize = 4;
/// Concurrent clients per burst, each sending `ORDERS_PER_CLIENT` in a row.
const CLIENTS: usize = 64;
const ORDERS_PER_CLIENT: usize = 6;
/// Bursts tried before the test gives up on seeing a refusal.
const MAX_BURSTS: usize = 10;

struct Server {
    app: App,
    base: String,
    http: Client,
}

impl Server {
    async fn start(dir: &Path, intake: IntakeConfig) -> Server {
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.to_path_buf(),
            intake,
            ..Config::default()
        };
        let app = start(config, Some(Secret::new(ADMIN)))
            .await
            .expect("the app starts");
        let server = Server {
            base: format!("http://{}", app.addr()),
            app,
            http: Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        };
        let start = Instant::now();
        while server.get("/readyz").await.status() != StatusCode::OK {
            assert!(start.elapsed() < DEADLINE, "not ready within {DEADLINE:?}");
            tokio::time::sleep(POLL).await;
        }
        server
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap()
    }

    async fn post_order(&self, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/orders", self.base))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    async fn set_stock(&self, sku: &str, available: u64) {
        let res = self
            .http
            .put(format!("{}/v1/inventory/{sku}", self.base))
            .bearer_auth(ADMIN)
            .json(&json!({ "available": available }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }

    /// Polls the order until it has a terminal status.
    async fn wait_terminal(&self, id: &str, token: &str) -> String {
        let start = Instant::now();
        loop {
            let res = self
                .http
                .get(format!("{}/v1/orders/{id}", self.base))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK, "GET /v1/orders/{id}");
            let v: Value = res.json().await.unwrap();
            let status = v["status"].as_str().unwrap().to_owned();
            if TERMINAL.contains(&status.as_str()) {
                return status;
            }
            assert!(start.elapsed() < DEADLINE, "order {id} did not finish: {v}");
            tokio::time::sleep(POLL).await;
        }
    }

    async fn shed_total(&self) -> BTreeMap<String, u64> {
        let text = self.get("/metrics").await.text().await.unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix("orderflow_intake_shed_total{reason=\""))
            .filter_map(|l| l.split_once("\"} "))
            .map(|(reason, n)| (reason.to_owned(), n.trim().parse().unwrap()))
            .collect()
    }
}

/// The first `SKU_COUNT` names `SKU-{i}` on distinct partitions.
fn skus() -> Vec<String> {
    let partitions = Config::default().partitions;
    let mut seen = Vec::new();
    let mut names = Vec::new();
    for i in 0.. {
        let name = format!("SKU-{i}");
        let p = partition_for_key(name.as_bytes(), partitions);
        if !seen.contains(&p) {
            seen.push(p);
            names.push(name);
            if names.len() == SKU_COUNT {
                return names;
            }
        }
    }
    unreachable!("the loop returns")
}

/// Every second order is a two-SKU saga (its lines on two partitions).
fn order(n: usize) -> Value {
    let skus = skus();
    let sku = &skus[n % SKU_COUNT];
    let mut lines = vec![json!({"sku": sku, "quantity": 1, "unit_price": 500})];
    if n % 2 == 1 {
        let other = &skus[(n + 1) % SKU_COUNT];
        lines.push(json!({"sku": other, "quantity": 1, "unit_price": 700}));
    }
    json!({
        "customer_id": format!("cus-{n}"),
        "currency": "USD",
        "lines": lines,
        "payment": {"token": "tok_visa"}
    })
}

/// One answer of a burst, checked against the contract as it comes.
enum Answer {
    Accepted { id: String, token: String },
    Refused,
}

async fn answer(res: reqwest::Response) -> Answer {
    let status = res.status();
    if status == StatusCode::ACCEPTED {
        let v: Value = res.json().await.unwrap();
        return Answer::Accepted {
            id: v["order_id"].as_str().unwrap().to_owned(),
            token: v["tracking_token"].as_str().unwrap().to_owned(),
        };
    }
    assert!(
        status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE,
        "a burst is answered 202, 429 or 503, not {status}"
    );
    let retry_after: u64 = res
        .headers()
        .get(header::RETRY_AFTER)
        .expect("a refusal carries Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    assert_eq!(
        res.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
    let v: Value = res.json().await.unwrap();
    let code = v["code"].as_str().unwrap();
    assert!(matches!(code, "overloaded" | "log_full"), "code {code}");
    assert_eq!(v["status"], status.as_u16());
    assert_eq!(v["type"], format!("urn:orderflow:problem:{code}"));
    Answer::Refused
}

/// `CLIENTS` concurrent clients each send `ORDERS_PER_CLIENT` orders.
async fn burst(server: &Server, round: usize) -> Vec<Answer> {
    let tasks = (0..CLIENTS).map(|c| {
        let (http, base) = (server.http.clone(), server.base.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for k in 0..ORDERS_PER_CLIENT {
                let n = (round * CLIENTS + c) * ORDERS_PER_CLIENT + k;
                let res = http
                    .post(format!("{base}/v1/orders"))
                    .json(&order(n))
                    .send()
                    .await
                    .unwrap();
                answers.push(answer(res).await);
            }
            answers
        })
    });
    futures::future::join_all(tasks)
        .await
        .into_iter()
        .flat_map(Result::unwrap)
        .collect()
}

/// More concurrent clients than `max_inflight` 8 and a 16-record backlog
/// allow: some are refused (429/503, `Retry-After`, problem+json), every
/// accepted order reaches a terminal status, and a normal order is
/// accepted again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn burst_beyond_the_limits_sheds_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let intake = IntakeConfig {
        max_inflight: 8,
        max_backlog_records: 16,
        max_rss_bytes: 0,
    };
    let server = Server::start(dir.path(), intake).await;
    for sku in skus() {
        server.set_stock(&sku, 1_000_000).await;
    }
    let mut accepted = Vec::new();
    let mut refused = 0;
    for round in 0..MAX_BURSTS {
        for a in burst(&server, round).await {
            match a {
                Answer::Accepted { id, token } => accepted.push((id, token)),
                Answer::Refused => refused += 1,
            }
        }
        if refused > 0 {
            break;
        }
    }
    assert!(
        refused > 0,
        "{MAX_BURSTS} bursts of {CLIENTS} clients never exceeded max_inflight 8"
    );
    assert!(!accepted.is_empty(), "nothing was accepted");
    let shed = server.shed_total().await;
    assert_eq!(
        shed.values().sum::<u64>(),
        refused,
        "every refusal is counted by reason: {shed:?}"
    );

    for (id, token) in &accepted {
        assert_eq!(server.wait_terminal(id, token).await, "confirmed", "{id}");
    }
    assert_eq!(server.get("/healthz").await.status(), StatusCode::OK);
    // Taken again once the backlog the burst left is processed.
    let start = Instant::now();
    let (id, token) = loop {
        match answer(server.post_order(&order(1)).await).await {
            Answer::Accepted { id, token } => break (id, token),
            Answer::Refused => {
                assert!(
                    start.elapsed() < DEADLINE,
                    "still refused after {DEADLINE:?}"
                );
                tokio::time::sleep(POLL).await;
            }
        }
    };
    assert_eq!(server.wait_terminal(&id, &token).await, "confirmed");
    server.app.shutdown().await.expect("clean shutdown");
}

/// Above `intake.max_rss_bytes` a new order is answered 503 `overloaded`
/// with `Retry-After`, counted as `memory`, and never reaches the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bound_sheds_new_orders() {
    let dir = tempfile::tempdir().unwrap();
    let intake = IntakeConfig {
        max_rss_bytes: MIN_RSS_BOUND_BYTES,
        ..IntakeConfig::default()
    };
    let server = Server::start(dir.path(), intake).await;
    let res = server.post_order(&order(0)).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(matches!(answer(res).await, Answer::Refused));
    assert_eq!(server.shed_total().await.get("memory"), Some(&1));
    let log = server.app.log();
    for p in 0..log.partition_count(Topic::Orders) {
        assert_eq!(log.offsets(Topic::Orders, p).await.unwrap(), (0, 0));
    }
    server.app.shutdown().await.expect("clean shutdown");
}
