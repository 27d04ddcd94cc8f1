//! The OpenAPI document and the order record's JSON Schema against the
//! real server and independent checkers: `openapi-spec-validator` and
//! `jsonschema` from PyPI (`ORDERFLOW_TEST_PYTHON`, set up by
//! `./scripts/test`).

mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use orderflow::domain::order::parse_order;
use serde_json::{Value, json};
use support::{ADMIN_TOKEN, client, start_server, test_python};

/// Runs `script` with the test Python, `input` on its stdin: its stdout,
/// or a panic with its stderr when it fails.
fn python(script: &str, args: &[&str], input: &[u8]) -> Result<String, String> {
    let mut child = Command::new(test_python())
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    match out.status.success() {
        true => Ok(stdout),
        false => Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr))),
    }
}

const VALIDATE_SPEC: &str = "import json, sys
from openapi_spec_validator import validate
validate(json.load(sys.stdin))
print('valid')";

/// The served document is JSON that openapi-spec-validator accepts as OpenAPI 3.1 (and a broken copy it refuses).
#[test]
fn served_document_is_valid_openapi_3_1() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), &[]);
    let res = client()
        .get(format!("{}/openapi.json", server.base))
        .send()
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/json");
    let doc: Value = res.json().unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let text = serde_json::to_vec(&doc).unwrap();
    assert_eq!(python(VALIDATE_SPEC, &[], &text).unwrap().trim(), "valid");

    let mut broken = doc.clone();
    broken["paths"]["/v1/orders"]["post"]["responses"]["202"]
        .as_object_mut()
        .unwrap()
        .remove("description");
    let refused = python(VALIDATE_SPEC, &[], &serde_json::to_vec(&broken).unwrap());
    assert!(
        refused.is_err(),
        "the validator took a response without a description"
    );
}

/// A sample value for each path parameter.
fn fill(path: &str) -> String {
    path.replace("{id}", "ord-openapi-1")
        .replace("{sku}", "sku-openapi")
        .replace("{partition}", "0")
        .replace("{offset}", "0")
        .replace("{order_id}", "ord-openapi-1")
        .replace("{kind}", "capture")
}

/// Every operation of the document is served, and answers, without a token and with the admin token, only statuses and problem codes its entry documents.
#[test]
fn every_route_answers_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), &[]);
    let doc: Value = client()
        .get(format!("{}/openapi.json", server.base))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let mut seen = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let url = format!("{}{}", server.base, fill(path));
            for token in [None, Some(ADMIN_TOKEN)] {
                let mut req = client().request(method.to_uppercase().parse().unwrap(), &url);
                if let Some(t) = token {
                    req = req.bearer_auth(t);
                }
                let res = req.body("").send().unwrap();
                let status = res.status().as_u16().to_string();
                let is_problem = res
                    .headers()
                    .get("content-type")
                    .is_some_and(|v| v == "application/problem+json");
                let body = res.text().unwrap();
                let what = format!("{method} {path} (token: {})", token.is_some());
                let Some(documented) = op["responses"].get(&status) else {
                    panic!("{what} answered {status}, which it does not document: {body}");
                };
                if is_problem {
                    let problem: Value = serde_json::from_str(&body).unwrap();
                    let code = problem["code"].as_str().unwrap();
                    let description = documented["description"].as_str().unwrap();
                    assert!(
                        description.contains(&format!("`{code}`")),
                        "{what} answered {status} {code}, not in {description:?}"
                    );
                }
                seen.push(format!("{method} {path} {status}"));
            }
        }
    }
    // Both kinds of answer were met: a route is not just its refusals.
    for expected in [
        "post /v1/orders 400",
        "get /v1/inventory/{sku} 401",
        "get /v1/inventory/{sku} 200",
        "post /v1/admin/parked/{partition}/retry 202",
        "get /openapi.json 200",
    ] {
        assert!(
            seen.iter().any(|s| s == expected),
            "{expected} not seen in {seen:#?}"
        );
    }
}

const VALIDATE_RECORDS: &str = "import json, sys
from jsonschema import Draft202012Validator
schema = json.load(open(sys.argv[1]))
Draft202012Validator.check_schema(schema)
v = Draft202012Validator(schema)
for line in sys.stdin:
    print(1 if v.is_valid(json.loads(line)) else 0)";

fn base_order() -> Value {
    json!({
        "order_id": "ord-1",
        "customer_id": "cus-1",
        "currency": "EUR",
        "lines": [{"sku": "sku-1", "quantity": 2, "unit_price": 1250}],
        "payment": {"token": "tok_visa"},
        "contact": {"email": "ann@example.com"}
    })
}

/// Sets `pointer` in `order` to `value`, or removes it when `value` is `None`.
fn mutate(pointer: &str, value: Option<Value>) -> Value {
    let mut order = base_order();
    let (parent, field) = pointer.rsplit_once('/').unwrap();
    let target = order.pointer_mut(parent).unwrap();
    match (value, target) {
        (Some(v), Value::Object(o)) => {
            o.insert(field.to_owned(), v);
        }
        (None, Value::Object(o)) => {
            o.remove(field);
        }
        _ => unreachable!("{pointer}"),
    }
    order
}

