//! Paths inside the tree: the one validated type (`RelPath`) every module uses, so a
//! path from a peer or from disk can't name anything outside the tree.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Longest path accepted, in bytes.
pub const MAX_PATH: usize = 4096;
/// Longest single name, in bytes (what Linux filesystems hold).
pub const MAX_NAME: usize = 255;
/// Internal directory at the tree root.
pub const INTERNAL_DIR: &str = ".certmesh";
/// Directories under [`INTERNAL_DIR`] that stay on this node.
pub const LOCAL_ONLY_DIRS: [&str; 3] = ["tmp", "conflicts", "kept"];
/// The folder web servers publish (`root <tree>/acme`): no symlinks at or under it.
pub const ACME_DIR: &str = "acme";

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The empty path (the tree root itself) is not a record.
    #[error("empty path")]
    Empty,
    /// Longer than `MAX_PATH` bytes or with a name longer than `MAX_NAME`.
    #[error("path too long: {0:.80}…")]
    TooLong(String),
    /// Absolute paths name something outside the tree.
    #[error("absolute path {0:?}")]
    Absolute(String),
    /// `..`, `.` or empty components.
    #[error("path {0:?} has a '.', '..' or empty component")]
    BadComponent(String),
    /// NUL bytes cannot be held by the OS.
    #[error("path contains a NUL byte")]
    Nul,
    /// The path is local-only internal state (`.certmesh/tmp`, `.certmesh/conflicts`).
    #[error("path {0:?} is local-only internal state")]
    LocalOnly(String),
    /// A symlink whose target is absolute or leaves the tree.
    #[error("symlink {link:?} -> {target:?} leaves the tree")]
    EscapingSymlink { link: String, target: String },
    /// A symlink whose target goes down and then back up (`a/../b`): which directory
    /// that reaches depends on whether `a` is a link, so it is refused.
    #[error("symlink {link:?} -> {target:?} has '..' after a name")]
    WindingSymlink { link: String, target: String },
    /// A symlink at or under `acme/`, the folder web servers publish: tokens are
    /// regular files, and a link there could publish a key.
    #[error("symlink {0:?} is under {ACME_DIR}/ (web servers publish it)")]
    SymlinkUnderAcme(String),
    /// A symlink into `.certmesh/` (internal state: leases, account, kept versions).
    #[error("symlink {link:?} -> {target:?} points into {INTERNAL_DIR}/")]
    SymlinkIntoInternal { link: String, target: String },
}

/// A relative, normalised, '/'-separated path inside the tree. Shared text: the
/// index's key, its record and its sequence map hold one copy (issue 29: RSS).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath(Arc<str>);

/// As its text: ordered the same (the derived `Ord` is the text's), so a sorted
/// map of paths can be ranged by `&str` ([`RelPath::within_map`]).
impl std::borrow::Borrow<str> for RelPath {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl RelPath {
    /// Validates a path received from a peer or built from disk.
    pub fn parse(s: &str) -> Result<Self, PathError> {
        if s.is_empty() {
            return Err(PathError::Empty);
        }
        if s.contains('\0') {
            return Err(PathError::Nul);
        }
        if s.len() > MAX_PATH {
            return Err(PathError::TooLong(s.to_string()));
        }
        if s.starts_with('/') {
            return Err(PathError::Absolute(s.to_string()));
        }
        for c in s.split('/') {
            if c.is_empty() || c == "." || c == ".." {
                return Err(PathError::BadComponent(s.to_string()));
            }
            if c.len() > MAX_NAME {
                return Err(PathError::TooLong(s.to_string()));
            }
        }
        Ok(RelPath(Arc::from(s)))
    }

    /// Validates and also refuses local-only internal paths: what a peer may send.
    pub fn parse_shared(s: &str) -> Result<Self, PathError> {
        let p = Self::parse(s)?;
        if p.is_local_only() {
            return Err(PathError::LocalOnly(s.to_string()));
        }
        Ok(p)
    }

    /// The path relative to `root`, if it is inside it and valid.
    pub fn from_fs(root: &Path, full: &Path) -> Option<Self> {
        let rel = full.strip_prefix(root).ok()?;
        Self::parse(rel.to_str()?).ok()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Where this path lives under `root`.
    pub fn under(&self, root: &Path) -> PathBuf {
        root.join(self.as_str())
    }

    /// The parent path, `None` at top level.
    pub fn parent(&self) -> Option<RelPath> {
        self.as_str()
            .rfind('/')
            .map(|i| RelPath(Arc::from(&self.as_str()[..i])))
    }

    /// The last component.
    pub fn name(&self) -> &str {
        self.as_str().rsplit('/').next().unwrap_or(self.as_str())
    }

    /// Number of components.
    pub fn depth(&self) -> usize {
        self.as_str().split('/').count()
    }

    /// True when `self` is `other` or below it.
    /// The entries of `map` at or below this path ([`RelPath::is_within`]): one lookup
    /// and one range of the sorted paths, O(log n + found). (A range from the path
    /// itself would also pass `a-b`, `a0`… on its way to `a/`.)
    pub fn within_map<'a, V>(
        &self,
        map: &'a std::collections::BTreeMap<RelPath, V>,
    ) -> impl Iterator<Item = (&'a RelPath, &'a V)> + 'a {
        use std::ops::Bound;
        // '0' is the byte after '/': every "<self>/…" sorts between the two.
        let (lo, hi) = (format!("{}/", self.as_str()), format!("{}0", self.as_str()));
        map.get_key_value(self).into_iter().chain(
            map.range::<str, _>((Bound::Included(lo.as_str()), Bound::Excluded(hi.as_str()))),
        )
    }

