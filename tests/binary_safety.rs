//! End to end with the real binary: card numbers never reach disk or
//! output, SIGTERM shuts down cleanly, a second process on the same
//! data directory is refused, an unsafe configuration is refused at start,
//! logs carry no colour codes when piped (JSON lines on request), API
//! tokens come from the environment and files, and `orderflow token`
//! prints what the server answers.

mod support;

use std::time::Duration;

use support::*;

/// Stripe's test Visa number in several spellings.
const PANS: [&str; 3] = [
    "4242424242424242",
    "4242 4242 4242 4242",
    "4000-0566-5566-5556",
];

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn digits(pan: &str) -> String {
    pan.chars().filter(char::is_ascii_digit).collect()
}

/// A card number in any field is refused and appears nowhere: not in any
/// byte of the data directory, not in the process's output.
#[test]
fn card_numbers_never_stored_or_logged() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_server(dir.path(), &[("RUST_LOG", "trace")]);
    set_stock(&server.base, "SKU-1", 10);
    let c = client();
    let mut bodies = Vec::new();
    for pan in PANS {
        let mut base = order_body("pan-order", "SKU-1", 1);
        bodies.push({
            let mut b = base.clone();
            b["payment"]["token"] = pan.into();
            b
        });
        bodies.push({
            let mut b = base.clone();
            b["customer_id"] = pan.into();
            b
        });
        bodies.push({
            let mut b = base.clone();
            b["contact"]["email"] = format!("{pan}@example.com").into();
            b
        });
        bodies.push({
            let mut b = base.clone();
            b["order_id"] = pan.into();
            b
        });
        base["lines"][0]["sku"] = pan.into();
        bodies.push(base);
    }
    for body in &bodies {
        let r = c
            .post(format!("{}/v1/orders", server.base))
            .json(body)
            .send()
            .unwrap();
        assert_eq!(r.status(), 400);
        let problem: serde_json::Value = r.json().unwrap();
        assert_eq!(problem["code"], "pan_detected", "{problem}");
        assert!(
            !problem.to_string().contains("4242"),
            "the answer repeats the card number"
        );
    }
    // The raw-log path too: an upstream producer writing a PAN to the log.
    let line = serde_json::to_string(&{
        let mut b = order_body("pan-raw", "SKU-1", 1);
        b["customer_id"] = PANS[0].into();
        b
    })
    .unwrap();
    let r = c
        .post(format!("{}/v1/admin/produce", server.base))
        .bearer_auth(ADMIN_TOKEN)
        .body(line)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    // A valid order afterwards still goes through: the server is healthy.
    let r = c
        .post(format!("{}/v1/orders", server.base))
        .json(&order_body("ok-1", "SKU-1", 1))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    wait_until(
        Duration::from_secs(30),
        "the valid order to confirm",
        || order_view(&server.base, "ok-1").is_some_and(|v| v["status"] == "confirmed"),
    );
    assert!(server.terminate().success());
    let files = files_under(dir.path(), None);
    assert!(
        files.len() > 2,
        "the data directory holds the log and the store"
    );
    assert_no_card_numbers(&server.output_text(), &files);
}

/// Every file under `dir`, but those under `skip`.
fn files_under(dir: &std::path::Path, skip: Option<&std::path::Path>) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(d).unwrap() {
            let path = entry.unwrap().path();
            if Some(path.as_path()) == skip {
                continue;
            }
            if path.is_dir() {
                stack.push(path)
            } else {
                files.push(path)
            }
        }
    }
    files
}

/// Fails if `output` or any of `files` holds one of [`PANS`], spaced or not.
fn assert_no_card_numbers(output: &str, files: &[std::path::PathBuf]) {
    for pan in PANS {
        for needle in [pan.to_owned(), digits(pan)] {
            assert!(!output.contains(&needle), "output holds a card number");
            for f in files {
                let bytes = std::fs::read(f).unwrap();
                assert!(
                    !contains(&bytes, needle.as_bytes()),
                    "{} holds a card number",
                    f.display()
                );
            }
        }
    }
}

