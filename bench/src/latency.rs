//! Latency histograms in microseconds and the quantiles every report prints.

use hdrhistogram::Histogram;

/// 1 us to 60 s at 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// The value at quantile `q`, in the histogram's unit.
pub fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64
}

/// The quantiles a load report gives (microseconds), flattened into its JSON.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        Latency {
            p50_us: us(h, 0.5),
            p90_us: us(h, 0.9),
            p99_us: us(h, 0.99),
            p999_us: us(h, 0.999),
            max_us: h.max() as f64,
        }
    }

    /// `| p50 | p90 | p99 | p99.9 | max |` cells, for the markdown tables.
    pub fn cells(&self) -> String {
        format!(
            "{:.0} | {:.0} | {:.0} | {:.0} | {:.0}",
            self.p50_us, self.p90_us, self.p99_us, self.p999_us, self.max_us
        )
    }
}
