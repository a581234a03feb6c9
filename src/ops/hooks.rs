//! `[[hook]]`: actions run once per applied change of matching paths, on every
//! node, whether the change was made here (the ACME client, an operator) or applied
//! from a peer. A burst of changes (a published bundle: five files and a link) is
//! debounced into one run, and while changes keep coming each hook runs at most once
//! per its `min_interval` (`coalesce`). Two kinds of action:
//! - `run = [argv]`: a command without a shell; the names of the certificates that
//!   changed are in `CERTMESH_CHANGED`, the changed paths in `CERTMESH_PATHS`, one
//!   per line (a path holding a control character, which a hostile peer may send, is
//!   written with that character escaped, so one path is always one line).
//! - `haproxy_socket` + `haproxy_crt`: a zero-downtime swap through HAProxy's runtime
//!   API (>= 2.1): `live/<name>/combined.pem` is sent with `set ssl cert <crt> <<`
//!   (payload ended by an empty line), then `commit ssl cert <crt>`; no reload.
//!
//! A hook that fails or hangs is logged, counted (`certmesh_hook_failures_total`) and
//! killed after its timeout; sync goes on. The runner sees the tree's commits, the
//! config and the failure report through narrow handles (`crate::handles`), not the
//! daemon's whole state.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::config::{
    hook::HaproxySocket, hook::HookAction, hook::HookConfig, hook::HOOK_MAX_DELAY,
};
use crate::handles::{Changes, Reports, Settings};
use crate::ops::coalesce::Coalesce;

/// Quiet time that ends a burst of changes.
const QUIET: Duration = Duration::from_millis(100);
/// A burst is cut after this long.
const DEADLINE: Duration = Duration::from_secs(2);

/// What the hook runner uses of the daemon.
#[derive(Clone)]
pub struct Hooks {
    pub changes: Changes,
    pub settings: Settings,
    pub reports: Reports,
    /// Serving probes: told which certificates' hooks ran (and how), and asking
    /// for re-runs when a frontend kept an old certificate.
    pub probes: Option<crate::telemetry::Probes>,
}

/// Starts the hook runner if any `[[hook]]` is configured.
pub fn start(hooks: Hooks) -> Option<tokio::task::JoinHandle<()>> {
    let any = hooks
        .settings
        .read(|c| !c.hooks.is_empty())
        .unwrap_or(false);
    any.then(|| tokio::spawn(run(hooks)))
}

/// Certificate names a set of paths concerns (`live/<name>…`, `archive/<name>/…`).
pub fn cert_names(paths: &[&String]) -> Vec<String> {
    let mut names = BTreeSet::new();
    for p in paths {
        let mut parts = p.split('/');
        if let (Some("live" | "archive"), Some(name)) = (parts.next(), parts.next()) {
            names.insert(name.to_string());
        }
    }
    names.into_iter().collect()
}

async fn run(ctx: Hooks) {
    let mut changed = ctx.changes.subscribe();
    let mut seen = *changed.borrow_and_update();
    // Hooks need a restart to change: one coalescer per configured hook.
    let hooks: Vec<HookConfig> = ctx.settings.read(|c| c.hooks.clone()).unwrap_or_default();
    let mut waiting: Vec<Coalesce> = hooks
        .iter()
        .map(|h| Coalesce::new(h.min_interval, HOOK_MAX_DELAY))
        .collect();
    loop {
        let next = waiting.iter().filter_map(Coalesce::due_at).min();
        tokio::select! {
            r = changed.changed() => {
                if r.is_err() { return }
                // Debounce: until QUIET without a change, at most DEADLINE.
                let start = tokio::time::Instant::now();
                while start.elapsed() < DEADLINE {
                    match tokio::time::timeout(QUIET, changed.changed()).await {
                        Ok(Ok(())) => continue,
                        Ok(Err(_)) => return,
                        Err(_) => break,
                    }
                }
                let now = *changed.borrow_and_update();
                let paths = ctx.changes.touched_since(seen);
                seen = now;
                let at = tokio::time::Instant::now();
                for (h, w) in hooks.iter().zip(&mut waiting) {
                    w.add(paths.iter().filter(|p| h.matcher.is_match(p)).cloned(), at);
                }
            }
            _ = sleep_until(next) => {}
            certs = rerun_requested(&ctx) => {
                rerun(&ctx, &certs).await;
                continue;
            }
        }
        let now = tokio::time::Instant::now();
        let mut ran = Ran::default();
        for (h, w) in hooks.iter().zip(&mut waiting) {
            let Some(list) = w.take(now) else { continue };
            let matched: Vec<&String> = list.iter().collect();
            let names = cert_names(&matched);
            // One at a time, in config order; never blocks sync.
            let r = run_one(&ctx, h, &names, &list).await;
            ran.add(&names, r);
        }
        ran.tell(&ctx, false);
    }
}