    /// [`RelPath::within_map`]'s entries that sort after `after`.
    pub fn within_map_after<'a, V>(
        &self,
        map: &'a std::collections::BTreeMap<RelPath, V>,
        after: &RelPath,
    ) -> impl Iterator<Item = (&'a RelPath, &'a V)> + 'a {
        use std::ops::Bound;
        let hi = format!("{}0", self.as_str());
        let lo = after.clone();
        let dir = self.clone();
        map.range::<str, _>((Bound::Excluded(lo.as_str()), Bound::Excluded(hi.as_str())))
            .filter(move |(p, _)| p.is_within(&dir))
    }

    pub fn is_within(&self, other: &RelPath) -> bool {
        self.as_str() == other.as_str()
            || (self.as_str().starts_with(other.as_str())
                && self.as_str().as_bytes().get(other.as_str().len()) == Some(&b'/'))
    }

    /// `.certmesh/tmp/**`, `.certmesh/conflicts/**` and `.certmesh/kept/**` (versions
    /// a peer's change replaced or deleted): never replicated.
    pub fn is_local_only(&self) -> bool {
        let s = self.as_str();
        LOCAL_ONLY_DIRS.iter().any(|d| {
            let base = format!("{INTERNAL_DIR}/{d}");
            s == base || s.starts_with(&(base + "/"))
        })
    }

    /// `.certmesh` itself or anything below `.certmesh/acme/` (the shared ACME
    /// account and state): private to the daemon's user on every node.
    pub fn is_private_state(&self) -> bool {
        let acme = format!("{INTERNAL_DIR}/{ACME_DIR}");
        self.as_str() == INTERNAL_DIR
            || self.as_str() == acme
            || self.as_str().starts_with(&format!("{acme}/"))
    }

    /// Private keys keep "other" permission bits off on every node.
    pub fn is_private_key(&self) -> bool {
        let name = self.name().to_ascii_lowercase();
        (name.contains("key") && name.ends_with(".pem")) || name.ends_with(".key")
    }

    /// Checks that a relative symlink at this path stays inside the tree.
    pub fn check_symlink_target(&self, target: &str) -> Result<(), PathError> {
        self.resolve_symlink_target(target).map(|_| ())
    }

    /// Where a relative symlink at this path points, inside the tree. Refused: links
    /// at or under `acme/`, absolute or escaping targets, targets in `.certmesh/`, and
    /// targets with `..` after a name (only a leading run of `..` is accepted, so the
    /// directories the target passes are exactly the ancestors of where it lands,
    /// which `apply` then checks on disk, component by component).
    pub fn resolve_symlink_target(&self, target: &str) -> Result<RelPath, PathError> {
        let escape = || PathError::EscapingSymlink {
            link: self.as_str().to_string(),
            target: target.to_string(),
        };
        if self.as_str() == ACME_DIR || self.as_str().starts_with(&format!("{ACME_DIR}/")) {
            return Err(PathError::SymlinkUnderAcme(self.as_str().to_string()));
        }
        if target.is_empty() || target.starts_with('/') || target.len() > MAX_PATH {
            return Err(escape());
        }
        if target.contains('\0') {
            return Err(PathError::Nul);
        }
        let mut stack: Vec<&str> = match self.as_str().rfind('/') {
            Some(i) => self.as_str()[..i].split('/').collect(),
            None => Vec::new(),
        };
        let mut named = false;
        for c in target.split('/') {
            match c {
                "" | "." => {}
                ".." if named => {
                    return Err(PathError::WindingSymlink {
                        link: self.as_str().to_string(),
                        target: target.to_string(),
                    })
                }
                ".." => {
                    stack.pop().ok_or_else(escape)?;
                }
                name => {
                    named = true;
                    stack.push(name);
                }
            }
        }
        if stack.is_empty() {
            return Err(escape());
        }
        if stack[0] == INTERNAL_DIR {
            return Err(PathError::SymlinkIntoInternal {
                link: self.as_str().to_string(),
                target: target.to_string(),
            });
        }
        Ok(RelPath(Arc::from(stack.join("/"))))
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_map_is_the_path_and_what_is_below_it_only() {
        let map: std::collections::BTreeMap<RelPath, ()> = [
            "a", "a-b", "a-b/c", "a.x", "a/b", "a/b/c", "a0", "a0/x", "ab", "b", "live/c1",
            "live/c10",
        ]
        .iter()
        .map(|p| (RelPath::parse(p).unwrap(), ()))
        .collect();
        let within = |d: &str| -> Vec<String> {
            RelPath::parse(d)
                .unwrap()
                .within_map(&map)
                .map(|(p, _)| p.to_string())
                .collect()
        };
        assert_eq!(within("a"), ["a", "a/b", "a/b/c"]);
        assert_eq!(within("a/b"), ["a/b", "a/b/c"]);
        assert_eq!(within("live/c1"), ["live/c1"]);
        assert_eq!(within("a-b"), ["a-b", "a-b/c"]);
        assert!(within("z").is_empty());
        let after = |d: &str, a: &str| -> Vec<String> {
            RelPath::parse(d)
                .unwrap()
                .within_map_after(&map, &RelPath::parse(a).unwrap())
                .map(|(p, _)| p.to_string())
                .collect()
        };
        assert_eq!(after("a", "a"), ["a/b", "a/b/c"]);
        assert_eq!(after("a", "a/b"), ["a/b/c"]);
        assert!(after("a", "a/b/c").is_empty());
    }

    #[test]
    fn refuses_escapes() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a/.",
            "a\0b",
        ] {
            assert!(RelPath::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(RelPath::parse(&"a".repeat(256)).is_err());
        assert!(RelPath::parse(&"a/".repeat(3000)).is_err());
        for good in [
            "a",
            "acme/.well-known/acme-challenge/tok",
            "ünï cödé/ x",
            "..a",
            "a..",
        ] {
            assert!(RelPath::parse(good).is_ok(), "{good:?} refused");
        }
        assert!(RelPath::parse_shared(".certmesh/tmp/x").is_err());
        assert!(RelPath::parse_shared(".certmesh/conflicts").is_err());
        assert!(RelPath::parse_shared(".certmesh/kept/live/x").is_err());
        assert!(RelPath::parse_shared(".certmesh/acme/account.json").is_ok());
        assert!(RelPath::parse_shared(".certmesh/tmpx").is_ok());
    }

    #[test]
    fn symlink_targets() {
        let live = RelPath::parse("live/www").unwrap();
        assert!(live.check_symlink_target("../archive/www/3").is_ok());
        assert!(live.check_symlink_target("../../etc").is_err());
        assert!(live.check_symlink_target("..").is_err());
        assert!(live.check_symlink_target("/etc/passwd").is_err());
        assert!(live
            .check_symlink_target("../.certmesh/conflicts/x")
            .is_err());
        let top = RelPath::parse("link").unwrap();
        assert!(top.check_symlink_target("dir/file").is_ok());
        assert!(top.check_symlink_target("../x").is_err());
    }

    #[test]
    fn symlink_chain_through_a_deeper_link_is_refused() {
        // Read as plain directories this lands inside the tree; with `l` a link to a
        // shallower directory the kernel lands outside. `..` after a name is refused.
        let steal = RelPath::parse("acme/.well-known/acme-challenge/steal").unwrap();
        let target = "../../../deep/a/b/c/l/../../../../../outside";
        assert!(steal.check_symlink_target(target).is_err());
        let elsewhere = RelPath::parse("pub/steal").unwrap();
        assert!(matches!(
            elsewhere.check_symlink_target("../deep/a/b/c/l/../../../../../x"),
            Err(PathError::WindingSymlink { .. })
        ));
        let l = RelPath::parse("deep/a/b/c/l").unwrap();
        assert!(l.check_symlink_target("../../../../x").is_ok());
        assert!(l.check_symlink_target("./../../../../x/./y/").is_ok());
    }

    #[test]
    fn no_symlink_under_acme() {
        for p in [
            "acme",
            "acme/.well-known",
            "acme/.well-known/acme-challenge/k",
        ] {
            let p = RelPath::parse(p).unwrap();
            assert!(matches!(
                p.check_symlink_target("../../../live/x/privkey.pem"),
                Err(PathError::SymlinkUnderAcme(_))
            ));
        }
        let ok = RelPath::parse("acmex/k").unwrap();
        assert!(ok.check_symlink_target("../live/x").is_ok());
    }

    #[test]
    fn no_symlink_into_internal_state() {
        let l = RelPath::parse("live/x").unwrap();
        for t in [
            "../.certmesh",
            "../.certmesh/acme/account.json",
            "../.certmesh/leases/x",
            "../.certmesh/kept/live/x",
        ] {
            assert!(
                matches!(
                    l.check_symlink_target(t),
                    Err(PathError::SymlinkIntoInternal { .. })
                ),
                "{t}"
            );
        }
        assert!(l.check_symlink_target("../.certmeshx/y").is_ok());
    }

    #[test]
    fn within_and_keys() {
        let a = RelPath::parse("a/b").unwrap();
        assert!(a.is_within(&RelPath::parse("a").unwrap()));
        assert!(!RelPath::parse("ab")
            .unwrap()
            .is_within(&RelPath::parse("a").unwrap()));
        assert!(RelPath::parse("live/x/privkey.pem")
            .unwrap()
            .is_private_key());
        assert!(RelPath::parse("www.example.com.key")
            .unwrap()
            .is_private_key());
        assert!(!RelPath::parse("live/x/fullchain.pem")
            .unwrap()
            .is_private_key());
    }
}
