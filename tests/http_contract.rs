//! The HTTP contract of docs/design.md, end to end against an in-process
//! instance (`orderflow::app::start`): every route, every error code that
//! a client can provoke, idempotency (also across a restart), tracking
//! tokens, SSE, inventory, the admin produce endpoint and the roles of
//! API tokens.
//!
//! One suite, two backends: every case runs on the embedded deployment
//! (module `embedded`) and on Kafka + Cassandra (module `distributed`,
//! engines started by `scripts/kafka` and `scripts/cassandra`).

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use orderflow::app::{App, start};
use orderflow::config::{Config, GatewayKind, KafkaConfig, ScyllaConfig, Secret};
use orderflow::gateway::sim_server;
use orderflow::gateway::simulator::{SimEngine, SimOptions};
use orderflow::http::auth::{Credentials, Role};
use orderflow::pipeline::store::scylla::migrate;
use reqwest::{Client, Response, StatusCode};
use serde_json::{Value, json};

const ADMIN: &str = "contract-admin-token";
/// A second admin token, active beside the first as during a rotation.
const ADMIN_NEXT: &str = "contract-admin-token-next";
const READER: &str = "contract-reader-token";
const PRODUCER: &str = "contract-producer-token";
const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);
const TERMINAL: [&str; 5] = [
    "confirmed",
    "rejected",
    "out_of_stock",
    "payment_declined",
    "payment_failed",
];

/// Which log and state store a case runs on.
#[derive(Clone, Copy, Debug)]
enum Backend {
    Embedded,
    Distributed,
}

/// The configuration of a case's instance. Distributed, the Kafka topic
/// prefix, group and keyspace are named after the case's temporary
/// directory, so a restart in the same directory finds the same data.
fn config(dir: &Path, backend: Backend) -> Config {
    let mut c = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    if let Backend::Distributed = backend {
        let tag: String = dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect::<String>()
            .to_ascii_lowercase();
        let name = format!("hc_{}_{tag}", std::process::id());
        c.kafka = Some(KafkaConfig {
            bootstrap_servers: support::kafka_bootstrap(),
            group_id: name.clone(),
            topic_prefix: format!("{name}."),
            session_timeout_ms: 6_000,
            ..KafkaConfig::default()
        });
        c.scylla = Some(ScyllaConfig {
            nodes: vec![support::cassandra_contact()],
            keyspace: name,
            ..ScyllaConfig::default()
        });
    }
    c
}

/// Distributed instances must share their gateway: points `config` at a
/// gateway-sim served in this process, one per data directory (so one
/// case's order ids meet no other case's, and a restarted instance finds
/// the intents it made), with the configured latency.
fn use_shared_gateway(config: &mut Config) {
    static SIMS: Mutex<BTreeMap<PathBuf, String>> = Mutex::new(BTreeMap::new());
    let latency = Duration::from_millis(config.gateway.latency_ms);
    let mut sims = SIMS.lock().unwrap();
    let url = sims.entry(config.data_dir.clone()).or_insert_with(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        // Its own runtime: it outlives the runtime of the case that started it.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let options = SimOptions {
                    latency,
                    ..SimOptions::default()
                };
                let engine = Arc::new(SimEngine::new(options));
                sim_server::serve(listener, engine, std::future::pending())
                    .await
                    .unwrap();
            });
        });
        url
    });
    let key_file = config.data_dir.join("stripe-key");
    std::fs::write(&key_file, "sk_test_http_contract").unwrap();
    config.gateway.kind = GatewayKind::Stripe;
    config.gateway.url = url.clone();
    config.gateway.secret_key_file = Some(key_file);
}

/// Runs each named case once per backend, as `embedded::NAME` and
/// `distributed::NAME`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Backend::Embedded).await
                }
            )*
        }
        mod distributed {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Backend::Distributed).await
                }
            )*
        }
    };
}

on_both_backends!(
    order_confirms_and_stock_is_sold,
    declined_payment_releases_stock,
    invalid_orders_answer_400_with_codes,
    too_large_bodies_answer_413,
    idempotent_by_order_id,
    idempotent_by_key,
    idempotent_across_restart,
    tracking_token_checks,
    sse_streams_statuses_to_terminal,
    sse_stream_limit,
    inventory_needs_admin_token,
    admin_routes_disabled_without_token,
    admin_produce_mixed_lines,
    ops_routes_and_fallbacks,
    api_token_roles,
    produced_order_followed_with_fetched_tracking_token,
    consumer_lag_for_every_topic,
);

struct Server {
    app: App,
    base: String,
    http: Client,
}

impl Server {
    async fn start_with(config: Config, admin: Option<&str>) -> Server {
        Server::start_with_credentials(config, admin.map(Secret::new).into()).await
    }

    async fn start_with_credentials(mut config: Config, credentials: Credentials) -> Server {
        if let Some(scylla) = &config.scylla {
            migrate(scylla).await.expect("orderflow migrate");
            use_shared_gateway(&mut config);
        }
        let app = start(config, credentials).await.expect("the app starts");
        let base = format!("http://{}", app.addr());
        Server {
            app,
            base,
            http: Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
        }
    }

    async fn start(dir: &Path, backend: Backend) -> Server {
        Server::start_with(config(dir, backend), Some(ADMIN)).await
    }

