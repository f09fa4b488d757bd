//! The command line: `handoff` (or `handoff serve`) runs the server; `handoff job …` calls a
//! running instance's API as a job runner does; `handoff check-config` checks the environment as
//! `serve` would; `handoff token` prints a new API token; `handoff hash-password` hashes the admin
//! password; `handoff health` asks a running instance's `/healthz`, for probes. Parsing is clap's; serving stays in `main.rs`, which owns the process.
//!
//! Exit codes, the same for every command: 0 done; 1 the server refused (its message on stderr);
//! 2 a usage error or an invalid setting (nothing was sent); 3 the server could not be reached.

pub mod health;
pub mod job;
pub mod password;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::setting::{env_file, markdown_table};
use crate::config::{self, Config};

/// The server refused: a `4xx` or `5xx` answer.
pub const EXIT_REFUSED: u8 = 1;
/// A usage error or an invalid setting (clap uses 2 for its own usage errors too).
pub const EXIT_USAGE: u8 = 2;
/// No answer: nothing listens at the URL, the name does not resolve, TLS failed, or it timed out.
pub const EXIT_UNREACHABLE: u8 = 3;

const EXIT_CODES: &str = "Exit codes: 0 done, 1 the server refused (its message on stderr), \
                          2 usage error or invalid setting, 3 the server could not be reached.";

/// Tells a waiting browser, over Server-Sent Events, that its server-side job is done.
#[derive(Debug, Parser)]
#[command(name = "handoff", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// What to do; `serve` when none is given.
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server with settings from the environment (the default; README: Configuration).
    Serve,
    /// Create, report on, complete, fail or show a job on a running Handoff, over its API.
    Job(JobArgs),
    /// Check the environment as `serve` would and print the effective settings, secrets masked;
    /// exit 2 with the reason when a setting is invalid.
    CheckConfig(CheckConfigArgs),
    /// Print a new random API token (256 bits, URL-safe), e.g. for HANDOFF_API_TOKENS or
    /// HANDOFF_SECRET_KEY.
    Token,
    /// Read the admin password on standard input (at least 12 characters) and print its argon2id
    /// hash, for HANDOFF_ADMIN_PASSWORD_HASH.
    HashPassword,
    /// Ask a running Handoff's /healthz, for container health checks and probes: exit 0 when it
    /// answers 200, 1 otherwise (unreachable, 503, a malformed URL).
    Health(HealthArgs),
}

/// What `check-config` prints instead of checking, if anything.
#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// Print, instead, an env file (for systemd's EnvironmentFile=) naming every setting,
    /// commented out at its default, under its meaning.
    #[arg(long, conflicts_with = "markdown")]
    pub env_file: bool,
    /// Print, instead, the README's table of settings (Markdown).
    #[arg(long)]
    pub markdown: bool,
}

/// Which instance `handoff health` asks.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The Handoff to ask: its scheme, host and port (and path prefix, behind a proxy). By
    /// default the address in HANDOFF_ADDR (127.0.0.1:8080 when unset), a wildcard address
    /// asked on loopback.
    #[arg(long)]
    pub url: Option<String>,
}

