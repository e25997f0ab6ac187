//! Reading a Prometheus text exposition (what `/metrics` serves) the way a
//! scraper would: one series by its exact name and labels.

/// The value of one series in a Prometheus text exposition (`name{labels}`
/// exactly as the encoder writes it); `None` when absent.
pub fn metric(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
}
