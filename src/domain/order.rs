//! The order of the contract and its validation rules.
//!
//! The same code validates an order at the HTTP edge (to answer 400 at once)
//! and inside the partition processor (for orders that upstream systems
//! wrote to the log directly), so both give the same reason codes.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::pan::contains_pan;

pub const MAX_LINES: usize = 100;
pub const MAX_QUANTITY: u32 = 1_000;
pub const MAX_UNIT_PRICE: u64 = 1_000_000_000;
pub const MAX_SKU_LEN: usize = 64;
pub const MAX_ID_LEN: usize = 64;
pub const MAX_TOKEN_LEN: usize = 255;
pub const MAX_EMAIL_LEN: usize = 254;

/// Why an order was refused. The codes are part of the contract: they are
/// the `code` of a 400 problem+json and the `reason` of a `rejected` status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    MalformedJson,
    NotAnObject,
    UnknownField,
    MissingField,
    InvalidType,
    InvalidOrderId,
    InvalidCustomerId,
    InvalidCurrency,
    NoLines,
    TooManyLines,
    InvalidSku,
    InvalidQuantity,
    InvalidUnitPrice,
    PaymentTokenOnly,
    InvalidPaymentToken,
    InvalidEmail,
    PanDetected,
    DuplicateOrderId,
    /// The home partition had `processor.max_inflight_orders` in flight.
    PartitionBusy,
    /// The record could not be set aside: the park lane was at its bound.
    ParkLaneFull,
}

impl RejectReason {
    pub const ALL: [RejectReason; 20] = [
        RejectReason::MalformedJson,
        RejectReason::NotAnObject,
        RejectReason::UnknownField,
        RejectReason::MissingField,
        RejectReason::InvalidType,
        RejectReason::InvalidOrderId,
        RejectReason::InvalidCustomerId,
        RejectReason::InvalidCurrency,
        RejectReason::NoLines,
        RejectReason::TooManyLines,
        RejectReason::InvalidSku,
        RejectReason::InvalidQuantity,
        RejectReason::InvalidUnitPrice,
        RejectReason::PaymentTokenOnly,
        RejectReason::InvalidPaymentToken,
        RejectReason::InvalidEmail,
        RejectReason::PanDetected,
        RejectReason::DuplicateOrderId,
        RejectReason::PartitionBusy,
        RejectReason::ParkLaneFull,
    ];

    pub fn code(self) -> &'static str {
        match self {
            RejectReason::MalformedJson => "malformed_json",
            RejectReason::NotAnObject => "not_an_object",
            RejectReason::UnknownField => "unknown_field",
            RejectReason::MissingField => "missing_field",
            RejectReason::InvalidType => "invalid_type",
            RejectReason::InvalidOrderId => "invalid_order_id",
            RejectReason::InvalidCustomerId => "invalid_customer_id",
            RejectReason::InvalidCurrency => "invalid_currency",
            RejectReason::NoLines => "no_lines",
            RejectReason::TooManyLines => "too_many_lines",
            RejectReason::InvalidSku => "invalid_sku",
            RejectReason::InvalidQuantity => "invalid_quantity",
            RejectReason::InvalidUnitPrice => "invalid_unit_price",
            RejectReason::PaymentTokenOnly => "payment_token_only",
            RejectReason::InvalidPaymentToken => "invalid_payment_token",
            RejectReason::InvalidEmail => "invalid_email",
            RejectReason::PanDetected => "pan_detected",
            RejectReason::DuplicateOrderId => "duplicate_order_id",
            RejectReason::PartitionBusy => "partition_busy",
            RejectReason::ParkLaneFull => "park_lane_full",
        }
    }
}

/// A refused order: the reason code and a human detail. The detail names
/// fields and limits, never the offending value (it could be card data).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

impl Rejection {
    fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }
}

/// A validated order line. Money is in integer minor units.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: String,
    pub quantity: u32,
    pub unit_price: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    pub token: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

