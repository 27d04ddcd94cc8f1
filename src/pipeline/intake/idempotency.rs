//! Order ids intake settles: derived from an `Idempotency-Key` (the same
//! key of the same customer is the same order, on any instance, after any
//! restart) or made up, in letters only so that no made-up id can look like
//! a card number.

use sha2::{Digest, Sha256};

/// Longest `Idempotency-Key` accepted (printable ASCII only).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// The id an `Idempotency-Key` stands for, for one customer:
/// `"idem-"` + the first 128 bits of `sha256(customer_id + "\n" + key)` in letters. Deterministic,
/// so a retry after a restart (or on another instance) finds the same order.
pub fn idempotency_order_id(customer_id: &str, key: &str) -> String {
    let mut h = Sha256::new();
    h.update(customer_id.as_bytes());
    h.update(b"\n");
    h.update(key.as_bytes());
    format!("idem-{}", digitless(&h.finalize()[..16]))
}

/// Letters only, 5 bits each (a–z, A–F): a server-made id must never hold a
/// run of digits that the card-number check could take for a PAN (hex ids
/// did, about 1 in 600).
fn digitless(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyzABCDEF";
    let mut out = String::with_capacity(bytes.len() * 8 / 5 + 1);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((acc >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((acc << (5 - bits)) & 31) as usize]));
    }
    out
}

/// True for an acceptable `Idempotency-Key`: 1 to 255 printable ASCII chars.
pub fn valid_idempotency_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_IDEMPOTENCY_KEY_LEN
        && key.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// A fresh order id: `"ord-"` + 128 random bits in letters (26 chars).
pub fn random_order_id() -> String {
    format!("ord-{}", digitless(&rand::random::<[u8; 16]>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Server-made order ids never look like a card number (they hold no
    /// digits at all), so the processor never rejects them as `pan_detected`.
    #[test]
    fn server_made_ids_hold_no_digits() {
        for _ in 0..2_000 {
            let id = random_order_id();
            assert!(crate::domain::order::valid_id(&id), "{id}");
            assert!(!id[4..].bytes().any(|b| b.is_ascii_digit()), "{id}");
        }
        let id = idempotency_order_id("cus-1", "key-1");
        assert_eq!(id, idempotency_order_id("cus-1", "key-1"));
        assert!(!id[5..].bytes().any(|b| b.is_ascii_digit()), "{id}");
        assert_eq!(id.len(), "idem-".len() + 26);
    }
}
