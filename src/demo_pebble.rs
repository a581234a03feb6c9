//! Pebble, the ACME test CA, for `certmesh demo`, the benchmark and the integration
//! tests: one launcher. When Debian's `pebble` and `pebble-challtestsrv` are
//! installed it starts a local CA (validation sleep off) with a throwaway HTTPS
//! identity, and either its own DNS (pebble-challtestsrv, whose answers `set_a`
//! changes) or a DNS server the caller runs. Everything lives in the directory it is
//! given and is stopped on drop. The demo points its name at a node that is not the
//! renewer, so the validator asks a node that did not place the order.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The name the demo certificate is for.
pub const DOMAIN: &str = "www.certmesh.demo";

/// Picks a free port on an address (the caller binds it).
pub type FreePort = fn(&str) -> anyhow::Result<u16>;

/// How to start Pebble.
#[derive(Clone)]
pub struct Options<'a> {
    /// The address every listener binds: the API, its management API and the DNS.
    pub ip: &'a str,
    /// The port Pebble's validator asks for http-01; `None`: a free one on `ip`.
    pub http_port: Option<u16>,
    /// The DNS server Pebble asks (`ip:port`); `None`: a pebble-challtestsrv started
    /// on `ip`, whose answers [`Pebble::set_a`] sets.
    pub dns_server: Option<String>,
    /// pebble-challtestsrv's answer for names not set (`-defaultIPv4`); `None`: its
    /// own default, 127.0.0.1.
    pub default_ipv4: Option<&'a str>,
    /// External account binding Pebble requires: key ID and base64url HMAC key.
    pub eab: Option<(&'a str, &'a str)>,
    /// `PEBBLE_AUTHZREUSE`, the percentage of orders that reuse a valid authorization
    /// (and reach no validator); `None`: Pebble's default, 50.
    pub authz_reuse: Option<u8>,
    /// `PEBBLE_VA_ALWAYS_VALID`: every challenge passes without a request (the
    /// many-certificates benchmark measures certmesh's side of thousands of orders).
    pub always_valid: bool,
    /// Free TCP ports on `ip` (the API, its management API, TLS, the DNS's API).
    pub free_tcp: FreePort,
    /// A free UDP port on `ip` for the DNS.
    pub free_udp: FreePort,
}

impl Default for Options<'_> {
    /// On 127.0.0.1, its own DNS, ports the kernel picks.
    fn default() -> Self {
        Options {
            ip: "127.0.0.1",
            http_port: None,
            dns_server: None,
            default_ipv4: None,
            eab: None,
            authz_reuse: None,
            always_valid: false,
            free_tcp: |ip| Ok(TcpListener::bind((ip, 0))?.local_addr()?.port()),
            free_udp: |ip| Ok(std::net::UdpSocket::bind((ip, 0))?.local_addr()?.port()),
        }
    }
}

/// Pebble (and its DNS, when it started one), killed on drop.
pub struct Pebble {
    /// The ACME directory URL.
    pub directory: String,
    /// PEM of the CA that signed Pebble's HTTPS certificate (certmesh's `ca_roots`).
    pub ca_roots: PathBuf,
    /// The port Pebble's validator asks for http-01.
    pub http_port: u16,
    /// Pebble's log (its validator says there which address it asked and what came
    /// back), kept across [`Pebble::start_ca`].
    pub log: PathBuf,
    /// Pebble's HTTPS management API, `ip:port` (`/roots/0`: the current root).
    pub management: String,
    dir: PathBuf,
    dns_server: String,
    /// pebble-challtestsrv's management API, when this launcher started it.
    dns_mgmt: Option<String>,
    authz_reuse: Option<u8>,
    always_valid: bool,
    ca: Option<Child>,
    dns: Option<Child>,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in [self.ca.take(), self.dns.take()].into_iter().flatten() {
            kill(c);
        }
    }
}

fn kill(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// True when both Debian packages' binaries are on the PATH.
pub fn available() -> bool {
    ["pebble", "pebble-challtestsrv"].iter().all(|b| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(b).is_file()))
    })
}

