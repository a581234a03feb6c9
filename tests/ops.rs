//! Operations (issue #7): the firewall rules `certmesh firewall` prints (checked by
//! `nft -c`), the shipped packaging examples, the shell + jq config-management path,
//! and adding / removing a node with an inventory edit + SIGHUP. Nodes on
//! 127.0.0.50–59.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::util::{certmesh, wait_until, Node, BIN};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `cmd` with `input` on stdin.
fn run_with_input(cmd: &mut Command, input: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(input)
        .expect("writing stdin");
    child.wait_with_output().expect("waiting")
}

fn nft_check(rules: &str) -> Output {
    run_with_input(
        Command::new("nft").args(["-c", "-f", "-"]),
        rules.as_bytes(),
    )
}

fn firewall(config: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["firewall", "--config", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    certmesh(&args)
}

#[test]
fn firewall_rules_pass_nft_check() {
    let d = tempfile::tempdir().unwrap();
    let me = Node::new(d.path(), "fw0", "127.0.0.50");
    let v4 = Node::new(d.path(), "fw1", "127.0.0.51");
    let mut v6 = Node::new(d.path(), "fw2", "127.0.0.52");
    v6.addr = "[2001:db8::f002]:22000".into();
    me.configure(&[&v4, &v6]);

    // The check itself can fail: a broken ruleset is refused.
    assert!(
        !nft_check("table inet certmesh { chain input { udp dport x accept } }")
            .status
            .success()
    );

    for extra in [
        &["--interface", "lo"][..],
        &[][..],
        &["--format", "nft"][..],
    ] {
        let out = firewall(&me.config, extra);
        assert!(out.status.success(), "{}", text(&out));
        let rules = String::from_utf8(out.stdout).unwrap();
        let port = me.addr.rsplit(':').next().unwrap();
        assert!(rules.contains(&format!("udp dport {port} ")), "{rules}");
        assert!(rules.contains("elements = { 127.0.0.51 }"), "{rules}");
        // Listening on one IPv4 address: the IPv6 peer cannot reach it, no accept.
        assert!(!rules.contains("@peers6 udp"), "{rules}");
        let check = nft_check(&rules);
        assert!(
            check.status.success(),
            "nft -c refused:\n{rules}\n{}",
            text(&check)
        );
    }

    // Dual-stack listener, no peers at all: still a valid ruleset (drop only).
    let lone = d.path().join("lone.toml");
    fs::write(
        &lone,
        format!(
            "[node]\nname = \"lone\"\nstate_dir = \"{}\"\nlisten = \"[::]:22000\"\n[tree]\npath = \"{}\"\n",
            me.state.display(),
            me.tree.display()
        ),
    )
    .unwrap();
    let out = firewall(&lone, &["--interface", "eth1"]);
    assert!(out.status.success(), "{}", text(&out));
    let rules = String::from_utf8(out.stdout).unwrap();
    assert!(!rules.contains("accept\n"), "{rules}");
    assert!(nft_check(&rules).status.success(), "{rules}");

    // Usage and config errors: exit code 2, naming what was wrong.
    for (extra, says) in [
        (&["--format", "pf"][..], "invalid value 'pf' for '--format"),
        (&["--interface", "eth 1"][..], "--interface \"eth 1\""),
    ] {
        let out = firewall(&me.config, extra);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{}",
            text(&out)
        );
    }
    let missing = firewall(&d.path().join("nope.toml"), &[]);
    assert_eq!(missing.status.code(), Some(2), "{}", text(&missing));
    let host = d.path().join("host.toml");
    fs::write(
        &host,
        fs::read_to_string(&me.config)
            .unwrap()
            .replace("127.0.0.51:", "lb1.backnet:"),
    )
    .unwrap();
    let out = firewall(&host, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("peer.address"));
}

