//! The `certmesh` command: parse flags, start tracing, load config, run, map errors to
//! exit codes (0 ok, 1 runtime error, 2 usage or config error).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use certmesh::config::Config;

/// The packaged config: what every subcommand reads when neither `--config` nor
/// `$CERTMESH_CONFIG` names another file.
const DEFAULT_CONFIG: &str = "/etc/certmesh/certmesh.toml";
use certmesh::identity::Identity;

/// The end of `certmesh --help` and of certmesh(1).
const AFTER_HELP: &str = "\
Exit status: 0 ok, 1 runtime error, 2 usage or config error.

Files: /etc/certmesh/certmesh.toml (the config every subcommand reads unless --config \
or $CERTMESH_CONFIG names another), <state_dir>/control.sock (status, issue, renew), \
<state_dir>/node-key.pem + node-cert.pem (the identity), <state_dir>/index.db.

Environment: CERTMESH_CONFIG, RUST_LOG (log filter), CERTMESH_LOG_FORMAT=json, \
NO_COLOR; set by systemd: NOTIFY_SOCKET, WATCHDOG_USEC, JOURNAL_STREAM.

Signals (run): SIGHUP re-reads the peer list; SIGTERM finishes the batch being written \
and exits 0.

See /usr/share/doc/certmesh/README.md.";

