//! `vigil broker provision`: one RabbitMQ user per role and one per edge
//! ([`crate::roles::principals`]), with the least permissions of [`crate::roles::grant`] and
//! [`crate::roles::edge_grant`] (and an edge's topic permission on the replies exchange), made
//! through `rabbitmqctl` on the broker's host.
//!
//! Each user gets a fresh random password (256 bits, URL-safe), printed once with the URL the
//! role connects with. Running it again rotates the passwords. Passwords reach `rabbitmqctl` on
//! its standard input, never as arguments. Run this on the broker's host as the operator who
//! owns the node (it needs the node's Erlang cookie).

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::roles::{self, Grant, Role, TopicGrant};

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("rabbitmqctl {command} did not finish within {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("rabbitmqctl {command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("the broker URL `{0}` cannot carry credentials")]
    Url(String),
}

/// Where and what to provision.
#[derive(Debug, Clone)]
pub struct ProvisionOptions {
    /// The `rabbitmqctl` to run.
    pub rabbitmqctl: PathBuf,
    /// The node (`rabbit@host`); `rabbitmqctl`'s default when unset.
    pub node: Option<String>,
    /// The virtual host the roles get permissions on.
    pub vhost: String,
    pub namespace: String,
    /// The users to make ([`roles::principals`]: the roles, and each edge).
    pub principals: Vec<roles::Principal>,
    /// The broker URL whose scheme, host, port, vhost and query each role's URL keeps.
    pub base_url: String,
    /// Longest one `rabbitmqctl` call may take.
    pub timeout: Duration,
}

/// One role's user, as provisioned.
#[derive(Debug, Clone, Serialize)]
pub struct Provisioned {
    pub role: Role,
    /// For an edge's user: the edge id it runs as (`VIGIL_EDGE_ID`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edge: Option<String>,
    pub user: String,
    /// Fresh; shown once (empty once written to a file: see [`Provisioned::redacted`]).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub password: String,
    /// `VIGIL_AMQP_URL` for the role's processes.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub url: String,
    /// Where the URL was written instead of shown (`--out`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url_file: Option<PathBuf>,
    /// True when the user was new, false when its password was rotated.
    pub created: bool,
    pub permissions: Grant,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic_permissions: Option<TopicGrant>,
}

impl Provisioned {
    /// The report once the URL is in `file`: no password nor URL shown.
    pub fn redacted(mut self, file: PathBuf) -> Self {
        self.password.clear();
        self.url.clear();
        self.url_file = Some(file);
        self
    }
}

/// Create (or rotate) the role and edge users and set their permissions.
pub async fn provision(opts: &ProvisionOptions) -> Result<Vec<Provisioned>, ProvisionError> {
    let existing = ctl(opts, &["list_users", "--silent"]).await?;
    let known: Vec<&str> = existing
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let mut out = Vec::new();
    for principal in opts.principals.iter().cloned() {
        let user = principal.user(&opts.namespace);
        let password = crate::directory::generate_token();
        let created = !known.contains(&user.as_str());
        if created {
            ctl_with_input(opts, &["add_user", &user], &password).await?;
        } else {
            ctl_with_input(opts, &["change_password", &user], &password).await?;
        }
        // No management tags: these users speak AMQP only.
        ctl(opts, &["set_user_tags", &user]).await?;
        let grant = principal.grant(&opts.namespace);
        ctl(
            opts,
            &[
                "set_permissions",
                "-p",
                &opts.vhost,
                &user,
                &grant.configure,
                &grant.write,
                &grant.read,
            ],
        )
        .await?;
        let topic = principal.topic_grant(&opts.namespace);
        if let Some(t) = &topic {
            ctl(
                opts,
                &[
                    "set_topic_permissions",
                    "-p",
                    &opts.vhost,
                    &user,
                    &t.exchange,
                    &t.write,
                    &t.read,
                ],
            )
            .await?;
        }
        out.push(Provisioned {
            role: principal.role,
            edge: principal.edge,
            // Every node of a cluster, each with this role's credentials.
            url: crate::broker::broker_urls(&opts.base_url)
                .into_iter()
                .map(|u| with_credentials(u, &user, &password))
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
            user,
            password,
            created,
            permissions: grant,
            topic_permissions: topic,
            url_file: None,
        });
    }
    Ok(out)
}

/// `url` with its user and password replaced.
pub fn with_credentials(url: &str, user: &str, password: &str) -> Result<String, ProvisionError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| ProvisionError::Url(crate::broker::redact_url(url)))?;
    // The authority ends at the first `/` or `?`; credentials end at its last `@`.
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.is_empty() {
        return Err(ProvisionError::Url(crate::broker::redact_url(url)));
    }
    Ok(format!("{scheme}://{user}:{password}@{host}{tail}"))
}

