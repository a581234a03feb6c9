//! `[[peer]]`: the nodes this one dials, each a name, a device ID and an address.

use std::net::SocketAddr;

use serde::Deserialize;
use toml::Spanned;

use super::{Bad, ConfigError};
use crate::core::device::DeviceId;

/// `[[peer]]`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPeer {
    /// Name shown in status and logs.
    name: Spanned<String>,
    /// The peer's device ID (`certmesh id` on that node).
    pub(super) id: Spanned<String>,
    /// Where to dial it (host:port, UDP).
    address: Spanned<String>,
}

/// A configured peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub name: String,
    pub id: DeviceId,
    pub address: SocketAddr,
}

/// `[[peer]]`: names unique (and not this node's `name`), device IDs unique.
pub(super) fn peers(
    raw: &[RawPeer],
    name: &str,
    bad: &Bad,
) -> Result<Vec<PeerConfig>, ConfigError> {
    let mut peers: Vec<PeerConfig> = Vec::new();
    for p in raw {
        let pname = p.name.get_ref().trim().to_string();
        if pname.is_empty() {
            return Err(bad(p.name.span(), "peer.name", "must not be empty".into()));
        }
        let id =
            p.id.get_ref()
                .parse::<DeviceId>()
                .map_err(|e| bad(p.id.span(), "peer.id", format!("peer {pname:?}: {e}")))?;
        let address = p.address.get_ref().parse::<SocketAddr>().map_err(|e| {
            bad(
                p.address.span(),
                "peer.address",
                format!("peer {pname:?}: {e} (expected ip:port)"),
            )
        })?;
        if pname == name || peers.iter().any(|q| q.name == pname) {
            return Err(bad(
                p.name.span(),
                "peer.name",
                format!("duplicate name {pname:?}"),
            ));
        }
        if peers.iter().any(|q| q.id == id) {
            return Err(bad(
                p.id.span(),
                "peer.id",
                format!("peer {pname:?}: device ID listed twice"),
            ));
        }
        peers.push(PeerConfig {
            name: pname,
            id,
            address,
        });
    }
    Ok(peers)
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{cfg, err};
    use crate::core::device::DeviceId;

    #[test]
    fn bad_peers_are_named_with_their_line() {
        let id = DeviceId::of_cert(b"x").to_string();
        let mut typo = id.clone().into_bytes();
        typo[0] = if typo[0] == b'A' { b'B' } else { b'A' };
        let typo = String::from_utf8(typo).unwrap();
        let peer = |id: &str, address: &str| {
            format!("[[peer]]\nname = \"lb1\"\nid = \"{id}\"\naddress = \"{address}\"\n")
        };
        let e = err(&cfg(&peer(&typo, "127.0.0.2:1")));
        assert!(e.contains(":10: peer.id") && e.contains("mistyped"), "{e}");
        let e = err(&cfg(&peer(&id, "nowhere")));
        assert!(e.contains("peer.address"), "{e}");
        let twice = format!(
            "{}[[peer]]\nname = \"lb2\"\nid = \"{id}\"\naddress = \"127.0.0.3:1\"\n",
            peer(&id, "127.0.0.2:1")
        );
        let e = err(&cfg(&twice));
        assert!(e.contains("listed twice") && e.contains(":14:"), "{e}");
    }
}