#[derive(Parser)]
#[command(
    name = "certmesh",
    version,
    about = "Keeps a TLS certificate tree identical on every node, over QUIC with mutual TLS",
    after_long_help = AFTER_HELP
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create this node's identity (key + self-signed cert) if absent; print the device ID.
    Init {
        /// The node's state directory (`[node] state_dir`): the identity is written
        /// here as node-key.pem (0600) + node-cert.pem; created if absent.
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
    },
    /// Print this node's device ID.
    Id {
        /// The node's state directory (`[node] state_dir`) holding its identity.
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
    },
    /// Validate the config and exit (for config management).
    Check {
        #[arg(long, value_name = "FILE", env = "CERTMESH_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Check these configs (a whole fleet, as config management renders them)
        /// instead: each one, then the peer graph they form (one-sided or wrong
        /// listings, unreachable addresses, pieces that never sync).
        #[arg(long, value_name = "FILE", num_args = 1..)]
        fleet: Vec<PathBuf>,
    },
    /// Run the daemon in the foreground (logs to stderr; SIGHUP re-reads peers).
    Run {
        #[arg(long, value_name = "FILE", env = "CERTMESH_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Ask the running daemon for peers, sync state and errors.
    Status {
        #[arg(long, value_name = "FILE", env = "CERTMESH_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Machine-readable output with stable keys.
        #[arg(long)]
        json: bool,
        /// Also ask every node of the cluster, behind hubs too, whether it is in
        /// sync with each of its peers (`cluster` in the JSON).
        #[arg(long)]
        cluster: bool,
        /// How long `--cluster` waits for the cluster to be in sync ("5s", "500ms").
        #[arg(long, default_value = "5s", value_parser = certmesh::config::values::parse_duration)]
        timeout: std::time::Duration,
        /// One certificate in full (its table row has only some of it).
        #[arg(long, value_name = "NAME", conflicts_with = "all")]
        cert: Option<String>,
        /// Every certificate in the table; above 20, `status` summarises them.
        #[arg(long)]
        all: bool,
    },
    /// Ask the running daemon to order certificate NAME now (waits for the result).
    Issue {
        #[arg(long, value_name = "FILE", env = "CERTMESH_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The `[[certificate]]` name.
        name: String,
        /// Print the daemon's answer as JSON (version, not_after, took_ms, ca).
        #[arg(long)]
        json: bool,
    },
    /// Ask the running daemon to renew every certificate that is due (waits for the result).
    Renew {
        #[arg(long, value_name = "FILE", env = "CERTMESH_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Order even certificates that are not due, even if this node is not the renewer.
        #[arg(long)]
        force: bool,
        /// Only show what would be ordered, and by whom.
        #[arg(long)]
        dry_run: bool,
        /// Print the daemon's answer as JSON (`results[]`, `failed`).
        #[arg(long)]
        json: bool,
    },
    /// Wait until every live node of the cluster (behind hubs too) has PATH as this
    /// node has it; name the nodes that do not. Exits 1 if some live node did not.
    Confirm {
        #[arg(long, value_name = "FILE", env = "CERTMESH_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// A path in the tree, relative to its root.
        path: String,
        /// Give up after this long ("30s", "500ms").
        #[arg(long, default_value = "30s", value_parser = certmesh::config::values::parse_duration)]
        timeout: std::time::Duration,
        /// Print the daemon's answer as JSON (`done`, `nodes[]`).
        #[arg(long)]
        json: bool,
    },
    /// Print packet filter rules admitting the QUIC port only from the configured peers.
    Firewall {
        #[arg(long, value_name = "FILE", env = "CERTMESH_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The rule syntax.
        #[arg(long, value_enum, default_value_t = FirewallFormat::Nft)]
        format: FirewallFormat,
        /// Admit peers only on this interface (the backnet).
        #[arg(long, value_name = "IFACE")]
        interface: Option<String>,
    },
    /// Bring back a version of PATH that a peer's change replaced or deleted, kept on
    /// this node under `<tree>/.certmesh/kept/` (the last 5 versions per path, up to
    /// 30 days; not under acme/). Written atomically into the tree; a running daemon
    /// replicates it like any local change.
    Restore {
        /// This node's config (kept versions are under its [tree] path).
        #[arg(long, value_name = "FILE", env = "CERTMESH_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The path in the tree, e.g. `dhparam.pem` or `archive/www/3/privkey.pem`.
        #[arg(required_unless_present = "list")]
        path: Option<String>,
        /// Which kept version: 1 is the newest (see --list).
        #[arg(long, value_name = "N", default_value_t = 1, conflicts_with = "list")]
        version: usize,
        /// Show the kept versions of PATH (newest first), or every kept path.
        #[arg(long)]
        list: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Adopt the certificates (and account, where possible) of a certbot or lego tree
    /// into certmesh's layout without a new order; the paths nginx already uses stay
    /// valid (see docs/migrating.md).
    Import {
        #[arg(long, value_name = "FILE", env = "CERTMESH_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The client that made PATH.
        #[arg(long, value_enum)]
        from: certmesh::import::Source,
        /// certbot's config dir (e.g. /etc/letsencrypt) or lego's --path (e.g. ~/.lego).
        path: PathBuf,
    },
    /// Certificates kept as data in the tree (`.certmesh/certificates/<name>.toml`),
    /// which every node learns through sync: add, remove, list. `[[certificate]]`
    /// blocks in a node's config win over a tree entry of the same name.
    Cert {
        #[command(subcommand)]
        cmd: CertCmd,
    },
    /// Start a 3-node mesh on loopback in a temp dir, show a file propagating, clean up.
    Demo {
        /// How many propagation samples to take.
        #[arg(long, default_value_t = 20)]
        samples: usize,
    },
    /// Print a shell completion script (the .deb installs them for bash, zsh and fish).
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page certmesh(1), or write it and one page per subcommand into DIR.
    #[command(hide = true)]
    Man {
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

/// `certmesh cert ...`.
#[derive(Subcommand)]
enum CertCmd {
    /// Add certificate NAME (or replace its entry): the renewer orders it and every
    /// node syncs it. Only on a writer.
    Add {
        #[arg(long, value_name = "FILE", env = "CERTMESH_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Directory name under `live/` and `archive/`.
        name: String,
        /// A DNS name of the certificate (repeat for more; `*.` for a wildcard).
        #[arg(long = "domain", value_name = "DOMAIN", required = true)]
        domains: Vec<String>,
        /// rsa2048 | rsa3072 | rsa4096 | ecdsa-p256 (default) | ecdsa-p384.
        #[arg(long)]
        key: Option<String>,
        /// "http-01" or "dns-01"; unset: dns-01 for wildcards, http-01 for the rest.
        #[arg(long)]
        challenge: Option<String>,
        /// Keep the current private key on renewal.
        #[arg(long)]
        reuse_key: bool,
    },
    /// Remove certificate NAME's entry: renewals stop, `live/` and `archive/` stay
    /// (unless --purge). Only on a writer.
    Remove {
        #[arg(long, value_name = "FILE", env = "CERTMESH_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        name: String,
        /// Also delete `live/NAME` and `archive/NAME/` (peers keep them for `restore`).
        #[arg(long)]
        purge: bool,
    },
    /// The certificates of this node's config and tree, with where each came from.
    List {
        #[arg(long, value_name = "FILE", env = "CERTMESH_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Machine-readable output (`certificates[]`, `refused[]`).
        #[arg(long)]
        json: bool,
    },
}

/// `certmesh firewall --format`.
#[derive(Clone, Copy, ValueEnum)]
enum FirewallFormat {
    /// An nftables table `inet certmesh` (`nft -f`).
    #[value(alias = "nftables")]
    Nft,
    /// An iptables chain `certmesh-in` (`iptables-restore --noflush`).
    Iptables,
    /// The same for IPv6 (`ip6tables-restore --noflush`).
    Ip6tables,
}

impl From<FirewallFormat> for certmesh::ops::firewall::Format {
    fn from(f: FirewallFormat) -> Self {
        match f {
            FirewallFormat::Nft => Self::Nft,
            FirewallFormat::Iptables => Self::Iptables,
            FirewallFormat::Ip6tables => Self::Ip6tables,
        }
    }
}

enum Failure {
    Config(String),
    Runtime(String),
}

fn main() -> ExitCode {
    certmesh::daemon::tune_allocator();
    let cli = Cli::parse();
    certmesh::ops::logging::init();
    match dispatch(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(m)) => {
            eprintln!("certmesh: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(m)) => {
            eprintln!("certmesh: {m}");
            ExitCode::from(1)
        }
    }
}

fn load(path: &std::path::Path) -> Result<Config, Failure> {
    Config::load(path).map_err(|e| match &e {
        certmesh::config::ConfigError::Read { source, .. }
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Failure::Config(format!(
                "{e} (name this node's config with --config FILE or $CERTMESH_CONFIG; \
                 {DEFAULT_CONFIG} is the default)"
            ))
        }
        _ => Failure::Config(e.to_string()),
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::Runtime(format!("starting the runtime: {e}")))
}

/// An error from the daemon or the runtime, with its causes; a config error the
/// daemon found (a key checked against the disk or the identity) exits 2.
fn rt_err(e: anyhow::Error) -> Failure {
    if e.downcast_ref::<certmesh::config::ConfigError>().is_some() {
        return Failure::Config(format!("{e:#}"));
    }
    Failure::Runtime(format!("{e:#}"))
}

fn dispatch(cmd: Cmd) -> Result<(), Failure> {
    match cmd {
        Cmd::Init { state_dir } => {
            let id = Identity::init(&state_dir).map_err(|e| Failure::Runtime(e.to_string()))?;
            println!("{}", id.id);
        }
        Cmd::Id { state_dir } => {
            let id = Identity::load(&state_dir).map_err(|e| Failure::Runtime(e.to_string()))?;
            println!("{}", id.id);
        }
        Cmd::Check { config, fleet } if fleet.is_empty() => check(&config)?,
        Cmd::Check { fleet, .. } => check_fleet(&fleet)?,
        Cmd::Run { config } => {
            let c = load(&config)?;
            c.check_tree_exists()
                .map_err(|e| Failure::Config(e.to_string()))?;
            let rt = runtime()?;
            let stop = {
                let _in_runtime = rt.enter();
                shutdown_signal()
            };
            rt.block_on(certmesh::daemon::run(c, stop))
                .map_err(rt_err)?;
        }
        Cmd::Status {
            config,
            json,
            cluster,
            timeout,
            cert,
            all,
        } => {
            let view = match (&cert, all) {
                (Some(name), _) => certmesh::ops::render::CertView::One(name),
                (None, true) => certmesh::ops::render::CertView::All,
                (None, false) => certmesh::ops::render::CertView::Auto,
            };
            status(&load(&config)?, json, cluster.then_some(timeout), view)?
        }
        Cmd::Issue { config, name, json } => issue(&config, &name, json)?,
        Cmd::Renew {
            config,
            force,
            dry_run,
            json,
        } => {
            let c = load(&config)?;
            let v = runtime()?
                .block_on(certmesh::ops::control::renew(
                    &c.control_socket(),
                    force,
                    dry_run,
                ))
                .map_err(rt_err)?;
            if json {
                print_json(&v);
            } else {
                print_renewals(&v);
            }
            if v.failed > 0 {
                return Err(Failure::Runtime(format!("{} renewals failed", v.failed)));
            }
            if force && !dry_run {
                not_ordered(&v)?;
            }
        }
        Cmd::Confirm {
            config,
            path,
            timeout,
            json,
        } => confirm(&load(&config)?, path, timeout, json)?,
        Cmd::Firewall {
            config,
            format,
            interface,
        } => {
            let c = load(&config)?;
            let rules = certmesh::ops::firewall::render(&c, format.into(), interface.as_deref())
                .map_err(|e| Failure::Config(e.to_string()))?;
            print!("{rules}");
        }
        Cmd::Restore {
            config,
            path,
            version,
            list,
            json,
        } => restore(&load(&config)?, path.as_deref(), version, list, json)?,
        Cmd::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "certmesh", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script)
                .map_err(|e| Failure::Runtime(format!("writing the completions: {e}")))?;
        }
        Cmd::Man { out_dir } => man(out_dir.as_deref())?,
        Cmd::Import { config, from, path } => import(&load(&config)?, from, &path)?,
        Cmd::Cert { cmd } => cert(cmd)?,
        Cmd::Demo { samples } => {
            runtime()?
                .block_on(certmesh::demo::run(samples))
                .map_err(rt_err)?;
        }
    }
    Ok(())
}

/// `certmesh check --fleet`: every config as `check` does, then their peer graph.
fn check_fleet(paths: &[PathBuf]) -> Result<(), Failure> {
    let mut failed = Vec::new();
    let mut configs = Vec::new();
    for p in paths {
        match check_config(p) {
            Ok(c) => configs.push(c),
            Err(Failure::Config(m) | Failure::Runtime(m)) => {
                eprintln!("certmesh: {m}");
                failed.push(p.display().to_string());
            }
        }
    }
    if !failed.is_empty() {
        return Err(Failure::Config(format!(
            "fleet: {} of {} configs failed the check ({}); the peer graph was not checked",
            failed.len(),
            paths.len(),
            failed.join(", ")
        )));
    }
    let r = certmesh::ops::fleet::check(&configs, |c| {
        Identity::load(&c.state_dir).ok().map(|i| i.id)
    });
    for w in &r.warnings {
        eprintln!("fleet: warning: {w}");
    }
    if !r.errors.is_empty() {
        return Err(Failure::Config(format!(
            "fleet: {}",
            r.errors.join("\nfleet: ")
        )));
    }
    println!(
        "fleet: ok ({} nodes, {} links listed at both ends, one connected graph)",
        r.nodes, r.links
    );
    Ok(())
}

/// `certmesh check`: the config, the identity, the CA roots, the TSIG key and the tree.
fn check(config: &std::path::Path) -> Result<(), Failure> {
    check_config(config).map(drop)
}

/// What `check` does; the checked config.
fn check_config(config: &std::path::Path) -> Result<Config, Failure> {
    let c = load(config)?;
    c.check_tree_exists()
        .map_err(|e| Failure::Config(e.to_string()))?;
    let me = Identity::load(&c.state_dir).map_err(|e| {
        Failure::Config(format!(
            "{}: node.state_dir {}: no usable identity ({e}); create it with `certmesh init --state-dir {}`",
            config.display(),
            c.state_dir.display(),
            c.state_dir.display()
        ))
    })?;
    c.check_not_own_peer(me.id)
        .map_err(|e| Failure::Config(e.to_string()))?;
    if let Err(e) = certmesh::writers::policy(&c, me.id) {
        return Err(Failure::Config(e.to_string()));
    }
    if let Some(roots) = c.acme.as_ref().and_then(|a| a.ca_roots.as_ref()) {
        if let Err(e) = std::fs::read(roots) {
            return Err(Failure::Config(format!(
                "{}: acme.ca_roots {}: {e}",
                config.display(),
                roots.display()
            )));
        }
    }
    if let Some(certmesh::config::dns::DnsProvider::Rfc2136 { key, .. }) = c
        .acme
        .as_ref()
        .and_then(|a| a.dns.as_ref())
        .map(|d| &d.provider)
    {
        if let Err(e) = certmesh::acme::dns::key::load(key) {
            return Err(Failure::Config(format!("{}: {e}", config.display())));
        }
    }
    let problems = certmesh::import::check_tree(&c);
    if !problems.is_empty() {
        return Err(Failure::Config(format!(
            "{}: {}",
            config.display(),
            problems.join("\n")
        )));
    }
    for w in certmesh::core::cluster::peer_warnings(c.peers.len()) {
        eprintln!("{}: warning: {w}", config.display());
    }
    println!(
        "{}: ok ({} peers, {} certificates, {} hooks, acme {}, tree {})",
        config.display(),
        c.peers.len(),
        c.certificates.len(),
        c.hooks.len(),
        if c.acme.is_some() { "on" } else { "off" },
        c.tree.display()
    );
    Ok(c)
}

/// `certmesh status`: the daemon's answer, rendered or as JSON.
fn status(
    c: &Config,
    json: bool,
    cluster: Option<std::time::Duration>,
    view: certmesh::ops::render::CertView<'_>,
) -> Result<(), Failure> {
    let cluster_ms = cluster.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
    let socket = c.control_socket();
    if json && cluster.is_none() {
        // Printed as the daemon sent it, pretty: no typed decode needed.
        let req = certmesh::ops::control::Request::Status {
            cluster_ms,
            summary: false,
        };
        let v = runtime()?
            .block_on(certmesh::ops::control::send(&socket, &req))
            .map_err(rt_err)?;
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let s = runtime()?
        .block_on(certmesh::ops::control::status(
            &socket,
            cluster_ms,
            !json && view == certmesh::ops::render::CertView::Auto,
        ))
        .map_err(rt_err)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
    }
    let behind = cluster.map(|_| cluster_behind(&s));
    if !json {
        print!(
            "{}",
            certmesh::ops::render::render_view(s, view).map_err(Failure::Runtime)?
        );
    }
    match behind {
        Some(behind) if !behind.is_empty() => Err(Failure::Runtime(format!(
            "cluster not in sync: {}",
            behind.join(", ")
        ))),
        _ => Ok(()),
    }
}

/// For `status --cluster`'s exit code: every direct peer not connected, and every
/// node of the census that is down, behind or not in sync ("lb2 (down)").
fn cluster_behind(s: &certmesh::ops::status::Status) -> Vec<String> {
    let mut out: Vec<String> = s
        .peers
        .iter()
        .filter(|p| !p.connected)
        .map(|p| format!("{} (not connected)", p.name))
        .collect();
    match &s.cluster {
        None => out.push("no cluster answer".into()),
        Some(c) => {
            for n in &c.nodes {
                let why = if !n.live {
                    "down"
                } else if !n.in_sync {
                    "behind"
                } else {
                    continue;
                };
                let entry = format!("{} ({why})", n.name);
                if !out.iter().any(|o| o.starts_with(&format!("{} (", n.name))) {
                    out.push(entry);
                }
            }
            if !c.in_sync && out.is_empty() {
                out.push("the census did not complete in time".into());
            }
        }
    }
    out
}

/// `renew --force`: an error naming each certificate that was not ordered and why
/// (another node holds its lease, say), so scripts do not take it for a renewal.
fn not_ordered(v: &certmesh::acme::handle::RenewReport) -> Result<(), Failure> {
    let skipped: Vec<String> = v
        .results
        .iter()
        .filter(|r| r.ordered != Some(true))
        .map(|r| match &r.waiting_for {
            Some(w) => format!("{}: not ordered: {w}", r.name),
            None => format!("{}: not ordered", r.name),
        })
        .collect();
    if skipped.is_empty() {
        return Ok(());
    }
    Err(Failure::Runtime(format!(
        "renew --force: {}",
        skipped.join("; ")
    )))
}

/// `certmesh cert add|remove|list`.
fn cert(cmd: CertCmd) -> Result<(), Failure> {
    use certmesh::certs::{self, CertError};
    let fail = |e: CertError| match e {
        CertError::Io { .. } => Failure::Runtime(e.to_string()),
        e => Failure::Config(e.to_string()),
    };
    match cmd {
        CertCmd::Add {
            config,
            name,
            domains,
            key,
            challenge,
            reuse_key,
        } => {
            let c = load(&config)?;
            let cert = certs::from_args(
                &name,
                &domains,
                key.as_deref(),
                challenge.as_deref(),
                reuse_key,
            )
            .map_err(fail)?;
            let rel = certs::add(&c, &cert).map_err(fail)?;
            println!("{name}: wrote {rel}; every node learns it through sync");
        }
        CertCmd::Remove {
            config,
            name,
            purge,
        } => {
            let removed = certs::remove(&load(&config)?, &name, purge).map_err(fail)?;
            println!("{name}: removed {}", removed.join(", "));
        }
        CertCmd::List { config, json } => {
            let (rows, refused) = certs::list(&load(&config)?);
            if json {
                let refused: Vec<String> = refused.iter().map(|r| r.to_string()).collect();
                print_json(&serde_json::json!({ "certificates": rows, "refused": refused }));
                return Ok(());
            }
            for r in &rows {
                let over = if r.overrides_tree_entry {
                    " (overrides a tree entry)"
                } else {
                    ""
                };
                let live = if r.live { "live" } else { "not live yet" };
                println!(
                    "{}  {}  {}{over}  {live}",
                    r.name,
                    r.domains.join(","),
                    r.source.label()
                );
            }
            for r in refused {
                eprintln!("certmesh: {r}");
            }
        }
    }
    Ok(())
}

/// `certmesh issue NAME`: one order now, with its steps on a terminal.
fn issue(config: &std::path::Path, name: &str, json: bool) -> Result<(), Failure> {
    let c = load(config)?;
    let in_tree = || {
        certmesh::certs::read(&c.tree, c.acme.as_ref())
            .certs
            .iter()
            .any(|x| x.name == name)
    };
    if !c.certificates.iter().any(|x| x.name == name) && !in_tree() {
        return Err(Failure::Config(format!(
            "{}: no [[certificate]] named {name:?}",
            config.display()
        )));
    }
    let rt = runtime()?;
    // On a terminal, show the order's steps while waiting for its result.
    let progress = (!json && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
        rt.spawn(issue_progress(
            c.control_socket(),
            name.to_string(),
            c.tree.clone(),
        ))
    });
    let v = rt.block_on(certmesh::ops::control::issue(&c.control_socket(), name));
    if let Some(p) = progress {
        p.abort();
    }
    let v = v.map_err(rt_err)?;
    if json {
        print_json(&v);
        return Ok(());
    }
    println!(
        "{}: version {} issued, valid until {} ({} ms, CA {})",
        v.name, v.version, v.not_after, v.took_ms, v.ca
    );
    Ok(())
}

