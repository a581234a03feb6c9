//! Where the log goes and how it looks. Chosen once at start-up from the environment:
//! - `CERTMESH_LOG_FORMAT=json`: one JSON object per line on stderr (log shippers);
//! - stderr is the journal (`JOURNAL_STREAM` names stderr's device and inode, as
//!   systemd sets it): native journald entries through `tracing-journald`, with the
//!   priority of the level and the event's fields as journal fields (`PEER=`,
//!   `CERT=`, `PATH=` …); if the journal socket cannot be opened, `<N>`-prefixed
//!   lines without our own timestamp (`sd-daemon(3)`), which journald stores with
//!   that priority;
//! - otherwise readable `key=value` lines on stderr, coloured only on a terminal and
//!   not when `NO_COLOR` is set (<https://no-color.org>).
//!
//! Priorities (both journal paths): error 3, warn 4, info 5, debug 6, trace 7, so
//! `journalctl -p warning -u certmesh` shows warnings and errors only.

use std::ffi::OsStr;
use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// Where the log goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// JSON lines on stderr.
    Json,
    /// stderr is connected to the journal.
    Journal,
    /// Plain lines on stderr; `ansi` says whether to colour them.
    Stderr { ansi: bool },
}

/// Decides the target from what the environment says (pure, for tests):
/// `log_format` is `$CERTMESH_LOG_FORMAT`, `stderr_is_journal` whether
/// `$JOURNAL_STREAM` names stderr, `no_color` is `$NO_COLOR`.
pub fn target(
    log_format: Option<&OsStr>,
    stderr_is_journal: bool,
    stderr_is_terminal: bool,
    no_color: Option<&OsStr>,
) -> Target {
    if log_format.is_some_and(|v| v.eq_ignore_ascii_case("json")) {
        Target::Json
    } else if stderr_is_journal {
        Target::Journal
    } else {
        Target::Stderr {
            ansi: use_colour(stderr_is_terminal, no_color),
        }
    }
}

/// Colours on a terminal unless `NO_COLOR` is set to a non-empty value (no-color.org).
pub fn use_colour(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Whether `journal_stream` (`$JOURNAL_STREAM`, `<device>:<inode>`) names the file
/// stderr is: systemd sets it for the service's own stderr, and a child that
/// inherited the variable but writes elsewhere must not take it as the journal.
pub fn names_stderr(journal_stream: Option<&OsStr>) -> bool {
    let Some((dev, ino)) = journal_stream
        .and_then(OsStr::to_str)
        .and_then(|v| v.split_once(':'))
    else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .and_then(|fd| std::fs::File::from(fd).metadata())
        .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// The `sd-daemon(3)` priority of a level (the same mapping `tracing-journald` uses).
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 5,
        Level::DEBUG => 6,
        Level::TRACE => 7,
    }
}

/// What is logged when `RUST_LOG` is not set. notify warns "unable to remove watch
/// descriptor" whenever a watched directory goes away, which is normal here (old
/// archive versions are pruned): only its errors are shown.
const DEFAULT_FILTER: &str = "info,quinn=warn,rustls=warn,notify=error";

/// The log filter from `RUST_LOG` (`level` and `target=level` directives, comma-
/// separated), or the default with the reason when it does not parse. Targets nobody
/// named log errors, so a filter for one crate never hides certmesh's errors.
fn filter(var: Option<&str>) -> (Targets, Option<String>) {
    let default = || DEFAULT_FILTER.parse::<Targets>().unwrap_or_default();
    match var.map(str::trim).filter(|v| !v.is_empty()) {
        None => (default(), None),
        Some(v) => match v.parse::<Targets>() {
            Ok(t) if t.default_level().is_none() => (t.with_default(LevelFilter::ERROR), None),
            Ok(t) => (t, None),
            Err(e) => (default(), Some(format!("{v:?}: {e}"))),
        },
    }
}