/// Waits until `child` listens on `addr`; its log tells why when it exits first.
fn wait_tcp(addr: &str, child: &mut Child, what: &str, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            bail!(
                "{what} exited ({st}) before listening on {addr}; its log {}:\n{}",
                log.display(),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on {addr} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// A throwaway CA and the HTTPS certificate it signs for Pebble's API on `ip`, in
/// `dir` (`minica.pem`, `cert.pem`, `key.pem`); returns the CA's file.
fn write_tls_identity(dir: &Path, ip: &str) -> anyhow::Result<PathBuf> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "certmesh pebble minica");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let leaf = rcgen::CertificateParams::new(vec!["localhost".into(), ip.to_string()])?
        .signed_by(&key, &issuer)?;
    let ca_roots = dir.join("minica.pem");
    std::fs::write(&ca_roots, ca_cert.pem())?;
    std::fs::write(dir.join("cert.pem"), leaf.pem())?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    Ok(ca_roots)
}

/// pebble-challtestsrv on `o.ip`, DNS only; returns it, its DNS address and its
/// management API.
fn start_dns(dir: &Path, o: &Options) -> anyhow::Result<(Child, String, String)> {
    let dns = format!("{}:{}", o.ip, (o.free_udp)(o.ip)?);
    let mgmt = format!("{}:{}", o.ip, (o.free_tcp)(o.ip)?);
    let log = dir.join("challtestsrv.log");
    let out = std::fs::File::create(&log)?;
    let mut cmd = Command::new("pebble-challtestsrv");
    cmd.args([
        "-dns01",
        &dns,
        "-http01",
        "",
        "-https01",
        "",
        "-tlsalpn01",
        "",
    ])
    .args(["-management", &mgmt, "-defaultIPv6", ""]);
    if let Some(v4) = o.default_ipv4 {
        cmd.args(["-defaultIPv4", v4]);
    }
    let mut child = cmd
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("starting pebble-challtestsrv")?;
    if let Err(e) = wait_tcp(&mgmt, &mut child, "pebble-challtestsrv", &log) {
        kill(child);
        return Err(e);
    }
    Ok((child, dns, mgmt))
}

