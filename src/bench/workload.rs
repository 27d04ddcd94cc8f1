//! What a benchmark offers: which SKUs each order buys, how many lines it
//! has, and whether its payment is declined. Seeded, so two runs (and the
//! PostgreSQL baseline) offer the very same orders.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

/// The shapes of demand a benchmark can offer.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    /// Single-line orders, SKUs chosen uniformly.
    Uniform,
    /// Single-line orders, SKUs chosen by a Zipf(s) law (a few hot SKUs).
    Zipf,
    /// Every order buys the same SKU, whose stock is far below demand:
    /// one partition, and most orders end `rejected` (out of stock).
    FlashSale,
    /// 1 to `max_lines` lines of distinct SKUs, across partitions (sagas).
    MultiLine,
}

/// Most lines a multi-line order may have (the contract's own limit is
/// higher; five is what the issue asks for and keeps sagas realistic).
pub const MAX_LINES_LIMIT: u32 = 5;
/// Stock per SKU outside a flash sale: more than any run can sell, so no
/// order is refused for stock and the figures measure the full saga.
pub const PLENTIFUL_STOCK: u64 = 1_000_000_000;
/// Token the payment simulators (and Stripe's test mode) decline.
pub const DECLINED_TOKEN: &str = "tok_chargeDeclined";
pub const APPROVED_TOKEN: &str = "tok_visa";

/// Everything that decides the offered orders.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkloadSpec {
    pub kind: WorkloadKind,
    pub skus: u32,
    pub zipf_s: f64,
    pub max_lines: u32,
    /// Stock of the flash sale's one SKU.
    pub flash_stock: u64,
    pub decline_ratio: f64,
    pub seed: u64,
}

impl WorkloadSpec {
    /// Refuses values that would make a meaningless or unbounded run.
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        if self.skus == 0 || self.skus > 10_000_000 {
            return Err(crate::config::ConfigError::Usage(format!(
                "--skus {} is out of range [1, 10000000]",
                self.skus
            )));
        }
        if !(self.zipf_s > 0.0 && self.zipf_s <= 10.0) {
            return Err(crate::config::ConfigError::Usage(format!(
                "--zipf-s {} is out of range (0, 10]",
                self.zipf_s
            )));
        }
        if self.max_lines == 0 || self.max_lines > MAX_LINES_LIMIT {
            return Err(crate::config::ConfigError::Usage(format!(
                "--max-lines {} is out of range [1, {MAX_LINES_LIMIT}]",
                self.max_lines
            )));
        }
        if self.kind == WorkloadKind::MultiLine && self.max_lines > self.skus {
            return Err(crate::config::ConfigError::Usage(format!(
                "--max-lines {} needs at least as many --skus (lines buy distinct SKUs)",
                self.max_lines
            )));
        }
        if !(0.0..=1.0).contains(&self.decline_ratio) {
            return Err(crate::config::ConfigError::Usage(format!(
                "--decline-ratio {} is out of range [0, 1]",
                self.decline_ratio
            )));
        }
        Ok(())
    }

    /// SKU names, by index: a flash sale has exactly one.
    pub fn sku_names(&self) -> Vec<String> {
        let n = if self.kind == WorkloadKind::FlashSale {
            1
        } else {
            self.skus
        };
        (0..n).map(|i| format!("SKU-{i:05}")).collect()
    }

    pub fn stock_per_sku(&self) -> u64 {
        if self.kind == WorkloadKind::FlashSale {
            self.flash_stock
        } else {
            PLENTIFUL_STOCK
        }
    }
}

/// One order to offer: SKU indices with quantities, and its payment.
#[derive(Clone, Debug, PartialEq)]
pub struct OrderSpec {
    pub n: u64,
    pub lines: Vec<(u32, u32)>,
    pub decline: bool,
}

impl OrderSpec {
    /// The SKU that keys (and so partitions) the order: its first line's.
    pub fn key_sku(&self) -> u32 {
        self.lines[0].0
    }

    pub fn token(&self) -> &'static str {
        if self.decline {
            DECLINED_TOKEN
        } else {
            APPROVED_TOKEN
        }
    }
}

/// A seeded stream of orders of one workload.
pub struct Workload {
    spec: WorkloadSpec,
    skus: u32,
    zipf: Option<Zipf<f64>>,
    rng: StdRng,
}

impl Workload {
    pub fn new(spec: &WorkloadSpec) -> Workload {
        let skus = spec.sku_names().len() as u32;
        let zipf = (spec.kind == WorkloadKind::Zipf)
            .then(|| Zipf::new(f64::from(skus), spec.zipf_s).expect("validated parameters"));
        Workload {
            spec: spec.clone(),
            skus,
            zipf,
            rng: StdRng::seed_from_u64(spec.seed),
        }
    }

