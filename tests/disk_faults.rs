//! Disk faults: a full disk (a small tmpfs the test mounts and fills) and a
//! failing fsync (injected through the log's debug-build fault seam,
//! `ORDERFLOW_DEBUG_LOG_FAULTS`). Mounting needs root, as CI runs.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use orderflow::config::LogConfig;
use orderflow::pipeline::log::embedded::EmbeddedLog;
use orderflow::pipeline::log::{Log, LogError, Record, RecordKind, Topic};
use orderflow::pipeline::store::embedded::EmbeddedStore;
use orderflow::pipeline::store::{BlobRef, Scope, SnapshotWrite, StateStore, StoreError};
use orderflow::telemetry::metrics::Metrics;
use support::{client, is_terminal, order_view, set_stock, start_server, wait_until};

/// A size-limited tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    mnt: PathBuf,
    /// Where the mount point lives; removed after the unmount.
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    /// Needs root (CI runs as root).
    fn mount(size: &str) -> Tmpfs {
        let parent = tempfile::tempdir().unwrap();
        let mnt = parent.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mnt)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount -t tmpfs failed ({status}): these tests need root"
        );
        Tmpfs {
            mnt,
            _parent: parent,
        }
    }

    fn path(&self) -> &Path {
        &self.mnt
    }

    /// A file of `bytes` to delete later, which gives space back the way
    /// an operator would.
    fn spare(&self, name: &str, bytes: usize) -> PathBuf {
        let path = self.mnt.join(name);
        std::fs::write(&path, vec![0x5au8; bytes]).unwrap();
        path
    }

    /// Takes every free byte with a file of its own; returns that file.
    fn fill(&self) -> PathBuf {
        let path = self.mnt.join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0xa5u8; 64 * 1024];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling the disk: {e}"),
            }
        }
        // Single bytes take the last partly used page.
        while file.write(&[0xa5]).is_ok_and(|n| n == 1) {}
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Still busy (a process being reaped): detach it anyway.
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// Every `.seg` file under `dir` is a whole number of frames with valid
/// checksums: no torn or corrupt record anywhere, not only at the tail.
fn assert_segments_whole(dir: &Path) -> usize {
    let mut frames = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "seg") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            let mut at = 0usize;
            while at < bytes.len() {
                let header = bytes
                    .get(at..at + 8)
                    .unwrap_or_else(|| panic!("{}: torn header at byte {at}", path.display()));
                let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
                let crc = u32::from_le_bytes(header[4..].try_into().unwrap());
                let payload = bytes
                    .get(at + 8..at + 8 + len)
                    .unwrap_or_else(|| panic!("{}: torn frame at byte {at}", path.display()));
                assert_eq!(
                    crc32c::crc32c(payload),
                    crc,
                    "{}: bad checksum at byte {at}",
                    path.display()
                );
                at += 8 + len;
                frames += 1;
            }
        }
    }
    frames
}

fn log_config() -> LogConfig {
    LogConfig {
        segment_size_bytes: 1 << 20,
        max_record_bytes: 64 * 1024,
        ..LogConfig::default()
    }
}

fn open_log(dir: &Path) -> EmbeddedLog {
    EmbeddedLog::open(
        dir,
        &[(Topic::Orders, 2), (Topic::OrderStatus, 1)],
        &log_config(),
        Arc::new(Metrics::new()),
    )
    .unwrap()
}

fn big_record(i: u64) -> Record {
    let mut value = format!("{i:08}").into_bytes();
    value.resize(8 * 1024 + (i as usize % 7) * 100, b'x');
    Record {
        kind: RecordKind::Internal,
        key: b"k".to_vec(),
        value,
    }
}

