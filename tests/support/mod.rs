//! Helpers shared by the tests that run the real `orderflow` binary.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const ADMIN_TOKEN: &str = "test-admin-token-5b1f";

/// A running `orderflow run` process and everything it printed.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub output: Output,
    readers: Readers,
}

/// Everything a spawned process printed, stdout and stderr interleaved.
pub type Output = std::sync::Arc<std::sync::Mutex<Vec<u8>>>;

/// The threads copying a process's stdout and stderr into its `Output`.
/// They end at EOF, once the process exited; joining them after a wait
/// makes the output complete (else its last lines may still be in flight).
type Readers = Vec<std::thread::JoinHandle<()>>;

fn join_readers(readers: &mut Readers) {
    for reader in readers.drain(..) {
        let _ = reader.join();
    }
}

/// Spawns `cmd` with piped output, collects what it prints and waits for
/// the address that `address_in` finds in one of its lines. The process is
/// killed if no address comes, so a failed start leaves nothing running.
fn spawn_and_read_address(
    mut cmd: Command,
    what: &str,
    address_in: fn(&str) -> Option<String>,
) -> (Child, String, Output, Readers) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    let output: Output = Default::default();
    let (addr_tx, addr_rx) = mpsc::channel::<String>();
    let mut readers = Readers::new();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let (output, addr_tx) = (output.clone(), addr_tx.clone());
        readers.push(std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                if let Some(addr) = address_in(&strip_ansi(&String::from_utf8_lossy(&line))) {
                    let _ = addr_tx.send(addr);
                }
                output.lock().unwrap().extend_from_slice(&line);
                line.clear();
            }
        }));
    }
    match addr_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(addr) => (child, addr, output, readers),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            let out = String::from_utf8_lossy(&output.lock().unwrap()).into_owned();
            panic!("{what} did not report its address; output:\n{out}")
        }
    }
}

