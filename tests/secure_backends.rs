//! The distributed deployment over secure connections: a Kafka broker that
//! takes only SASL_SSL with a client certificate, and a Cassandra node that
//! takes only TLS with a client certificate and a password, both started by
//! the project's scripts (`--secure`) with certificates this test makes.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use support::*;

/// The secure engines, started once for this test binary.
struct Secure {
    /// Certificates and the Kafka password (the engines copied theirs),
    /// made anew by each run in the ignored `.cache/` folder (a static is
    /// never dropped, so a temporary folder would outlive the run).
    certs: PathBuf,
    kafka: String,
    cassandra: String,
}

fn secure() -> &'static Secure {
    static SECURE: OnceLock<Secure> = OnceLock::new();
    SECURE.get_or_init(|| {
        let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/secure-backends-certs");
        let _ = std::fs::remove_dir_all(&certs);
        std::fs::create_dir_all(&certs).unwrap();
        make_certificates(&certs);
        // Both at once: Cassandra alone takes most of the time.
        let dir = certs.clone();
        let cassandra = std::thread::spawn(move || start_secure("cassandra", &dir));
        let kafka = start_secure("kafka", &certs);
        Secure {
            kafka,
            cassandra: cassandra.join().unwrap(),
            certs,
        }
    })
}

