//! Redaction of secrets from anything Leasehold shows: log lines, error messages, HTTP answers and
//! CLI output.
//!
//! Secrets reach Leasehold inside URLs and connection strings, in every form those can carry them:
//! URL user info (`postgres://u:pw@h`, `mqtt://u:pw@h`), URL query parameters (`?password=`,
//! `&sslpassword=`, `?token=`), libpq `key=value` strings (`password=x`, `password='x y'`), and
//! the path of a webhook URL (Slack's token *is* the path). One scanner, [`redact`], handles all of
//! them in any text; [`redact_url`] is the same for a value known to be one URL or connection
//! string (it may then contain characters that would end a URL in free text). The log writer runs
//! every line through [`redact`] too, so a secret that some library puts into a message is caught
//! even where no Leasehold code formats it.

/// What a secret is replaced with.
pub const MASK: &str = "***";

/// Whether a parameter or field name names a secret (`password`, `sslpassword`, `MQTT_PASSWORD`,
/// `api_key`, `access_token`, `client_secret`, ...). File names (`sslkey`, `MQTT_CLIENT_KEY`,
/// `passfile`) are paths, not secrets: keeping them visible keeps TLS errors debuggable.
pub fn is_secret_name(name: &str) -> bool {
    let n: String = name
        .chars()
        .filter(|c| !matches!(c, '_' | '-' | '.'))
        .flat_map(char::to_lowercase)
        .collect();
    if n.is_empty() || n == "sslkey" || n.ends_with("clientkey") || n.ends_with("file") {
        return false;
    }
    const PARTS: [&str; 11] = [
        "password",
        "passwd",
        "passphrase",
        "pwd",
        "secret",
        "token",
        "credential",
        "apikey",
        "privatekey",
        "signature",
        "authorization",
    ];
    PARTS.iter().any(|p| n.contains(p)) || n == "pass" || n == "auth" || n.ends_with("key")
}