/// Order records around every rule: valid ones, one broken rule at a time, and other JSON.
fn sample_records() -> Vec<Value> {
    let s = |n: usize, c: char| Value::String(std::iter::repeat_n(c, n).collect());
    let line = json!({"sku": "s", "quantity": 1, "unit_price": 0});
    let mut records = vec![
        base_order(),
        json!([]),
        json!("order"),
        json!(1),
        Value::Null,
    ];
    let cases: Vec<(&str, Vec<Option<Value>>)> = vec![
        (
            "/order_id",
            vec![
                None,
                Some(Value::Null),
                Some(json!("")),
                Some(s(64, 'o')),
                Some(s(65, 'o')),
                Some(json!("a b")),
                Some(json!("ord:1.2_3-4")),
                Some(json!(5)),
                Some(json!("é")),
            ],
        ),
        (
            "/customer_id",
            vec![
                None,
                Some(Value::Null),
                Some(json!("")),
                Some(s(64, 'c')),
                Some(s(65, 'c')),
                Some(json!("c/1")),
                Some(json!(7)),
            ],
        ),
        (
            "/currency",
            vec![
                None,
                Some(json!("USD")),
                Some(json!("eur")),
                Some(json!("EU")),
                Some(json!("EURO")),
                Some(json!("E1R")),
                Some(json!(3)),
            ],
        ),
        (
            "/lines",
            vec![
                None,
                Some(json!([])),
                Some(json!("x")),
                Some(Value::Array(vec![line.clone(); 100])),
                Some(Value::Array(vec![line.clone(); 101])),
                Some(json!([1])),
                Some(json!([{}])),
            ],
        ),
        (
            "/lines/0/sku",
            vec![
                None,
                Some(json!("")),
                Some(s(64, 's')),
                Some(s(65, 's')),
                Some(json!("a:b")),
                Some(json!("a.b_c-d")),
                Some(json!(1)),
            ],
        ),
        (
            "/lines/0/quantity",
            vec![
                None,
                Some(json!(0)),
                Some(json!(1)),
                Some(json!(1000)),
                Some(json!(1001)),
                Some(json!(-1)),
                Some(json!("2")),
                Some(json!(2.5)),
                Some(Value::Null),
            ],
        ),
        (
            "/lines/0/unit_price",
            vec![
                None,
                Some(json!(0)),
                Some(json!(1_000_000_000)),
                Some(json!(1_000_000_001)),
                Some(json!(-5)),
                Some(json!("1")),
            ],
        ),
        ("/lines/0/note", vec![Some(json!("x"))]),
        (
            "/payment",
            vec![
                None,
                Some(json!({})),
                Some(json!({"token": ""})),
                Some(json!({"token": s(255, 't')})),
                Some(json!({"token": s(256, 't')})),
                Some(json!({"token": "tok-1"})),
                Some(json!({"token": "tok_1", "x": 1})),
                Some(json!({"number": "x"})),
                Some(json!("tok")),
                Some(Value::Null),
            ],
        ),
        (
            "/contact",
            vec![
                None,
                Some(Value::Null),
                Some(json!({})),
                Some(json!({"email": null})),
                Some(json!({"phone": "1"})),
                Some(json!("a@b.co")),
            ],
        ),
        (
            "/contact/email",
            vec![
                Some(json!("a@b.co")),
                Some(json!("ab.co")),
                Some(json!("@b.co")),
                Some(json!("a@.co")),
                Some(json!("a@b.")),
                Some(json!("a@bco")),
                Some(json!("a b@c.de")),
                Some(json!("a@b@c.de")),
                Some(json!("a@b\tc.de")),
                Some(json!(format!("{}@b.co", "x".repeat(249)))),
                Some(json!(format!("{}@b.co", "x".repeat(250)))),
                Some(json!(5)),
            ],
        ),
        ("/note", vec![Some(json!("x"))]),
    ];
    for (pointer, values) in cases {
        records.extend(values.into_iter().map(|v| mutate(pointer, v)));
    }
    records
}

/// docs/order-record.schema.json accepts exactly the records orderflow's validation accepts, and every record orderflow writes for an accepted one.
#[test]
fn order_record_schema_agrees_with_validation() {
    let schema = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/order-record.schema.json");
    let mut records = sample_records();
    // The records intake and the processor write for the accepted ones.
    let written: Vec<Value> = records
        .iter()
        .filter_map(|r| parse_order(&serde_json::to_vec(r).unwrap()).ok())
        .map(|p| serde_json::from_slice(&p.order.to_json()).unwrap())
        .collect();
    assert!(
        written.len() >= 20,
        "too few valid samples: {}",
        written.len()
    );
    records.extend(written);
    let input: Vec<u8> = records
        .iter()
        .flat_map(|r| serde_json::to_vec(r).unwrap().into_iter().chain([b'\n']))
        .collect();
    let verdicts = python(VALIDATE_RECORDS, &[schema.to_str().unwrap()], &input).unwrap();
    let verdicts: Vec<bool> = verdicts.lines().map(|l| l == "1").collect();
    assert_eq!(verdicts.len(), records.len());
    let mut refused = 0;
    for (record, schema_valid) in records.iter().zip(verdicts) {
        let accepted = parse_order(&serde_json::to_vec(record).unwrap());
        refused += usize::from(accepted.is_err());
        assert_eq!(
            schema_valid,
            accepted.is_ok(),
            "schema says {schema_valid}, orderflow says {:?} for {record}",
            accepted.err().map(|r| r.reason)
        );
    }
    assert!(refused >= 40, "too few invalid samples: {refused}");
}
