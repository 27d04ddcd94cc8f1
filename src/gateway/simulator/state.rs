//! What the engine keeps, each part bounded in count and in time (see the
//! module documentation of `gateway::simulator`), and how it forgets: the
//! intents, the idempotency keys, the call ledger, and the queues in
//! insertion order that expiry pops from.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use super::super::stripe::ApiError;
use super::*;

/// Stale queue entries tolerated beyond the live ones before a queue is
/// compacted; keeps compaction rare for small engines.
pub(super) const COMPACT_SLACK: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Status {
    RequiresPaymentMethod,
    RequiresConfirmation,
    RequiresCapture,
    Processing,
    Succeeded,
    Canceled,
}

impl Status {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Status::RequiresPaymentMethod => "requires_payment_method",
            Status::RequiresConfirmation => "requires_confirmation",
            Status::RequiresCapture => "requires_capture",
            Status::Processing => "processing",
            Status::Succeeded => "succeeded",
            Status::Canceled => "canceled",
        }
    }
}

/// What never changes over an intent's life, shared with the stored
/// answers of its idempotency keys so they outlive the intent.
pub(super) struct Fixed {
    pub(super) metadata: BTreeMap<String, String>,
    pub(super) amount: u64,
    pub(super) currency: String,
    pub(super) capture_method: &'static str,
    /// How its answers stray from what was asked (its payment method's).
    pub(super) quirk: Option<Quirk>,
}

/// The simulator's own test tokens (module doc): answers a client must
/// not take at their word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Quirk {
    Processing,
    PartialAuthorization,
    CurrencyMismatch,
    CaptureShort,
    CaptureProcessing,
}

impl Quirk {
    pub(super) fn of(payment_method: &str) -> Option<Quirk> {
        let name = payment_method
            .strip_prefix("pm_card_")
            .or_else(|| payment_method.strip_prefix("tok_"))?;
        Some(match name {
            "simProcessing" => Quirk::Processing,
            "simPartialAuthorization" => Quirk::PartialAuthorization,
            "simCurrencyMismatch" => Quirk::CurrencyMismatch,
            "simCaptureShort" => Quirk::CaptureShort,
            "simCaptureProcessing" => Quirk::CaptureProcessing,
            _ => return None,
        })
    }
}

pub(super) struct Intent {
    pub(super) fixed: Arc<Fixed>,
    /// Creation number: the order in which the count bound forgets.
    pub(super) created: u64,
    pub(super) status: Status,
    pub(super) amount_capturable: u64,
    pub(super) amount_received: u64,
    pub(super) cancellation_reason: Option<&'static str>,
    pub(super) authorized: bool,
    pub(super) captures: u32,
    pub(super) cancels: u32,
}

/// A stored first answer. Only the parts that change over an intent's life
/// are copied; the rest is shared with the intent.
#[derive(Clone)]
pub(super) enum Stored {
    Intent {
        id: Arc<str>,
        fixed: Arc<Fixed>,
        status: Status,
        amount_capturable: u64,
        amount_received: u64,
        cancellation_reason: Option<&'static str>,
    },
    Error {
        status: u16,
        error: Box<ApiError>,
    },
}

/// The summary's counters, totals over the engine's life.
#[derive(Default)]
pub(super) struct Totals {
    pub(super) intents: u64,
    pub(super) authorized: u64,
    pub(super) captures: u64,
    pub(super) max_captures_per_intent: u32,
    pub(super) intents_evicted: u64,
    pub(super) intents_expired: u64,
    pub(super) authorizations_expired: u64,
    pub(super) keys_evicted: u64,
    pub(super) keys_expired: u64,
    pub(super) rate_limited: u64,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) intents: BTreeMap<Arc<str>, Intent>,
    /// Order id → its kept intents, oldest first; no empty entry.
    pub(super) by_order: HashMap<String, Vec<Arc<str>>>,
    /// The settled intents by creation number: the count bound forgets the
    /// first.
    pub(super) settled: BTreeMap<u64, Arc<str>>,
    /// `(settled_ms, creation number)` in settling order: the retention
    /// forgets from the front. Intents the count bound forgot first leave
    /// stale entries, skipped, and dropped by compaction.
    pub(super) settled_at: VecDeque<(u64, u64)>,
    /// `(authorized_ms, id)` in authorization order: authorizations expire
    /// from the front. Those captured or canceled since leave stale
    /// entries, skipped, and dropped by compaction.
    pub(super) authorizations: VecDeque<(u64, Arc<str>)>,
    /// Intents in `requires_capture`.
    pub(super) held: usize,
    /// Idempotency key → (fingerprint of the request, first answer).
    pub(super) keys: HashMap<Arc<str>, (u64, Stored)>,
    /// `(stored_ms, key)` of every kept key, in storing order.
    pub(super) key_order: VecDeque<(u64, Arc<str>)>,
    pub(super) calls: VecDeque<CallRecord>,
    pub(super) seq: u64,
    pub(super) calls_while_down: u64,
    pub(super) next_id: u64,
    /// The latest time seen: the clock, never taken backwards.
    pub(super) now_ms: u64,
    pub(super) totals: Totals,
}

impl State {
    /// Moves time to `clock_ms` (never back) and forgets what is then due.
    pub(super) fn advance(&mut self, clock_ms: u64, options: &SimOptions) {
        self.now_ms = self.now_ms.max(clock_ms);
        // Authorizations first: one that expires settles, and so starts its
        // retention now.
        self.expire_authorizations(options.authorization_ttl_ms);
        self.expire_settled(options.intent_retention_ms);
        self.expire_keys(options.key_ttl_ms);
    }