/// Where the job commands send their requests, and how they print the answer.
#[derive(Debug, Args)]
#[command(
    after_help = "The token comes from HANDOFF_API_TOKEN (`show` needs none).\n\n\
                        Exit codes: 0 done, 1 the server refused (its message on stderr), \
                        2 usage error, 3 the server could not be reached."
)]
pub struct JobArgs {
    /// The Handoff to call: its scheme, host and port (and path prefix, behind a proxy).
    #[arg(
        long,
        global = true,
        env = "HANDOFF_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub url: String,
    /// Print the server's JSON answer as it came, for scripts, instead of a listing.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: JobCommand,
}

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Create a pending job; prints its id and its wait URL (page A, where to send the user).
    Create {
        /// Where page A sends the user once the job is complete: a path on the site, such as
        /// `/orders/42`; page B of the job when not given.
        #[arg(long, value_name = "PATH")]
        move_url: Option<String>,
        /// Seconds until the job expires if it is still pending; the server's
        /// HANDOFF_JOB_DEADLINE_SECS when not given.
        #[arg(long, value_name = "SECS")]
        deadline: Option<u64>,
    },
    /// Report progress on a pending job; its open pages show it at once.
    Progress {
        /// The job's id (it may start with `-`, as one id in 64 does).
        #[arg(allow_hyphen_values = true)]
        id: String,
        /// How far along, 0 to 100.
        #[arg(long, value_name = "N", value_parser = percent)]
        percent: Option<f64>,
        /// A line for the person waiting, at most 200 characters.
        #[arg(long, value_name = "TEXT")]
        message: Option<String>,
    },
    /// Complete jobs: their open pages move on to the target. Several ids go in one batch call
    /// (per 1000).
    Complete {
        #[command(flatten)]
        ids: JobIds,
        /// Overrides the target given at creation.
        #[arg(long, value_name = "PATH")]
        move_url: Option<String>,
    },
    /// Fail jobs: their open pages move on to page B, which shows the message. Several ids go in
    /// one batch call (per 1000).
    Fail {
        #[command(flatten)]
        ids: JobIds,
        /// Why it failed, for the person waiting; at most 200 characters.
        #[arg(long, value_name = "TEXT")]
        message: Option<String>,
        /// Where to send the user instead of page B.
        #[arg(long, value_name = "PATH")]
        move_url: Option<String>,
    },
    /// Show a job: its state, progress, deadline and target.
    Show {
        /// The job's id (it may start with `-`, as one id in 64 does).
        #[arg(allow_hyphen_values = true)]
        id: String,
    },
}

/// The jobs a completion or failure names: on the command line, from a file, or both.
#[derive(Debug, Args)]
pub struct JobIds {
    /// The job's id (it may start with `-`, as one id in 64 does).
    #[arg(
        value_name = "ID",
        required_unless_present = "from_file",
        allow_hyphen_values = true
    )]
    pub id: Option<String>,
    /// More jobs' ids, completed or failed with it in one batch call (one that starts with `-`
    /// goes after `--`, or in the file).
    #[arg(value_name = "MORE")]
    pub more: Vec<String>,
    /// Read more ids from this file, one per line (`-`: standard input).
    #[arg(long, value_name = "FILE")]
    pub from_file: Option<std::path::PathBuf>,
}

/// `handoff check-config`: the settings `serve` would run with, or why it would not start; or,
/// with an option, every setting's declaration as an env file or README's table.
pub fn check_config(args: &CheckConfigArgs) -> ExitCode {
    if args.env_file || args.markdown {
        let print = if args.env_file {
            env_file
        } else {
            markdown_table
        };
        print!("{}", print(config::all()));
        return ExitCode::SUCCESS;
    }
    match Config::from_env() {
        Ok(config) => {
            let settings = config.settings();
            let width = settings.iter().map(|(var, _)| var.len()).max().unwrap_or(0);
            println!("The configuration is valid. Effective settings:");
            for (var, value) in settings {
                println!("  {var:<width$}  {value}");
            }
            for warning in config.warnings() {
                eprintln!("handoff: warning: {warning}");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("handoff: {err}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// `handoff token`: a token as strong as the one start-up generates, for operators and scripts.
pub fn token() -> ExitCode {
    println!("{}", crate::auth::random_token());
    ExitCode::SUCCESS
}

/// `--percent`: a finite number. `nan` and `inf` parse as numbers but have no JSON form, so they
/// are refused here rather than sent as nothing; the range is the server's to check and explain.
fn percent(raw: &str) -> Result<f64, String> {
    match raw.parse::<f64>() {
        Ok(n) if n.is_finite() => Ok(n),
        _ => Err(format!("{raw:?} is not a number")),
    }
}
