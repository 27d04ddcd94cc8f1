//! The order record of the contract as a JSON Schema: the body of
//! `POST /v1/orders` and the value of a record an upstream producer writes
//! to `orders`. These types exist only to describe it; the rules are
//! enforced by `domain::order::parse_order`, and a test checks that the
//! two agree. `docs/order-record.schema.json` is [`json_schema`]'s output.
//!
//! What a schema cannot say: no string may hold a card number
//! (`pan_detected`), an order id already taken is the same order, and the
//! e-mail limit counts UTF-8 bytes where `maxLength` counts characters.

#![allow(dead_code)] // the fields are read by the schema derive only

use utoipa::{PartialSchema, ToSchema};

/// An order, in the JSON shape producers write. Money is in integer minor
/// units of `currency`. Integers are written without a fraction or exponent.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(title = "OrderRecord")]
pub struct OrderRecord {
    /// Chosen by the producer (retries with the same id are one order);
    /// when absent, `POST /v1/orders` derives one from `Idempotency-Key` or
    /// makes one up, and the processor takes `ord-<partition>-<offset>`.
    #[schema(pattern = r"^[A-Za-z0-9._:-]{1,64}$", nullable)]
    order_id: Option<String>,
    #[schema(pattern = r"^[A-Za-z0-9._:-]{1,64}$")]
    customer_id: String,
    /// ISO 4217, e.g. `EUR`.
    #[schema(pattern = r"^[A-Z]{3}$")]
    currency: String,
    /// The first line's SKU is the order's home: it keys the record.
    #[schema(inline, min_items = 1, max_items = 100)]
    lines: Vec<Line>,
    #[schema(inline)]
    payment: Payment,
    #[schema(inline, nullable)]
    contact: Option<Contact>,
}

#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
struct Line {
    #[schema(pattern = r"^[A-Za-z0-9._-]{1,64}$")]
    sku: String,
    #[schema(minimum = 1, maximum = 1000)]
    quantity: u32,
    /// Minor units per item.
    #[schema(minimum = 0, maximum = 1_000_000_000_u64)]
    unit_price: u64,
}

/// A payment token from the gateway's client-side tokenization; card
/// details are never accepted.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
struct Payment {
    #[schema(pattern = r"^[A-Za-z0-9_]{1,255}$")]
    token: String,
}

/// Where to send the customer's notifications.
#[derive(ToSchema)]
#[serde(deny_unknown_fields)]
struct Contact {
    /// `local@domain.tld`, no spaces or control characters, ≤ 254 bytes.
    #[schema(
        pattern = r"^[^@\s\x00-\x1f\x7f-\x9f]+@[^.\s\x00-\x1f\x7f-\x9f][^\s\x00-\x1f\x7f-\x9f]*\.[^\s\x00-\x1f\x7f-\x9f]*[^.\s\x00-\x1f\x7f-\x9f]$",
        max_length = 254,
        nullable
    )]
    email: Option<String>,
}

/// The standalone JSON Schema (2020-12) of the order record.
pub fn json_schema() -> serde_json::Value {
    let schema = serde_json::to_value(OrderRecord::schema()).expect("a schema serializes");
    let mut doc = serde_json::json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:orderflow:schema:order-record",
    });
    let (Some(doc_map), serde_json::Value::Object(fields)) = (doc.as_object_mut(), schema) else {
        unreachable!("both are objects");
    };
    doc_map.extend(fields);
    doc
}
