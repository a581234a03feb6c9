//! Issue 29 item 1: certificates as data. `certmesh cert add|remove|list` on one node
//! writes `.certmesh/certificates/<name>.toml`; every node learns it through sync and
//! the renewer orders it from a real Pebble. Real processes, Pebble and nginx, on
//! 127.0.12.2–127.0.12.250.

use std::fs;

use crate::acme::{nginx, tools_present, Pebble, Proc, ISSUE_DEADLINE};
use crate::util::free_tcp;
use crate::util::{certmesh, wait_until, Node};

/// `renewer` (the only `[acme]` node), `b` and `c`, in a full mesh; nginx serves
/// the renewer's `acme/` to Pebble's validator.
struct Fleet {
    renewer: Node,
    b: Node,
    c: Node,
    pebble: Pebble,
    _web: Proc,
    _dir: tempfile::TempDir,
}

impl Fleet {
    fn all(&self) -> [&Node; 3] {
        [&self.renewer, &self.b, &self.c]
    }

    /// Points `domain` at the renewer's nginx in Pebble's DNS.
    fn resolve(&self, domain: &str) {
        let ip = self.renewer.addr.rsplit_once(':').unwrap().0;
        self.pebble.set_a(domain, ip);
    }
}

/// A running fleet on `ips`; `extra` is appended to the renewer's config.
fn fleet(ips: [&str; 3], extra: &str) -> Fleet {
    let dir = tempfile::Builder::new()
        .prefix("certmesh-certs-")
        .tempdir()
        .unwrap();
    let mut nodes: Vec<Node> = ["renewer", "b", "c"]
        .iter()
        .zip(ips)
        .map(|(name, ip)| Node::new(dir.path(), name, ip))
        .collect();
    for i in 0..3 {
        let others: Vec<&Node> = (0..3).filter(|&j| j != i).map(|j| &nodes[j]).collect();
        nodes[i].configure(&others);
    }
    let pebble = Pebble::start(dir.path(), free_tcp(ips[0]));
    fs::create_dir_all(nodes[0].tree.join("acme")).unwrap();
    let web = nginx(dir.path(), ips[0], pebble.http_port, &nodes[0].tree);
    append(
        &nodes[0],
        &format!(
            "\n[acme]\ndirectory = \"{}\"\nca_roots = \"{}\"\n{extra}",
            pebble.directory,
            pebble.ca_roots.display()
        ),
    );
    for n in &mut nodes {
        n.start();
    }
    let mut it = nodes.into_iter();
    let f = Fleet {
        renewer: it.next().unwrap(),
        b: it.next().unwrap(),
        c: it.next().unwrap(),
        pebble,
        _web: web,
        _dir: dir,
    };
    for n in f.all() {
        wait_until(&format!("{} connected", n.name), || n.all_connected());
    }
    f
}

fn append(node: &Node, text: &str) {
    let mut cfg = fs::read_to_string(&node.config).unwrap();
    cfg.push_str(text);
    fs::write(&node.config, cfg).unwrap();
}

/// `certmesh cert ARGS --config <node's>`: (success, stdout + stderr).
fn cert(node: &Node, args: &[&str]) -> (bool, String) {
    let mut all = vec!["cert", args[0], "--config", node.config.to_str().unwrap()];
    all.extend_from_slice(&args[1..]);
    let out = certmesh(&all);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The DNS names of the leaf `live/<name>/fullchain.pem` serves on `node`.
fn live_sans(node: &Node, name: &str) -> Option<Vec<String>> {
    let pem = fs::read(node.tree.join(format!("live/{name}/fullchain.pem"))).ok()?;
    let der = x509_parser::pem::Pem::iter_from_buffer(&pem).next()?.ok()?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&der.contents).ok()?;
    let san = leaf.subject_alternative_name().ok()??;
    Some(
        san.value
            .general_names
            .iter()
            .map(|g| g.to_string())
            .collect(),
    )
}