/// `certmesh confirm PATH`: which nodes of the cluster have the path.
fn confirm(
    c: &Config,
    path: String,
    timeout: std::time::Duration,
    json: bool,
) -> Result<(), Failure> {
    let req = certmesh::ops::control::Request::Confirm {
        path,
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
    };
    let v = runtime()?
        .block_on(certmesh::ops::control::send(&c.control_socket(), &req))
        .map_err(rt_err)?;
    if json {
        print_json(&v);
    }
    let r: certmesh::ops::control::ConfirmReply = serde_json::from_value(v.clone())
        .map_err(|_| Failure::Runtime(format!("daemon answer: {v}")))?;
    if !json {
        for n in &r.nodes {
            let state = match (n.after_ms, n.live) {
                (Some(ms), _) => format!("has it after {ms} ms"),
                (None, true) => "did not confirm in time".to_string(),
                (None, false) => "not connected to the cluster".to_string(),
            };
            println!("{:<24} {state}", n.name);
        }
    }
    if !r.done {
        return Err(Failure::Runtime("some live nodes did not confirm".into()));
    }
    Ok(())
}

/// How often `certmesh issue` asks the daemon for the order's state on a terminal.
const PROGRESS_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// Prints the steps of an order (to stderr) as `status` shows them, until aborted.
async fn issue_progress(socket: PathBuf, name: String, tree: PathBuf) {
    let challenges = tree.join("acme/.well-known/acme-challenge");
    let mut first_version = None;
    let mut last = String::new();
    loop {
        if let Ok(v) = certmesh::ops::control::request(&socket, "status").await {
            if let Ok(s) = serde_json::from_value::<certmesh::ops::status::Status>(v) {
                let tokens = std::fs::read_dir(&challenges).map_or(0, |d| d.count());
                if let Some(cert) = s.certificates.iter().find(|c| c.name == name) {
                    let first = *first_version.get_or_insert(cert.version);
                    let line = issue_step(cert, &s.peers, tokens, first);
                    if line != last {
                        eprintln!("{name}: {line}");
                        last = line;
                    }
                }
            }
        }
        tokio::time::sleep(PROGRESS_POLL).await;
    }
}

