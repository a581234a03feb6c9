//! "Issued → served everywhere" (issue 26 item 3): the ACME cluster of 3 nodes, each
//! with a real nginx serving its own `live/www` and a `[[hook]]` that reloads it (and
//! the node's `[[frontend]]` probing it). Each sample is one `certmesh issue`, timed
//! until the new certificate is live in every tree (as the ACME rows) and until every
//! nginx hands it out in a TLS handshake, read by the benchmark itself (the serving
//! probe's handshake, `certmesh::probe::tls::probe`, polled every 5 ms).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use certmesh::demo;

use crate::procs::{stats, Stats};

const NGINX: &str = "/usr/sbin/nginx";

/// Whether nginx is installed (else the section is skipped, with a note).
pub(crate) fn available() -> bool {
    Path::new(NGINX).exists()
}

/// One nginx: stopped (SIGTERM, then reaped) on drop.
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(self.0.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where node `i`'s nginx lives and listens.
struct Site {
    dir: PathBuf,
    addr: SocketAddr,
}

impl Site {
    fn new(root: &Path, i: usize) -> Result<Site> {
        let dir = root.join(format!("nginx{}", i + 1));
        std::fs::create_dir_all(&dir)?;
        let addr = TcpListener::bind(format!("127.0.0.{}:0", i + 2))?.local_addr()?;
        Ok(Site { dir, addr })
    }

    fn nginx_args(&self) -> Vec<String> {
        let d = self.dir.display();
        vec![
            "-p".into(),
            d.to_string(),
            "-e".into(),
            format!("{d}/error.log"),
            "-c".into(),
            format!("{d}/nginx.conf"),
        ]
    }

    /// The node's `[[frontend]]` and reload `[[hook]]`.
    fn node_config(&self) -> String {
        let run: Vec<String> = std::iter::once(NGINX.to_string())
            .chain(self.nginx_args())
            .chain(["-s".into(), "reload".into()])
            .map(|a| format!("{a:?}"))
            .collect();
        format!(
            "\n[[frontend]]\nname = \"nginx\"\naddress = \"{}\"\n\
             \n[[hook]]\npaths = [\"live/www/**\"]\nrun = [{}]\ntimeout = \"10s\"\nmin_interval = \"0s\"\n",
            self.addr,
            run.join(", ")
        )
    }

    fn start(&self, tree: &Path) -> Result<Nginx> {
        let d = self.dir.display();
        let t = tree.display();
        let conf = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             server {{\n    listen {} ssl;\n    ssl_certificate {t}/live/www/fullchain.pem;\n    ssl_certificate_key {t}/live/www/privkey.pem;\n    location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n",
            self.addr
        );
        std::fs::write(self.dir.join("nginx.conf"), conf)?;
        let child = Command::new(NGINX)
            .args(self.nginx_args())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("stderr.log"))?)
            .spawn()
            .context("starting nginx")?;
        let nginx = Nginx(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(self.addr).is_err() {
            if Instant::now() > deadline {
                bail!("nginx on {} did not start (see {d}/stderr.log)", self.addr);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(nginx)
    }
}

/// Waits until every site's nginx presents `leaf` (SHA-256 of its DER).
async fn served_everywhere(sites: &[Site], leaf: [u8; 32], deadline: Duration) -> Result<()> {
    let start = Instant::now();
    let sni = certmesh::demo_pebble::DOMAIN;
    let mut pending: Vec<&Site> = sites.iter().collect();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for s in pending {
            let p = certmesh::probe::tls::probe(s.addr, sni).await;
            if p.map(|p| p.sha256).ok() != Some(leaf) {
                still.push(s);
            }
        }
        pending = still;
        if pending.is_empty() {
            break;
        }
        if start.elapsed() > deadline {
            bail!("the new certificate was not served everywhere within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// (issue → live everywhere, issue → served by every nginx) over `samples` issues.
pub(crate) fn run_acme_served(
    exe: &Path,
    rt: &tokio::runtime::Runtime,
    samples: usize,
) -> Result<(Stats, Stats)> {
    eprintln!("[certmesh] ACME with nginx: {samples} issuances on 3 nodes, each with a real nginx");
    let dir = tempfile::Builder::new()
        .prefix("certmesh-bench-served-")
        .tempdir()?;
    let sites: Vec<Site> = (0..3)
        .map(|i| Site::new(dir.path(), i))
        .collect::<Result<_>>()?;
    let (live, served) = rt.block_on(async {
        let extra = |i: usize, _: &Path| sites[i].node_config();
        let mut c = demo::AcmeCluster::start_with(exe, 3, &extra).await?;
        let trees = c.trees();
        let _nginx: Vec<Nginx> = sites
            .iter()
            .zip(&trees)
            .map(|(s, t)| s.start(t))
            .collect::<Result<_>>()?;
        let (mut live, mut served) = (Vec::new(), Vec::new());
        for _ in 0..samples {
            let t0 = Instant::now();
            live.push(c.issue().await?);
            let leaf = certmesh::probe::Leaves::read(&trees[0], "www")
                .live
                .context("live/www has no leaf")?;
            served_everywhere(&sites, leaf, Duration::from_secs(60)).await?;
            served.push(t0.elapsed());
        }
        anyhow::Ok((live, served))
    })?;
    let (live, served) = (stats(live), stats(served));
    eprintln!(
        "[certmesh] ACME with nginx p50: live everywhere {:.0} ms, served everywhere {:.0} ms",
        live.p50 * 1000.0,
        served.p50 * 1000.0
    );
    Ok((live, served))
}