/// Waits until `name` is live on every node of `f`, with `domain` in its names.
fn wait_live_everywhere(f: &Fleet, name: &str, domain: &str) {
    let start = std::time::Instant::now();
    while start.elapsed() < ISSUE_DEADLINE {
        let all = f.all().iter().all(|n| {
            live_sans(n, name).is_some_and(|s| s.iter().any(|d| d.contains(domain)))
                && n.tree.join(format!("live/{name}/combined.pem")).exists()
        });
        if all {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("{name} not live everywhere\n{}", f.renewer.log());
}

/// The `certificates[]` entry called `name` in `node`'s status.
fn cert_status(node: &Node, name: &str) -> serde_json::Value {
    let s = node.status();
    s["certificates"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name).cloned())
        .unwrap_or(serde_json::Value::Null)
}

#[test]
fn certs_added_on_one_node_is_issued_and_live_on_every_node() {
    if !tools_present() {
        return;
    }
    let f = fleet(["127.0.12.2", "127.0.12.3", "127.0.12.4"], "");
    f.resolve("shop.certs.test");
    let (ok, out) = cert(&f.b, &["add", "shop", "--domain", "shop.certs.test"]);
    assert!(ok, "{out}");
    wait_live_everywhere(&f, "shop", "shop.certs.test");
    for n in f.all() {
        assert_eq!(cert_status(n, "shop")["source"], "tree", "{}", n.name);
    }
    let (ok, out) = cert(&f.c, &["list"]);
    assert!(
        ok && out.contains("shop  shop.certs.test  tree  live"),
        "{out}"
    );
}

#[test]
fn certs_add_on_a_reader_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (w, r) = (
        Node::new(dir.path(), "w", "127.0.12.10"),
        Node::new(dir.path(), "r", "127.0.12.11"),
    );
    r.configure(&[&w]);
    let path_line = format!("path = \"{}\"\n", r.tree.display());
    let cfg = fs::read_to_string(&r.config).unwrap();
    let with = format!("{path_line}writers = [\"w\"]\n");
    fs::write(&r.config, cfg.replacen(&path_line, &with, 1)).unwrap();
    let (ok, out) = cert(&r, &["add", "shop", "--domain", "shop.certs.test"]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("r is a reader") && out.contains("on a writer (w)"),
        "{out}"
    );
    assert!(!r.tree.join(".certmesh/certificates").exists());
}

#[test]
fn certs_a_peers_malformed_entry_is_refused_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut good = Node::new(dir.path(), "good", "127.0.12.20");
    let mut bad = Node::new(dir.path(), "bad", "127.0.12.21");
    good.configure(&[&bad]);
    bad.configure(&[&good]);
    good.start();
    bad.start();
    wait_until("connected", || good.all_connected());
    // The bad node edits its own tree: junk, an entry too large, one named wrongly.
    bad.write(".certmesh/certificates/junk.toml", "name = [[[");
    let huge = format!(
        "name = \"big\"\ndomains = [\"a.example\"]\n#{}\n",
        "x".repeat(20_000)
    );
    bad.write(".certmesh/certificates/big.toml", &huge);
    bad.write(
        ".certmesh/certificates/other.toml",
        "name = \"www\"\ndomains = [\"evil.example\"]\n",
    );
    bad.write(
        ".certmesh/certificates/fine.toml",
        "name = \"fine\"\ndomains = [\"fine.example\"]\n",
    );
    wait_until("the good entry taken on good", || {
        cert_status(&good, "fine")["source"] == "tree"
    });
    let errors = good.status()["errors"].to_string();
    for named in [
        "junk.toml",
        "big.toml: refused: ",
        "other.toml: refused: name \\\"www\\\"",
    ] {
        assert!(errors.contains(named), "{named} not in {errors}");
    }
    let names: Vec<String> = good.status()["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["fine"]);
}

#[test]
fn certs_removal_stops_renewals_and_keeps_the_files() {
    if !tools_present() {
        return;
    }
    let f = fleet(["127.0.12.30", "127.0.12.31", "127.0.12.32"], "");
    f.resolve("keep.certs.test");
    assert!(cert(&f.b, &["add", "keep", "--domain", "keep.certs.test"]).0);
    wait_live_everywhere(&f, "keep", "keep.certs.test");
    let (ok, out) = cert(&f.c, &["remove", "keep"]);
    assert!(ok, "{out}");
    for n in f.all() {
        wait_until(&format!("keep gone from {}'s status", n.name), || {
            n.status()["certificates"]
                .as_array()
                .is_some_and(|c| c.is_empty())
        });
        assert!(live_sans(n, "keep").is_some(), "{}: live/keep went", n.name);
    }
    let (ok, out) = cert(&f.c, &["remove", "keep", "--purge"]);
    assert!(ok, "{out}");
    for n in f.all() {
        wait_until(&format!("live/keep purged on {}", n.name), || {
            !n.tree.join("live/keep").exists() && !n.tree.join("archive/keep").exists()
        });
    }
    // The peers kept what the purge deleted, for `restore`.
    let kept = certmesh(&[
        "restore",
        "--list",
        "--config",
        f.b.config.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&kept.stdout).contains("archive/keep/1/privkey.pem"));
}

