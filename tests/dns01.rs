//! dns-01 end to end against real components, inside a network namespace the test
//! makes (so BIND can serve on port 53 of its own addresses, 127.0.6.x): BIND 9
//! (`named -g`) as the zone's primary with `update-policy { grant … zonesub TXT; }`,
//! sometimes a second nameserver, Pebble validating through BIND (`-dnsserver`), and
//! real `certmesh` processes. The test thread itself enters the namespace (`setns`),
//! so every socket it opens and every process it starts lives there.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use certmesh::core::device::DeviceId;

use crate::acme::ISSUE_DEADLINE;
use crate::util::free_tcp;
use crate::util::{certmesh, wait_until, Node};

const ZONE: &str = "certmesh.test";
const NS1: &str = "127.0.6.53";
const NS2: &str = "127.0.6.54";
const CA_IP: &str = "127.0.6.1";
const KEY_NAME: &str = "certmesh";

fn tools_present() -> bool {
    let ok = [
        "/usr/sbin/named",
        "/usr/bin/dig",
        "/usr/bin/nsupdate",
        "/usr/bin/pebble",
        "/usr/sbin/tsig-keygen",
    ]
    .iter()
    .all(|p| Path::new(p).exists());
    if !ok {
        eprintln!("SKIPPED: named, dig, nsupdate, tsig-keygen and pebble are needed (apt-get install bind9 bind9-dnsutils pebble)");
    }
    ok
}

/// A child process killed (and reaped) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A network namespace the current thread has entered; left and deleted on drop.
struct Netns {
    name: String,
    home: OwnedFd,
}

