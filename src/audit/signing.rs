//! The audit trail's signing key: Ed25519 (`ed25519-dalek`), as PKCS#8 PEM files. The writer
//! signs every entry's hash with the private key, which is kept outside the evidence folder
//! (`VIGIL_AUDIT_KEY`); `vigil audit verify --public-key` needs only the public half. Whoever
//! can rewrite the log can recompute its hashes, but not its signatures.

use std::path::Path;

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

use super::AuditError;

/// What is signed for an entry: a domain tag and the entry's hash (which covers its sequence
/// number, its link to the entry before and its record).
fn message(hash: &str) -> Vec<u8> {
    let mut m = b"vigil-audit-entry-v1\n".to_vec();
    m.extend_from_slice(hash.as_bytes());
    m
}

/// What is signed for a checkpoint: a domain tag (so an entry's signature is never a
/// checkpoint's), its sequence number, the head hash and the time. A signature from one
/// checkpoint cannot be moved to another sequence number.
fn checkpoint_message(seq: u64, hash: &str, written_at_ms: u64) -> Vec<u8> {
    format!("vigil-audit-checkpoint-v2\n{seq}\n{hash}\n{written_at_ms}").into_bytes()
}

fn bad_key(path: &Path, e: impl std::fmt::Display) -> AuditError {
    AuditError::Key(format!("{}: {e}", path.display()))
}

/// The hex signature of an entry's hash.
pub fn sign(key: &SigningKey, hash: &str) -> String {
    hex::encode(key.sign(&message(hash)).to_bytes())
}

/// Whether `sig` (hex) is `key`'s signature of the entry hash `hash`.
pub fn verify(key: &VerifyingKey, hash: &str, sig: &str) -> bool {
    let Ok(bytes) = hex::decode(sig) else {
        return false;
    };
    let Ok(sig) = Signature::from_slice(&bytes) else {
        return false;
    };
    key.verify(&message(hash), &sig).is_ok()
}

/// The hex signature of a checkpoint.
pub fn sign_checkpoint(key: &SigningKey, seq: u64, hash: &str, written_at_ms: u64) -> String {
    hex::encode(
        key.sign(&checkpoint_message(seq, hash, written_at_ms))
            .to_bytes(),
    )
}

/// Whether `sig` (hex) is `key`'s signature of this checkpoint.
pub fn verify_checkpoint(
    key: &VerifyingKey,
    seq: u64,
    hash: &str,
    written_at_ms: u64,
    sig: &str,
) -> bool {
    let Ok(bytes) = hex::decode(sig) else {
        return false;
    };
    let Ok(sig) = Signature::from_slice(&bytes) else {
        return false;
    };
    key.verify(&checkpoint_message(seq, hash, written_at_ms), &sig)
        .is_ok()
}

/// The public key as PEM, as `vigil audit keygen` writes it.
pub fn public_pem(key: &VerifyingKey) -> String {
    key.to_public_key_pem(LineEnding::LF)
        .expect("an Ed25519 public key encodes")
}

/// A short fingerprint of the public key: the first 16 bytes of the SHA-256 of its DER form,
/// hex, for pinning and for people to compare.
pub fn fingerprint(key: &VerifyingKey) -> String {
    use sha2::{Digest, Sha256};
    let der = key
        .to_public_key_der()
        .expect("an Ed25519 public key encodes");
    hex::encode(&Sha256::digest(der.as_bytes())[..16])
}

pub fn load_private(path: &Path) -> Result<SigningKey, AuditError> {
    let pem = std::fs::read_to_string(path).map_err(|e| bad_key(path, e))?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|e| bad_key(path, e))
}

pub fn load_public(path: &Path) -> Result<VerifyingKey, AuditError> {
    let pem = std::fs::read_to_string(path).map_err(|e| bad_key(path, e))?;
    VerifyingKey::from_public_key_pem(&pem).map_err(|e| bad_key(path, e))
}

/// A new key pair: the private key at `out` (readable by its owner only) and the public key at
/// `out` + `.pub`. Refuses to overwrite an existing key. Returns the public key's PEM.
pub fn generate(out: &Path) -> Result<String, AuditError> {
    let public_path = out.with_extension(match out.extension() {
        Some(ext) => format!("{}.pub", ext.to_string_lossy()),
        None => "pub".into(),
    });
    // 32 bytes from the operating system's generator, through rand's CSPRNG.
    let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let private = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| bad_key(out, e))?;
    let public = key
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| bad_key(&public_path, e))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(out).map_err(|e| bad_key(out, e))?;
    std::io::Write::write_all(&mut file, private.as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(|e| bad_key(out, e))?;
    std::fs::write(&public_path, &public).map_err(|e| bad_key(&public_path, e))?;
    Ok(public)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_hold_only_for_their_hash_and_key() {
        let dir = std::env::temp_dir().join(format!("vigil-key-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.key");
        generate(&path).unwrap();
        assert!(generate(&path).is_err(), "an existing key was overwritten");
        let key = load_private(&path).unwrap();
        let public = load_public(&dir.join("audit.key.pub")).unwrap();
        assert_eq!(public, key.verifying_key());
        let sig = sign(&key, "abc");
        assert!(verify(&public, "abc", &sig));
        assert!(!verify(&public, "abd", &sig));
        let other = SigningKey::from_bytes(&[7; 32]);
        assert!(!verify(&other.verifying_key(), "abc", &sig));
        assert!(!verify(&public, "abc", "not hex"));
        // A checkpoint's signature covers its sequence number and time, and is not an entry's.
        let cp = sign_checkpoint(&key, 7, "abc", 1000);
        assert!(verify_checkpoint(&public, 7, "abc", 1000, &cp));
        assert!(!verify_checkpoint(&public, u64::MAX, "abc", 1000, &cp));
        assert!(!verify_checkpoint(&public, 7, "abc", 1001, &cp));
        assert!(!verify_checkpoint(&public, 7, "abc", 1000, &sig));
        assert!(!verify(&public, "abc", &cp));
        assert_eq!(fingerprint(&public).len(), 32);
        assert_eq!(
            load_public(&dir.join("audit.key.pub")).unwrap(),
            VerifyingKey::from_public_key_pem(&public_pem(&public)).unwrap()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
