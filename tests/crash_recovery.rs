//! End to end: the real binary under concurrent HTTP load on a scarce SKU
//! is killed with SIGKILL mid-load and restarted on the same data
//! directory. Nothing acknowledged is lost, every order ends in exactly
//! one terminal status, and stock is conserved with confirmed = sold.
//! Run on both deployments: embedded, and Kafka + Cassandra.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;

const SKU: &str = "SKU-SCARCE";
const STOCK: u64 = 120;
const THREADS: usize = 4;
const ORDERS_PER_THREAD: usize = 100;

/// SIGKILL mid-load loses no acknowledged order and never oversells (embedded).
#[test]
fn sigkill_mid_load_then_restart_embedded() {
    let dir = tempfile::tempdir().unwrap();
    sigkill_mid_load_then_restart(dir.path(), &[]);
}

/// SIGKILL mid-load loses no acknowledged order and never oversells (Kafka + Cassandra).
#[test]
fn sigkill_mid_load_then_restart_distributed() {
    let dir = tempfile::tempdir().unwrap();
    // Distributed instances share one gateway; it outlives the restart.
    let sim = start_gateway_sim(&[], &[]);
    let gateway = format!("[gateway]\nkind = \"stripe\"\nurl = \"{}\"", sim.url);
    let config = distributed_config(dir.path(), "", &gateway);
    sigkill_mid_load_then_restart(
        dir.path(),
        &[
            ("ORDERFLOW_CONFIG", config.to_str().unwrap()),
            ("ORDERFLOW_STRIPE_SECRET_KEY", "sk_test_orderflow_crash"),
        ],
    );
}

fn sigkill_mid_load_then_restart(dir: &std::path::Path, env: &[(&str, &str)]) {
    let mut server = start_server(dir, env);
    set_stock(&server.base, SKU, STOCK);

    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let sent = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for t in 0..THREADS {
        let (base, acked, sent) = (server.base.clone(), acked.clone(), sent.clone());
        threads.push(std::thread::spawn(move || {
            let c = client();
            for i in 0..ORDERS_PER_THREAD {
                let id = format!("crash-{t}-{i}");
                sent.fetch_add(1, Ordering::SeqCst);
                match c
                    .post(format!("{base}/v1/orders"))
                    .json(&order_body(&id, SKU, 1))
                    .send()
                {
                    Ok(r) if r.status() == 202 => acked.lock().unwrap().push(id),
                    Ok(r) => assert!(
                        r.status() == 429 || r.status() == 503,
                        "unexpected {}",
                        r.status()
                    ),
                    Err(_) => return, // the server is gone
                }
            }
        }));
    }
    // Kill once a good part of the load is in, while requests are in flight.
    wait_until(Duration::from_secs(120), "half the load", || {
        acked.lock().unwrap().len() >= THREADS * ORDERS_PER_THREAD / 2
    });
    server.kill();
    for t in threads {
        t.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() < THREADS * ORDERS_PER_THREAD,
        "the kill came after the load: nothing was tested"
    );

    let server = start_server(dir, env);
    let mut terminal = std::collections::BTreeMap::new();
    wait_until(
        Duration::from_secs(120),
        "every acknowledged order to end",
        || {
            acked.iter().all(|id| {
                if terminal.contains_key(id) {
                    return true;
                }
                let Some(v) = order_view(&server.base, id) else {
                    return false;
                };
                let status = v["status"].as_str().unwrap().to_owned();
                if is_terminal(&status) {
                    terminal.insert(id.clone(), v);
                }
                is_terminal(&status)
            })
        },
    );
    // Exactly one terminal status, last, with consecutive seqs.
    for (id, v) in &terminal {
        let history = v["history"].as_array().unwrap();
        let terminals = history
            .iter()
            .filter(|h| is_terminal(h["status"].as_str().unwrap()))
            .count();
        assert_eq!(terminals, 1, "{id}: {v}");
        for (i, h) in history.iter().enumerate() {
            assert_eq!(h["seq"].as_u64().unwrap(), i as u64 + 1, "{id}: {v}");
        }
    }
    // Orders that reached the log without an answer count too: look up
    // every id that was attempted.
    let mut confirmed = 0;
    for t in 0..THREADS {
        for i in 0..ORDERS_PER_THREAD {
            if let Some(v) = order_view(&server.base, &format!("crash-{t}-{i}")) {
                confirmed += usize::from(v["status"] == "confirmed");
            }
        }
    }
    wait_until(Duration::from_secs(60), "no stock left reserved", || {
        stock(&server.base, SKU)["reserved"] == 0
    });
    let s = stock(&server.base, SKU);
    let (available, reserved, sold) = (
        s["available"].as_u64().unwrap(),
        s["reserved"].as_u64().unwrap(),
        s["sold"].as_u64().unwrap(),
    );
    assert_eq!(available + reserved + sold, STOCK, "conservation: {s}");
    assert_eq!(sold as usize, confirmed, "confirmed orders = sold: {s}");
    assert!(sold <= STOCK);
    eprintln!(
        "sent {} acked {} confirmed {confirmed} stock {s}",
        sent.load(Ordering::SeqCst),
        acked.len()
    );
}
