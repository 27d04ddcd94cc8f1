//! The customer tracking page (`GET /track/{id}?token=T`) end to end in
//! headless Chromium, driven over WebDriver (fantoccini → chromedriver):
//! the real binary with a slow payment gateway, an order opened in the
//! browser before it completes, followed live over SSE to `confirmed`
//! without a reload; the timeline, the page's security headers, and the
//! one 404 page for a wrong token, a missing token and an unknown order.
//!
//! Needs Debian's `chromium` and `chromium-driver`, which `./scripts/test`
//! installs. Set `ORDERFLOW_UPDATE_SCREENSHOTS=1` to write the screenshot
//! to `docs/tracking-page.png` (otherwise it goes to the target dir only).

mod support;

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{order_body, set_stock, start_server};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM_ARGS: [&str; 8] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
];
/// Each gateway call takes this long, so the order stays `reserved` for a
/// while after it is placed.
const GATEWAY_LATENCY_MS: u64 = 2000;
const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(25);
const SKU: &str = "SKU-TRACK";
const ORDER_ID: &str = "ord-1001";

fn require(binary: &str, package: &str) {
    assert!(
        Path::new(binary).exists(),
        "{binary} is missing: run the tests through ./scripts/test, which installs \
         Debian's `{package}` package (this test never skips)"
    );
}

/// A `chromedriver --port=PORT` this test started; quits its browsers and
/// ends when dropped.
struct ChromeDriver {
    child: Child,
    url: String,
    log: PathBuf,
}

impl ChromeDriver {
    fn start(log: PathBuf) -> ChromeDriver {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let out = File::create(&log).expect("chromedriver log file");
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let driver = ChromeDriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        };
        let http = support::client();
        let deadline = Instant::now() + DEADLINE;
        loop {
            let ready = http
                .get(format!("{}/status", driver.url))
                .send()
                .ok()
                .and_then(|r| r.json::<Value>().ok())
                .is_some_and(|v| v["value"]["ready"] == true);
            if ready {
                return driver;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not answer /status; its log:\n{}",
                driver.log_text()
            );
            std::thread::sleep(POLL);
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // `/shutdown` quits the browsers of open sessions, also of a
        // session that a failed assertion left behind.
        let _ = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .and_then(|c| c.get(format!("{}/shutdown", self.url)).send());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn open_browser(driver: &ChromeDriver, profile: &Path) -> Client {
    let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| a.to_string()).collect();
    args.push(format!("--user-data-dir={}", profile.display()));
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
    });
    let Value::Object(caps) = caps else {
        unreachable!()
    };
    let browser = ClientBuilder::new(HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "no WebDriver session: {e}; chromedriver's log:\n{}",
                driver.log_text()
            )
        });
    browser
        .set_window_size(800, 720)
        .await
        .expect("window size");
    browser
}

