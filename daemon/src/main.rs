//! The `xvio` command.

use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use xvio::{
    attach::is_permission_error,
    config::{Cli, Command},
};

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("XVIO_LOG").unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(config) => xvio::daemon::run(config).map_err(anyhow::Error::from),
        Command::Stats(config) => xvio::stats::report(config)
            .map(|text| print!("{text}"))
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: what failed, why, and (in the message) what to do.
            let hint = if is_permission_error(e.as_ref()) {
                " (permission denied: run xvio as root, or with CAP_BPF, CAP_NET_ADMIN and CAP_NET_RAW)"
            } else {
                ""
            };
            eprintln!("xvio: error: {e:#}{hint}");
            std::process::ExitCode::FAILURE
        }
    }
}
