//! dns-01 inside one order ([`super::order`]): prepare (key, zones, leftovers) before
//! the order is placed, present (record in the tree, update DNS, wait for every
//! authoritative nameserver), and finish (remove the records, then the record file).
//! Also the start-up sweep of records a crashed renewer left behind.

use std::collections::BTreeMap;

use anyhow::anyhow;

use super::dns::{challenge_name, Presented, Publisher, Record, RECORDS_DIR};
use super::AcmeHandles;
use crate::config::{acme::AcmeConfig, certificate::CertificateConfig};
use crate::core::paths::RelPath;
use crate::disk::tree::{self, Expect};

/// The dns-01 part of one order.
#[derive(Default)]
pub struct Dns01 {
    publisher: Option<Publisher>,
    /// Challenge name → zone, resolved before the order.
    zones: BTreeMap<String, String>,
    /// Records the CA asked for.
    wanted: Vec<Record>,
    /// Records put in DNS (removed by [`Dns01::finish`]).
    presented: Vec<(String, Record)>,
    /// The record file written into the tree.
    file: Option<RelPath>,
}

fn record_file(name: &str) -> anyhow::Result<RelPath> {
    tree::rel(&format!("{RECORDS_DIR}/{name}"))
}

impl Dns01 {
    /// Loads the key, finds every zone (a TSIG-signed SOA query: a refused key shows
    /// here), and removes records a previous renewer left. Nothing if `cert` has no
    /// dns-01 identifier.
    pub async fn prepare(
        &mut self,
        h: &AcmeHandles,
        cfg: &AcmeConfig,
        cert: &CertificateConfig,
    ) -> anyhow::Result<()> {
        if !cert.needs_dns() {
            return Ok(());
        }
        let dcfg = cfg.dns.as_ref().ok_or_else(|| {
            anyhow!(
                "not ordering {}: it needs dns-01 and [acme.dns] is not configured",
                cert.name
            )
        })?;
        let publisher = Publisher::new(dcfg)?;
        clean_leftovers(h, &publisher, cert).await;
        for d in cert.domains.iter().filter(|d| cert.challenge.uses_dns(d)) {
            let fqdn = challenge_name(d);
            if let std::collections::btree_map::Entry::Vacant(slot) = self.zones.entry(fqdn) {
                let zone = publisher.zone(slot.key()).await?;
                tracing::debug!(cert = %cert.name, fqdn = %slot.key(), %zone, "dns-01 zone");
                slot.insert(zone);
            }
        }
        self.publisher = Some(publisher);
        Ok(())
    }

    /// The CA wants `value` at the challenge name of `ident`.
    pub fn want(&mut self, ident: &str, value: String) {
        self.wanted.push(Record {
            fqdn: challenge_name(ident),
            value,
        });
    }

    /// Records what will be presented in the tree (acknowledged by the connected
    /// peers, so any of them can clean up after a crash), updates DNS, then waits
    /// until every authoritative nameserver serves the records. Returns the record
    /// file for the barrier.
    pub async fn present(
        &mut self,
        h: &AcmeHandles,
        cfg: &AcmeConfig,
        name: &str,
    ) -> anyhow::Result<Option<(RelPath, Expect)>> {
        if self.wanted.is_empty() {
            return Ok(None);
        }
        let publisher = self
            .publisher
            .as_ref()
            .ok_or_else(|| anyhow!("dns-01 challenge without [acme.dns]"))?;
        let file = record_file(name)?;
        let body = serde_json::to_vec_pretty(&Presented {
            node: super::this_node(&h.settings),
            records: self.wanted.clone(),
        })?;
        let e = h.writer.write(&file, &body, 0o644)?;
        self.file = Some(file.clone());
        h.writer
            .await_indexed(
                &[(file.clone(), e.clone())],
                std::time::Duration::from_secs(10),
            )
            .await?;
        h.barrier.wait(&file, cfg.barrier_timeout).await;
        let mut by_zone: BTreeMap<String, Vec<Record>> = BTreeMap::new();
        for r in self.wanted.clone() {
            let zone = match self.zones.get(&r.fqdn) {
                Some(z) => z.clone(),
                None => publisher.zone(&r.fqdn).await?,
            };
            publisher.present(&zone, &r).await?;
            tracing::info!(cert = %name, fqdn = %r.fqdn, %zone, "dns-01 TXT record added");
            self.presented.push((zone.clone(), r.clone()));
            by_zone.entry(zone).or_default().push(r);
        }
        let handle = h.slot.get().cloned();
        for (zone, records) in &by_zone {
            publisher
                .await_propagation(zone, records, |p| {
                    if let Some(a) = &handle {
                        a.update(name, |r| r.dns_propagation = Some(p));
                    }
                })
                .await?;
        }
        Ok(Some((file, e)))
    }