/// Starts logging for the process, from the environment.
pub fn init() {
    let (filter, bad_filter) = filter(std::env::var("RUST_LOG").ok().as_deref());
    let filter = || filter.clone();
    let stderr = std::io::stderr();
    let target = target(
        std::env::var_os("CERTMESH_LOG_FORMAT").as_deref(),
        names_stderr(std::env::var_os("JOURNAL_STREAM").as_deref()),
        std::io::IsTerminal::is_terminal(&stderr),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let fmt = || {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
    };
    match target {
        Target::Json => tracing_subscriber::registry()
            .with(filter())
            .with(fmt().json())
            .init(),
        Target::Journal => match tracing_journald::layer() {
            Ok(journal) => tracing_subscriber::registry()
                .with(filter())
                .with(
                    journal
                        .with_field_prefix(None)
                        .with_syslog_identifier("certmesh".into()),
                )
                .init(),
            Err(_) => tracing_subscriber::registry()
                .with(filter())
                .with(fmt().event_format(Prefixed::default()))
                .init(),
        },
        Target::Stderr { ansi } => tracing_subscriber::registry()
            .with(filter())
            .with(fmt().with_ansi(ansi))
            .init(),
    }
    if let Some(e) = bad_filter {
        tracing::warn!("RUST_LOG ignored: {e}; logging at the default \"{DEFAULT_FILTER}\"");
    }
}

/// `<N>target: message key=value` lines: the journal adds its own timestamp and reads
/// the priority from the prefix, on every line of a multi-line message.
pub struct Prefixed {
    inner: tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Compact, ()>,
}

impl Default for Prefixed {
    fn default() -> Self {
        Prefixed {
            inner: tracing_subscriber::fmt::format()
                .compact()
                .without_time()
                .with_level(false)
                .with_ansi(false),
        }
    }
}

impl<S, N> FormatEvent<S, N> for Prefixed
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        // Every line of a multi-line message carries the priority: journald makes
        // each line its own entry, and `-p warning` must not lose the rest.
        let n = priority(event.metadata().level());
        for l in line.lines() {
            writeln!(writer, "<{n}>{l}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<&OsStr> {
        Some(OsStr::new(s))
    }

    #[test]
    fn rust_log_sets_levels_per_target_and_bad_values_are_named() {
        let (t, bad) = filter(None);
        assert!(bad.is_none());
        assert!(t.would_enable("certmesh::node", &Level::INFO));
        assert!(!t.would_enable("quinn_proto::connection", &Level::INFO));
        let (t, _) = filter(Some("certmesh=debug"));
        assert!(t.would_enable("certmesh::tasks::peer", &Level::DEBUG));
        assert!(t.would_enable("quinn", &Level::ERROR));
        assert!(!t.would_enable("quinn", &Level::WARN));
        let (t, bad) = filter(Some("warn,certmesh=trace"));
        assert!(bad.is_none());
        assert!(t.would_enable("certmesh::acme", &Level::TRACE));
        assert!(!t.would_enable("rustls", &Level::INFO));
        let (t, bad) = filter(Some("certmesh=loud"));
        assert!(bad.unwrap().contains("certmesh=loud"));
        assert!(t.would_enable("certmesh", &Level::INFO));
    }

    #[test]
    fn no_color_turns_colours_off_on_a_terminal() {
        assert!(use_colour(true, None));
        assert!(!use_colour(true, os("1")));
        // no-color.org: present *and not empty*.
        assert!(use_colour(true, os("")));
        assert!(!use_colour(false, None));
    }

    #[test]
    fn json_wins_then_journal_then_stderr() {
        assert_eq!(target(os("JSON"), true, true, None), Target::Json);
        assert_eq!(target(None, true, true, None), Target::Journal);
        assert_eq!(
            target(None, false, true, os("1")),
            Target::Stderr { ansi: false }
        );
    }

    #[test]
    fn journal_stream_must_name_stderr() {
        assert!(!names_stderr(None));
        assert!(!names_stderr(os("bogus")));
        assert!(!names_stderr(os("1:2")));
        use std::os::fd::AsFd;
        use std::os::unix::fs::MetadataExt;
        let fd = std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .expect("dup stderr");
        let m = std::fs::File::from(fd).metadata().expect("fstat stderr");
        let mine = format!("{}:{}", m.dev(), m.ino());
        assert!(names_stderr(os(&mine)));
    }

    #[test]
    fn priorities_match_syslog() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 5);
    }
}