/// Records on the log that cannot be decoded and hold a card number (in
/// the value or the key) are refused, not parked: the number reaches no
/// checkpoint, no `orders-parked` record, no listing and no output.
#[test]
fn card_numbers_in_raw_records_never_reach_the_park_lane() {
    use orderflow::config::{Config, LogConfig};
    use orderflow::domain::parked::ParkEvent;
    use orderflow::pipeline::log::embedded::EmbeddedLog;
    use orderflow::pipeline::log::{Log, Record, RecordKind, Topic, partition_for_key};
    use orderflow::telemetry::metrics::Metrics;

    let dir = tempfile::tempdir().unwrap();
    let defaults = Config::default();
    let topics = [
        (Topic::Orders, defaults.partitions),
        (Topic::OrderStatus, defaults.status_partitions),
        (Topic::Parked, defaults.partitions),
    ];
    let open = || {
        let metrics = std::sync::Arc::new(Metrics::new());
        EmbeddedLog::open(
            &dir.path().join("log"),
            &topics,
            &LogConfig::default(),
            metrics,
        )
        .unwrap()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    // An upstream system (or a damaged producer) wrote these to partition 0.
    let raw = [
        (
            RecordKind::Internal,
            b"k".to_vec(),
            format!("\u{1}card {}", PANS[0]),
        ),
        (
            RecordKind::Internal,
            PANS[1].as_bytes().to_vec(),
            "\u{1}x".to_owned(),
        ),
        (
            RecordKind::OrderJson,
            b"k".to_vec(),
            format!("{{\"card\": \"{}", PANS[2]),
        ),
    ];
    rt.block_on(async {
        let log = open();
        let records = raw
            .iter()
            .map(|(kind, key, value)| Record {
                kind: *kind,
                key: key.clone(),
                value: value.clone().into_bytes(),
            })
            .collect();
        log.append(Topic::Orders, 0, records).await.unwrap();
        log.close().await;
    });

    let mut server = start_server(dir.path(), &[("RUST_LOG", "trace")]);
    // An order behind them on partition 0 confirms: they were processed.
    let sku = (0..)
        .map(|i| format!("RAW-{i}"))
        .find(|s| partition_for_key(s.as_bytes(), defaults.partitions) == 0)
        .unwrap();
    set_stock(&server.base, &sku, 1);
    let r = client()
        .post(format!("{}/v1/orders", server.base))
        .json(&order_body("raw-ok", &sku, 1))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    wait_until(
        Duration::from_secs(30),
        "the order behind them to confirm",
        || order_view(&server.base, "raw-ok").is_some_and(|v| v["status"] == "confirmed"),
    );
    assert!(server.terminate().success());
    let mut output = server.output_text();

    // The drain's checkpoint is written: the lane as listed is empty.
    let mut server = start_server(dir.path(), &[]);
    let lane: serde_json::Value = client()
        .get(format!("{}/v1/admin/parked", server.base))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        lane["parked"],
        serde_json::json!([]),
        "nothing is parked: {lane}"
    );
    assert!(server.terminate().success());
    output.push_str(&server.output_text());

    // `orders-parked` says what was refused, with the digits masked.
    let events = rt.block_on(async {
        let log = open();
        let (low, high) = log.offsets(Topic::Parked, 0).await.unwrap();
        let records = log
            .read(Topic::Parked, 0, low, 100, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(records.len() as u64, high - low);
        records
            .iter()
            .map(|r| ParkEvent::decode(&r.value).unwrap())
            .collect::<Vec<_>>()
    });
    let refused = events
        .iter()
        .filter(|e| matches!(e, ParkEvent::Refused(_)))
        .count();
    assert_eq!(refused, 2, "{events:?}");
    assert!(!events.iter().any(|e| matches!(e, ParkEvent::Parked(_))));

    // All but the `orders` log the upstream system wrote.
    let files = files_under(dir.path(), Some(&dir.path().join("log").join("orders")));
    assert!(files.iter().any(|f| f.ends_with("state.redb")));
    assert_no_card_numbers(&output, &files);
}

/// SIGTERM drains and exits 0; while running, a second process on the
/// same data directory fails at once with a clear error.
#[test]
fn graceful_shutdown_and_exclusive_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_server(dir.path(), &[]);
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .args(["run", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("in use by another orderflow process"), "{err}");
    set_stock(&server.base, "SKU-1", 3);
    let r = client()
        .post(format!("{}/v1/orders", server.base))
        .json(&order_body("g-1", "SKU-1", 1))
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    let status = server.terminate();
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        server.output_text()
    );
    // Everything acknowledged is there after the restart.
    let server = start_server(dir.path(), &[]);
    wait_until(Duration::from_secs(30), "g-1 to confirm", || {
        order_view(&server.base, "g-1").is_some_and(|v| v["status"] == "confirmed")
    });
}

