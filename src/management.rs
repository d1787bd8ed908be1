//! RabbitMQ's management HTTP API: the only HTTP client code. Vigil uses it for two things:
//! putting the policies that carry the shared queues' tunables (see
//! [`crate::topology::Tunables`]), so that changing a TTL or a length limit in
//! `exchanges.toml` changes the live queue instead of failing every later declare; and
//! provisioning the role users of [`crate::roles`] where `rabbitmqctl` cannot be run (a hosted
//! broker), see [`Management::provision_roles`].
//!
//! Every request is bounded (connect and whole-request timeouts), and the URL's credentials
//! never appear in an error; an error names the request (method and URL) and, when the API
//! answered, its HTTP status. `https://` URLs are verified with rustls against the system's
//! roots and, optionally, a private CA's PEM file ([`Management::with_ca_file`]).

use std::path::Path;
use std::time::Duration;

use reqwest::Method;

use crate::roles::{self, Grant, Role};
use crate::topology::PolicySpec;

#[derive(Debug, thiserror::Error)]
pub enum ManagementError {
    #[error("management URL {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("management CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("management API {method} {url}: {source}")]
    Http {
        method: Method,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("management API {method} {url} answered {status}: {body}")]
    Refused {
        method: Method,
        url: String,
        status: u16,
        body: String,
    },
}

