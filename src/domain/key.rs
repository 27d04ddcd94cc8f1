//! The fixed-size key of an order id, for the structures that remember
//! many orders (the processor's finished set, the tracking read model):
//! 16 bytes however long the id is, and no heap allocation per entry.

use sha2::{Digest, Sha256};

/// The first 16 bytes of SHA-256 of an order id. A cryptographic hash, so
/// that no client can craft an id that collides with another order's:
/// among a billion remembered ids, a new id collides with probability
/// below 2^-68.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OrderKey(pub [u8; 16]);

impl OrderKey {
    pub fn of(order_id: &str) -> OrderKey {
        let digest = Sha256::digest(order_id.as_bytes());
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[..16]);
        OrderKey(key)
    }

    /// 64 well-mixed bits for a hash table (the key is a hash already).
    pub fn hash64(&self) -> u64 {
        let mut low = [0u8; 8];
        low.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(low)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys are stable (part of stored snapshots) and differ between ids.
    #[test]
    fn stable_and_distinct() {
        let a = OrderKey::of("ord-1");
        assert_eq!(a, OrderKey::of("ord-1"));
        assert_ne!(a, OrderKey::of("ord-2"));
        // A changed key function would make every stored finished set useless.
        assert_eq!(hex::encode(a.0), "da724c619bef80eed591da798d33cf93");
    }
}
