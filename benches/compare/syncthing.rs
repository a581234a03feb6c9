//! Syncthing clusters, fully offline on 127.0.0.x, in the default and the tuned setting.

use super::*;

#[derive(Clone, Copy)]
pub(crate) struct StSetting {
    pub(crate) label: &'static str,
    pub(crate) rescan_s: u32,
    pub(crate) delay_s: u32,
}

pub(crate) const TUNED: StSetting = StSetting {
    label: "syncthing tuned",
    rescan_s: 5,
    delay_s: 1,
};
pub(crate) const DEFAULTS: StSetting = StSetting {
    label: "syncthing defaults",
    rescan_s: 3600,
    delay_s: 10,
};

pub(crate) struct StNode {
    pub(crate) home: PathBuf,
    pub(crate) tree: PathBuf,
    pub(crate) id: String,
    pub(crate) listen: SocketAddr,
    pub(crate) gui: SocketAddr,
    pub(crate) key: String,
    pub(crate) child: Option<Child>,
}

impl Drop for StNode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Field order matters: the nodes are stopped before the directory is removed.
pub(crate) struct StCluster {
    pub(crate) nodes: Vec<StNode>,
    pub(crate) _dir: tempfile::TempDir,
}

impl StCluster {
    /// Each instance's processes: the one started and its worker child.
    pub(crate) fn pids(&self) -> Vec<u32> {
        pids_of(self.nodes.iter().map(|n| &n.child))
            .into_iter()
            .flat_map(process_tree)
            .collect()
    }

    pub(crate) fn trees<'a>(
        &'a self,
        label: &'a str,
        jitter: Duration,
        timeout: Duration,
    ) -> Trees<'a> {
        Trees::of(
            label,
            self.nodes.iter().map(|n| n.tree.as_path()),
            jitter,
            timeout,
        )
    }
}

pub(crate) fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The text from `open` through the end of `close` (first occurrence).
pub(crate) fn xml_block<'a>(s: &'a str, open: &str, close: &str) -> Result<&'a str> {
    let a = s
        .find(open)
        .ok_or_else(|| anyhow!("config.xml: no {open}"))?;
    let b = s[a..]
        .find(close)
        .ok_or_else(|| anyhow!("config.xml: no {close}"))?
        + a
        + close.len();
    Ok(&s[a..b])
}

/// Replaces the text of the first `<tag>…</tag>`.
pub(crate) fn set_elem(s: &str, tag: &str, value: &str) -> Result<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let a = s
        .find(&open)
        .ok_or_else(|| anyhow!("config.xml: no <{tag}>"))?
        + open.len();
    let b = s[a..]
        .find(&close)
        .ok_or_else(|| anyhow!("config.xml: no </{tag}>"))?
        + a;
    Ok(format!("{}{}{}", &s[..a], xml_escape(value), &s[b..]))
}

/// Replaces the value of the first ` attr="…"`.
pub(crate) fn set_attr(s: &str, attr: &str, value: &str) -> Result<String> {
    let pat = format!(" {attr}=\"");
    let a = s
        .find(&pat)
        .ok_or_else(|| anyhow!("config.xml: no attribute {attr}"))?
        + pat.len();
    let b = s[a..]
        .find('"')
        .ok_or_else(|| anyhow!("config.xml: unterminated {attr}"))?
        + a;
    Ok(format!("{}{}{}", &s[..a], xml_escape(value), &s[b..]))
}

