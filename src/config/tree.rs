//! `[tree]`: the replicated directory, its rescan period, the dhparam group, the size
//! budgets and the writers allowed to change it.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::peer::PeerConfig;
use super::values::{parse_duration, parse_size};
use super::{Bad, ConfigError};
use crate::core::device::{DeviceId, DeviceIdError};

/// `[tree]`
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTree {
    /// The directory kept identical on every node.
    pub(super) path: Spanned<String>,
    /// Safety-net full rescan period (the watcher handles changes in between).
    rescan_interval: Option<Spanned<String>>,
    /// RFC 7919 group written once to `<tree>/dhparam.pem`: ffdhe2048 | ffdhe3072 | ffdhe4096.
    dhparam: Option<Spanned<String>>,
    /// Largest file fetched from a peer (default "64MiB"): a size like "512KiB",
    /// "64MiB", "1GiB", or a number of bytes. Larger ones are not fetched (shown in
    /// `status`); local files of any size are still announced.
    max_file_size: Option<Spanned<RawSize>>,
    /// Most bytes of file content this node holds in the tree (default "256MiB"):
    /// past it, peers' new paths and growing files are not fetched (shown in
    /// `status`, acknowledged as refused); nothing held is removed.
    max_size: Option<Spanned<RawSize>>,
    /// Most live paths in the tree (default 200000): past it, peers' new paths are
    /// not fetched (shown in `status`); nothing held is removed.
    max_files: Option<Spanned<u64>>,
    /// Free space a fetch must leave on the tree's filesystem (default "5%"): a
    /// percentage like "5%" or "0.5%", or a size like "1GiB". A peer's file that
    /// would leave less is not fetched (shown in `status`).
    min_disk_free: Option<Spanned<RawSize>>,
    /// Most bytes the versions kept of what peers' changes replaced or deleted may
    /// hold together (default "256MiB"; `certmesh restore`). Versions of another
    /// node's work are evicted last.
    kept_max_size: Option<Spanned<RawSize>>,
    /// How long a deletion this node learned of is remembered (default "7d", at
    /// least "1s"); with `writers`, also the replay horizon: a live record its author
    /// last signed longer ago is refused for a path this node does not hold, and
    /// writers re-sign their live records every half of it (issue 25).
    tombstone_retention: Option<Spanned<String>>,
    /// The nodes allowed to change the tree: this node's name, `[[peer]]` names, or
    /// device IDs of nodes further away. Absent: every node may. Records whose
    /// author is not listed are refused; a node not listed keeps its own tree at the
    /// writers' version.
    pub(super) writers: Option<Spanned<Vec<Spanned<String>>>>,
}

/// A size: a number of bytes or a string with a binary unit.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawSize {
    Bytes(u64),
    Text(String),
}

/// One entry of `[tree] writers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Writer {
    /// `node.name`: this node.
    ThisNode,
    /// A `[[peer]]` by name.
    Peer { name: String, id: DeviceId },
    /// A device ID (a node further away than the configured peers, or any node).
    Device(DeviceId),
}

impl Writer {
    /// The device ID, given this node's own.
    pub fn id(&self, me: DeviceId) -> DeviceId {
        match self {
            Writer::ThisNode => me,
            Writer::Peer { id, .. } | Writer::Device(id) => *id,
        }
    }
}

/// `[tree]` besides its path and writers.
pub(super) struct TreeSettings {
    pub(super) rescan_interval: Duration,
    pub(super) dhparam: Option<crate::dhgroup::DhGroup>,
    pub(super) max_file_size: u64,
    pub(super) budget: crate::core::plan::TreeBudget,
    pub(super) kept_max_size: u64,
    pub(super) tombstone_retention: Duration,
}

/// A size key of `[tree]`: its value in bytes, or `default` when absent.
fn size_key(
    v: &Option<Spanned<RawSize>>,
    key: &str,
    default: u64,
    bad: &Bad,
) -> Result<u64, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => match s.get_ref() {
            RawSize::Bytes(n) => Ok(*n),
            RawSize::Text(t) => parse_size(t),
        }
        .map_err(|m| bad(s.span(), key, m)),
    }
}

