//! The command line: init/id, check on good and bad configs, exit codes.

use std::fs;

use crate::util::certmesh;

#[test]
fn init_is_idempotent_and_id_matches() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    let s = state.to_str().unwrap();
    let a = certmesh(&["init", "--state-dir", s]);
    let b = certmesh(&["init", "--state-dir", s]);
    let id = certmesh(&["id", "--state-dir", s]);
    assert!(a.status.success() && b.status.success() && id.status.success());
    let last = |o: &std::process::Output| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .last()
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(last(&a), last(&b));
    assert_eq!(last(&a), last(&id));
    assert_eq!(last(&a).len(), 63);
    let missing = certmesh(&["id", "--state-dir", d.path().join("nope").to_str().unwrap()]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("certmesh init"));
}

#[test]
fn shipped_example_configs_pass_check() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config");
    let mut n = 0;
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "toml") {
            // Its tree and state dir moved into a temp dir: `check` wants both to exist.
            let d = tempfile::tempdir().unwrap();
            let text = crate::util::localized_config(&fs::read_to_string(&p).unwrap(), d.path());
            let local = d.path().join("c.toml");
            fs::write(&local, text).unwrap();
            let out = certmesh(&["check", "--config", local.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "{}: {}",
                p.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            n += 1;
        }
    }
    assert!(n > 0, "no example configs in config/");
}

#[test]
fn check_names_the_problem() {
    let d = tempfile::tempdir().unwrap();
    let id = {
        let out = certmesh(&[
            "init",
            "--state-dir",
            d.path().join("other").to_str().unwrap(),
        ]);
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let mut typo = id.clone().into_bytes();
    typo[3] = if typo[3] == b'A' { b'B' } else { b'A' };
    let typo = String::from_utf8(typo).unwrap();
    let base = &crate::util::localized_config("[node]\nname = \"lb0\"\nstate_dir = \"/var/lib/certmesh\"\nlisten = \"127.0.0.1:22000\"\n[tree]\npath = \"/etc/nginx/certs\"\n", d.path());
    let cases = [
        (
            format!(
                "{base}[[peer]]\nname = \"lb1\"\nid = \"{typo}\"\naddress = \"127.0.0.2:22000\"\n"
            ),
            "mistyped",
        ),
        (
            format!("{base}[[peer]]\nname = \"lb1\"\nid = \"{id}\"\naddress = \"lb1:22000\"\n"),
            "peer.address",
        ),
        (format!("{base}colour = 1\n"), "colour"),
        (base.replace("listen = \"127.0.0.1:22000\"\n", ""), "listen"),
        (
            base.replace(d.path().join("tree").to_str().unwrap(), "certs"),
            "tree.path",
        ),
        ("this is not toml".to_string(), "TOML"),
    ];
    for (text, needle) in cases {
        let f = d.path().join("c.toml");
        fs::write(&f, &text).unwrap();
        let out = certmesh(&["check", "--config", f.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}\n{err}");
        assert!(err.contains(needle), "expected {needle:?} in: {err}");
    }
    let ok = d.path().join("ok.toml");
    fs::write(
        &ok,
        format!("{base}[[peer]]\nname = \"lb1\"\nid = \"{id}\"\naddress = \"127.0.0.2:22000\"\n"),
    )
    .unwrap();
    assert!(certmesh(&["check", "--config", ok.to_str().unwrap()])
        .status
        .success());
}

#[test]
fn status_without_daemon_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("c.toml");
    let state = d.path().join("state");
    fs::write(&f, format!("[node]\nname = \"lb0\"\nstate_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\n[tree]\npath = \"{}\"\n", state.display(), d.path().join("t").display())).unwrap();
    let out = certmesh(&["status", "--config", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `certmesh run` running"));
}

/// `CERTMESH_LOG_FORMAT=json`: every log line the daemon writes is one JSON object
/// with the level and the event's fields (what log shippers reading journald want).
#[test]
fn json_logs_on_request() {
    let d = tempfile::tempdir().unwrap();
    let mut n = crate::util::Node::new(d.path(), "solo", "127.0.0.40");
    n.configure(&[]);
    let log = d.path().join("json.log");
    let child = std::process::Command::new(crate::util::BIN)
        .args(["run", "--config", n.config.to_str().unwrap()])
        .env("CERTMESH_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    n.child = Some(child);
    crate::util::wait_until("the daemon to log that it runs", || {
        fs::read_to_string(&log).is_ok_and(|t| t.contains("certmesh running"))
    });
    let text = fs::read_to_string(&log).unwrap();
    let mut running = false;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
        if v["fields"]["message"] == "certmesh running" {
            running = true;
            assert!(v["fields"]["listen"].is_string(), "{line}");
        }
    }
    assert!(running, "{text}");
}

#[test]
fn config_comes_from_the_flag_then_certmesh_config_then_the_packaged_path() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("from-env.toml");
    let run = |args: &[&str], env: Option<&std::path::Path>| {
        let mut c = std::process::Command::new(crate::util::BIN);
        c.args(args).env_remove("CERTMESH_CONFIG");
        if let Some(p) = env {
            c.env("CERTMESH_CONFIG", p);
        }
        c.output().expect("running certmesh")
    };
    // $CERTMESH_CONFIG is read when --config is absent: the error names that file.
    let out = run(&["check"], Some(&missing));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("from-env.toml"),
        "{out:?}"
    );
    // --config wins over the environment.
    let flag = d.path().join("from-flag.toml");
    let out = run(
        &["status", "--config", flag.to_str().unwrap()],
        Some(&missing),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("from-flag.toml") && !err.contains("from-env"),
        "{err}"
    );
    // Neither: the packaged path, shown in every subcommand's help.
    for cmd in [
        "check", "run", "status", "issue", "renew", "firewall", "restore",
    ] {
        let help = run(&[cmd, "--help"], None);
        assert!(
            String::from_utf8_lossy(&help.stdout).contains("/etc/certmesh/certmesh.toml"),
            "{cmd} --help"
        );
    }
}