/// Rewrites the `config.xml` made by `syncthing generate` for node `me`: one folder shared
/// by all nodes, every device at an explicit loopback address, GUI on loopback with our
/// API key, and everything that would reach beyond this machine switched off.
pub(crate) fn st_config(
    generated: &str,
    me: usize,
    nodes: &[StNode],
    setting: StSetting,
) -> Result<String> {
    let header = xml_block(generated, "<configuration", ">")?;
    let defaults = xml_block(generated, "<defaults>", "</defaults>")?;
    let folder_tpl = xml_block(defaults, "<folder ", "</folder>")?;
    let after_folder = &defaults[defaults.find("</folder>").expect("found above")..];
    let device_tpl = xml_block(after_folder, "<device ", "</device>")?;

    let mut folder = folder_tpl.to_string();
    folder = set_attr(&folder, "id", FOLDER_ID)?;
    folder = set_attr(&folder, "label", FOLDER_ID)?;
    folder = set_attr(&folder, "path", &nodes[me].tree.display().to_string())?;
    folder = set_attr(&folder, "type", "sendreceive")?;
    folder = set_attr(&folder, "rescanIntervalS", &setting.rescan_s.to_string())?;
    folder = set_attr(&folder, "fsWatcherEnabled", "true")?;
    folder = set_attr(&folder, "fsWatcherDelayS", &setting.delay_s.to_string())?;
    let own = xml_block(&folder, "<device ", "</device>")?.to_string();
    let shared: String = nodes
        .iter()
        .map(|n| {
            format!(
                "<device id=\"{}\" introducedBy=\"\">\n                <encryptionPassword></encryptionPassword>\n            </device>\n            ",
                n.id
            )
        })
        .collect();
    folder = folder.replacen(&own, shared.trim_end(), 1);

    let mut devices = String::new();
    for (i, n) in nodes.iter().enumerate() {
        let mut d = device_tpl.to_string();
        // The template has an empty id and no name attribute.
        d = d.replacen(
            "<device id=\"\"",
            &format!("<device id=\"{}\" name=\"st{}\"", n.id, i + 1),
            1,
        );
        d = set_elem(&d, "address", &format!("tcp://{}", n.listen))?;
        devices.push_str("    ");
        devices.push_str(&d);
        devices.push('\n');
    }

    let mut gui = xml_block(generated, "<gui ", "</gui>")?.to_string();
    gui = set_attr(&gui, "enabled", "true")?;
    gui = set_attr(&gui, "tls", "false")?;
    gui = set_elem(&gui, "address", &nodes[me].gui.to_string())?;
    gui = set_elem(&gui, "apikey", &nodes[me].key)?;

    let mut opts = xml_block(generated, "<options>", "</options>")?.to_string();
    for (tag, value) in [
        ("listenAddress", format!("tcp://{}", nodes[me].listen)),
        ("globalAnnounceEnabled", "false".into()),
        ("localAnnounceEnabled", "false".into()),
        ("relaysEnabled", "false".into()),
        ("natEnabled", "false".into()),
        ("startBrowser", "false".into()),
        ("urAccepted", "-1".into()),
        ("autoUpgradeIntervalH", "0".into()),
        ("crashReportingEnabled", "false".into()),
        ("announceLANAddresses", "false".into()),
        // STUN is only used for QUIC/NAT traversal; 0 switches it off.
        ("stunKeepaliveStartS", "0".into()),
        // Default true (nice 9); off so both systems compete for the CPU on equal terms.
        ("setLowPriority", "false".into()),
    ] {
        opts = set_elem(&opts, tag, &value)?;
    }

    Ok(format!(
        "{header}\n    {folder}\n{devices}    {gui}\n    <ldap></ldap>\n    {opts}\n    {defaults}\n</configuration>\n"
    ))
}

