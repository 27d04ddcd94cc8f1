//! HTTP hardening: header, body and idle deadlines against slow clients,
//! the connection limit, the per-client rate limit and HTTPS.
//!
//! Deadlines are set to 500 ms here and every bound asserted on them is
//! generous (seconds), so a loaded machine does not fail them; lower
//! bounds are measured from before the client acted, so they hold exactly.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use orderflow::app::{App, start};
use orderflow::config::{Config, HttpConfig, Secret, TlsConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ADMIN: &str = "hardening-admin-token";
const DEADLINE: Duration = Duration::from_millis(500);
/// Longest a deadline may be overrun before a test fails: a loaded
/// machine is slow, a missing deadline is for ever.
const SLACK: Duration = Duration::from_secs(5);
const DRIP: Duration = Duration::from_millis(100);

fn config(dir: &Path, http: HttpConfig) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        http,
        ..Config::default()
    }
}

async fn start_app(dir: &Path, http: HttpConfig) -> App {
    start(config(dir, http), Some(Secret::new(ADMIN)))
        .await
        .expect("the app starts")
}

/// Reads until the peer closes (or resets) the connection, or `limit`.
/// Returns what was read and whether the peer closed.
async fn read_to_close(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let end = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(end, s.read(&mut buf)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// One value of the Prometheus text `metrics` (first series whose line
/// starts with `series`).
fn metric(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in\n{metrics}"))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A slow client cut by the server: how long its connection lived (from
/// before connecting) and how many header bytes it dripped meanwhile.
struct Cut {
    lived: Duration,
    dripped: usize,
}

/// What the slow clients share with the test.
#[derive(Default)]
struct Attack {
    stop: AtomicBool,
    /// Slow connections open now.
    open: AtomicUsize,
    /// Slow connections the server has cut so far.
    cut: AtomicUsize,
}

/// Keeps one slowloris connection open at a time until told to stop:
/// connects, starts a request head and sends one more header byte every
/// [`DRIP`], never ending the head; reconnects when the server cuts it.
async fn slowloris(addr: SocketAddr, attack: Arc<Attack>) -> Vec<Cut> {
    let mut cuts = Vec::new();
    while !attack.stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .is_err()
        {
            continue;
        }
        attack.open.fetch_add(1, Ordering::SeqCst);
        let mut dripped = 0;
        let mut buf = [0u8; 256];
        let cut = loop {
            tokio::select! {
                r = s.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break true,
                    Ok(_) => panic!("a request whose head never ended was answered"),
                },
                () = tokio::time::sleep(DRIP) => {
                    if attack.stop.load(Ordering::SeqCst) {
                        break false;
                    }
                    if s.write_all(b"a").await.is_err() {
                        break true;
                    }
                    dripped += 1;
                }
            }
        };
        attack.open.fetch_sub(1, Ordering::SeqCst);
        if cut {
            attack.cut.fetch_add(1, Ordering::SeqCst);
            cuts.push(Cut {
                lived: started.elapsed(),
                dripped,
            });
        }
    }
    cuts
}

/// Slow clients dripping header bytes are cut off at `header_timeout_ms`
/// (dripping does not extend it) while a normal client is served.
#[test]
fn slow_headers_are_cut_off_while_others_are_served() {
    const ATTACKERS: usize = 40;
    let deployment = support::Deployment::new(
        "[http]\nheader_timeout_ms = 500\nmax_connections = 256\n",
        &[],
    );
    let server = deployment.start(&[]);
    let addr: SocketAddr = server.base.trim_start_matches("http://").parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let attack = Arc::new(Attack::default());
        let attackers: Vec<_> = (0..ATTACKERS)
            .map(|_| tokio::spawn(slowloris(addr, attack.clone())))
            .collect();
        let give_up = Instant::now() + Duration::from_secs(60);
        while attack.open.load(Ordering::SeqCst) < ATTACKERS {
            assert!(Instant::now() < give_up, "the slow clients did not connect");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A normal client, during the attack and until every slow client
        // has been cut at least once: every request is answered, and the
        // server reports the attack's connections open meanwhile.
        let http = reqwest::Client::builder().timeout(SLACK).build().unwrap();
        let (mut served, mut most_open) = (0, 0.0f64);
        let attack_start = Instant::now();
        while served < 5
            || attack.cut.load(Ordering::SeqCst) < ATTACKERS
            || attack_start.elapsed() < Duration::from_millis(1500)
        {
            assert!(Instant::now() < give_up, "the slow clients were not cut");
            let r = http.get(format!("{}/healthz", server.base)).send().await;
            assert_eq!(r.expect("healthz during the attack").status(), 200);
            let text = http
                .get(format!("{}/metrics", server.base))
                .send()
                .await
                .expect("metrics during the attack")
                .text()
                .await
                .unwrap();
            most_open = most_open.max(metric(&text, "orderflow_http_connections_open"));
            served += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        attack.stop.store(true, Ordering::SeqCst);
        assert!(
            most_open >= (ATTACKERS * 3 / 4) as f64,
            "the attack held only {most_open} connections while the client was served"
        );
        let mut cuts = Vec::new();
        for a in attackers {
            cuts.extend(a.await.unwrap());
        }
        assert!(cuts.len() >= ATTACKERS, "{} cuts", cuts.len());
        for c in &cuts {
            assert!(
                c.lived >= DEADLINE,
                "cut before the deadline: {:?}",
                c.lived
            );
            assert!(c.lived <= DEADLINE + SLACK, "cut late: {:?}", c.lived);
        }
        // Bytes kept coming (an inactivity timer would never have fired),
        // yet the connections were cut.
        let dripping = cuts.iter().filter(|c| c.dripped >= 3).count();
        assert!(dripping * 2 >= cuts.len(), "{dripping} of {}", cuts.len());
        let text = http
            .get(format!("{}/metrics", server.base))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let header_timeouts = metric(&text, "orderflow_http_timeouts_total{phase=\"header\"}");
        assert!(header_timeouts >= cuts.len() as f64, "{header_timeouts}");
    });
}

/// Connections past `max_connections` are closed at once and counted,
/// and the server's file descriptors stay bounded by the limit however
/// many clients connect.
#[test]
fn connections_over_the_limit_are_refused() {
    const LIMIT: usize = 16;
    const EXTRA: usize = 100;
    let deployment = support::Deployment::new(
        &format!("[http]\nheader_timeout_ms = 60000\nmax_connections = {LIMIT}\n"),
        &[],
    );
    let server = deployment.start(&[]);
    let pid = server.child.id();
    let addr: SocketAddr = server.base.trim_start_matches("http://").parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let baseline = open_fds(pid);
        // Every connection starts a head and waits (the header deadline
        // is a minute away), so only a refusal closes one now.
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..LIMIT + EXTRA {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\n").await;
            tasks.push(tokio::spawn(async move {
                let (_, closed) = read_to_close(&mut s, Duration::from_secs(3)).await;
                (s, closed)
            }));
        }
        let mut held = Vec::new();
        let mut refused = 0;
        for t in tasks {
            let (s, closed) = t.await.unwrap();
            if closed {
                refused += 1;
            } else {
                held.push(s);
            }
        }
        assert!(held.len() <= LIMIT, "{} connections held", held.len());
        assert!(refused >= EXTRA, "only {refused} refused");
        assert!(started.elapsed() < Duration::from_secs(30));
        // All client sockets are still open on this side, yet the server
        // holds at most the limit (plus a little slack for its own files).
        let during = open_fds(pid);
        assert!(
            during <= baseline + LIMIT + 4,
            "server fds {during}, baseline {baseline}, with {} clients connected",
            LIMIT + EXTRA
        );
        drop(held);
        // Slots free again: a normal client is served, and the refusals
        // were counted.
        let http = reqwest::Client::new();
        let wait = Instant::now() + SLACK;
        let text = loop {
            if let Ok(r) = http.get(format!("{}/metrics", server.base)).send().await
                && r.status() == 200
            {
                break r.text().await.unwrap();
            }
            assert!(Instant::now() < wait, "the server did not recover");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let counted = metric(&text, "orderflow_http_connections_refused_total");
        assert!(counted >= refused as f64, "{counted} < {refused}");
    });
}

