//! The `keygate` command: run the gateway, check a configuration, mint a development token.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keygate::config::{self, ProcessEnv};

#[derive(Parser)]
#[command(
    name = "keygate",
    version,
    about = "OAuth 2.1 gateway for MCP servers and HTTP APIs"
)]
struct Cli {
    /// Configuration file (TOML); environment variables override it.
    #[arg(long, short, env = "KEYGATE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the configuration and report every problem at once.
    CheckConfig,
    /// Print an access token signed with the [dev] key (offline development only).
    DevToken {
        /// The token's subject (user id).
        #[arg(long, default_value = "user_dev")]
        sub: String,
        /// Space-separated scopes.
        #[arg(long, default_value = "")]
        scope: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
        /// Organisation id to put in the `o` claim.
        #[arg(long)]
        org: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match config::load(cli.config.as_deref(), &ProcessEnv) {
        Ok(s) => s,
        Err(problems) => {
            eprint!("keygate: {problems}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            println!(
                "configuration ok: listen {} -> upstream {}, admin {}, auth {}",
                settings.server.listen,
                settings.upstream.url,
                settings.server.admin_listen,
                if settings.auth.enabled { "on" } else { "off" }
            );
            ExitCode::SUCCESS
        }
        Command::DevToken {
            sub,
            scope,
            ttl_secs,
            org,
        } => {
            let req = keygate::devtoken::DevTokenRequest {
                subject: sub,
                scopes: scope.split_whitespace().map(str::to_string).collect(),
                ttl_secs,
                org,
            };
            match keygate::devtoken::mint(&settings, &req) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("keygate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run => {
            keygate::telemetry::init(&settings.log);
            if let Err(e) = keygate::app::run(settings) {
                eprintln!("keygate: {e:#}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
    }
}
