//! `[metrics]`: the Prometheus endpoint's address, and whether it exports one series
//! per certificate or only aggregates (at 10,000 certificates the
//! per-certificate series are most of the scrape).

use serde::Deserialize;
use toml::Spanned;

/// `[metrics]`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    /// Address of the Prometheus `/metrics` endpoint (plain HTTP; keep it local or
    /// on the backnet).
    pub(super) listen: Spanned<String>,
    /// One series per certificate (`{cert="…"}`) besides the aggregates; `false`
    /// keeps only the aggregates (counts by state, the earliest expiry). Default
    /// true.
    per_certificate: Option<bool>,
}

/// `[metrics] per_certificate`, true unless the section says false.
pub(super) fn per_certificate(raw: Option<&RawMetrics>) -> bool {
    raw.and_then(|m| m.per_certificate).unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RawMetrics, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn per_certificate_defaults_to_true_and_can_be_turned_off() {
        let on = parse("listen = \"127.0.0.1:9402\"\n").unwrap();
        assert!(per_certificate(Some(&on)));
        assert!(per_certificate(None));
        let off = parse("listen = \"127.0.0.1:9402\"\nper_certificate = false\n").unwrap();
        assert!(!per_certificate(Some(&off)));
    }

    #[test]
    fn a_wrong_type_is_refused() {
        let e = parse("listen = \"127.0.0.1:9402\"\nper_certificate = \"no\"\n")
            .err()
            .expect("a string is not a bool");
        assert!(e.to_string().contains("per_certificate"), "{e}");
    }
}
