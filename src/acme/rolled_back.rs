//! Versions a `rollout = "verify"` took back: the leaves listed in
//! `.certmesh/acme/rolled-back/<name>`, one line each (`<leaf sha256 hex> <version>
//! <unix time>`). Repair ([`crate::repair`]) does not restore a listed leaf while an
//! older good version exists; nothing else reads the file: the next version number
//! ([`super::bundle::plan_publish`]) and the renewal schedule ignore it.
//!
//! The file is replicated, so any writer can change it. What a forged one can do is
//! bounded: list good leaves, and a repair (only ever run when `live/<name>` is
//! broken) takes an older good version, or, if every good version is listed, a listed
//! one all the same; it never blocks a publish or an order.

use std::path::Path;

use super::bundle::chain_der;
use super::served::read_file;

/// Where the list of certificate `name` lives.
pub fn rel(name: &str) -> String {
    format!(".certmesh/acme/rolled-back/{name}")
}

/// Most leaves listed (the oldest go first).
pub const MAX_ENTRIES: usize = 16;

/// SHA-256 of the leaf (first certificate) of a PEM chain.
pub fn leaf_sha256(fullchain: &[u8]) -> Option<[u8; 32]> {
    let der = chain_der(fullchain).ok()?.into_iter().next()?;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der);
    <[u8; 32]>::try_from(digest.as_ref()).ok()
}

/// The listed leaves, from the file's text: malformed lines are skipped, at most
/// [`MAX_ENTRIES`] (the last ones) kept.
pub fn parse(text: &[u8]) -> Vec<[u8; 32]> {
    let text = String::from_utf8_lossy(text);
    let mut out: Vec<[u8; 32]> = text
        .lines()
        .filter_map(|l| {
            let hex = l.split_whitespace().next()?;
            let b = data_encoding::HEXLOWER_PERMISSIVE
                .decode(hex.as_bytes())
                .ok()?;
            <[u8; 32]>::try_from(b.as_slice()).ok()
        })
        .collect();
    let cut = out.len().saturating_sub(MAX_ENTRIES);
    out.drain(..cut);
    out
}

/// The leaves listed for `name` in the tree at `root` (none if the file is absent,
/// a link, or too large).
pub fn read(root: &Path, name: &str) -> Vec<[u8; 32]> {
    read_file(&root.join(rel(name)))
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// The file's new text with `leaf` (version `version`, at `unix`) added to `old`.
pub fn with_entry(old: &[u8], leaf: &[u8; 32], version: u32, unix: i64) -> Vec<u8> {
    let text = String::from_utf8_lossy(old);
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| !parse(l.as_bytes()).is_empty())
        .map(str::to_string)
        .collect();
    lines.push(format!(
        "{} {version} {unix}",
        data_encoding::HEXLOWER.encode(leaf)
    ));
    let cut = lines.len().saturating_sub(MAX_ENTRIES);
    let mut out = lines[cut..].join("\n");
    out.push('\n');
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_junk_is_skipped() {
        let a = [1u8; 32];
        let text = with_entry(b"junk\nzz 1 2\n", &a, 3, 99);
        assert_eq!(parse(&text), vec![a]);
        assert!(String::from_utf8(text).unwrap().ends_with(" 3 99\n"));
    }

    #[test]
    fn the_list_keeps_the_newest_entries() {
        let mut text = Vec::new();
        for i in 0..40u8 {
            text = with_entry(&text, &[i; 32], u32::from(i), 0);
        }
        let got = parse(&text);
        assert_eq!(got.len(), MAX_ENTRIES);
        assert_eq!(got.last(), Some(&[39u8; 32]));
    }
}
