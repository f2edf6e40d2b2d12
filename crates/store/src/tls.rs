//! TLS to PostgreSQL with libpq's `sslmode` semantics, on rustls.
//!
//! tokio-postgres understands only `disable`, `prefer` and `require` and none of the file
//! options, so [`split`] takes `sslmode`, `sslrootcert`, `sslcert` and `sslkey` out of
//! `DATABASE_URL` (URL or key=value form) and hands the rest to tokio-postgres.

use std::path::PathBuf;

use leasehold_tls::rustls::ClientConfig;
use leasehold_tls::{Identity, Roots, Verify};

use crate::StoreError;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// The TLS part of a `DATABASE_URL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTls {
    pub mode: SslMode,
    pub rootcert: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

const SETTING: &str = "DATABASE_URL";

/// Percent-decodes a URL component (invalid escapes kept as they are, invalid UTF-8 replaced).
fn pct_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Splits `url` into what tokio-postgres parses and the TLS options it does not.
pub fn split(url: &str) -> Result<(String, PgTls), StoreError> {
    let mut tls = PgTls {
        mode: SslMode::Prefer,
        rootcert: None,
        cert: None,
        key: None,
    };
    let mut take = |k: &str, v: String| -> Result<bool, StoreError> {
        match k {
            "sslmode" => {
                tls.mode = match v.as_str() {
                    "disable" => SslMode::Disable,
                    "allow" => SslMode::Allow,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => {
                        return Err(StoreError::Url(format!(
                            "sslmode={other:?}: expected disable, allow, prefer, require, verify-ca or verify-full"
                        )))
                    }
                }
            }
            "sslrootcert" => tls.rootcert = Some(v),
            "sslcert" => tls.cert = Some(v),
            "sslkey" => tls.key = Some(v),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if url.contains("://") {
        match url.split_once('?') {
            None => url.to_string(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    if !take(k, pct_decode(v))? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for (k, v, raw) in key_values(url) {
            if !take(k, v)? {
                kept.push(raw);
            }
        }
        kept.join(" ")
    };
    let mode = match tls.mode {
        SslMode::Disable => "disable",
        SslMode::Allow | SslMode::Prefer => "prefer",
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => "require",
    };
    let rest = if rest.contains("://") {
        let sep = if rest.contains('?') { '&' } else { '?' };
        format!("{rest}{sep}sslmode={mode}")
    } else {
        format!("{rest} sslmode={mode}")
    };
    if tls.cert.is_some() != tls.key.is_some() {
        return Err(StoreError::Url(
            "sslcert and sslkey must be given together".into(),
        ));
    }
    Ok((rest, tls))
}

/// The `key=value` pairs of a libpq connection string: (key, value as libpq reads it, the pair's
/// own text). Values are read as libpq reads them: `'quoted'` (spaces kept as they are) or bare,
/// a backslash escaping the next character; spaces around `=` are allowed. Text that is not a
/// pair is passed on as it is, for tokio-postgres to report.
fn key_values(s: &str) -> Vec<(&str, String, &str)> {
    let b = s.as_bytes();
    let skip_spaces = |i: usize| {
        i + b[i..]
            .iter()
            .take_while(|c| c.is_ascii_whitespace())
            .count()
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        i = skip_spaces(i);
        if i >= b.len() {
            break;
        }
        let start = i;
        while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'=' {
            i += 1;
        }
        let key = &s[start..i];
        i = skip_spaces(i);
        if b.get(i) != Some(&b'=') {
            out.push((key, String::new(), &s[start..i]));
            continue;
        }
        i = skip_spaces(i + 1);
        let mut value = String::new();
        let quoted = b.get(i) == Some(&b'\'');
        if quoted {
            i += 1;
        }
        let mut chars = s[i..].char_indices();
        let mut end = s.len();
        while let Some((k, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(n);
                    }
                }
                '\'' if quoted => {
                    end = i + k + 1;
                    break;
                }
                c if !quoted && c.is_whitespace() => {
                    end = i + k;
                    break;
                }
                c => value.push(c),
            }
        }
        i = end;
        out.push((key, value, &s[start..end]));
    }
    out
}

/// tokio-postgres's error for a connection string it cannot parse, without any piece of that
/// string: when a value with spaces lacks its quotes, the "option" it calls unknown and the
/// character it quotes are pieces of the value, which may be the password.
pub fn parse_error(e: &tokio_postgres::Error) -> StoreError {
    let cause = std::error::Error::source(e)
        .map(|c| c.to_string())
        .unwrap_or_default();
    const HINT: &str = "is a value with spaces missing its single quotes?";
    let detail = if let Some(name) = cause
        .strip_prefix("unknown option `")
        .and_then(|r| r.strip_suffix('`'))
    {
        if leasehold_config::LIBPQ_KEYWORDS.contains(&name) {
            format!("option `{name}` is not supported")
        } else {
            format!("an unknown option ({HINT})")
        }
    } else if let Some(at) = cause.strip_prefix("unexpected character at byte ") {
        let byte = at.split(':').next().unwrap_or("?");
        format!("unexpected character at byte {byte} ({HINT})")
    } else if cause.starts_with("invalid value for option")
        || cause.starts_with("unexpected EOF")
        || cause.starts_with("unterminated")
    {
        cause
    } else {
        "cannot be parsed".into()
    };
    StoreError::Url(format!("invalid connection string: {detail}"))
}

impl PgTls {
    /// The rustls configuration for these options (libpq's verification rules).
    pub fn client_config(&self) -> Result<ClientConfig, StoreError> {
        let roots = match self.rootcert.as_deref() {
            Some("system") => Roots::System { setting: SETTING },
            Some(p) => Roots::File {
                setting: "DATABASE_URL sslrootcert",
                path: PathBuf::from(p),
            },
            None => {
                let home = std::env::var_os("HOME").map(PathBuf::from);
                match home.map(|h| h.join(".postgresql/root.crt")).filter(|p| p.exists()) {
                    Some(path) => Roots::File {
                        setting: "~/.postgresql/root.crt",
                        path,
                    },
                    None if matches!(self.mode, SslMode::VerifyCa | SslMode::VerifyFull) => {
                        return Err(StoreError::Url(
                            "sslmode=verify-ca/verify-full needs sslrootcert=<CA file> (or sslrootcert=system)".into(),
                        ))
                    }
                    None => Roots::System { setting: SETTING },
                }
            }
        };
        let has_root = self.rootcert.is_some() || matches!(roots, Roots::File { .. });
        let verify = match self.mode {
            SslMode::VerifyFull => Verify::Full,
            SslMode::VerifyCa => Verify::ChainOnly,
            // libpq: with a root certificate, `require` verifies the chain like verify-ca.
            SslMode::Require if has_root => Verify::ChainOnly,
            _ => Verify::EncryptOnly,
        };
        let identity = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Some(Identity {
                cert_setting: "DATABASE_URL sslcert",
                cert: c.into(),
                key_setting: "DATABASE_URL sslkey",
                key: k.into(),
            }),
            _ => None,
        };
        leasehold_tls::client_config(verify, &roots, identity.as_ref())
            .map_err(|e| StoreError::Url(e.to_string()))
    }
}

/// tokio-postgres's TLS hook on rustls, from `tokio-postgres-rustls`: it also gives SCRAM
/// authentication its channel binding (`tls-server-end-point`), so a password exchange cannot be
/// relayed through a man in the middle when the server offers SCRAM-SHA-256-PLUS. What is
/// verified is [`PgTls::client_config`]'s: libpq's `sslmode` rules.
pub type MakeRustls = tokio_postgres_rustls::MakeRustlsConnect;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_options_are_taken_out_and_sslmode_mapped() {
        let (rest, t) = split(
            "postgres://u:p@db:5432/x?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.crt&connect_timeout=3",
        )
        .expect("valid");
        assert_eq!(
            rest,
            "postgres://u:p@db:5432/x?connect_timeout=3&sslmode=require"
        );
        assert_eq!(t.mode, SslMode::VerifyFull);
        assert_eq!(t.rootcert.as_deref(), Some("/etc/ca.crt"));

        let (rest, t) =
            split("host=db user=u sslmode=verify-ca sslrootcert=/ca.pem").expect("valid");
        assert_eq!(rest, "host=db user=u sslmode=require");
        assert_eq!(t.mode, SslMode::VerifyCa);

        let (rest, t) = split("postgres://db/x").expect("valid");
        assert_eq!(rest, "postgres://db/x?sslmode=prefer");
        assert_eq!(t.mode, SslMode::Prefer);
    }

    #[test]
    fn quoted_key_values_keep_their_spaces() {
        let (rest, t) = split(
            "host=db password='two  spaces\\' and a quote' sslmode = verify-ca sslrootcert='/my ca.pem' user=u",
        )
        .expect("valid");
        assert_eq!(
            rest,
            "host=db password='two  spaces\\' and a quote' user=u sslmode=require"
        );
        assert_eq!(t.mode, SslMode::VerifyCa);
        assert_eq!(t.rootcert.as_deref(), Some("/my ca.pem"));
        let cfg: tokio_postgres::Config = rest.parse().expect("tokio-postgres parses it");
        assert_eq!(cfg.get_password(), Some(&b"two  spaces' and a quote"[..]));
    }

    /// A `%` followed by a multi-byte character used to slice inside that character and panic.
    #[test]
    fn a_percent_before_a_multibyte_character_is_not_a_panic() {
        // Returns (either way), instead of panicking on DATABASE_URL input.
        let _ = split("postgres://u:p%a\u{e9}@h/db?sslmode=disable&sslrootcert=%a\u{e9}");
        assert_eq!(pct_decode("%a\u{e9}x%41"), "%a\u{e9}xA");
    }

    /// Broken quoting makes tokio-postgres quote pieces of the password back: none of them may
    /// reach the error.
    #[test]
    fn parse_errors_do_not_quote_the_string() {
        for (bad, pieces) in [
            ("host=db password=my secret=word", &["secret", "word"][..]),
            (
                "host=db password=my xecret pass",
                &["xecret", "pass", "`p`"][..],
            ),
            (
                "host=db password='openended secretword",
                &["openended", "secretword"][..],
            ),
            ("postgres://u:pw@db/x?bogus_secret=1", &["pw"][..]),
        ] {
            let e = match crate::pg_config(bad, "t") {
                Ok(_) => panic!("{bad} parsed"),
                Err(e) => e.to_string(),
            };
            for p in pieces {
                assert!(!e.contains(p), "{bad}: {p} in {e}");
            }
            assert!(
                e.starts_with("invalid DATABASE_URL: invalid connection string"),
                "{e}"
            );
        }
        let e = match crate::pg_config("postgres://db/x?sslpassword=pw", "t") {
            Ok(_) => panic!("sslpassword parsed"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains("`sslpassword` is not supported") && !e.contains("pw`"),
            "{e}"
        );
    }

    #[test]
    fn bad_options_are_one_line_errors() {
        let e = split("postgres://db/x?sslmode=sometimes").expect_err("invalid");
        assert!(e.to_string().contains("sslmode=\"sometimes\""), "{e}");
        let e = split("postgres://db/x?sslcert=/a.crt").expect_err("invalid");
        assert!(e.to_string().contains("sslcert and sslkey"), "{e}");
        let (_, t) = split("postgres://db/x?sslmode=verify-full").expect("parses");
        if std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".postgresql/root.crt"))
            .is_none_or(|p| !p.exists())
        {
            let e = t.client_config().expect_err("needs a root");
            assert!(e.to_string().contains("sslrootcert"), "{e}");
        }
    }
}
