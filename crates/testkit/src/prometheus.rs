//! A real Prometheus (Debian's package) on loopback, scraping whatever the test names.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{eventually, free_port, http, Dir};

pub struct Prometheus {
    pub port: u16,
    dir: Dir,
    child: Option<Child>,
}

impl Prometheus {
    /// Scrapes `targets` (host:port) every second as job `leasehold`, with `rule_files` loaded.
    pub async fn start(targets: &[String], rule_files: &[&Path]) -> Result<Self> {
        let dir = Dir::temp("leasehold-prometheus-")?;
        let port = free_port()?;
        let rules: Vec<String> = rule_files
            .iter()
            .map(|p| format!("  - {}\n", p.display()))
            .collect();
        let conf = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{}scrape_configs:\n  - job_name: leasehold\n    static_configs:\n      - targets: [{}]\n",
            rules.concat(),
            targets
                .iter()
                .map(|t| format!("\"{t}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let conf_path = dir.path().join("prometheus.yml");
        std::fs::write(&conf_path, conf)?;
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", conf_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting prometheus (apt-get install -y prometheus)")?;
        let p = Prometheus {
            port,
            dir,
            child: Some(child),
        };
        eventually(Duration::from_secs(30), "prometheus ready", || async move {
            Ok(matches!(http(port, "GET", "/-/ready").await, Ok((200, _))))
        })
        .await
        .with_context(|| format!("prometheus log:\n{}", p.log()))?;
        Ok(p)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query through the HTTP API: the raw JSON answer.
    pub async fn query(&self, promql: &str) -> Result<String> {
        let (code, body) = http(
            self.port,
            "GET",
            &format!("/api/v1/query?query={}", percent_encode(promql)),
        )
        .await?;
        anyhow::ensure!(code == 200, "query {promql:?}: HTTP {code}: {body}");
        Ok(body)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
