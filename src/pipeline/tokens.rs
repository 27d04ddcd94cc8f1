//! Tracking tokens, derived rather than stored (docs/design.md, "Intake and
//! tracking tokens"): `base64url(HMAC-SHA256(key, "orderflow tracking
//! token\n" + order_id))`, 43 characters. Every instance with the key
//! computes the same token for the same order id, so a repeated request
//! gets the first answer again without any store round trip, and a
//! presented token is checked by recomputing it and comparing in constant
//! time.
//!
//! Keys: the current one signs; a previous one (during a rotation) is
//! accepted too. Neither is ever logged or printed.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Shortest key accepted from the environment or a file.
pub const MIN_KEY_BYTES: usize = 32;
/// Length of a token (256 bits in base64url without padding).
pub const TOKEN_CHARS: usize = 43;
const DOMAIN: &[u8] = b"orderflow tracking token\n";

/// The keys tokens are made and checked with.
#[derive(Clone)]
pub struct TokenKeys {
    current: Vec<u8>,
    previous: Option<Vec<u8>>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("current", &"<redacted>")
            .field("previous", &self.previous.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A key shorter than [`MIN_KEY_BYTES`]: named by where it came from, never shown.
#[derive(thiserror::Error, Debug)]
#[error(
    "the tracking token key from {source_name} has {len} bytes; at least {MIN_KEY_BYTES} are needed"
)]
pub struct ShortKey {
    pub source_name: String,
    pub len: usize,
}

impl TokenKeys {
    /// Keys of at least [`MIN_KEY_BYTES`] each; `source` names them in errors.
    pub fn new(
        current: Vec<u8>,
        previous: Option<Vec<u8>>,
        source: &str,
    ) -> Result<TokenKeys, ShortKey> {
        for (which, key) in [("current", Some(&current)), ("previous", previous.as_ref())] {
            if let Some(key) = key
                && key.len() < MIN_KEY_BYTES
            {
                return Err(ShortKey {
                    source_name: format!("{source} ({which})"),
                    len: key.len(),
                });
            }
        }
        Ok(TokenKeys { current, previous })
    }

    /// The token of `order_id` under the current key.
    pub fn token(&self, order_id: &str) -> String {
        URL_SAFE_NO_PAD.encode(mac(&self.current, order_id))
    }

    /// Whether `presented` is `order_id`'s token under the current or the
    /// previous key. Constant time in the token's content.
    pub fn verify(&self, order_id: &str, presented: &str) -> bool {
        let Ok(raw) = URL_SAFE_NO_PAD.decode(presented.as_bytes()) else {
            return false;
        };
        if raw.len() != 32 {
            return false;
        }
        let current = mac(&self.current, order_id).ct_eq(raw.as_slice());
        let previous = match &self.previous {
            Some(key) => mac(key, order_id).ct_eq(raw.as_slice()),
            None => subtle::Choice::from(0),
        };
        (current | previous).into()
    }
}

fn mac(key: &[u8], order_id: &str) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(DOMAIN);
    mac.update(order_id.as_bytes());
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(current: u8, previous: Option<u8>) -> TokenKeys {
        TokenKeys::new(vec![current; 32], previous.map(|p| vec![p; 32]), "test").unwrap()
    }

    /// The same id gives the same token on any instance with the key;
    /// other ids and other keys do not verify.
    #[test]
    fn derived_tokens_verify() {
        let a = keys(1, None);
        let t = a.token("ord-1");
        assert_eq!(t.len(), TOKEN_CHARS);
        assert_eq!(t, keys(1, None).token("ord-1"));
        assert!(a.verify("ord-1", &t));
        assert!(!a.verify("ord-2", &t));
        assert!(!keys(2, None).verify("ord-1", &t));
        for bad in ["", "x", &t[..42], &format!("{t}A"), "!!!"] {
            assert!(!a.verify("ord-1", bad), "{bad:?}");
        }
    }

    /// During a rotation tokens of both keys verify; new ones use the new key.
    #[test]
    fn rotation_accepts_the_previous_key() {
        let old = keys(1, None);
        let rotated = keys(2, Some(1));
        let old_token = old.token("ord-1");
        assert!(rotated.verify("ord-1", &old_token));
        assert_ne!(rotated.token("ord-1"), old_token);
        assert!(rotated.verify("ord-1", &rotated.token("ord-1")));
        assert!(
            !keys(2, None).verify("ord-1", &old_token),
            "after the rotation ends"
        );
    }

    /// Short keys are refused naming their source, never their bytes.
    #[test]
    fn short_keys_are_refused() {
        let e =
            TokenKeys::new(b"short-secret".to_vec(), None, "ORDERFLOW_TOKEN_SECRET").unwrap_err();
        let text = e.to_string();
        assert!(text.contains("ORDERFLOW_TOKEN_SECRET") && text.contains("12 bytes"));
        assert!(!text.contains("short-secret"));
        assert!(TokenKeys::new(vec![0; 32], Some(vec![0; 31]), "f").is_err());
        assert!(!format!("{:?}", keys(7, Some(8))).contains('7'));
    }
}