    async fn stop(self) {
        self.app.shutdown().await.expect("clean shutdown");
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn post_order(&self, body: &Value) -> Response {
        self.http
            .post(self.url("/v1/orders"))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    async fn post_raw(&self, body: impl Into<reqwest::Body>) -> Response {
        self.http
            .post(self.url("/v1/orders"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
    }

    async fn accept(&self, body: &Value) -> Value {
        let res = self.post_order(body).await;
        assert_eq!(res.status(), StatusCode::ACCEPTED);
        res.json().await.unwrap()
    }

    async fn set_stock(&self, sku: &str, available: u64) -> Value {
        let res = self
            .http
            .put(self.url(&format!("/v1/inventory/{sku}")))
            .bearer_auth(ADMIN)
            .json(&json!({ "available": available }))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        res.json().await.unwrap()
    }

    async fn stock(&self, sku: &str) -> Value {
        let res = self
            .http
            .get(self.url(&format!("/v1/inventory/{sku}")))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        res.json().await.unwrap()
    }

    async fn get_order(&self, id: &str, token: &str) -> Response {
        self.http
            .get(self.url(&format!("/v1/orders/{id}")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    /// Polls the order until it has a terminal status (bounded by DEADLINE).
    async fn wait_terminal(&self, id: &str, token: &str) -> Value {
        let start = Instant::now();
        loop {
            let res = self.get_order(id, token).await;
            // A produced order is unknown until the read model sees it.
            if token == ADMIN && res.status() == StatusCode::NOT_FOUND && start.elapsed() < DEADLINE
            {
                tokio::time::sleep(POLL).await;
                continue;
            }
            assert_eq!(res.status(), StatusCode::OK, "GET /v1/orders/{id}");
            let v: Value = res.json().await.unwrap();
            if TERMINAL.contains(&v["status"].as_str().unwrap()) {
                return v;
            }
            assert!(start.elapsed() < DEADLINE, "order {id} did not finish: {v}");
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls the SKU's counters until `pred` holds (bounded by DEADLINE).
    async fn wait_stock(&self, sku: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let v = self.stock(sku).await;
            if pred(&v) {
                return v;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "stock of {sku} never matched: {v}"
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

fn order(id: Option<&str>, sku: &str, quantity: u32, token: &str) -> Value {
    let mut o = json!({
        "customer_id": "cus-42",
        "currency": "USD",
        "lines": [{"sku": sku, "quantity": quantity, "unit_price": 1999}],
        "payment": {"token": token},
        "contact": {"email": "ada@example.com"}
    });
    if let Some(id) = id {
        o["order_id"] = json!(id);
    }
    o
}

/// Asserts a problem+json answer with `status` and `code`; returns it.
async fn problem(res: Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(res.status(), status, "expected {status} {code}");
    let ct = res
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(ct, "application/problem+json");
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["code"], code, "{v}");
    assert_eq!(v["status"], status.as_u16());
    assert!(
        v["type"].is_string() && v["title"].is_string() && v["detail"].is_string(),
        "{v}"
    );
    v
}

fn is_rfc3339_utc(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() == 24
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[23] == b'Z'
        && s.starts_with("20")
}

/// One parsed SSE event.
#[derive(Debug)]
struct SseEvent {
    event: String,
    id: String,
    data: Value,
}

/// Reads an SSE response to its end (bounded by DEADLINE).
async fn read_sse(mut res: Response) -> Vec<SseEvent> {
    let mut text = String::new();
    let start = Instant::now();
    loop {
        let left = DEADLINE.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, res.chunk())
            .await
            .expect("the stream ends in time")
            .unwrap()
        {
            Some(bytes) => text.push_str(std::str::from_utf8(&bytes).unwrap()),
            None => break,
        }
    }
    text.split("\n\n")
        .filter_map(|block| {
            let (mut event, mut id, mut data) = (String::new(), String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            (!data.is_empty()).then(|| SseEvent {
                event,
                id,
                data: serde_json::from_str(&data).unwrap(),
            })
        })
        .collect()
}

/// An order for a SKU with stock 5 ends `confirmed`, with the contract's shapes, and the stock shows it sold.
async fn order_confirms_and_stock_is_sold(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), backend).await;
    let set = s.set_stock("SKU-1", 5).await;
    assert_eq!(
        set,
        json!({"sku": "SKU-1", "available": 5, "reserved": 0, "sold": 0})
    );

    let res = s
        .post_order(&order(Some("ord-1001"), "SKU-1", 2, "tok_visa"))
        .await;
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    assert_eq!(
        res.headers().get("location").unwrap(),
        "/v1/orders/ord-1001"
    );
    let a: Value = res.json().await.unwrap();
    assert_eq!(a["order_id"], "ord-1001");
    assert_eq!(a["status"], "accepted");
    assert_eq!(a["tracking_url"], "/v1/orders/ord-1001");
    let token = a["tracking_token"].as_str().unwrap();
    assert!(token.len() >= 22, "a token carries at least 128 bits");

    let v = s.wait_terminal("ord-1001", token).await;
    assert_eq!(v["order_id"], "ord-1001");
    assert_eq!(v["status"], "confirmed");
    assert!(v["reason"].is_null());
    let history = v["history"].as_array().unwrap();
    let statuses: Vec<&str> = history
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["accepted", "reserved", "paid", "confirmed"]);
    for (i, h) in history.iter().enumerate() {
        assert_eq!(h["seq"], i as u64 + 1);
        assert!(is_rfc3339_utc(h["at"].as_str().unwrap()), "{h}");
    }
    let stock = s.wait_stock("SKU-1", |v| v["sold"] == 2).await;
    assert_eq!(
        stock,
        json!({"sku": "SKU-1", "available": 3, "reserved": 0, "sold": 2})
    );
    s.stop().await;
}

/// `tok_chargeDeclined` ends `payment_declined` and the held stock is released.
async fn declined_payment_releases_stock(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), backend).await;
    s.set_stock("SKU-D", 5).await;
    let a = s
        .accept(&order(
            Some("ord-declined"),
            "SKU-D",
            2,
            "tok_chargeDeclined",
        ))
        .await;
    let v = s
        .wait_terminal("ord-declined", a["tracking_token"].as_str().unwrap())
        .await;
    assert_eq!(v["status"], "payment_declined", "{v}");
    let stock = s.wait_stock("SKU-D", |v| v["reserved"] == 0).await;
    assert_eq!(
        stock,
        json!({"sku": "SKU-D", "available": 5, "reserved": 0, "sold": 0})
    );
    // And an order for a SKU without stock ends out_of_stock.
    let a = s
        .accept(&order(Some("ord-nostock"), "SKU-NONE", 1, "tok_visa"))
        .await;
    let v = s
        .wait_terminal("ord-nostock", a["tracking_token"].as_str().unwrap())
        .await;
    assert_eq!(v["status"], "out_of_stock", "{v}");
    s.stop().await;
}

/// At least 20 invalid orders each answer 400 problem+json with their code; the server stays healthy.
async fn invalid_orders_answer_400_with_codes(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), backend).await;
    let good = order(None, "SKU-1", 1, "tok_visa");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut o = good.clone();
        f(&mut o);
        o.to_string()
    };
    let many_lines: Vec<Value> = (0..101)
        .map(|i| json!({"sku": format!("S{i}"), "quantity": 1, "unit_price": 1}))
        .collect();
    let cases: Vec<(String, &str)> = vec![
        ("{".into(), "malformed_json"),
        ("".into(), "malformed_json"),
        ("{\"customer_id\": }".into(), "malformed_json"),
        ("[]".into(), "not_an_object"),
        ("\"an order\"".into(), "not_an_object"),
        (with(&|o| o["note"] = json!("hi")), "unknown_field"),
        (
            with(&|o| o["lines"][0]["color"] = json!("red")),
            "unknown_field",
        ),
        (
            with(&|o| o["contact"]["phone"] = json!("1")),
            "unknown_field",
        ),
        (
            with(&|o| drop(o.as_object_mut().unwrap().remove("customer_id"))),
            "missing_field",
        ),
        (
            with(&|o| drop(o.as_object_mut().unwrap().remove("payment"))),
            "missing_field",
        ),
        (
            with(&|o| drop(o["lines"][0].as_object_mut().unwrap().remove("unit_price"))),
            "missing_field",
        ),
        (with(&|o| o["customer_id"] = json!(42)), "invalid_type"),
        (with(&|o| o["lines"] = json!({"sku": "A"})), "invalid_type"),
        (
            with(&|o| o["order_id"] = json!("bad id!")),
            "invalid_order_id",
        ),
        (
            with(&|o| o["order_id"] = json!("x".repeat(65))),
            "invalid_order_id",
        ),
        (
            with(&|o| o["customer_id"] = json!("")),
            "invalid_customer_id",
        ),
        (with(&|o| o["currency"] = json!("usd")), "invalid_currency"),
        (with(&|o| o["currency"] = json!("US")), "invalid_currency"),
        (with(&|o| o["lines"] = json!([])), "no_lines"),
        (with(&|o| o["lines"] = json!(many_lines)), "too_many_lines"),
        (
            with(&|o| o["lines"][0]["sku"] = json!("a b")),
            "invalid_sku",
        ),
        (
            with(&|o| o["lines"][0]["sku"] = json!("S".repeat(65))),
            "invalid_sku",
        ),
        (
            with(&|o| o["lines"][0]["quantity"] = json!(0)),
            "invalid_quantity",
        ),
        (
            with(&|o| o["lines"][0]["quantity"] = json!(1001)),
            "invalid_quantity",
        ),
        (
            with(&|o| o["lines"][0]["quantity"] = json!(1.5)),
            "invalid_quantity",
        ),
        (
            with(&|o| o["lines"][0]["unit_price"] = json!(-1)),
            "invalid_unit_price",
        ),
        (
            with(&|o| o["lines"][0]["unit_price"] = json!(1_000_000_001u64)),
            "invalid_unit_price",
        ),
        (
            with(&|o| o["lines"][0]["unit_price"] = json!(19.99)),
            "invalid_unit_price",
        ),
        (
            with(&|o| o["payment"] = json!({"token": "tok_visa", "cvc": "123"})),
            "payment_token_only",
        ),
        (
            with(&|o| o["payment"] = json!({"number": "x", "exp": "12/30"})),
            "payment_token_only",
        ),
        (
            with(&|o| o["payment"]["token"] = json!("tok visa")),
            "invalid_payment_token",
        ),
        (
            with(&|o| o["payment"]["token"] = json!("")),
            "invalid_payment_token",
        ),
        (
            with(&|o| o["contact"]["email"] = json!("not-an-email")),
            "invalid_email",
        ),
        (
            with(&|o| o["contact"]["email"] = json!("4242 4242 4242 4242")),
            "pan_detected",
        ),
        (
            with(&|o| o["customer_id"] = json!("4111111111111111")),
            "pan_detected",
        ),
    ];
    assert!(cases.len() >= 20);
    for (body, code) in cases {
        let res = s.post_raw(body.clone()).await;
        let p = problem(res, StatusCode::BAD_REQUEST, code).await;
        assert!(
            !p.to_string().contains("4242") && !p.to_string().contains("4111"),
            "a problem never echoes card data: {p}"
        );
    }
    let res = s
        .http
        .post(s.url("/v1/orders"))
        .header("idempotency-key", "")
        .json(&good)
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::BAD_REQUEST, "invalid_idempotency_key").await;
    let res = s
        .http
        .post(s.url("/v1/orders"))
        .header("idempotency-key", "x".repeat(256))
        .json(&good)
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::BAD_REQUEST, "invalid_idempotency_key").await;

    let res = s.http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.text().await.unwrap(), "ok");
    // Lenient about the content type, as long as the body is an order.
    let res = s
        .http
        .post(s.url("/v1/orders"))
        .header("content-type", "text/plain")
        .body(good.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::ACCEPTED);
    s.stop().await;
}