/// The embedded log on a real full disk: the append that meets ENOSPC
/// fails with `Unavailable` naming the full disk, no segment keeps a torn
/// frame, and once space is freed the next append takes the next offset,
/// with every acknowledged record still there after a reopen.
#[tokio::test]
async fn log_on_a_full_disk_rolls_back_and_resumes() {
    let disk = Tmpfs::mount("8m");
    let spare = disk.spare("spare", 1 << 20);
    let dir = disk.path().join("log");
    let log = open_log(&dir);
    let mut acked = 0u64;
    let err = loop {
        // Batches of several records, so the failing one is partly written.
        let records: Vec<Record> = (acked..acked + 5).map(big_record).collect();
        match log.append(Topic::Orders, 0, records).await {
            Ok(first) => {
                assert_eq!(first, acked);
                acked += 5;
            }
            Err(e) => break e,
        }
        assert!(acked < 10_000, "the 8 MiB disk never filled");
    };
    assert!(
        matches!(&err, LogError::Unavailable(m) if m.contains("disk full")),
        "{err}"
    );
    assert!(log.may_recover(), "a full disk is not a failure for good");
    // Records of the failed batch that a segment roll inside it made
    // durable (and readable) before the disk filled stay, as after a crash
    // mid-batch; the rest is gone, torn frame included.
    let (_, durable) = log.offsets(Topic::Orders, 0).await.unwrap();
    assert!((acked..acked + 5).contains(&durable), "{acked} {durable}");
    let mut acked = durable;
    assert_eq!(assert_segments_whole(&dir) as u64, acked);
    // The rollback gave back at most what the failed batch had taken.
    let larger: Vec<Record> = (acked..acked + 20).map(big_record).collect();
    assert!(
        log.append(Topic::Orders, 0, larger).await.is_err(),
        "still full"
    );
    assert_eq!(log.offsets(Topic::Orders, 0).await.unwrap(), (0, acked));
    assert_eq!(assert_segments_whole(&dir) as u64, acked);

    std::fs::remove_file(spare).unwrap();
    assert_eq!(
        log.append(Topic::Orders, 0, vec![big_record(acked)])
            .await
            .unwrap(),
        acked,
        "the first append after space is freed succeeds"
    );
    acked += 1;
    let mut next = 0;
    while next < acked {
        for r in log
            .read(Topic::Orders, 0, next, 64, Duration::ZERO)
            .await
            .unwrap()
        {
            assert_eq!(r.value, big_record(next).value);
            next += 1;
        }
    }
    log.close().await;
    drop(log);

    assert_eq!(assert_segments_whole(&dir) as u64, acked);
    let log = open_log(&dir);
    assert_eq!(log.offsets(Topic::Orders, 0).await.unwrap(), (0, acked));
    log.close().await;
}

/// Snapshot `n` of partition 0: one blob of `blob_bytes`, replacing the last.
fn checkpoint(epoch: u64, n: u64, blob_bytes: usize) -> SnapshotWrite {
    let blob = |id: u64| BlobRef { epoch, id };
    SnapshotWrite {
        scope: Scope::Orders,
        partition: 0,
        epoch,
        next_offset: n + 1,
        manifest: n.to_le_bytes().to_vec(),
        blobs: vec![(blob(n), vec![n as u8; blob_bytes])],
        drop: n.checked_sub(1).map(blob).into_iter().collect(),
    }
}

/// The embedded state store (redb) on a real full disk: a commit fails
/// with the retryable `DiskFull`, and once space is freed the next call
/// succeeds without a restart (redb refuses every call after an I/O error
/// until the store reopens it), keeping everything committed before.
#[tokio::test]
async fn store_on_a_full_disk_fails_retryably_and_reopens() {
    const SMALL: usize = 16 * 1024;
    let disk = Tmpfs::mount("8m");
    let spare = disk.spare("spare", 1 << 20);
    let room = disk.spare("room", 256 * 1024);
    let path = disk.path().join("state.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    let epoch = store.claim(Scope::Orders, 0).await.unwrap();
    let mut n = 0;
    for _ in 0..3 {
        store.commit(&checkpoint(epoch, n, SMALL)).await.unwrap();
        n += 1;
    }

    disk.fill();
    // Room for a small commit, not for a large one.
    std::fs::remove_file(room).unwrap();
    let err = store
        .commit(&checkpoint(epoch, n, 1 << 20))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::DiskFull(_)), "{err}");
    assert!(err.is_retryable());
    let again = store
        .commit(&checkpoint(epoch, n, 1 << 20))
        .await
        .unwrap_err();
    assert!(
        matches!(again, StoreError::DiskFull(_)),
        "still full: {again}"
    );

    std::fs::remove_file(spare).unwrap();
    store
        .commit(&checkpoint(epoch, n, SMALL))
        .await
        .expect("the first write after space is freed succeeds");
    let check = |store: EmbeddedStore| async move {
        let snapshot = store.load(Scope::Orders, 0).await.unwrap().unwrap();
        assert_eq!(snapshot.next_offset, n + 1);
        assert_eq!(snapshot.manifest, n.to_le_bytes());
        let blobs = store
            .read_blobs(
                Scope::Orders,
                0,
                &[BlobRef { epoch, id: n }, BlobRef { epoch, id: n - 1 }],
            )
            .await
            .unwrap();
        assert_eq!(blobs[0].as_deref(), Some(vec![n as u8; SMALL].as_slice()));
        assert!(blobs[1].is_none(), "the replaced blob is deleted");
    };
    check(store.clone()).await;
    drop(store);
    check(EmbeddedStore::open(&path).unwrap()).await;
}

