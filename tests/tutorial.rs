//! docs/tutorial-pebble.md, run as written: its `sh` blocks, in order, in one bash
//! (real Pebble, three real nodes on 127.0.10.2–4, three real nginx).

use std::path::Path;
use std::process::Command;

#[test]
fn the_pebble_tutorial_runs_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("docs/tutorial-pebble.md")).unwrap();
    let mut script = String::new();
    let mut inside = false;
    for line in text.lines() {
        match (inside, line) {
            (false, "```sh") => inside = true,
            (true, "```") => inside = false,
            (true, l) => {
                script.push_str(l);
                script.push('\n');
            }
            _ => {}
        }
    }
    assert!(script.contains("certmesh issue"), "no commands found");
    let dir = tempfile::Builder::new()
        .prefix("certmesh-tutorial-")
        .tempdir()
        .unwrap();
    let bin = Path::new(crate::util::BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("T", dir.path())
        .env("PATH", path)
        .env("NO_COLOR", "1")
        .output()
        .expect("running bash");
    let logs: String = (1..=3)
        .map(|i| {
            let log = std::fs::read_to_string(dir.path().join(format!("n{i}/certmesh.log")));
            format!("--- lb{i}\n{}", log.unwrap_or_default())
        })
        .collect();
    assert!(
        out.status.success(),
        "the tutorial failed ({}):\n--- stdout\n{}\n--- stderr\n{}\n{logs}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The three nginx served one serial after the issue.
    let serials: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("serial="))
        .collect();
    assert_eq!(serials.len(), 3, "{stdout}");
    assert!(serials.iter().all(|s| *s == serials[0]), "{stdout}");
}
