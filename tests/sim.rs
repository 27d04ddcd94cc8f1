//! `orderflow sim` end to end: the real binary runs seeds of the
//! deterministic simulation, at least 10,000 crash points in total, and a
//! bad argument is a usage error.

use std::process::Command;

fn sim(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_orderflow"))
        .arg("sim")
        .args(args)
        .output()
        .expect("run orderflow sim")
}

/// The value of `key=` in the summary line that starts with `prefix`.
fn field(stdout: &str, prefix: &str, key: &str) -> u64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{stdout}"));
    let value = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line}"));
    value.parse().expect("a number")
}

/// 36 seeds of 3,500 steps keep every invariant through over 10,000 crash points.
#[test]
fn ten_thousand_crash_points_keep_the_invariants() {
    let out = sim(&[
        "--seed",
        "1",
        "--seeds",
        "36",
        "--steps",
        "3500",
        "--partitions",
        "4",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with("sim seed="))
            .count(),
        36
    );
    let crash_points = field(&stdout, "sim total", "crash_points");
    let torn_writes = field(&stdout, "sim total", "torn_writes");
    println!("crash points: {crash_points}, torn writes: {torn_writes}");
    assert!(crash_points >= 10_000, "only {crash_points} crash points");
    assert!(torn_writes > 0);
}

/// A seed prints the same summary twice (elapsed time aside).
#[test]
fn a_seed_prints_the_same_summary() {
    let summary = || {
        let out = sim(&["--seed", "42", "--steps", "1500", "--partitions", "3"]);
        assert!(out.status.success());
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = stdout.lines().next().expect("a summary line").to_owned();
        line.split(" elapsed_ms=").next().unwrap().to_owned()
    };
    assert_eq!(summary(), summary());
}

/// Limits are explicit usage errors (exit 2).
#[test]
fn limits_are_usage_errors() {
    for args in [
        &["--steps", "1000001"][..],
        &["--partitions", "0"],
        &["--partitions", "65"],
        &["--seeds", "0"],
    ] {
        let out = sim(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("error:"));
    }
}
