//! `handoff hash-password`: reads the admin password on standard input and prints its argon2id
//! hash in PHC format, for `HANDOFF_ADMIN_PASSWORD_HASH`. The password never appears in an
//! argument, where `ps` and the shell's history would show it.

use std::io::Read as _;
use std::process::ExitCode;

use super::EXIT_USAGE;

/// The shortest admin password taken: the login throttle slows one address, not a guesser
/// with many.
pub const MIN_PASSWORD_LEN: usize = 12;

pub fn run() -> ExitCode {
    let mut input = String::new();
    if let Err(err) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("handoff: cannot read the password on standard input: {err}");
        return ExitCode::from(EXIT_USAGE);
    }
    // One line, as `echo` or a terminal gives it; any other whitespace is the password's own.
    let password = input.strip_suffix('\n').map_or(input.as_str(), |line| {
        line.strip_suffix('\r').unwrap_or(line)
    });
    if password.chars().count() < MIN_PASSWORD_LEN {
        eprintln!(
            "handoff: the password on standard input must be at least {MIN_PASSWORD_LEN} \
             characters (e.g. `handoff token | tee /dev/tty | handoff hash-password`)"
        );
        return ExitCode::from(EXIT_USAGE);
    }
    match crate::auth::hash_password(password) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("handoff: cannot hash the password: {err}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}