/// Sleeps until `at`, or forever when nothing waits.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Outcomes of one burst's hooks per certificate, for the serving probes.
#[derive(Default)]
struct Ran(std::collections::BTreeMap<String, Result<(), String>>);

impl Ran {
    fn add(&mut self, names: &[String], r: Result<(), String>) {
        for n in names {
            let e = self.0.entry(n.clone()).or_insert(Ok(()));
            if let Err(why) = &r {
                *e = Err(match e {
                    Err(before) => format!("{before}; {why}"),
                    Ok(()) => why.clone(),
                });
            }
        }
    }

    /// Tells the probes: one report for the certificates whose hooks all worked,
    /// one per certificate whose hook failed (with the output).
    fn tell(self, ctx: &Hooks, rerun: bool) {
        let Some(p) = &ctx.probes else { return };
        let mut ok = Vec::new();
        for (cert, r) in self.0 {
            match r {
                Ok(()) => ok.push(cert),
                Err(output) => p.hook_ran(crate::telemetry::HookRan {
                    certs: vec![cert],
                    ok: false,
                    output,
                    rerun,
                }),
            }
        }
        p.hook_ran(crate::telemetry::HookRan {
            certs: ok,
            ok: true,
            output: String::new(),
            rerun,
        });
    }
}

/// Waits for the serving probes to ask for hook re-runs (never, without probes).
async fn rerun_requested(ctx: &Hooks) -> Vec<String> {
    match &ctx.probes {
        Some(p) => p.rerun_requested().await,
        None => std::future::pending().await,
    }
}

/// Re-runs the hooks of `certs` (those matching `live/<name>/…`) because a frontend
/// still serves an older certificate; tells the probes how it went.
async fn rerun(ctx: &Hooks, certs: &[String]) {
    let hooks: Vec<HookConfig> = ctx.settings.read(|c| c.hooks.clone()).unwrap_or_default();
    let mut ran = Ran::default();
    for cert in certs {
        let paths: Vec<String> = [
            "",
            "/fullchain.pem",
            "/privkey.pem",
            "/combined.pem",
            "/cert.pem",
        ]
        .iter()
        .map(|f| format!("live/{cert}{f}"))
        .collect();
        let names = vec![cert.clone()];
        let mut any = false;
        for h in &hooks {
            let list: Vec<String> = paths
                .iter()
                .filter(|p| h.matcher.is_match(p))
                .cloned()
                .collect();
            if list.is_empty() {
                continue;
            }
            any = true;
            let r = run_one(ctx, h, &names, &list).await;
            ran.add(&names, r);
        }
        if !any {
            ran.add(&names, Err(format!("no [[hook]] matches live/{cert}")));
        }
    }
    ran.tell(ctx, true);
}

/// How a hook is named in logs and errors.
pub fn label(h: &HookConfig) -> String {
    match &h.action {
        HookAction::Run(argv) => format!("{argv:?}"),
        HookAction::Haproxy { socket, crt, .. } => format!("haproxy {crt} via {socket}"),
    }
}

/// How a hook is named in the `hook` label of `/metrics`: the command's path (not
/// its arguments, which may hold anything) or the HAProxy socket.
pub fn metric_label(h: &HookConfig) -> String {
    match &h.action {
        HookAction::Run(argv) => argv.first().cloned().unwrap_or_default(),
        HookAction::Haproxy { socket, .. } => socket.to_string(),
    }
}