/// A body over the limit answers 413 `payload_too_large`; an order over the log's record limit 413 `record_too_large`.
async fn too_large_bodies_answer_413(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), backend);
    c.log.max_record_bytes = 1024;
    let limit = c.http.body_limit_bytes;
    let s = Server::start_with(c, Some(ADMIN)).await;
    let mut big = order(None, "SKU-1", 1, "tok_visa");
    big["customer_id"] = json!("c".repeat(limit));
    problem(
        s.post_raw(big.to_string()).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    )
    .await;
    let mut huge = big.clone();
    huge["customer_id"] = json!("c".repeat(limit * 8));
    problem(
        s.post_raw(huge.to_string()).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    )
    .await;
    // Valid, under the body limit, but its canonical record exceeds 1 KiB.
    let lines: Vec<Value> = (0..40)
        .map(|i| json!({"sku": format!("SKU-{i:03}"), "quantity": 1, "unit_price": 1}))
        .collect();
    let mut wide = order(None, "SKU-1", 1, "tok_visa");
    wide["lines"] = json!(lines);
    problem(
        s.post_order(&wide).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "record_too_large",
    )
    .await;
    // The server is fine afterwards.
    assert_eq!(
        s.post_order(&order(None, "SKU-1", 1, "tok_visa"))
            .await
            .status(),
        StatusCode::ACCEPTED
    );
    s.stop().await;
}

