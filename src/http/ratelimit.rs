//! Per-client rate limit (`http.rate_limit_per_s`, `http.rate_limit_burst`):
//! past it a request answers 429 `rate_limited` with `Retry-After`.
//!
//! A client is its peer IP address; IPv6 clients by their /64, since one
//! host commonly holds a whole /64 and could otherwise rotate addresses.
//! `X-Forwarded-For` is not trusted: behind a proxy every client has the
//! proxy's address, which is why the limit is off by default.
//!
//! Each client is a token bucket kept as one number, GCRA style: the
//! "theoretical arrival time" (TAT) its next request would have if it sent
//! at exactly the allowed rate. A request is allowed while the TAT is at
//! most `burst` intervals ahead of now. A client whose TAT is in the past
//! has a full bucket, which is the same as not being tracked, so such
//! entries can be dropped without changing any answer. That is how the map
//! stays bounded: at [`MAX_CLIENTS`] it first drops every full bucket, and
//! only if all are in use (many addresses sending at once) the one nearest
//! to full, which at worst gives that client its burst back early.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::{IntCounter, Registry};
use tokio::time::Instant;

use super::Ctx;
use super::problem::Problem;

/// Most clients tracked at once (about 40 bytes each), over all shards.
pub const MAX_CLIENTS: usize = 65_536;
const SHARDS: usize = 16;

/// Who a request counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum ClientKey {
    V4(u32),
    /// The upper 64 bits (the /64 prefix).
    V6(u64),
}

impl From<IpAddr> for ClientKey {
    fn from(ip: IpAddr) -> ClientKey {
        match ip.to_canonical() {
            IpAddr::V4(v4) => ClientKey::V4(v4.to_bits()),
            IpAddr::V6(v6) => ClientKey::V6((v6.to_bits() >> 64) as u64),
        }
    }
}

/// A keyed GCRA limiter with a bounded map. Times are nanoseconds since
/// `base`, on the monotonic clock.
pub struct RateLimiter {
    interval_ns: u64,
    /// How far ahead of now a TAT may be: `burst` intervals.
    tolerance_ns: u64,
    shards: Vec<Mutex<HashMap<ClientKey, u64>>>,
    shard_capacity: usize,
    hasher: RandomState,
    base: Instant,
}

impl RateLimiter {
    /// `per_s` requests per second refilled, `burst` at once (both ≥ 1).
    pub fn new(per_s: u32, burst: u32, max_clients: usize) -> RateLimiter {
        let interval_ns = (1_000_000_000 / u64::from(per_s.max(1))).max(1);
        RateLimiter {
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(u64::from(burst.max(1))),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            shard_capacity: max_clients.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
            base: Instant::now(),
        }
    }

    /// Counts one request of `ip` at `now`: `Err(wait)` when over the
    /// limit, `wait` being how long until a request would be allowed.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let now_ns = now.saturating_duration_since(self.base).as_nanos() as u64;
        let key = ClientKey::from(ip);
        let shard = &self.shards[self.hasher.hash_one(key) as usize % SHARDS];
        let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
        let known = map.get(&key).copied();
        let tat = known.unwrap_or(now_ns).max(now_ns) + self.interval_ns;
        if tat - now_ns > self.tolerance_ns {
            return Err(Duration::from_nanos(tat - now_ns - self.tolerance_ns));
        }
        if known.is_none() && map.len() >= self.shard_capacity {
            evict(&mut map, now_ns, self.shard_capacity);
        }
        map.insert(key, tat);
        Ok(())
    }

    /// Clients tracked now (tests).
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

/// Makes room for one entry in a map holding `capacity`: every full
/// bucket goes (forgetting it changes no answer); if none is full, the one
/// nearest to full.
fn evict(map: &mut HashMap<ClientKey, u64>, now_ns: u64, capacity: usize) {
    map.retain(|_, tat| *tat > now_ns);
    if map.len() >= capacity
        && let Some(nearest) = map.iter().min_by_key(|(_, tat)| **tat).map(|(k, _)| *k)
    {
        map.remove(&nearest);
    }
}

/// The limiter of a router and the count of its refusals.
pub(crate) struct RateLimit {
    limiter: RateLimiter,
    refused: IntCounter,
}