/// `scripts/ENGINE start --secure DIR`; its address.
fn start_secure(engine: &str, dir: &Path) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(engine);
    let out = Command::new(&script)
        .args(["start", "--secure"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{engine} start --secure: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A CA, the servers' certificate for 127.0.0.1 (key first, as the
/// engines read it), a client certificate, and the Kafka password.
fn make_certificates(dir: &Path) {
    use rcgen::{CertificateParams, DnType, KeyPair};
    let (ca, server, server_key) = test_ca_and_server();
    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    client_params
        .distinguished_name
        .push(DnType::CommonName, "orderflow");
    let client = client_params.signed_by(&client_key, &ca).unwrap();
    let write = |name: &str, text: String| std::fs::write(dir.join(name), text).unwrap();
    write("ca.pem", ca.pem());
    write("server.pem", server_key + &server + &ca.pem());
    write("client.pem", client.pem());
    write("client.key", client_key.serialize_pem());
    write("password", password("k"));
}

/// A password of letters and digits unique to this run (Kafka's
/// `--add-scram` takes no quoting).
fn password(tag: &str) -> String {
    unique_name(tag).replace('_', "x")
}

/// `dir/orderflow.toml` for the secure engines: `[kafka.tls]` and
/// `[kafka.sasl]` with `mechanism`, `[scylla.tls]` and `[scylla.auth]`.
fn secure_config(dir: &Path, name: &str, mechanism: &str, gateway: &str) -> PathBuf {
    let s = secure();
    let certs = s.certs.display();
    let tls = format!(
        "ca_path = \"{certs}/ca.pem\"\ncert_path = \"{certs}/client.pem\"\nkey_path = \"{certs}/client.key\"\n"
    );
    let path = dir.join("orderflow.toml");
    std::fs::write(
        &path,
        format!(
            "partitions = 2\nstatus_partitions = 2\n\
             [gateway]\nkind = \"stripe\"\nurl = \"{gateway}\"\n\
             [kafka]\nbootstrap_servers = \"{kafka}\"\ngroup_id = \"{name}\"\ntopic_prefix = \"{name}.\"\nsession_timeout_ms = 6000\n\
             [kafka.tls]\n{tls}\
             [kafka.sasl]\nmechanism = \"{mechanism}\"\nusername = \"orderflow\"\npassword_file = \"{certs}/password\"\n\
             [kafka.client]\n\"fetch.wait.max.ms\" = 50\n\
             [scylla]\nnodes = [\"{cassandra}\"]\nkeyspace = \"{name}\"\n\
             [scylla.tls]\n{tls}\
             [scylla.auth]\nusername = \"cassandra\"\n",
            kafka = s.kafka,
            cassandra = s.cassandra,
        ),
    )
    .unwrap();
    path
}

/// The default superuser's password, from the environment (the Kafka one
/// comes from its file).
const SCYLLA_PASSWORD: (&str, &str) = ("ORDERFLOW_SCYLLA_PASSWORD", "cassandra");

/// Runs `orderflow ARGS` with `config`; its exit code and output.
fn orderflow(config: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .args(args)
        .env("ORDERFLOW_CONFIG", config)
        .env(SCYLLA_PASSWORD.0, SCYLLA_PASSWORD.1)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// Orders flow end to end over SASL_SSL (SCRAM-SHA-512) and CQL over TLS
/// with a password; `replay` then reads the same deployment with PLAIN and
/// SCRAM-SHA-256; no password ever appears in the output.
#[test]
fn orders_flow_over_tls_and_sasl() {
    let s = secure();
    let sim = start_gateway_sim(&[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("sec");
    let config = secure_config(dir.path(), &name, "SCRAM-SHA-512", &sim.url);
    let (code, out) = orderflow(&config, &["migrate"]);
    assert_eq!(code, Some(0), "migrate over TLS with a password:\n{out}");

    let config_env = config.display().to_string();
    let mut server = start_server(
        &dir.path().join("data"),
        &[
            ("ORDERFLOW_CONFIG", &config_env),
            SCYLLA_PASSWORD,
            ("ORDERFLOW_STRIPE_SECRET_KEY", "sk_test_orderflow_secure"),
        ],
    );
    set_stock(&server.base, "SKU-S", 10);
    let ids: Vec<String> = (0..6).map(|i| format!("{name}-{i}")).collect();
    for id in &ids {
        let r = client()
            .post(format!("{}/v1/orders", server.base))
            .bearer_auth(ADMIN_TOKEN)
            .json(&order_body(id, "SKU-S", 1))
            .send()
            .unwrap();
        assert_eq!(r.status(), 202, "{}", r.text().unwrap_or_default());
    }
    wait_until(Duration::from_secs(60), "orders confirmed", || {
        ids.iter()
            .all(|id| order_view(&server.base, id).is_some_and(|v| v["status"] == "confirmed"))
    });
    assert_eq!(stock(&server.base, "SKU-S")["available"], 4);
    server.terminate();

    let kafka_password = std::fs::read_to_string(s.certs.join("password")).unwrap();
    let mut outputs = vec![server.output_text()];
    for mechanism in ["PLAIN", "SCRAM-SHA-256"] {
        let config = secure_config(dir.path(), &name, mechanism, &sim.url);
        let (code, out) = orderflow(&config, &["replay", "--order", &ids[0]]);
        assert_eq!(code, Some(0), "replay with {mechanism}:\n{out}");
        assert!(out.contains("status confirmed"), "{mechanism}:\n{out}");
        outputs.push(out);
    }
    for out in outputs {
        assert!(
            !out.contains(kafka_password.trim()),
            "the Kafka password leaked:\n{out}"
        );
        assert!(
            !out.contains(&format!("\"{}\"", SCYLLA_PASSWORD.1)),
            "the CQL password leaked:\n{out}"
        );
    }
}

/// Wrong credentials stop a command with an error that says what was
/// refused, without the password tried.
#[test]
fn wrong_credentials_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name("bad");
    let config = secure_config(dir.path(), &name, "SCRAM-SHA-256", "http://127.0.0.1:9");
    let wrong = password("wrong");

    refused(
        &config,
        "migrate",
        &[(SCYLLA_PASSWORD.0, &wrong)],
        "Authentication failed - bad credentials",
        &wrong,
    );
    // Cassandra accepts the right password, Kafka gets a wrong one.
    let (code, out) = orderflow(&config, &["migrate"]);
    assert_eq!(code, Some(0), "{out}");
    refused(
        &config,
        "replay",
        &[SCYLLA_PASSWORD, ("ORDERFLOW_KAFKA_PASSWORD", &wrong)],
        "Kafka refused orderflow's credentials",
        &wrong,
    );
}

/// Runs `orderflow COMMAND` with `env`, which must fail with `expected` in
/// its `error: …` line and `wrong` nowhere in its output.
fn refused(config: &Path, command: &str, env: &[(&str, &str)], expected: &str, wrong: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .arg(command)
        .env("ORDERFLOW_CONFIG", config)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(error_line(&text).contains(expected), "{text}");
    assert!(!text.contains(wrong), "the password tried leaked:\n{text}");
}

/// The `error: …` line a failed command ends with.
fn error_line(output: &str) -> &str {
    output
        .lines()
        .rfind(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in:\n{output}"))
}
