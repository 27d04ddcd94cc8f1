//! The order JSON parser and validator (`parse_order`), PAN detection included.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orderflow::domain::order::{MAX_LINES, parse_order};
use orderflow::domain::pan::contains_pan;

fuzz_target!(|data: &[u8]| {
    let _ = contains_pan(data);
    let Ok(parsed) = parse_order(data) else {
        return;
    };
    let mut order = parsed.order;
    assert!(!order.lines.is_empty() && order.lines.len() <= MAX_LINES);
    // Fuzz builds check overflow: the limits must keep the total in a u64.
    let _ = order.amount();
    if !parsed.had_order_id {
        // As intake does, so the order below is complete.
        order.order_id = "ord-assigned".into();
    }
    let json = order.to_json();
    // Intake appends this to the log: it must never carry a card number,
    // and the processor must read back the very order intake accepted.
    assert!(!contains_pan(&json), "an accepted order serializes with a PAN");
    let again = parse_order(&json).expect("an accepted order parses again");
    assert_eq!(again.order, order);
});