/// Redacts every secret a URL or connection string can carry, wherever it occurs in `text`.
///
/// URLs are found by their `scheme://`; each ends at whitespace or a quote. Everything else is
/// scanned for `name=value` (libpq, query strings, log fields), `name: "value"` (Rust `Debug`) and
/// `"name":"value"` (JSON) where the name is a secret's ([`is_secret_name`]).
pub fn redact(text: &str) -> String {
    if !might_hold_secret(text) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some((start, end)) = next_url(rest) {
        out.push_str(&redact_pairs(&rest[..start], false));
        out.push_str(&redact_one_url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(&redact_pairs(rest, false));
    out
}

/// Redacts a value known to be one URL (`postgres://...`, `mqtt://...`, `https://...`) or one
/// libpq `key=value` connection string. Unlike [`redact`], a URL here runs to the end of the value,
/// so even an (invalid) unencoded space in its password does not end it early.
pub fn redact_url(url: &str) -> String {
    let trimmed = url.trim_start();
    match scheme_len(trimmed) {
        Some(_) => redact_one_url(trimmed),
        None => redact_pairs(url, true),
    }
}

/// Cheap pre-check: text without `://`, `=` or `:` cannot hold any of the forms.
fn might_hold_secret(text: &str) -> bool {
    text.contains("://") || text.contains('=') || text.contains(':')
}

/// The length of a leading `scheme://` (RFC 3986 scheme characters), if `s` starts with one.
fn scheme_len(s: &str) -> Option<usize> {
    let i = s.find("://")?;
    let scheme = &s[..i];
    let mut chars = scheme.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    (first_ok && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
        .then_some(i + 3)
}

/// The next URL in `text`: `(start, end)` byte offsets.
fn next_url(text: &str) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(i) = text[from..].find("://").map(|i| i + from) {
        let start = text[..i]
            .char_indices()
            .rev()
            .take_while(|(_, c)| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            .last()
            .map(|(j, _)| j)
            .unwrap_or(i);
        let scheme = &text[start..i];
        if scheme.starts_with(|c: char| c.is_ascii_alphabetic()) {
            let end = text[i + 3..]
                .char_indices()
                .find(|&(j, c)| {
                    c.is_whitespace()
                        || matches!(c, '"' | '\'' | '`' | '<' | '>')
                        || (c == '\\' && text[i + 3 + j..].starts_with("\\\""))
                })
                .map(|(j, _)| i + 3 + j)
                .unwrap_or(text.len());
            return Some((start, end));
        }
        from = i + 3;
    }
    None
}

/// Redacts one URL: the password of its user info, secret query parameters, and for web URLs
/// (`http`, `https`, `ws`, `wss`) the user info and the whole path and query, which is where
/// webhook and API tokens live.
fn redact_one_url(url: &str) -> String {
    let Some(after_scheme) = scheme_len(url) else {
        return redact_pairs(url, true);
    };
    let scheme = url[..after_scheme - 3].to_ascii_lowercase();
    let web = matches!(scheme.as_str(), "http" | "https" | "ws" | "wss");
    let rest = &url[after_scheme..];
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..after_scheme]);

    let (userinfo, hostpart) = match userinfo_end(rest) {
        None => (None, rest),
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
    };
    if let Some(ui) = userinfo {
        match ui.split_once(':') {
            Some(_) if web => out.push_str(MASK),
            Some((user, _)) => {
                out.push_str(user);
                out.push(':');
                out.push_str(MASK);
            }
            // A user name alone is a secret in web URLs (`https://TOKEN@host`), not elsewhere.
            None if web => out.push_str(MASK),
            None => out.push_str(ui),
        }
        out.push('@');
    }
    let path_at = hostpart.find(['/', '?', '#']).unwrap_or(hostpart.len());
    out.push_str(&hostpart[..path_at]);
    let tail = &hostpart[path_at..];
    if web {
        if !tail.is_empty() && tail != "/" {
            out.push('/');
            out.push_str(MASK);
        } else {
            out.push_str(tail);
        }
        return out;
    }
    match tail.split_once('?') {
        None => out.push_str(tail),
        Some((path, query)) => {
            out.push_str(path);
            out.push('?');
            let (query, fragment) = match query.split_once('#') {
                Some((q, f)) => (q, Some(f)),
                None => (query, None),
            };
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if is_secret_name(&pct_decode(k)) => format!("{k}={MASK}"),
                    _ => pair.to_string(),
                })
                .collect();
            out.push_str(&pairs.join("&"));
            if let Some(f) = fragment {
                out.push('#');
                out.push_str(f);
            }
        }
    }
    out
}

/// Where the user info of `rest` (a URL after its `scheme://`) ends: the last '@' that a host
/// follows. A raw password may contain '@', '/', '?' or ':' (invalid, but seen in env files), so
/// the first '@' is not enough; an '@' inside a query value (`?application_name=a@b`) is not one.
fn userinfo_end(rest: &str) -> Option<usize> {
    let host_char = |c: char| c.is_ascii_alphanumeric() || ".-:,[]%_".contains(c);
    rest.match_indices('@').map(|(i, _)| i).rev().find(|&at| {
        let after = &rest[at + 1..];
        let host = &after[..after.find(['/', '?', '#']).unwrap_or(after.len())];
        let in_query = rest[..at]
            .rfind('?')
            .is_some_and(|q| rest[q..at].contains('='));
        !host.is_empty() && host.chars().all(host_char) && !in_query
    })
}

