//! The ACME half of `certmesh demo`: when Debian's `pebble` and
//! `pebble-challtestsrv` are installed, a local test CA (validation sleep off) whose DNS
//! points the demo name at a node that is not the renewer, so the validator asks a
//! node that did not place the order. Everything lives in the demo's temp dir and is
//! stopped on drop.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The name the demo certificate is for.
pub const DOMAIN: &str = "www.certmesh.demo";

/// Pebble + its DNS, killed on drop.
pub struct LocalCa {
    pub directory: String,
    pub ca_roots: PathBuf,
    pub http_port: u16,
    /// Pebble's log (its validator says there which address it asked and what came
    /// back).
    pub log: PathBuf,
    dns_mgmt: String,
    children: Vec<Child>,
}

impl Drop for LocalCa {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// True when both Debian packages' binaries are on the PATH.
pub fn available() -> bool {
    ["pebble", "pebble-challtestsrv"].iter().all(|b| {
        std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(b).is_file()))
    })
}

fn free_tcp() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_tcp(addr: &str, child: &mut Child, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        if let Ok(Some(st)) = child.try_wait() {
            bail!("{what} exited ({st}) before listening on {addr}");
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on {addr} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

impl LocalCa {
    /// Starts pebble-challtestsrv and pebble under `dir`; http-01 validations go to
    /// port `http_port` of whatever address the DNS gives.
    pub fn start(dir: &Path) -> anyhow::Result<LocalCa> {
        Self::start_with(dir, None)
    }

    /// [`LocalCa::start`], but every order is validated: Pebble otherwise reuses a
    /// valid authorization for about half of an account's orders
    /// (`PEBBLE_AUTHZREUSE`, 50 by default), which then reach no validator at all.
    pub fn start_validating_every_order(dir: &Path) -> anyhow::Result<LocalCa> {
        Self::start_with(dir, Some(0))
    }

    /// [`LocalCa::start`], but Pebble's validator says yes without asking
    /// (`PEBBLE_VA_ALWAYS_VALID`): for the many-certificates benchmark, where what is
    /// measured is certmesh's side of thousands of orders.
    pub fn start_always_valid(dir: &Path) -> anyhow::Result<LocalCa> {
        Self::start_env(dir, None, &[("PEBBLE_VA_ALWAYS_VALID", "1")])
    }

    /// `authz_reuse`: `PEBBLE_AUTHZREUSE` (percent), Pebble's default when `None`.
    fn start_with(dir: &Path, authz_reuse: Option<u8>) -> anyhow::Result<LocalCa> {
        Self::start_env(dir, authz_reuse, &[])
    }

    /// `env`: more variables for Pebble.
    fn start_env(
        dir: &Path,
        authz_reuse: Option<u8>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<LocalCa> {
        let dir = dir.join("pebble");
        std::fs::create_dir_all(&dir)?;
        // A throwaway CA for Pebble's own HTTPS API.
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "certmesh demo minica");
        let ca_cert = ca.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate()?;
        let leaf = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?
            .signed_by(&key, &issuer)?;
        let ca_roots = dir.join("minica.pem");
        std::fs::write(&ca_roots, ca_cert.pem())?;
        std::fs::write(dir.join("cert.pem"), leaf.pem())?;
        std::fs::write(dir.join("key.pem"), key.serialize_pem())?;

        let mut children = Vec::new();
        let dns_port = std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dns_mgmt = format!("127.0.0.1:{}", free_tcp()?);
        let mut dns = Command::new("pebble-challtestsrv")
            .args([
                "-dns01",
                &format!("127.0.0.1:{dns_port}"),
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
            ])
            .args(["-management", &dns_mgmt, "-defaultIPv6", ""])
            .stdout(std::fs::File::create(dir.join("challtestsrv.log"))?)
            .stderr(Stdio::null())
            .spawn()
            .context("starting pebble-challtestsrv")?;
        let r = wait_tcp(&dns_mgmt, &mut dns, "pebble-challtestsrv");
        children.push(dns);
        r?;
        let api = format!("127.0.0.1:{}", free_tcp()?);
        let http_port = free_tcp()?;
        let config = serde_json::json!({"pebble": {
            "listenAddress": api,
            "managementListenAddress": format!("127.0.0.1:{}", free_tcp()?),
            "certificate": dir.join("cert.pem"),
            "privateKey": dir.join("key.pem"),
            "httpPort": http_port,
            "tlsPort": free_tcp()?,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        std::fs::write(dir.join("pebble.json"), config.to_string())?;
        let log = dir.join("pebble.log");
        let mut pebble = Command::new("pebble");
        if let Some(p) = authz_reuse {
            pebble.env("PEBBLE_AUTHZREUSE", p.to_string());
        }
        let mut pebble = pebble
            .arg("-config")
            .arg(dir.join("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            // Pebble rejects 5% of nonces on purpose; instant-acme retries twice, so
            // one POST in 8,000 still fails, and over the benchmark's many orders that
            // made a CI run red. The demo and the bench measure sync, not that.
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .envs(env.iter().copied())
            .stdout(std::fs::File::create(&log)?)
            .stderr(Stdio::null())
            .spawn()
            .context("starting pebble")?;
        let r = wait_tcp(&api, &mut pebble, "pebble");
        children.push(pebble);
        r?;
        Ok(LocalCa {
            directory: format!("https://{api}/dir"),
            ca_roots,
            http_port,
            log,
            dns_mgmt,
            children,
        })
    }

    /// Points `host` at `ip` in the CA's DNS.
    pub fn set_a(&self, host: &str, ip: &str) -> anyhow::Result<()> {
        let body = serde_json::json!({"host": host, "addresses": [ip]}).to_string();
        let mut s = TcpStream::connect(&self.dns_mgmt)?;
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
