//! Writes the committed seed corpora (`fuzz/seeds/<target>/`) from the real
//! encoders: segment bytes written by the embedded log, envelopes and status
//! events from their `encode`, snapshots of a processor that ran real
//! orders, and the order and config examples of the docs. Run from the
//! repository root after a format change:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example seeds
//! ```
//!
//! Seeds are named by what they hold, so a rerun overwrites them in place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use orderflow::config::LogConfig;
use orderflow::domain::message::KeyedResult;
use orderflow::domain::{
    EffectKind, Envelope, Message, MsgId, PaymentOutcome, RecordKind, Status, StatusEvent,
};
use orderflow::pipeline::log::embedded::EmbeddedLog;
use orderflow::pipeline::log::{Log, Record, Topic};
use orderflow::telemetry::metrics::Metrics;
use orderflow::stages::processor::Input;
use orderflow::stages::snapshot;
use orderflow::stages::{Output, PartitionState, Processor};

/// The contract's order (docs/design.md), and the README's `curl` order without an id.
const DESIGN_ORDER: &str = r#"{"order_id": "ord-1001", "customer_id": "cus-42", "currency": "USD",
 "lines": [{"sku": "SKU-1", "quantity": 2, "unit_price": 1999}],
 "payment": {"token": "tok_visa"},
 "contact": {"email": "ada@example.com"}}"#;
const README_ORDER: &str = r#"{"customer_id":"cus-42","currency":"USD",
  "lines":[{"sku":"SKU-1","quantity":2,"unit_price":1999}],"payment":{"token":"tok_visa"},
  "contact":{"email":"ada@example.com"}}"#;

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("create seed dir");
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