/// An HTTP answer: status, `Retry-After` and the problem `code`, if any.
#[derive(Debug)]
struct Answer {
    status: u16,
    retry_after: Option<String>,
    code: Option<String>,
}

/// `POST /v1/orders`; `None` when the server did not answer (stopped).
fn post(base: &str, body: &serde_json::Value) -> Option<Answer> {
    let r = client()
        .post(format!("{base}/v1/orders"))
        .json(body)
        .send()
        .ok()?;
    let status = r.status().as_u16();
    let retry_after = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body: serde_json::Value = r.json().unwrap_or_default();
    Some(Answer {
        status,
        retry_after,
        code: body["code"].as_str().map(str::to_owned),
    })
}

fn order(id: &str, sku: &str, token: &str) -> serde_json::Value {
    serde_json::json!({"order_id": id, "customer_id": "cus-1", "currency": "USD",
        "lines": [{"sku": sku, "quantity": 1, "unit_price": 1999}],
        "payment": {"token": token}})
}

/// Places an order that must be accepted.
fn place(base: &str, id: &str, sku: &str, token: &str) {
    let a = post(base, &order(id, sku, token)).expect("the server answers");
    assert_eq!(a.status, 202, "{id}: {a:?}");
}

/// Asserts a 503 that tells the client to come back.
fn assert_unavailable(a: &Answer) {
    assert_eq!(a.status, 503, "{a:?}");
    assert!(a.retry_after.is_some(), "503 without Retry-After: {a:?}");
    assert_eq!(a.code.as_deref(), Some("unavailable"), "{a:?}");
}

/// Waits until every order is terminal; returns each one's status.
fn wait_terminal(base: &str, ids: &[String]) -> BTreeMap<String, String> {
    let mut statuses = BTreeMap::new();
    wait_until(Duration::from_secs(180), "every order terminal", || {
        for id in ids {
            if statuses.get(id).is_some_and(|s: &String| is_terminal(s)) {
                continue;
            }
            if let Some(view) = order_view(base, id) {
                statuses.insert(id.clone(), view["status"].as_str().unwrap().to_owned());
            }
        }
        statuses.len() == ids.len() && statuses.values().all(|s| is_terminal(s))
    });
    statuses
}

