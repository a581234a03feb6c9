//! `[node]`: this node's name, state directory and QUIC address.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use super::values::absolute;
use super::{Bad, ConfigError};

/// `[node]`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    /// Human name of this node, shown to peers and in status.
    name: Spanned<String>,
    /// Identity, index and control socket live here.
    pub(super) state_dir: Spanned<String>,
    /// UDP address the QUIC endpoint binds (the backnet address).
    listen: Spanned<String>,
}

/// `[node]`: the name, the state directory and the QUIC address.
pub(super) fn node(n: &RawNode, bad: &Bad) -> Result<(String, PathBuf, SocketAddr), ConfigError> {
    let name = n.name.get_ref().trim().to_string();
    if name.is_empty() {
        return Err(bad(n.name.span(), "node.name", "must not be empty".into()));
    }
    let state_dir =
        absolute(&n.state_dir).map_err(|m| bad(n.state_dir.span(), "node.state_dir", m))?;
    let listen = n.listen.get_ref().parse::<SocketAddr>().map_err(|e| {
        bad(
            n.listen.span(),
            "node.listen",
            format!("{e} (expected ip:port, e.g. \"[2001:db8::1]:22000\")"),
        )
    })?;
    Ok((name, state_dir, listen))
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{cfg, err};

    #[test]
    fn state_dir_must_be_absolute_and_listen_an_address() {
        let e = err(&cfg("").replace("/var/lib/certmesh", "relative"));
        assert!(
            e.contains("node.state_dir") && e.contains("absolute"),
            "{e}"
        );
        let e = err(&cfg("").replace("127.0.0.1:22000", "localhost"));
        assert!(
            e.contains(":4: node.listen") && e.contains("ip:port"),
            "{e}"
        );
        let e = err(&cfg("").replace("\"lb0\"", "\" \""));
        assert!(e.contains(":2: node.name") && e.contains("empty"), "{e}");
    }
}
