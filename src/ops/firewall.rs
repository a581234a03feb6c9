//! `certmesh firewall`: the packet filter rules that admit this node's QUIC port only
//! from its configured peers (and, optionally, only on the backnet interface).
//!
//! Pure: a validated [`Config`] in, ruleset text out. Peer addresses in the config are
//! IP literals (the config refuses host names, naming the key and line), so the rules
//! are exact and never depend on DNS at the time they are generated. The same rule
//! covers both directions: this node dials its peers from its listen port, so their
//! answers arrive on it from the addresses listed here.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use crate::config::Config;

/// Which packet filter the rules are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// An nftables script (`nft -f`): its own `inet certmesh` table, replaced atomically.
    Nft,
    /// `iptables-restore --noflush` input: the IPv4 `certmesh-in` chain.
    Iptables,
    /// `ip6tables-restore --noflush` input: the IPv6 `certmesh-in` chain.
    Ip6tables,
}

impl Format {
    pub const NAMES: &'static str = "nft | iptables | ip6tables";

    pub fn parse(s: &str) -> Option<Format> {
        Some(match s {
            "nft" | "nftables" => Format::Nft,
            "iptables" => Format::Iptables,
            "ip6tables" => Format::Ip6tables,
            _ => return None,
        })
    }
}

/// Why no ruleset could be produced.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    /// `--interface` is not a name the kernel accepts.
    #[error("--interface {0:?}: not an interface name (1 to 15 characters, no '/', whitespace, quotes or ':')")]
    Interface(String),
    /// `--format` is not one we know.
    #[error("--format {0:?}: expected {names}", names = Format::NAMES)]
    Format(String),
}

/// Name of the iptables chain (and nftables table) the rules live in.
pub const CHAIN: &str = "certmesh-in";

/// Checks an interface name the way the kernel does (`dev_valid_name`), and keeps
/// characters out that would need quoting in either ruleset language.
pub fn valid_interface(name: &str) -> Result<(), FirewallError> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '/' | ':' | '"' | '\'' | '\\'));
    if ok {
        Ok(())
    } else {
        Err(FirewallError::Interface(name.to_string()))
    }
}

/// The addresses the rules admit, split by family, deduplicated, in config order.
fn peer_addrs(config: &Config) -> (Vec<IpAddr>, Vec<IpAddr>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for p in &config.peers {
        let ip = canonical(p.address);
        let list = if ip.is_ipv4() { &mut v4 } else { &mut v6 };
        if !list.contains(&ip) {
            list.push(ip);
        }
    }
    (v4, v6)
}

/// An IPv4-mapped IPv6 peer address (`[::ffff:10.0.0.2]:22000`) arrives as IPv4.
fn canonical(a: SocketAddr) -> IpAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        ip => ip,
    }
}

/// Which families the listen address can receive: a specific address only its own,
/// `[::]` both (dual-stack socket), `0.0.0.0` IPv4 only.
fn families(listen: SocketAddr) -> (bool, bool) {
    match canonical(listen) {
        IpAddr::V4(_) => (true, false),
        IpAddr::V6(v6) if v6.is_unspecified() => (true, true),
        IpAddr::V6(_) => (false, true),
    }
}

/// The destination address to match, when the node listens on one address only.
fn daddr(listen: SocketAddr) -> Option<IpAddr> {
    let ip = canonical(listen);
    (!ip.is_unspecified()).then_some(ip)
}

/// Renders the ruleset for `config`'s listen port and peer list.
pub fn render(
    config: &Config,
    format: Format,
    interface: Option<&str>,
) -> Result<String, FirewallError> {
    if let Some(i) = interface {
        valid_interface(i)?;
    }
    Ok(match format {
        Format::Nft => nft(config, interface),
        Format::Iptables => iptables(config, interface, false),
        Format::Ip6tables => iptables(config, interface, true),
    })
}