/// The same order_id again answers the first answer (same token) and makes no second order.
async fn idempotent_by_order_id(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), backend).await;
    s.set_stock("SKU-I", 5).await;
    let body = order(Some("ord-idem"), "SKU-I", 2, "tok_visa");
    let (first, again) = tokio::join!(s.accept(&body), s.accept(&body));
    assert_eq!(first, again);
    let mut other_body = body.clone();
    other_body["lines"][0]["quantity"] = json!(1);
    assert_eq!(
        s.accept(&other_body).await,
        first,
        "the first answer, whatever the body"
    );
    let v = s
        .wait_terminal("ord-idem", first["tracking_token"].as_str().unwrap())
        .await;
    assert_eq!(v["status"], "confirmed");
    assert_eq!(v["history"].as_array().unwrap().len(), 4, "one order: {v}");
    // Once terminal, stock shows exactly one sale of 2.
    let stock = s.wait_stock("SKU-I", |v| v["reserved"] == 0).await;
    assert_eq!(
        (stock["sold"].as_u64(), stock["available"].as_u64()),
        (Some(2), Some(3))
    );
    assert_eq!(s.accept(&body).await, first);
    s.stop().await;
}

/// The same Idempotency-Key (same customer) answers the first answer; another key is another order.
async fn idempotent_by_key(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), backend).await;
    s.set_stock("SKU-K", 5).await;
    let body = order(None, "SKU-K", 1, "tok_visa");
    let post = |key: &'static str| {
        let req = s
            .http
            .post(s.url("/v1/orders"))
            .header("Idempotency-Key", key)
            .json(&body);
        async move {
            let res = req.send().await.unwrap();
            assert_eq!(res.status(), StatusCode::ACCEPTED);
            res.json::<Value>().await.unwrap()
        }
    };
    let (a, b) = tokio::join!(post("key-1"), post("key-1"));
    assert_eq!(a, b);
    let id = a["order_id"].as_str().unwrap();
    assert!(id.starts_with("idem-"), "{id}");
    let c = post("key-2").await;
    assert_ne!(c["order_id"], a["order_id"]);
    assert_ne!(c["tracking_token"], a["tracking_token"]);
    // Without a key or an order_id, each request is a new order.
    let (d, e) = (s.accept(&body).await, s.accept(&body).await);
    assert_ne!(d["order_id"], e["order_id"]);
    assert!(d["order_id"].as_str().unwrap().starts_with("ord-"));
    for x in [&a, &c, &d, &e] {
        s.wait_terminal(
            x["order_id"].as_str().unwrap(),
            x["tracking_token"].as_str().unwrap(),
        )
        .await;
    }
    let stock = s.wait_stock("SKU-K", |v| v["reserved"] == 0).await;
    assert_eq!(stock["sold"], 4, "key-1 made one order: {stock}");
    s.stop().await;
}

/// Idempotency holds across a restart on the same data directory: same answer, same token, one order.
async fn idempotent_across_restart(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), backend).await;
    s.set_stock("SKU-R", 5).await;
    let by_id = s
        .accept(&order(Some("ord-restart"), "SKU-R", 1, "tok_visa"))
        .await;
    let keyed = order(None, "SKU-R", 1, "tok_visa");
    let by_key = s
        .http
        .post(s.url("/v1/orders"))
        .header("idempotency-key", "restart-key")
        .json(&keyed)
        .send()
        .await
        .unwrap();
    let by_key: Value = by_key.json().await.unwrap();
    s.stop().await;

    let s = Server::start(dir.path(), backend).await;
    assert_eq!(
        s.accept(&order(Some("ord-restart"), "SKU-R", 1, "tok_visa"))
            .await,
        by_id
    );
    let again = s
        .http
        .post(s.url("/v1/orders"))
        .header("idempotency-key", "restart-key")
        .json(&keyed)
        .send()
        .await
        .unwrap();
    assert_eq!(again.json::<Value>().await.unwrap(), by_key);
    for x in [&by_id, &by_key] {
        let v = s
            .wait_terminal(
                x["order_id"].as_str().unwrap(),
                x["tracking_token"].as_str().unwrap(),
            )
            .await;
        assert_eq!(v["status"], "confirmed");
    }
    let stock = s.wait_stock("SKU-R", |v| v["reserved"] == 0).await;
    assert_eq!(stock["sold"], 2, "two orders, not four: {stock}");
    s.stop().await;
}

