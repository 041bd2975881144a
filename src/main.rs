//! The `ma2mba` binary: forwards to [`ma2mba::cli::run_streaming`].

use std::io::Write;

fn main() {
    let out = ma2mba::cli::run_streaming(std::env::args_os());
    // A closed pipe (`ma2mba graph ... | head`) is not an error worth a panic.
    let _ = std::io::stdout().write_all(out.stdout.as_bytes());
    let _ = std::io::stderr().write_all(out.stderr.as_bytes());
    std::process::exit(out.code);
}
