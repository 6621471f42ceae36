//! Who may call: HMAC signatures over the raw body, bearer tokens, allowed networks. Every
//! comparison of a secret runs in constant time.

use std::net::IpAddr;

use axum::http::HeaderMap;
use base64::Engine;
use hmac::{Hmac, Mac};
use ipnet::IpNet;
use sha2::{Digest, Sha256, Sha512};
use subtle::ConstantTimeEq;

use crate::config::listener::{Algorithm, Encoding, Signature};
use crate::config::Secret;

/// Whether `body` carries a valid signature made with one of `secrets`; the error says what
/// is wrong without telling anything about the secret.
pub fn check_signature(
    signature: &Signature,
    secrets: &[Secret],
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), String> {
    let header = headers
        .get(signature.header.as_str())
        .ok_or_else(|| format!("missing signature header {}", signature.header))?;
    let text = header
        .to_str()
        .map_err(|_| format!("signature header {} is not text", signature.header))?
        .trim();
    let digest = text
        .strip_prefix(signature.prefix.as_str())
        .ok_or_else(|| {
            format!(
                "signature header {} does not start with {:?}",
                signature.header, signature.prefix
            )
        })?;
    let given = match signature.encoding {
        Encoding::Hex => hex::decode(digest).ok(),
        Encoding::Base64 => base64::engine::general_purpose::STANDARD
            .decode(digest)
            .ok(),
    }
    .ok_or_else(|| format!("signature header {} is not a digest", signature.header))?;
    let valid = secrets.iter().any(|secret| {
        let key = secret.expose().as_bytes();
        match signature.algorithm {
            Algorithm::Sha256 => verify::<Hmac<Sha256>>(key, body, &given),
            Algorithm::Sha512 => verify::<Hmac<Sha512>>(key, body, &given),
        }
    });
    if valid {
        Ok(())
    } else {
        Err("wrong signature".into())
    }
}

fn verify<M: Mac + hmac::digest::KeyInit>(key: &[u8], body: &[u8], given: &[u8]) -> bool {
    let mut mac = <M as hmac::digest::KeyInit>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(body);
    // `verify_slice` compares in constant time.
    mac.verify_slice(given).is_ok()
}

/// The signature a sender would send: the digest of `body` under `secret`, encoded as
/// `signature` says (with its prefix). For tests and for documentation examples.
pub fn sign(signature: &Signature, secret: &str, body: &[u8]) -> String {
    let digest = match signature.algorithm {
        Algorithm::Sha256 => mac::<Hmac<Sha256>>(secret.as_bytes(), body),
        Algorithm::Sha512 => mac::<Hmac<Sha512>>(secret.as_bytes(), body),
    };
    let encoded = match signature.encoding {
        Encoding::Hex => hex::encode(digest),
        Encoding::Base64 => base64::engine::general_purpose::STANDARD.encode(digest),
    };
    format!("{}{encoded}", signature.prefix)
}

fn mac<M: Mac + hmac::digest::KeyInit>(key: &[u8], body: &[u8]) -> Vec<u8> {
    let mut mac = <M as hmac::digest::KeyInit>::new_from_slice(key).expect("HMAC takes any key");
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

/// Whether `Authorization: Bearer <token>` names one of `tokens`.
pub fn check_bearer(tokens: &[Secret], headers: &HeaderMap) -> Result<(), String> {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .ok_or("missing bearer token (Authorization: Bearer <token>)")?;
    // Digests first, so that the comparison takes as long whatever the lengths.
    let given = Sha256::digest(given.as_bytes());
    let matches = tokens.iter().fold(false, |found, token| {
        let wanted = Sha256::digest(token.expose().as_bytes());
        found | bool::from(wanted.ct_eq(&given))
    });
    if matches {
        Ok(())
    } else {
        Err("wrong bearer token".into())
    }
}

/// The client's address: the peer, or — when the peer is a trusted proxy — the last address
/// in `X-Forwarded-For` that is not a trusted proxy itself (what a client sends first in that
/// header is not believed: it can write anything there).
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|part| part.trim().parse::<IpAddr>().ok())
        .collect();
    forwarded
        .iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .or(forwarded.first())
        .copied()
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn the_client_is_taken_from_forwarded_for_only_behind_a_trusted_proxy() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 192.0.2.7, 10.1.1.1")]);
        assert_eq!(
            client_address("10.0.0.2".parse().unwrap(), &h, &trusted),
            "192.0.2.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_address("198.51.100.1".parse().unwrap(), &h, &trusted),
            "198.51.100.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            client_address("10.0.0.2".parse().unwrap(), &HeaderMap::new(), &trusted),
            "10.0.0.2".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn bearer_tokens_must_match_one_of_the_tokens() {
        let tokens = vec![Secret::new("old"), Secret::new("new")];
        assert!(check_bearer(&tokens, &headers(&[("authorization", "Bearer new")])).is_ok());
        assert!(check_bearer(&tokens, &headers(&[("authorization", "Bearer nope")])).is_err());
        assert!(check_bearer(&tokens, &headers(&[("authorization", "Basic new")])).is_err());
        assert!(check_bearer(&tokens, &HeaderMap::new()).is_err());
    }
}
