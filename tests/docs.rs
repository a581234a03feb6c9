//! The docs say what the code does and lead where they say: `certmesh.toml(5)` and
//! docs/configuration.md list exactly the keys the parser accepts, every relative link
//! in README.md and docs/ reaches a file (and heading), every README section named
//! elsewhere exists, every `certmesh` subcommand in a shell block is real, and the
//! README stays short.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use crate::util::certmesh;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The man page's keys per section (`.SS [node]` then `.TP` / `\fBkey\fR`).
fn documented() -> BTreeMap<String, Vec<String>> {
    let page = read("docs/certmesh.toml.5");
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
    // "expected one of `a`, `b`, `c`", "expected `a` or `b`" for two keys, or
    // "expected `a`" for a table of one key.
    let list = err
        .split("unknown field `zzz`, expected ")
        .nth(1)
        .map(|l| l.trim_start_matches("one of "))
        .unwrap_or_else(|| panic!("{section}: no key list in {err}"));
    list.lines()
        .next()
        .unwrap_or_default()
        .split(", ")
        .flat_map(|k| k.split(" or "))
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

/// docs/configuration.md's keys per section: each `### `[section]`` heading, then the
/// first column of its table.
fn guide_keys() -> BTreeMap<String, Vec<String>> {
    let guide = read("docs/configuration.md");
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut section = None;
    for l in guide.lines() {
        if let Some(h) = l.strip_prefix("### ") {
            section = Some(h.trim_matches('`').to_string());
        } else if let (Some(s), Some(row)) = (&section, l.strip_prefix("| `")) {
            let key = row.split('`').next().unwrap_or_default();
            out.entry(s.clone()).or_default().push(key.to_string());
        }
    }
    out
}

#[test]
fn the_configuration_guide_lists_every_key_the_parser_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let guide = guide_keys();
    let sections: Vec<&String> = guide.keys().collect();
    for table in accepted(dir.path(), "top") {
        let listed = sections
            .iter()
            .any(|s| s.trim_matches(['[', ']']).split('.').next() == Some(table.as_str()));
        assert!(listed, "[{table}] has no section in docs/configuration.md");
    }
    for (section, keys) in &guide {
        let want = accepted(dir.path(), section);
        let missing: Vec<&String> = want.iter().filter(|k| !keys.contains(k)).collect();
        let extra: Vec<&String> = keys.iter().filter(|k| !want.contains(k)).collect();
        assert!(
            missing.is_empty(),
            "{section}: not in the guide {missing:?}"
        );
        assert!(
            extra.is_empty(),
            "{section}: in the guide, refused {extra:?}"
        );
    }
}

fn read(rel: &str) -> String {
    fs::read_to_string(Path::new(ROOT).join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// README.md and every markdown file under docs/, relative to the repository.
fn markdown_files() -> Vec<String> {
    let mut files = vec!["README.md".to_string()];
    for e in fs::read_dir(Path::new(ROOT).join("docs"))
        .unwrap()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().to_string();
        if name.ends_with(".md") {
            files.push(format!("docs/{name}"));
        }
    }
    files.sort();
    files
}

/// The lines of `text` outside fenced code blocks.
fn prose(text: &str) -> Vec<&str> {
    let mut fenced = false;
    let mut out = Vec::new();
    for l in text.lines() {
        if l.starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            out.push(l);
        }
    }
    out
}

/// `line` without its inline code spans.
fn without_code(line: &str) -> String {
    line.split('`').step_by(2).collect::<Vec<_>>().join(" ")
}

/// Headings of a markdown text, as written.
fn headings(text: &str) -> Vec<String> {
    prose(text)
        .into_iter()
        .filter(|l| l.starts_with('#'))
        .map(|l| l.trim_start_matches('#').trim().to_string())
        .collect()
}

/// GitHub's anchor for a heading: lower case, spaces to `-`, other punctuation dropped.
fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// `(text, target)` of every inline link `[text](target)` in the prose of `text`.
fn links(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for l in prose(text) {
        // Link text may hold code (`[`x`](…)`): keep it, drop only code elsewhere.
        let plain = l.replace("[`", "[").replace("`](", "](");
        let line = without_code(&plain);
        for (i, _) in line.match_indices("](") {
            let Some(open) = line[..i].rfind('[') else {
                continue;
            };
            let target = line[i + 2..].split(')').next().unwrap_or_default();
            out.push((line[open + 1..i].to_string(), target.to_string()));
        }
    }
    out
}