/// Percent-decodes a URL component (invalid escapes kept as they are, invalid UTF-8 replaced).
fn pct_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Redacts `name=value`, `name: "value"` and `"name":"value"` where the name is a secret's.
///
/// Values follow libpq's rules: `'quoted'` (backslash escapes) or unquoted up to whitespace
/// (backslash escapes too); `"double-quoted"` for `Debug` and JSON. After `?` or `&` (a query
/// string outside a recognised URL) `&` also ends an unquoted value. In free text (`whole` false:
/// a log line, an error) an unescaped `"` ends it too, so a JSON log line stays JSON; in a whole
/// connection string it is an ordinary character of the value, as libpq reads it.
fn redact_pairs(text: &str, whole: bool) -> String {
    if !text.contains('=') && !text.contains(':') {
        return text.to_string();
    }
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        let starts_name = is_name_byte(bytes[i]) && (i == 0 || !is_name_byte(bytes[i - 1]));
        if !starts_name {
            i += 1;
            continue;
        }
        let name_end = i + bytes[i..].iter().take_while(|b| is_name_byte(**b)).count();
        let in_query = i > 0 && matches!(bytes[i - 1], b'?' | b'&');
        let quoted_name = i > 0 && bytes[i - 1] == b'"';
        // The value first: most words are not followed by one, and the name check allocates.
        let value = secret_value(text, name_end, quoted_name, in_query, whole)
            .filter(|_| is_secret_name(&text[i..name_end]));
        if let Some((value_start, value_end)) = value {
            out.push_str(&text[copied..value_start]);
            out.push_str(MASK);
            copied = value_end;
            i = value_end;
        } else {
            i = name_end;
        }
    }
    out.push_str(&text[copied..]);
    out
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')
}

/// The byte range of the value that follows a secret's name ending at `at`, if one does.
fn secret_value(
    text: &str,
    at: usize,
    quoted_name: bool,
    in_query: bool,
    whole: bool,
) -> Option<(usize, usize)> {
    let b = text.as_bytes();
    let mut j = at;
    if quoted_name {
        if b.get(j) == Some(&b'"') {
            j += 1;
        } else if text[j..].starts_with("\\\"") {
            j += 2;
        }
    }
    let skip_ws = |mut j: usize| {
        while j < b.len() && (b[j] == b' ' || b[j] == b'\t') {
            j += 1;
        }
        j
    };
    j = skip_ws(j);
    let sep = *b.get(j)?;
    if sep != b'=' && sep != b':' {
        return None;
    }
    j = skip_ws(j + 1);
    if j >= b.len() {
        return None;
    }
    let rest = &text[j..];
    // `Some("x")` in Debug output.
    let (j, rest) = match rest.strip_prefix("Some(") {
        Some(r) => (j + 5, r),
        None => (j, rest),
    };
    // Quotes are kept, so that JSON and Debug output keep their shape.
    let (start, end) = if let Some(r) = rest.strip_prefix("\\\"") {
        // A double quote escaped inside a JSON string: up to the next escaped quote.
        (j + 2, j + 2 + r.find("\\\"").unwrap_or(r.len()))
    } else if rest.starts_with('\'') || rest.starts_with('"') {
        (j + 1, j + quoted_end(rest))
    } else if sep == b':' {
        // `name: value` without quotes is prose ("token: expired"), not a secret.
        return None;
    } else {
        (j, j + unquoted_end(rest, in_query, whole))
    };
    (end > start).then_some((start, end))
}

/// The end of the content of a value that starts with a quote: the matching unescaped quote, or
/// the end of the text when it is unterminated.
fn quoted_end(s: &str) -> usize {
    let mut chars = s.char_indices();
    let Some((_, q)) = chars.next() else {
        return 0;
    };
    while let Some((k, c)) = chars.next() {
        if c == '\\' {
            chars.next();
        } else if c == q {
            return k;
        }
    }
    s.len()
}

/// The end of an unquoted value: whitespace (a backslash escapes the next character, as libpq
/// reads it), `&` in a query string, `"` in free text. In a whole connection string a password
/// typed with spaces and without quotes runs on to the next libpq keyword: those words are the
/// password the operator meant, whatever libpq makes of them.
fn unquoted_end(s: &str, in_query: bool, whole: bool) -> usize {
    let mut chars = s.char_indices();
    while let Some((k, c)) = chars.next() {
        if c == '\\' {
            chars.next();
        } else if c.is_whitespace() && whole && !in_query {
            let next = s[k..].trim_start();
            let keyword = next
                .split(|c: char| c == '=' || c.is_whitespace())
                .next()
                .unwrap_or("");
            let assigns = next[keyword.len()..].trim_start().starts_with('=');
            if next.is_empty() || (assigns && LIBPQ_KEYWORDS.contains(&keyword)) {
                return k;
            }
        } else if c.is_whitespace() || (in_query && matches!(c, '&' | '#')) || (!whole && c == '"')
        {
            return k;
        }
    }
    s.len()
}