/// One progress line from what `status` and the tree show: the driver's state, the
/// challenge files in the tree and how many connected peers acknowledged them, and
/// a live version newer than the one the order started from.
fn issue_step(
    cert: &certmesh::ops::status::CertStatus,
    peers: &[certmesh::ops::status::PeerStatus],
    challenges: usize,
    started_at: Option<u32>,
) -> String {
    if cert.version.is_some() && cert.version != started_at {
        let v = cert.version.unwrap_or_default();
        return format!("published version {v}, waiting for the order to settle");
    }
    use certmesh::acme::handle::AcmeState;
    match cert.state {
        Some(AcmeState::Ordering) if challenges > 0 => {
            let connected = peers.iter().filter(|p| p.connected).count();
            let acked = peers.iter().filter(|p| p.connected && p.in_sync).count();
            format!(
                "challenge in the tree, acknowledged by {}/{} nodes; CA validating",
                acked + 1,
                connected + 1
            )
        }
        Some(AcmeState::Ordering) => "ordering".to_string(),
        Some(AcmeState::Waiting) => format!(
            "waiting: {}",
            cert.waiting_for.as_deref().unwrap_or("another node")
        ),
        Some(AcmeState::Backoff) => format!(
            "backing off after: {}",
            cert.last_error.as_deref().unwrap_or("an error")
        ),
        Some(AcmeState::Idle) => "queued".to_string(),
        None => "no ACME on this node".to_string(),
    }
}

