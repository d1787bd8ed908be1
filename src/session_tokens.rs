//! Short-lived session tokens: what an exam platform's back end mints per exam session and hands
//! to the candidate's browser instead of the client's permanent token.
//!
//! A token is a JWT signed with Ed25519 (`EdDSA`, by `jsonwebtoken`). Its claims name the client
//! (`sub`), the deployment (`aud`, the namespace), when it expires (`exp`), and a binding to the
//! client's permanent token (`tkb`, a digest of its stored hash). Edges verify it with the public
//! key alone; the hello then reads the client's record as for any hello, which is where a
//! token is revoked with its client: blocked, signed out or removed, or its permanent token
//! rotated (the binding no longer matches).
//!
//! The edge's admin API mints tokens (`POST /v1/admin/sessions`) with the private key, and so
//! does `vigil sessions mint`. A token is never logged.

use std::path::{Path, PathBuf};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Who issues every session token.
pub const ISSUER: &str = "vigil";

/// The longest session token decoded; a minted one is about 450 bytes. Longer ones are refused
/// before any decoding, so a hello cannot make the edge parse megabytes.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// `[sessions]` in the config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// The Ed25519 private key (PKCS#8 PEM, from `vigil sessions keygen`) the admin API mints
    /// session tokens with; unset, `POST /v1/admin/sessions` is off [VIGIL_SESSION_KEY].
    pub key: Option<PathBuf>,
    /// Its public key (SPKI PEM), which edges verify session tokens with; taken from `key` when
    /// unset. With neither, hellos accept only permanent tokens [VIGIL_SESSION_PUBLIC_KEY].
    pub public_key: Option<PathBuf>,
    /// The longest life a minted token may have, in seconds [VIGIL_SESSION_MAX_TTL_S].
    pub max_ttl_s: u64,
    /// Clock difference between the minting and the verifying host tolerated on `exp`, in
    /// seconds.
    pub leeway_s: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            key: None,
            public_key: None,
            max_ttl_s: 6 * 3600,
            leeway_s: 5,
        }
    }
}

impl SessionConfig {
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if !(60..=7 * 86_400).contains(&self.max_ttl_s) {
            errors.push(format!(
                "sessions.max_ttl_s = {} must be within 60..=604800",
                self.max_ttl_s
            ));
        }
        if self.leeway_s > 300 {
            errors.push(format!(
                "sessions.leeway_s = {} must be at most 300",
                self.leeway_s
            ));
        }
        errors
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionTokenError {
    #[error("session key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("ttl_s must be within 1..={max}")]
    Ttl { max: u64 },
    #[error("session token refused: {0}")]
    Refused(&'static str),
}

/// The claims of a session token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The namespace of the deployment it opens sessions on.
    pub aud: String,
    /// The client it opens a session for.
    pub sub: String,
    pub iat: u64,
    /// `iat` to the millisecond, which a block or a sign-out is compared with
    /// ([`crate::directory::ClientRecord::sessions_not_before_ms`]).
    #[serde(default)]
    pub iat_ms: u64,
    pub exp: u64,
    /// Its own id.
    pub jti: String,
    /// Binds it to the client's permanent token
    /// ([`crate::directory::ClientRecord::session_binding`]).
    pub tkb: String,
}

/// Whether `token` is shaped like a JWT (three base64url parts), rather than a permanent token.
pub fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.bytes().filter(|b| *b == b'.').count() == 2
}