/// Run `rabbitmqctl [-n NODE] ARGS...`, bounded; its standard output.
async fn ctl(opts: &ProvisionOptions, args: &[&str]) -> Result<String, ProvisionError> {
    run_ctl(opts, args, None).await
}

/// As [`ctl`], with `secret` written to the command's standard input. `add_user` and
/// `change_password` read the password from there when it is not an argument: it never shows
/// in the process list, and a password that starts with `-` is not taken for an option.
async fn ctl_with_input(
    opts: &ProvisionOptions,
    args: &[&str],
    secret: &str,
) -> Result<String, ProvisionError> {
    run_ctl(opts, args, Some(secret)).await
}

async fn run_ctl(
    opts: &ProvisionOptions,
    args: &[&str],
    input: Option<&str>,
) -> Result<String, ProvisionError> {
    use std::process::Stdio;
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(&opts.rabbitmqctl);
    if let Some(node) = &opts.node {
        cmd.args(["-n", node]);
    }
    cmd.args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Never echo a password into an error.
    let command = args.first().copied().unwrap_or_default().to_owned();
    let run = async {
        let mut child = cmd.spawn()?;
        if let (Some(secret), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(secret.as_bytes()).await?;
            stdin.write_all(b"\n").await?;
            // Dropping stdin closes it, so the command sees the end of its input.
        }
        child.wait_with_output().await
    };
    let output = tokio::time::timeout(opts.timeout, run)
        .await
        .map_err(|_| ProvisionError::Timeout {
            command: command.clone(),
            after: opts.timeout,
        })?
        .map_err(|source| ProvisionError::Spawn {
            program: opts.rabbitmqctl.display().to_string(),
            source,
        })?;
    if !output.status.success() {
        return Err(ProvisionError::Failed {
            command,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Write each user's URL to `OUT/<user>/amqp.url` (0600, handed to `owner`): one folder per
/// user, so that a deployment gives each service only its own (a volume or Secret per folder).
/// The folders must exist or are made 0700.
pub fn write_urls(
    out: &std::path::Path,
    users: &[Provisioned],
    owner: Option<(u32, u32)>,
) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for u in users {
        let path = url_file(out, &u.user);
        let dir = path.parent().expect("a file in a folder");
        if !dir.exists() {
            crate::directory::private_dir(dir)?;
            // Its reader must get in: the folder is theirs too.
            chown(dir, owner)?;
        }
        crate::tools::certs::write_owned(&path, format!("{}\n", u.url).as_bytes(), 0o600, owner)?;
        written.push(path);
    }
    Ok(written)
}

/// Where [`write_urls`] puts `user`'s URL.
pub fn url_file(out: &std::path::Path, user: &str) -> PathBuf {
    out.join(user).join("amqp.url")
}

fn chown(path: &std::path::Path, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    #[cfg(unix)]
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    }
    #[cfg(not(unix))]
    let _ = (path, owner);
    Ok(())
}

/// What `vigil broker bootstrap` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Bootstrap {
    pub user: String,
    /// The RabbitMQ configuration fragment that makes the user at the node's first boot.
    pub conf: PathBuf,
    /// `VIGIL_AMQP_URL_FILE` for `vigil broker provision`.
    pub amqp_url: PathBuf,
    /// `VIGIL_BROKER_MANAGEMENT_URL_FILE` for `vigil broker provision`.
    pub management_url: PathBuf,
    /// For a database too: `POSTGRES_PASSWORD_FILE` and `VIGIL_DIRECTORY_URL_FILE`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres_password: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub directory_url: Option<PathBuf>,
}

/// Where and for whom `vigil broker bootstrap` writes.
#[derive(Debug, Clone)]
pub struct BootstrapOptions {
    pub out: PathBuf,
    /// The broker nodes' host names.
    pub hosts: Vec<String>,
    pub amqp_port: u16,
    pub management_port: u16,
    /// The administrator's name.
    pub user: String,
    /// Owner of the RabbitMQ fragment (RabbitMQ's user), and of the URLs.
    pub broker_owner: Option<(u32, u32)>,
    pub owner: Option<(u32, u32)>,
    /// A PostgreSQL URL without a password (`postgres://vigil@postgres:5432/vigil`): a
    /// password is made for it too.
    pub postgres: Option<String>,
    pub postgres_owner: Option<(u32, u32)>,
    /// The broker nodes' home folders (their data volumes): one random Erlang cookie, the
    /// nodes' shared secret, goes to `.erlang.cookie` in each (0400, with the folder handed
    /// to `broker_owner`).
    pub cookie_dirs: Vec<PathBuf>,
}

/// A first administrator for a broker that has none yet, with a fresh random password (and a
/// database password): `OUT/rabbitmq/10-vigil-bootstrap.conf` for the nodes' `conf.d` (RabbitMQ
/// makes the user at its first boot, and ignores the file once it has users),
/// `OUT/admin/amqp.url` and `OUT/admin/management.url` for `vigil broker provision`, and with
/// `postgres`, `OUT/postgres/password` and `OUT/directory/url`. Every file is 0600. With
/// `if_missing`, a complete set already there is kept (`None`).
pub fn bootstrap(opts: &BootstrapOptions, if_missing: bool) -> std::io::Result<Option<Bootstrap>> {
    let out = &opts.out;
    let conf = out.join("rabbitmq").join("10-vigil-bootstrap.conf");
    let amqp_url = out.join("admin").join("amqp.url");
    let management_url = out.join("admin").join("management.url");
    let pg = opts.postgres.as_ref().map(|_| {
        (
            out.join("postgres").join("password"),
            out.join("directory").join("url"),
        )
    });
    let mut all = vec![conf.clone(), amqp_url.clone(), management_url.clone()];
    if let Some((a, b)) = &pg {
        all.extend([a.clone(), b.clone()]);
    }
    let cookies: Vec<PathBuf> = opts
        .cookie_dirs
        .iter()
        .map(|d| d.join(".erlang.cookie"))
        .collect();
    all.extend(cookies.iter().cloned());
    if if_missing && all.iter().all(|p| p.exists()) {
        return Ok(None);
    }
    // Half a set: a fresh password would not be the one the broker (or database) was first
    // started with, so nothing is made up.
    let present: Vec<&PathBuf> = all.iter().filter(|p| p.exists()).collect();
    if if_missing && !present.is_empty() {
        return Err(std::io::Error::other(format!(
            "only some of the bootstrap files exist ({} of {}; {} is there): restore the \
             missing ones, or remove them all (and the broker's and database's data) to start \
             over",
            present.len(),
            all.len(),
            present[0].display()
        )));
    }
    if opts.hosts.is_empty()
        || opts
            .hosts
            .iter()
            .any(|h| h.is_empty() || h.contains(['/', '@', ':', ',']))
    {
        return Err(std::io::Error::other(
            "give each broker node's host name with --host",
        ));
    }
    crate::topology::check_identifier("the administrator's name", &opts.user)
        .map_err(std::io::Error::other)?;
    for p in &all {
        let dir = p.parent().expect("a file in a folder");
        if !dir.exists() {
            crate::directory::private_dir(dir)?;
        }
    }
    let cookie = crate::directory::generate_token();
    for path in &cookies {
        if path.exists() {
            // Read-only to its owner: replaced, not written through.
            std::fs::remove_file(path)?;
        }
        crate::tools::certs::write_owned(path, cookie.as_bytes(), 0o400, opts.broker_owner)?;
        chown(
            path.parent().expect("a file in a folder"),
            opts.broker_owner,
        )?;
    }
    // URL-safe: it goes into URLs and a configuration file as it is.
    let password = crate::directory::generate_token();
    let user = &opts.user;
    let fragment = format!(
        "# Made by `vigil broker bootstrap`: the first administrator, created at the node's first\n\
         # boot (a node with users already ignores it). `vigil broker provision` makes the\n\
         # services' users with it.\n\
         default_user = {user}\n\
         default_pass = {password}\n\
         default_user_tags.administrator = true\n\
         default_permissions.configure = .*\n\
         default_permissions.read = .*\n\
         default_permissions.write = .*\n\
         # guest only from the node itself (RabbitMQ's default, which the image's own conf.d\n\
         # lifts).\n\
         loopback_users.guest = true\n\
         log.console = true\n"
    );
    crate::tools::certs::write_owned(&conf, fragment.as_bytes(), 0o600, opts.broker_owner)?;
    let amqp = opts
        .hosts
        .iter()
        .map(|h| {
            format!(
                "amqp://{user}:{password}@{h}:{}/%2f?connection_timeout=5000",
                opts.amqp_port
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    let management = opts
        .hosts
        .iter()
        .map(|h| format!("http://{user}:{password}@{h}:{}", opts.management_port))
        .collect::<Vec<_>>()
        .join(",");
    for (path, text) in [(&amqp_url, amqp), (&management_url, management)] {
        crate::tools::certs::write_owned(path, format!("{text}\n").as_bytes(), 0o600, opts.owner)?;
    }
    if let (Some(base), Some((password_file, url_file))) = (&opts.postgres, &pg) {
        let db_password = crate::directory::generate_token();
        let url = postgres_with_password(base, &db_password)?;
        crate::tools::certs::write_owned(
            password_file,
            format!("{db_password}\n").as_bytes(),
            0o600,
            opts.postgres_owner,
        )?;
        crate::tools::certs::write_owned(
            url_file,
            format!("{url}\n").as_bytes(),
            0o600,
            opts.owner,
        )?;
    }
    Ok(Some(Bootstrap {
        user: user.clone(),
        conf,
        amqp_url,
        management_url,
        postgres_password: pg.as_ref().map(|(p, _)| p.clone()),
        directory_url: pg.map(|(_, u)| u),
    }))
}

/// `postgres://user@host/db` with `password` put in as the user's.
fn postgres_with_password(base: &str, password: &str) -> std::io::Result<String> {
    let mut url = url::Url::parse(base)
        .map_err(|e| std::io::Error::other(format!("--postgres `{base}`: {e}")))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") || url.username().is_empty() {
        return Err(std::io::Error::other(format!(
            "--postgres `{base}` must be postgres://USER@HOST/DB"
        )));
    }
    url.set_password(Some(password))
        .map_err(|()| std::io::Error::other("--postgres: cannot carry a password"))?;
    Ok(url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_replace_the_urls_own() {
        let cases = [
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "amqp://u:p@127.0.0.1:5672/%2f",
            ),
            ("amqp://rabbit", "amqp://u:p@rabbit"),
            (
                "amqps://a:b@h:5671/v?cacertfile=/x@y.pem",
                "amqps://u:p@h:5671/v?cacertfile=/x@y.pem",
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(with_credentials(url, "u", "p").unwrap(), expected);
        }
        assert!(with_credentials("rabbit:5672", "u", "p").is_err());
        assert!(with_credentials("amqp://u@/", "u", "p").is_err());
    }

    #[test]
    fn bootstrap_writes_private_files_once() {
        use std::os::unix::fs::PermissionsExt as _;
        let out =
            std::env::temp_dir().join(format!("vigil-bootstrap-{:016x}", rand::random::<u64>()));
        let opts = BootstrapOptions {
            out: out.clone(),
            hosts: vec!["rabbitmq".into(), "rabbitmq-2".into()],
            amqp_port: 5672,
            management_port: 15672,
            user: "vigil-bootstrap".into(),
            broker_owner: None,
            owner: None,
            postgres: Some("postgres://vigil@postgres:5432/vigil".into()),
            postgres_owner: None,
            cookie_dirs: vec![out.join("node-1"), out.join("node-2")],
        };
        let made = bootstrap(&opts, true).unwrap().expect("a first set");
        let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
        let conf = read(&made.conf);
        let password = conf
            .lines()
            .find_map(|l| l.strip_prefix("default_pass = "))
            .unwrap()
            .to_owned();
        assert!(password.len() >= 40, "{password}");
        assert!(conf.contains("default_user = vigil-bootstrap"), "{conf}");
        assert_eq!(
            read(&made.management_url).trim(),
            format!(
                "http://vigil-bootstrap:{password}@rabbitmq:15672,http://vigil-bootstrap:{password}@rabbitmq-2:15672"
            )
        );
        assert!(read(&made.amqp_url).contains(&format!(
            "amqp://vigil-bootstrap:{password}@rabbitmq-2:5672/%2f"
        )));
        let db = read(made.postgres_password.as_ref().unwrap());
        assert_eq!(
            read(made.directory_url.as_ref().unwrap()).trim(),
            format!("postgres://vigil:{}@postgres:5432/vigil", db.trim())
        );
        for p in [&made.conf, &made.amqp_url, &made.management_url] {
            assert_eq!(
                std::fs::metadata(p).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        // Kept on a second start; half a set is refused; replaced when asked.
        assert!(bootstrap(&opts, true).unwrap().is_none());
        std::fs::remove_file(&made.management_url).unwrap();
        assert!(bootstrap(&opts, true).is_err());
        assert_eq!(read(&made.conf), conf);
        bootstrap(&opts, false).unwrap().unwrap();
        assert_ne!(read(&made.conf), conf);
        // Hosts that would bend the URLs are refused.
        let bad = BootstrapOptions {
            hosts: vec!["x@y".into()],
            ..opts.clone()
        };
        assert!(bootstrap(&bad, false).is_err());
        std::fs::remove_dir_all(&out).unwrap();
    }
}