/// `certmesh renew` as a table: one line per certificate.
fn print_renewals(v: &certmesh::acme::handle::RenewReport) {
    for r in &v.results {
        let waiting = r.waiting_for.as_deref().unwrap_or("?");
        let what = if v.dry_run {
            match (r.would_order, r.due) {
                (Some(true), _) => "would order now".to_string(),
                (_, true) => format!("due, not ordering here: {waiting}"),
                _ => "not due".to_string(),
            }
        } else if r.ordered == Some(true) {
            format!(
                "renewed: version {} ({} ms)",
                r.version.unwrap_or_default(),
                r.took_ms.unwrap_or_default()
            )
        } else if let Some(e) = &r.error {
            format!("FAILED: {e}")
        } else if r.waiting_for.is_some() {
            format!("not ordering here: {waiting}")
        } else {
            "not due".to_string()
        };
        println!(
            "{:<24} next {:<22} renewer {:<12} {what}",
            r.name, r.next_renewal, r.renewer
        );
    }
}

/// A reader (not in its own `tree.writers`) puts the writers' version back over any
/// local change at once: a restore there would be undone, so it is refused and says
/// where to run it. Listing kept versions works everywhere.
fn refuse_on_a_reader(c: &Config) -> Result<(), Failure> {
    let Some(writers) = &c.writers else {
        return Ok(());
    };
    // Identity by the state dir's certificate (root or the certmesh user can read it).
    let me = certmesh::identity::Identity::load(&c.state_dir)
        .map_err(|e| Failure::Runtime(format!("reading this node's identity: {e}")))?
        .id;
    if writers.iter().any(|w| w.id(me) == me) {
        return Ok(());
    }
    let names: Vec<String> = writers
        .iter()
        .map(|w| match w {
            certmesh::config::tree::Writer::Peer { name, .. } => name.clone(),
            other => other.id(me).to_string(),
        })
        .collect();
    Err(Failure::Config(format!(
        "{} is a reader (not in tree.writers): a restored file would be put back to the \
         writers' version at once; restore it on a writer ({})",
        c.name,
        names.join(", ")
    )))
}

