//! `certmesh check --fleet`: the configs of a whole fleet, as config management
//! renders them, checked together. One config only shows its own peers;
//! all of them show the peer graph: a node listed by a peer it does not list back
//! (its handshake refuses that peer, so the link never forms), the same node listed
//! under different device IDs, a peer dialled at an address the node does not listen
//! on, and a graph that falls apart into pieces that never sync with each other.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;

use crate::config::Config;
use crate::core::device::DeviceId;

/// What the fleet's peer graph looks like, and what is wrong with it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FleetReport {
    /// Problems that break syncing: `check` exits 2.
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    pub nodes: usize,
    /// Links both ends list (only those connect).
    pub links: usize,
}

/// Checks `configs` as one fleet. `own_id` gives a node's device ID from its state
/// dir when it is readable there (a central render has none: the IDs the peers list
/// are then taken, and must agree).
pub fn check(configs: &[Config], own_id: impl Fn(&Config) -> Option<DeviceId>) -> FleetReport {
    let mut r = FleetReport {
        nodes: configs.len(),
        ..FleetReport::default()
    };
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    for (i, c) in configs.iter().enumerate() {
        if let Some(j) = by_name.insert(c.name.as_str(), i) {
            r.errors.push(format!(
                "node name {:?} is used by both {} and {}",
                c.name,
                configs[j].file.display(),
                c.file.display()
            ));
        }
    }
    let ids = device_ids(configs, &by_name, &own_id, &mut r);
    let mut links: BTreeSet<(usize, usize)> = BTreeSet::new();
    for (i, c) in configs.iter().enumerate() {
        for p in &c.peers {
            let Some(&j) = by_name.get(p.name.as_str()) else {
                r.warnings.push(format!(
                    "{} lists peer {:?}, whose config is not among those checked",
                    c.name, p.name
                ));
                continue;
            };
            if !dialable(p.address, configs[j].listen) {
                r.warnings.push(format!(
                    "{} dials {} at {}, but {} listens on {}",
                    c.name, p.name, p.address, p.name, configs[j].listen
                ));
            }
            // Both ends must list each other by the right device ID: each one's
            // handshake admits only the IDs it lists.
            let lists = |x: usize, y: usize| {
                configs[x].peers.iter().any(|q| match ids[y] {
                    Some(id) => q.id == id,
                    None => q.name == configs[y].name,
                })
            };
            if !lists(i, j) {
                continue; // listed under another device ID: reported above
            }
            if lists(j, i) {
                links.insert((i.min(j), i.max(j)));
            } else {
                r.errors.push(format!(
                    "{} lists {}, but {} does not list {}{}: it refuses the connection, \
                     and the two never sync directly",
                    c.name,
                    p.name,
                    p.name,
                    c.name,
                    ids[i].map_or(String::new(), |id| format!(" (device ID {id})"))
                ));
            }
        }
    }
    r.links = links.len();
    let pieces = components(configs.len(), &links);
    if pieces.len() > 1 {
        let names: Vec<String> = pieces
            .iter()
            .map(|p| {
                let mut n: Vec<&str> = p.iter().map(|&i| configs[i].name.as_str()).collect();
                let more = n.len().saturating_sub(5);
                n.truncate(5);
                let tail = if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                };
                format!("[{}{tail}]", n.join(", "))
            })
            .collect();
        r.errors.push(format!(
            "the peer graph falls apart into {} pieces that never sync with each other: {}",
            pieces.len(),
            names.join(" ")
        ));
    }
    r
}

/// Each node's device ID: its own identity if readable, else the one its listers
/// agree on. Listers that disagree with each other or with the identity are errors.
fn device_ids(
    configs: &[Config],
    by_name: &HashMap<&str, usize>,
    own_id: &impl Fn(&Config) -> Option<DeviceId>,
    r: &mut FleetReport,
) -> Vec<Option<DeviceId>> {
    // node → device ID → the nodes that list it so.
    let mut listed: Vec<BTreeMap<DeviceId, Vec<&str>>> = vec![BTreeMap::new(); configs.len()];
    for c in configs {
        for p in &c.peers {
            if let Some(&j) = by_name.get(p.name.as_str()) {
                listed[j].entry(p.id).or_default().push(c.name.as_str());
            }
        }
    }
    configs
        .iter()
        .zip(listed)
        .map(|(c, listed)| {
            let own = own_id(c);
            for (id, by) in &listed {
                if own.is_some_and(|o| o != *id) {
                    r.errors.push(format!(
                        "{} list {} with device ID {id}, but its identity is {}",
                        by.join(", "),
                        c.name,
                        own.map_or(String::new(), |o| o.to_string())
                    ));
                }
            }
            if own.is_none() && listed.len() > 1 {
                let variants: Vec<String> = listed
                    .iter()
                    .map(|(id, by)| format!("{id} (by {})", by.join(", ")))
                    .collect();
                r.errors.push(format!(
                    "{} is listed under {} device IDs: {}",
                    c.name,
                    listed.len(),
                    variants.join("; ")
                ));
            }
            own.or_else(|| match listed.len() {
                1 => listed.keys().next().copied(),
                _ => None,
            })
        })
        .collect()
}

