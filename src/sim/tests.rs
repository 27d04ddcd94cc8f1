use super::*;

/// The same seed gives the same steps and the same run, hash included.
#[test]
fn a_seed_reproduces() {
    let config = SimConfig::new(7, 1_500, 3);
    assert_eq!(generate(&config), generate(&config));
    let first = run(&config).expect("seed 7 keeps every invariant");
    let again = run(&config).expect("seed 7 keeps every invariant");
    assert_eq!(first, again);
    assert!(first.stats.crash_points > 0 && first.acked > 0 && first.terminal > 0);
    let other = run(&SimConfig::new(8, 1_500, 3)).expect("seed 8 keeps every invariant");
    assert_ne!(first.state_hash, other.state_hash);
}

/// A crash that loses durable data is caught, reproduces and shrinks to a short trace.
#[test]
fn an_injected_bug_is_caught_and_shrunk() {
    let config = SimConfig {
        bug: Some(Bug::TearDurable),
        ..SimConfig::new(3, 600, 2)
    };
    let failure = run(&config).expect_err("the injected bug is caught");
    println!("{failure}");
    let v = &failure.violation;
    assert!(
        ["acknowledged-not-lost", "durable-not-lost"].contains(&v.invariant),
        "{failure}"
    );
    assert_eq!(failure.trace_violation.invariant, v.invariant);
    assert!(failure.trace.len() <= 12, "{failure}");
    let again = run_steps(&config, &failure.trace).expect_err("the trace reproduces");
    assert_eq!(again, failure.trace_violation);
    let text = failure.to_string();
    assert!(
        text.contains("reproduce: orderflow sim --seed 3 --steps 600 --partitions 2"),
        "{text}"
    );
    assert!(
        run(&SimConfig::new(3, 600, 2)).is_ok(),
        "without the bug the seed passes"
    );
}

/// A runner checkpointing before its output is durable is caught by some seed.
#[test]
fn checkpointing_unflushed_output_is_caught() {
    let caught = (1..=20).find_map(|seed| {
        let config = SimConfig {
            bug: Some(Bug::CheckpointUnflushed),
            ..SimConfig::new(seed, 800, 3)
        };
        run_steps(&config, &generate(&config)).err()
    });
    let v = caught.expect("no seed of 20 caught a checkpoint ahead of durable output");
    println!("caught: {v:?}");
}

/// Limits are explicit.
#[test]
fn limits() {
    assert!(SimConfig::new(1, MAX_STEPS + 1, 4).validate().is_err());
    assert!(SimConfig::new(1, 10, 0).validate().is_err());
    assert!(
        SimConfig::new(1, 10, MAX_PARTITIONS + 1)
            .validate()
            .is_err()
    );
    assert!(SimConfig::new(1, 10, MAX_PARTITIONS).validate().is_ok());
}

/// A production assertion that fires becomes a named violation, not an abort.
#[test]
fn a_panic_is_a_violation() {
    let breach = guarded(|| panic!("stock conservation broken")).unwrap_err();
    assert_eq!(breach.invariant, "assertion");
    assert!(breach.detail.contains("conservation"), "{breach:?}");
    assert_eq!(guarded(|| Ok(())), Ok(()));
}

fn effect(kind: crate::domain::EffectKind, payment_id: &str) -> crate::domain::Effect {
    crate::domain::Effect {
        order_id: "o1".into(),
        kind,
        reply_key: "SKU-0".into(),
        amount: 500,
        currency: "USD".into(),
        token: "tok_visa".into(),
        payment_id: payment_id.into(),
    }
}

/// The ledger replays a key's first answer, voids by order, and refuses a capture after a void.
#[test]
fn gateway_ledger() {
    use crate::domain::{EffectKind, Message, PaymentOutcome};
    let mut g = gateway::SimGateway::default();
    let first = g.execute(&effect(EffectKind::Authorize, "")).unwrap();
    assert_eq!(
        g.execute(&effect(EffectKind::Authorize, "")).unwrap(),
        first
    );
    let Message::PaymentResult {
        outcome: PaymentOutcome::Authorized { payment_id },
        ..
    } = first
    else {
        panic!("{first:?}")
    };
    assert_eq!(g.intents.len(), 1);
    g.execute(&effect(EffectKind::Void, "")).unwrap();
    assert!(g.intents[&payment_id].voided);
    let refused = g.execute(&effect(EffectKind::Capture, &payment_id));
    assert_eq!(refused.unwrap_err().invariant, "capture-at-most-once");
    assert_eq!(g.captured().0, 0);
}

/// During an outage an authorization ends payment_failed after its attempts; a capture never gives up.
#[test]
fn executor_gives_up_only_on_authorizations() {
    use crate::domain::{EffectKind, Message, PaymentOutcome};
    use rand::SeedableRng;
    let mut x = executor::Executor::default();
    let mut g = gateway::SimGateway::default();
    let mut rng = StdRng::seed_from_u64(1);
    x.submit(effect(EffectKind::Authorize, ""), 0);
    x.submit(effect(EffectKind::Capture, "pi_1"), 0);
    let mut reports = Vec::new();
    let mut now = 0;
    for _ in 0..50 {
        x.start(10, now, (0.0, true), &mut rng, &mut g).unwrap();
        now = x.next_due_ms().unwrap_or(now);
        reports.extend(x.deliver(now));
    }
    assert_eq!(g.calls, 0, "an outage executes nothing");
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert!(matches!(
        &reports[0].1,
        Message::PaymentResult {
            outcome: PaymentOutcome::Failed { .. },
            ..
        }
    ));
    assert!(!x.is_idle(), "the capture is still being retried");
}