/// `certmesh restore`: list kept versions, or write one back into the tree.
fn restore(
    c: &Config,
    path: Option<&str>,
    version: usize,
    list: bool,
    json: bool,
) -> Result<(), Failure> {
    use certmesh::disk::keep;
    let io = |e: std::io::Error| Failure::Runtime(format!("{}: {e}", c.tree.display()));
    let Some(path) = path else {
        let mut kept = Vec::new();
        for p in keep::list_paths(&c.tree).map_err(io)? {
            let n = keep::list(&c.tree, &p).map_err(io)?.len();
            kept.push((p, n));
        }
        if json {
            let v: Vec<_> = kept
                .iter()
                .map(|(p, n)| serde_json::json!({ "path": p.to_string(), "kept": n }))
                .collect();
            print_json(&serde_json::json!({ "paths": v }));
        } else {
            if kept.is_empty() {
                println!("nothing kept under {}/.certmesh/kept", c.tree.display());
            }
            for (p, n) in kept {
                println!("{p}  ({n} kept)");
            }
        }
        return Ok(());
    };
    let rel = certmesh::core::paths::RelPath::parse_shared(path)
        .map_err(|e| Failure::Config(format!("PATH {path:?}: {e}")))?;
    let kept_at = |ns: i64| certmesh::acme::rfc3339(ns / 1_000_000_000);
    if !list {
        refuse_on_a_reader(c)?;
        let v = keep::restore(&c.tree, &rel, version).map_err(|e| match e {
            keep::RestoreError::NoSuchVersion { .. } => Failure::Config(e.to_string()),
            e => Failure::Runtime(e.to_string()),
        })?;
        if json {
            print_json(&serde_json::json!({
                "restored": rel.to_string(),
                "version": version,
                "kept_at": kept_at(v.kept_at_ns),
                "size": v.size,
            }));
        } else {
            println!(
                "restored {rel} from version {version} (kept {}, {} bytes)",
                kept_at(v.kept_at_ns),
                v.size
            );
        }
        return Ok(());
    }
    let versions = keep::list(&c.tree, &rel).map_err(io)?;
    if versions.is_empty() {
        return Err(Failure::Runtime(
            keep::RestoreError::NothingKept(rel).to_string(),
        ));
    }
    let rows: Vec<(String, u64, String)> = versions
        .iter()
        .map(|v| (kept_at(v.kept_at_ns), v.size, cause(c, v.meta.as_ref())))
        .collect();
    if json {
        let v: Vec<_> = rows
            .iter()
            .enumerate()
            .map(|(i, (at, size, cause))| {
                serde_json::json!({ "version": i + 1, "kept_at": at, "size": size, "cause": cause })
            })
            .collect();
        print_json(&serde_json::json!({ "path": rel.to_string(), "versions": v }));
        return Ok(());
    }
    println!("{:<3}  {:<20}  {:>9}  CAUSE", "N", "KEPT", "SIZE");
    for (i, (at, size, cause)) in rows.iter().enumerate() {
        println!("{:<3}  {at:<20}  {size:>9}  {cause}", i + 1);
    }
    Ok(())
}

