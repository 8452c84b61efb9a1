//! How wrenn's binaries log (the `logging` feature, so that library crates do not link a
//! subscriber): `tracing` events to stderr, filtered by an environment variable.

/// Sends `tracing` events to stderr, filtered by the environment variable `variable` (`EnvFilter`
/// directives, e.g. `debug` or `wrenn_agent=trace`) or else by `default`; in color only when
/// stderr is a terminal. Call once, at the start of `main`.
/// `WRENN_LOG_FORMAT=json` makes each event one JSON object a line (for a log collector).
pub fn log_to_stderr(variable: &str, default: &str) {
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(variable)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr);
    if std::env::var("WRENN_LOG_FORMAT").is_ok_and(|format| format == "json") {
        logs.json().with_current_span(false).init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}