/// One role's user as [`Management::provision_roles`] left it.
#[derive(Debug, Clone)]
pub struct RoleUser {
    pub role: Role,
    /// For an edge's user: its edge id.
    pub edge: Option<String>,
    pub user: String,
    /// Fresh; the caller shows it once.
    pub password: String,
    /// True when the user was new, false when its password was rotated.
    pub created: bool,
    pub permissions: Grant,
    pub topic_permissions: Option<roles::TopicGrant>,
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
        Self::with_ca_file(urls, vhost, None)
    }

    /// As [`Management::new`], trusting for `https://` URLs the PEM certificates of `ca_file`
    /// (a private CA) besides the system's roots.
    pub fn with_ca_file(
        urls: &str,
        vhost: &str,
        ca_file: Option<&Path>,
    ) -> Result<Self, ManagementError> {
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
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_config(ca_file)?)
            .connect_timeout(REQUEST_LIMIT)
            .timeout(REQUEST_LIMIT)
            // Credentials go with every request: never to wherever a redirect points.
            .redirect(reqwest::redirect::Policy::none())
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
        segment(&self.vhost)
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
            self.send(Method::PUT, &path, Some(&body)).await?;
        }
        Ok(())
    }

    /// Delete policies by name; a missing one is not an error.
    pub async fn delete_policies(&self, names: &[String]) -> Result<(), ManagementError> {
        for n in names {
            let name: String = url::form_urlencoded::byte_serialize(n.as_bytes()).collect();
            let path = format!("policies/{}/{name}", self.vhost_segment());
            match self.send(Method::DELETE, &path, None).await {
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
        self.get_json(&path).await
    }

    /// Create (or rotate) the user of each of `principals` in `namespace`
    /// ([`roles::principals`]) with a fresh random password and no tags (the users speak AMQP
    /// only), and set its permissions on the virtual host (and an edge's topic permission on
    /// the replies exchange): what `rabbitmqctl` does in `vigil broker provision`. Needs an
    /// `administrator` user in the URL.
    pub async fn provision_roles(
        &self,
        namespace: &str,
        principals: &[roles::Principal],
    ) -> Result<Vec<RoleUser>, ManagementError> {
        let mut out = Vec::new();
        for principal in principals.iter().cloned() {
            let user = principal.user(namespace);
            let password = crate::directory::generate_token();
            let created = !self.user_exists(&user).await?;
            self.put_user(&user, &password, &[]).await?;
            let grant = principal.grant(namespace);
            self.put_permissions(&user, &grant).await?;
            let topic = principal.topic_grant(namespace);
            if let Some(t) = &topic {
                self.put_topic_permissions(&user, t).await?;
            }
            out.push(RoleUser {
                role: principal.role,
                edge: principal.edge,
                user,
                password,
                created,
                permissions: grant,
                topic_permissions: topic,
            });
        }
        Ok(out)
    }

    /// Set `user`'s topic permissions on one exchange of the virtual host.
    pub async fn put_topic_permissions(
        &self,
        user: &str,
        grant: &roles::TopicGrant,
    ) -> Result<(), ManagementError> {
        let path = format!(
            "topic-permissions/{}/{}",
            self.vhost_segment(),
            segment(user)
        );
        let body = serde_json::json!({
            "exchange": grant.exchange,
            "write": grant.write,
            "read": grant.read,
        });
        self.send(Method::PUT, &path, Some(&body)).await.map(drop)
    }

    /// Whether `user` exists.
    pub async fn user_exists(&self, user: &str) -> Result<bool, ManagementError> {
        match self
            .send(Method::GET, &format!("users/{}", segment(user)), None)
            .await
        {
            Ok(_) => Ok(true),
            Err(ManagementError::Refused { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// A user as the management API shows it (`name`, `tags`, ...).
    pub async fn user(&self, user: &str) -> Result<serde_json::Value, ManagementError> {
        self.get_json(&format!("users/{}", segment(user))).await
    }

    /// Create `user`, or replace its password and tags.
    pub async fn put_user(
        &self,
        user: &str,
        password: &str,
        tags: &[&str],
    ) -> Result<(), ManagementError> {
        let body = serde_json::json!({ "password": password, "tags": tags.join(",") });
        self.send(
            Method::PUT,
            &format!("users/{}", segment(user)),
            Some(&body),
        )
        .await
        .map(drop)
    }

    /// Delete users; a missing one is not an error.
    pub async fn delete_users(&self, users: &[String]) -> Result<(), ManagementError> {
        for u in users {
            match self
                .send(Method::DELETE, &format!("users/{}", segment(u)), None)
                .await
            {
                Ok(_) | Err(ManagementError::Refused { status: 404, .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Set `user`'s permissions on the virtual host.
    pub async fn put_permissions(&self, user: &str, grant: &Grant) -> Result<(), ManagementError> {
        let path = format!("permissions/{}/{}", self.vhost_segment(), segment(user));
        let body = serde_json::json!({
            "configure": grant.configure,
            "write": grant.write,
            "read": grant.read,
        });
        self.send(Method::PUT, &path, Some(&body)).await.map(drop)
    }

    /// `user`'s permissions on the virtual host, as the broker holds them.
    pub async fn permissions(&self, user: &str) -> Result<Grant, ManagementError> {
        let path = format!("permissions/{}/{}", self.vhost_segment(), segment(user));
        let v = self.get_json(&path).await?;
        let field = |name: &str| v[name].as_str().unwrap_or_default().to_owned();
        Ok(Grant {
            configure: field("configure"),
            write: field("write"),
            read: field("read"),
        })
    }

    /// `user`'s topic permissions on the virtual host, one per exchange (none: an empty list).
    pub async fn topic_permissions(
        &self,
        user: &str,
    ) -> Result<Vec<roles::TopicGrant>, ManagementError> {
        let path = format!("users/{}/topic-permissions", segment(user));
        let v = match self.get_json(&path).await {
            Ok(v) => v,
            Err(ManagementError::Refused { status: 404, .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let vhost = self.vhost.clone();
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["vhost"].as_str() == Some(vhost.as_str()))
            .map(|t| {
                let field = |name: &str| t[name].as_str().unwrap_or_default().to_owned();
                roles::TopicGrant {
                    exchange: field("exchange"),
                    write: field("write"),
                    read: field("read"),
                }
            })
            .collect())
    }

    /// `GET /api/<path>`, parsed.
    async fn get_json(&self, path: &str) -> Result<serde_json::Value, ManagementError> {
        let body = self.send(Method::GET, path, None).await?;
        serde_json::from_str(&body).map_err(|e| ManagementError::Refused {
            method: Method::GET,
            url: path.to_owned(),
            status: 200,
            body: format!("not JSON: {e}"),
        })
    }

    /// Send `/api/<path>` to the first node that answers: a node that cannot be reached is
    /// skipped, an answer (of any status) is final.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<String, ManagementError> {
        let mut unreachable = None;
        for base in &self.bases {
            let url = format!("{base}/api/{path}");
            let http = |source| ManagementError::Http {
                method: method.clone(),
                url: url.clone(),
                source,
            };
            let mut request = self
                .client
                .request(method.clone(), &url)
                .basic_auth(&self.user, Some(&self.password));
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = match request.send().await {
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
                    method,
                    url,
                    status: status.as_u16(),
                    body: body.chars().take(300).collect(),
                })
            };
        }
        Err(unreachable.expect("at least one node was tried"))
    }
}

/// A name as one path segment of the API.
fn segment(name: &str) -> String {
    url::form_urlencoded::byte_serialize(name.as_bytes()).collect()
}

/// rustls (ring, as everywhere in Vigil) with the system's roots and `ca_file`'s certificates.
fn tls_config(
    ca_file: Option<&Path>,
) -> Result<tokio_rustls::rustls::ClientConfig, ManagementError> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system certificate rustls cannot read is skipped, as browsers do.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let bad = |reason: String| ManagementError::CaFile {
            path: path.display().to_string(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            roots
                .add(cert.map_err(|e| bad(e.to_string()))?)
                .map_err(|e| bad(e.to_string()))?;
            n += 1;
        }
        if n == 0 {
            return Err(bad("holds no PEM certificate".into()));
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ManagementError::Url {
            url: String::new(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

    /// A private CA's PEM, and an HTTPS server on 127.0.0.1 with a certificate it signed that
    /// answers `GET /api/users/known` with a user and anything else with 404; its port.
    async fn https_server() -> (String, u16) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from_pem_slice(cert.pem().as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = vec![0; 4096];
                    let n = tls.read(&mut buf).await.unwrap_or(0);
                    let request = String::from_utf8_lossy(&buf[..n]);
                    let (status, body) = if request.starts_with("GET /api/users/known ") {
                        ("200 OK", r#"{"name":"known","tags":[]}"#)
                    } else {
                        ("404 Not Found", r#"{"error":"Object Not Found"}"#)
                    };
                    let answer = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(answer.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        (ca.pem(), port)
    }

    #[tokio::test]
    async fn https_is_verified_against_the_system_roots_and_the_ca_file() {
        let (ca_pem, port) = https_server().await;
        let dir = std::env::temp_dir().join(format!("vigil-mgmt-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca_pem).unwrap();
        let url = format!("https://admin:secret@127.0.0.1:{port}");

        // The private CA trusted: the answer is read, and a refusal names the call and status.
        let api = Management::with_ca_file(&url, "/", Some(&ca_file)).unwrap();
        assert_eq!(api.user("known").await.unwrap()["name"], "known");
        assert!(!api.user_exists("missing").await.unwrap());
        let refused = api.user("missing").await.unwrap_err().to_string();
        assert!(
            refused.starts_with(&format!(
                "management API GET https://127.0.0.1:{port}/api/users/missing answered 404"
            )),
            "{refused}"
        );
        assert!(!refused.contains("secret"), "{refused}");

        // Not trusted: the certificate is refused, and the error says which call failed.
        let api = Management::new(&url, "/").unwrap();
        let untrusted = api.user("known").await.unwrap_err();
        assert!(
            matches!(untrusted, ManagementError::Http { .. }),
            "{untrusted}"
        );
        let text = format!("{untrusted} {:?}", std::error::Error::source(&untrusted));
        assert!(text.contains("GET https://127.0.0.1"), "{text}");
        assert!(!text.contains("secret"), "{text}");

        // A CA file with no certificate is an error of its own.
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(matches!(
            Management::with_ca_file(&url, "/", Some(&empty)),
            Err(ManagementError::CaFile { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