    /// Removes what was presented; the record file goes once every record is gone
    /// (else it stays, and the next order retries). Returns what the index must show.
    pub async fn finish(&mut self, h: &AcmeHandles, name: &str) -> Vec<(RelPath, Expect)> {
        if let Some(a) = h.slot.get() {
            a.update(name, |r| r.dns_propagation = None);
        }
        let mut all_gone = true;
        if let Some(p) = &self.publisher {
            for (zone, r) in &self.presented {
                match p.cleanup(zone, r).await {
                    Ok(()) => {
                        tracing::info!(cert = %name, fqdn = %r.fqdn, "dns-01 TXT record removed")
                    }
                    Err(e) => {
                        all_gone = false;
                        let msg =
                            format!("acme: {name}: removing the dns-01 record {}: {e}", r.fqdn);
                        tracing::warn!("{msg}");
                        h.reports.error(msg);
                    }
                }
            }
        }
        match self.file.take() {
            Some(f) if all_gone => vec![(f.clone(), h.writer.remove(&f))],
            _ => Vec::new(),
        }
    }
}

/// Removes the records listed in `cert`'s record file (left by a renewer that died
/// or failed to clean up), then the file if it did not change meanwhile.
async fn clean_leftovers(h: &AcmeHandles, publisher: &Publisher, cert: &CertificateConfig) {
    let Ok(rel) = record_file(&cert.name) else {
        return;
    };
    let Some(bytes) = tree::read(h.writer.root(), rel.as_str()) else {
        return;
    };
    let mut all_gone = true;
    let parsed = Presented::parse_checked(&bytes, cert);
    for why in parsed.iter().flat_map(|(_, refused)| refused) {
        let msg = format!("acme: {}: refused in {rel}: {why}", cert.name);
        tracing::warn!("{msg}");
        h.reports.error(msg);
    }
    if let Some((p, _)) = parsed {
        for r in &p.records {
            let result = match publisher.zone(&r.fqdn).await {
                Ok(zone) => publisher.cleanup(&zone, r).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => tracing::info!(
                    cert = %cert.name,
                    fqdn = %r.fqdn,
                    left_by = %p.node,
                    "removed a dns-01 TXT record left behind"
                ),
                Err(e) => {
                    all_gone = false;
                    tracing::warn!(cert = %cert.name, fqdn = %r.fqdn, error = %e, "could not remove a dns-01 TXT record left behind");
                }
            }
        }
    }
    if all_gone && tree::read(h.writer.root(), rel.as_str()).as_deref() == Some(&bytes[..]) {
        h.writer.remove(&rel);
    }
}

/// At start-up: records left by a crash, for every certificate that no other node
/// is ordering right now.
pub async fn sweep(h: &AcmeHandles) {
    let Some((cfg, certs)) = super::snapshot(&h.settings) else {
        return;
    };
    let Some(dcfg) = cfg.dns.as_ref() else {
        return;
    };
    let me = h.mesh.me();
    for cert in certs.iter().filter(|c| c.needs_dns()) {
        let Ok(rel) = record_file(&cert.name) else {
            continue;
        };
        if tree::read(h.writer.root(), rel.as_str()).is_none() {
            continue;
        }
        if super::read_lease(h, &cert.name)
            .is_some_and(|l| l.holder != me && l.fresh(super::unix_now()))
        {
            continue; // another node is ordering: the records are its own
        }
        match Publisher::new(dcfg) {
            Ok(p) => clean_leftovers(h, &p, cert).await,
            Err(e) => {
                tracing::warn!(cert = %cert.name, error = %e, "cannot remove dns-01 records left behind")
            }
        }
    }
}