/// Why a version was kept: `replaced by lb1`, `deleted by lb2`, or `unknown`.
fn cause(c: &Config, meta: Option<&certmesh::disk::keep::KeptMeta>) -> String {
    meta.map_or_else(
        || "unknown".to_string(),
        |m| {
            let by = u64::from_str_radix(&m.modified_by, 16).map_or_else(
                |_| m.modified_by.clone(),
                |id| certmesh::repair::name_of(&c.peers, certmesh::core::device::ShortId(id)),
            );
            let what = match m.reason {
                certmesh::disk::keep::Reason::Replaced => "replaced",
                certmesh::disk::keep::Reason::Deleted => "deleted",
            };
            format!("{what} by {by}")
        },
    )
}

fn print_json(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// `certmesh import`: bad input is a config/usage error (2), nothing written.
fn import(
    c: &Config,
    from: certmesh::import::Source,
    path: &std::path::Path,
) -> Result<(), Failure> {
    let r = certmesh::import::import(c, from, path).map_err(|e| {
        if e.is_input() {
            Failure::Config(format!("import: {e}"))
        } else {
            Failure::Runtime(format!("import: {e}"))
        }
    })?;
    for i in &r.imported {
        println!(
            "imported {n}: {}/live/{n} -> archive/{n}/{} (serial {}, valid until {})",
            c.tree.display(),
            i.version,
            i.serial,
            certmesh::acme::rfc3339(i.not_after),
            n = i.name,
        );
    }
    for p in &r.kept_valid {
        println!("still valid: {}", p.display());
    }
    for n in &r.notes {
        println!("{n}");
    }
    if let Some(b) = &r.backup {
        println!("replaced files copied to {}", b.display());
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed by this call (inside the
/// runtime), not when the future is first polled: a SIGTERM right after `READY=1`
/// is a clean stop, never the default action.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Ok(mut one), Err(_)) | (Err(_), Ok(mut one)) => {
                one.recv().await;
            }
            (Err(_), Err(_)) => std::future::pending().await,
        }
    }
}

