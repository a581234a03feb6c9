//! The `certmesh` command: parse flags, start tracing, load config, run, map errors to
//! exit codes (0 ok, 1 runtime error, 2 usage or config error).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use certmesh::config::Config;

/// The packaged config: what every subcommand reads when neither `--config` nor
/// `$CERTMESH_CONFIG` names another file.
const DEFAULT_CONFIG: &str = "/etc/certmesh/certmesh.toml";
use certmesh::identity::Identity;

#[derive(Parser)]
#[command(
    name = "certmesh",
    version,
    about = "Keeps a TLS certificate tree identical on every node, over QUIC with mutual TLS"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create this node's identity (key + self-signed cert) if absent; print the device ID.
    Init {
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
    },
    /// Print this node's device ID.
    Id {
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
    },
    /// Validate the config and exit (for config management).
    Check {
        #[arg(long, value_name = "FILE", env = "CERTMESH_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
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
    },
    /// Ask the running daemon to order certificate NAME now (waits for the result).
    Issue {
        #[arg(long, value_name = "FILE", env = "CERTMESH_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The `[[certificate]]` name.
        name: String,
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
    },
    /// Print packet filter rules admitting the QUIC port only from the configured peers.
    Firewall {
        #[arg(long, value_name = "FILE", env = "CERTMESH_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// nft | iptables | ip6tables
        #[arg(long, default_value = "nft")]
        format: String,
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
    },
    /// Adopt the certificates (and account, where possible) of a certbot or lego tree
    /// into certmesh's layout without a new order; the paths nginx already uses stay
    /// valid (see README "Moving from certbot or lego").
    Import {
        #[arg(long, value_name = "FILE", env = "CERTMESH_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The client that made PATH.
        #[arg(long, value_enum)]
        from: certmesh::import::Source,
        /// certbot's config dir (e.g. /etc/letsencrypt) or lego's --path (e.g. ~/.lego).
        path: PathBuf,
    },
    /// Start a 3-node mesh on loopback in a temp dir, show a file propagating, clean up.
    Demo {
        /// How many propagation samples to take.
        #[arg(long, default_value_t = 20)]
        samples: usize,
    },
}

enum Failure {
    Config(String),
    Runtime(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn,rustls=warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: under systemd stderr goes to journald, which
        // would store the escape codes verbatim.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // CERTMESH_LOG_FORMAT=json: one JSON object per line (fields as keys), for log
    // shippers reading the journal; otherwise readable `key=value` lines.
    if std::env::var("CERTMESH_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json")) {
        logs.json().init();
    } else {
        logs.init();
    }
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
    Config::load(path).map_err(|e| Failure::Config(e.to_string()))
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::Runtime(format!("starting the runtime: {e}")))
}

