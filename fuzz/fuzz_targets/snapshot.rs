//! The snapshot loader `stages::snapshot::restore`. Input: a manifest and
//! the blobs it lists, as `len: u32 LE | bytes`, repeated (the first field
//! is the manifest of partition 0, the others are its blobs in
//! `Manifest::blobs` order). Bad bytes must be an error, never a panic; a
//! state it accepts keeps the stock invariants the processor asserts (or
//! the first record touching it would panic) and snapshots back to itself.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use orderflow::stages::finished::FinishedLimits;
use orderflow::stages::snapshot::{self, Manifest};

fn take<'a>(data: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, rest) = data.split_first_chunk::<4>()?;
    let len = u32::from_le_bytes(*len) as usize;
    let field = rest.get(..len)?;
    *data = &rest[len..];
    Some(field)
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let Some(manifest) = take(&mut rest) else {
        return;
    };
    let Ok(manifest) = Manifest::decode(0, manifest) else {
        return;
    };
    let mut blobs = BTreeMap::new();
    for blob in manifest.blobs() {
        let Some(bytes) = take(&mut rest) else { break };
        blobs.insert(blob, bytes.to_vec());
    }
    let limits = FinishedLimits {
        max_age_ms: u64::MAX / 4,
        max_entries: 1 << 20,
    };
    let Ok(state) = snapshot::restore(&manifest, &blobs, limits) else {
        return;
    };
    state.check_stock().expect("a loaded state keeps the stock invariants");
    let (again, again_blobs) = snapshot::full(&state, 0);
    let back = snapshot::restore(&again, &again_blobs, limits).expect("a state's own snapshot loads");
    assert_eq!(back, state);
    assert_eq!(back.hash(), state.hash());
});
