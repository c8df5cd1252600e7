//! Server URLs as the enforcer, its bootstrap client and `moatctl` take them. The transport
//! decides on the URL's scheme (an `http://` URL never uses TLS, whatever TLS flags are
//! given), so a URL that contradicts the flags is refused instead of silently sending a
//! token or a node's identity in cleartext.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error(
        "{flag} {url}: an http:// URL is never encrypted, yet TLS is configured (the certificates and tokens would travel in cleartext); use https://"
    )]
    PlaintextWithTls { flag: String, url: String },
    #[error("{flag} {url}: --insecure-dev-plaintext does not speak TLS; use http://")]
    TlsWithoutTls { flag: String, url: String },
    #[error("{flag} {url}: expected https://HOST:PORT")]
    Scheme { flag: String, url: String },
}

/// Checks that `url` (given as `flag`) uses TLS exactly when `tls` is true.
pub fn check_server_url(flag: &str, url: &str, tls: bool) -> Result<(), UrlError> {
    let scheme = url
        .split_once("://")
        .map(|(s, _)| s.to_ascii_lowercase())
        .unwrap_or_default();
    let (flag, url) = (flag.to_string(), url.to_string());
    match (scheme.as_str(), tls) {
        ("https", true) | ("http", false) => Ok(()),
        ("http", true) => Err(UrlError::PlaintextWithTls { flag, url }),
        ("https", false) => Err(UrlError::TlsWithoutTls { flag, url }),
        _ => Err(UrlError::Scheme { flag, url }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_must_match_the_transport() {
        assert_eq!(check_server_url("--server", "https://h:1", true), Ok(()));
        assert_eq!(check_server_url("--server", "HTTPS://h:1", true), Ok(()));
        assert_eq!(check_server_url("--server", "http://h:1", false), Ok(()));
        assert!(matches!(
            check_server_url("--server", "http://h:1", true),
            Err(UrlError::PlaintextWithTls { .. })
        ));
        assert!(matches!(
            check_server_url("--server", "HTTP://h:1", true),
            Err(UrlError::PlaintextWithTls { .. })
        ));
        assert!(matches!(
            check_server_url("--server", "https://h:1", false),
            Err(UrlError::TlsWithoutTls { .. })
        ));
        for bad in ["h:1", "ftp://h", "", "unix:/x"] {
            assert!(
                matches!(
                    check_server_url("--server", bad, true),
                    Err(UrlError::Scheme { .. })
                ),
                "{bad}"
            );
        }
    }
}
