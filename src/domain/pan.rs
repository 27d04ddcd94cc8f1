//! Card-number (PAN) detection.
//!
//! Any run of 13 to 19 digits that passes the Luhn check is treated as a card
//! number. Digits may be grouped by single spaces or dashes, as people type
//! them ("4242 4242 4242 4242"). The detector never copies the digits it
//! finds anywhere, so a caller can report "a card number was found" without
//! the number itself reaching a log.

/// Shortest and longest card numbers (ISO/IEC 7812).
pub const PAN_MIN_DIGITS: usize = 13;
pub const PAN_MAX_DIGITS: usize = 19;

/// True if `text` holds a 13–19 digit run that passes the Luhn check.
pub fn contains_pan(text: &[u8]) -> bool {
    pan_spans(text).next().is_some()
}

/// `text` with the digits of every card number in it replaced by `#`
/// (separators and everything else kept), so a record can be shown to an
/// operator without the number. `None` when it holds none.
pub fn redact_pans(text: &[u8]) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    for span in pan_spans(text) {
        let redacted = out.get_or_insert_with(|| text.to_vec());
        for b in &mut redacted[span] {
            if b.is_ascii_digit() {
                *b = b'#';
            }
        }
    }
    debug_assert!(out.as_deref().is_none_or(|r| !contains_pan(r)));
    out
}

/// The byte ranges of the card numbers in `text`, in order.
fn pan_spans(text: &[u8]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < text.len() {
            if !text[i].is_ascii_digit() {
                i += 1;
                continue;
            }
            let start = i;
            let (end, digits, count) = digit_run(text, start);
            i = end;
            if (PAN_MIN_DIGITS..=PAN_MAX_DIGITS).contains(&count) && luhn_valid(&digits[..count]) {
                return Some(start..end);
            }
        }
        None
    })
}

/// Reads the digit run starting at `start` (digits, optionally separated by
/// one space or dash). Returns the index after the run, the first digits (up
/// to one more than the longest PAN, enough to tell a run is too long) and
/// the total digit count.
fn digit_run(text: &[u8], start: usize) -> (usize, [u8; PAN_MAX_DIGITS + 1], usize) {
    let mut digits = [0u8; PAN_MAX_DIGITS + 1];
    let mut count = 0;
    let mut i = start;
    let mut end = start;
    while i < text.len() {
        let b = text[i];
        if b.is_ascii_digit() {
            if count < digits.len() {
                digits[count] = b - b'0';
            }
            count += 1;
            i += 1;
            end = i;
        } else if (b == b' ' || b == b'-') && i + 1 < text.len() && text[i + 1].is_ascii_digit() {
            i += 1;
        } else {
            break;
        }
    }
    (end, digits, count)
}

/// The Luhn (mod 10) check over decimal digit values.
pub fn luhn_valid(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, &d) in digits.iter().rev().enumerate() {
        debug_assert!(d < 10);
        let mut v = u32::from(d);
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stripe's test Visa number is a PAN, plain, grouped and embedded.
    #[test]
    fn detects_test_cards() {
        assert!(contains_pan(b"4242424242424242"));
        assert!(contains_pan(b"card 4242 4242 4242 4242 here"));
        assert!(contains_pan(b"{\"x\":\"4000-0566-5566-5556\"}"));
        assert!(contains_pan(b"378282246310005")); // Amex, 15 digits
    }

    /// Numbers that fail Luhn, are too short or too long are not PANs.
    #[test]
    fn ignores_non_pans() {
        assert!(!contains_pan(b"4242424242424241"));
        assert!(!contains_pan(b"123456789012")); // 12 digits
        assert!(!contains_pan(b"42424242424242424242")); // 20 digits
        assert!(!contains_pan(b"quantity 2, price 1999"));
        assert!(!contains_pan(b"2026-11-25 12:00"));
    }

    /// Redaction masks exactly the card numbers' digits, keeps the rest.
    #[test]
    fn redacts_only_card_digits() {
        assert_eq!(redact_pans(b"qty 2, price 1999"), None);
        assert_eq!(
            redact_pans(b"a 4242 4242 4242 4242, b 4000-0566-5566-5556 x 12").unwrap(),
            b"a #### #### #### ####, b ####-####-####-#### x 12".to_vec()
        );
        assert_eq!(
            redact_pans(b"42424242424242424242").as_deref(),
            None,
            "20 digits are no card number"
        );
    }
}
