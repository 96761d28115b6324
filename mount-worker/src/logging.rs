//! Logging set-up shared by the AgentFS daemons (worker and supervisor).

use tracing_subscriber::prelude::*;

/// To the journal (structured, under `identifier`) when systemd connected
/// stderr to it (`JOURNAL_STREAM`, also inherited by the supervisor's
/// workers), to stderr otherwise. RUST_LOG sets the level (default info).
pub fn init(identifier: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let journald = std::env::var_os("JOURNAL_STREAM")
        .is_some()
        .then(|| tracing_journald::layer().ok())
        .flatten();
    match journald {
        Some(layer) => tracing_subscriber::registry()
            .with(filter)
            .with(layer.with_syslog_identifier(identifier.to_owned()))
            .init(),
        None => tracing_subscriber::registry()
            .with(filter)
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .init(),
    }
}
