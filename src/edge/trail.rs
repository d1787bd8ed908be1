//! The console's audit view, as an edge reads it: through the audit writer's read API
//! (`VIGIL_AUDIT_API_URL`, [`crate::audit::api`]), never from the writer's folder. Each read
//! carries the shared bearer token, is bounded in time (`VIGIL_ADMIN_AUDIT_VIEW_WAIT_MS`,
//! connect to last byte) and in size (`VIGIL_AUDIT_API_MAX_BYTES` for a trail, the frame limit
//! for an evidence frame), and every failure is counted by reason.

use std::time::Duration;

use crate::audit::api::{EVIDENCE_PATH, TRAIL_PATH};
use crate::config::Config;

/// The read API, as this edge reaches it.
pub(super) struct Trail {
    client: reqwest::Client,
    base: String,
    token: String,
    max_trail_bytes: usize,
    max_frame_bytes: usize,
    failed: prometheus::IntCounterVec,
}

/// Why a read gave nothing to show: the status the admin API answers, and why.
#[derive(Debug)]
pub(super) struct Unread {
    pub status: u16,
    pub message: String,
}

impl Trail {
    /// The read API of `cfg.audit_api.url`, or `None` when it is unset.
    pub(super) fn new(
        cfg: &Config,
        failed: prometheus::IntCounterVec,
    ) -> Result<Option<Self>, String> {
        let api = &cfg.audit_api;
        let Some(url) = &api.url else {
            return Ok(None);
        };
        let token = api
            .token
            .clone()
            .ok_or("VIGIL_AUDIT_API_URL is set without VIGIL_AUDIT_API_TOKEN")?;
        let client = crate::telemetry::http::client(
            api.ca_file.as_deref(),
            Duration::from_millis(cfg.edge.audit_view_wait_ms.max(1)),
            concat!("vigil-edge/", env!("CARGO_PKG_VERSION")),
        )?;
        Ok(Some(Self {
            client,
            base: url.trim_end_matches('/').to_owned(),
            token,
            max_trail_bytes: api.max_bytes,
            max_frame_bytes: cfg.edge.max_frame_bytes,
            failed,
        }))
    }

    /// `client`'s trail, as the audit writer built it (`audit::view`).
    pub(super) async fn view(&self, client: &str) -> Result<serde_json::Value, Unread> {
        let id = percent_encoding::utf8_percent_encode(client, percent_encoding::NON_ALPHANUMERIC);
        let body = self
            .get(&format!("{TRAIL_PATH}{id}"), self.max_trail_bytes)
            .await?;
        serde_json::from_slice(&body).map_err(|e| {
            self.failed.with_label_values(&["refused"]).inc();
            Unread {
                status: 502,
                message: format!("the audit writer's answer is not a trail: {e}"),
            }
        })
    }

    /// The evidence frame at `path` (below `evidence/`), as its checked entry recorded it.
    pub(super) async fn evidence(&self, path: &str) -> Result<Vec<u8>, Unread> {
        // Each segment encoded on its own, so the path keeps its shape and nothing else.
        let encoded: Vec<String> = path
            .split('/')
            .map(|s| {
                percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC)
                    .to_string()
            })
            .collect();
        self.get(
            &format!("{EVIDENCE_PATH}{}", encoded.join("/")),
            self.max_frame_bytes,
        )
        .await
    }

    /// GET `path`, its body at most `limit` bytes.
    async fn get(&self, path: &str, limit: usize) -> Result<Vec<u8>, Unread> {
        let fail = |reason: &str, status: u16, message: String| {
            self.failed.with_label_values(&[reason]).inc();
            Unread { status, message }
        };
        let mut response = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| {
                if e.is_timeout() {
                    fail(
                        "timeout",
                        504,
                        "the audit writer did not answer in time".into(),
                    )
                } else {
                    fail(
                        "unreachable",
                        502,
                        format!("the audit writer's API is unreachable: {e}"),
                    )
                }
            })?;
        let status = response.status();
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return Err(fail(
                "too_large",
                502,
                format!("the audit writer's answer is larger than {limit} bytes"),
            ));
        }
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > limit {
                        return Err(fail(
                            "too_large",
                            502,
                            format!("the audit writer's answer is larger than {limit} bytes"),
                        ));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) if e.is_timeout() => {
                    return Err(fail(
                        "timeout",
                        504,
                        "the audit writer did not answer in time".into(),
                    ));
                }
                Err(e) => {
                    return Err(fail(
                        "unreachable",
                        502,
                        format!("the audit writer's answer broke off: {e}"),
                    ));
                }
            }
        }
        if status.is_success() {
            return Ok(body);
        }
        // The writer's own refusal (404, 409, 503) passes through with its message; a token it
        // does not take is this edge's misconfiguration, not the operator's.
        let said = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| status.to_string());
        Err(match status.as_u16() {
            401 => fail(
                "refused",
                502,
                "the audit writer refused this edge's VIGIL_AUDIT_API_TOKEN".into(),
            ),
            409 => fail("altered", 409, said),
            code @ (404 | 503) => fail("refused", code, said),
            _ => fail("refused", 502, format!("the audit writer answered: {said}")),
        })
    }
}