/// `orderflow replay` rebuilds every partition from its log and matches
/// the checkpoint of a cleanly stopped instance; it refuses a running one.
#[test]
fn replay_command_matches_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_server(dir.path(), &[]);
    for sku in ["SKU-1", "SKU-2", "SKU-3"] {
        set_stock(&server.base, sku, 4);
    }
    let c = client();
    for i in 0..6 {
        let mut body = order_body(&format!("r-{i}"), "SKU-1", 1);
        body["lines"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"sku": "SKU-2", "quantity": 1, "unit_price": 5}));
        body["lines"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"sku": "SKU-3", "quantity": 1, "unit_price": 5}));
        let r = c
            .post(format!("{}/v1/orders", server.base))
            .json(&body)
            .send()
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    wait_until(Duration::from_secs(30), "every order to end", || {
        (0..6).all(|i| {
            order_view(&server.base, &format!("r-{i}"))
                .is_some_and(|v| is_terminal(v["status"].as_str().unwrap()))
        })
    });
    let replay = |dir: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_orderflow"))
            .args(["replay", "--data-dir"])
            .arg(dir)
            .output()
            .unwrap()
    };
    assert!(
        !replay(dir.path()).status.success(),
        "replay must not run beside a live instance"
    );
    assert!(server.terminate().success());
    let out = replay(dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 8);
    assert!(lines.iter().all(|l| l["matches"] == true), "{lines:?}");
    assert!(lines.iter().any(|l| l["next_offset"].as_u64().unwrap() > 0));
}

/// `orderflow replay --order` tells one order's story across partitions:
/// the line held at home, the reservation that failed on the other SKU's
/// partition with the stock it saw, and the release that followed.
#[test]
fn replay_order_tells_the_story() {
    let partitions = 8; // the default configuration's
    let home = "SKU-1";
    let other = (2..100)
        .map(|i| format!("SKU-{i}"))
        .find(|s| {
            orderflow::pipeline::log::partition_for_key(s.as_bytes(), partitions)
                != orderflow::pipeline::log::partition_for_key(home.as_bytes(), partitions)
        })
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_server(dir.path(), &[]);
    set_stock(&server.base, home, 5);
    set_stock(&server.base, &other, 1);
    let mut body = order_body("story-1", home, 2);
    body["lines"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"sku": other, "quantity": 3, "unit_price": 5}));
    let r = client()
        .post(format!("{}/v1/orders", server.base))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(r.status(), 202);
    wait_until(Duration::from_secs(30), "story-1 to end", || {
        order_view(&server.base, "story-1").is_some_and(|v| v["status"] == "out_of_stock")
    });
    assert!(server.terminate().success());

    let story = |id: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_orderflow"))
            .args(["replay", "--order", id, "--json", "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap()
    };
    let out = story("story-1");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let steps: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let text = format!("{steps:#?}");
    let home_p = orderflow::pipeline::log::partition_for_key(home.as_bytes(), partitions);
    let other_p = orderflow::pipeline::log::partition_for_key(other.as_bytes(), partitions);
    // The order itself, at home: its line held, 5 → 3 available.
    let first = &steps[0];
    assert_eq!(first["partition"], home_p, "{text}");
    assert!(
        first["record"]
            .as_str()
            .unwrap()
            .starts_with("order placed"),
        "{text}"
    );
    assert_eq!(first["stock"][home][0]["available"], 5, "{text}");
    assert_eq!(first["stock"][home][1]["available"], 3, "{text}");
    // The other SKU's partition saw 1 available for 3 wanted and refused.
    let reserve = steps
        .iter()
        .find(|s| s["partition"] == other_p && s["record"].as_str().unwrap().starts_with("Reserve"))
        .unwrap_or_else(|| panic!("no Reserve step on p{other_p}: {text}"));
    assert_eq!(reserve["stock"][&other][0]["available"], 1, "{text}");
    assert_eq!(reserve["stock"][&other][1]["available"], 1, "{text}");
    assert!(
        reserve["sent"][0].as_str().unwrap().contains("held: false"),
        "{text}"
    );
    // Every status the order went through, in order, ending out_of_stock,
    // and the held line given back.
    let statuses: Vec<&str> = steps
        .iter()
        .flat_map(|s| s["statuses"].as_array().unwrap())
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(statuses.first(), Some(&"accepted"), "{text}");
    assert!(
        statuses.last().unwrap().starts_with("out_of_stock"),
        "{text}"
    );
    let last_home_stock = steps
        .iter()
        .rev()
        .find_map(|s| s["stock"].get(home))
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(last_home_stock[1]["available"], 5, "released: {text}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ada@example.com"));

    let missing = story("no-such-order");
    assert_eq!(missing.status.code(), Some(1));
}

