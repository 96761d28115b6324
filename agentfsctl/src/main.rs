//! `agentfsctl`: the command-line client of the AgentFS supervisor. It
//! talks D-Bus (`org.agentfs`, specs/dbus.md) and prints tables for people
//! or JSON (`--json`) for programs. Failures are one line on stderr,
//! `agentfsctl: <message>`, with exit status 1.

mod bus;
mod cli;
mod commands;
mod follow;
mod generate;
mod output;
mod target;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Rust ignores SIGPIPE; restore the default so that `agentfsctl ... |
    // head` ends quietly and so that `exec` does not hand an ignored
    // SIGPIPE to the command it runs.
    // SAFETY: no other thread exists yet; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = cli::Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentfsctl: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(commands::run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("agentfsctl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