/// libpq's connection keywords.
pub const LIBPQ_KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "require_auth",
    "channel_binding",
    "connect_timeout",
    "client_encoding",
    "options",
    "application_name",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "replication",
    "gssencmode",
    "sslmode",
    "sslnegotiation",
    "requiressl",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcertmode",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "requirepeer",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "service",
    "target_session_attrs",
    "load_balance_hosts",
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every secret below is a distinct word, so a leak of any piece of it is visible.
    fn clean(shown: &str, secrets: &[&str]) {
        for s in secrets {
            assert!(!shown.contains(s), "{s:?} leaks in {shown:?}");
        }
    }

    #[test]
    fn url_user_info() {
        assert_eq!(
            redact_url("postgres://leasehold:hunter2@db:5432/x"),
            "postgres://leasehold:***@db:5432/x"
        );
        assert_eq!(
            redact_url("mqtt://dev:s3cret@broker:1884"),
            "mqtt://dev:***@broker:1884"
        );
        // Raw '@', '/', '?' and ':' inside a password (invalid, but seen in env files).
        assert_eq!(
            redact_url("postgres://u:p@ss/w?rd:x@h1:5432,h2:5432/db?sslmode=require"),
            "postgres://u:***@h1:5432,h2:5432/db?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://u:pa%40ss@h/db"),
            "postgres://u:***@h/db"
        );
        // A space in a known value does not end the URL.
        clean(
            &redact_url("postgres://u:two words@h/db"),
            &["two", "words"],
        );
        // No password: nothing to hide, the user stays visible.
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
        // An '@' in the query is not user info.
        assert_eq!(
            redact_url("postgres://u:pw@h/db?application_name=a@b"),
            "postgres://u:***@h/db?application_name=a@b"
        );
    }

    #[test]
    fn url_query_parameters() {
        assert_eq!(
            redact_url("postgres://u@h/db?password=hunter2"),
            "postgres://u@h/db?password=***"
        );
        assert_eq!(
            redact_url("postgres://h/db?sslmode=verify-full&sslpassword=k3y&password=pw&sslkey=/etc/k.pem&connect_timeout=5"),
            "postgres://h/db?sslmode=verify-full&sslpassword=***&password=***&sslkey=/etc/k.pem&connect_timeout=5"
        );
        let shown = redact_url(
            "postgres://h/db?PASSWORD=a1&api_key=a2&access_token=a3&client_secret=a4&pass%77ord=a5&key=a6#frag",
        );
        clean(&shown, &["a1", "a2", "a3", "a4", "a5", "a6"]);
        assert!(shown.ends_with("#frag"), "{shown}");
    }

    #[test]
    fn libpq_key_value_strings() {
        assert_eq!(
            redact_url("host=db password=x user=u"),
            "host=db password=*** user=u"
        );
        assert_eq!(
            redact_url("host=db password='x y z' user=u"),
            "host=db password='***' user=u"
        );
        assert_eq!(
            redact_url(r"host=db password='it\'s a secret' user=u"),
            "host=db password='***' user=u"
        );
        assert_eq!(
            redact_url(r"host=db password=two\ words user=u"),
            "host=db password=*** user=u"
        );
        assert_eq!(
            redact_url("host=db password = spaced sslpassword=k user=u"),
            "host=db password = *** sslpassword=*** user=u"
        );
        // A password typed with spaces and no quotes: up to the next keyword.
        assert_eq!(
            redact_url("host=db password=two words=x  user=u"),
            "host=db password=***  user=u"
        );
        assert_eq!(
            redact_url("host=db password=to the end"),
            "host=db password=***"
        );
        // A raw '"' too.
        assert_eq!(
            redact_url(r#"host=db password=qq"rr"ss user=u"#),
            "host=db password=*** user=u"
        );
        // An '&' is an ordinary character of an unquoted libpq value.
        clean(&redact_url("host=db password=a&b&c"), &["a&b", "&b", "&c"]);
        // Unterminated quote: everything after it is hidden.
        clean(
            &redact_url("host=db password='open to the end"),
            &["open", "end"],
        );
        assert_eq!(
            redact_url("host=db sslkey=/etc/k.pem"),
            "host=db sslkey=/etc/k.pem"
        );
    }

    #[test]
    fn webhook_urls_hide_their_path() {
        assert_eq!(
            redact_url("https://hooks.slack.com/services/T000/B000/XXXXtoken"),
            "https://hooks.slack.com/***"
        );
        assert_eq!(
            redact_url("https://discord.com/api/webhooks/123/abc?wait=true"),
            "https://discord.com/***"
        );
        assert_eq!(
            redact_url("https://TOKEN123@example.com/x"),
            "https://***@example.com/***"
        );
        assert_eq!(redact_url("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(
            redact_url("http://127.0.0.1:8080/"),
            "http://127.0.0.1:8080/"
        );
    }

    #[test]
    fn free_text_error_messages_and_log_lines() {
        let line = "cannot connect to postgres://u:pw1@h/db?password=pw2 (retrying); webhook https://hooks.slack.com/services/T/B/pw3 failed";
        let shown = redact(line);
        clean(&shown, &["pw1", "pw2", "pw3"]);
        assert!(
            shown.contains("postgres://u:***@h/db?password=***"),
            "{shown}"
        );
        assert!(shown.contains("(retrying)"), "{shown}");

        // Debug output of a struct holding secrets, and the same inside a JSON log line.
        let debug =
            r#"Login { username: "u", password: "pw4" } Cfg { token: Some("pw5"), key: None }"#;
        let shown = redact(debug);
        clean(&shown, &["pw4", "pw5"]);
        assert!(shown.contains(r#"username: "u""#), "{shown}");
        let json = r#"{"message":"x","config":"Config { password: Some(\"pw6\"), url: Some(\"postgres://u:pw7@h\") }","password":"pw8","api_key": "pw9"}"#;
        clean(&redact(json), &["pw6", "pw7", "pw8", "pw9"]);
        // A pair inside a JSON string ends at the string's end, so the line stays JSON.
        assert_eq!(
            redact(r#"{"message":"using password=pw13","level":"INFO"}"#),
            r#"{"message":"using password=***","level":"INFO"}"#
        );
        assert_eq!(
            redact(r#"{"message":"password=p\"w14 x"}"#),
            r#"{"message":"password=*** x"}"#
        );

        // Log fields and environment-style assignments.
        let shown = redact("MQTT_PASSWORD=pw10 DATABASE_URL=postgres://u:pw11@h x=1");
        clean(&shown, &["pw10", "pw11"]);
        assert!(shown.ends_with("x=1"), "{shown}");
        // A query string seen without its URL.
        clean(&redact("?password=pw12&user=u"), &["pw12"]);

        // Prose is left alone.
        for prose in [
            "token: expired",
            "renew failed: database did not answer",
            "the key is (device_id, topic, ts)",
            "password authentication failed for user \"u\"",
            "mqtt://broker:1883",
        ] {
            assert_eq!(redact(prose), prose);
        }
    }

    #[test]
    fn secret_names() {
        for n in [
            "password",
            "sslpassword",
            "MQTT_PASSWORD",
            "passwd",
            "pwd",
            "secret",
            "client_secret",
            "token",
            "access-token",
            "api_key",
            "apikey",
            "key",
            "private_key",
            "X-Amz-Signature",
            "Authorization",
            "credentials",
        ] {
            assert!(is_secret_name(n), "{n}");
        }
        for n in [
            "user",
            "host",
            "sslkey",
            "MQTT_CLIENT_KEY",
            "passfile",
            "sslmode",
            "keepalives",
            "kind",
        ] {
            assert!(!is_secret_name(n), "{n}");
        }
    }
}
