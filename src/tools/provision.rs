//! `vigil broker provision`: one RabbitMQ user per role, with the least permissions of
//! [`crate::roles::grant`], made through `rabbitmqctl` on the broker's host.
//!
//! Each user gets a fresh random password (256 bits, URL-safe), printed once with the URL the
//! role connects with. Running it again rotates the passwords. Passwords reach `rabbitmqctl` on
//! its standard input, never as arguments. Run this on the broker's host as the operator who
//! owns the node (it needs the node's Erlang cookie).

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::roles::{self, Grant, Role};

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
    /// The broker URL whose scheme, host, port, vhost and query each role's URL keeps.
    pub base_url: String,
    /// Longest one `rabbitmqctl` call may take.
    pub timeout: Duration,
}

/// One role's user, as provisioned.
#[derive(Debug, Clone, Serialize)]
pub struct Provisioned {
    pub role: Role,
    pub user: String,
    /// Fresh; shown once.
    pub password: String,
    /// `VIGIL_AMQP_URL` for the role's processes.
    pub url: String,
    /// True when the user was new, false when its password was rotated.
    pub created: bool,
    pub permissions: Grant,
}

/// Create (or rotate) the four role users and set their permissions.
pub async fn provision(opts: &ProvisionOptions) -> Result<Vec<Provisioned>, ProvisionError> {
    let existing = ctl(opts, &["list_users", "--silent"]).await?;
    let known: Vec<&str> = existing
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let mut out = Vec::new();
    for role in Role::ALL {
        let user = roles::user_of(&opts.namespace, role);
        let password = crate::directory::generate_token();
        let created = !known.contains(&user.as_str());
        if created {
            ctl_with_input(opts, &["add_user", &user], &password).await?;
        } else {
            ctl_with_input(opts, &["change_password", &user], &password).await?;
        }
        // No management tags: these users speak AMQP only.
        ctl(opts, &["set_user_tags", &user]).await?;
        let grant = roles::grant(&opts.namespace, role);
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
        out.push(Provisioned {
            role,
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
}