fn dispatch(cmd: Cmd) -> Result<(), Failure> {
    let rt_err = |e: anyhow::Error| Failure::Runtime(format!("{e:#}"));
    match cmd {
        Cmd::Init { state_dir } => {
            let id = Identity::init(&state_dir).map_err(|e| Failure::Runtime(e.to_string()))?;
            println!("{}", id.id);
        }
        Cmd::Id { state_dir } => {
            let id = Identity::load(&state_dir).map_err(|e| Failure::Runtime(e.to_string()))?;
            println!("{}", id.id);
        }
        Cmd::Check { config } => {
            let c = load(&config)?;
            if let Ok(me) = Identity::load(&c.state_dir) {
                if let Some(p) = c.peers.iter().find(|p| p.id == me.id) {
                    return Err(Failure::Config(format!(
                        "{}: peer {:?} has this node's own device ID",
                        config.display(),
                        p.name
                    )));
                }
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
            let problems = certmesh::import::check_tree(&c);
            if !problems.is_empty() {
                return Err(Failure::Config(format!(
                    "{}: {}",
                    config.display(),
                    problems.join("\n")
                )));
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
        }
        Cmd::Run { config } => {
            let c = load(&config)?;
            runtime()?
                .block_on(certmesh::node::run(c, shutdown_signal()))
                .map_err(rt_err)?;
        }
        Cmd::Status { config, json } => {
            let c = load(&config)?;
            let v = runtime()?
                .block_on(certmesh::control::request(&c.control_socket(), "status"))
                .map_err(rt_err)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                let s: certmesh::control::Status = serde_json::from_value(v)
                    .map_err(|e| Failure::Runtime(format!("daemon answer: {e}")))?;
                print!("{}", certmesh::control::render(&s));
            }
        }
        Cmd::Issue { config, name } => {
            let c = load(&config)?;
            if !c.certificates.iter().any(|x| x.name == name) {
                return Err(Failure::Config(format!(
                    "{}: no [[certificate]] named {name:?}",
                    config.display()
                )));
            }
            let v = runtime()?
                .block_on(certmesh::control::request_with(
                    &c.control_socket(),
                    serde_json::json!({ "cmd": "issue", "name": name }),
                ))
                .map_err(rt_err)?;
            println!(
                "{}: version {} issued, valid until {} ({} ms)",
                name,
                v["version"],
                v["not_after"].as_str().unwrap_or("?"),
                v["took_ms"]
            );
        }
        Cmd::Renew {
            config,
            force,
            dry_run,
        } => {
            let c = load(&config)?;
            let v = runtime()?
                .block_on(certmesh::control::request_with(
                    &c.control_socket(),
                    serde_json::json!({ "cmd": "renew", "force": force, "dry_run": dry_run }),
                ))
                .map_err(rt_err)?;
            for r in v["results"].as_array().into_iter().flatten() {
                let what = if dry_run {
                    if r["would_order"] == true {
                        "would order now".to_string()
                    } else if r["due"] == true {
                        format!(
                            "due, not ordering here: {}",
                            r["waiting_for"].as_str().unwrap_or("?")
                        )
                    } else {
                        "not due".to_string()
                    }
                } else if r["ordered"] == true {
                    format!("renewed: version {} ({} ms)", r["version"], r["took_ms"])
                } else if let Some(e) = r["error"].as_str() {
                    format!("FAILED: {e}")
                } else if let Some(w) = r["waiting_for"].as_str() {
                    format!("not ordering here: {w}")
                } else {
                    "not due".to_string()
                };
                println!(
                    "{:<24} next {:<22} renewer {:<12} {what}",
                    r["name"].as_str().unwrap_or("?"),
                    r["next_renewal"].as_str().unwrap_or("-"),
                    r["renewer"].as_str().unwrap_or("-")
                );
            }
            if v["failed"].as_u64().unwrap_or(0) > 0 {
                return Err(Failure::Runtime(format!("{} renewals failed", v["failed"])));
            }
        }
        Cmd::Firewall {
            config,
            format,
            interface,
        } => {
            let c = load(&config)?;
            let cfg_err = |e: certmesh::firewall::FirewallError| Failure::Config(e.to_string());
            let format = certmesh::firewall::Format::parse(&format)
                .ok_or(certmesh::firewall::FirewallError::Format(format))
                .map_err(cfg_err)?;
            let rules =
                certmesh::firewall::render(&c, format, interface.as_deref()).map_err(cfg_err)?;
            print!("{rules}");
        }
        Cmd::Restore {
            config,
            path,
            version,
            list,
        } => restore(&load(&config)?, path.as_deref(), version, list)?,
        Cmd::Import { config, from, path } => import(&load(&config)?, from, &path)?,
        Cmd::Demo { samples } => {
            runtime()?
                .block_on(certmesh::demo::run(samples))
                .map_err(rt_err)?;
        }
    }
    Ok(())
}

/// `certmesh restore`: list kept versions, or write one back into the tree.
fn restore(c: &Config, path: Option<&str>, version: usize, list: bool) -> Result<(), Failure> {
    use certmesh::keep;
    let io = |e: std::io::Error| Failure::Runtime(format!("{}: {e}", c.tree.display()));
    let Some(path) = path else {
        let paths = keep::list_paths(&c.tree).map_err(io)?;
        if paths.is_empty() {
            println!("nothing kept under {}/.certmesh/kept", c.tree.display());
        }
        for p in paths {
            let n = keep::list(&c.tree, &p).map_err(io)?.len();
            println!("{p}  ({n} kept)");
        }
        return Ok(());
    };
    let rel = certmesh::paths::RelPath::parse_shared(path)
        .map_err(|e| Failure::Config(format!("PATH {path:?}: {e}")))?;
    if !list {
        let v = keep::restore(&c.tree, &rel, version).map_err(|e| match e {
            keep::RestoreError::NoSuchVersion { .. } => Failure::Config(e.to_string()),
            e => Failure::Runtime(e.to_string()),
        })?;
        println!(
            "restored {rel} from version {version} (kept {}, {} bytes)",
            certmesh::acme::rfc3339(v.kept_at_ns / 1_000_000_000),
            v.size
        );
        return Ok(());
    }
    let versions = keep::list(&c.tree, &rel).map_err(io)?;
    if versions.is_empty() {
        return Err(Failure::Runtime(
            keep::RestoreError::NothingKept(rel).to_string(),
        ));
    }
    println!("{:<3}  {:<20}  {:>9}  CAUSE", "N", "KEPT", "SIZE");
    for (i, v) in versions.iter().enumerate() {
        let cause = v.meta.as_ref().map_or_else(
            || "unknown".to_string(),
            |m| {
                let by = u64::from_str_radix(&m.modified_by, 16).map_or_else(
                    |_| m.modified_by.clone(),
                    |id| certmesh::repair::name_of(&c.peers, certmesh::identity::ShortId(id)),
                );
                let what = match m.reason {
                    keep::Reason::Replaced => "replaced",
                    keep::Reason::Deleted => "deleted",
                };
                format!("{what} by {by}")
            },
        );
        println!(
            "{:<3}  {:<20}  {:>9}  {cause}",
            i + 1,
            certmesh::acme::rfc3339(v.kept_at_ns / 1_000_000_000),
            v.size
        );
    }
    Ok(())
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

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