/// `[tree] max_size`, `max_files`, `min_disk_free` and `kept_max_size`.
fn budgets(t: &RawTree, bad: &Bad) -> Result<(crate::core::plan::TreeBudget, u64), ConfigError> {
    use crate::core::plan::{MinFree, TreeBudget};
    let d = TreeBudget::default();
    let positive = |v: &Option<Spanned<RawSize>>, key: &str, default: u64| {
        let n = size_key(v, key, default, bad)?;
        match v {
            Some(s) if n == 0 => Err(bad(s.span(), key, "must be more than 0".into())),
            _ => Ok(n),
        }
    };
    let max_size = positive(&t.max_size, "tree.max_size", d.max_size)?;
    let kept = positive(
        &t.kept_max_size,
        "tree.kept_max_size",
        crate::disk::keep::MAX_TOTAL_BYTES,
    )?;
    let max_files = match &t.max_files {
        None => d.max_files,
        Some(s) => match usize::try_from(*s.get_ref()) {
            Ok(n) if n > 0 => n,
            _ => {
                return Err(bad(
                    s.span(),
                    "tree.max_files",
                    format!("{} is not a number of files above 0", s.get_ref()),
                ))
            }
        },
    };
    let min_disk_free = match &t.min_disk_free {
        None => d.min_disk_free,
        Some(s) => match s.get_ref() {
            RawSize::Bytes(n) => MinFree::Bytes(*n),
            RawSize::Text(v) if v.trim().ends_with('%') => MinFree::Basis(
                parse_percent(v).map_err(|m| bad(s.span(), "tree.min_disk_free", m))?,
            ),
            RawSize::Text(v) => {
                MinFree::Bytes(parse_size(v).map_err(|m| bad(s.span(), "tree.min_disk_free", m))?)
            }
        },
    };
    let budget = TreeBudget {
        max_size,
        max_files,
        min_disk_free,
    };
    Ok((budget, kept))
}

/// "5%" or "0.5%" as hundredths of a percent, at most 100 %.
fn parse_percent(v: &str) -> Result<u32, String> {
    let num = v.trim().trim_end_matches('%').trim();
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    let ok = digits(whole) && (frac.is_empty() || (digits(frac) && frac.len() <= 2));
    let basis = ok
        .then(|| {
            let w: u32 = whole.parse().ok()?;
            let f: u32 = format!("{frac:0<2}").parse().ok()?;
            w.checked_mul(100)?.checked_add(f)
        })
        .flatten()
        .filter(|b| *b <= 10_000);
    basis.ok_or_else(|| {
        format!("{v:?} is not a percentage from 0% to 100% (e.g. \"5%\") or a size (e.g. \"1GiB\")")
    })
}

/// A duration key of `[tree]` of at least 1s, or `default` when absent.
fn duration_key(
    v: &Option<Spanned<String>>,
    key: &str,
    default: Duration,
    bad: &Bad,
) -> Result<Duration, ConfigError> {
    let Some(s) = v else {
        return Ok(default);
    };
    let d = parse_duration(s.get_ref()).map_err(|m| bad(s.span(), key, m))?;
    if d < Duration::from_secs(1) {
        return Err(bad(s.span(), key, "must be at least 1s".into()));
    }
    Ok(d)
}

/// `[tree]`: `rescan_interval` and `tombstone_retention` (at least 1s), `dhparam`,
/// `max_file_size`, budgets.
pub(super) fn tree_settings(t: &RawTree, bad: &Bad) -> Result<TreeSettings, ConfigError> {
    let rescan_interval = duration_key(
        &t.rescan_interval,
        "tree.rescan_interval",
        Duration::from_secs(3600),
        bad,
    )?;
    let tombstone_retention = duration_key(
        &t.tombstone_retention,
        "tree.tombstone_retention",
        crate::core::index::TOMBSTONE_RETENTION,
        bad,
    )?;
    let dhparam = match &t.dhparam {
        None => None,
        Some(s) => Some(crate::dhgroup::DhGroup::parse(s.get_ref()).ok_or_else(|| {
            bad(
                s.span(),
                "tree.dhparam",
                format!(
                    "unknown group {:?} (expected {})",
                    s.get_ref(),
                    crate::dhgroup::DhGroup::NAMES
                ),
            )
        })?),
    };
    let max_file_size = size_key(
        &t.max_file_size,
        "tree.max_file_size",
        crate::core::plan::DEFAULT_MAX_FILE_SIZE,
        bad,
    )?;
    let (budget, kept_max_size) = budgets(t, bad)?;
    Ok(TreeSettings {
        rescan_interval,
        dhparam,
        max_file_size,
        budget,
        kept_max_size,
        tombstone_retention,
    })
}

