//! The embedded log's frame decoder over a whole segment's bytes, the way
//! the reader walks a segment: frame after frame until one is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orderflow::pipeline::log::embedded::segment::decode_frame;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while !rest.is_empty() {
        let Ok((record, used)) = decode_frame(rest) else {
            break;
        };
        assert!(used > 0 && used <= rest.len(), "a frame took {used} of {} bytes", rest.len());
        assert!(record.key.len() + record.value.len() < used);
        rest = &rest[used..];
    }
});