async fn run_one(
    ctx: &Hooks,
    h: &HookConfig,
    names: &[String],
    paths: &[String],
) -> Result<(), String> {
    let started = std::time::Instant::now();
    let outcome = match &h.action {
        HookAction::Run(argv) => {
            tokio::time::timeout(h.timeout, command(ctx, argv, names, paths)).await
        }
        HookAction::Haproxy { socket, crt, cert } => {
            tokio::time::timeout(
                h.timeout,
                haproxy_swap(ctx.changes.root(), socket, crt, cert),
            )
            .await
        }
    };
    crate::telemetry::hook_ran(&metric_label(h));
    let failed = match outcome {
        Ok(Ok(done)) => {
            tracing::info!(
                hook = %label(h),
                changed = %names.join(" "),
                ms = started.elapsed().as_millis() as u64,
                "hook ran: {done}"
            );
            return Ok(());
        }
        Ok(Err(e)) => format!("hook {}: {e}", label(h)),
        // Dropping the future killed a command (`kill_on_drop`) or closed the socket.
        Err(_) => format!(
            "hook {} timed out after {:?} and was {}",
            label(h),
            h.timeout,
            match h.action {
                HookAction::Run(_) => "killed",
                HookAction::Haproxy { .. } =>
                    "abandoned (a retry updates HAProxy's open transaction)",
            }
        ),
    };
    ctx.reports.hook_failed(failed.clone());
    Err(failed)
}