/// Generates keys and configs for `n` instances on 127.0.0.`ip_base`…; does not start them.
pub(crate) fn st_prepare(
    st: &Path,
    n: usize,
    ip_base: u8,
    setting: StSetting,
) -> Result<StCluster> {
    let dir = tempfile::Builder::new()
        .prefix("certmesh-bench-st-")
        .tempdir()?;
    let mut nodes = Vec::new();
    let mut rng = rand::rng();
    for i in 0..n {
        let ip = format!("127.0.0.{}", ip_base as usize + i);
        let home = dir.path().join(format!("st{}", i + 1)).join("home");
        let tree = dir.path().join(format!("st{}", i + 1)).join("tree");
        let out = Command::new(st)
            .arg("generate")
            .arg(format!("--home={}", home.display()))
            .args(["--no-default-folder", "--skip-port-probing"])
            .env("STNODEFAULTFOLDER", "1")
            .output()
            .with_context(|| format!("running {} generate", st.display()))?;
        if !out.status.success() {
            bail!(
                "syncthing generate failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let out = Command::new(st)
            .arg(format!("--home={}", home.display()))
            .arg("--device-id")
            .output()?;
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || id.len() < 56 {
            bail!(
                "syncthing --device-id failed: {id} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // The folder marker, so that a pre-filled or empty tree is accepted as the folder.
        std::fs::create_dir_all(tree.join(".stfolder"))?;
        nodes.push(StNode {
            home,
            tree,
            id,
            listen: free_tcp_port(&ip)?,
            gui: free_tcp_port(&ip)?,
            key: String::from_utf8(random_text(&mut rng, 32))?.replace(['+', '/'], "x"),
            child: None,
        });
    }
    for i in 0..n {
        let path = nodes[i].home.join("config.xml");
        let generated = std::fs::read_to_string(&path)?;
        std::fs::write(&path, st_config(&generated, i, &nodes, setting)?)?;
    }
    Ok(StCluster { nodes, _dir: dir })
}

pub(crate) fn st_spawn(st: &Path, c: &mut StCluster) -> Result<Instant> {
    let t0 = Instant::now();
    for n in &mut c.nodes {
        st_spawn_one(st, n)?;
    }
    Ok(t0)
}

/// Starts one instance; the instant just before.
pub(crate) fn st_spawn_one(st: &Path, n: &mut StNode) -> Result<Instant> {
    let t0 = Instant::now();
    let log = std::fs::File::create(n.home.join("syncthing.log"))?;
    let child = Command::new(st)
        .arg("serve")
        .arg(format!("--home={}", n.home.display()))
        .args(["--no-browser", "--no-restart", "--no-upgrade"])
        .env("STNODEFAULTFOLDER", "1")
        .env("STNOUPGRADE", "1")
        .env("STNORESTART", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", st.display()))?;
    n.child = Some(child);
    Ok(t0)
}

/// GET on the REST API (HTTP/1.0 so the answer is neither chunked nor kept alive).
pub(crate) fn st_get(n: &StNode, path: &str) -> Result<serde_json::Value> {
    let mut s = TcpStream::connect_timeout(&n.gui, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    // Host: localhost passes Syncthing's DNS-rebinding check for loopback GUIs.
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\nX-API-Key: {}\r\nAccept: application/json\r\n\r\n", n.key)?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("bad HTTP answer"))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!("GET {path}: HTTP {status}: {}", body.trim());
    }
    Ok(serde_json::from_str(body)?)
}

pub(crate) fn st_log_tail(c: &StCluster) -> String {
    let mut out = String::new();
    for (i, n) in c.nodes.iter().enumerate() {
        let log = std::fs::read_to_string(n.home.join("syncthing.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let _ = writeln!(out, "--- st{} log (last lines):", i + 1);
        for l in &lines[lines.len().saturating_sub(8)..] {
            let _ = writeln!(out, "{l}");
        }
    }
    out
}

/// Polls until every instance reports every other device connected and the folder idle
/// with nothing needed.
pub(crate) fn st_wait_ready(
    c: &StCluster,
    label: &str,
    timeout: Duration,
) -> Result<(Duration, Duration)> {
    let start = Instant::now();
    let mut connected_at = None;
    loop {
        let connected = c.nodes.iter().all(|n| {
            st_get(n, "/rest/system/connections").is_ok_and(|v| {
                c.nodes
                    .iter()
                    .filter(|o| o.id != n.id)
                    .all(|o| v["connections"][&o.id]["connected"].as_bool() == Some(true))
            })
        });
        if connected {
            let at = *connected_at.get_or_insert_with(|| start.elapsed());
            let idle = c.nodes.iter().all(|n| {
                st_get(n, &format!("/rest/db/status?folder={FOLDER_ID}")).is_ok_and(|v| {
                    v["state"].as_str() == Some("idle") && v["needTotalItems"].as_u64() == Some(0)
                })
            });
            if idle {
                return Ok((at, start.elapsed()));
            }
        }
        if start.elapsed() > timeout {
            bail!(
                "[{label}] not {} within {timeout:?}\n{}",
                if connected { "idle" } else { "connected" },
                st_log_tail(c)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
