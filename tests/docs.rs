//! The docs say what the code does: `certmesh.toml(5)` lists exactly the keys the
//! parser accepts, and every README section the docs point at exists.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use crate::util::certmesh;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The man page's keys per section (`.SS [node]` then `.TP` / `\fBkey\fR`).
fn documented() -> BTreeMap<String, Vec<String>> {
    let page = fs::read_to_string(Path::new(ROOT).join("docs/certmesh.toml.5")).unwrap();
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    let mut lines = page.lines();
    while let Some(l) = lines.next() {
        if let Some(s) = l.strip_prefix(".SS ") {
            section = s.trim().to_string();
        } else if l == ".TP" && !section.is_empty() {
            let item = lines.next().unwrap_or_default();
            for part in item.split(", ") {
                if let Some(k) = part
                    .strip_prefix("\\fB")
                    .and_then(|p| p.split("\\fR").next())
                {
                    out.entry(section.clone()).or_default().push(k.to_string());
                }
            }
        }
    }
    out
}

/// The keys `certmesh check` accepts in `section`, read from its error for an
/// unknown key there ("expected one of `a`, `b`").
fn accepted(dir: &Path, section: &str) -> Vec<String> {
    let (state, tree) = (dir.join("state"), dir.join("tree"));
    fs::create_dir_all(&tree).unwrap();
    let base = format!(
        "[node]\nname = \"a\"\nstate_dir = \"{}\"\nlisten = \"127.0.0.1:1\"\n[tree]\npath = \"{}\"\n",
        state.display(),
        tree.display()
    );
    let acme = "[acme]\ndirectory = \"https://ca.example/dir\"\n";
    let cfg = match section {
        "top" => format!("zzz = 1\n{base}"),
        "[node]" => base.replace("[tree]", "zzz = 1\n[tree]"),
        "[tree]" => format!("{base}zzz = 1\n"),
        "[acme]" => format!("{base}{acme}zzz = 1\n"),
        "[acme.dns]" => format!("{base}{acme}[acme.dns]\nzzz = 1\n"),
        s => format!("{base}{s}\nzzz = 1\n"),
    };
    let f = dir.join("c.toml");
    fs::write(&f, cfg).unwrap();
    let out = certmesh(&["check", "--config", f.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    // "expected one of `a`, `b`", or "expected `a`" for a table of one key.
    let list = err
        .split("unknown field `zzz`, expected ")
        .nth(1)
        .map(|l| l.trim_start_matches("one of "))
        .unwrap_or_else(|| panic!("{section}: no key list in {err}"));
    list.lines()
        .next()
        .unwrap_or_default()
        .split(", ")
        .map(|k| k.trim_matches('`').to_string())
        .collect()
}

#[test]
fn the_config_man_page_lists_every_key_the_parser_accepts() {
    let dir = tempfile::tempdir().unwrap();
    assert!(certmesh(&[
        "init",
        "--state-dir",
        dir.path().join("state").to_str().unwrap()
    ])
    .status
    .success());
    let doc = documented();
    let sections: Vec<&String> = doc.keys().collect();
    for section in [
        "[node]",
        "[tree]",
        "[[peer]]",
        "[acme]",
        "[acme.dns]",
        "[[certificate]]",
        "[[hook]]",
        "[http]",
        "[metrics]",
    ] {
        assert!(
            doc.contains_key(section),
            "{section} not on the page: {sections:?}"
        );
    }
    // Every top-level table the parser knows has its section on the page.
    for table in accepted(dir.path(), "top") {
        let documented = sections
            .iter()
            .any(|s| s.trim_matches(['[', ']']).split('.').next() == Some(table.as_str()));
        assert!(
            documented,
            "[{table}] has no section on the page: {sections:?}"
        );
    }
    for (section, keys) in &doc {
        let want = accepted(dir.path(), section);
        let missing: Vec<&String> = want.iter().filter(|k| !keys.contains(k)).collect();
        let extra: Vec<&String> = keys.iter().filter(|k| !want.contains(k)).collect();
        assert!(
            missing.is_empty(),
            "{section}: undocumented keys {missing:?}"
        );
        assert!(
            extra.is_empty(),
            "{section}: documented keys the parser refuses {extra:?}"
        );
    }
}

#[test]
fn every_readme_section_the_docs_name_exists() {
    let readme = fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap();
    let headings: Vec<&str> = readme
        .lines()
        .filter_map(|l| {
            l.trim_start_matches('#')
                .strip_prefix(' ')
                .filter(|_| l.starts_with('#'))
        })
        .collect();
    let mut files = vec![Path::new(ROOT).join("README.md")];
    for dir in ["config", "packaging", "docs"] {
        for e in fs::read_dir(Path::new(ROOT).join(dir)).unwrap().flatten() {
            if e.path().is_file() {
                files.push(e.path());
            }
        }
    }
    for f in files {
        let text = fs::read_to_string(&f).unwrap_or_default();
        for marker in ["README \"", "see \""] {
            for part in text.split(marker).skip(1) {
                let name = part.split('"').next().unwrap_or_default();
                assert!(
                    headings.iter().any(|h| h.starts_with(name)),
                    "{}: names README section {name:?}, which does not exist",
                    f.display()
                );
            }
        }
    }
}