/// `certmesh man`: certmesh(1) on stdout, or every page into `out_dir`.
fn man(out_dir: Option<&std::path::Path>) -> Result<(), Failure> {
    let cmd = Cli::command();
    let Some(dir) = out_dir else {
        return clap_mangen::Man::new(cmd)
            .render(&mut std::io::stdout())
            .map_err(|e| Failure::Runtime(format!("writing the man page: {e}")));
    };
    std::fs::create_dir_all(dir)
        .and_then(|()| clap_mangen::generate_to(cmd, dir))
        .map_err(|e| Failure::Runtime(format!("writing man pages into {}: {e}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(state: &str, version: Option<u32>) -> certmesh::ops::status::CertStatus {
        serde_json::from_value(serde_json::json!({"name": "www", "domains": [],
            "not_after": null, "not_after_unix": null, "days_left": null,
            "version": version, "serial": null, "renewer": null, "lease": null,
            "next_renewal": null, "state": state, "last_attempt": null,
            "last_error": null, "failures": 0, "waiting_for": null, "last_took_ms": null}))
        .expect("a certificate status")
    }

    fn peer(connected: bool, in_sync: bool) -> certmesh::ops::status::PeerStatus {
        serde_json::from_value(serde_json::json!({"name": "p", "id": "Y",
            "address": "127.0.1.2:1", "connected": connected, "in_sync": in_sync,
            "rtt_ms": null, "acked": 0, "pending_from": 0, "last_error": null}))
        .expect("a peer status")
    }

    #[test]
    fn issue_progress_counts_this_node_and_connected_peers() {
        let peers = [peer(true, true), peer(true, false), peer(false, false)];
        assert_eq!(
            issue_step(&cert("ordering", Some(1)), &peers, 0, Some(1)),
            "ordering"
        );
        assert_eq!(
            issue_step(&cert("ordering", Some(1)), &peers, 1, Some(1)),
            "challenge in the tree, acknowledged by 2/3 nodes; CA validating"
        );
        assert!(issue_step(&cert("ordering", Some(2)), &peers, 1, Some(1))
            .starts_with("published version 2"));
        assert!(issue_step(&cert("ordering", Some(1)), &peers, 0, None)
            .starts_with("published version 1"));
    }
}