impl Netns {
    fn enter(tag: &str) -> Netns {
        let name = format!("cm-dns-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(ok.success(), "ip netns add {name}");
        let ok = Command::new("ip")
            .args(["-n", &name, "link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(ok.success());
        // named binds only addresses an interface has.
        for ip in [NS1, NS2] {
            let ok = Command::new("ip")
                .args(["-n", &name, "addr", "add", &format!("{ip}/32"), "dev", "lo"])
                .status()
                .unwrap();
            assert!(ok.success(), "ip addr add {ip}");
        }
        let home: OwnedFd = fs::File::open("/proc/thread-self/ns/net").unwrap().into();
        let target = fs::File::open(format!("/run/netns/{name}")).unwrap();
        let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        Netns { name, home }
    }
}

impl Drop for Ca {
    fn drop(&mut self) {
        dump_on_panic(self);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) };
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// `tsig-keygen` output for [`KEY_NAME`].
fn keygen() -> String {
    let out = Command::new("tsig-keygen")
        .args(["-a", "hmac-sha256", KEY_NAME])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

/// The clause of key `name` out of several.
fn keygen_of(clauses: &str, name: &str) -> String {
    let start = clauses.find(&format!("key \"{name}\"")).unwrap();
    let end = start + clauses[start..].find("};").unwrap() + 2;
    clauses[start..end].to_string()
}

/// The zone: SOA, the NS set (`ns2` listed only if `two_ns`), their addresses.
fn zone_file(two_ns: bool) -> String {
    let mut z = format!(
        "$TTL 60\n@ IN SOA ns1.{ZONE}. hostmaster.{ZONE}. 1 3600 600 86400 60\n@ IN NS ns1.{ZONE}.\n"
    );
    if two_ns {
        z.push_str(&format!("@ IN NS ns2.{ZONE}.\n"));
    }
    // The apex points at the third node (http-01 for the apex of a mixed order).
    z.push_str(&format!(
        "@ IN A 127.0.6.4\nns1 IN A {NS1}\nns2 IN A {NS2}\n"
    ));
    z
}

/// One `named -g` on `ip`:53 with its own directory.
fn named(dir: &Path, ip: &str, key: &str, zone: &str) -> Proc {
    let d = dir.join(format!("named-{ip}"));
    fs::create_dir_all(&d).unwrap();
    let conf = format!(
        "options {{\n  directory \"{d}\";\n  listen-on port 53 {{ {ip}; }};\n  listen-on-v6 {{ none; }};\n  \
         pid-file \"{d}/named.pid\";\n  session-keyfile \"{d}/session.key\";\n  recursion no;\n  \
         dnssec-validation no;\n  allow-transfer {{ any; }};\n  notify-delay 0;\n  notify-source {ip};\n  transfer-source {ip};\n}};\n\
         controls {{ }};\n{key}\n{zone}\n",
        d = d.display()
    );
    let conf_path = d.join("named.conf");
    fs::write(&conf_path, conf).unwrap();
    let log = d.join("named.log");
    let child = Command::new("named")
        .args(["-g", "-c"])
        .arg(&conf_path)
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .expect("starting named");
    let mut p = Proc(child);
    let start = Instant::now();
    while dig(ip, ZONE, "SOA").is_empty() {
        if let Ok(Some(st)) = p.0.try_wait() {
            panic!(
                "named on {ip} exited with {st}:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "named on {ip} does not answer"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

/// The primary, taking TSIG-signed updates of TXT records under the zone.
fn primary(dir: &Path, key: &str, two_ns: bool) -> Proc {
    let d = dir.join(format!("named-{NS1}"));
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join("zone.db"), zone_file(two_ns)).unwrap();
    let zone = format!(
        "zone \"{ZONE}\" {{ type primary; file \"{}\"; notify yes; update-policy {{ grant {KEY_NAME} zonesub TXT; }}; }};",
        d.join("zone.db").display()
    );
    named(dir, NS1, key, &zone)
}

/// A secondary of the primary (transfers the zone at start, follows NOTIFY).
fn secondary(dir: &Path) -> Proc {
    let d = dir.join(format!("named-{NS2}"));
    fs::create_dir_all(&d).unwrap();
    let zone = format!(
        "zone \"{ZONE}\" {{ type secondary; primaries {{ {NS1}; }}; file \"{}\"; }};",
        d.join("secondary.db").display()
    );
    named(dir, NS2, "", &zone)
}

/// `dig +short` answers (empty when nothing answers).
fn dig(server: &str, name: &str, rtype: &str) -> Vec<String> {
    let out = Command::new("dig")
        .args([
            &format!("@{server}"),
            name,
            rtype,
            "+short",
            "+norecurse",
            "+time=1",
            "+tries=1",
        ])
        .output()
        .unwrap();
    if !out.status.success() {
        return Vec::new();
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with(';'))
        .map(str::to_string)
        .collect()
}

fn challenge_txt(server: &str) -> Vec<String> {
    dig(server, &format!("_acme-challenge.{ZONE}"), "TXT")
}

/// Pebble on 127.0.6.1, validating dns-01 through the primary.
struct Ca {
    directory: String,
    /// Where Pebble sends http-01 validations.
    http_port: u16,
    ca_roots: PathBuf,
    log: PathBuf,
    _p: certmesh::demo_pebble::Pebble,
}

impl Ca {
    fn start(dir: &Path) -> Ca {
        let options = certmesh::demo_pebble::Options {
            http_port: Some(free_tcp("127.0.6.4")),
            dns_server: Some(format!("{NS1}:53")),
            ..crate::util::pebble_options(CA_IP)
        };
        let p = certmesh::demo_pebble::Pebble::start(&dir.join("pebble"), &options)
            .expect("starting pebble");
        Ca {
            directory: p.directory.clone(),
            http_port: p.http_port,
            ca_roots: p.ca_roots.clone(),
            log: p.log.clone(),
            _p: p,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Orders Pebble created.
    fn orders(&self) -> usize {
        self.log().matches("POST /order-plz").count()
    }
}

/// Everything one test needs; dropped in reverse order (nodes, servers, namespace).
struct Setup {
    ca: Ca,
    _ns1: Proc,
    _netns: Netns,
    key_file: PathBuf,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(tag: &str, two_ns: bool) -> Setup {
        Self::with_keys(tag, two_ns, "")
    }

    /// `extra_keys`: more key clauses the server knows (granted nothing).
    fn with_keys(tag: &str, two_ns: bool, extra_keys: &str) -> Setup {
        let netns = Netns::enter(tag);
        let dir = tempfile::Builder::new()
            .prefix("certmesh-dns01-")
            .tempdir()
            .unwrap();
        let key = format!("{}{extra_keys}", keygen());
        let key_file = dir.path().join("tsig.key");
        fs::write(&key_file, keygen_of(&key, KEY_NAME)).unwrap();
        fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).unwrap();
        let ns1 = primary(dir.path(), &key, two_ns);
        let ca = Ca::start(dir.path());
        Setup {
            dir,
            key_file,
            ca,
            _ns1: ns1,
            _netns: netns,
        }
    }

    /// Nodes on 127.0.6.2…, full mesh, `[acme]` + `[acme.dns]` (`dns` lines) + one
    /// certificate (`cert` lines).
    fn nodes(&self, n: usize, acme: &str, dns: &str, cert: &str) -> Vec<Node> {
        let nodes: Vec<Node> = (0..n)
            .map(|i| {
                Node::new(
                    self.dir.path(),
                    &format!("d{}", i + 1),
                    &format!("127.0.6.{}", i + 2),
                )
            })
            .collect();
        for (i, node) in nodes.iter().enumerate() {
            node.configure(&crate::util::others(&nodes, i));
            let mut cfg = fs::read_to_string(&node.config).unwrap();
            cfg.push_str(&format!(
                "\n[acme]\ndirectory = \"{}\"\ncontact = [\"mailto:ops@{ZONE}\"]\nca_roots = \"{}\"\n{acme}\
                 \n[acme.dns]\n{dns}\n[[certificate]]\nname = \"www\"\n{cert}\n                 \n[http]\nlisten = \"127.0.6.{}:{}\"\n",
                self.ca.directory,
                self.ca.ca_roots.display(),
                i + 2,
                self.ca.http_port,
            ));
            fs::write(&node.config, cfg).unwrap();
        }
        nodes
    }

    fn rfc2136(&self, extra: &str) -> String {
        format!(
            "server = \"{NS1}:53\"\ntsig_key_name = \"{KEY_NAME}\"\ntsig_secret_file = \"{}\"\n{extra}",
            self.key_file.display()
        )
    }
}

/// Mixed: the wildcard by dns-01, the apex by http-01 (the built-in responders).
const WILDCARD: &str = "domains = [\"*.certmesh.test\", \"certmesh.test\"]";
/// The same names, all by dns-01.
const ALL_DNS: &str = "domains = [\"*.certmesh.test\", \"certmesh.test\"]\nchallenge = \"dns-01\"";

fn live_version(n: &Node) -> Option<u32> {
    fs::read_link(n.tree.join("live/www"))
        .ok()?
        .file_name()?
        .to_str()?
        .parse()
        .ok()
}

fn wait_live(nodes: &[&Node], what: &str) {
    let start = Instant::now();
    while start.elapsed() < ISSUE_DEADLINE {
        if nodes
            .iter()
            .all(|n| live_version(n).is_some() && n.tree.join("live/www/combined.pem").exists())
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let logs: String = nodes
        .iter()
        .map(|n| format!("--- {}\n{}", n.name, n.log()))
        .collect();
    panic!("timed out waiting for {what}\n{logs}");
}

fn dump_on_panic(ca: &Ca) {
    if std::thread::panicking() {
        eprintln!("--- pebble\n{}", ca.log());
    }
}

fn sans(n: &Node) -> Vec<String> {
    let pem = fs::read_to_string(n.tree.join("live/www/cert.pem")).unwrap();
    let der = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .contents;
    let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
    let mut v: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|g| g.to_string())
        .collect();
    v.sort();
    v
}

fn cert_status(n: &Node) -> serde_json::Value {
    n.status()["certificates"][0].clone()
}

/// Waits for `f` on the node's certificate status, up to `limit`.
fn wait_status(
    n: &Node,
    what: &str,
    limit: Duration,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let s = cert_status(n);
        if f(&s) {
            return s;
        }
        assert!(
            start.elapsed() < limit,
            "timed out waiting for {what}: {s}\n{}",
            n.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn renewer_first(nodes: &[Node]) -> Vec<usize> {
    let ids: Vec<DeviceId> = nodes.iter().map(|n| n.id.parse().unwrap()).collect();
    let mut line: Vec<usize> = (0..nodes.len()).collect();
    line.sort_by_key(|&i| ids[i]);
    line
}

#[test]
fn dns01_wildcard_and_apex_issued_by_one_node_live_on_all_three() {
    if !tools_present() {
        return;
    }
    let s = Setup::new("wild", false);
    let mut nodes = s.nodes(3, "", &s.rfc2136(""), WILDCARD);
    for n in &mut nodes {
        n.start();
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_live(&refs, "the wildcard certificate on all 3 nodes");
    let line = renewer_first(&nodes);
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(
            sans(n),
            ["DNSName(*.certmesh.test)", "DNSName(certmesh.test)"],
            "{}",
            n.name
        );
        assert_eq!(
            n.log().contains("ordering"),
            i == line[0],
            "only the renewer orders:\n{}",
            n.log()
        );
        assert_eq!(cert_status(n)["challenge"], "dns-01+http-01");
    }
    let r = &nodes[line[0]];
    assert!(
        r.log()
            .contains("TXT records served by every authoritative nameserver"),
        "{}",
        r.log()
    );
    wait_until("the TXT records removed from the zone", || {
        challenge_txt(NS1).is_empty()
    });
    wait_until("the record file removed on every node", || {
        nodes
            .iter()
            .all(|n| !n.tree.join(".certmesh/acme/dns/www").exists())
    });
    assert_eq!(s.ca.orders(), 1, "{}", s.ca.log());
    for n in &mut nodes {
        n.stop();
    }
}

#[test]
fn dns01_wrong_tsig_secret_is_named_in_status_and_spends_no_order() {
    if !tools_present() {
        return;
    }
    let s = Setup::new("badkey", false);
    let wrong = s.dir.path().join("wrong.key");
    fs::write(&wrong, "c2VjcmV0LXRoYXQtdGhlLXNlcnZlci1kb2VzLW5vdC1rbm93\n").unwrap();
    fs::set_permissions(&wrong, fs::Permissions::from_mode(0o600)).unwrap();
    let dns = format!(
        "server = \"{NS1}:53\"\ntsig_key_name = \"{KEY_NAME}\"\ntsig_secret_file = \"{}\"\n",
        wrong.display()
    );
    let mut nodes = s.nodes(1, "", &dns, ALL_DNS);
    nodes[0].start();
    let st = wait_status(&nodes[0], "the TSIG error", ISSUE_DEADLINE, |c| {
        c["last_error"].is_string()
    });
    let e = st["last_error"].as_str().unwrap();
    assert!(
        e.contains("BADSIG") && e.contains("tsig_secret_file") && e.contains(NS1),
        "{e}"
    );
    assert_eq!(st["state"], "backoff", "{st}");
    assert_eq!(st["failures"], 1, "{st}");
    assert_eq!(
        s.ca.orders(),
        0,
        "a refused key must cost no order:\n{}",
        s.ca.log()
    );
    let table = certmesh(&["status", "--config", nodes[0].config.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("BADSIG"),
        "{table:?}"
    );
    nodes[0].stop();
}

#[test]
fn dns01_lagging_nameserver_holds_the_ca_back_and_is_named() {
    if !tools_present() {
        return;
    }
    let s = Setup::new("lag", true);
    let mut nodes = s.nodes(1, "", &s.rfc2136("propagation_timeout = \"4s\"\n"), ALL_DNS);
    nodes[0].start();
    let n = &nodes[0];
    // ns2 is down: ns1 has the records, the CA has not been told.
    let st = wait_status(n, "ns1 serving the records", ISSUE_DEADLINE, |c| {
        c["dns_propagation"]
            .as_array()
            .is_some_and(|p| p.iter().any(|x| x["has_record"] == true))
    });
    let p = st["dns_propagation"].as_array().unwrap();
    assert_eq!(p.len(), 2, "{st}");
    let ns2 = p
        .iter()
        .find(|x| x["nameserver"].as_str().unwrap().contains(NS2))
        .unwrap();
    assert_eq!(ns2["has_record"], false, "{st}");
    assert!(!challenge_txt(NS1).is_empty());
    assert!(
        !s.ca.log().contains("POST /chalZ/"),
        "the CA was told before ns2 answered:\n{}",
        s.ca.log()
    );
    let st = wait_status(n, "the propagation error", ISSUE_DEADLINE, |c| {
        c["last_error"].is_string()
    });
    let e = st["last_error"].as_str().unwrap();
    assert!(
        e.contains(&format!("lagging: ns2.{ZONE} ({NS2})")) && e.contains("propagation_timeout"),
        "{e}"
    );
    assert!(!s.ca.log().contains("POST /chalZ/"), "{}", s.ca.log());
    wait_until("the TXT records removed after the failure", || {
        challenge_txt(NS1).is_empty()
    });
    // ns2 back (a secondary notified by ns1): the next order goes through.
    let _ns2 = secondary(s.dir.path());
    let out = certmesh(&["issue", "--config", n.config.to_str().unwrap(), "www"]);
    assert!(out.status.success(), "{out:?}\n{}", n.log());
    wait_live(&[n], "the certificate once both nameservers answer");
    wait_until("TXT gone from both nameservers", || {
        challenge_txt(NS1).is_empty() && challenge_txt(NS2).is_empty()
    });
    nodes[0].stop();
}

#[test]
fn dns01_exec_provider_with_nsupdate() {
    if !tools_present() {
        return;
    }
    let s = Setup::new("exec", false);
    let script = s.dir.path().join("dns-txt");
    let calls = s.dir.path().join("calls.log");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\nset -e\ncase \"$1\" in present) op=add ;; cleanup) op=delete ;; *) echo \"bad action $1\" >&2; exit 2 ;; esac\n\
             printf 'server {NS1} 53\\nzone {ZONE}\\nupdate %s %s 60 IN TXT \"%s\"\\nsend\\n' \"$op\" \"$2\" \"$3\" | nsupdate -k {}\n\
             echo \"$1 $2\" >> {}\n",
            s.key_file.display(),
            calls.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let dns = format!(
        "exec = [\"{}\"]\nresolver = \"{NS1}:53\"\n",
        script.display()
    );
    let mut nodes = s.nodes(
        1,
        "",
        &dns,
        "domains = [\"exec.certmesh.test\"]\nchallenge = \"dns-01\"",
    );
    nodes[0].start();
    wait_live(&[&nodes[0]], "the certificate through the exec provider");
    assert_eq!(sans(&nodes[0]), ["DNSName(exec.certmesh.test)"]);
    wait_until("the exec provider's record removed", || {
        dig(NS1, "_acme-challenge.exec.certmesh.test", "TXT").is_empty()
    });
    wait_until("the exec provider's cleanup call logged", || {
        fs::read_to_string(&calls).is_ok_and(|l| l.lines().count() >= 2)
    });
    let log = fs::read_to_string(&calls).unwrap();
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        [
            "present _acme-challenge.exec.certmesh.test.",
            "cleanup _acme-challenge.exec.certmesh.test."
        ],
        "{log}"
    );
    assert_eq!(cert_status(&nodes[0])["challenge"], "dns-01");
    nodes[0].stop();
}

#[test]
fn dns01_renewer_killed_after_the_txt_update_is_cleaned_up_by_the_next() {
    if !tools_present() {
        return;
    }
    let s = Setup::new("kill", true);
    // ns2 down: the renewer's order waits in the propagation check with its record
    // in the zone; that is when it dies.
    let mut nodes = s.nodes(
        2,
        "lease = \"3s\"\n",
        &s.rfc2136("propagation_timeout = \"60s\"\n"),
        ALL_DNS,
    );
    let line = renewer_first(&nodes);
    for n in &mut nodes {
        n.start();
    }
    let start = Instant::now();
    let left = loop {
        let v = challenge_txt(NS1);
        if v.len() == 2 {
            break v;
        }
        assert!(
            start.elapsed() < ISSUE_DEADLINE,
            "no TXT records appeared\n{}",
            nodes[line[0]].log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    nodes[line[0]].kill9();
    assert!(live_version(&nodes[line[1]]).is_none());
    let _ns2 = secondary(s.dir.path());
    let survivor = &nodes[line[1]];
    wait_live(&[survivor], "the certificate from the node that took over");
    assert!(
        survivor
            .log()
            .contains("removed a dns-01 TXT record left behind"),
        "{}",
        survivor.log()
    );
    wait_until("no TXT record left, the dead renewer's included", || {
        challenge_txt(NS1).is_empty() && challenge_txt(NS2).is_empty()
    });
    assert!(!left.is_empty());
    assert!(!survivor.tree.join(".certmesh/acme/dns/www").exists());
}

#[test]
fn dns01_refused_update_and_unknown_zone_are_named() {
    if !tools_present() {
        return;
    }
    // The server knows key "intruder" but its update-policy grants it nothing.
    let out = Command::new("tsig-keygen")
        .args(["-a", "hmac-sha256", "intruder"])
        .output()
        .unwrap();
    let intruder = String::from_utf8(out.stdout).unwrap();
    let s = Setup::with_keys("refused", false, &intruder);
    let key = s.dir.path().join("intruder.key");
    fs::write(&key, &intruder).unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let dns = format!(
        "server = \"{NS1}:53\"\ntsig_key_name = \"intruder\"\ntsig_secret_file = \"{}\"\n",
        key.display()
    );
    let mut nodes = s.nodes(1, "", &dns, ALL_DNS);
    let mut cfg = fs::read_to_string(&nodes[0].config).unwrap();
    cfg.push_str("\n[[certificate]]\nname = \"elsewhere\"\ndomains = [\"*.elsewhere.test\"]\n");
    fs::write(&nodes[0].config, cfg).unwrap();
    nodes[0].start();
    let n = &nodes[0];
    let errors = |s: &serde_json::Value| -> Vec<String> {
        s["certificates"]
            .as_array()
            .map(|c| {
                c.iter()
                    .filter_map(|c| c["last_error"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let start = Instant::now();
    let found = loop {
        let e = errors(&n.status());
        if e.len() == 2 {
            break e;
        }
        assert!(start.elapsed() < ISSUE_DEADLINE, "{e:?}\n{}", n.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    let all = found.join("\n");
    assert!(
        all.contains("refused by the server's policy (REFUSED)") && all.contains("update-policy"),
        "{all}"
    );
    assert!(
        all.contains("zone not found for _acme-challenge.elsewhere.test")
            && all.contains("REFUSED"),
        "{all}"
    );
    // The unknown zone cost no order; the refused update one (the CA asked first).
    assert_eq!(s.ca.orders(), 1, "{}", s.ca.log());
    wait_until("nothing left in the zone", || challenge_txt(NS1).is_empty());
    nodes[0].stop();
}

#[test]
fn dns01_check_reads_the_secret_file() {
    let d = tempfile::tempdir().unwrap();
    let key = d.path().join("tsig.key");
    fs::write(
        &key,
        "key \"certmesh\" { algorithm hmac-sha256; secret \"c2VjcmV0\"; };\n",
    )
    .unwrap();
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = d.path().join("c.toml");
    fs::write(
        &cfg,
        format!(
            "[node]\nname = \"lb0\"\nstate_dir = \"{}\"\nlisten = \"127.0.6.9:22000\"\n[tree]\npath = \"{}\"\n\
             [acme]\ndirectory = \"https://acme.example/dir\"\n[acme.dns]\nserver = \"192.0.2.53\"\n\
             tsig_key_name = \"certmesh\"\ntsig_secret_file = \"{}\"\n\
             [[certificate]]\nname = \"www\"\ndomains = [\"*.example.com\", \"example.com\"]\n",
            d.path().join("state").display(),
            d.path().join("tree").display(),
            key.display()
        ),
    )
    .unwrap();
    certmesh(&[
        "init",
        "--state-dir",
        d.path().join("state").to_str().unwrap(),
    ]);
    fs::create_dir_all(d.path().join("tree")).unwrap();
    let check = || certmesh(&["check", "--config", cfg.to_str().unwrap()]);
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("acme.dns.tsig_secret_file") && err.contains("0644"),
        "{err}"
    );
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
    let out = check();
    assert!(out.status.success(), "{out:?}");
}