    pub(super) fn due(&self, since_ms: u64, ttl_ms: u64) -> bool {
        since_ms.saturating_add(ttl_ms) <= self.now_ms
    }

    pub(super) fn expire_authorizations(&mut self, ttl_ms: u64) {
        while let Some(&(at, _)) = self.authorizations.front()
            && self.due(at, ttl_ms)
        {
            let (_, id) = self.authorizations.pop_front().expect("front exists");
            let Some(intent) = self.intents.get_mut(&id) else {
                continue;
            };
            if intent.status == Status::RequiresCapture {
                // Stripe's expiry of an uncaptured authorization.
                intent.status = Status::Canceled;
                intent.amount_capturable = 0;
                intent.cancellation_reason = Some("automatic");
                let created = intent.created;
                self.release(created, id);
                self.totals.authorizations_expired += 1;
            }
        }
    }

    pub(super) fn expire_settled(&mut self, retention_ms: u64) {
        while let Some(&(at, created)) = self.settled_at.front()
            && self.due(at, retention_ms)
        {
            self.settled_at.pop_front();
            if let Some(id) = self.settled.remove(&created) {
                self.forget(&id);
                self.totals.intents_expired += 1;
            }
        }
    }

    pub(super) fn expire_keys(&mut self, ttl_ms: u64) {
        while let Some(&(at, _)) = self.key_order.front()
            && self.due(at, ttl_ms)
        {
            let (_, key) = self.key_order.pop_front().expect("front exists");
            self.keys.remove(&key);
            self.totals.keys_expired += 1;
        }
    }

    /// Starts to track a new intent, already in `intents`, for the bounds.
    pub(super) fn track(&mut self, created: u64, id: Arc<str>, status: Status) {
        if status != Status::RequiresCapture {
            self.settle(created, id);
            return;
        }
        self.held += 1;
        self.authorizations.push_back((self.now_ms, id));
        if self.authorizations.len() > 2 * self.held + COMPACT_SLACK {
            let intents = &self.intents;
            self.authorizations.retain(|(_, id)| {
                intents
                    .get(id)
                    .is_some_and(|i| i.status == Status::RequiresCapture)
            });
        }
    }

    /// An intent left `requires_capture` (captured, canceled or expired).
    pub(super) fn release(&mut self, created: u64, id: Arc<str>) {
        self.held -= 1;
        self.settle(created, id);
    }

    pub(super) fn settle(&mut self, created: u64, id: Arc<str>) {
        self.settled.insert(created, id);
        self.settled_at.push_back((self.now_ms, created));
        if self.settled_at.len() > 2 * self.settled.len() + COMPACT_SLACK {
            let settled = &self.settled;
            self.settled_at
                .retain(|(_, created)| settled.contains_key(created));
        }
    }

    /// Makes room for one more intent by forgetting the settled ones
    /// created first; false when every kept intent is `requires_capture`.
    pub(super) fn make_room(&mut self, max_intents: usize) -> bool {
        while self.intents.len() >= max_intents {
            let Some((_, id)) = self.settled.pop_first() else {
                return false;
            };
            self.forget(&id);
            self.totals.intents_evicted += 1;
        }
        true
    }

    /// Drops a settled intent, and its entry in `by_order`.
    pub(super) fn forget(&mut self, id: &str) {
        let Some(intent) = self.intents.remove(id) else {
            return;
        };
        let Some(order_id) = intent.fixed.metadata.get("order_id") else {
            return;
        };
        if let Some(ids) = self.by_order.get_mut(order_id) {
            ids.retain(|kept| &**kept != id);
            if ids.is_empty() {
                self.by_order.remove(order_id);
            }
        }
    }

    /// Keeps a key's first answer, forgetting the oldest key if full.
    pub(super) fn store_key(
        &mut self,
        key: &str,
        fingerprint: u64,
        stored: Stored,
        max_keys: usize,
    ) {
        while self.keys.len() >= max_keys {
            let Some((_, oldest)) = self.key_order.pop_front() else {
                break;
            };
            self.keys.remove(&oldest);
            self.totals.keys_evicted += 1;
        }
        let key: Arc<str> = Arc::from(key);
        self.keys.insert(key.clone(), (fingerprint, stored));
        self.key_order.push_back((self.now_ms, key));
    }

    /// Keeps a new intent, and counts it in the totals.
    pub(super) fn insert(&mut self, id: Arc<str>, intent: Intent) {
        self.totals.intents += 1;
        self.totals.authorized += u64::from(intent.authorized);
        if intent.captures > 0 {
            self.count_capture(intent.captures);
        }
        if let Some(order_id) = intent.fixed.metadata.get("order_id") {
            self.by_order
                .entry(order_id.clone())
                .or_default()
                .push(id.clone());
        }
        let (created, status) = (intent.created, intent.status);
        self.intents.insert(id.clone(), intent);
        self.track(created, id, status);
    }

    /// A capture that moved money, the intent's `captures`-th.
    pub(super) fn count_capture(&mut self, captures: u32) {
        self.totals.captures += 1;
        let max = &mut self.totals.max_captures_per_intent;
        *max = (*max).max(captures);
    }

    pub(super) fn push_call(&mut self, record: CallRecord, max_calls: usize) {
        while self.calls.len() >= max_calls.max(1) {
            self.calls.pop_front();
        }
        self.calls.push_back(record);
    }

    pub(super) fn sizes(&self) -> SimSizes {
        SimSizes {
            intents: self.intents.len(),
            keys: self.keys.len(),
            calls: self.calls.len(),
        }
    }
}