fn header(out: &mut String, config: &Config, interface: Option<&str>) {
    let _ = writeln!(
        out,
        "# certmesh firewall for node {:?}, generated from {}",
        config.name,
        config.file.display()
    );
    let _ = writeln!(
        out,
        "# Admits UDP port {} ({}) only from the {} configured peer(s){}; drops the rest.",
        config.listen.port(),
        config.listen,
        config.peers.len(),
        interface
            .map(|i| format!(" on interface {i}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "# Regenerate after every peer-list change: certmesh firewall --config {} ...",
        config.file.display()
    );
}

fn nft(config: &Config, interface: Option<&str>) -> String {
    let (v4, v6) = peer_addrs(config);
    let (want4, want6) = families(config.listen);
    let port = config.listen.port();
    let mut out = String::new();
    header(&mut out, config, interface);
    out.push_str(
        "# Load with `nft -f FILE`: the table is replaced as one transaction. A drop here is\n\
         # final; an accept only ends this table's chain, so a host ruleset whose input\n\
         # policy is drop must also accept this port (everyone else was dropped here).\n",
    );
    out.push_str("table inet certmesh\ndelete table inet certmesh\n\n");
    out.push_str("table inet certmesh {\n");
    let set = |out: &mut String, name: &str, ty: &str, ips: &[IpAddr]| {
        let _ = writeln!(out, "\tset {name} {{\n\t\ttype {ty}");
        if !ips.is_empty() {
            let list: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
            let _ = writeln!(out, "\t\telements = {{ {} }}", list.join(", "));
        }
        out.push_str("\t}\n\n");
    };
    set(&mut out, "peers4", "ipv4_addr", &v4);
    set(&mut out, "peers6", "ipv6_addr", &v6);
    out.push_str(
        "\tchain input {\n\t\ttype filter hook input priority filter - 10; policy accept;\n",
    );
    let to = match daddr(config.listen) {
        Some(IpAddr::V4(a)) => format!("ip daddr {a} "),
        Some(IpAddr::V6(a)) => format!("ip6 daddr {a} "),
        None => String::new(),
    };
    let iif = interface
        .map(|i| format!("iifname \"{i}\" "))
        .unwrap_or_default();
    if want4 && !v4.is_empty() {
        let _ = writeln!(out, "\t\t{iif}{to}ip saddr @peers4 udp dport {port} accept");
    }
    if want6 && !v6.is_empty() {
        let _ = writeln!(
            out,
            "\t\t{iif}{to}ip6 saddr @peers6 udp dport {port} accept"
        );
    }
    let _ = writeln!(
        out,
        "\t\t{to}udp dport {port} counter drop comment \"certmesh: not a configured peer\""
    );
    out.push_str("\t}\n}\n");
    out
}

fn iptables(config: &Config, interface: Option<&str>, v6: bool) -> String {
    let (v4s, v6s) = peer_addrs(config);
    let (want4, want6) = families(config.listen);
    let (ips, want, prefix, tool) = if v6 {
        (v6s, want6, 128, "ip6tables")
    } else {
        (v4s, want4, 32, "iptables")
    };
    let port = config.listen.port();
    let mut out = String::new();
    header(&mut out, config, interface);
    let to = match daddr(config.listen) {
        Some(a) if a.is_ipv6() == v6 => format!("-d {a}/{prefix} "),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "# Load with `{tool}-restore --noflush FILE` (only the {CHAIN} chain is replaced), and\n\
         # jump to it once from INPUT:\n\
         #   {tool} -C INPUT -p udp --dport {port} -j {CHAIN} 2>/dev/null || \\\n\
         #     {tool} -I INPUT -p udp --dport {port} -j {CHAIN}"
    );
    if !want {
        let _ = writeln!(
            out,
            "# node.listen {} does not receive {}: nothing from these peers can reach it.",
            config.listen,
            if v6 { "IPv6" } else { "IPv4" }
        );
    }
    let _ = writeln!(out, "*filter\n:{CHAIN} - [0:0]");
    let iif = interface.map(|i| format!("-i {i} ")).unwrap_or_default();
    if want {
        for ip in &ips {
            let _ = writeln!(
                out,
                "-A {CHAIN} {iif}-s {ip}/{prefix} {to}-p udp -m udp --dport {port} -j ACCEPT"
            );
        }
    }
    let _ = writeln!(
        out,
        "-A {CHAIN} {to}-p udp -m udp --dport {port} -m comment --comment \"certmesh: not a configured peer\" -j DROP"
    );
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(listen: &str, peers: &[&str]) -> Config {
        let ids: Vec<String> = (0..peers.len())
            .map(|i| crate::core::device::DeviceId::of_cert(&[i as u8]).to_string())
            .collect();
        let mut text = format!(
            "[node]\nname = \"lb0\"\nstate_dir = \"/var/lib/certmesh\"\nlisten = \"{listen}\"\n\
             [tree]\npath = \"/etc/ssl/certmesh\"\n"
        );
        for (i, p) in peers.iter().enumerate() {
            let _ = write!(
                text,
                "[[peer]]\nname = \"p{i}\"\nid = \"{}\"\naddress = \"{p}\"\n",
                ids[i]
            );
        }
        Config::parse(Path::new("/etc/certmesh/certmesh.toml"), &text).expect("test config")
    }

    #[test]
    fn nft_admits_each_family_on_the_interface_then_drops() {
        let c = config(
            "[::]:22000",
            &["10.0.0.2:22000", "[2001:db8::2]:22000", "10.0.0.3:22001"],
        );
        let s = render(&c, Format::Nft, Some("eth1")).unwrap();
        assert!(s.contains("elements = { 10.0.0.2, 10.0.0.3 }"), "{s}");
        assert!(s.contains("elements = { 2001:db8::2 }"), "{s}");
        assert!(s.contains("iifname \"eth1\" ip saddr @peers4 udp dport 22000 accept"));
        assert!(s.contains("iifname \"eth1\" ip6 saddr @peers6 udp dport 22000 accept"));
        let drop = s.find("udp dport 22000 counter drop").unwrap();
        assert!(
            s.find("accept\n").unwrap() < drop,
            "accepts come before the drop"
        );
    }

    #[test]
    fn specific_listen_address_limits_family_and_destination() {
        let c = config("10.0.0.1:22000", &["10.0.0.2:22000", "[2001:db8::2]:22000"]);
        let s = render(&c, Format::Nft, None).unwrap();
        assert!(s.contains("ip daddr 10.0.0.1 ip saddr @peers4 udp dport 22000 accept"));
        assert!(
            !s.contains("@peers6 udp"),
            "IPv4 socket: no IPv6 accept\n{s}"
        );
        let v6 = render(&c, Format::Ip6tables, None).unwrap();
        assert!(!v6.contains("ACCEPT"), "{v6}");
        let v4 = render(&c, Format::Iptables, None).unwrap();
        assert!(v4.contains(
            "-A certmesh-in -s 10.0.0.2/32 -d 10.0.0.1/32 -p udp -m udp --dport 22000 -j ACCEPT"
        ));
        assert!(v4.trim_end().ends_with("-j DROP\nCOMMIT"));
    }

    #[test]
    fn no_peers_still_valid_and_mapped_addresses_are_ipv4() {
        let c = config("0.0.0.0:22000", &[]);
        let s = render(&c, Format::Nft, None).unwrap();
        assert!(!s.contains("elements"));
        assert!(s.contains("udp dport 22000 counter drop"));
        let c = config("[::]:22000", &["[::ffff:10.0.0.9]:22000"]);
        let s = render(&c, Format::Iptables, None).unwrap();
        assert!(s.contains("-s 10.0.0.9/32"), "{s}");
    }

    #[test]
    fn bad_interface_names_are_refused() {
        let c = config("[::]:22000", &[]);
        for bad in [
            "",
            "a\"b",
            "eth 1",
            "way-too-long-name0",
            "a/b",
            "..",
            "x;y'",
        ] {
            assert!(
                render(&c, Format::Nft, Some(bad)).is_err(),
                "{bad:?} accepted"
            );
        }
        assert!(render(&c, Format::Nft, Some("enp3s0.100")).is_ok());
        assert_eq!(Format::parse("ip6tables"), Some(Format::Ip6tables));
        assert_eq!(Format::parse("pf"), None);
    }
}
