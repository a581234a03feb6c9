//! `[[hook]]`: commands run once per applied change of matching paths, on every
//! node, whether the change was made here (the ACME client, an operator) or applied
//! from a peer. A burst of changes (a published bundle: five files and a link) is
//! debounced into one run. argv without a shell; the names of the certificates that
//! changed are in `CERTMESH_CHANGED` (space separated), the changed paths in
//! `CERTMESH_PATHS`. A hook that fails or hangs is logged and killed after its
//! timeout; sync goes on.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use crate::config::HookConfig;
use crate::index::Kind;
use crate::node::Shared;

/// Quiet time that ends a burst of changes.
const QUIET: Duration = Duration::from_millis(100);
/// A burst is cut after this long.
const DEADLINE: Duration = Duration::from_secs(2);

/// Starts the hook runner if any `[[hook]]` is configured.
pub fn start(shared: &Arc<Shared>) {
    let any = shared
        .config
        .lock()
        .map(|c| !c.hooks.is_empty())
        .unwrap_or(false);
    if any {
        tokio::spawn(run(shared.clone()));
    }
}

/// The paths a change touches for matching: the path itself and, for a symlink
/// (`live/<name>`), the files it now exposes (`live/<name>/fullchain.pem`, ...).
fn touched(shared: &Shared, since: u64) -> Vec<String> {
    let st = shared.lock();
    let mut out = BTreeSet::new();
    for e in st.index.changed_since(since) {
        let p = e.record.path.as_str().to_string();
        if e.record.kind == Kind::Symlink && !e.record.deleted {
            if let Ok(target) = e.record.path.resolve_symlink_target(&e.record.target) {
                for inner in st.index.paths_within(&target) {
                    if let Some(rest) = inner.as_str().strip_prefix(target.as_str()) {
                        out.insert(format!("{p}{rest}"));
                    }
                }
            }
        }
        out.insert(p);
    }
    out.into_iter().collect()
}

/// Certificate names a set of paths concerns (`live/<name>…`, `archive/<name>/…`).
pub fn cert_names(paths: &[&String]) -> Vec<String> {
    let mut names = BTreeSet::new();
    for p in paths {
        let mut parts = p.split('/');
        if let (Some("live" | "archive"), Some(name)) = (parts.next(), parts.next()) {
            names.insert(name.to_string());
        }
    }
    names.into_iter().collect()
}

async fn run(shared: Arc<Shared>) {
    let mut changed = shared.changed.subscribe();
    let mut seen = *changed.borrow_and_update();
    loop {
        if changed.changed().await.is_err() {
            return;
        }
        // Debounce: until QUIET without a change, at most DEADLINE.
        let start = tokio::time::Instant::now();
        while start.elapsed() < DEADLINE {
            match tokio::time::timeout(QUIET, changed.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return,
                Err(_) => break,
            }
        }
        let now = *changed.borrow_and_update();
        let paths = touched(&shared, seen);
        seen = now;
        let hooks: Vec<HookConfig> = shared
            .config
            .lock()
            .map(|c| c.hooks.clone())
            .unwrap_or_default();
        for h in hooks {
            let matched: Vec<&String> = paths.iter().filter(|p| h.matcher.is_match(p)).collect();
            if matched.is_empty() {
                continue;
            }
            let names = cert_names(&matched);
            let shared = shared.clone();
            let list: Vec<String> = matched.into_iter().cloned().collect();
            // One at a time per burst, in config order; never blocks sync.
            run_one(&shared, &h, &names, &list).await;
        }
    }
}

async fn run_one(shared: &Shared, h: &HookConfig, names: &[String], paths: &[String]) {
    let started = std::time::Instant::now();
    let mut cmd = tokio::process::Command::new(&h.run[0]);
    cmd.args(&h.run[1..])
        .env("CERTMESH_CHANGED", names.join(" "))
        .env("CERTMESH_PATHS", paths.join(" "))
        .env("CERTMESH_TREE", &shared.tree.root)
        .current_dir(&shared.tree.root)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            shared.hook_failed(format!("hook {:?}: cannot start: {e}", h.run));
            return;
        }
    };
    match tokio::time::timeout(h.timeout, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => tracing::info!(
            hook = ?h.run,
            changed = %names.join(" "),
            ms = started.elapsed().as_millis() as u64,
            "hook ran"
        ),
        Ok(Ok(out)) => shared.hook_failed(format!(
            "hook {:?} failed ({}): {}",
            h.run,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(Err(e)) => shared.hook_failed(format!("hook {:?}: {e}", h.run)),
        Err(_) => shared.hook_failed(format!(
            "hook {:?} timed out after {:?} and was killed",
            h.run, h.timeout
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_paths() {
        let p: Vec<String> = [
            "live/www.example.com",
            "live/www.example.com/fullchain.pem",
            "archive/api/3/privkey.pem",
            "dhparam.pem",
            "live",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let refs: Vec<&String> = p.iter().collect();
        assert_eq!(cert_names(&refs), ["api", "www.example.com"]);
    }
}