/// A keep-alive connection with no request for `idle_timeout_ms` is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let app = start_app(
        dir.path(),
        HttpConfig {
            idle_timeout_ms: 500,
            ..HttpConfig::default()
        },
    )
    .await;
    let mut s = TcpStream::connect(app.addr()).await.unwrap();
    let sent = Instant::now();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (answer, closed) = read_to_close(&mut s, DEADLINE + SLACK).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
    assert!(closed, "the idle connection was not closed");
    assert!(
        sent.elapsed() >= DEADLINE,
        "closed early: {:?}",
        sent.elapsed()
    );
    app.shutdown().await.unwrap();
}

/// A request body still arriving `body_timeout_ms` after its head answers
/// 408 `body_timeout` and closes, even though bytes keep coming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_body_answers_408() {
    let dir = tempfile::tempdir().unwrap();
    let app = start_app(
        dir.path(),
        HttpConfig {
            body_timeout_ms: 500,
            ..HttpConfig::default()
        },
    )
    .await;
    let mut s = TcpStream::connect(app.addr()).await.unwrap();
    let sent = Instant::now();
    s.write_all(
        b"POST /v1/orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"order_id\": ",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let give_up = Instant::now() + DEADLINE + SLACK;
    // Drip body bytes until the answer starts, then read it to the close.
    let closed = loop {
        assert!(Instant::now() < give_up, "no answer to the slow body");
        tokio::select! {
            r = s.read(&mut buf) => match r {
                Ok(0) | Err(_) => break true,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    let (rest, closed) = read_to_close(&mut s, SLACK).await;
                    answer.extend_from_slice(&rest);
                    break closed;
                }
            },
            () = tokio::time::sleep(DRIP) => {
                let _ = s.write_all(b" ").await;
            }
        }
    };
    let elapsed = sent.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(answer.contains("\"code\":\"body_timeout\""), "{answer}");
    assert!(closed, "the connection stayed open after the 408");
    assert!(elapsed >= DEADLINE, "408 before the deadline: {elapsed:?}");
    let text = reqwest::get(format!("http://{}/metrics", app.addr()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&text, "orderflow_http_timeouts_total{phase=\"body\"}"),
        1.0
    );
    app.shutdown().await.unwrap();
}

