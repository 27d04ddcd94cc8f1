//! Tracking tokens. They are made, sealed and checked by intake (the
//! pipeline owns the intake records that hold them); this module re-exports
//! that API for the HTTP side, and documents the scheme:
//!
//! - a token is 256 random bits, base64url without padding, answered in
//!   clear once (and again, identically, for a repeated order id);
//! - the store keeps `sha256(token)`, compared in constant time
//!   ([`crate::pipeline::intake::Intake::verify_token`]);
//! - the store also keeps `token XOR HMAC-SHA256(seal_key, "seal\n" +
//!   order_id)` so the first answer can be repeated after a restart; see
//!   [`seal_token`] for why that is safe;
//! - a token is presented as `Authorization: Bearer T` or `?token=T`
//!   ([`crate::http::auth::presented_token`]).

pub use crate::pipeline::intake::{
    SEAL_SECRET, TOKEN_BYTES, seal_token, token_digest, unseal_token,
};