/// A validated order, in the JSON shape of the contract.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub customer_id: String,
    pub currency: String,
    pub lines: Vec<OrderLine>,
    pub payment: Payment,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contact: Option<Contact>,
}

impl Order {
    /// The home SKU: the first line's, which keys the order on the log.
    pub fn home_sku(&self) -> &str {
        &self.lines[0].sku
    }

    /// Total in minor units. Cannot overflow: 100 lines × 1,000 × 10^9 < 2^64.
    pub fn amount(&self) -> u64 {
        self.lines
            .iter()
            .map(|l| u64::from(l.quantity) * l.unit_price)
            .sum()
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an order always serializes")
    }
}

/// What the parser saw of an order before its id is settled: the validated
/// order, with `order_id` empty when the request had none.
pub struct ParsedOrder {
    pub order: Order,
    pub had_order_id: bool,
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')
}

/// `[A-Za-z0-9._-]{1,64}`, the SKU rule of the contract.
pub fn valid_sku(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SKU_LEN
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Order and customer ids: `[A-Za-z0-9._:-]{1,64}`.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_ID_LEN && s.chars().all(is_id_char)
}

/// Parses and validates an order body. PAN detection runs first, over the
/// raw bytes and over every decoded string, so a card number is refused
/// before any of it is copied.
pub fn parse_order(body: &[u8]) -> Result<ParsedOrder, Rejection> {
    if contains_pan(body) {
        return Err(pan_rejection());
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        Rejection::new(
            RejectReason::MalformedJson,
            format!(
                "body is not valid JSON (line {}, column {})",
                e.line(),
                e.column()
            ),
        )
    })?;
    if value_contains_pan(&value) {
        return Err(pan_rejection());
    }
    let Value::Object(obj) = value else {
        return Err(Rejection::new(
            RejectReason::NotAnObject,
            "an order is a JSON object",
        ));
    };
    validate_object(&obj)
}

fn pan_rejection() -> Rejection {
    Rejection::new(
        RejectReason::PanDetected,
        "the order contains a card number; pay with a token",
    )
}

/// True if any key or string inside `v` holds a card number (escapes decoded).
pub fn value_contains_pan(v: &Value) -> bool {
    match v {
        Value::String(s) => contains_pan(s.as_bytes()),
        Value::Array(a) => a.iter().any(value_contains_pan),
        Value::Object(o) => o
            .iter()
            .any(|(k, v)| contains_pan(k.as_bytes()) || value_contains_pan(v)),
        _ => false,
    }
}

fn check_fields(obj: &Map<String, Value>, allowed: &[&str], what: &str) -> Result<(), Rejection> {
    match obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) if k.len() <= MAX_ID_LEN && k.chars().all(is_id_char) => Err(Rejection::new(
            RejectReason::UnknownField,
            format!(
                "unknown field `{k}` in {what}; allowed: {}",
                allowed.join(", ")
            ),
        )),
        Some(_) => Err(Rejection::new(
            RejectReason::UnknownField,
            format!("unknown field in {what}; allowed: {}", allowed.join(", ")),
        )),
        None => Ok(()),
    }
}

fn required<'a>(obj: &'a Map<String, Value>, field: &str) -> Result<&'a Value, Rejection> {
    obj.get(field)
        .ok_or_else(|| Rejection::new(RejectReason::MissingField, format!("`{field}` is required")))
}

fn string<'a>(v: &'a Value, field: &str) -> Result<&'a str, Rejection> {
    v.as_str().ok_or_else(|| {
        Rejection::new(
            RejectReason::InvalidType,
            format!("`{field}` must be a string"),
        )
    })
}

fn object<'a>(v: &'a Value, field: &str) -> Result<&'a Map<String, Value>, Rejection> {
    v.as_object().ok_or_else(|| {
        Rejection::new(
            RejectReason::InvalidType,
            format!("`{field}` must be an object"),
        )
    })
}