/// Past its burst a client gets 429 `rate_limited` with `Retry-After`
/// (probes exempt, other clients unaffected) and is served again after
/// waiting that long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers_429_then_recovers() {
    const BURST: u32 = 5;
    let dir = tempfile::tempdir().unwrap();
    let app = start_app(
        dir.path(),
        HttpConfig {
            rate_limit_per_s: 1,
            rate_limit_burst: BURST,
            ..HttpConfig::default()
        },
    )
    .await;
    let base = format!("http://{}", app.addr());
    let order = format!("{base}/v1/orders/ord-unknown?token=wrong");
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut allowed = 0u32;
    let limited = loop {
        let r = http.get(&order).send().await.unwrap();
        if r.status() == 429 {
            break r;
        }
        assert_eq!(r.status(), 404);
        allowed += 1;
        assert!(allowed < 100, "never limited");
    };
    // The burst, plus at most what refilled meanwhile (1/s).
    let refilled = started.elapsed().as_secs() as u32 + 1;
    assert!(
        (BURST..=BURST + refilled).contains(&allowed),
        "{allowed} allowed"
    );
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=1).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(
        limited.headers()["content-type"],
        "application/problem+json"
    );
    let problem: serde_json::Value = limited.json().await.unwrap();
    assert_eq!(problem["code"], "rate_limited");
    assert_eq!(problem["status"], 429);
    // Still limited; probes are not; another client (address) is not.
    assert_eq!(http.get(&order).send().await.unwrap().status(), 429);
    let health = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let other = reqwest::Client::builder()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    assert_eq!(other.get(&order).send().await.unwrap().status(), 404);
    // Waiting as told is enough.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    assert_eq!(http.get(&order).send().await.unwrap().status(), 404);
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metric(&text, "orderflow_http_rate_limited_total") >= 2.0);
    app.shutdown().await.unwrap();
}