/// A peer dialled at `dial` reaches a node listening on `listen`: same port, and the
/// same address unless the node listens on every address.
fn dialable(dial: SocketAddr, listen: SocketAddr) -> bool {
    dial.port() == listen.port() && (listen.ip().is_unspecified() || dial.ip() == listen.ip())
}

/// The connected pieces of the graph of `n` nodes with `links`, largest first.
fn components(n: usize, links: &BTreeSet<(usize, usize)>) -> Vec<Vec<usize>> {
    let mut adj: Vec<Vec<usize>> = vec![Vec::new(); n];
    for &(a, b) in links {
        adj[a].push(b);
        adj[b].push(a);
    }
    let mut seen = vec![false; n];
    let mut out = Vec::new();
    for start in 0..n {
        if seen[start] {
            continue;
        }
        seen[start] = true;
        let mut piece = vec![start];
        let mut next = vec![start];
        while let Some(x) = next.pop() {
            for &y in &adj[x] {
                if !seen[y] {
                    seen[y] = true;
                    piece.push(y);
                    next.push(y);
                }
            }
        }
        piece.sort_unstable();
        out.push(piece);
    }
    out.sort_by_key(|p| std::cmp::Reverse(p.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> DeviceId {
        DeviceId([n; 32])
    }

    /// Node `n` named `n<n>` on 127.0.0.<n>:22000, listing `peers` (as `(node, id)`).
    fn node(n: u8, peers: &[(u8, u8)]) -> Config {
        let mut text = format!(
            "[node]\nname = \"n{n}\"\nstate_dir = \"/s{n}\"\nlisten = \"127.0.0.{n}:22000\"\n\
             [tree]\npath = \"/t{n}\"\n"
        );
        for (p, pid) in peers {
            text += &format!(
                "[[peer]]\nname = \"n{p}\"\nid = \"{}\"\naddress = \"127.0.0.{p}:22000\"\n",
                id(*pid)
            );
        }
        Config::parse(std::path::Path::new(&format!("n{n}.toml")), &text).expect("config")
    }

    fn own(c: &Config) -> Option<DeviceId> {
        c.name[1..].parse::<u8>().ok().map(id)
    }

    #[test]
    fn a_hub_topology_listed_both_ways_is_one_piece() {
        // Hubs 1, 2; edges 3, 4 each peered with both hubs.
        let f = [
            node(1, &[(2, 2), (3, 3), (4, 4)]),
            node(2, &[(1, 1), (3, 3), (4, 4)]),
            node(3, &[(1, 1), (2, 2)]),
            node(4, &[(1, 1), (2, 2)]),
        ];
        let r = check(&f, own);
        assert_eq!(r.errors, Vec::<String>::new());
        assert_eq!(r.warnings, Vec::<String>::new());
        assert_eq!((r.nodes, r.links), (4, 5));
        // The same without readable identities: the listed IDs agree.
        assert_eq!(check(&f, |_| None).errors, Vec::<String>::new());
    }

    #[test]
    fn one_sided_listings_split_pieces_and_wrong_ids_are_named() {
        let f = [
            node(1, &[(2, 2), (3, 3)]),
            node(2, &[(1, 1)]),
            node(3, &[]), // does not list 1 back
            node(4, &[(5, 5), (6, 6)]),
            node(5, &[(4, 9)]), // lists 4 under a wrong ID
            node(6, &[(4, 4)]),
        ];
        let r = check(&f, own);
        let all = r.errors.join("\n");
        assert!(
            all.contains("n1 lists n3, but n3 does not list n1"),
            "{all}"
        );
        assert!(all.contains("n5 list n4 with device ID"), "{all}");
        assert!(
            all.contains("n4 lists n5, but n5 does not list n4"),
            "{all}"
        );
        assert!(all.contains("falls apart into 4 pieces"), "{all}");
        assert!(all.contains("[n1, n2] [n4, n6]"), "{all}");
        // Without identities, n4's two IDs are named instead.
        let all = check(&f, |_| None).errors.join("\n");
        assert!(all.contains("n4 is listed under 2 device IDs"), "{all}");
    }

    #[test]
    fn a_wrong_port_and_an_unknown_peer_are_warnings() {
        let mut a = node(1, &[(2, 2), (7, 7)]);
        a.peers[0].address = "127.0.0.2:22001".parse().expect("addr");
        let f = [a, node(2, &[(1, 1)])];
        let r = check(&f, own);
        assert_eq!(r.errors, Vec::<String>::new());
        let all = r.warnings.join("\n");
        assert!(
            all.contains("n1 dials n2 at 127.0.0.2:22001, but n2 listens on 127.0.0.2:22000"),
            "{all}"
        );
        assert!(
            all.contains("lists peer \"n7\", whose config is not"),
            "{all}"
        );
        assert!(dialable(
            "10.0.0.1:22000".parse().expect("a"),
            "0.0.0.0:22000".parse().expect("b")
        ));
    }
}
