//! `vigil broker`: a first administrator for a fresh broker (`bootstrap`), and the users of
//! each role with their least permissions (`provision`, through `rabbitmqctl` or the
//! management API).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;

use super::topology::apply_topology;
use super::{CliError, fail, parse_owner, print_report};
use crate::config::Config;

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

pub(super) async fn broker_users(cfg: &Config, action: BrokerCmd) -> Result<(), CliError> {
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
