//! The `keygate` command: run the gateway, check a configuration, mint a development token.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keygate::app::Configured;
use keygate::config::ProcessEnv;

/// With the `mimalloc` feature (the default): Pingora's worker threads allocate small, short-lived
/// buffers per request, which mimalloc's per-thread free lists serve with less work than the C
/// library's allocator (measured in the README's Load ladder section).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Manage the key vault.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
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

#[derive(Subcommand)]
enum KeysAction {
    /// Re-encrypt every stored key under the active API_KEY_ENCRYPTION_SECRET (safe while
    /// keygate serves; keep the old secret in API_KEY_ENCRYPTION_SECRET_PREVIOUS until done).
    Rotate,
    /// Import the keys users stored in the Node Twenty MCP server.
    Import {
        /// JSON export of the Node server's records (user id -> record, or a list of users).
        #[arg(long)]
        file: PathBuf,
        /// Environment variable holding the Node server's API_KEY_ENCRYPTION_SECRET.
        #[arg(long, default_value = "API_KEY_ENCRYPTION_SECRET")]
        node_secret_env: String,
    },
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn keys_command(configured: &Configured, action: KeysAction) -> anyhow::Result<bool> {
    keygate::telemetry::init(&configured.settings.log);
    let rt = runtime()?;
    let vault = keygate::app::build_vault(configured, None)?
        .ok_or_else(|| anyhow::anyhow!("the key vault is disabled (keys.enabled = false)"))?;
    match action {
        KeysAction::Rotate => {
            let report = rt.block_on(vault.rotate())?;
            tracing::info!(
                target: "keygate::audit",
                event = "keys_rotated",
                rotated = report.rotated,
                failed = report.failed.len(),
            );
            println!(
                "rotated {}, already current {}, changed meanwhile {}, failed {}",
                report.rotated,
                report.already_current,
                report.changed_meanwhile,
                report.failed.len()
            );
            for (owner, reason) in &report.failed {
                eprintln!("keygate: {owner}: {reason}");
            }
            Ok(report.failed.is_empty())
        }
        KeysAction::Import {
            file,
            node_secret_env,
        } => {
            let secret = std::env::var(&node_secret_env)
                .map_err(|_| anyhow::anyhow!("{node_secret_env} is not set"))?;
            let raw = std::fs::read(&file)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
            let report = keygate::keys::import::read_node_export(&raw, &secret)?;
            let mut imported = 0usize;
            let mut failed = report.problems.len();
            for problem in &report.problems {
                eprintln!("keygate: {}: {}", problem.entry, problem.reason);
            }
            for record in report.records {
                let owner = keygate::keys::store::Owner::user(record.user_id.clone());
                let key = secrecy::SecretString::from(record.api_key.to_string());
                match rt.block_on(vault.put(&owner, &key, record.base_url, record.updated_at)) {
                    Ok(()) => imported += 1,
                    Err(e) => {
                        failed += 1;
                        eprintln!("keygate: {}: {e}", record.user_id);
                    }
                }
            }
            tracing::info!(target: "keygate::audit", event = "keys_imported", imported, failed);
            println!("imported {imported}, failed {failed}");
            Ok(failed == 0)
        }
    }
}

/// Print a command's failure after every pending log line.
fn report(e: &anyhow::Error) {
    keygate::telemetry::batch::flush();
    eprintln!("keygate: {e:#}");
}

fn main() -> ExitCode {
    if let Err(e) = keygate::memory::keep_small_pages() {
        eprintln!(
            "keygate: could not opt out of transparent huge pages ({e}); memory use may be higher"
        );
    }
    let code = run_cli();
    keygate::telemetry::batch::flush();
    code
}

fn run_cli() -> ExitCode {
    let cli = Cli::parse();
    let configured = match keygate::app::configure(cli.config.as_deref(), &ProcessEnv) {
        Ok(c) => c,
        Err(problems) => {
            eprint!("keygate: {problems}");
            if cli.config.is_none() {
                eprintln!(
                    "keygate: no configuration file was given: pass --config <file> or set \
                     KEYGATE_CONFIG (config/dev.toml runs offline; config/keygate.example.toml \
                     documents every option)"
                );
            }
            return ExitCode::from(2);
        }
    };
    keygate::memory::release_startup_memory();
    let settings = &configured.settings;
    match cli.command.unwrap_or(Command::Run) {
        Command::Keys { action } => match keys_command(&configured, action) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                report(&e);
                ExitCode::FAILURE
            }
        },
        Command::CheckConfig => {
            for warning in settings.server.tls.iter().flat_map(|t| &t.warnings) {
                eprintln!("keygate: warning: {warning}");
            }
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
            match keygate::devtoken::mint(settings, &req) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    report(&e);
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run => {
            keygate::telemetry::init(&settings.log);
            if let Err(e) = keygate::app::run(configured) {
                report(&e);
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
    }
}
