//! `handoff`: runs the server (`handoff` or `handoff serve`) with settings from the environment
//! until SIGTERM or Ctrl-C, then drains and stops ([`handoff::startup::Stopper`]); the other
//! commands are in [`handoff::cli`].

use std::process::ExitCode;

use clap::Parser;
use handoff::cli::{self, Cli, Command};
use handoff::config::{self, Config};
use handoff::logging;
use handoff::startup::Application;

#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc reads its settings from this symbol when it starts; see
/// [`handoff::startup::MALLOC_CONF`].
#[cfg(not(feature = "system-alloc"))]
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 24] = handoff::startup::MALLOC_CONF;

fn main() -> ExitCode {
    match Cli::parse().command.unwrap_or(Command::Serve) {
        Command::Serve => serve(),
        Command::Job(args) => cli::job::run(args),
        Command::CheckConfig(args) => cli::check_config(&args),
        Command::Token => cli::token(),
        Command::HashPassword => cli::password::run(),
        Command::Health(args) => cli::health::run(args),
    }
}

fn serve() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("handoff: {err}");
            return ExitCode::from(cli::EXIT_USAGE);
        }
    };
    logging::init(config.log_format, config::LOG_FILTER);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("handoff: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(config))
}

async fn run(config: Config) -> ExitCode {
    let app = match Application::build(config).await {
        Ok(app) => app,
        Err(err) => {
            eprintln!("handoff: {err}");
            return ExitCode::FAILURE;
        }
    };
    // Listening now: a `Type=notify` unit counts as started only from here. Without systemd
    // (no NOTIFY_SOCKET) this does nothing.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let stopper = app.stopper();
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        // A second signal cuts the drain short.
        stopper.drain_then_stop(wait_for_signal()).await;
    });
    match app.run_until_stopped().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("handoff: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