/// `run = [argv]`.
async fn command(
    ctx: &Hooks,
    argv: &[String],
    names: &[String],
    paths: &[String],
) -> Result<String, String> {
    let (program, args) = argv.split_first().ok_or_else(|| "empty argv".to_string())?;
    let mut cmd = tokio::process::Command::new(program);
    let domains: Vec<(String, Vec<String>)> = ctx
        .settings
        .read(|c| {
            names
                .iter()
                .map(|n| {
                    let d = c
                        .certificates
                        .iter()
                        .find(|x| x.name == *n)
                        .map(|x| x.domains.clone())
                        .unwrap_or_default();
                    (n.clone(), d)
                })
                .collect()
        })
        .ok_or("config lock poisoned")?;
    let root = ctx.changes.root();
    cmd.args(args)
        .env("CERTMESH_CHANGED", one_per_line(names))
        .env("CERTMESH_PATHS", one_per_line(paths))
        .env("CERTMESH_TREE", root)
        .envs(compat_env(root, &domains))
        .current_dir(root)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| format!("cannot start: {e}"))?;
    let out = child.wait_with_output().await.map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok("exited 0".into())
    } else {
        Err(format!(
            "failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// What certbot's deploy hooks (`RENEWED_LINEAGE`, `RENEWED_DOMAINS`) and lego's
/// (`LEGO_CERT_DOMAIN`, `LEGO_CERT_PATH`, `LEGO_CERT_KEY_PATH`, `LEGO_CERT_PEM_PATH`)
/// read, for the changed certificates `(name, configured domains)`. Paths go through
/// `live/<name>`, so they name the certificate just published. With several
/// certificates in one burst each variable holds one value per line, in the order of
/// `CERTMESH_CHANGED` (certbot and lego run a hook per certificate: a hook written
/// for them sees exactly their value when one certificate changed, the usual case);
/// `RENEWED_DOMAINS` is space-separated per line, as certbot's.
pub fn compat_env(
    tree: &std::path::Path,
    certs: &[(String, Vec<String>)],
) -> Vec<(String, String)> {
    let live = |name: &str, file: &str| {
        let p = tree.join("live").join(name);
        let p = if file.is_empty() { p } else { p.join(file) };
        p.to_string_lossy().into_owned()
    };
    let each = |f: &dyn Fn(&str, &[String]) -> String| {
        let v: Vec<String> = certs.iter().map(|(n, d)| f(n, d)).collect();
        one_per_line(&v)
    };
    vec![
        ("RENEWED_LINEAGE".into(), each(&|n, _| live(n, ""))),
        ("RENEWED_DOMAINS".into(), each(&|_, d| d.join(" "))),
        (
            "LEGO_CERT_DOMAIN".into(),
            each(&|n, d| d.first().cloned().unwrap_or_else(|| n.to_string())),
        ),
        (
            "LEGO_CERT_PATH".into(),
            each(&|n, _| live(n, "fullchain.pem")),
        ),
        (
            "LEGO_CERT_KEY_PATH".into(),
            each(&|n, _| live(n, "privkey.pem")),
        ),
        (
            "LEGO_CERT_PEM_PATH".into(),
            each(&|n, _| live(n, "combined.pem")),
        ),
    ]
}

/// `items` one per line; control characters (a newline in a peer's file name) are
/// escaped so that a name can never pose as two.
pub fn one_per_line(items: &[String]) -> String {
    let mut out = String::new();
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        for c in item.chars() {
            if c.is_control() {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
    }
    out
}

/// HAProxy's CLI reads one command (payload included) into one buffer of
/// `tune.bufsize` bytes (16384 by default).
const HAPROXY_BUFSIZE: usize = 16384;

/// Pushes `live/<cert>/combined.pem` into HAProxy as `crt`, atomically for clients:
/// HAProxy builds the new SSL contexts and swaps them in on commit, so handshakes in
/// progress finish with the old certificate and new ones get the new one.
async fn haproxy_swap(
    root: &Path,
    socket: &HaproxySocket,
    crt: &str,
    cert: &str,
) -> Result<String, String> {
    // Read through the tree's handle: only a well-formed `live/<cert>` link is followed.
    let rel = format!("live/{cert}/combined.pem");
    let file = root.join(&rel);
    let root = root.to_path_buf();
    let read = tokio::task::spawn_blocking(move || crate::disk::tree::read_checked(&root, &rel))
        .await
        .map_err(|e| format!("reading {}: {e}", file.display()))?;
    let pem = read
        .and_then(|b| String::from_utf8(b).map_err(std::io::Error::other))
        .map_err(|e| format!("reading {}: {e}", file.display()))?;
    let payload = haproxy_payload(&pem).map_err(|e| format!("{}: {e}", file.display()))?;
    // Look first: an unknown crt is reported as such, and another open transaction is
    // left alone (HAProxy 2.6 would put our PEM into *that* transaction).
    let listing = haproxy_cli(socket, "show ssl cert\n").await?;
    check_listing(&listing, socket, crt)?;
    let set = format!("set ssl cert {crt} <<\n{payload}\n");
    let answer = haproxy_cli(socket, &set).await?;
    if let Some(other) = transaction_of(&answer).filter(|t| *t != crt) {
        // A transaction for another crt opened in between and now holds our PEM:
        // it must not be committed under that name.
        let _ = haproxy_cli(socket, &format!("abort ssl cert {other}\n")).await;
        return Err(format!(
            "HAProxy at {socket} put the PEM for {crt} into an open transaction for {other}, \
             which was aborted; retry when no other `set ssl cert` is in progress"
        ));
    }
    if let Err(e) = check_set(&answer, socket, crt) {
        if set.len() > HAPROXY_BUFSIZE {
            return Err(format!(
                "{e} (the command is {} bytes; HAProxy's CLI takes at most tune.bufsize, {HAPROXY_BUFSIZE} by default)",
                set.len()
            ));
        }
        return Err(e);
    }
    let answer = haproxy_cli(socket, &format!("commit ssl cert {crt}\n")).await?;
    if !answer.contains("Success!") {
        // Leave no half-done transaction behind for the next attempt or an operator.
        let _ = haproxy_cli(socket, &format!("abort ssl cert {crt}\n")).await;
        return Err(format!(
            "HAProxy at {socket} did not commit {crt}: {}",
            one_line(&answer)
        ));
    }
    Ok(format!(
        "live/{cert}/combined.pem now served by HAProxy as {crt}"
    ))
}

/// The file an answer to `set ssl cert` names (`Transaction created for certificate
/// <file>!`).
fn transaction_of(answer: &str) -> Option<&str> {
    let line = answer.lines().next()?;
    let rest = line
        .strip_prefix("Transaction created for certificate ")
        .or_else(|| line.strip_prefix("Transaction updated for certificate "))?;
    rest.strip_suffix('!')
}

/// Reads `show ssl cert` (`# transaction` / `*<file>`, then `# filename` / one per
/// line): an error if another file's transaction is open or if HAProxy lists
/// certificates but not `crt`. An answer in another shape is not judged here.
fn check_listing(listing: &str, socket: &HaproxySocket, crt: &str) -> Result<(), String> {
    let mut section = "";
    let mut files = Vec::new();
    for line in listing.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("# ") {
            section = name;
        } else if let (Some(open), "transaction") = (line.strip_prefix('*'), section) {
            if open != crt {
                return Err(format!(
                    "HAProxy at {socket} has a certificate transaction open for {open} (an operator's, \
                     or a hook's that was cut off); not touching it — `abort ssl cert {open}` ends it"
                ));
            }
        } else if section == "filename" && !line.is_empty() {
            files.push(line);
        }
    }
    if !files.is_empty() && !files.contains(&crt) {
        return Err(format!(
            "HAProxy at {socket} does not know the certificate {crt:?}: haproxy_crt must be exactly \
             the path of a `crt` in its configuration; `show ssl cert` lists: {}",
            files.join(" ")
        ));
    }
    Ok(())
}

/// The answer to `set ssl cert`, as an error when it is not a transaction.
fn check_set(answer: &str, socket: &HaproxySocket, crt: &str) -> Result<(), String> {
    if transaction_of(answer) == Some(crt) {
        return Ok(());
    }
    if answer.contains("not referenced by the configuration") {
        return Err(format!(
            "HAProxy at {socket} does not know the certificate {crt:?}: haproxy_crt must be exactly \
             the path of a `crt` in its configuration (see `show ssl cert`); HAProxy said: {}",
            one_line(answer)
        ));
    }
    if answer.contains("ongoing transaction") {
        return Err(format!(
            "HAProxy at {socket} has another certificate transaction open (an operator's, or a \
             hook for another crt that was cut off; `abort ssl cert <file>` ends it): {}",
            one_line(answer)
        ));
    }
    Err(format!(
        "HAProxy at {socket} refused `set ssl cert {crt}`: {}",
        one_line(answer)
    ))
}

fn one_line(answer: &str) -> String {
    let s = answer.trim().replace('\n', " / ");
    if s.is_empty() {
        "(no answer: is the stats socket at level admin?)".into()
    } else {
        s
    }
}

/// The PEM blocks of `combined.pem` without blank lines or anything between blocks
/// (an empty line would end HAProxy's payload early). Needs a certificate and a key.
pub fn haproxy_payload(pem: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut inside = false;
    let (mut certs, mut keys) = (0, 0);
    for line in pem.lines() {
        let line = line.trim_end();
        if let Some(label) = line.strip_prefix("-----BEGIN ") {
            inside = true;
            if label.starts_with("CERTIFICATE") {
                certs += 1;
            } else if label.contains("PRIVATE KEY") {
                keys += 1;
            }
        }
        if inside && !line.is_empty() {
            out.push_str(line);
            out.push('\n');
        }
        if line.starts_with("-----END ") {
            inside = false;
        }
    }
    if certs == 0 || keys != 1 {
        return Err(format!(
            "expected certificates and one private key, found {certs} certificate(s) and {keys} key(s)"
        ));
    }
    Ok(out)
}

/// One command on a fresh connection to HAProxy's runtime API (non-interactive: it
/// answers, then closes); returns the answer.
async fn haproxy_cli(socket: &HaproxySocket, command: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
        mut s: S,
        command: &str,
    ) -> std::io::Result<String> {
        s.write_all(command.as_bytes()).await?;
        s.flush().await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }
    let verb = command.split(" <<").next().unwrap_or(command).trim();
    let connect_err = |e: std::io::Error| {
        format!(
            "cannot connect to HAProxy's runtime API at {socket}: {e} \
             (is `stats socket {socket} level admin` in haproxy.cfg, and HAProxy running?)"
        )
    };
    let answer = match socket {
        HaproxySocket::Unix(p) => {
            let s = tokio::net::UnixStream::connect(p)
                .await
                .map_err(connect_err)?;
            exchange(s, command).await
        }
        HaproxySocket::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a)
                .await
                .map_err(connect_err)?;
            exchange(s, command).await
        }
    };
    answer.map_err(|e| format!("`{verb}` on HAProxy's runtime API at {socket}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metric_label_is_the_command_path_not_its_arguments() {
        let hook = HookConfig {
            paths: vec!["live/**".into()],
            matcher: crate::config::globs::Globs::new(&["live/**"]).unwrap(),
            action: HookAction::Run(vec!["/usr/sbin/nginx".into(), "-s".into(), "reload".into()]),
            timeout: Duration::from_secs(30),
            min_interval: Duration::from_secs(5),
        };
        assert_eq!(metric_label(&hook), "/usr/sbin/nginx");
        assert_eq!(label(&hook), r#"["/usr/sbin/nginx", "-s", "reload"]"#);
    }

    #[test]
    fn hook_lists_are_one_per_line_and_a_newline_cannot_forge_a_path() {
        let paths = vec![
            "live/www/cert.pem".to_string(),
            "dir with space/x".to_string(),
            "evil\nlive/other/privkey.pem".to_string(),
        ];
        let text = one_per_line(&paths);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "live/www/cert.pem",
                "dir with space/x",
                "evil\\nlive/other/privkey.pem"
            ]
        );
        assert_eq!(one_per_line(&[]), "");
    }

    #[test]
    fn certbot_and_lego_hooks_get_their_variables() {
        let tree = std::path::Path::new("/etc/letsencrypt");
        let one = compat_env(
            tree,
            &[(
                "www".into(),
                vec!["www.example.com".into(), "example.com".into()],
            )],
        );
        let get = |env: &[(String, String)], k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(get(&one, "RENEWED_LINEAGE"), "/etc/letsencrypt/live/www");
        assert_eq!(get(&one, "RENEWED_DOMAINS"), "www.example.com example.com");
        assert_eq!(get(&one, "LEGO_CERT_DOMAIN"), "www.example.com");
        assert_eq!(
            get(&one, "LEGO_CERT_PATH"),
            "/etc/letsencrypt/live/www/fullchain.pem"
        );
        assert_eq!(
            get(&one, "LEGO_CERT_KEY_PATH"),
            "/etc/letsencrypt/live/www/privkey.pem"
        );
        assert_eq!(
            get(&one, "LEGO_CERT_PEM_PATH"),
            "/etc/letsencrypt/live/www/combined.pem"
        );
        let two = compat_env(
            tree,
            &[
                ("a".into(), vec![]),
                ("b\nc".into(), vec!["b.example".into()]),
            ],
        );
        assert_eq!(
            get(&two, "RENEWED_LINEAGE"),
            "/etc/letsencrypt/live/a\n/etc/letsencrypt/live/b\\nc"
        );
        assert_eq!(get(&two, "LEGO_CERT_DOMAIN"), "a\nb.example");
    }

    #[test]
    fn names_from_paths() {
        let p: Vec<String> = [
            "live/www.example.com",
            "live/www.example.com/fullchain.pem",
            "archive/api/3/privkey.pem",
            "dhparam.pem",
            "live",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let refs: Vec<&String> = p.iter().collect();
        assert_eq!(cert_names(&refs), ["api", "www.example.com"]);
    }

    #[test]
    fn haproxy_payload_has_no_blank_lines() {
        let pem = "-----BEGIN CERTIFICATE-----\r\nAAAA\n\n-----END CERTIFICATE-----\n\n\
                   junk between blocks\n\n-----BEGIN PRIVATE KEY-----\nBBBB\n-----END PRIVATE KEY-----\n\n";
        let p = haproxy_payload(pem).unwrap();
        assert_eq!(
            p,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n\
             -----BEGIN PRIVATE KEY-----\nBBBB\n-----END PRIVATE KEY-----\n"
        );
        assert!(!p.contains("\n\n"));
        let e = haproxy_payload("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
            .unwrap_err();
        assert!(e.contains("0 key"), "{e}");
    }

    #[test]
    fn haproxy_answers_are_read() {
        let sock = HaproxySocket::Unix("/run/haproxy/admin.sock".into());
        let crt = "/etc/haproxy/certs/www.pem";
        let created = format!("Transaction created for certificate {crt}!\n\n");
        let updated = format!("Transaction updated for certificate {crt}!\n\n");
        assert!(check_set(&created, &sock, crt).is_ok());
        assert!(check_set(&updated, &sock, crt).is_ok());
        assert_eq!(transaction_of(&updated), Some(crt));
        assert!(check_set(
            "Transaction updated for certificate /other.pem!\n\n",
            &sock,
            crt
        )
        .is_err());
        // `show ssl cert`, as HAProxy 2.6 answers it.
        let listing = |tx: &str| {
            format!("# transaction\n{tx}# filename\n/etc/haproxy/certs/www.pem\n/etc/haproxy/api.pem\n\n")
        };
        assert!(check_listing(&listing(""), &sock, crt).is_ok());
        assert!(check_listing(&listing(&format!("*{crt}\n")), &sock, crt).is_ok());
        let e = check_listing(&listing("*/etc/haproxy/api.pem\n"), &sock, crt).unwrap_err();
        assert!(e.contains("open for /etc/haproxy/api.pem"), "{e}");
        let e = check_listing(&listing(""), &sock, "/etc/haproxy/other.pem").unwrap_err();
        assert!(
            e.contains("does not know the certificate") && e.contains("api.pem"),
            "{e}"
        );
        assert!(check_listing("Unknown command\n\n", &sock, crt).is_ok());
        let e = check_set(
            "Can't replace a certificate which is not referenced by the configuration!\nCan't update x!\n\n",
            &sock,
            crt,
        )
        .unwrap_err();
        assert!(
            e.contains("does not know the certificate") && e.contains(crt),
            "{e}"
        );
        let e = check_set("Permission denied\n\n", &sock, crt).unwrap_err();
        assert!(
            e.contains("refused") && e.contains("Permission denied"),
            "{e}"
        );
        let e = check_set("", &sock, crt).unwrap_err();
        assert!(e.contains("level admin"), "{e}");
    }
}
