//! The `jobschleuder` binary: parse the command line, run, print the error chain once.

use std::process::ExitCode;

use clap::Parser;
use jobschleuder::cli::{translate_two_letter_options, Cli};

fn main() -> ExitCode {
    let cli = match Cli::try_parse_from(translate_two_letter_options(std::env::args_os())) {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2));
        }
    };
    match jobschleuder::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