/// `[tree] writers`: each entry is this node's name, a peer's name or a device ID.
pub(super) fn writers(
    list: &Spanned<Vec<Spanned<String>>>,
    name: &str,
    peers: &[PeerConfig],
    bad: &Bad,
) -> Result<Vec<Writer>, ConfigError> {
    if list.get_ref().is_empty() {
        return Err(bad(
            list.span(),
            "tree.writers",
            "names no node: nobody could change the tree (remove the key to let every node write)"
                .into(),
        ));
    }
    let mut out: Vec<Writer> = Vec::new();
    for entry in list.get_ref() {
        let s = entry.get_ref().trim();
        let w = if s == name {
            Writer::ThisNode
        } else if let Some(p) = peers.iter().find(|p| p.name == s) {
            Writer::Peer {
                name: p.name.clone(),
                id: p.id,
            }
        } else {
            match s.parse::<DeviceId>() {
                Ok(id) => Writer::Device(id),
                Err(DeviceIdError::Length(_)) => {
                    return Err(bad(
                        entry.span(),
                        "tree.writers",
                        format!(
                            "unknown writer {s:?}: not node.name ({name:?}), a [[peer]] name \
                             or a device ID"
                        ),
                    ))
                }
                Err(e) => {
                    return Err(bad(
                        entry.span(),
                        "tree.writers",
                        format!("writer {s:?}: {e}"),
                    ))
                }
            }
        };
        if out.contains(&w) {
            return Err(bad(
                entry.span(),
                "tree.writers",
                format!("{s:?} listed twice"),
            ));
        }
        out.push(w);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{cfg, err};
    use crate::config::Config;
    use crate::core::device::DeviceId;
    use std::path::Path;

    #[test]
    fn max_file_size_takes_units_or_bytes() {
        let size = |v: &str| {
            Config::parse(Path::new("c.toml"), &cfg(&format!("max_file_size = {v}\n")))
                .map(|c| c.max_file_size)
        };
        let c = Config::parse(Path::new("c.toml"), &cfg("")).unwrap();
        assert_eq!(c.max_file_size, 64 << 20);
        assert_eq!(size("\"64MiB\"").unwrap(), 64 << 20);
        assert_eq!(size("\"1GiB\"").unwrap(), 1 << 30);
        assert_eq!(size("\"512KiB\"").unwrap(), 512 << 10);
        assert_eq!(size("1048576").unwrap(), 1 << 20);
        let e = size("\"64 parsecs\"").unwrap_err().to_string();
        assert!(e.contains("c.toml:8: tree.max_file_size"), "{e}");
        let e = size("\"99999999999GiB\"").unwrap_err().to_string();
        assert!(
            e.contains("tree.max_file_size") && e.contains("too large"),
            "{e}"
        );
        assert!(size("-1").is_err());
    }

    #[test]
    fn tree_budgets_take_sizes_percentages_and_refuse_nonsense() {
        use crate::core::plan::{MinFree, TreeBudget};
        let parse = |extra: &str| Config::parse(Path::new("c.toml"), &cfg(extra));
        let d = parse("").unwrap();
        assert_eq!(d.budget, TreeBudget::default());
        assert_eq!(d.budget.min_disk_free, MinFree::Basis(500));
        let c = parse(
            "max_size = \"1GiB\"\nmax_files = 10\nmin_disk_free = \"0.5%\"\nkept_max_size = 4096\n",
        )
        .unwrap();
        assert_eq!(c.budget.max_size, 1 << 30);
        assert_eq!(c.budget.max_files, 10);
        assert_eq!(c.budget.min_disk_free, MinFree::Basis(50));
        assert_eq!(c.kept_max_size, 4096);
        let c = parse("min_disk_free = \"2GiB\"\n").unwrap();
        assert_eq!(c.budget.min_disk_free, MinFree::Bytes(2 << 30));
        for (extra, key) in [
            ("min_disk_free = \"101%\"\n", "tree.min_disk_free"),
            ("min_disk_free = \"five%\"\n", "tree.min_disk_free"),
            ("min_disk_free = \"5 parsecs\"\n", "tree.min_disk_free"),
            ("max_size = 0\n", "tree.max_size"),
            ("max_files = 0\n", "tree.max_files"),
            ("kept_max_size = \"lots\"\n", "tree.kept_max_size"),
        ] {
            let e = parse(extra).unwrap_err().to_string();
            assert!(e.contains(&format!("c.toml:8: {key}")), "{extra}: {e}");
        }
        assert!(parse("max_bytes = 1\n").is_err(), "unknown key accepted");
    }

    #[test]
    fn tombstone_retention_defaults_to_a_week_and_is_at_least_a_second() {
        let parse = |extra: &str| Config::parse(Path::new("c.toml"), &cfg(extra));
        let week = crate::core::index::TOMBSTONE_RETENTION;
        assert_eq!(parse("").unwrap().tombstone_retention, week);
        let c = parse("tombstone_retention = \"3s\"\n").unwrap();
        assert_eq!(c.tombstone_retention, std::time::Duration::from_secs(3));
        for bad in ["\"500ms\"", "\"soon\""] {
            let e = parse(&format!("tombstone_retention = {bad}\n")).unwrap_err();
            let e = e.to_string();
            assert!(
                e.contains("c.toml:8: tree.tombstone_retention"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn writers_name_this_node_peers_or_device_ids() {
        let id = DeviceId::of_cert(b"x");
        let far = DeviceId::of_cert(b"far");
        let peer = format!("[[peer]]\nname = \"lb1\"\nid = \"{id}\"\naddress = \"127.0.0.2:1\"\n");
        let c = Config::parse(
            Path::new("c.toml"),
            &cfg(&format!("writers = [\"lb0\", \"lb1\", \"{far}\"]\n{peer}")),
        )
        .unwrap();
        let me = DeviceId::of_cert(b"me");
        let ids: Vec<DeviceId> = c.writers.unwrap().iter().map(|w| w.id(me)).collect();
        assert_eq!(ids, vec![me, id, far]);
        assert!(Config::parse(Path::new("c.toml"), &cfg(""))
            .unwrap()
            .writers
            .is_none());
        let e = err(&cfg(&format!("writers = [\"lb0\", \"ops\"]\n{peer}")));
        assert!(
            e.contains(":8: tree.writers") && e.contains("unknown writer \"ops\""),
            "{e}"
        );
        let e = err(&cfg("writers = []\n"));
        assert!(
            e.contains("tree.writers") && e.contains("names no node"),
            "{e}"
        );
        let e = err(&cfg("writers = [\"lb0\", \"lb0\"]\n"));
        assert!(e.contains("listed twice"), "{e}");
        let mut typo = far.to_string().into_bytes();
        typo[2] = if typo[2] == b'A' { b'B' } else { b'A' };
        let typo = String::from_utf8(typo).unwrap();
        let e = err(&cfg(&format!("writers = [\"{typo}\"]\n")));
        assert!(e.contains("tree.writers") && e.contains("mistyped"), "{e}");
    }

    #[test]
    fn dhparam_is_a_known_group() {
        let c = Config::parse(Path::new("c.toml"), &cfg("dhparam = \"ffdhe3072\"\n")).unwrap();
        assert_eq!(c.dhparam, Some(crate::dhgroup::DhGroup::Ffdhe3072));
        let c = Config::parse(Path::new("c.toml"), &cfg("")).unwrap();
        assert_eq!(c.dhparam, None);
        let e = err(&cfg("dhparam = \"ffdhe1024\"\n"));
        assert!(
            e.contains("c.toml:8: tree.dhparam") && e.contains("ffdhe1024"),
            "{e}"
        );
    }
}