fn read(path: &Path) -> Result<Vec<u8>, SessionTokenError> {
    std::fs::read(path).map_err(|e| SessionTokenError::Key {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Mints session tokens.
pub struct Minter {
    key: EncodingKey,
    audience: String,
    max_ttl_s: u64,
}

impl Minter {
    pub fn load(cfg: &SessionConfig, namespace: &str) -> Result<Option<Self>, SessionTokenError> {
        let Some(path) = &cfg.key else {
            return Ok(None);
        };
        let key = EncodingKey::from_ed_pem(&read(path)?).map_err(|e| SessionTokenError::Key {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(Some(Self {
            key,
            audience: namespace.to_owned(),
            max_ttl_s: cfg.max_ttl_s,
        }))
    }

    /// A token for `client_id` (with its record's `binding`), valid `ttl_s` from `now_ms`; the
    /// token and its expiry (Unix seconds).
    pub fn mint(
        &self,
        client_id: &str,
        binding: &str,
        ttl_s: u64,
        now_ms: u64,
    ) -> Result<(String, u64), SessionTokenError> {
        let now_s = now_ms / 1000;
        if ttl_s == 0 || ttl_s > self.max_ttl_s {
            return Err(SessionTokenError::Ttl {
                max: self.max_ttl_s,
            });
        }
        let claims = Claims {
            iss: ISSUER.into(),
            aud: self.audience.clone(),
            sub: client_id.to_owned(),
            iat: now_s,
            iat_ms: now_ms,
            exp: now_s + ttl_s,
            jti: uuid::Uuid::now_v7().to_string(),
            tkb: binding.to_owned(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &self.key)
            .map_err(|e| SessionTokenError::Key {
                path: "(in memory)".into(),
                reason: e.to_string(),
            })?;
        Ok((token, claims.exp))
    }
}

impl Claims {
    /// When it was issued, in Unix ms (`iat_ms`, or `iat` for a token without it).
    pub fn issued_at_ms(&self) -> u64 {
        self.iat_ms.max(self.iat.saturating_mul(1000))
    }
}

/// Verifies session tokens with the public key: no directory, no network.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    /// The verifier of `cfg` (its public key, or the private key's), if either is configured.
    pub fn load(cfg: &SessionConfig, namespace: &str) -> Result<Option<Self>, SessionTokenError> {
        let key = match (&cfg.public_key, &cfg.key) {
            (Some(path), _) => {
                DecodingKey::from_ed_pem(&read(path)?).map_err(|e| SessionTokenError::Key {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?
            }
            (None, Some(path)) => {
                use ed25519_dalek::pkcs8::DecodePrivateKey as _;
                let pem = String::from_utf8(read(path)?).map_err(|e| SessionTokenError::Key {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                let signing = ed25519_dalek::SigningKey::from_pkcs8_pem(&pem).map_err(|e| {
                    SessionTokenError::Key {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    }
                })?;
                DecodingKey::from_ed_der(signing.verifying_key().as_bytes())
            }
            (None, None) => return Ok(None),
        };
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&[namespace]);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
        validation.leeway = cfg.leeway_s;
        validation.validate_exp = true;
        Ok(Some(Self { key, validation }))
    }

    /// The claims of `token` for a hello as `client_id`: signed by the key, for this deployment,
    /// not expired, and for this client.
    pub fn verify(&self, token: &str, client_id: &str) -> Result<Claims, SessionTokenError> {
        use jsonwebtoken::errors::ErrorKind;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(SessionTokenError::Refused("too long"));
        }
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| {
                SessionTokenError::Refused(match e.kind() {
                    ErrorKind::ExpiredSignature => "expired",
                    ErrorKind::InvalidAudience => "for another deployment",
                    ErrorKind::InvalidSignature => "not signed by this deployment's key",
                    ErrorKind::InvalidAlgorithm => "not an EdDSA token",
                    _ => "malformed",
                })
            })?;
        if data.claims.sub != client_id {
            return Err(SessionTokenError::Refused("for another client"));
        }
        Ok(data.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (SessionConfig, PathBuf) {
        use ed25519_dalek::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _};
        let dir = std::env::temp_dir().join(format!("vigil-session-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let signing = ed25519_dalek::SigningKey::from_bytes(&rand::random());
        let private = dir.join("session.key");
        std::fs::write(
            &private,
            signing.to_pkcs8_pem(Default::default()).unwrap().as_bytes(),
        )
        .unwrap();
        let public = dir.join("session.key.pub");
        std::fs::write(
            &public,
            signing
                .verifying_key()
                .to_public_key_pem(Default::default())
                .unwrap(),
        )
        .unwrap();
        let cfg = SessionConfig {
            key: Some(private),
            public_key: Some(public),
            ..SessionConfig::default()
        };
        (cfg, dir)
    }

    fn now() -> u64 {
        crate::wire::now_ms()
    }

    #[test]
    fn a_minted_token_opens_only_its_clients_session_until_it_expires() {
        let (cfg, dir) = keys();
        let minter = Minter::load(&cfg, "prod").unwrap().unwrap();
        let verifier = Verifier::load(&cfg, "prod").unwrap().unwrap();
        let (token, exp) = minter.mint("alice", "b1", 600, now()).unwrap();
        assert!(looks_like_jwt(&token));
        assert!(exp >= now() / 1000 + 599);
        let claims = verifier.verify(&token, "alice").unwrap();
        assert_eq!(claims.tkb, "b1");
        assert_eq!(
            verifier.verify(&token, "bob").unwrap_err().to_string(),
            "session token refused: for another client"
        );
        // Expired an hour ago.
        let (old, _) = minter.mint("alice", "b1", 600, now() - 4_200_000).unwrap();
        assert!(
            verifier
                .verify(&old, "alice")
                .unwrap_err()
                .to_string()
                .ends_with("expired")
        );
        // Another deployment's token.
        let other = Verifier::load(&cfg, "staging").unwrap().unwrap();
        assert!(other.verify(&token, "alice").is_err());
        // Only the private key configured: the verifier derives the public one.
        let derived = SessionConfig {
            public_key: None,
            ..cfg.clone()
        };
        assert!(
            Verifier::load(&derived, "prod")
                .unwrap()
                .unwrap()
                .verify(&token, "alice")
                .is_ok()
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn forged_and_altered_tokens_are_refused() {
        let (cfg, dir) = keys();
        let verifier = Verifier::load(&cfg, "prod").unwrap().unwrap();
        // Signed by another key.
        let (other_cfg, other_dir) = keys();
        let forger = Minter::load(&other_cfg, "prod").unwrap().unwrap();
        let (forged, _) = forger.mint("alice", "h", 600, now()).unwrap();
        assert!(verifier.verify(&forged, "alice").is_err());
        // A genuine token with its subject changed.
        let minter = Minter::load(&cfg, "prod").unwrap().unwrap();
        let (token, _) = minter.mint("alice", "h", 600, now()).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut claims: serde_json::Value =
            serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
        claims["sub"] = "mallory".into();
        let altered = format!(
            "{}.{}.{}",
            parts[0],
            b64.encode(claims.to_string()),
            parts[2]
        );
        assert!(verifier.verify(&altered, "mallory").is_err());
        // `alg: none`, and an HMAC token keyed with the public key.
        let none = format!(
            "{}.{}.",
            b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
            parts[1]
        );
        assert!(verifier.verify(&none, "alice").is_err());
        let public = std::fs::read(cfg.public_key.as_ref().unwrap()).unwrap();
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&public),
        )
        .unwrap();
        assert!(verifier.verify(&hs, "mallory").is_err());
        assert!(minter.mint("alice", "h", 0, now()).is_err());
        assert!(token.len() < 600, "{}", token.len());
        let huge = format!("eyJ{}.x.y", "A".repeat(MAX_TOKEN_BYTES));
        assert_eq!(
            verifier.verify(&huge, "alice").unwrap_err().to_string(),
            "session token refused: too long"
        );
        assert!(minter.mint("alice", "h", cfg.max_ttl_s + 1, now()).is_err());
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_dir_all(other_dir);
    }
}