/// `[kafka]` without `[scylla]` (from the file or the environment) is
/// refused at start with the reason, by `run` and `migrate` alike, before
/// anything is connected to or created.
#[test]
fn kafka_without_scylla_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("orderflow.toml");
    // Nothing listens there: a start that got as far as connecting would hang or fail otherwise.
    std::fs::write(&config, "[kafka]\nbootstrap_servers = \"127.0.0.1:9\"\n").unwrap();
    let data = dir.path().join("data");
    let from_file = [("ORDERFLOW_CONFIG", config.to_str().unwrap())];
    let from_env = [("ORDERFLOW_KAFKA_BOOTSTRAP", "127.0.0.1:9")];
    for (command, env) in [
        ("run", &from_file),
        ("run", &from_env),
        ("migrate", &from_file),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_orderflow"))
            .args([command, "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .envs(env.iter().copied())
            .env_remove("ORDERFLOW_SCYLLA_NODES")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command} {env:?}: {stderr}");
        for reason in [
            "needs `[scylla]`",
            "no cross-instance fencing",
            "no shared read model",
        ] {
            assert!(stderr.contains(reason), "{command} {env:?}: {stderr}");
        }
        assert!(!data.exists(), "{command} created the data directory");
    }
}

/// Distributed with the in-process gateway simulator (the default gateway)
/// is refused at start, pointing to gateway-sim or a real gateway, before
/// anything is connected to or created.
#[test]
fn kafka_with_in_process_gateway_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("orderflow.toml");
    // Nothing listens there: a start that got as far as connecting would hang or fail otherwise.
    std::fs::write(
        &config,
        "[kafka]\nbootstrap_servers = \"127.0.0.1:9\"\n[scylla]\nnodes = [\"127.0.0.1:9\"]\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .args(["run", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("ORDERFLOW_CONFIG", &config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for reason in [
        "in-process simulator",
        "confirmed and unpaid",
        "orderflow gateway-sim",
    ] {
        assert!(stderr.contains(reason), "{stderr}");
    }
    assert!(!data.exists(), "run created the data directory");
}

/// Logs piped to another process carry no terminal colour codes, and with
/// `ORDERFLOW_LOG_FORMAT=json` every line is one JSON object.
#[test]
fn logs_plain_when_piped_and_json_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = start_server(&dir.path().join("text"), &[]);
    assert!(text.terminate().success());
    let output = text.output_text();
    assert!(output.contains("orderflow listening"), "{output}");
    assert!(
        !output.contains('\x1b'),
        "colour codes in piped output:\n{output:?}"
    );

    let mut json = start_server(
        &dir.path().join("json"),
        &[("ORDERFLOW_LOG_FORMAT", "json")],
    );
    assert!(json.terminate().success());
    let output = json.output_text();
    let lines: Vec<serde_json::Value> = output
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|v| v["fields"]["message"] == "orderflow listening" && v["level"] == "INFO"),
        "{output}"
    );
    assert!(!output.contains('\x1b'), "{output:?}");
}

