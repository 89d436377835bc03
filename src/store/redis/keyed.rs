//! Keyed digests: how a `RedisStore` names subjects, pools, owners and event
//! ids without storing them. HMAC-SHA-256 (RFC 2104) under a per-store
//! secret, truncated to 128 bits.

use std::fmt;

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use sha2::{Digest, Sha256};

use crate::store::{ScopeKey, ScopeKind};

/// The shortest secret `RedisConfig::secret` takes, in bytes.
pub(super) const MIN_SECRET_LEN: usize = 16;

/// The key of a store's digests: SHA-256's state after the inner and the
/// outer pad, so a digest costs two block updates and no key schedule.
#[derive(Clone)]
pub(super) struct Keyed {
    inner: Sha256,
    outer: Sha256,
    /// AES-256-GCM-SIV under a key derived from the secret (HMAC-SHA-256
    /// of a fixed label): seals a grant's id (the host's payment id),
    /// which an answer must report but Redis may not hold as text.
    seal: Aes256GcmSiv,
}

/// The associated data every sealed grant id is bound to.
const GRANT_AAD: &[u8] = b"tollgate redis grant id v1";

impl fmt::Debug for Keyed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keyed(<secret>)")
    }
}

/// A secret as configured: printed redacted.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Secret(pub(super) Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

impl Keyed {
    pub(super) fn new(secret: &[u8]) -> Self {
        let mut key = [0u8; 64];
        if secret.len() > 64 {
            key[..32].copy_from_slice(&Sha256::digest(secret));
        } else {
            key[..secret.len()].copy_from_slice(secret);
        }
        let pad = |byte: u8| {
            let mut h = Sha256::new();
            h.update(key.map(|k| k ^ byte));
            h
        };
        let mut keyed = Self {
            inner: pad(0x36),
            outer: pad(0x5c),
            seal: Aes256GcmSiv::new(&[0u8; 32].into()),
        };
        keyed.seal = Aes256GcmSiv::new(&keyed.mac(b"aead-key:", b"grant ids").into());
        keyed
    }

    /// The whole HMAC-SHA-256 of `domain` then `data`.
    fn mac(&self, domain: &[u8], data: &[u8]) -> [u8; 32] {
        let mut inner = self.inner.clone();
        inner.update(domain);
        inner.update(data);
        let mut outer = self.outer.clone();
        outer.update(inner.finalize());
        outer.finalize().into()
    }

    /// A grant id's digest: what a balance indexes (and dedupes) its
    /// grants by.
    pub(super) fn grant(&self, id: &str) -> String {
        self.digest(b"g:", id.as_bytes())
    }

    /// A grant id sealed (AES-256-GCM-SIV), as hex of nonce and
    /// ciphertext. The nonce is the id's keyed digest (deterministic: GCM-SIV
    /// is built for nonce reuse, and equal ids already share their index
    /// digest), so a grant written twice is written the same.
    pub(super) fn seal_grant(&self, id: &str) -> Option<String> {
        let mac = self.mac(b"gn:", id.as_bytes());
        let nonce = Nonce::from_slice(&mac[..12]);
        let sealed = self
            .seal
            .encrypt(
                nonce,
                Payload {
                    msg: id.as_bytes(),
                    aad: GRANT_AAD,
                },
            )
            .ok()?;
        let mut out = Vec::with_capacity(12 + sealed.len());
        out.extend_from_slice(&mac[..12]);
        out.extend_from_slice(&sealed);
        Some(::hex::encode(out))
    }

    /// A grant id from [`Keyed::seal_grant`]'s hex; `None` if it was not
    /// sealed under this store's secret.
    pub(super) fn open_grant(&self, sealed: &str) -> Option<String> {
        let bytes = ::hex::decode(sealed).ok()?;
        if bytes.len() < 12 {
            return None;
        }
        let (nonce, ct) = bytes.split_at(12);
        let id = self
            .seal
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: GRANT_AAD,
                },
            )
            .ok()?;
        String::from_utf8(id).ok()
    }

    /// HMAC-SHA-256 of `domain` then `data`, first 128 bits, as hex.
    pub(super) fn digest(&self, domain: &[u8], data: &[u8]) -> String {
        ::hex::encode(&self.mac(domain, data)[..16])
    }

    /// A scope's digest: its kind and id under the key. It names the
    /// scope's keys and is what `overdue` and settlements report.
    pub(super) fn scope(&self, scope: &ScopeKey) -> String {
        let domain: &[u8] = match scope.kind() {
            ScopeKind::Subject => b"s:",
            ScopeKind::Pool => b"p:",
        };
        self.digest(domain, scope.id().as_bytes())
    }

    /// An event id's digest.
    pub(super) fn event(&self, id: &str) -> String {
        self.digest(b"e:", id.as_bytes())
    }
}

/// A fresh random secret for a store that was given none: 32 bytes hashed
/// from the standard library's per-process random hash keys (seeded from
/// the operating system), the time and the process id.
pub(super) fn fresh_secret() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = Sha256::new();
    for i in 0u64..4 {
        let mut s = std::collections::hash_map::RandomState::new().build_hasher();
        s.write_u64(i);
        h.update(s.finish().to_le_bytes());
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.update(nanos.to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    ::hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        // RFC 4231 test case 2: key "Jefe", "what do ya want for nothing?".
        let k = Keyed::new(b"Jefe");
        assert_eq!(
            k.digest(b"what do ya want ", b"for nothing?"),
            "5bdcc146bf60754e6a042426089575c7"
        );
        // A key longer than a block is hashed first (RFC 4231 case 6).
        let k = Keyed::new(&[0xaa; 131]);
        assert_eq!(
            k.digest(
                b"",
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            ),
            "60e431591ee0b67f0d8a26aacbf5b77f"
        );
    }

    #[test]
    fn digests_separate_kinds_ids_and_keys() {
        let k = Keyed::new(b"0123456789abcdef");
        let a = k.scope(&ScopeKey::subject("x"));
        assert_ne!(a, k.scope(&ScopeKey::pool("x")));
        assert_ne!(a, k.scope(&ScopeKey::subject("")));
        assert_ne!(
            a,
            Keyed::new(b"0123456789abcdeF").scope(&ScopeKey::subject("x"))
        );
        assert_eq!(a.len(), 32);
        assert_ne!(fresh_secret(), fresh_secret());
    }

    #[test]
    fn grant_ids_seal_and_open_under_their_secret_only() {
        let k = Keyed::new(b"0123456789abcdef");
        let id = "pi_3Nx{payment}\n id";
        let sealed = k.seal_grant(id).expect("sealed");
        assert!(!sealed.contains(&::hex::encode(id)));
        assert_eq!(k.seal_grant(id).as_deref(), Some(sealed.as_str()));
        assert_eq!(k.open_grant(&sealed).as_deref(), Some(id));
        assert_eq!(Keyed::new(b"0123456789abcdeF").open_grant(&sealed), None);
        let mut bad = sealed.clone().into_bytes();
        let last = bad.len() - 1;
        bad[last] = if bad[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(k.open_grant(std::str::from_utf8(&bad).unwrap()), None);
        assert_eq!(k.open_grant("zz"), None);
        assert_ne!(k.grant(id), k.event(id));
    }
}