#[test]
fn certs_a_config_block_overrides_a_tree_entry() {
    if !tools_present() {
        return;
    }
    let block = "\n[[certificate]]\nname = \"site\"\ndomains = [\"config.certs.test\"]\n";
    let f = fleet(["127.0.12.40", "127.0.12.41", "127.0.12.42"], block);
    f.resolve("config.certs.test");
    f.resolve("tree.certs.test");
    let (ok, out) = cert(&f.b, &["add", "site", "--domain", "tree.certs.test"]);
    assert!(ok, "{out}");
    // The renewer's block wins: it orders the config's name, never the tree's.
    wait_live_everywhere(&f, "site", "config.certs.test");
    let on_renewer = cert_status(&f.renewer, "site");
    assert_eq!(on_renewer["source"], "config");
    assert_eq!(
        on_renewer["domains"],
        serde_json::json!(["config.certs.test"])
    );
    assert_eq!(cert_status(&f.b, "site")["source"], "tree");
    let (_, out) = cert(&f.renewer, &["list"]);
    assert!(out.contains("config (overrides a tree entry)"), "{out}");
    let (ok, out) = cert(&f.renewer, &["add", "site", "--domain", "x.certs.test"]);
    assert!(!ok && out.contains("[[certificate]] block"), "{out}");
}

/// The renewer's `acme_queue` in its status.
fn queue(f: &Fleet) -> serde_json::Value {
    f.renewer.status()["acme_queue"].clone()
}

#[test]
fn certs_orders_beyond_the_hourly_budget_wait_in_the_queue() {
    if !tools_present() {
        return;
    }
    let f = fleet(
        ["127.0.12.50", "127.0.12.51", "127.0.12.52"],
        "max_orders_per_hour = 2\n",
    );
    for name in ["q1", "q2", "q3", "q4"] {
        let domain = format!("{name}.certs.test");
        f.resolve(&domain);
        assert!(cert(&f.b, &["add", name, "--domain", &domain]).0);
    }
    wait_until("two issued, two queued", || {
        let q = queue(&f);
        q["queued"] == 2 && q["budget_left"] == 0
    });
    let live = ["q1", "q2", "q3", "q4"]
        .iter()
        .filter(|n| f.renewer.tree.join(format!("live/{n}")).exists())
        .count();
    assert_eq!(live, 2);
    let q = queue(&f);
    assert!(
        q["eta_s"].as_i64().is_some_and(|e| e > 3000 && e <= 3600),
        "{q}"
    );
    assert_eq!(q["next"][0]["kind"], "new");
}

#[test]
fn certs_a_forged_far_future_ca_pause_holds_at_most_the_cap() {
    if !tools_present() {
        return;
    }
    let f = fleet(["127.0.12.60", "127.0.12.61", "127.0.12.62"], "");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    // Another writer claims the CA rate-limits the fleet for a year.
    let id = &blake3::hash(f.pebble.directory.as_bytes()).to_hex()[..16];
    let pause = serde_json::json!({
        "since": now, "until": now + 365 * 86_400, "directory": f.pebble.directory,
    });
    f.c.write_atomic(&format!(".certmesh/acme/paused/{id}"), &pause.to_string());
    f.resolve("late.certs.test");
    assert!(cert(&f.b, &["add", "late", "--domain", "late.certs.test"]).0);
    wait_until("the renewer sees the pause and queues the order", || {
        queue(&f)["queued"] == 1
    });
    let until = queue(&f)["paused_until"].as_i64().unwrap();
    assert!(
        until <= now + 6 * 3600 + 5,
        "paused until {until}, now {now}"
    );
    assert!(!f.renewer.tree.join("live/late").exists());
}

/// Each line of `node`'s hook log: the certificates one run covered.
fn hook_runs(node: &Node) -> Vec<Vec<String>> {
    fs::read_to_string(node.dir.join("hook.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect()
}

#[test]
fn certs_hooks_coalesce_while_certificates_keep_changing() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = [
        Node::new(dir.path(), "w", "127.0.12.70"),
        Node::new(dir.path(), "p", "127.0.12.71"),
    ];
    nodes[0].configure(&[&nodes[1]]);
    nodes[1].configure(&[&nodes[0]]);
    for n in &nodes {
        let log = n.dir.join("hook.log");
        append(
            n,
            &format!(
                "\n[[hook]]\npaths = [\"live/**\"]\nrun = [\"sh\", \"-c\", \
                 \"echo $CERTMESH_CHANGED >> {}\"]\n",
                log.display()
            ),
        );
    }
    for n in &mut nodes {
        n.start();
    }
    wait_until("connected", || nodes[0].all_connected());
    // 50 certificates published one after another over about 6 s, each change well
    // apart from the next (each alone would be its own burst).
    for i in 0..50 {
        nodes[0].write_atomic(&format!("live/c{i:02}/fullchain.pem"), &format!("{i}"));
        std::thread::sleep(std::time::Duration::from_millis(120));
    }
    for n in &nodes {
        wait_until(
            &format!("every certificate's hook ran on {}", n.name),
            || {
                let covered: std::collections::BTreeSet<String> =
                    hook_runs(n).into_iter().flatten().collect();
                covered.len() == 50
            },
        );
        let runs = hook_runs(n).len();
        assert!(
            runs <= 4,
            "{}: {runs} hook runs for 50 certificates",
            n.name
        );
    }
}