fn validate_object(obj: &Map<String, Value>) -> Result<ParsedOrder, Rejection> {
    check_fields(
        obj,
        &[
            "order_id",
            "customer_id",
            "currency",
            "lines",
            "payment",
            "contact",
        ],
        "the order",
    )?;
    let (order_id, had_order_id) = match obj.get("order_id") {
        None | Some(Value::Null) => (String::new(), false),
        Some(v) => {
            let id = string(v, "order_id")?;
            if !valid_id(id) {
                return Err(Rejection::new(
                    RejectReason::InvalidOrderId,
                    "`order_id` must match [A-Za-z0-9._:-]{1,64}",
                ));
            }
            (id.to_owned(), true)
        }
    };
    let customer_id = string(required(obj, "customer_id")?, "customer_id")?;
    if !valid_id(customer_id) {
        return Err(Rejection::new(
            RejectReason::InvalidCustomerId,
            "`customer_id` must match [A-Za-z0-9._:-]{1,64}",
        ));
    }
    let currency = string(required(obj, "currency")?, "currency")?;
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(Rejection::new(
            RejectReason::InvalidCurrency,
            "`currency` must be three capital letters (ISO 4217)",
        ));
    }
    let lines = validate_lines(required(obj, "lines")?)?;
    let payment = validate_payment(required(obj, "payment")?)?;
    let contact = match obj.get("contact") {
        None | Some(Value::Null) => None,
        Some(v) => Some(validate_contact(v)?),
    };
    Ok(ParsedOrder {
        order: Order {
            order_id,
            customer_id: customer_id.to_owned(),
            currency: currency.to_owned(),
            lines,
            payment,
            contact,
        },
        had_order_id,
    })
}