impl RateLimit {
    /// `None` when `per_s` is 0 (off). Registers
    /// `orderflow_http_rate_limited_total` in `registry`.
    pub(crate) fn new(per_s: u32, burst: u32, registry: &Registry) -> Option<RateLimit> {
        if per_s == 0 {
            return None;
        }
        let refused = IntCounter::new(
            "orderflow_http_rate_limited_total",
            "Requests refused with 429 rate_limited (per-client rate limit)",
        )
        .expect("valid counter");
        super::server::register(registry, refused.clone());
        Some(RateLimit {
            limiter: RateLimiter::new(per_s, burst, MAX_CLIENTS),
            refused,
        })
    }
}

/// Middleware: 429 `rate_limited` past the client's limit. A request
/// without a peer address (not from [`super::server`]) is not limited.
pub(crate) async fn limit(State(ctx): State<Ctx>, req: Request, next: Next) -> Response {
    let Some(rl) = &ctx.rate_limit else {
        return next.run(req).await;
    };
    let exempt = req
        .extensions()
        .get::<MatchedPath>()
        .is_some_and(|p| super::openapi::RATE_LIMIT_EXEMPT.contains(&p.as_str()));
    let peer = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    if let (false, Some(ip)) = (exempt, peer)
        && let Err(wait) = rl.limiter.check(ip, Instant::now())
    {
        rl.refused.inc();
        let secs = wait.as_secs_f64().ceil().clamp(1.0, f64::from(u32::MAX)) as u32;
        return Problem::rate_limited(secs).into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v4(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from_bits(n))
    }

    /// A client gets its burst at once, then one request per interval;
    /// the wait it is told is exact; other clients are not affected.
    #[test]
    fn burst_then_rate() {
        let l = RateLimiter::new(10, 3, 100);
        let t0 = l.base + Duration::from_secs(1);
        for _ in 0..3 {
            l.check(v4(1), t0).unwrap();
        }
        assert_eq!(l.check(v4(1), t0), Err(Duration::from_millis(100)));
        l.check(v4(2), t0).unwrap();
        assert!(l.check(v4(1), t0 + Duration::from_millis(99)).is_err());
        l.check(v4(1), t0 + Duration::from_millis(100)).unwrap();
        assert!(l.check(v4(1), t0 + Duration::from_millis(100)).is_err());
        // After a full second idle the whole burst is back, not more.
        let t1 = t0 + Duration::from_secs(2);
        for _ in 0..3 {
            l.check(v4(1), t1).unwrap();
        }
        assert!(l.check(v4(1), t1).is_err());
    }

    /// IPv6 clients count per /64; an IPv4-mapped address is its IPv4.
    #[test]
    fn keys() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ClientKey::from(a), ClientKey::from(b));
        assert_ne!(ClientKey::from(a), ClientKey::from(c));
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        assert_eq!(ClientKey::from(mapped), ClientKey::from(v4(0x0a00_0001)));
        assert!(matches!(
            ClientKey::from(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            ClientKey::V6(0)
        ));
    }

    /// A flood of distinct addresses never grows the map past its bound,
    /// and every address seen once is allowed.
    #[test]
    fn map_is_bounded() {
        let l = RateLimiter::new(1, 1, 64);
        let per_shard = 64 / SHARDS;
        let t = l.base + Duration::from_secs(1);
        for n in 0..10_000 {
            l.check(v4(n), t).unwrap();
            assert!(l.tracked() <= 64, "{}", l.tracked());
        }
        assert_eq!(l.tracked(), 64);
        // Later every bucket is full again: one new client clears its
        // shard of them.
        l.check(v4(1_000_000), t + Duration::from_secs(10)).unwrap();
        assert_eq!(l.tracked(), 64 - per_shard + 1);
    }

    /// Eviction drops full buckets first, then the one nearest to full, so
    /// a client still being limited keeps its state while others can go.
    #[test]
    fn eviction_prefers_full_buckets() {
        let (busy, full1, full2, nearly) = (
            ClientKey::V4(1),
            ClientKey::V4(2),
            ClientKey::V4(3),
            ClientKey::V4(4),
        );
        let now = 1_000;
        let mut map = HashMap::from([(busy, now + 500), (full1, now - 1), (full2, now)]);
        evict(&mut map, now, 3);
        assert_eq!(map.keys().copied().collect::<Vec<_>>(), vec![busy]);
        let mut map = HashMap::from([(busy, now + 500), (nearly, now + 1)]);
        evict(&mut map, now, 2);
        assert_eq!(map.keys().copied().collect::<Vec<_>>(), vec![busy]);
    }
}
