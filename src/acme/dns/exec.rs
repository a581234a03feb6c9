//! The exec provider: `argv… present|cleanup <fqdn> <value>` (lego's `exec` contract:
//! the fqdn is absolute, with its trailing dot), no shell, killed after the timeout,
//! stderr kept for the error.

use std::process::Stdio;
use std::time::Duration;

use super::error::DnsError;

/// Most of a failing program's stderr kept in the error.
const STDERR_KEPT: usize = 2000;

pub async fn run(
    argv: &[String],
    timeout: Duration,
    action: &'static str,
    fqdn: &str,
    value: &str,
) -> Result<(), DnsError> {
    let fail = |why: String| DnsError::Exec {
        argv: argv.to_vec(),
        action,
        fqdn: fqdn.to_string(),
        why,
    };
    // Only a key-authorization digest is ever passed on (never an option-like or
    // oversized string from a peer's record file).
    if !super::is_digest(value) {
        return Err(fail(format!(
            "refused the value {:?}: not a key-authorization digest",
            value.chars().take(60).collect::<String>()
        )));
    }
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| fail("empty argv".into()))?;
    let child = tokio::process::Command::new(prog)
        .args(args)
        .arg(action)
        .arg(format!("{}.", fqdn.trim_end_matches('.')))
        .arg(value)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("could not start: {e}")))?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(fail(e.to_string())),
        Err(_) => {
            return Err(fail(format!(
                "killed after {timeout:?} (acme.dns.exec_timeout)"
            )))
        }
    };
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = stderr.trim();
    let tail = match stderr.char_indices().rev().nth(STDERR_KEPT) {
        Some((i, _)) => &stderr[i..],
        None => stderr,
    };
    Err(fail(if tail.is_empty() {
        format!("{} (no stderr)", out.status)
    } else {
        format!("{}: {tail}", out.status)
    }))
}
