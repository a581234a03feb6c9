//! `[[frontend]]`: the TLS servers of this node (nginx, HAProxy) that the
//! serving probes shake hands with, to read which certificate each one presents.
//! Parsed and validated here like the rest of the config.

use std::net::SocketAddr;

use serde::Deserialize;
use toml::Spanned;

use super::certificate::CertificateConfig;
use super::{Bad, ConfigError};

/// `[[frontend]]`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFrontend {
    /// How `status` and the metrics name this frontend, e.g. "nginx".
    name: Spanned<String>,
    /// Where this node's TLS server listens, `ip:port`.
    address: Spanned<String>,
    /// Certificates to probe (names of `[[certificate]]`); default: every one.
    certificates: Option<Spanned<Vec<String>>>,
    /// SNI sent for every probed certificate; default: the certificate's first
    /// non-wildcard domain, or `certmesh-probe.<zone>` for `*.<zone>`.
    server_name: Option<Spanned<String>>,
}

/// One `[[frontend]]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendConfig {
    pub name: String,
    pub address: SocketAddr,
    /// `None`: every configured certificate.
    pub certificates: Option<Vec<String>>,
    /// `None`: derived per certificate ([`FrontendConfig::sni_for`]).
    pub server_name: Option<String>,
}

impl FrontendConfig {
    /// The SNI to send when probing `cert`.
    pub fn sni_for(&self, cert: &CertificateConfig) -> String {
        if let Some(s) = &self.server_name {
            return s.clone();
        }
        if let Some(d) = cert.domains.iter().find(|d| !d.starts_with("*.")) {
            return d.clone();
        }
        match cert.domains.first().and_then(|d| d.strip_prefix("*.")) {
            Some(zone) => format!("certmesh-probe.{zone}"),
            None => cert.name.clone(),
        }
    }

    /// Whether this frontend serves `cert`.
    pub fn probes(&self, cert: &str) -> bool {
        self.certificates
            .as_ref()
            .is_none_or(|l| l.iter().any(|c| c == cert))
    }
}

/// Longest frontend name (it travels to the other nodes).
pub const MAX_FRONTEND_NAME: usize = 64;

/// Every `[[frontend]]`: names unique and short, addresses `ip:port`, certificates
/// configured, server names valid DNS names.
pub(super) fn frontends(
    raw: &[RawFrontend],
    certificates: &[CertificateConfig],
    bad: &Bad,
) -> Result<Vec<FrontendConfig>, ConfigError> {
    let mut out: Vec<FrontendConfig> = Vec::new();
    for f in raw {
        let name = f.name.get_ref().trim().to_string();
        if name.is_empty() || name.len() > MAX_FRONTEND_NAME || name.chars().any(char::is_control) {
            return Err(bad(
                f.name.span(),
                "frontend.name",
                format!("must be 1 to {MAX_FRONTEND_NAME} printable characters"),
            ));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(bad(
                f.name.span(),
                "frontend.name",
                format!("duplicate frontend name {name:?}"),
            ));
        }
        let address = f.address.get_ref().parse::<SocketAddr>().map_err(|e| {
            bad(
                f.address.span(),
                "frontend.address",
                format!("{e} (expected ip:port, e.g. \"127.0.0.1:443\")"),
            )
        })?;
        let listed = f.certificates.as_ref().map(|l| l.get_ref().clone());
        if let (Some(l), Some(span)) = (&listed, f.certificates.as_ref().map(|s| s.span())) {
            if let Some(unknown) = l
                .iter()
                .find(|n| !certificates.iter().any(|c| &c.name == *n))
            {
                return Err(bad(
                    span,
                    "frontend.certificates",
                    format!("{unknown:?} is not the name of a [[certificate]]"),
                ));
            }
        }
        let server_name = f
            .server_name
            .as_ref()
            .map(|s| {
                let v = s.get_ref().trim().to_ascii_lowercase();
                rustls::pki_types::ServerName::try_from(v.clone())
                    .ok()
                    .filter(|n| matches!(n, rustls::pki_types::ServerName::DnsName(_)))
                    .map(|_| v)
                    .ok_or_else(|| {
                        bad(
                            s.span(),
                            "frontend.server_name",
                            format!("{:?} is not a DNS name", s.get_ref()),
                        )
                    })
            })
            .transpose()?;
        out.push(FrontendConfig {
            name,
            address,
            certificates: listed,
            server_name,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    fn parse(frontend: &str) -> Result<Config, String> {
        let text = format!(
            "[node]\nname = \"lb0\"\nstate_dir = \"/var/lib/certmesh\"\nlisten = \"127.0.0.1:22000\"\n\n\
             [tree]\npath = \"/etc/nginx/certs\"\n\n\
             [[certificate]]\nname = \"www\"\ndomains = [\"*.example.com\", \"www.example.com\"]\n\n\
             [[certificate]]\nname = \"wild\"\ndomains = [\"*.example.org\"]\n\n{frontend}"
        );
        Config::parse(Path::new("c.toml"), &text).map_err(|e| e.to_string())
    }

    #[test]
    fn a_frontend_probes_every_certificate_with_a_derived_server_name() {
        let c = parse("[[frontend]]\nname = \"nginx\"\naddress = \"127.0.0.1:443\"\n").unwrap();
        let f = &c.frontends[0];
        assert!(f.probes("www") && f.probes("wild"));
        assert_eq!(f.sni_for(&c.certificates[0]), "www.example.com");
        assert_eq!(f.sni_for(&c.certificates[1]), "certmesh-probe.example.org");
    }

    #[test]
    fn bad_frontends_are_named_with_key_and_line() {
        for (frontend, want) in [
            (
                "name = \"n\"\naddress = \"localhost\"\n",
                "c.toml:19: frontend.address",
            ),
            (
                "name = \"n\"\naddress = \"127.0.0.1:443\"\ncertificates = [\"api\"]\n",
                "c.toml:20: frontend.certificates: \"api\" is not",
            ),
            (
                "name = \"n\"\naddress = \"127.0.0.1:443\"\nserver_name = \"a b\"\n",
                "c.toml:20: frontend.server_name",
            ),
            (
                "name = \"\"\naddress = \"127.0.0.1:443\"\n",
                "c.toml:18: frontend.name",
            ),
            (
                "name = \"n\"\naddress = \"127.0.0.1:443\"\nport = 1\n",
                "unknown field `port`",
            ),
        ] {
            let e = parse(&format!("[[frontend]]\n{frontend}")).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }
}