/// `orderflow parked ARGS --server BASE` with the admin token: its stdout,
/// or its stderr when it failed.
pub fn parked_cli(base: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .arg("parked")
        .args(args)
        .args(["--server", base])
        .env("ORDERFLOW_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Starts the binary on a free port with `data_dir` and waits until
/// `/readyz` answers 200 (readiness, never a fixed sleep).
pub fn start_server(data_dir: &Path, extra_env: &[(&str, &str)]) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orderflow"));
    cmd.args(["run", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("ORDERFLOW_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "info");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let (child, addr, output, readers) =
        spawn_and_read_address(cmd, "orderflow", listening_address);
    let server = Server {
        child,
        base: format!("http://{addr}"),
        output,
        readers,
    };
    wait_until(Duration::from_secs(60), "readiness", || {
        client()
            .get(format!("{}/readyz", server.base))
            .send()
            .is_ok_and(|r| r.status() == 200)
    });
    server
}

/// The address of the `orderflow listening` line, as text (`addr=IP:PORT`)
/// or as JSON (`ORDERFLOW_LOG_FORMAT=json`: `"addr":"IP:PORT"`).
fn listening_address(text: &str) -> Option<String> {
    if let Some(i) = text.find("\"addr\":\"") {
        return Some(text[i + 8..].chars().take_while(|c| *c != '"').collect());
    }
    let i = text.find("addr=")?;
    Some(
        text[i + 5..]
            .chars()
            .take_while(|c| !c.is_whitespace())
            .collect(),
    )
}

impl Server {
    pub fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        self.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        terminate(&mut self.child, &mut self.readers)
    }

    /// Waits for the process to exit (by itself or after a signal); its
    /// output is complete after this.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let status = self.child.wait().expect("wait");
        join_readers(&mut self.readers);
        status
    }

    pub fn output_text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes terminal colour codes, so log lines parse the same either way.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The Python of `ORDERFLOW_TEST_PYTHON`, with the packages of
/// `scripts/requirements-test.txt` (`./scripts/test` sets it up).
pub fn test_python() -> String {
    std::env::var("ORDERFLOW_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "ORDERFLOW_TEST_PYTHON is not set: it must name a Python with the packages of \
             scripts/requirements-test.txt. Run ./scripts/test, or: python3 -m venv .cache/venv && \
             .cache/venv/bin/pip install -r scripts/requirements-test.txt && \
             export ORDERFLOW_TEST_PYTHON=$PWD/.cache/venv/bin/python"
        )
    })
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// An instance's `/metrics` page; empty when it does not answer.
pub fn metrics_text(base: &str) -> String {
    client()
        .get(format!("{base}/metrics"))
        .send()
        .and_then(|r| r.text())
        .unwrap_or_default()
}

/// One metric of an instance's `/metrics`, summed over the label sets
/// that hold every label of `labels` (`name="value"` each); 0 when absent.
pub fn metric_sum(base: &str, name: &str, labels: &[&str]) -> f64 {
    metrics_text(base)
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `cond` until it holds; panics naming `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sets a SKU's stock. A `503` (the change is logged but not applied yet,
/// e.g. while its partition moves between instances) is repeated, as the
/// contract says is safe.
pub fn set_stock(base: &str, sku: &str, available: u64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r = client()
            .put(format!("{base}/v1/inventory/{sku}"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&serde_json::json!({ "available": available }))
            .send()
            .unwrap();
        if r.status() == 503 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        assert!(r.status().is_success(), "set stock: {}", r.status());
        return;
    }
}

pub fn stock(base: &str, sku: &str) -> serde_json::Value {
    client()
        .get(format!("{base}/v1/inventory/{sku}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .unwrap()
        .json()
        .unwrap()
}

/// The order's view (admin credentials), or `None` for 404.
pub fn order_view(base: &str, id: &str) -> Option<serde_json::Value> {
    let r = client()
        .get(format!("{base}/v1/orders/{id}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .unwrap();
    (r.status() == 200).then(|| r.json().unwrap())
}

pub fn is_terminal(status: &str) -> bool {
    matches!(
        status,
        "confirmed" | "rejected" | "out_of_stock" | "payment_declined" | "payment_failed"
    )
}

pub fn order_body(id: &str, sku: &str, quantity: u32) -> serde_json::Value {
    serde_json::json!({"order_id": id, "customer_id": "cus-1", "currency": "USD",
        "lines": [{"sku": sku, "quantity": quantity, "unit_price": 1999}],
        "payment": {"token": "tok_visa"}, "contact": {"email": "ada@example.com"}})
}

/// A running `orderflow gateway-sim` and everything it printed.
pub struct GatewaySim {
    pub child: Child,
    /// `http://IP:PORT`, the `gateway.url` to give orderflow.
    pub url: String,
    pub output: Output,
    readers: Readers,
}

/// Starts `orderflow gateway-sim --listen 127.0.0.1:0 ARGS...` and waits for
/// the address it prints (`gateway-sim listening addr=IP:PORT`).
pub fn start_gateway_sim(args: &[&str], extra_env: &[(&str, &str)]) -> GatewaySim {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orderflow"));
    cmd.args(["gateway-sim", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "info");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let (child, addr, output, readers) = spawn_and_read_address(cmd, "gateway-sim", |text| {
        text.strip_prefix("gateway-sim listening addr=")
            .map(|rest| rest.trim().to_owned())
    });
    GatewaySim {
        child,
        url: format!("http://{addr}"),
        output,
        readers,
    }
}

impl GatewaySim {
    /// `GET /ledger`.
    pub fn ledger(&self) -> serde_json::Value {
        client()
            .get(format!("{}/ledger", self.url))
            .send()
            .unwrap()
            .json()
            .unwrap()
    }

    /// `POST /admin/outage {"down": down}`.
    pub fn set_down(&self, down: bool) {
        let r = client()
            .post(format!("{}/admin/outage", self.url))
            .json(&serde_json::json!({ "down": down }))
            .send()
            .unwrap();
        assert!(r.status().is_success(), "outage switch: {}", r.status());
    }

    pub fn output_text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        terminate(&mut self.child, &mut self.readers)
    }
}

/// SIGTERM, then waits for the exit and for the output to be complete.
fn terminate(child: &mut Child, readers: &mut Readers) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    let status = child.wait().expect("wait");
    join_readers(readers);
    status
}

impl Drop for GatewaySim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The configuration of a deployment that pays through the
/// Stripe-compatible gateway at `url`: `top` holds top-level keys and
/// sections, `gateway` more `[gateway]` keys.
pub fn stripe_toml(url: &str, top: &str, gateway: &str) -> String {
    format!("{top}\n[gateway]\nkind = \"stripe\"\nurl = \"{url}\"\n{gateway}\n")
}

/// A data directory with the configuration file orderflow runs with there
/// and the environment every start gets; `start` starts (or restarts) an
/// instance on it.
pub struct Deployment {
    pub dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Deployment {
    /// Writes `toml` as the configuration file; `env` goes to every start.
    pub fn new(toml: &str, env: &[(&str, &str)]) -> Deployment {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("orderflow.toml");
        std::fs::write(&path, toml).unwrap();
        let config = path.to_str().unwrap().to_owned();
        let mut all = vec![("ORDERFLOW_CONFIG".to_owned(), config)];
        all.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        Deployment { dir, env: all }
    }

    /// The data directory.
    pub fn data(&self) -> std::path::PathBuf {
        self.dir.path().join("data")
    }

    /// Starts orderflow on the data directory; `env` adds to or overrides
    /// the deployment's environment.
    pub fn start(&self, env: &[(&str, &str)]) -> Server {
        let mut all: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        all.extend_from_slice(env);
        start_server(&self.data(), &all)
    }
}

/// Runs `scripts/<engine> start` (idempotent: it reuses a running engine,
/// and installs it into the ignored `.cache/` first if needed) and returns
/// the address it prints. `env` wins when set, so CI can start the engine
/// once up front.
fn engine_address(env: &str, engine: &str) -> String {
    if let Ok(addr) = std::env::var(env)
        && !addr.is_empty()
    {
        return addr;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(engine);
    let out = Command::new(&script)
        .arg("start")
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} start failed ({})",
        script.display(),
        out.status
    );
    let addr = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        !addr.is_empty(),
        "{} start printed no address",
        script.display()
    );
    addr
}