async fn js(browser: &Client, script: &str) -> Value {
    browser
        .execute(script, Vec::new())
        .await
        .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

/// What the page shows now.
const READ_PAGE: &str = r##"
const root = document.getElementById("order");
return {
  status: root.dataset.status,
  final: root.dataset.final,
  text: document.getElementById("status-text").textContent,
  phase: document.getElementById("status-phase").textContent,
  live: document.getElementById("live").textContent,
  reasonHidden: document.getElementById("status-reason").hidden,
  timeline: Array.from(document.querySelectorAll("#timeline > li")).map(li => ({
    seq: Number(li.dataset.seq),
    status: li.dataset.status,
    at: li.querySelector("time").getAttribute("datetime"),
    text: li.textContent,
  })),
  marker: window.__marker === 1,
  navigations: performance.getEntriesByType("navigation").length,
  url: location.href,
};
"##;

#[test]
fn tracking_page_follows_an_order_live_in_chromium() {
    require(CHROMIUM, "chromium");
    require(CHROMEDRIVER, "chromium-driver");

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("orderflow.toml");
    std::fs::write(
        &config,
        format!("partitions = 2\n[gateway]\nlatency_ms = {GATEWAY_LATENCY_MS}\n"),
    )
    .unwrap();
    let server = start_server(
        &dir.path().join("data"),
        &[("ORDERFLOW_CONFIG", config.to_str().unwrap())],
    );
    set_stock(&server.base, SKU, 10);

    let driver = ChromeDriver::start(dir.path().join("chromedriver.log"));
    let profile = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // The browser is up before the order is placed, so the page opens
        // while the payment call is still running.
        let browser = open_browser(&driver, profile.path()).await;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let base = server.base.as_str();

        let accepted: Value = {
            let res = http
                .post(format!("{base}/v1/orders"))
                .json(&order_body(ORDER_ID, SKU, 2))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::ACCEPTED);
            res.json().await.unwrap()
        };
        let token = accepted["tracking_token"].as_str().unwrap().to_owned();
        let page_url = format!("{base}/track/{ORDER_ID}?token={token}");

        browser
            .goto(&page_url)
            .await
            .expect("open the tracking page");
        let first = js(&browser, &format!("window.__marker = 1;\n{READ_PAGE}")).await;
        let status = first["status"].as_str().unwrap();
        assert!(
            ["accepted", "reserved", "paid"].contains(&status),
            "the page should open before the order completes: {first:#}"
        );
        assert_eq!(first["final"], "false", "{first:#}");
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let png = browser.screenshot().await.expect("screenshot");
        std::fs::write(tmp.join("tracking-page-in-progress.png"), png).unwrap();

        // Live updates: wait for `confirmed` in the DOM, without a reload.
        let deadline = Instant::now() + DEADLINE;
        let done = loop {
            let now = js(&browser, READ_PAGE).await;
            if now["status"] == "confirmed" {
                break now;
            }
            assert!(
                Instant::now() < deadline,
                "the page never showed `confirmed`: {now:#}"
            );
            tokio::time::sleep(POLL).await;
        };
        assert_eq!(done["marker"], true, "the page was reloaded: {done:#}");
        assert_eq!(done["navigations"], 1, "{done:#}");
        assert_eq!(done["url"], page_url.as_str());
        assert_eq!(
            browser.current_url().await.unwrap().as_str(),
            page_url.as_str()
        );
        assert_eq!(done["final"], "true");
        assert_eq!(done["text"], "confirmed");
        assert_eq!(done["phase"], "(final)");
        assert_eq!(done["live"], "This is the final status.");
        assert_eq!(done["reasonHidden"], true);

        // The timeline: accepted → reserved → paid → confirmed, seq 1..4,
        // times in order.
        let timeline = done["timeline"].as_array().unwrap();
        let statuses: Vec<&str> = timeline
            .iter()
            .map(|e| e["status"].as_str().unwrap())
            .collect();
        assert_eq!(statuses, ["accepted", "reserved", "paid", "confirmed"]);
        let seqs: Vec<u64> = timeline
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
        let times: Vec<&str> = timeline.iter().map(|e| e["at"].as_str().unwrap()).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
        for e in timeline {
            let text = e["text"].as_str().unwrap();
            assert!(text.contains(e["status"].as_str().unwrap()), "{text}");
            assert!(text.contains(" UTC"), "{text}");
        }
        // The page agrees with the API.
        let api: Value = http
            .get(format!("{base}/v1/orders/{ORDER_ID}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let api_times: Vec<&str> = api["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["at"].as_str().unwrap())
            .collect();
        assert_eq!(api_times, times);

        // Markup, styles under the CSP nonce, nothing fetched elsewhere.
        let page = js(
            &browser,
            r#"
            const status = document.getElementById("status");
            return {
              lang: document.documentElement.lang,
              h1: document.querySelector("h1").textContent,
              h2: Array.from(document.querySelectorAll("h2")).map(h => h.textContent),
              live: status.getAttribute("aria-live"),
              ol: document.getElementById("timeline").tagName,
              border: getComputedStyle(status).borderLeftWidth,
              noscript: document.querySelectorAll("noscript").length,
              resources: performance.getEntriesByType("resource").map(r => r.name),
            };
            "#,
        )
        .await;
        assert_eq!(page["lang"], "en");
        assert_eq!(page["h1"], format!("Order {ORDER_ID}"));
        assert_eq!(page["h2"], json!(["Current status", "Timeline"]));
        assert_eq!(page["live"], "polite");
        assert_eq!(page["ol"], "OL");
        assert_eq!(page["border"], "10px", "the page's style did not apply");
        assert_eq!(page["noscript"], 1);
        for r in page["resources"].as_array().unwrap() {
            let r = r.as_str().unwrap();
            assert!(r.starts_with(&format!("{base}/")), "fetched {r}");
        }

        let png = browser.screenshot().await.expect("screenshot");
        assert!(png.starts_with(b"\x89PNG"));
        std::fs::write(tmp.join("tracking-page.png"), &png).unwrap();
        if std::env::var_os("ORDERFLOW_UPDATE_SCREENSHOTS").is_some_and(|v| v == "1") {
            let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
            std::fs::create_dir_all(&docs).unwrap();
            std::fs::write(docs.join("tracking-page.png"), &png).unwrap();
        }

        // Headers of the page: a fresh nonce per answer, used by its tags.
        let mut nonces = Vec::new();
        for _ in 0..2 {
            let res = http.get(&page_url).send().await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            let h = res.headers().clone();
            assert_eq!(h["content-type"], "text/html; charset=utf-8");
            assert_eq!(h["x-content-type-options"], "nosniff");
            assert_eq!(h["referrer-policy"], "no-referrer");
            assert_eq!(h["cache-control"], "no-store");
            let csp = h["content-security-policy"].to_str().unwrap().to_owned();
            let nonce = csp
                .split("script-src 'nonce-")
                .nth(1)
                .and_then(|s| s.split('\'').next())
                .unwrap_or_else(|| panic!("no script nonce in {csp}"))
                .to_owned();
            assert!(csp.contains(&format!("style-src 'nonce-{nonce}'")), "{csp}");
            assert!(csp.starts_with("default-src 'self';"), "{csp}");
            assert!(!csp.contains("unsafe-inline"), "{csp}");
            let body = res.text().await.unwrap();
            assert!(body.contains(&format!("<script nonce=\"{nonce}\">")));
            assert!(body.contains(&format!("<style nonce=\"{nonce}\">")));
            nonces.push(nonce);
        }
        assert_ne!(nonces[0], nonces[1], "the nonce must change per answer");

        // One 404 page, byte for byte, whatever was wrong.
        let unknown = "ord-does-not-exist";
        let mut answers = Vec::new();
        for url in [
            format!("{base}/track/{unknown}"),
            format!("{base}/track/{unknown}?token={token}"),
            format!("{base}/track/{ORDER_ID}"),
            format!("{base}/track/{ORDER_ID}?token="),
            format!("{base}/track/{ORDER_ID}?token=wrong-{token}"),
            format!(
                "{base}/track/{ORDER_ID}?token={}",
                &token[..token.len() - 1]
            ),
        ] {
            let res = http.get(&url).send().await.unwrap();
            let status = res.status();
            let h = res.headers().clone();
            assert_eq!(h["content-type"], "text/html; charset=utf-8", "{url}");
            assert_eq!(h["x-content-type-options"], "nosniff");
            assert_eq!(h["referrer-policy"], "no-referrer");
            assert_eq!(h["cache-control"], "no-store");
            let csp = h["content-security-policy"].to_str().unwrap().to_owned();
            answers.push((status, csp, res.bytes().await.unwrap()));
        }
        for a in &answers {
            assert_eq!(a.0, StatusCode::NOT_FOUND);
            assert_eq!(a, &answers[0], "every refusal must be the same page");
        }
        // And in the browser: the wrong token shows exactly what an
        // unknown order shows.
        let shown = async |url: String| {
            browser.goto(&url).await.unwrap();
            js(
                &browser,
                "return [document.querySelector('h1').textContent, \
                 document.documentElement.outerHTML];",
            )
            .await
        };
        let wrong = shown(format!("{base}/track/{ORDER_ID}?token=wrong")).await;
        let missing = shown(format!("{base}/track/{unknown}?token={token}")).await;
        assert_eq!(wrong[0], "Order not found");
        assert_eq!(wrong, missing);

        browser.close().await.expect("close the browser");
    });
}