/// A certificate authority and a `localhost` / `127.0.0.1` certificate it
/// signed, as PEM files: `(ca.pem, cert.pem, key.pem)`.
fn make_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (ca, cert, key) = support::test_ca_and_server();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert + &ca.pem()).unwrap();
    std::fs::write(&paths.2, key).unwrap();
    (paths.0, paths.1, paths.2)
}

/// Runs curl with `args`; returns its exit code and standard output.
async fn curl(args: Vec<String>) -> (i32, String) {
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["--silent", "--show-error", "--max-time", "10"])
            .args(&args)
            .output()
            .expect("curl is installed")
    })
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// With `[http.tls]` the port speaks HTTPS only: curl trusting the test CA
/// gets `/healthz`; plain HTTP and an untrusted client fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_curl() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert_path, key_path) = make_certificates(dir.path());
    let app = start_app(
        &dir.path().join("data"),
        HttpConfig {
            tls: Some(TlsConfig {
                cert_path,
                key_path,
            }),
            ..HttpConfig::default()
        },
    )
    .await;
    let port = app.addr().port();
    let https = format!("https://localhost:{port}");
    let resolve = format!("localhost:{port}:127.0.0.1");
    let trusted = |path: &str| {
        vec![
            "--cacert".to_owned(),
            ca.display().to_string(),
            "--resolve".to_owned(),
            resolve.clone(),
            format!("{https}{path}"),
        ]
    };
    let (code, body) = curl(trusted("/healthz")).await;
    assert_eq!((code, body.as_str()), (0, "ok"));
    // Plain HTTP to the TLS port: no answer (the handshake fails).
    let (code, body) = curl(vec![format!("http://127.0.0.1:{port}/healthz")]).await;
    assert_ne!(code, 0, "plain HTTP was answered: {body}");
    assert!(!body.contains("ok"), "{body}");
    // A client that does not trust the certificate refuses it (60: peer
    // certificate cannot be authenticated).
    let (code, _) = curl(vec![
        "--resolve".to_owned(),
        resolve.clone(),
        format!("{https}/healthz"),
    ])
    .await;
    assert_eq!(code, 60);
    // Still serving after both failures, which it counted.
    let (code, metrics) = curl(trusted("/metrics")).await;
    assert_eq!(code, 0);
    assert!(metric(&metrics, "orderflow_http_tls_handshake_failures_total") >= 2.0);
    app.shutdown().await.unwrap();
}

/// A TLS key or certificate that cannot be used fails the start, naming
/// the key and the file.
#[tokio::test]
async fn tls_misconfiguration_fails_start() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert_path, key_path) = make_certificates(dir.path());
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let (_, _, other_key) = make_certificates(&other);
    let cases = [
        (
            dir.path().join("missing.pem"),
            key_path.clone(),
            "http.tls.cert_path",
        ),
        (cert_path.clone(), cert_path.clone(), "http.tls.key_path"),
        (cert_path.clone(), other_key, "does not fit"),
    ];
    for (i, (cert_path, key_path, want)) in cases.into_iter().enumerate() {
        let data = dir.path().join(format!("data-{i}"));
        let e = start(
            config(
                &data,
                HttpConfig {
                    tls: Some(TlsConfig {
                        cert_path,
                        key_path,
                    }),
                    ..HttpConfig::default()
                },
            ),
            None,
        )
        .await
        .err()
        .expect("the start fails");
        let e = format!("{e:#}");
        assert!(e.contains(want), "{e} should name {want}");
    }
}
