//! `orwcfm-fast`: the command-line front end.
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = orwcfm_fast::cli::Cli::parse();
    // a level the CPU cannot run, or no level at all, is refused before any work
    if let Err(e) = orwcfm_fast::backend::cpu::isa::requested() {
        eprintln!("error: {e}");
        return ExitCode::from(1);
    }
    // Internal errors must still end with one line and a non-zero exit, never a backtrace dump.
    std::panic::set_hook(Box::new(|info| {
        let msg = info.payload().downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| info.payload().downcast_ref::<String>().cloned()).unwrap_or_default();
        let loc = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("error: internal error{loc}: {msg}");
    }));
    match std::panic::catch_unwind(|| orwcfm_fast::cli::run(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::from(1)
        }
        Err(_) => ExitCode::from(2),
    }
}
