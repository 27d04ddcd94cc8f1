//! The MessagePack decoders of what orderflow reads back from its logs:
//! `Envelope` (internal messages on `orders`) and `StatusEvent`
//! (`order-status`). Whatever decodes must survive its own round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orderflow::domain::{Envelope, StatusEvent};

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::decode(data) {
        assert_eq!(Envelope::decode(&env.encode()).as_ref(), Ok(&env));
    }
    if let Ok(event) = StatusEvent::decode(data) {
        assert_eq!(StatusEvent::decode(&event.encode()).as_ref(), Ok(&event));
    }
});