/// Runs `orderflow ARGS` with `env` added (and no API token inherited
/// unless given) and returns its exit code, stdout and stderr.
fn orderflow(args: &[&str], env: &[(&str, &str)], stdin: &str) -> (Option<i32>, String, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .args(args)
        .env_remove("ORDERFLOW_ADMIN_TOKEN")
        .env_remove("ORDERFLOW_TOKEN_SECRET")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Tokens from a file and a comma-separated variable all work in their role, the CLI picks a role's token, none is logged.
#[test]
fn api_tokens_from_environment_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let readers = dir.path().join("readers");
    let (reader_a, reader_b) = ("reader-a-7c1e9f0d2b", "reader-b-44d0e8a1c3");
    std::fs::write(
        &readers,
        format!("# analysts\n{reader_a}\n\n# support\n{reader_b}\n"),
    )
    .unwrap();
    let (producer_new, producer_old) = ("producer-new-5e2a9c", "producer-old-0b7d31");
    let producers = format!("{producer_new},{producer_old}");
    let env = [
        ("ORDERFLOW_READER_TOKEN_FILE", readers.to_str().unwrap()),
        ("ORDERFLOW_PRODUCER_TOKEN", producers.as_str()),
    ];
    let mut server = start_server(&dir.path().join("data"), &env);
    set_stock(&server.base, "SKU-T", 10);
    let c = client();
    for reader in [reader_a, reader_b] {
        let stock = c
            .get(format!("{}/v1/inventory/SKU-T", server.base))
            .bearer_auth(reader)
            .send()
            .unwrap();
        assert_eq!(stock.status(), 200, "{reader}");
        let put = c
            .put(format!("{}/v1/inventory/SKU-T", server.base))
            .bearer_auth(reader)
            .json(&serde_json::json!({"available": 1}))
            .send()
            .unwrap();
        assert_eq!(put.status(), 403);
    }
    for (i, producer) in [producer_new, producer_old].into_iter().enumerate() {
        let line = order_body(&format!("tok-prod-{i}"), "SKU-T", 1).to_string();
        let (code, stdout, stderr) = orderflow(
            &["--server", &server.base, "produce", "-"],
            &[("ORDERFLOW_PRODUCER_TOKEN", producer)],
            &format!("{line}\n"),
        );
        assert_eq!(code, Some(0), "{stdout}{stderr}");
        assert!(stdout.contains(&format!("tok-prod-{i}")), "{stdout}");
    }
    let (code, stdout, stderr) = orderflow(
        &["--server", &server.base, "stock", "get", "SKU-T"],
        &[("ORDERFLOW_READER_TOKEN", reader_b)],
        "",
    );
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("\"available\""), "{stdout}");
    // A reader cannot load stock: the command needs an admin token.
    let (code, _, stderr) = orderflow(
        &["--server", &server.base, "stock", "load", "-"],
        &[("ORDERFLOW_READER_TOKEN", reader_a)],
        "",
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("ORDERFLOW_ADMIN_TOKEN"), "{stderr}");
    assert!(server.terminate().success());
    let output = server.output_text();
    assert!(output.contains("API tokens loaded"), "{output}");
    for token in [ADMIN_TOKEN, reader_a, reader_b, producer_new, producer_old] {
        assert!(!output.contains(token), "a token in the output:\n{output}");
    }

    let (code, _, stderr) = orderflow(
        &["run", "--listen", "127.0.0.1:0"],
        &[
            (
                "ORDERFLOW_DATA_DIR",
                dir.path().join("other").to_str().unwrap(),
            ),
            ("ORDERFLOW_READER_TOKEN", reader_a),
            ("ORDERFLOW_READER_TOKEN_FILE", readers.to_str().unwrap()),
        ],
        "",
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("ORDERFLOW_READER_TOKEN and ORDERFLOW_READER_TOKEN_FILE"),
        "{stderr}"
    );
    assert!(!stderr.contains(reader_a), "{stderr}");
}

/// `orderflow token ID` prints the token the instance serves on `/v1/orders/{id}/tracking-token`, stored or configured key.
#[test]
fn token_command_prints_the_endpoints_token() {
    const PRODUCER: &str = "producer-token-9f3b2e61";
    let fetch = |base: &str, id: &str| -> String {
        let v: serde_json::Value = client()
            .get(format!("{base}/v1/orders/{id}/tracking-token"))
            .bearer_auth(PRODUCER)
            .send()
            .unwrap()
            .json()
            .unwrap();
        v["tracking_token"].as_str().unwrap().to_owned()
    };
    let dir = tempfile::tempdir().unwrap();

    // The key the first run made and keeps in the embedded store.
    let data = dir.path().join("stored-key");
    let data_arg = data.to_str().unwrap();
    let mut server = start_server(&data, &[("ORDERFLOW_PRODUCER_TOKEN", PRODUCER)]);
    let stored = fetch(&server.base, "ord-cli-1");
    let (code, stdout, stderr) =
        orderflow(&["token", "ord-cli-1", "--data-dir", data_arg], &[], "");
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stderr.contains("tracking-token"), "{stderr}");
    assert!(server.terminate().success());
    let (code, stdout, stderr) =
        orderflow(&["token", "ord-cli-1", "--data-dir", data_arg], &[], "");
    assert_eq!(
        (code, stdout.trim()),
        (Some(0), stored.as_str()),
        "{stderr}"
    );

    // A configured key: no store is opened, so the instance may run.
    let key = "k".repeat(32);
    let key_env = [
        ("ORDERFLOW_PRODUCER_TOKEN", PRODUCER),
        ("ORDERFLOW_TOKEN_SECRET", key.as_str()),
    ];
    let configured = dir.path().join("configured-key");
    let mut server = start_server(&configured, &key_env);
    let served = fetch(&server.base, "ord-cli-1");
    assert_ne!(served, stored, "another key, another token");
    let (code, stdout, stderr) = orderflow(
        &[
            "token",
            "ord-cli-1",
            "--data-dir",
            configured.to_str().unwrap(),
        ],
        &key_env,
        "",
    );
    assert_eq!(
        (code, stdout.trim()),
        (Some(0), served.as_str()),
        "{stderr}"
    );
    assert!(server.terminate().success());

    for bad in ["has space", "4242424242424242"] {
        let (code, _, stderr) = orderflow(&["token", bad], &key_env, "");
        assert_eq!(code, Some(2), "{bad}: {stderr}");
    }
}