#[test]
fn shipped_packaging_files_match_the_code() {
    let example = format!("{ROOT}/packaging/firewall/example.toml");
    for format in ["nft", "iptables", "ip6tables"] {
        let out = Command::new(BIN)
            .current_dir(ROOT)
            .args([
                "firewall",
                "--config",
                "packaging/firewall/example.toml",
                "--format",
                format,
                "--interface",
                "eth1",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let shipped =
            fs::read_to_string(format!("{ROOT}/packaging/firewall/certmesh.{format}")).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            shipped,
            "packaging/firewall/certmesh.{format} is stale: regenerate it from {example}"
        );
        let restore = format!("{format}-restore");
        if format == "nft" {
            let check = nft_check(&shipped);
            assert!(check.status.success(), "{}", text(&check));
        } else if Command::new(&restore).arg("--version").output().is_ok() {
            let check = run_with_input(
                Command::new(&restore).args(["--test", "--noflush"]),
                shipped.as_bytes(),
            );
            assert!(check.status.success(), "{restore}: {}", text(&check));
        } else {
            eprintln!("{restore} not installed: only nft syntax is checked");
        }
    }
    // The conffile the .deb installs is a config `check` accepts.
    let shipped = fs::read_to_string(format!("{ROOT}/packaging/certmesh.toml")).unwrap();
    let local = tempfile::tempdir().unwrap();
    let conf = local.path().join("certmesh.toml");
    fs::write(&conf, crate::util::localized_config(&shipped, local.path())).unwrap();
    let out = certmesh(&["check", "--config", conf.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
}

/// The shell + jq path: `gen-peers.sh`, with a "transport" that runs the command
/// locally instead of over ssh.
struct Shell {
    dir: PathBuf,
}

impl Shell {
    fn new(root: &Path) -> Shell {
        let dir = root.join("shell");
        fs::create_dir_all(dir.join("bin")).unwrap();
        std::os::unix::fs::symlink(BIN, dir.join("bin/certmesh")).unwrap();
        // Like ssh: the words after the host are joined and run by a shell.
        fs::write(
            dir.join("local-ssh"),
            "#!/bin/sh\nshift\nexec sh -c \"$*\"\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir.join("local-ssh"), fs::Permissions::from_mode(0o755)).unwrap();
        Shell { dir }
    }

    fn gen(&self, args: &[&str]) -> Output {
        let path = format!(
            "{}:{}",
            self.dir.join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Command::new("sh")
            .arg(format!("{ROOT}/packaging/shell/gen-peers.sh"))
            .args(args)
            .env("PATH", path)
            .env("CERTMESH_SSH", self.dir.join("local-ssh"))
            .output()
            .expect("running gen-peers.sh")
    }

    /// Writes an inventory of `nodes` and collects their IDs into nodes.json.
    fn collect(&self, nodes: &[&Node]) -> PathBuf {
        let inv = serde_json::json!({
            "tree": "/unused/by/these/nodes",
            "nodes": nodes.iter().map(|n| serde_json::json!({
                "name": n.name,
                "address": n.addr,
                "state_dir": n.state,
                "tree": n.tree,
            })).collect::<Vec<_>>(),
        });
        let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
        let tag = names.join("-");
        let inventory = self.dir.join(format!("inventory-{tag}.json"));
        fs::write(&inventory, inv.to_string()).unwrap();
        let out = self.gen(&["collect", inventory.to_str().unwrap()]);
        assert!(out.status.success(), "collect: {}", text(&out));
        let collected = self.dir.join(format!("nodes-{tag}.json"));
        fs::write(&collected, &out.stdout).unwrap();
        collected
    }

    /// `gen-peers.sh push`: every node of `nodes_json` gets its config installed
    /// (after `certmesh check`) and is reloaded with SIGHUP, as `systemctl reload` does.
    fn push(&self, nodes_json: &Path, running: &[&Node]) {
        let mut json: serde_json::Value =
            serde_json::from_slice(&fs::read(nodes_json).unwrap()).unwrap();
        for n in json["nodes"].as_array_mut().unwrap() {
            let node = running
                .iter()
                .find(|r| n["name"] == r.name.as_str())
                .expect("pushing to a running node");
            let pid = node.child.as_ref().expect("running").id();
            n["config"] = node.config.to_str().unwrap().into();
            n["reload"] = format!("kill -HUP {pid}").into();
        }
        let pushed = nodes_json.with_extension("push.json");
        fs::write(&pushed, json.to_string()).unwrap();
        let out = self.gen(&["push", pushed.to_str().unwrap()]);
        assert!(out.status.success(), "push: {}", text(&out));
    }

    /// Renders `node`'s config from `nodes_json` into its config file.
    fn render(&self, nodes_json: &Path, node: &Node) {
        let out = self.gen(&["render", nodes_json.to_str().unwrap(), &node.name]);
        assert!(out.status.success(), "render {}: {}", node.name, text(&out));
        fs::write(&node.config, &out.stdout).unwrap();
        let check = certmesh(&["check", "--config", node.config.to_str().unwrap()]);
        assert!(check.status.success(), "{}: {}", node.name, text(&check));
    }
}

#[test]
fn shell_path_generates_configs_that_check_accepts() {
    let d = tempfile::tempdir().unwrap();
    let sh = Shell::new(d.path());
    let nodes: Vec<Node> = (0..3)
        .map(|i| Node::new(d.path(), &format!("gen{i}"), &format!("127.0.0.5{}", 3 + i)))
        .collect();
    let refs: Vec<&Node> = nodes.iter().collect();
    let collected = sh.collect(&refs);
    let json: serde_json::Value = serde_json::from_slice(&fs::read(&collected).unwrap()).unwrap();
    for (n, j) in nodes.iter().zip(json["nodes"].as_array().unwrap()) {
        assert_eq!(j["id"], n.id.as_str(), "collected ID of {}", n.name);
    }
    for n in &nodes {
        sh.render(&collected, n);
        let cfg = fs::read_to_string(&n.config).unwrap();
        assert!(!cfg.contains(&n.id), "{} lists itself:\n{cfg}", n.name);
        for other in nodes.iter().filter(|o| o.name != n.name) {
            assert!(cfg.contains(&format!("id = \"{}\"", other.id)), "{cfg}");
            assert!(
                cfg.contains(&format!("address = \"{}\"", other.addr)),
                "{cfg}"
            );
        }
        assert!(cfg.contains(&format!("path = \"{}\"", n.tree.display())));
    }
    // Mistakes are reported, not rendered.
    let out = sh.gen(&["render", collected.to_str().unwrap(), "nosuch"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node named \"nosuch\""));
    let bad = d.path().join("bad.json");
    fs::write(&bad, r#"{"nodes":[{"name":"x"}]}"#).unwrap();
    let out = sh.gen(&["collect", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing \"address\""));
}

/// Two regions × (2 hubs + 2 edges): name, hub, region.
const TWO_REGIONS: [(&str, bool, &str); 8] = [
    ("hub-a1", true, "a"),
    ("hub-a2", true, "a"),
    ("edge-a1", false, "a"),
    ("edge-a2", false, "a"),
    ("hub-b1", true, "b"),
    ("hub-b2", true, "b"),
    ("edge-b1", false, "b"),
    ("edge-b2", false, "b"),
];

/// `TWO_REGIONS`' nodes (identities made) on 127.0.7.`first`…
fn two_regions(dir: &Path, first: usize) -> Vec<Node> {
    TWO_REGIONS
        .iter()
        .enumerate()
        .map(|(i, (name, _, _))| Node::new(dir, name, &format!("127.0.7.{}", first + i)))
        .collect()
}

/// `certmesh check --fleet` on these configs.
fn check_fleet(configs: impl Iterator<Item = PathBuf>) -> Output {
    let mut args = vec!["check".to_string(), "--fleet".to_string()];
    args.extend(configs.map(|c| c.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    certmesh(&args)
}

/// `TWO_REGIONS` passed the fleet check: 6 hub–hub and 8 edge–hub links.
fn fleet_ok(out: &Output) {
    assert!(out.status.success(), "{}", text(out));
    assert!(
        text(out).contains("fleet: ok (8 nodes, 14 links"),
        "{}",
        text(out)
    );
}

/// The `[[peer]]` names of a rendered config, sorted.
fn configured_peers(config: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_to_string(config)
        .unwrap()
        .split("[[peer]]")
        .skip(1)
        .filter_map(|p| p.lines().find_map(|l| l.strip_prefix("name = \"")))
        .map(|l| l.trim_end_matches('"').to_string())
        .collect();
    v.sort();
    v
}

/// Issue 16: an inventory with `hub` / `region` renders a hub topology — each edge
/// peered with the hubs of its region, each hub with every hub and its region's
/// edges — and `certmesh check` accepts every config.
#[test]
fn shell_path_generates_a_hub_topology() {
    let d = tempfile::tempdir().unwrap();
    let sh = Shell::new(d.path());
    // Two regions × (2 hubs + 2 edges), on 127.0.7.20…
    let shape = TWO_REGIONS;
    let nodes = two_regions(d.path(), 20);
    let inv = serde_json::json!({
        "nodes": nodes.iter().zip(shape).map(|(n, (_, hub, region))| serde_json::json!({
            "name": n.name, "address": n.addr, "state_dir": n.state, "tree": n.tree,
            "id": n.id, "hub": hub, "region": region,
        })).collect::<Vec<_>>(),
    });
    let json = d.path().join("hubs.json");
    fs::write(&json, inv.to_string()).unwrap();
    let peers_of = |n: &Node| -> Vec<String> {
        sh.render(&json, n);
        configured_peers(&n.config)
    };
    assert_eq!(peers_of(&nodes[2]), ["hub-a1", "hub-a2"]);
    assert_eq!(peers_of(&nodes[7]), ["hub-b1", "hub-b2"]);
    assert_eq!(
        peers_of(&nodes[0]),
        ["edge-a1", "edge-a2", "hub-a2", "hub-b1", "hub-b2"]
    );
    // The rendered fleet, checked as one: every link listed at both ends, one piece.
    for n in &nodes {
        sh.render(&json, n);
    }
    let fleet = |nodes: &[Node]| check_fleet(nodes.iter().map(|n| n.config.clone()));
    fleet_ok(&fleet(&nodes));
    // A hub that no longer lists one of its edges (a hand edit, a stale render):
    // named, exit 2; with both hubs of region b dropping edge-b1, it is cut off.
    let drop_peer = |n: &Node, peer: &str| {
        let cfg = fs::read_to_string(&n.config).unwrap();
        let kept: Vec<&str> = cfg
            .split("[[peer]]")
            .filter(|b| !b.contains(&format!("name = \"{peer}\"")))
            .collect();
        fs::write(&n.config, kept.join("[[peer]]")).unwrap();
    };
    // The fleet check fails (exit 2) naming `want`; its output.
    let refused = |want: &str| -> String {
        let out = fleet(&nodes);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(text(&out).contains(want), "{}", text(&out));
        text(&out)
    };
    drop_peer(&nodes[0], "edge-a1");
    let out = refused("edge-a1 lists hub-a1, but hub-a1 does not list edge-a1");
    assert!(!out.contains("pieces"), "{out}");
    drop_peer(&nodes[4], "edge-b1");
    drop_peer(&nodes[5], "edge-b1");
    refused(
        "falls apart into 2 pieces that never sync with each other: \
         [hub-a1, hub-a2, edge-a1, edge-a2, hub-b1 and 2 more] [edge-b1]",
    );
    // An edge in a region without a hub is refused.
    let bad = d.path().join("bad.json");
    let mut inv = inv;
    inv["nodes"][3]["region"] = "c".into();
    fs::write(&bad, inv.to_string()).unwrap();
    let out = sh.gen(&["render", bad.to_str().unwrap(), "hub-a1"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no hub in region \"c\""),
        "{}",
        text(&out)
    );
}

#[test]
fn check_warns_about_a_node_with_one_peer_or_none() {
    let d = tempfile::tempdir().unwrap();
    let a = Node::new(d.path(), "lonely", "127.0.7.30");
    let b = Node::new(d.path(), "other", "127.0.7.31");
    a.configure(&[]);
    let out = certmesh(&["check", "--config", a.config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("not connected to any other node"),
        "{}",
        text(&out)
    );
    a.configure(&[&b]);
    let out = certmesh(&["check", "--config", a.config.to_str().unwrap()]);
    assert!(text(&out).contains("one [[peer]] only"), "{}", text(&out));
}

fn peer_names(n: &Node) -> Option<Vec<String>> {
    let s = n.status();
    let mut v: Vec<String> = s["peers"]
        .as_array()?
        .iter()
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect();
    v.sort();
    Some(v)
}

fn connected_to(n: &Node, peer: &str) -> bool {
    n.status()["peers"].as_array().is_some_and(|ps| {
        ps.iter()
            .any(|p| p["name"] == peer && p["connected"] == true)
    })
}

fn connected_to_nobody(n: &Node) -> bool {
    n.status()["peers"]
        .as_array()
        .is_some_and(|ps| ps.iter().all(|p| p["connected"] == false))
}

#[test]
fn inventory_edit_and_sighup_add_then_remove_a_node() {
    let d = tempfile::tempdir().unwrap();
    let sh = Shell::new(d.path());
    let mut a = Node::new(d.path(), "a", "127.0.0.56");
    let mut b = Node::new(d.path(), "b", "127.0.0.57");
    let mut c = Node::new(d.path(), "c", "127.0.0.58");

    // A and B form the mesh; C is configured with both, but neither lists C yet.
    let ab = sh.collect(&[&a, &b]);
    let abc = sh.collect(&[&a, &b, &c]);
    sh.render(&ab, &a);
    sh.render(&ab, &b);
    sh.render(&abc, &c);
    a.start();
    b.start();
    wait_until("a and b connected", || {
        a.all_connected() && b.all_connected()
    });
    c.write("from-c", "written on c before anyone lists it");
    c.start();
    wait_until("c's dials refused by a and b", || {
        let s = c.status();
        s["peers"].as_array().is_some_and(|ps| {
            ps.len() == 2
                && ps
                    .iter()
                    .all(|p| p["connected"] == false && p["last_error"].is_string())
        })
    });
    let refused = c.status()["peers"][0]["last_error"].to_string();
    assert!(
        refused.contains("does the peer list this node?"),
        "{refused}"
    );
    assert_eq!(peer_names(&a), Some(vec!["b".to_string()]));
    assert!(a.read("from-c").is_none() && b.read("from-c").is_none());

    // Adding C: the inventory gains C; `push` installs every node's config and
    // reloads it (SIGHUP).
    let (pid_a, pid_b) = (
        a.child.as_ref().unwrap().id(),
        b.child.as_ref().unwrap().id(),
    );
    sh.push(&abc, &[&a, &b, &c]);
    assert!(fs::read_to_string(&a.config).unwrap().contains(&c.id));
    wait_until("c's file on a and b", || {
        a.read("from-c").is_some() && b.read("from-c").is_some()
    });
    wait_until("full mesh of 3", || {
        a.all_connected() && b.all_connected() && c.all_connected()
    });
    a.write("from-a", "reaches everyone");
    wait_until("a's file on b and c", || {
        b.read("from-a").is_some() && c.read("from-a").is_some()
    });
    // Reloaded, not restarted.
    assert_eq!(a.child.as_ref().unwrap().id(), pid_a);
    assert_eq!(b.child.as_ref().unwrap().id(), pid_b);
    assert!(a.child.as_mut().unwrap().try_wait().unwrap().is_none());
    assert!(a.log().contains("peer list reloaded"));

    // Removing B: the inventory loses B, A and C reload; B is cut off.
    let ac = sh.collect(&[&a, &c]);
    sh.push(&ac, &[&a, &c]);
    wait_until("b gone from a's and c's status", || {
        peer_names(&a) == Some(vec!["c".to_string()])
            && peer_names(&c) == Some(vec!["a".to_string()])
    });
    wait_until("b connected to nobody", || connected_to_nobody(&b));
    assert!(connected_to(&a, "c") && connected_to(&c, "a"));
    let seq = |n: &Node| n.status()["tree"]["sequence"].as_u64();
    let before = seq(&b).expect("b's status has tree.sequence");
    b.write("from-b-after-removal", "must not arrive");
    wait_until("b indexed its change", || {
        seq(&b).is_some_and(|s| s > before)
    });
    // A and C still sync with each other; B's change reaches neither, A's not B.
    a.write("from-a-after-removal", "a and c only");
    wait_until("a's later file on c", || {
        c.read("from-a-after-removal").is_some()
    });
    c.write("from-c-after-removal", "c and a only");
    wait_until("c's later file on a", || {
        a.read("from-c-after-removal").is_some()
    });
    assert!(connected_to_nobody(&b), "b reconnected: {}", b.status());
    assert!(a.read("from-b-after-removal").is_none());
    assert!(c.read("from-b-after-removal").is_none());
    assert!(b.read("from-a-after-removal").is_none());
    assert!(a.log().contains("peer removed from config"));
    for n in [&mut a, &mut b, &mut c] {
        n.stop();
    }
}

#[test]
fn rotating_an_identity_as_the_readme_says() {
    let d = tempfile::tempdir().unwrap();
    let sh = Shell::new(d.path());
    let mut a = Node::new(d.path(), "rot-a", "127.0.0.59");
    let mut b = Node::new(d.path(), "rot-b", "127.0.0.55");
    let both = sh.collect(&[&a, &b]);
    sh.render(&both, &a);
    sh.render(&both, &b);
    a.start();
    b.start();
    a.write("live-before", "synced before the rotation");
    wait_until("first file on b", || b.read("live-before").is_some());

    // On b: stop, move the key + cert away (keep index.db), init a new identity.
    b.stop();
    let old = d.path().join("old-id");
    fs::create_dir_all(&old).unwrap();
    for f in ["node-key.pem", "node-cert.pem"] {
        fs::rename(b.state.join(f), old.join(f)).unwrap();
    }
    let out = certmesh(&["init", "--state-dir", b.state.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let new_id = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    assert_ne!(new_id, b.id, "init made no new identity");
    b.id = new_id.clone();
    a.write("while-b-was-away", "fetched after the rotation");

    // The inventory reads the new ID; a reloads, b starts with it.
    let rotated = sh.collect(&[&a, &b]);
    sh.render(&rotated, &a);
    sh.render(&rotated, &b);
    a.signal(libc::SIGHUP);
    b.start();
    wait_until("a connected to b's new identity", || {
        a.status()["peers"].as_array().is_some_and(|ps| {
            ps.len() == 1 && ps[0]["id"] == new_id.as_str() && ps[0]["connected"] == true
        })
    });
    wait_until("b caught up", || b.read("while-b-was-away").is_some());
    b.write("after-rotation", "from the new identity");
    wait_until("b's new file on a", || a.read("after-rotation").is_some());
    wait_until("in sync both ways", || a.all_in_sync() && b.all_in_sync());
    let conflicts = |n: &Node| {
        fs::read_dir(n.tree.join(".certmesh/conflicts"))
            .map(|rd| rd.count())
            .unwrap_or(0)
    };
    assert_eq!(
        (conflicts(&a), conflicts(&b)),
        (0, 0),
        "rotation made conflicts"
    );
    a.stop();
    b.stop();
}

/// Issue 16, the Ansible path: the role's real template, rendered by real Ansible
/// (ad hoc, `-c local`, one render per inventory host) from an INI inventory with
/// `certmesh_hub` / `certmesh_region`, gives the hub topology, and every rendered
/// config passes `certmesh check`. `certmesh_hub=false` written out in INI (a string
/// there, not a boolean) makes no hub.
#[test]
fn ansible_role_renders_a_hub_topology() {
    if Command::new("ansible").arg("--version").output().is_err() {
        eprintln!("SKIP: ansible (Debian package ansible-core) is not installed");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    // Two regions × (2 hubs + 2 edges), on 127.0.7.40…
    // TWO_REGIONS' hubs and edges, as an INI inventory may write them.
    let hubs = [
        Some("true"),
        Some("True"),
        Some("false"),
        None,
        Some("yes"),
        Some("true"),
        Some("no"),
        None,
    ];
    let shape = TWO_REGIONS;
    let nodes = two_regions(d.path(), 40);
    let template = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging/ansible/roles/certmesh/templates/certmesh.toml.j2");
    // Renders every host's config from an inventory whose hosts have these
    // `certmesh_hub` values; returns the directory of the configs.
    let render = |label: &str, hubs: &[Option<&str>]| -> PathBuf {
        let mut inv = String::from("[certmesh]\n");
        for ((n, (_, _, region)), hub) in nodes.iter().zip(shape).zip(hubs) {
            let (ip, port) = n.addr.rsplit_once(':').unwrap();
            inv += &format!(
                "{} certmesh_address={ip} certmesh_port={port} certmesh_id={} certmesh_region={region} certmesh_state_dir={} certmesh_tree={}{}\n",
                n.name,
                n.id,
                n.state.display(),
                n.tree.display(),
                hub.map(|h| format!(" certmesh_hub={h}")).unwrap_or_default(),
            );
        }
        let inv_path = d.path().join(format!("{label}.ini"));
        fs::write(&inv_path, inv).unwrap();
        let out_dir = d.path().join(label);
        fs::create_dir_all(&out_dir).unwrap();
        let out = Command::new("ansible")
            .args(["certmesh", "-i"])
            .arg(&inv_path)
            .args(["-c", "local", "-m", "ansible.builtin.template", "-a"])
            .arg(format!(
                "src={} dest={}/{{{{ inventory_hostname }}}}.toml",
                template.display(),
                out_dir.display()
            ))
            .args(["-e", "certmesh_group=certmesh certmesh_common_toml=''"])
            .env("ANSIBLE_LOCAL_TEMP", d.path().join("ansible-tmp"))
            .env("ANSIBLE_REMOTE_TEMP", d.path().join("ansible-tmp"))
            .env("ANSIBLE_PYTHON_INTERPRETER", "auto_silent")
            .env("ANSIBLE_NOCOLOR", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        out_dir
    };
    let peers_of = |dir: &Path, n: &Node| configured_peers(&dir.join(format!("{}.toml", n.name)));
    let out_dir = render("hubs", &hubs);
    let peers = |i: usize| peers_of(&out_dir, &nodes[i]);
    assert_eq!(peers(2), ["hub-a1", "hub-a2"]);
    assert_eq!(peers(3), ["hub-a1", "hub-a2"]);
    assert_eq!(peers(6), ["hub-b1", "hub-b2"]);
    assert_eq!(
        peers(0),
        ["edge-a1", "edge-a2", "hub-a2", "hub-b1", "hub-b2"]
    );
    assert_eq!(
        peers(5),
        ["edge-b1", "edge-b2", "hub-a1", "hub-a2", "hub-b1"]
    );
    // Every host a non-hub (false, or not set): the full mesh.
    let mesh = render(
        "mesh",
        &[
            Some("false"),
            None,
            Some("no"),
            None,
            None,
            None,
            None,
            None,
        ],
    );
    for n in &nodes {
        assert_eq!(peers_of(&mesh, n).len(), nodes.len() - 1, "{}", n.name);
    }
    // Each config and the graph they form.
    fleet_ok(&check_fleet(
        nodes
            .iter()
            .map(|n| out_dir.join(format!("{}.toml", n.name))),
    ));
}