/// Waits for the process to exit by itself; returns its status.
fn wait_exit(server: &mut support::Server, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if server.child.try_wait().unwrap().is_some() {
            return server.wait(); // and the output is complete
        }
        assert!(
            Instant::now() < deadline,
            "the process did not stop; output:\n{}",
            server.output_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_stock_conserved(base: &str, sku: &str, initial: u64, sold: u64) {
    let s = support::stock(base, sku);
    assert_eq!(s["sold"], sold, "{sku}: {s}");
    assert_eq!(
        s["available"].as_u64().unwrap() + s["reserved"].as_u64().unwrap() + sold,
        initial,
        "{sku}: {s}"
    );
}

/// The real binary with its data directory on a small disk that fills up
/// with orders in flight: intake answers 503 (with `Retry-After`, code
/// `unavailable`) and the instance stays up for longer than any bounded
/// retry would last; once space is freed, intake accepts at once and every
/// order acknowledged before and after ends terminal, with stock
/// conserved. Afterwards every segment holds only whole, valid records and
/// a restart finds nothing torn.
#[test]
fn full_disk_answers_503_then_resumes_when_space_is_freed() {
    const SKU: &str = "SKU-DF";
    const STOCK: u64 = 100_000;
    let disk = Tmpfs::mount("8m");
    let data = disk.path().join("data");
    let scratch = tempfile::tempdir().unwrap();
    // Slow payments: their results come back while the disk is full.
    let config = scratch.path().join("orderflow.toml");
    std::fs::write(&config, "[gateway]\nlatency_ms = 500\n").unwrap();
    let env = [("ORDERFLOW_CONFIG", config.to_str().unwrap())];
    let mut server = start_server(&data, &env);
    let base = server.base.clone();
    set_stock(&base, SKU, STOCK);

    let mut acked = Vec::new();
    for i in 0..20 {
        let id = format!("ord-before-{i}");
        place(&base, &id, SKU, "tok_visa");
        acked.push(id);
    }

    let filler = disk.fill();
    // Pages the files already had take a few more records; then 503.
    let mut refused = None;
    for i in 0..2_000 {
        let id = format!("ord-full-{i}");
        let a = post(&base, &order(&id, SKU, "tok_visa")).expect("the server answers");
        match a.status {
            202 => acked.push(id),
            _ => {
                refused = Some(a);
                break;
            }
        }
    }
    let refused = refused.expect("intake refused an order on the full disk");
    assert_unavailable(&refused);

    // Longer than the store's bounded retries (about 10 s) would let a
    // checkpoint or a sink keep failing before the instance gave up.
    let full_until = Instant::now() + Duration::from_secs(12);
    let mut i = 0;
    while Instant::now() < full_until {
        assert!(
            server.child.try_wait().unwrap().is_none(),
            "the process stopped on a full disk; output:\n{}",
            server.output_text()
        );
        let id = format!("ord-still-full-{i}");
        let a = post(&base, &order(&id, SKU, "tok_visa")).expect("the server answers");
        if a.status == 202 {
            acked.push(id); // a page freed by a rollback
        } else {
            assert_unavailable(&a);
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    let output = server.output_text();
    assert!(
        output.contains("the disk is full; rolled back to the last durable record"),
        "the log met the full disk; output:\n{output}"
    );
    assert!(
        output.contains("append failed; retrying until the log takes writes again"),
        "the pipeline waited for the log; output:\n{output}"
    );

    std::fs::remove_file(filler).unwrap();
    // The log and the store notice the freed space on their next attempt
    // (the store reopens its database): until then intake answers 503 with
    // Retry-After, as a client must expect, and then accepts again.
    wait_until(Duration::from_secs(15), "intake accepting again", || {
        let a = post(&base, &order("ord-after-0", SKU, "tok_visa")).expect("the server answers");
        if a.status != 202 {
            assert_unavailable(&a);
        }
        a.status == 202
    });
    acked.push("ord-after-0".to_owned());
    for i in 1..20 {
        let id = format!("ord-after-{i}");
        place(&base, &id, SKU, "tok_visa");
        acked.push(id);
    }

    let statuses = wait_terminal(&base, &acked);
    assert!(statuses.values().all(|s| s == "confirmed"), "{statuses:?}");
    // Orders refused with 503 may still be in the log (a batch partly
    // published before a segment roll): count what was sold, not what was
    // acknowledged, and check that nothing else moved.
    let sold = support::stock(&base, SKU)["sold"].as_u64().unwrap();
    assert!(sold >= acked.len() as u64);
    assert_stock_conserved(&base, SKU, STOCK, sold);
    assert!(server.child.try_wait().unwrap().is_none());
    assert!(server.terminate().success(), "{}", server.output_text());

    assert!(assert_segments_whole(&data.join("log")) > 0);
    let restarted = start_server(&data, &env);
    assert_eq!(wait_terminal(&restarted.base, &acked), statuses);
    assert_stock_conserved(&restarted.base, SKU, STOCK, sold);
    let output = restarted.output_text();
    assert!(
        !output.contains("truncated a torn tail"),
        "a torn record was left behind; output:\n{output}"
    );
}

/// An fsync error (injected) with the pipeline idle: the next order answers
/// 503, the process stops by itself with a non-zero status and says why
/// ("fsync failed on …: the log cannot be trusted; stopping"), and after a
/// restart without the fault every order acknowledged before is there with
/// its terminal status, and new orders are taken.
#[test]
fn fsync_error_stops_the_process_and_restart_keeps_acknowledged_orders() {
    let disk = Tmpfs::mount("8m");
    let data = disk.path().join("data");
    let faults = tempfile::tempdir().unwrap();
    let faults_env = faults.path().to_str().unwrap();
    let mut server = start_server(&data, &[("ORDERFLOW_DEBUG_LOG_FAULTS", faults_env)]);
    let base = server.base.clone();
    set_stock(&base, "SKU-DECLINE", 100);
    // Orders that end with nothing left to append (no capture or void
    // follows), so the order posted after the fault is what meets it.
    let mut acked = Vec::new();
    for i in 0..6 {
        let id = format!("ord-declined-{i}");
        place(&base, &id, "SKU-DECLINE", "tok_chargeDeclined");
        acked.push(id);
    }
    for i in 0..4 {
        let id = format!("ord-no-stock-{i}");
        place(&base, &id, "SKU-NONE", "tok_visa");
        acked.push(id);
    }
    let before = wait_terminal(&base, &acked);
    assert!(
        before
            .values()
            .all(|s| s == "payment_declined" || s == "out_of_stock")
    );

    std::fs::write(faults.path().join("fsync"), b"").unwrap();
    let a = post(&base, &order("ord-at-fault", "SKU-DECLINE", "tok_visa"))
        .expect("the server answers the order that meets the fault");
    assert_unavailable(&a);

    let status = wait_exit(&mut server, Duration::from_secs(60));
    let output = server.output_text();
    assert!(!status.success(), "exit {status}; output:\n{output}");
    assert!(
        output.contains("fsync failed on ")
            && output.contains("the log cannot be trusted; stopping")
            && output.contains("stopped after a fatal error"),
        "output:\n{output}"
    );

    std::fs::remove_file(faults.path().join("fsync")).unwrap();
    let restarted = start_server(&data, &[]);
    assert_eq!(wait_terminal(&restarted.base, &acked), before);
    place(
        &restarted.base,
        "ord-after-restart",
        "SKU-DECLINE",
        "tok_visa",
    );
    let after = wait_terminal(&restarted.base, &["ord-after-restart".to_owned()]);
    assert_eq!(after["ord-after-restart"], "confirmed");
}

/// An fsync error (injected) while payments are in flight: whatever meets
/// it first, intake stops accepting, the process stops by itself with the
/// fsync message, and after a restart every order acknowledged before
/// ends terminal (payments finish under the same idempotency keys), with
/// stock conserved.
#[test]
fn fsync_error_with_orders_in_flight_loses_nothing_acknowledged() {
    const SKU: &str = "SKU-INFLIGHT";
    const STOCK: u64 = 1_000;
    let disk = Tmpfs::mount("8m");
    let data = disk.path().join("data");
    let faults = tempfile::tempdir().unwrap();
    let config = faults.path().join("orderflow.toml");
    std::fs::write(&config, "[gateway]\nlatency_ms = 300\n").unwrap();
    let fault_dir = faults.path().join("faults");
    std::fs::create_dir(&fault_dir).unwrap();
    let mut server = start_server(
        &data,
        &[
            ("ORDERFLOW_CONFIG", config.to_str().unwrap()),
            ("ORDERFLOW_DEBUG_LOG_FAULTS", fault_dir.to_str().unwrap()),
        ],
    );
    let base = server.base.clone();
    set_stock(&base, SKU, STOCK);
    let mut acked = Vec::new();
    for i in 0..20 {
        let id = format!("ord-inflight-{i}");
        place(&base, &id, SKU, "tok_visa");
        acked.push(id);
    }

    std::fs::write(fault_dir.join("fsync"), b"").unwrap();
    for i in 0..200 {
        let id = format!("ord-racing-{i}");
        match post(&base, &order(&id, SKU, "tok_visa")) {
            Some(a) if a.status == 202 => acked.push(id),
            Some(a) => {
                assert_eq!(a.status, 503, "{a:?}");
                assert!(a.retry_after.is_some(), "{a:?}");
                break;
            }
            None => break,
        }
    }
    let status = wait_exit(&mut server, Duration::from_secs(60));
    let output = server.output_text();
    assert!(!status.success(), "exit {status}; output:\n{output}");
    assert!(
        output.contains("fsync failed on ")
            && output.contains("the log cannot be trusted; stopping"),
        "output:\n{output}"
    );

    std::fs::remove_file(fault_dir.join("fsync")).unwrap();
    let restarted = start_server(&data, &[("ORDERFLOW_CONFIG", config.to_str().unwrap())]);
    let statuses = wait_terminal(&restarted.base, &acked);
    assert!(statuses.values().all(|s| s == "confirmed"), "{statuses:?}");
    let sold = support::stock(&restarted.base, SKU)["sold"]
        .as_u64()
        .unwrap();
    assert!(sold >= acked.len() as u64);
    assert_stock_conserved(&restarted.base, SKU, STOCK, sold);
}