impl Pebble {
    /// Starts Pebble (and its DNS unless `o.dns_server` names one), files in `dir`.
    pub fn start(dir: &Path, o: &Options) -> anyhow::Result<Pebble> {
        std::fs::create_dir_all(dir)?;
        let ca_roots = write_tls_identity(dir, o.ip)?;
        let (dns, dns_server, dns_mgmt) = match &o.dns_server {
            Some(server) => (None, server.clone(), None),
            None => {
                let (child, server, mgmt) = start_dns(dir, o)?;
                (Some(child), server, Some(mgmt))
            }
        };
        let api = format!("{}:{}", o.ip, (o.free_tcp)(o.ip)?);
        let management = format!("{}:{}", o.ip, (o.free_tcp)(o.ip)?);
        let http_port = match o.http_port {
            Some(p) => p,
            None => (o.free_tcp)(o.ip)?,
        };
        let mut config = serde_json::json!({"pebble": {
            "listenAddress": api,
            "managementListenAddress": management,
            "certificate": dir.join("cert.pem"),
            "privateKey": dir.join("key.pem"),
            "httpPort": http_port,
            "tlsPort": (o.free_tcp)(o.ip)?,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        if let Some((kid, hmac)) = o.eab {
            config["pebble"]["externalAccountBindingRequired"] = true.into();
            config["pebble"]["externalAccountMACKeys"] = serde_json::json!({ kid: hmac });
        }
        std::fs::write(dir.join("pebble.json"), config.to_string())?;
        let mut p = Pebble {
            directory: format!("https://{api}/dir"),
            ca_roots,
            http_port,
            log: dir.join("pebble.log"),
            management,
            dir: dir.to_path_buf(),
            dns_server,
            dns_mgmt,
            authz_reuse: o.authz_reuse,
            always_valid: o.always_valid,
            ca: None,
            dns,
        };
        p.start_ca()?;
        Ok(p)
    }

    /// Stops the CA itself (its DNS keeps running): its port refuses connections.
    pub fn stop_ca(&mut self) {
        if let Some(c) = self.ca.take() {
            kill(c);
        }
    }

    /// Starts (or restarts) the CA itself: a restarted Pebble has a new root and has
    /// forgotten every account.
    pub fn start_ca(&mut self) -> anyhow::Result<()> {
        self.stop_ca();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new("pebble");
        if let Some(p) = self.authz_reuse {
            cmd.env("PEBBLE_AUTHZREUSE", p.to_string());
        }
        if self.always_valid {
            cmd.env("PEBBLE_VA_ALWAYS_VALID", "1");
        }
        let mut child = cmd
            .arg("-config")
            .arg(self.dir.join("pebble.json"))
            .args(["-dnsserver", &self.dns_server])
            .env("PEBBLE_VA_NOSLEEP", "1")
            // Pebble rejects 5% of nonces on purpose; instant-acme retries twice, so
            // one POST in 8,000 still fails, and over the benchmark's many orders that
            // made a CI run red. The demo, the bench and the tests measure sync, not
            // that.
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .context("starting pebble")?;
        let api = self
            .directory
            .trim_start_matches("https://")
            .trim_end_matches("/dir")
            .to_string();
        if let Err(e) = wait_tcp(&api, &mut child, "pebble", &self.log) {
            kill(child);
            return Err(e);
        }
        self.ca = Some(child);
        Ok(())
    }

    /// Points `host` at `ip` in the CA's DNS (the pebble-challtestsrv it started).
    pub fn set_a(&self, host: &str, ip: &str) -> anyhow::Result<()> {
        let Some(mgmt) = &self.dns_mgmt else {
            bail!("this Pebble asks {}, not a DNS it started", self.dns_server);
        };
        let body = serde_json::json!({"host": host, "addresses": [ip]}).to_string();
        let mut s = TcpStream::connect(mgmt)?;
        write!(
            s,
            "POST /add-a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        if !out.starts_with("HTTP/1.1 200") {
            bail!("pebble-challtestsrv refused add-a: {out}");
        }
        Ok(())
    }

    /// Orders Pebble has been asked for so far (its log of `new-order` requests).
    pub fn orders(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("POST /order-plz")
            .count()
    }

    /// Certificates Pebble has issued so far (one per finalized order).
    pub fn issued(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("Issued certificate serial"))
            .count()
    }

    /// The config sections a demo node gets: ACME from this CA, one certificate, and
    /// the built-in http-01 responder on the node's own address.
    pub fn node_config(&self, ip: &str) -> String {
        self.acme_config() + &self.http_config(ip)
    }

    /// `[acme]` from this CA and one `[[certificate]]` (`www`, for [`DOMAIN`]).
    pub fn acme_config(&self) -> String {
        format!(
            "\n[acme]\ndirectory = \"{}\"\ncontact = [\"mailto:demo@certmesh.demo\"]\nca_roots = \"{}\"\n\
             \n[[certificate]]\nname = \"www\"\ndomains = [\"{DOMAIN}\"]\nkey = \"ecdsa-p256\"\n",
            self.directory,
            self.ca_roots.display(),
        )
    }

    /// `[http]`: the built-in http-01 responder on `ip`, at the port this CA's
    /// validator asks.
    pub fn http_config(&self, ip: &str) -> String {
        http_config_at(&format!("{ip}:{}", self.http_port))
    }
}

/// `[http]`: the built-in http-01 responder on `listen` (`ip:port`).
pub fn http_config_at(listen: &str) -> String {
    format!("\n[http]\nlisten = \"{listen}\"\n")
}

/// The live certificate's serial and whether its key matches, if complete.
pub fn live_bundle(tree: &Path) -> Option<(String, bool)> {
    let cert_pem = std::fs::read(tree.join("live/www/fullchain.pem")).ok()?;
    let key_pem = std::fs::read_to_string(tree.join("live/www/privkey.pem")).ok()?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&cert_pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    let key = rcgen::KeyPair::from_pem(&key_pem).ok()?;
    let matches = *cert.public_key().subject_public_key.data == *key.public_key_raw();
    Some((cert.raw_serial_as_string(), matches))
}