/// A wrong token, no token and an unknown id answer the very same 404; the token works as header or query; the admin token works too.
async fn tracking_token_checks(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), backend).await;
    let a = s
        .accept(&order(Some("ord-tok"), "SKU-T", 1, "tok_visa"))
        .await;
    let token = a["tracking_token"].as_str().unwrap();
    let other = s
        .accept(&order(Some("ord-tok-2"), "SKU-T", 1, "tok_visa"))
        .await;

    let unknown = s.get_order("ord-nope", token).await;
    let unknown_status = unknown.status();
    let unknown_body = unknown.text().await.unwrap();
    assert_eq!(unknown_status, StatusCode::NOT_FOUND);
    let wrong = s.get_order("ord-tok", "wrong-token").await;
    let foreign = s
        .get_order("ord-tok", other["tracking_token"].as_str().unwrap())
        .await;
    let none = s
        .http
        .get(s.url("/v1/orders/ord-tok"))
        .send()
        .await
        .unwrap();
    let bad_query = s
        .http
        .get(s.url("/v1/orders/ord-tok?token=nope"))
        .send()
        .await
        .unwrap();
    for res in [wrong, foreign, none, bad_query] {
        assert_eq!(res.status(), unknown_status);
        assert_eq!(
            res.headers().get("content-type").unwrap(),
            "application/problem+json"
        );
        assert_eq!(res.text().await.unwrap(), unknown_body);
    }
    let p: Value = serde_json::from_str(&unknown_body).unwrap();
    assert_eq!(p["code"], "order_not_found");

    let by_header = s.get_order("ord-tok", token).await;
    assert_eq!(by_header.status(), StatusCode::OK);
    let v: Value = by_header.json().await.unwrap();
    assert_eq!(v["order_id"], "ord-tok");
    assert!(
        v["status"].is_string() && v["history"].is_array() && v.get("reason").is_some(),
        "{v}"
    );
    let by_query = s
        .http
        .get(s.url(&format!("/v1/orders/ord-tok?token={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(by_query.status(), StatusCode::OK);
    // The admin token proves nothing about the order: it sees what the
    // read model holds, once it holds it.
    s.wait_terminal("ord-tok", token).await;
    let by_admin = s.get_order("ord-tok", ADMIN).await;
    assert_eq!(by_admin.status(), StatusCode::OK);
    problem(
        s.get_order("ord-nope", ADMIN).await,
        StatusCode::NOT_FOUND,
        "order_not_found",
    )
    .await;
    s.stop().await;
}

/// The SSE stream sends the statuses in order and ends after a terminal one; a late subscriber gets the whole history.
async fn sse_streams_statuses_to_terminal(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), backend).await;
    s.set_stock("SKU-S", 5).await;
    let a = s
        .accept(&order(Some("ord-sse"), "SKU-S", 1, "tok_visa"))
        .await;
    let token = a["tracking_token"].as_str().unwrap();
    let res = s
        .http
        .get(s.url("/v1/orders/ord-sse/events"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = read_sse(res).await;
    let statuses: Vec<&str> = events
        .iter()
        .map(|e| e.data["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["accepted", "reserved", "paid", "confirmed"],
        "{events:?}"
    );
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.event, "status");
        assert_eq!(e.id, (i + 1).to_string());
        assert_eq!(e.data["seq"], i as u64 + 1);
        assert_eq!(e.data["order_id"], "ord-sse");
        assert!(is_rfc3339_utc(e.data["at"].as_str().unwrap()));
    }
    // After the end, a new stream (token in the query) replays the history and ends.
    let res = s
        .http
        .get(s.url(&format!("/v1/orders/ord-sse/events?token={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(read_sse(res).await.len(), 4);
    // A declined order's stream ends with its terminal failure and reason.
    let d = s
        .accept(&order(Some("ord-sse-d"), "SKU-S", 1, "tok_chargeDeclined"))
        .await;
    let res = s
        .http
        .get(s.url("/v1/orders/ord-sse-d/events"))
        .bearer_auth(d["tracking_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    let events = read_sse(res).await;
    assert_eq!(
        events.last().unwrap().data["status"],
        "payment_declined",
        "{events:?}"
    );
    // Same token rules as GET.
    let res = s
        .http
        .get(s.url("/v1/orders/ord-sse/events"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::NOT_FOUND, "order_not_found").await;
    s.stop().await;
}

/// Past `max_sse_streams`, a new stream answers 503 `too_many_streams` with Retry-After.
async fn sse_stream_limit(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), backend);
    c.http.max_sse_streams = 1;
    c.gateway.latency_ms = 2_000; // keeps the order open while we look
    let s = Server::start_with(c, Some(ADMIN)).await;
    s.set_stock("SKU-L", 5).await;
    let a = s
        .accept(&order(Some("ord-slow"), "SKU-L", 1, "tok_visa"))
        .await;
    let token = a["tracking_token"].as_str().unwrap();
    let open = s
        .http
        .get(s.url("/v1/orders/ord-slow/events"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(open.status(), StatusCode::OK);
    let res = s
        .http
        .get(s.url("/v1/orders/ord-slow/events"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert!(res.headers().contains_key("retry-after"));
    problem(res, StatusCode::SERVICE_UNAVAILABLE, "too_many_streams").await;
    let events = read_sse(open).await;
    assert_eq!(events.last().unwrap().data["status"], "confirmed");
    // The permit is back once the stream ended.
    let start = Instant::now();
    loop {
        let res = s
            .http
            .get(s.url("/v1/orders/ord-slow/events"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        if res.status() == StatusCode::OK {
            assert_eq!(read_sse(res).await.len(), 4);
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the stream permit was never released"
        );
        tokio::time::sleep(POLL).await;
    }
    s.stop().await;
}

/// Inventory PUT/GET need the admin token: 401 with WWW-Authenticate without it, 400 for bad input, zeros for an unknown SKU.
async fn inventory_needs_admin_token(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), backend).await;
    let url = s.url("/v1/inventory/SKU-A");
    for req in [
        s.http.get(&url),
        s.http.get(&url).bearer_auth("wrong"),
        s.http.put(&url).json(&json!({"available": 1})),
        s.http
            .put(&url)
            .bearer_auth("wrong")
            .json(&json!({"available": 1})),
        s.http
            .put(&url)
            .header("authorization", format!("Basic {ADMIN}"))
            .json(&json!({"available": 1})),
    ] {
        let res = req.send().await.unwrap();
        assert!(
            res.headers()
                .get("www-authenticate")
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
        problem(res, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    assert_eq!(
        s.stock("SKU-A").await,
        json!({"sku": "SKU-A", "available": 0, "reserved": 0, "sold": 0})
    );
    assert_eq!(s.set_stock("SKU-A", 7).await["available"], 7);
    assert_eq!(
        s.stock("SKU-A").await,
        json!({"sku": "SKU-A", "available": 7, "reserved": 0, "sold": 0})
    );
    assert_eq!(s.set_stock("SKU-A", 2).await["available"], 2);
    for body in [
        json!({"available": -1}),
        json!({"available": "3"}),
        json!({"stock": 3}),
        json!([3]),
    ] {
        let res = s
            .http
            .put(&url)
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await
            .unwrap();
        problem(res, StatusCode::BAD_REQUEST, "invalid_body").await;
    }
    // Counters that could wrap are refused at the edge (10^12 at most),
    // after a sale too, and the instance still restarts on what it wrote.
    s.set_stock("SKU-A", 5).await;
    let sold = s
        .accept(&order(Some("ord-inv"), "SKU-A", 1, "tok_visa"))
        .await;
    s.wait_terminal("ord-inv", sold["tracking_token"].as_str().unwrap())
        .await;
    for available in [u64::MAX, 1_000_000_000_001] {
        let res = s
            .http
            .put(&url)
            .bearer_auth(ADMIN)
            .json(&json!({ "available": available }))
            .send()
            .await
            .unwrap();
        let p = problem(res, StatusCode::BAD_REQUEST, "invalid_body").await;
        assert!(
            p["detail"].as_str().unwrap().contains("1000000000000"),
            "{p}"
        );
    }
    assert_eq!(s.set_stock("SKU-A", 1_000_000_000_000).await["sold"], 1);
    let dir_path = dir.path().to_path_buf();
    s.stop().await;
    let s = Server::start(&dir_path, backend).await;
    assert_eq!(s.stock("SKU-A").await["available"], 1_000_000_000_000u64);
    let bad_sku = s.url(&format!("/v1/inventory/{}", "S".repeat(65)));
    problem(
        s.http
            .get(&bad_sku)
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_sku",
    )
    .await;
    let res = s
        .http
        .put(s.url("/v1/inventory/a%20b"))
        .bearer_auth(ADMIN)
        .json(&json!({"available": 1}))
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::BAD_REQUEST, "invalid_sku").await;
    s.stop().await;
}

/// With no admin token configured, admin routes answer 403 `admin_disabled`.
async fn admin_routes_disabled_without_token(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(config(dir.path(), backend), None).await;
    let res = s
        .http
        .get(s.url("/v1/inventory/SKU-A"))
        .bearer_auth("anything")
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::FORBIDDEN, "admin_disabled").await;
    let res = s
        .http
        .put(s.url("/v1/inventory/SKU-A"))
        .json(&json!({"available": 1}))
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::FORBIDDEN, "admin_disabled").await;
    let res = s
        .http
        .post(s.url("/v1/admin/produce"))
        .body("{}\n")
        .send()
        .await
        .unwrap();
    problem(res, StatusCode::FORBIDDEN, "admin_disabled").await;
    // Orders still work, and no token is an admin token.
    let a = s
        .accept(&order(Some("ord-noadmin"), "SKU-A", 1, "tok_visa"))
        .await;
    problem(
        s.get_order("ord-noadmin", "").await,
        StatusCode::NOT_FOUND,
        "order_not_found",
    )
    .await;
    assert_eq!(
        s.get_order("ord-noadmin", a["tracking_token"].as_str().unwrap())
            .await
            .status(),
        StatusCode::OK
    );
    s.stop().await;
}

/// The admin produce endpoint answers one NDJSON line per input line; bad lines fail alone and invalid orders end `rejected`.
async fn admin_produce_mixed_lines(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), backend).await;
    s.set_stock("SKU-P", 5).await;
    let good = order(Some("prod-1"), "SKU-P", 1, "tok_visa");
    let mut invalid = order(Some("prod-bad"), "SKU-P", 1, "tok_visa");
    invalid["currency"] = json!("usd");
    let mut carded = good.clone();
    carded["order_id"] = json!("prod-card");
    carded["note"] = json!("card 4242 4242 4242 4242");
    let body = format!(
        "{good}\nnot json at all\n\n{invalid}\r\n[1,2]\n{{\"order_id\": \"prod-2\"\n{carded}\n"
    );
    let url = s.url("/v1/admin/produce");
    problem(
        s.http.post(&url).body(body.clone()).send().await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    let res = s
        .http
        .post(&url)
        .bearer_auth(ADMIN)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("application/x-ndjson")
    );
    let rows: Vec<Value> = res
        .text()
        .await
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let lines: Vec<u64> = rows.iter().map(|r| r["line"].as_u64().unwrap()).collect();
    assert_eq!(lines, [1, 2, 4, 5, 6, 7], "{rows:?}");
    assert_eq!(rows[0]["order_id"], "prod-1");
    assert!(rows[0]["partition"].is_u64() && rows[0]["offset"].is_u64());
    assert_eq!(rows[1]["code"], "malformed_json");
    assert!(rows[1]["error"].is_string());
    assert_eq!(rows[2]["order_id"], "prod-bad");
    assert!(rows[3]["offset"].is_u64() && rows[3]["order_id"].is_null());
    assert_eq!(rows[4]["code"], "malformed_json");
    assert_eq!(
        rows[5]["code"], "pan_detected",
        "a card number never reaches the log"
    );
    assert!(!rows[5].to_string().contains("4242"));

    let v = s.wait_terminal("prod-1", ADMIN).await;
    assert_eq!(v["status"], "confirmed");
    let v = s.wait_terminal("prod-bad", ADMIN).await;
    assert_eq!(
        (v["status"].as_str(), v["reason"].as_str()),
        (Some("rejected"), Some("invalid_currency"))
    );
    // The same order id produced again is still one order.
    let res = s
        .http
        .post(&url)
        .bearer_auth(ADMIN)
        .body(format!("{good}\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    s.wait_stock("SKU-P", |v| v["reserved"] == 0 && v["sold"] == 1)
        .await;
    s.stop().await;
}

/// Health, readiness and metrics answer; unknown routes and wrong methods are problems; requests are counted by route.
async fn ops_routes_and_fallbacks(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path(), backend).await;
    let res = s.http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(
        (res.status(), res.text().await.unwrap().as_str()),
        (StatusCode::OK, "ok")
    );
    let start = Instant::now();
    loop {
        let res = s.http.get(s.url("/readyz")).send().await.unwrap();
        if res.status() == StatusCode::OK {
            break;
        }
        problem(res, StatusCode::SERVICE_UNAVAILABLE, "not_ready").await;
        assert!(start.elapsed() < DEADLINE, "never ready");
        tokio::time::sleep(POLL).await;
    }
    s.accept(&order(None, "SKU-M", 1, "tok_visa")).await;
    problem(
        s.http.get(s.url("/v1/nope")).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    problem(
        s.http.get(s.url("/")).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let res = s.http.delete(s.url("/v1/orders")).send().await.unwrap();
    assert!(
        res.headers()
            .get("allow")
            .unwrap()
            .to_str()
            .unwrap()
            .contains("POST")
    );
    problem(res, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    problem(
        s.http.get(s.url("/v1/orders")).send().await.unwrap(),
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
    problem(
        s.http.post(s.url("/healthz")).send().await.unwrap(),
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;

    let res = s.http.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = res.text().await.unwrap();
    let counted = |route: &str, code: &str| {
        text.lines().any(|l| {
            l.starts_with("orderflow_http_requests_total{")
                && l.contains(&format!("route=\"{route}\""))
                && l.contains(&format!("code=\"{code}\""))
        })
    };
    assert!(counted("/v1/orders", "202"), "{text}");
    assert!(counted("/v1/orders", "405"), "{text}");
    assert!(counted("/healthz", "200"), "{text}");
    assert!(counted("unmatched", "404"), "{text}");
    s.stop().await;
}

/// Every role's token at once, two of them admin (as during a rotation).
fn all_roles() -> Credentials {
    Credentials::new([
        (Role::Admin, ADMIN),
        (Role::Admin, ADMIN_NEXT),
        (Role::Reader, READER),
        (Role::Producer, PRODUCER),
    ])
    .unwrap()
}

/// Each role on each route class: allowed, or 403 `forbidden`; missing or unknown tokens 401 (order routes: 404); both admin tokens work.
async fn api_token_roles(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with_credentials(config(dir.path(), backend), all_roles()).await;
    let a = s
        .accept(&order(Some("ord-roles"), "SKU-R", 1, "tok_visa"))
        .await;
    let tracking = a["tracking_token"].as_str().unwrap().to_owned();
    let produce_body = format!("{}\n", order(Some("ord-roles-p"), "SKU-R", 1, "tok_visa"));
    type Request = Box<dyn Fn(Option<&str>) -> reqwest::RequestBuilder>;
    let with = |b: reqwest::RequestBuilder, token: Option<&str>| match token {
        Some(t) => b.bearer_auth(t),
        None => b,
    };
    // (route class, request, tokens it lets in, tokens it refuses with 403)
    let classes: Vec<(&str, Request, Vec<&str>, Vec<&str>)> = vec![
        (
            "write stock",
            Box::new({
                let (h, u) = (s.http.clone(), s.url("/v1/inventory/SKU-R"));
                move |t| with(h.put(&u).json(&json!({"available": 5})), t)
            }),
            vec![ADMIN, ADMIN_NEXT],
            vec![READER, PRODUCER],
        ),
        (
            "read stock",
            Box::new({
                let (h, u) = (s.http.clone(), s.url("/v1/inventory/SKU-R"));
                move |t| with(h.get(&u), t)
            }),
            vec![ADMIN, ADMIN_NEXT, READER],
            vec![PRODUCER],
        ),
        (
            "park lane",
            Box::new({
                let (h, u) = (s.http.clone(), s.url("/v1/admin/parked"));
                move |t| with(h.get(&u), t)
            }),
            vec![ADMIN, ADMIN_NEXT],
            vec![READER, PRODUCER],
        ),
        (
            "park lane commands",
            Box::new({
                let (h, u) = (s.http.clone(), s.url("/v1/admin/parked/0/retry"));
                move |t| with(h.post(&u), t)
            }),
            vec![ADMIN, ADMIN_NEXT],
            vec![READER, PRODUCER],
        ),
        (
            "produce",
            Box::new({
                let (h, u, b) = (s.http.clone(), s.url("/v1/admin/produce"), produce_body);
                move |t| with(h.post(&u).body(b.clone()), t)
            }),
            vec![ADMIN, ADMIN_NEXT, PRODUCER],
            vec![READER],
        ),
        (
            "tracking tokens",
            Box::new({
                let (h, u) = (s.http.clone(), s.url("/v1/orders/ord-roles/tracking-token"));
                move |t| with(h.get(&u), t)
            }),
            vec![ADMIN, ADMIN_NEXT, PRODUCER],
            vec![READER],
        ),
    ];
    for (class, request, allowed, refused) in &classes {
        for token in allowed {
            let res = request(Some(token)).send().await.unwrap();
            assert!(
                res.status().is_success(),
                "{class} with {token}: {} {}",
                res.status(),
                res.text().await.unwrap()
            );
            if *class == "tracking tokens" {
                let v: Value = res.json().await.unwrap();
                assert_eq!(v["tracking_token"], tracking.as_str(), "the 202's token");
            }
        }
        for token in refused {
            let p = problem(
                request(Some(token)).send().await.unwrap(),
                StatusCode::FORBIDDEN,
                "forbidden",
            )
            .await;
            assert!(!p["detail"].as_str().unwrap().contains(token), "{p}");
        }
        for token in [None, Some("not-a-token"), Some(tracking.as_str())] {
            let res = request(token).send().await.unwrap();
            assert!(
                res.headers()
                    .get("www-authenticate")
                    .is_some_and(|v| v.to_str().unwrap().starts_with("Bearer")),
                "{class} {token:?}"
            );
            problem(res, StatusCode::UNAUTHORIZED, "unauthorized").await;
        }
    }

    // Once the order is finished the read model holds it, so every read
    // below answers at once: no polling.
    s.wait_terminal("ord-roles", &tracking).await;
    for token in [ADMIN, ADMIN_NEXT, READER] {
        let res = s.get_order("ord-roles", token).await;
        assert_eq!(res.status(), StatusCode::OK, "{token}");
        assert_eq!(res.json::<Value>().await.unwrap()["order_id"], "ord-roles");
        problem(
            s.get_order("ord-nowhere", token).await,
            StatusCode::NOT_FOUND,
            "order_not_found",
        )
        .await;
    }
    let p = problem(
        s.get_order("ord-roles", PRODUCER).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("a producer token may not read orders"),
        "{p}"
    );
    // The refusal depends on the token alone: an order that does not exist
    // is refused alike, so it reveals nothing about which orders do.
    problem(
        s.get_order("ord-nowhere", PRODUCER).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    for token in ["not-a-token", ""] {
        problem(
            s.get_order("ord-roles", token).await,
            StatusCode::NOT_FOUND,
            "order_not_found",
        )
        .await;
    }
    let events = |token: &'static str| {
        s.http
            .get(s.url("/v1/orders/ord-roles/events"))
            .bearer_auth(token)
            .send()
    };
    let stream = events(READER).await.unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    assert!(!read_sse(stream).await.is_empty());
    problem(
        events(PRODUCER).await.unwrap(),
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    for (token, status) in [(READER, StatusCode::OK), (PRODUCER, StatusCode::NOT_FOUND)] {
        let page = s
            .http
            .get(s.url(&format!("/track/ord-roles?token={token}")))
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), status, "/track with {token}");
    }
    s.stop().await;
}

/// A producer-written order is followed with the token the producer fetched; any valid id has one, an invalid id is refused.
async fn produced_order_followed_with_fetched_tracking_token(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with_credentials(config(dir.path(), backend), all_roles()).await;
    s.set_stock("SKU-U", 5).await;
    let line = order(Some("ord-upstream"), "SKU-U", 2, "tok_visa");
    let res = s
        .http
        .post(s.url("/v1/admin/produce"))
        .bearer_auth(PRODUCER)
        .body(format!("{line}\n"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.text().await.unwrap().trim().lines().count(),
        1,
        "one result line"
    );
    let res = s
        .http
        .get(s.url("/v1/orders/ord-upstream/tracking-token"))
        .bearer_auth(PRODUCER)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers().get("cache-control").unwrap(), "no-store");
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["order_id"], "ord-upstream");
    assert_eq!(v["tracking_url"], "/v1/orders/ord-upstream");
    let token = v["tracking_token"].as_str().unwrap().to_owned();
    assert_eq!(token.len(), 43);

    // The customer, with nothing but the token.
    let by_query = s
        .http
        .get(s.url(&format!("/v1/orders/ord-upstream?token={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(by_query.status(), StatusCode::OK);
    let done = s.wait_terminal("ord-upstream", &token).await;
    assert_eq!(done["status"], "confirmed", "{done}");
    let events = s
        .http
        .get(s.url(&format!("/v1/orders/ord-upstream/events?token={token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), StatusCode::OK);
    let events = read_sse(events).await;
    assert_eq!(events.last().unwrap().data["status"], "confirmed");
    problem(
        s.get_order("ord-other", &token).await,
        StatusCode::NOT_FOUND,
        "order_not_found",
    )
    .await;

    // No such order: a token all the same, which shows it as accepted.
    let res = s
        .http
        .get(s.url("/v1/orders/ord-never-placed/tracking-token"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    let never: Value = res.json().await.unwrap();
    let v: Value = s
        .get_order(
            "ord-never-placed",
            never["tracking_token"].as_str().unwrap(),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (v["status"].as_str(), v["history"].as_array().map(Vec::len)),
        (Some("accepted"), Some(0))
    );
    for bad in [
        "has%20space",
        &"x".repeat(65),
        "4242424242424242",
        "ord%2Fslash",
    ] {
        problem(
            s.http
                .get(s.url(&format!("/v1/orders/{bad}/tracking-token")))
                .bearer_auth(PRODUCER)
                .send()
                .await
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "invalid_order_id",
        )
        .await;
    }
    s.stop().await;
}

/// A route no configured role may use answers 403 `admin_disabled`; one that a configured role may use, 401 for a wrong token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routes_disabled_per_role() {
    // Credentials are checked before any backend is touched, so the
    // distributed backend would test nothing more.
    let dir = tempfile::tempdir().unwrap();
    let readers = Credentials::new([(Role::Reader, READER)]).unwrap();
    let s = Server::start_with_credentials(config(dir.path(), Backend::Embedded), readers).await;
    assert_eq!(
        s.http
            .get(s.url("/v1/inventory/SKU-D"))
            .bearer_auth(READER)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    problem(
        s.http
            .get(s.url("/v1/inventory/SKU-D"))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap(),
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    for (req, roles) in [
        (
            s.http
                .put(s.url("/v1/inventory/SKU-D"))
                .json(&json!({"available": 1})),
            "ORDERFLOW_ADMIN_TOKEN",
        ),
        (
            s.http.post(s.url("/v1/admin/produce")).body("{}\n"),
            "ORDERFLOW_ADMIN_TOKEN or ORDERFLOW_PRODUCER_TOKEN",
        ),
        (
            s.http.get(s.url("/v1/orders/o-1/tracking-token")),
            "ORDERFLOW_ADMIN_TOKEN or ORDERFLOW_PRODUCER_TOKEN",
        ),
    ] {
        let p = problem(
            req.bearer_auth(READER).send().await.unwrap(),
            StatusCode::FORBIDDEN,
            "admin_disabled",
        )
        .await;
        assert!(p["detail"].as_str().unwrap().contains(roles), "{p}");
    }
    s.stop().await;
}

/// `orderflow_partition_lag_records` by (topic, partition, consumer).
fn lag_series(metrics: &str) -> BTreeMap<(String, u32, String), i64> {
    let label = |line: &str, name: &str| {
        let start = line
            .find(&format!("{name}=\""))
            .map(|i| i + name.len() + 2)?;
        let len = line[start..].find('"')?;
        Some(line[start..start + len].to_owned())
    };
    metrics
        .lines()
        .filter(|l| l.starts_with("orderflow_partition_lag_records{"))
        .filter_map(|l| {
            let key = (
                label(l, "topic")?,
                label(l, "partition")?.parse().ok()?,
                label(l, "consumer")?,
            );
            Some((key, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// Every consumer reports its lag per partition: the runners on `orders`,
/// the read model on `order-status`; all fall to zero once the order is done.
async fn consumer_lag_for_every_topic(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), backend);
    let (orders, status) = (c.partitions, c.status_partitions);
    let s = Server::start_with(c, Some(ADMIN)).await;
    s.set_stock("SKU-LAG", 5).await;
    let a = s
        .accept(&order(Some("ord-lag"), "SKU-LAG", 1, "tok_visa"))
        .await;
    s.wait_terminal("ord-lag", a["tracking_token"].as_str().unwrap())
        .await;
    let want: Vec<(String, u32, String)> = (0..orders)
        .map(|p| ("orders".to_owned(), p, "runner".to_owned()))
        .chain((0..status).map(|p| ("order-status".to_owned(), p, "read_model".to_owned())))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let res = s.http.get(s.url("/metrics")).send().await.unwrap();
        let lags = lag_series(&res.text().await.unwrap());
        if want.iter().all(|k| lags.get(k) == Some(&0)) {
            break;
        }
        assert!(Instant::now() < deadline, "lag series: {lags:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.stop().await;
}