/// Bootstrap address of the test Kafka broker (`ORDERFLOW_TEST_KAFKA`, or
/// one `scripts/kafka start` starts).
pub fn kafka_bootstrap() -> String {
    static ADDR: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ADDR.get_or_init(|| engine_address("ORDERFLOW_TEST_KAFKA", "kafka"))
        .clone()
}

/// CQL contact point of the test Cassandra (`ORDERFLOW_TEST_CASSANDRA`, or
/// one `scripts/cassandra start` starts).
pub fn cassandra_contact() -> String {
    static ADDR: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ADDR.get_or_init(|| engine_address("ORDERFLOW_TEST_CASSANDRA", "cassandra"))
        .clone()
}

/// A name unique to this test process and call, for Kafka topic prefixes,
/// consumer groups and CQL keyspaces (letters, digits and `_` only).
pub fn unique_name(what: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{what}_{}_{n}_{nanos}", std::process::id())
}

/// Checks invariant 4 on the gateway-sim ledger for the given final
/// statuses: at most one capture per intent and one authorized intent per
/// order; every confirmed order captured exactly once; every authorization
/// of an order that did not confirm voided. `Err` describes what is not
/// (yet) so.
pub fn ledger_settled(
    ledger: &serde_json::Value,
    statuses: &std::collections::BTreeMap<String, String>,
) -> Result<(), String> {
    let mut authorized_by_order: std::collections::BTreeMap<String, Vec<&serde_json::Value>> =
        std::collections::BTreeMap::new();
    for (id, i) in ledger["intents"].as_object().unwrap() {
        if i["captures"].as_u64().unwrap() > 1 {
            return Err(format!("intent {id} captured twice: {i}"));
        }
        if i["authorized"] == true {
            let order = i["order_id"].as_str().unwrap_or("").to_owned();
            authorized_by_order.entry(order).or_default().push(i);
        }
    }
    for (order, intents) in &authorized_by_order {
        if intents.len() > 1 {
            return Err(format!("order {order} authorized {} times", intents.len()));
        }
        let i = intents[0];
        match statuses.get(order).map(String::as_str) {
            Some("confirmed") => {
                if i["status"] != "succeeded" || i["captures"] != 1 {
                    return Err(format!("confirmed order {order} not captured once: {i}"));
                }
            }
            _ => {
                if i["status"] != "canceled" || i["captures"] != 0 {
                    return Err(format!(
                        "order {order} did not confirm but its authorization is not voided: {i}"
                    ));
                }
            }
        }
    }
    for (order, s) in statuses {
        if s == "confirmed" && !authorized_by_order.contains_key(order) {
            return Err(format!("confirmed order {order} has no authorization"));
        }
    }
    Ok(())
}

/// `kafka.session_timeout_ms` of the distributed tests: 6000 (the broker's
/// default minimum, long enough for a CPU-starved CI machine), or
/// `ORDERFLOW_TEST_SESSION_TIMEOUT_MS` to measure failover with shorter
/// sessions (BENCHMARKS.md).
pub fn session_timeout_ms() -> u64 {
    std::env::var("ORDERFLOW_TEST_SESSION_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6_000)
}

/// Writes `dir/orderflow.toml` for the distributed deployment on the test
/// Kafka and Cassandra: `top` (top-level keys) and `sections` (other
/// tables) of the caller, then `[kafka]` and `[scylla]` on topics, a
/// consumer group and a keyspace of their own, which `orderflow migrate`
/// creates. Processes started with `ORDERFLOW_CONFIG` at the returned path
/// share that deployment (and find it again after a restart).
pub fn distributed_config(dir: &Path, top: &str, sections: &str) -> std::path::PathBuf {
    let name = unique_name("d");
    let path = dir.join("orderflow.toml");
    std::fs::write(
        &path,
        format!(
            "{top}\n{sections}\n[kafka]\nbootstrap_servers = \"{kafka}\"\ngroup_id = \"{name}\"\ntopic_prefix = \"{name}.\"\nsession_timeout_ms = {session_ms}\n[scylla]\nnodes = [\"{cassandra}\"]\nkeyspace = \"{name}\"\n",
            kafka = kafka_bootstrap(),
            cassandra = cassandra_contact(),
            session_ms = session_timeout_ms(),
        ),
    )
    .unwrap();
    let migrate = Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .arg("migrate")
        .env("ORDERFLOW_CONFIG", &path)
        .output()
        .unwrap();
    assert!(
        migrate.status.success(),
        "orderflow migrate: {}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    path
}

/// A test certificate authority, and a certificate it signed for
/// `127.0.0.1` and `localhost`: `(ca, certificate PEM, its key PEM)`.
pub fn test_ca_and_server() -> (
    rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    String,
    String,
) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "orderflow test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &ca).unwrap();
    (ca, cert.pem(), key.serialize_pem())
}
