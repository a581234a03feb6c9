//! `[tree] dhparam`: the RFC 7919 group is written once, cluster-wide, and an
//! operator's own `dhparam.pem` is never replaced. Nodes on 127.0.0.64-68.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::util::{wait_until, Cluster, Node};

const DHPARAM: &str = "dhparam = \"ffdhe2048\"\n";

/// `n` full-mesh nodes on `ips` with `dhparam` set under `[tree]` on every one.
fn cluster(ips: &[&str]) -> Cluster {
    let dir = tempfile::Builder::new()
        .prefix("certmesh-dhparam-")
        .tempdir()
        .unwrap();
    let nodes: Vec<Node> = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| Node::new(dir.path(), &format!("d{}", i + 1), ip))
        .collect();
    for n in &nodes {
        let peers: Vec<&Node> = nodes.iter().filter(|p| p.name != n.name).collect();
        n.configure(&peers);
        let cfg = fs::read_to_string(&n.config).unwrap();
        let path_line = format!("path = \"{}\"\n", n.tree.display());
        fs::write(
            &n.config,
            cfg.replacen(&path_line, &format!("{path_line}{DHPARAM}"), 1),
        )
        .unwrap();
    }
    Cluster { nodes, dir }
}

fn openssl(args: &[&str], file: &Path) -> Option<String> {
    let out = Command::new("openssl")
        .args(args)
        .arg("-in")
        .arg(file)
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

fn conflicts(n: &Node) -> usize {
    fs::read_dir(n.tree.join(".certmesh/conflicts"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn dhparam_is_written_once_for_the_cluster() {
    let mut c = cluster(&["127.0.0.64", "127.0.0.65", "127.0.0.66"]);
    c.start_all();
    wait_until("dhparam.pem on every node", || {
        c.nodes.iter().all(|n| n.read("dhparam.pem").is_some())
    });
    c.wait_converged();
    let pem = c.nodes[0].read("dhparam.pem").unwrap();
    assert!(pem.starts_with("-----BEGIN DH PARAMETERS-----\n"), "{pem}");
    for n in &c.nodes {
        assert_eq!(n.read("dhparam.pem").as_deref(), Some(pem.as_str()));
        assert_eq!(conflicts(n), 0, "{}: conflict copies", n.name);
    }
    let file = c.nodes[1].tree.join("dhparam.pem");
    // OpenSSL checks the group and recognises it as the named RFC 7919 group.
    if let Some(out) = openssl(&["dhparam", "-check", "-noout"], &file) {
        assert!(out.contains("DH parameters appear to be ok"), "{out}");
        let text = openssl(&["pkeyparam", "-text", "-noout"], &file).unwrap();
        assert!(text.contains("GROUP: ffdhe2048"), "{text}");
    } else {
        eprintln!("openssl not installed: group not checked with it");
    }
    for n in &mut c.nodes {
        n.stop();
    }
}

#[test]
fn an_operators_dhparam_is_kept() {
    let mut c = cluster(&["127.0.0.67", "127.0.0.68"]);
    let own = "-----BEGIN DH PARAMETERS-----\noperator's own group\n-----END DH PARAMETERS-----\n";
    c.nodes[0].write("dhparam.pem", own);
    c.start_all();
    wait_until("the operator's dhparam.pem on every node", || {
        c.nodes
            .iter()
            .all(|n| n.read("dhparam.pem").as_deref() == Some(own))
    });
    c.wait_converged();
    wait_until("the keep notice in the operator node's log", || {
        c.nodes[0].log().contains("keeping the operator's file")
    });
    for n in &mut c.nodes {
        assert_eq!(n.read("dhparam.pem").as_deref(), Some(own), "{}", n.name);
        n.stop();
    }
}
