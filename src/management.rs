//! RabbitMQ's management HTTP API: the only HTTP client code. Vigil uses it for one thing,
//! putting the policies that carry the shared queues' tunables (see
//! [`crate::topology::Tunables`]), so that changing a TTL or a length limit in
//! `exchanges.toml` changes the live queue instead of failing every later declare.
//!
//! Every request is bounded (connect and whole-request timeouts), and the URL's credentials
//! never appear in an error.

use std::time::Duration;

use crate::topology::PolicySpec;

#[derive(Debug, thiserror::Error)]
pub enum ManagementError {
    #[error("management URL {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("management API {url}: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("management API {url} answered {status}: {body}")]
    Refused {
        url: String,
        status: u16,
        body: String,
    },
}

/// A client of a cluster's management API (one or several nodes), for one virtual host.
#[derive(Clone)]
pub struct Management {
    client: reqwest::Client,
    /// Each node's API root: `scheme://host:port`, without credentials.
    bases: Vec<String>,
    user: String,
    password: String,
    vhost: String,
}

/// The longest one management request may take, connection included.
const REQUEST_LIMIT: Duration = Duration::from_secs(10);

impl Management {
    /// `urls` is `http://user:pass@host:15672`, or several such URLs separated by commas (a
    /// cluster's nodes, tried in turn; the credentials are the first URL's); `vhost` is the
    /// AMQP URL's virtual host.
    pub fn new(urls: &str, vhost: &str) -> Result<Self, ManagementError> {
        let mut bases = Vec::new();
        let mut credentials = None;
        for url in crate::broker::broker_urls(urls) {
            let bad = |reason: &str| ManagementError::Url {
                url: crate::broker::redact_url(url),
                reason: reason.into(),
            };
            let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
            if parsed.scheme() != "http" && parsed.scheme() != "https" {
                return Err(bad("expected http://user:pass@host:15672"));
            }
            let host = parsed.host_str().ok_or_else(|| bad("no host"))?;
            let port = parsed.port_or_known_default().unwrap_or(15672);
            bases.push(format!("{}://{host}:{port}", parsed.scheme()));
            if credentials.is_none() {
                let decode = |s: &str| {
                    url::form_urlencoded::parse(format!("x={s}").as_bytes())
                        .next()
                        .map(|(_, v)| v.into_owned())
                        .unwrap_or_default()
                };
                credentials = Some((
                    decode(parsed.username()),
                    decode(parsed.password().unwrap_or("")),
                ));
            }
        }
        let Some((user, password)) = credentials else {
            return Err(ManagementError::Url {
                url: String::new(),
                reason: "no management URL".into(),
            });
        };
        crate::telemetry::install_crypto_provider();
        let client = reqwest::Client::builder()
            .connect_timeout(REQUEST_LIMIT)
            .timeout(REQUEST_LIMIT)
            .build()
            .map_err(|e| ManagementError::Url {
                url: String::new(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            client,
            bases,
            user,
            password,
            vhost: vhost.to_owned(),
        })
    }

    /// The virtual host as a path segment (`/` is `%2F`).
    fn vhost_segment(&self) -> String {
        url::form_urlencoded::byte_serialize(self.vhost.as_bytes()).collect()
    }

    /// Put each policy (create or replace: idempotent).
    pub async fn put_policies(&self, policies: &[PolicySpec]) -> Result<(), ManagementError> {
        for p in policies {
            let name: String = url::form_urlencoded::byte_serialize(p.name.as_bytes()).collect();
            let path = format!("policies/{}/{name}", self.vhost_segment());
            let body = serde_json::json!({
                "pattern": p.pattern,
                "definition": p.definition,
                "apply-to": "queues",
                // Above an operator's catch-all policies, below any they aim at one queue.
                "priority": 10,
            });
            self.send(&path, |c, url| c.put(url).json(&body)).await?;
        }
        Ok(())
    }

    /// Delete policies by name; a missing one is not an error.
    pub async fn delete_policies(&self, names: &[String]) -> Result<(), ManagementError> {
        for n in names {
            let name: String = url::form_urlencoded::byte_serialize(n.as_bytes()).collect();
            let path = format!("policies/{}/{name}", self.vhost_segment());
            match self.send(&path, |c, url| c.delete(url)).await {
                Ok(_) | Err(ManagementError::Refused { status: 404, .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A queue as the management API shows it (`arguments`, `policy`,
    /// `effective_policy_definition`, ...).
    pub async fn queue(&self, name: &str) -> Result<serde_json::Value, ManagementError> {
        let name: String = url::form_urlencoded::byte_serialize(name.as_bytes()).collect();
        let path = format!("queues/{}/{name}", self.vhost_segment());
        let body = self.send(&path, |c, url| c.get(url)).await?;
        serde_json::from_str(&body).map_err(|e| ManagementError::Refused {
            url: path,
            status: 200,
            body: format!("not JSON: {e}"),
        })
    }

    /// Send `/api/<path>` to the first node that answers: a node that cannot be reached is
    /// skipped, an answer (of any status) is final.
    async fn send(
        &self,
        path: &str,
        request: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<String, ManagementError> {
        let mut unreachable = None;
        for base in &self.bases {
            let url = format!("{base}/api/{path}");
            let http = |source| ManagementError::Http {
                url: url.clone(),
                source,
            };
            let response = match request(&self.client, &url)
                .basic_auth(&self.user, Some(&self.password))
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) if e.is_connect() || e.is_timeout() => {
                    tracing::warn!(error = %e, "management API node unreachable; trying the next");
                    unreachable = Some(http(e));
                    continue;
                }
                Err(e) => return Err(http(e)),
            };
            let status = response.status();
            let body = response.text().await.map_err(http)?;
            return if status.is_success() {
                Ok(body)
            } else {
                Err(ManagementError::Refused {
                    url,
                    status: status.as_u16(),
                    body: body.chars().take(300).collect(),
                })
            };
        }
        Err(unreachable.expect("at least one node was tried"))
    }
}