fn validate_lines(v: &Value) -> Result<Vec<OrderLine>, Rejection> {
    let items = v
        .as_array()
        .ok_or_else(|| Rejection::new(RejectReason::InvalidType, "`lines` must be an array"))?;
    if items.is_empty() {
        return Err(Rejection::new(
            RejectReason::NoLines,
            "an order needs at least one line",
        ));
    }
    if items.len() > MAX_LINES {
        return Err(Rejection::new(
            RejectReason::TooManyLines,
            format!(
                "an order has at most {MAX_LINES} lines, got {}",
                items.len()
            ),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| validate_line(i, item))
        .collect()
}

fn validate_line(i: usize, item: &Value) -> Result<OrderLine, Rejection> {
    let line = object(item, &format!("lines[{i}]"))?;
    check_fields(
        line,
        &["sku", "quantity", "unit_price"],
        &format!("lines[{i}]"),
    )?;
    let sku = string(required(line, "sku")?, &format!("lines[{i}].sku"))?;
    if !valid_sku(sku) {
        return Err(Rejection::new(
            RejectReason::InvalidSku,
            format!("lines[{i}].sku must match [A-Za-z0-9._-]{{1,{MAX_SKU_LEN}}}"),
        ));
    }
    let quantity = required(line, "quantity")?
        .as_u64()
        .filter(|q| (1..=u64::from(MAX_QUANTITY)).contains(q))
        .ok_or_else(|| {
            Rejection::new(
                RejectReason::InvalidQuantity,
                format!("lines[{i}].quantity must be an integer from 1 to {MAX_QUANTITY}"),
            )
        })?;
    let unit_price = required(line, "unit_price")?
        .as_u64()
        .filter(|p| *p <= MAX_UNIT_PRICE)
        .ok_or_else(|| Rejection::new(RejectReason::InvalidUnitPrice, format!("lines[{i}].unit_price must be an integer from 0 to {MAX_UNIT_PRICE} minor units")))?;
    Ok(OrderLine {
        sku: sku.to_owned(),
        quantity: quantity as u32,
        unit_price,
    })
}

fn validate_payment(v: &Value) -> Result<Payment, Rejection> {
    let payment = object(v, "payment")?;
    if payment.keys().any(|k| k != "token") {
        return Err(Rejection::new(
            RejectReason::PaymentTokenOnly,
            "`payment` takes only a `token`; card details are never accepted",
        ));
    }
    let token = string(required(payment, "token")?, "payment.token")?;
    let ok = !token.is_empty()
        && token.len() <= MAX_TOKEN_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !ok {
        return Err(Rejection::new(
            RejectReason::InvalidPaymentToken,
            format!("`payment.token` must match [A-Za-z0-9_]{{1,{MAX_TOKEN_LEN}}}"),
        ));
    }
    Ok(Payment {
        token: token.to_owned(),
    })
}

fn validate_contact(v: &Value) -> Result<Contact, Rejection> {
    let contact = object(v, "contact")?;
    check_fields(contact, &["email"], "contact")?;
    let email = match contact.get("email") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let e = string(v, "contact.email")?;
            let ok = e.len() <= MAX_EMAIL_LEN
                && e.split_once('@').is_some_and(|(l, d)| {
                    !l.is_empty() && d.contains('.') && !d.starts_with('.') && !d.ends_with('.')
                })
                && !e.chars().any(|c| c.is_whitespace() || c.is_control());
            if !ok {
                return Err(Rejection::new(
                    RejectReason::InvalidEmail,
                    "`contact.email` must be an email address",
                ));
            }
            Some(e.to_owned())
        }
    };
    Ok(Contact { email })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"order_id":"ord-1001","customer_id":"cus-42","currency":"USD",
        "lines":[{"sku":"SKU-1","quantity":2,"unit_price":1999}],
        "payment":{"token":"tok_visa"},"contact":{"email":"ada@example.com"}}"#;

    /// The contract's example order is valid and keeps every field.
    #[test]
    fn accepts_contract_example() {
        let p = parse_order(GOOD.as_bytes()).unwrap();
        assert!(p.had_order_id);
        assert_eq!(p.order.order_id, "ord-1001");
        assert_eq!(p.order.amount(), 3998);
        assert_eq!(p.order.home_sku(), "SKU-1");
    }

    /// Each broken rule gives its own code.
    #[test]
    fn codes() {
        let cases = [
            ("{", RejectReason::MalformedJson),
            ("[]", RejectReason::NotAnObject),
            (
                r#"{"customer_id":"c","currency":"USD","lines":[],"payment":{"token":"t"}}"#,
                RejectReason::NoLines,
            ),
            (
                r#"{"customer_id":"c","currency":"usd","lines":[],"payment":{"token":"t"}}"#,
                RejectReason::InvalidCurrency,
            ),
            (
                r#"{"customer_id":"c","currency":"USD","lines":[{"sku":"a b","quantity":1,"unit_price":1}],"payment":{"token":"t"}}"#,
                RejectReason::InvalidSku,
            ),
            (
                r#"{"customer_id":"c","currency":"USD","lines":[{"sku":"a","quantity":1,"unit_price":1}],"payment":{"token":"t","card":"x"}}"#,
                RejectReason::PaymentTokenOnly,
            ),
            (
                r#"{"customer_id":"c","currency":"USD","lines":[{"sku":"a","quantity":1,"unit_price":1}],"payment":{"token":"t"},"note":"4242424242424242"}"#,
                RejectReason::PanDetected,
            ),
        ];
        for (body, want) in cases {
            assert_eq!(
                parse_order(body.as_bytes()).err().map(|r| r.reason),
                Some(want),
                "{body}"
            );
        }
    }

    /// A PAN hidden behind JSON unicode escapes is still found.
    #[test]
    fn escaped_pan() {
        let body = r#"{"customer_id":"\u0034242424242424242"}"#;
        assert_eq!(
            parse_order(body.as_bytes()).err().unwrap().reason,
            RejectReason::PanDetected
        );
    }
}
