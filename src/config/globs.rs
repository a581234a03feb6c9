//! `[[hook]] paths`: shell-style globs over tree-relative paths.
//!
//! `*` and `?` stay inside one path component, `**` spans components, `[a-z]` is a
//! class and `{a,b}` an alternative (expanded here into one pattern each). Built on
//! the `glob` crate, which has no regex engine behind it: a regex engine would be
//! the largest part of the binary, and nothing else needs one.

use glob::{MatchOptions, Pattern};

/// The most patterns one `{…}` expansion may produce; `{a,b}{c,d}…` grows fast.
const MAX_EXPANSION: usize = 256;

const OPTIONS: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

/// A set of globs; a path matches when any of them does.
#[derive(Debug, Clone, Default)]
pub struct Globs {
    patterns: Vec<Pattern>,
}

impl Globs {
    /// Compiles `globs`; the error names the glob and what is wrong with it.
    pub fn new<S: AsRef<str>>(globs: &[S]) -> Result<Self, String> {
        let mut patterns = Vec::new();
        for g in globs {
            let g = g.as_ref();
            for one in expand(g).map_err(|e| format!("{g:?}: {e}"))? {
                let p = Pattern::new(&one).map_err(|e| format!("{g:?}: {e}"))?;
                patterns.push(p);
            }
        }
        Ok(Globs { patterns })
    }

    /// Whether `path` (relative to the tree, `/`-separated) matches any glob.
    pub fn is_match(&self, path: &str) -> bool {
        self.patterns.iter().any(|p| p.matches_with(path, OPTIONS))
    }
}

/// Expands the first `{a,b,…}` group (nested groups and later groups by recursion).
fn expand(glob: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    expand_into(glob, &mut out)?;
    Ok(out)
}

fn expand_into(glob: &str, out: &mut Vec<String>) -> Result<(), String> {
    let Some(open) = glob.find('{') else {
        if glob.contains('}') {
            return Err("'}' without '{'".into());
        }
        out.push(glob.to_string());
        return Ok(());
    };
    // The matching close brace, and the top-level commas between.
    let mut depth = 0usize;
    let mut cuts = vec![open];
    let mut close = None;
    for (i, c) in glob.char_indices().skip_while(|(i, _)| *i <= open) {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                close = Some(i);
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => cuts.push(i),
            _ => {}
        }
    }
    let close = close.ok_or("'{' without '}'")?;
    if glob[..open].contains('}') {
        return Err("'}' without '{'".into());
    }
    cuts.push(close);
    let (head, tail) = (&glob[..open], &glob[close + 1..]);
    for w in cuts.windows(2) {
        let alt = &glob[w[0] + 1..w[1]];
        expand_into(&format!("{head}{alt}{tail}"), out)?;
        if out.len() > MAX_EXPANSION {
            return Err(format!("expands to more than {MAX_EXPANSION} patterns"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(globs: &[&str], path: &str) -> bool {
        Globs::new(globs).unwrap().is_match(path)
    }

    #[test]
    fn star_stays_in_one_component_and_double_star_spans() {
        assert!(m(&["live/*/fullchain.pem"], "live/www/fullchain.pem"));
        assert!(!m(&["live/*/fullchain.pem"], "live/www/x/fullchain.pem"));
        assert!(!m(&["live/*"], "live/www/fullchain.pem"));
        assert!(m(&["live/www/**"], "live/www/fullchain.pem"));
        assert!(m(&["live/www/**"], "live/www/a/b/c"));
        assert!(!m(&["live/www/**"], "live/api/fullchain.pem"));
        assert!(m(&["**"], "dhparam.pem"));
        assert!(m(&["**/*.pem"], "live/www/privkey.pem"));
        assert!(m(&["*.txt"], ".hidden.txt"));
        assert!(m(&["live/[a-w]*/**"], "live/www/cert.pem"));
        assert!(!m(&["live/[a-v]*/**"], "live/www/cert.pem"));
    }

    #[test]
    fn braces_are_alternatives() {
        let g = &["live/{www,api.example.com}/**"];
        assert!(m(g, "live/www/fullchain.pem"));
        assert!(m(g, "live/api.example.com/privkey.pem"));
        assert!(!m(g, "live/other/privkey.pem"));
        assert!(m(&["{a,b{c,d}}/x"], "bd/x"));
        assert_eq!(expand("{a,b}{c,d}").unwrap(), ["ac", "ad", "bc", "bd"]);
    }

    #[test]
    fn bad_globs_are_named() {
        for (g, why) in [
            ("live/{www/**", "without '}'"),
            ("live/www}/**", "without '{'"),
            ("live/**x", "recursive"),
            ("live/[a", "invalid range"),
        ] {
            let e = Globs::new(&[g]).unwrap_err();
            assert!(e.contains(g) && e.contains(why), "{g}: {e}");
        }
        let bomb = "{a,b,c,d}".repeat(5);
        assert!(Globs::new(&[bomb]).unwrap_err().contains("more than"));
    }
}