    /// Order number `n`'s contents.
    pub fn order(&mut self, n: u64) -> OrderSpec {
        let lines = match self.spec.kind {
            WorkloadKind::Uniform => vec![(self.rng.random_range(0..self.skus), 1)],
            WorkloadKind::Zipf => {
                let rank = self
                    .zipf
                    .as_ref()
                    .expect("zipf workload")
                    .sample(&mut self.rng);
                // Ranks are 1..=skus; rank 1 is the hottest SKU.
                vec![(rank as u32 - 1, 1)]
            }
            WorkloadKind::FlashSale => vec![(0, 1)],
            WorkloadKind::MultiLine => self.distinct_lines(),
        };
        let decline =
            self.spec.decline_ratio > 0.0 && self.rng.random_bool(self.spec.decline_ratio);
        OrderSpec { n, lines, decline }
    }

    fn distinct_lines(&mut self) -> Vec<(u32, u32)> {
        let count = self.rng.random_range(1..=self.spec.max_lines) as usize;
        let mut lines: Vec<(u32, u32)> = Vec::with_capacity(count);
        while lines.len() < count {
            let sku = self.rng.random_range(0..self.skus);
            if lines.iter().all(|(s, _)| *s != sku) {
                lines.push((sku, self.rng.random_range(1..=3)));
            }
        }
        lines
    }
}

/// The contract's order JSON for `spec` (what an upstream producer writes).
pub fn order_json(id_prefix: &str, spec: &OrderSpec, skus: &[String]) -> String {
    use std::fmt::Write;
    let mut lines = String::new();
    for (i, (sku, quantity)) in spec.lines.iter().enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let sku = &skus[*sku as usize];
        let _ = write!(
            lines,
            r#"{sep}{{"sku":"{sku}","quantity":{quantity},"unit_price":1999}}"#
        );
    }
    format!(
        r#"{{"order_id":"{id_prefix}{}","customer_id":"c-{}","currency":"USD","lines":[{lines}],"payment":{{"token":"{}"}}}}"#,
        spec.n,
        spec.n % 10_000,
        spec.token()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: WorkloadKind) -> WorkloadSpec {
        WorkloadSpec {
            kind,
            skus: 100,
            zipf_s: 1.1,
            max_lines: 5,
            flash_stock: 10,
            decline_ratio: 0.25,
            seed: 7,
        }
    }

    /// The same seed offers the same orders; the stream is not constant.
    #[test]
    fn seeded_and_varied() {
        let (mut a, mut b) = (
            Workload::new(&spec(WorkloadKind::Uniform)),
            Workload::new(&spec(WorkloadKind::Uniform)),
        );
        let xs: Vec<_> = (0..100).map(|n| a.order(n)).collect();
        let ys: Vec<_> = (0..100).map(|n| b.order(n)).collect();
        assert_eq!(xs, ys);
        let distinct: std::collections::BTreeSet<u32> = xs.iter().map(|o| o.key_sku()).collect();
        assert!(distinct.len() > 30, "uniform over 100 SKUs: {distinct:?}");
        let declined = xs.iter().filter(|o| o.decline).count();
        assert!(
            (10..=45).contains(&declined),
            "{declined} of 100 declined at 25 %"
        );
    }

    /// Zipf puts most demand on the first ranks; a flash sale on one SKU.
    #[test]
    fn skewed_shapes() {
        let mut z = Workload::new(&spec(WorkloadKind::Zipf));
        let hot = (0..10_000).filter(|n| z.order(*n).key_sku() < 5).count();
        assert!(
            hot > 4_000,
            "Zipf(1.1): top 5 of 100 SKUs got {hot} of 10000"
        );
        let mut f = Workload::new(&spec(WorkloadKind::FlashSale));
        assert!((0..100).all(|n| f.order(n).lines == vec![(0, 1)]));
        assert_eq!(spec(WorkloadKind::FlashSale).sku_names().len(), 1);
    }

    /// Multi-line orders have 1..=5 distinct SKUs, and every count occurs.
    #[test]
    fn multi_line_orders() {
        let mut w = Workload::new(&spec(WorkloadKind::MultiLine));
        let mut counts = [0; 6];
        for n in 0..1_000 {
            let o = w.order(n);
            let skus: std::collections::BTreeSet<u32> = o.lines.iter().map(|l| l.0).collect();
            assert_eq!(skus.len(), o.lines.len(), "{o:?}");
            counts[o.lines.len()] += 1;
        }
        assert!(counts[1..].iter().all(|c| *c > 100), "{counts:?}");
    }

    /// Out-of-range parameters are refused with the flag's name.
    #[test]
    fn validation() {
        let mut s = spec(WorkloadKind::MultiLine);
        s.decline_ratio = 1.5;
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("--decline-ratio")
        );
        let mut s = spec(WorkloadKind::MultiLine);
        s.skus = 3;
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("--max-lines")
        );
        let mut s = spec(WorkloadKind::Zipf);
        s.zipf_s = 0.0;
        assert!(s.validate().unwrap_err().to_string().contains("--zipf-s"));
    }

    /// The generated JSON is an order the contract accepts.
    #[test]
    fn json_is_a_valid_order() {
        let s = spec(WorkloadKind::MultiLine);
        let skus = s.sku_names();
        let mut w = Workload::new(&s);
        for n in 0..50 {
            let json = order_json("b-", &w.order(n), &skus);
            crate::domain::order::parse_order(json.as_bytes())
                .unwrap_or_else(|e| panic!("{json}: {e:?}"));
        }
    }
}