#[test]
fn every_relative_link_reaches_a_file_and_heading() {
    let mut checked = 0;
    for file in markdown_files() {
        let text = read(&file);
        let base = Path::new(&file).parent().unwrap_or(Path::new(""));
        for (label, target) in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let resolved = if path.is_empty() {
                Path::new(&file).to_path_buf()
            } else {
                base.join(path)
            };
            let on_disk = Path::new(ROOT).join(&resolved);
            assert!(
                on_disk.exists(),
                "{file}: [{label}]({target}): {} does not exist",
                resolved.display()
            );
            if !anchor.is_empty() {
                let there = fs::read_to_string(&on_disk).unwrap_or_default();
                let slugs: Vec<String> = headings(&there).iter().map(|h| slug(h)).collect();
                assert!(
                    slugs.iter().any(|s| s == anchor),
                    "{file}: [{label}]({target}): no heading #{anchor} in {}: {slugs:?}",
                    resolved.display()
                );
            }
            checked += 1;
        }
    }
    assert!(
        checked > 50,
        "only {checked} links found: is the parser broken?"
    );
}

#[test]
fn the_readme_is_at_most_300_lines_and_links_every_guide() {
    let readme = read("README.md");
    let lines = readme.lines().count();
    assert!(
        lines <= 300,
        "README.md has {lines} lines; move sections into docs/"
    );
    let linked: Vec<String> = links(&readme).into_iter().map(|(_, t)| t).collect();
    for file in markdown_files().iter().filter(|f| f.starts_with("docs/")) {
        assert!(
            linked
                .iter()
                .any(|t| t.split('#').next() == Some(file.as_str())),
            "README.md does not link {file}"
        );
    }
}

#[test]
fn every_guide_starts_by_saying_who_it_is_for() {
    for file in markdown_files().iter().filter(|f| f.starts_with("docs/")) {
        let text = read(file);
        let first = text
            .lines()
            .skip(1)
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default();
        assert!(
            text.starts_with("# ") && !first.starts_with('#'),
            "{file}: a title, then a sentence on who the guide is for"
        );
    }
}

/// Every `README "Section"` named in the repository (configs, packaging, docs, the
/// CLI's help) is a README heading or a README link to where the section moved, and
/// every `see "Section"` in a guide or the README is a heading of that same file.
#[test]
fn every_section_the_docs_name_exists() {
    let readme = read("README.md");
    let mut readme_names = headings(&readme);
    readme_names.extend(links(&readme).into_iter().map(|(label, _)| label));
    let mut files: Vec<std::path::PathBuf> = Vec::new();
    let mut dirs = vec![
        Path::new(ROOT).join("config"),
        Path::new(ROOT).join("packaging"),
        Path::new(ROOT).join("docs"),
        Path::new(ROOT).join("src"),
    ];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                dirs.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    files.extend(["BENCHMARKS.md", "RELIABILITY.md"].map(|f| Path::new(ROOT).join(f)));
    for f in &files {
        let text = fs::read_to_string(f).unwrap_or_default();
        for marker in ["README \"", "README \\\""] {
            for part in text.split(marker).skip(1) {
                let name = part.split(['"', '\\']).next().unwrap_or_default();
                assert!(
                    readme_names.iter().any(|h| h.starts_with(name)),
                    "{}: names README section {name:?}, which the README neither has nor links",
                    f.display()
                );
            }
        }
    }
    for file in markdown_files() {
        let text = read(&file);
        let own = headings(&text);
        for part in text.split("see \"").skip(1) {
            let name = part.split('"').next().unwrap_or_default();
            assert!(
                own.iter().any(|h| h.starts_with(name)),
                "{file}: see {name:?}, which is no heading of {file} (link to the guide instead)"
            );
        }
    }
}

/// Every `certmesh SUBCOMMAND` in a shell block of README.md or docs/ is one the
/// binary has (hidden ones included): `certmesh SUBCOMMAND --help` succeeds.
#[test]
fn every_subcommand_in_a_shell_block_exists() {
    let mut words = std::collections::BTreeSet::new();
    for file in markdown_files() {
        let mut shell = false;
        for l in read(&file).lines() {
            if let Some(lang) = l.strip_prefix("```") {
                shell = !shell && (lang == "sh" || lang == "bash");
                continue;
            }
            if !shell {
                continue;
            }
            let code = l.split(" #").next().unwrap_or_default();
            let tokens: Vec<&str> = code.split_whitespace().collect();
            for (i, w) in tokens.iter().enumerate() {
                let at_start =
                    i == 0 || ["|", "||", "&&", ";", "--", "$("].contains(&tokens[i - 1]);
                let next = tokens.get(i + 1).copied().unwrap_or_default();
                if *w == "certmesh"
                    && at_start
                    && !next.is_empty()
                    && next.chars().all(|c| c.is_ascii_lowercase())
                {
                    words.insert((next.to_string(), file.clone()));
                }
            }
        }
    }
    assert!(words.len() > 10, "only {words:?}: is the parser broken?");
    for (w, file) in words {
        let out = certmesh(&[&w, "--help"]);
        assert!(
            out.status.success(),
            "{file}: `certmesh {w}` is no subcommand: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