fn order_seeds(dir: &Path) {
    write(dir, "design-order.json", DESIGN_ORDER.as_bytes());
    write(dir, "readme-order.json", README_ORDER.as_bytes());
    let multi = r#"{"order_id":"ord-2","customer_id":"c:1","currency":"EUR","lines":[
        {"sku":"A.1","quantity":1000,"unit_price":1000000000},
        {"sku":"b_2-x","quantity":1,"unit_price":0}],"payment":{"token":"tok_chargeDeclined"},
        "contact":null}"#;
    write(dir, "multi-line-limits.json", multi.as_bytes());
    let line = r#"{"sku":"S","quantity":1,"unit_price":1}"#;
    let lines = vec![line; 101].join(",");
    let too_many = format!(
        r#"{{"customer_id":"c","currency":"USD","lines":[{lines}],"payment":{{"token":"t"}}}}"#
    );
    write(dir, "too-many-lines.json", too_many.as_bytes());
    let cases: [(&str, &str); 16] = [
        ("malformed", r#"{"customer_id":"c","#),
        ("not-an-object", r#"[{"customer_id":"c"}]"#),
        ("unknown-field", r#"{"customer_id":"c","currency":"USD","lines":[{"sku":"S","quantity":1,"unit_price":1}],"payment":{"token":"t"},"note":"x"}"#),
        ("missing-field", r#"{"currency":"USD","lines":[{"sku":"S","quantity":1,"unit_price":1}],"payment":{"token":"t"}}"#),
        ("bad-order-id", r#"{"order_id":"a b","customer_id":"c","currency":"USD","lines":[{"sku":"S","quantity":1,"unit_price":1}],"payment":{"token":"t"}}"#),
        ("bad-currency", r#"{"customer_id":"c","currency":"usd","lines":[{"sku":"S","quantity":1,"unit_price":1}],"payment":{"token":"t"}}"#),
        ("no-lines", r#"{"customer_id":"c","currency":"USD","lines":[],"payment":{"token":"t"}}"#),
        ("bad-sku", r#"{"customer_id":"c","currency":"USD","lines":[{"sku":"a b","quantity":1,"unit_price":1}],"payment":{"token":"t"}}"#),
        ("bad-quantity", r#"{"customer_id":"c","currency":"USD","lines":[{"sku":"S","quantity":1.5,"unit_price":1}],"payment":{"token":"t"}}"#),
        ("bad-price", r#"{"customer_id":"c","currency":"USD","lines":[{"sku":"S","quantity":1,"unit_price":-1}],"payment":{"token":"t"}}"#),
        ("card-in-payment", r#"{"customer_id":"c","currency":"USD","lines":[{"sku":"S","quantity":1,"unit_price":1}],"payment":{"token":"t","card":"x"}}"#),
        ("bad-token", r#"{"customer_id":"c","currency":"USD","lines":[{"sku":"S","quantity":1,"unit_price":1}],"payment":{"token":"tok visa"}}"#),
        ("bad-email", r#"{"customer_id":"c","currency":"USD","lines":[{"sku":"S","quantity":1,"unit_price":1}],"payment":{"token":"t"},"contact":{"email":"ada@example."}}"#),
        ("pan-plain", r#"{"customer_id":"c","currency":"USD","lines":[{"sku":"S","quantity":1,"unit_price":1}],"payment":{"token":"4242424242424242"}}"#),
        ("pan-grouped", r#"{"customer_id":"c","note":"4000-0566-5566-5556"}"#),
        ("pan-escaped", r#"{"customer_id":"\u0034242 4242 4242 4242"}"#),
    ];
    for (name, body) in cases {
        write(dir, &format!("{name}.json"), body.as_bytes());
    }
}

fn messages() -> Vec<(&'static str, Envelope)> {
    let id = Some(MsgId {
        src_partition: 3,
        src_offset: 41,
        index: 1,
    });
    vec![
        (
            "reserve",
            Envelope::new(
                id,
                Message::Reserve {
                    order_id: "ord-1001".into(),
                    home_sku: "SKU-1".into(),
                    line: 1,
                    sku: "SKU-2".into(),
                    quantity: 2,
                },
            ),
        ),
        (
            "reservation-result",
            Envelope::new(
                id,
                Message::ReservationResult {
                    order_id: "ord-1001".into(),
                    line: 1,
                    held: true,
                },
            ),
        ),
        (
            "commit",
            Envelope::new(
                id,
                Message::Commit {
                    order_id: "ord-1001".into(),
                    line: 0,
                },
            ),
        ),
        (
            "release",
            Envelope::new(
                id,
                Message::Release {
                    order_id: "ord-1001".into(),
                    line: 0,
                },
            ),
        ),
        (
            "payment-authorized",
            Envelope::new(
                None,
                Message::PaymentResult {
                    order_id: "ord-1001".into(),
                    outcome: PaymentOutcome::Authorized {
                        payment_id: "pi_123".into(),
                    },
                },
            ),
        ),
        (
            "payment-declined",
            Envelope::new(
                None,
                Message::PaymentResult {
                    order_id: "ord-1001".into(),
                    outcome: PaymentOutcome::Declined {
                        code: "card_declined".into(),
                    },
                },
            ),
        ),
        (
            "payment-failed",
            Envelope::new(
                None,
                Message::PaymentResult {
                    order_id: "ord-1001".into(),
                    outcome: PaymentOutcome::Failed {
                        reason: "gateway_unavailable".into(),
                    },
                },
            ),
        ),
        (
            "effect-done",
            Envelope::new(
                None,
                Message::EffectDone {
                    order_id: "ord-1001".into(),
                    kind: EffectKind::Capture,
                },
            ),
        ),
        (
            "set-stock",
            Envelope::new(
                None,
                Message::SetStock {
                    sku: "SKU-1".into(),
                    available: 10,
                },
            ),
        ),
        (
            "results",
            Envelope::new(
                None,
                Message::Results {
                    results: vec![
                        KeyedResult {
                            key: "SKU-1".into(),
                            body: Message::PaymentResult {
                                order_id: "ord-1001".into(),
                                outcome: PaymentOutcome::Authorized {
                                    payment_id: "pi_123".into(),
                                },
                            },
                        },
                        KeyedResult {
                            key: "SKU-9".into(),
                            body: Message::EffectDone {
                                order_id: "ord-1002".into(),
                                kind: EffectKind::Capture,
                            },
                        },
                    ],
                },
            ),
        ),
    ]
}

fn statuses() -> Vec<StatusEvent> {
    Status::ALL
        .iter()
        .enumerate()
        .map(|(i, &status)| StatusEvent {
            order_id: "ord-1001".into(),
            seq: i as u32 + 1,
            status,
            reason: (status == Status::Rejected).then(|| "pan_detected".into()),
            at_ms: 1_700_000_000_000 + i as u64,
            refused_skus: if status == Status::OutOfStock {
                vec!["SKU-1".into()]
            } else {
                Vec::new()
            },
            released_lines: u16::from(status == Status::OutOfStock),
            src: Some(MsgId {
                src_partition: 2,
                src_offset: 40 + i as u64,
                index: 0,
            }),
            email: status
                .is_terminal()
                .then(|| "ada@example.com".into()),
        })
        .collect()
}

fn message_seeds(dir: &Path) {
    for (name, env) in messages() {
        write(dir, &format!("envelope-{name}.msgpack"), &env.encode());
    }
    for event in statuses() {
        write(
            dir,
            &format!("status-{}.msgpack", event.status),
            &event.encode(),
        );
    }
}

fn config_seeds(dir: &Path, root: &Path) {
    let docker = std::fs::read(root.join("docker/orderflow.toml")).expect("docker/orderflow.toml");
    write(dir, "docker.toml", &docker);
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let mut n = 0;
    for block in readme.split("```toml\n").skip(1) {
        let toml = block.split("```").next().unwrap_or_default();
        n += 1;
        write(dir, &format!("readme-{n}.toml"), toml.as_bytes());
    }
    write(dir, "partial.toml", b"partitions = 4\n[log]\nfsync = false\n");
    write(
        dir,
        "stripe-gateway.toml",
        b"[gateway]\nkind = \"stripe\"\nurl = \"http://127.0.0.1:12111\"\ntimeout_ms = 500\nbreaker_window = 10\nbreaker_min_calls = 5\nbreaker_failure_ratio = 0.5\n",
    );
    write(
        dir,
        "out-of-range.toml",
        b"partitions = 0\n[log]\nsegment_size_bytes = 4096\nmax_record_bytes = 8192\n",
    );
}

/// Processes real records with a one-partition processor (every SKU local)
/// and returns its snapshot, framed as the `snapshot` target reads it.
fn state_seed(records: &[(RecordKind, &str, Vec<u8>)]) -> Vec<u8> {
    let mut processor = Processor::new(0, 1, PartitionState::default());
    let mut out = Output::default();
    for (offset, (kind, key, value)) in records.iter().enumerate() {
        let input = Input {
            offset: offset as u64,
            timestamp_ms: 1_700_000_000_000 + offset as u64,
            kind: *kind,
            key: key.as_bytes(),
            value,
        };
        processor.apply(input, &mut out);
    }
    let (manifest, blobs) = snapshot::full(&processor.state, 0);
    let mut framed = Vec::new();
    let fields = std::iter::once(manifest.encode())
        .chain(manifest.blobs().into_iter().map(|b| blobs[&b].clone()));
    for field in fields {
        framed.extend_from_slice(&(field.len() as u32).to_le_bytes());
        framed.extend_from_slice(&field);
    }
    framed
}

fn state_seeds(dir: &Path) {
    let stock = |sku: &str, available| {
        let env = Envelope::new(
            None,
            Message::SetStock {
                sku: sku.into(),
                available,
            },
        );
        (RecordKind::Internal, "SKU-1", env.encode())
    };
    let order = (
        RecordKind::OrderJson,
        "SKU-1",
        DESIGN_ORDER.as_bytes().to_vec(),
    );
    let two_lines = r#"{"order_id":"ord-2","customer_id":"cus-7","currency":"USD",
        "lines":[{"sku":"SKU-1","quantity":1,"unit_price":500},{"sku":"SKU-2","quantity":3,"unit_price":250}],
        "payment":{"token":"tok_visa"}}"#;
    let authorized = |id: &str| {
        let env = Envelope::new(
            None,
            Message::PaymentResult {
                order_id: id.into(),
                outcome: PaymentOutcome::Authorized {
                    payment_id: format!("pi_{id}"),
                },
            },
        );
        (RecordKind::Internal, "SKU-1", env.encode())
    };
    write(dir, "stock-only.snapshot", &state_seed(&[stock("SKU-1", 10)]));
    write(
        dir,
        "order-held.snapshot",
        &state_seed(&[stock("SKU-1", 10), order.clone()]),
    );
    write(
        dir,
        "order-authorized.snapshot",
        &state_seed(&[stock("SKU-1", 10), order.clone(), authorized("ord-1001")]),
    );
    write(
        dir,
        "saga-two-lines.snapshot",
        &state_seed(&[
            stock("SKU-1", 10),
            stock("SKU-2", 10),
            (RecordKind::OrderJson, "SKU-1", two_lines.as_bytes().to_vec()),
        ]),
    );
    write(
        dir,
        "out-of-stock.snapshot",
        &state_seed(&[stock("SKU-1", 1), order]),
    );
    // A saga message from another partition: a hold and that source's watermark.
    let reserve = Envelope::new(
        Some(MsgId {
            src_partition: 5,
            src_offset: 77,
            index: 0,
        }),
        Message::Reserve {
            order_id: "ord-9".into(),
            home_sku: "SKU-9".into(),
            line: 2,
            sku: "SKU-1".into(),
            quantity: 4,
        },
    );
    write(
        dir,
        "remote-hold-watermark.snapshot",
        &state_seed(&[
            stock("SKU-1", 10),
            (RecordKind::Internal, "SKU-1", reserve.encode()),
        ]),
    );
    // An undecodable record goes to the park lane.
    write(
        dir,
        "parked.snapshot",
        &state_seed(&[
            stock("SKU-1", 10),
            (RecordKind::Internal, "SKU-1", b"\xc1 not msgpack".to_vec()),
        ]),
    );
}

/// Real segment files: the embedded log writes them, and the seeds are
/// their bytes, clean and with a torn last frame, alone and in pairs.
async fn log_seeds(dir: &Path) {
    let data = tempfile::tempdir().expect("temp dir");
    let config = LogConfig {
        fsync: false,
        ..LogConfig::default()
    };
    let topics = [(Topic::Orders, 1), (Topic::OrderStatus, 1)];
    let log = EmbeddedLog::open(data.path(), &topics, &config, Arc::new(Metrics::new()))
        .expect("open the embedded log");
    let mut orders = vec![Record {
        kind: RecordKind::OrderJson,
        key: b"SKU-1".to_vec(),
        value: DESIGN_ORDER.as_bytes().to_vec(),
    }];
    for (_, env) in messages() {
        orders.push(Record {
            kind: RecordKind::Internal,
            key: b"SKU-1".to_vec(),
            value: env.encode(),
        });
    }
    let statuses: Vec<Record> = statuses()
        .iter()
        .map(|e| Record {
            kind: RecordKind::Internal,
            key: e.order_id.as_bytes().to_vec(),
            value: e.encode(),
        })
        .collect();
    log.append(Topic::Orders, 0, orders)
        .await
        .expect("append orders");
    log.append(Topic::OrderStatus, 0, statuses)
        .await
        .expect("append statuses");
    log.close().await;
    drop(log);
    let segment = |topic: &str| {
        let path = data
            .path()
            .join(topic)
            .join("00000")
            .join("00000000000000000000.seg");
        std::fs::read(path).expect("read the segment")
    };
    let (orders, statuses) = (segment("orders"), segment("order-status"));
    let torn = |bytes: &[u8]| bytes[..bytes.len() - 5].to_vec();
    let frames_dir = dir.join("log_frames");
    write(&frames_dir, "orders.seg", &orders);
    write(&frames_dir, "orders-torn.seg", &torn(&orders));
    write(&frames_dir, "order-status.seg", &statuses);
    write(&frames_dir, "order-status-torn.seg", &torn(&statuses));
    // log_recovery: `flags | segment`, or `flags | first_len | first | last`.
    let recovery_dir = dir.join("log_recovery");
    let one = |bytes: &[u8]| [&[0u8][..], bytes].concat();
    let two = |flags: u8, first: &[u8], last: &[u8]| {
        let len = (first.len() as u32).to_le_bytes();
        [&[flags][..], &len, first, last].concat()
    };
    write(&recovery_dir, "one-segment", &one(&orders));
    write(&recovery_dir, "one-segment-torn", &one(&torn(&orders)));
    write(&recovery_dir, "two-segments", &two(1, &orders, &statuses));
    write(
        &recovery_dir,
        "two-segments-torn-last",
        &two(1, &orders, &torn(&statuses)),
    );
    write(
        &recovery_dir,
        "two-segments-torn-first",
        &two(1, &torn(&orders), &statuses),
    );
    write(&recovery_dir, "two-segments-gap", &two(3, &orders, &statuses));
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("fuzz/ has a parent")
        .to_path_buf();
    let seeds = root.join("fuzz/seeds");
    order_seeds(&seeds.join("order"));
    message_seeds(&seeds.join("message"));
    config_seeds(&seeds.join("config"), &root);
    state_seeds(&seeds.join("snapshot"));
    log_seeds(&seeds).await;
    println!("seeds written under {}", seeds.display());
}
