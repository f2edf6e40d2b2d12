//! A replicated PostgreSQL run by a real failover manager: a pg_auto_failover monitor and two
//! nodes (a primary and a synchronous standby) on free loopback ports, for the tests and chaos
//! rows that take the database through a failover.
//!
//! Every `pg_autoctl` process runs as the servers' unprivileged user, with its own `HOME` and
//! XDG folders in this cluster's temporary folder (pg_autoctl keeps its state and configuration
//! there, so two clusters never share any), and each keeper in a session of its own (`setsid`),
//! so that a node can be killed as a host is lost: keeper and postmaster together. The monitor's
//! health checks are shortened ([`FAST_MONITOR`]) so that a lost primary is replaced in seconds
//! instead of pg_auto_failover's default half minute.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{as_user, chown_dir, eventually, free_port, run_as, server_user, signal, Dir};

/// The monitor settings the tests run with (pg_auto_failover's defaults in comments): a node is
/// judged unhealthy after ~3 s without answers instead of 20 s, and a primary that does not
/// answer is given 3 s to demote itself instead of 30 s.
pub const FAST_MONITOR: &[(&str, &str)] = &[
    ("pgautofailover.health_check_period", "1000"), // 5000 ms
    ("pgautofailover.health_check_timeout", "1000"), // 5000 ms
    ("pgautofailover.health_check_max_retries", "1"), // 2
    ("pgautofailover.health_check_retry_delay", "500"), // 2000 ms
    ("pgautofailover.node_considered_unhealthy_timeout", "3000"), // 20000 ms
    ("pgautofailover.startup_grace_period", "2000"), // 10000 ms
    ("pgautofailover.primary_demote_timeout", "3000"), // 30000 ms
];

/// Where the PostgreSQL 15 server binaries are: pg_autoctl finds `pg_ctl` on `PATH`.
const PG15_BIN: &str = "/usr/lib/postgresql/15/bin";

/// One data node: its keeper (`pg_autoctl run`) and the PostgreSQL it manages.
pub struct PgafNode {
    /// The node's name at the monitor (`node_1`, `node_2`).
    pub name: String,
    pub port: u16,
    pgdata: PathBuf,
    keeper: Option<Child>,
}

impl PgafNode {
    /// Whether its keeper runs (it was not killed as a lost host).
    pub fn is_running(&self) -> bool {
        self.keeper.is_some()
    }
}

/// A node as the monitor sees it (a row of `pgautofailover.node`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    pub name: String,
    pub port: u16,
    /// The state the node's keeper last reported (`primary`, `secondary`, `wait_primary`, …).
    pub reported: String,
    /// The state the monitor assigned to it.
    pub goal: String,
}

impl NodeState {
    /// Reported and assigned both `state`: the node has settled there.
    pub fn is(&self, state: &str) -> bool {
        self.reported == state && self.goal == state
    }
}

/// A pg_auto_failover formation: a monitor and two nodes. Stopped and removed on drop.
pub struct Pgaf {
    dir: Dir,
    user: Option<(u32, u32)>,
    /// The PostgreSQL superuser of every node: the operating-system user pg_autoctl runs as.
    superuser: String,
    pub monitor_port: u16,
    monitor: Option<Child>,
    pub nodes: Vec<PgafNode>,
}

/// The name of the user `uid` (the superuser pg_autoctl's `initdb` creates).
fn user_name(uid: u32) -> String {
    // SAFETY: getpwuid returns a pointer into static storage or null; read at once.
    let pw = unsafe { libc::getpwuid(uid) };
    if pw.is_null() {
        return "postgres".into();
    }
    // SAFETY: a non-null passwd entry has a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr((*pw).pw_name) }
        .to_string_lossy()
        .into_owned()
}

/// Pids whose parent is `pid` (the postmaster's children run in sessions of their own, so
/// killing the keeper's session does not reach them).
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    // pid (comm) state ppid ...: comm may hold spaces, so read after ')'.
                    let rest = &s[s.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// The postmaster's pid, from the first line of `postmaster.pid` in `pgdata`.
fn postmaster_pid(pgdata: &Path) -> Option<i32> {
    std::fs::read_to_string(pgdata.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

impl Pgaf {
    /// A monitor and two nodes; returns once one is primary and the other a secondary
    /// streaming synchronously (about 15 s).
    pub async fn start() -> Result<Self> {
        let user = server_user();
        // SAFETY: getuid has no preconditions.
        let superuser = user_name(user.map_or_else(|| unsafe { libc::getuid() }, |(u, _)| u));
        let dir = Dir::temp("leasehold-pgaf-")?;
        chown_dir(dir.path(), user)?;
        for sub in ["home", "config", "data", "run"] {
            let p = dir.path().join(sub);
            std::fs::create_dir_all(&p)?;
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
            chown_dir(&p, user)?;
        }
        let mut pgaf = Pgaf {
            dir,
            user,
            superuser,
            monitor_port: free_port()?,
            monitor: None,
            nodes: Vec::new(),
        };
        let mon = pgaf.dir.path().join("monitor");
        let port = pgaf.monitor_port.to_string();
        let child = pgaf.spawn(
            "monitor",
            &[
                "create",
                "monitor",
                "--pgdata",
                &mon.to_string_lossy(),
                "--pgport",
                &port,
                "--hostname",
                "127.0.0.1",
                "--auth",
                "trust",
                "--no-ssl",
                "--run",
            ],
        )?;
        pgaf.monitor = Some(child);
        eventually(
            Duration::from_secs(60),
            "the pg_auto_failover monitor",
            || {
                let pgaf = &pgaf;
                async move { Ok(pgaf.monitor_client().await.is_ok()) }
            },
        )
        .await
        .with_context(|| pgaf.logs())?;
        pgaf.tune_monitor().await?;
        for i in 1..=2 {
            pgaf.create_node(i)?;
            // One at a time: the first becomes the primary, the second its standby.
            let want = if i == 1 { "single" } else { "secondary" };
            let name = format!("node_{i}");
            eventually(
                Duration::from_secs(90),
                &format!("{name} to be {want}"),
                || {
                    let (pgaf, name) = (&pgaf, &name);
                    async move { Ok(pgaf.node_state(name).await?.is_some_and(|s| s.is(want))) }
                },
            )
            .await
            .with_context(|| pgaf.logs())?;
        }
        pgaf.wait_pair(Duration::from_secs(60)).await?;
        Ok(pgaf)
    }

    /// A `pg_autoctl` command as the servers' user, with this cluster's own HOME and XDG
    /// folders and the PostgreSQL 15 binaries first on `PATH`.
    fn command(&self, args: &[&str]) -> Command {
        let root = self.dir.path();
        let mut cmd = Command::new("pg_autoctl");
        cmd.args(args)
            .current_dir(root)
            .env_clear()
            .env(
                "PATH",
                format!(
                    "{PG15_BIN}:{}",
                    std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
                ),
            )
            .env("HOME", root.join("home"))
            .env("XDG_CONFIG_HOME", root.join("config"))
            .env("XDG_DATA_HOME", root.join("data"))
            .env("XDG_RUNTIME_DIR", root.join("run"))
            .stdin(Stdio::null());
        as_user(&mut cmd, self.user);
        cmd
    }

    /// A long-running `pg_autoctl` in a session of its own, logging to `<log>.log`.
    fn spawn(&self, log: &str, args: &[&str]) -> Result<Child> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{log}.log")))?;
        let mut cmd = self.command(args);
        cmd.stdout(out.try_clone()?).stderr(out);
        // SAFETY: setsid is async-signal-safe; the new session makes keeper and postmaster one
        // process group to kill as a host.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        cmd.spawn()
            .context("starting pg_autoctl (apt-get install -y pg-auto-failover-cli postgresql-15-auto-failover)")
    }

    /// Runs a short `pg_autoctl` command to its end (bounded by `timeout`), failing with its
    /// output when it fails.
    pub async fn autoctl(&self, args: &[&str], timeout: Duration) -> Result<String> {
        let mut cmd = tokio::process::Command::from(self.command(args));
        cmd.kill_on_drop(true);
        let out = tokio::time::timeout(timeout, cmd.output())
            .await
            .with_context(|| format!("pg_autoctl {} took over {timeout:?}", args.join(" ")))??;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("pg_autoctl {} failed: {text}", args.join(" "));
        }
        Ok(text)
    }

    fn create_node(&mut self, i: usize) -> Result<()> {
        let name = format!("node_{i}");
        let port = free_port()?;
        let pgdata = self.dir.path().join(&name);
        if i == 1 {
            self.initdb(&pgdata)?;
        }
        let monitor = self.monitor_url();
        let keeper = self.spawn(
            &name,
            &[
                "create",
                "postgres",
                "--pgdata",
                &pgdata.to_string_lossy(),
                "--pgport",
                &port.to_string(),
                "--name",
                &name,
                "--hostname",
                "127.0.0.1",
                "--listen",
                "127.0.0.1",
                "--auth",
                "trust",
                "--no-ssl",
                "--monitor",
                &monitor,
                "--run",
            ],
        )?;
        self.nodes.push(PgafNode {
            name,
            port,
            pgdata,
            keeper: Some(keeper),
        });
        Ok(())
    }

    /// The first node's data folder, made here rather than by pg_autoctl so that it commits
    /// with timestamps (`track_commit_timestamp`, which needs a restart to change): the checks
    /// for rows written under a stale epoch read them. The standby is a copy, settings included.
    fn initdb(&self, pgdata: &Path) -> Result<()> {
        let mut cmd = Command::new(Path::new(PG15_BIN).join("initdb"));
        cmd.args(["-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync", "-D"])
            .arg(pgdata)
            .current_dir(self.dir.path());
        run_as(&mut cmd, self.user, "initdb")?;
        let conf = pgdata.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)?;
        text.push_str("\ntrack_commit_timestamp = on\n");
        std::fs::write(&conf, text)?;
        Ok(())
    }

    /// The monitor's URL for keepers and for reading node states.
    pub fn monitor_url(&self) -> String {
        format!(
            "postgres://autoctl_node@127.0.0.1:{}/pg_auto_failover?sslmode=disable",
            self.monitor_port
        )
    }

    async fn monitor_client(&self) -> Result<tokio_postgres::Client> {
        connect(&self.monitor_url()).await
    }

    /// Shortens the monitor's health checks ([`FAST_MONITOR`]); `ALTER SYSTEM` one setting at
    /// a time (it may not run in a transaction), then a reload.
    async fn tune_monitor(&self) -> Result<()> {
        let c = connect(&format!(
            "postgres://{}@127.0.0.1:{}/pg_auto_failover?sslmode=disable",
            self.superuser, self.monitor_port
        ))
        .await?;
        for (k, v) in FAST_MONITOR {
            c.simple_query(&format!("ALTER SYSTEM SET {k} = '{v}'"))
                .await
                .with_context(|| format!("setting {k}"))?;
        }
        c.simple_query("SELECT pg_reload_conf()").await?;
        Ok(())
    }

    /// Every node as the monitor sees it.
    pub async fn state(&self) -> Result<Vec<NodeState>> {
        let c = self.monitor_client().await?;
        let rows = c
            .query(
                "SELECT nodename, nodeport::int, reportedstate::text, goalstate::text
                 FROM pgautofailover.node ORDER BY nodeid",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| NodeState {
                name: r.get(0),
                port: r.get::<_, i32>(1) as u16,
                reported: r.get(2),
                goal: r.get(3),
            })
            .collect())
    }

    async fn node_state(&self, name: &str) -> Result<Option<NodeState>> {
        Ok(self.state().await?.into_iter().find(|s| s.name == name))
    }

    /// Waits until one node is `primary` and the other `secondary` (settled at both ends).
    pub async fn wait_pair(&self, timeout: Duration) -> Result<()> {
        eventually(timeout, "a primary and a secondary", || async {
            let s = self.state().await?;
            Ok(s.iter().filter(|n| n.is("primary")).count() == 1
                && s.iter().filter(|n| n.is("secondary")).count() == 1)
        })
        .await
        .with_context(|| self.logs())?;
        Ok(())
    }

    /// The node the monitor has as primary now (assigned `primary` or `wait_primary`).
    pub async fn primary(&self) -> Result<String> {
        let s = self.state().await?;
        s.iter()
            .find(|n| matches!(n.goal.as_str(), "primary" | "wait_primary" | "single"))
            .map(|n| n.name.clone())
            .with_context(|| format!("no primary in {s:?}"))
    }

    /// The URL Leasehold is given: both nodes, the one that accepts writes chosen
    /// (`target_session_attrs=read-write`), as the superuser in database `postgres`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!(
            "postgres://{}@{}/postgres?target_session_attrs=read-write&connect_timeout=2",
            self.superuser,
            hosts.join(",")
        )
    }

    /// The URL of one node only (to read a standby, or a node's own settings).
    pub fn node_url(&self, name: &str) -> Result<String> {
        let n = self.node(name)?;
        Ok(format!(
            "postgres://{}@127.0.0.1:{}/postgres?connect_timeout=2",
            self.superuser, n.port
        ))
    }

    fn node(&self, name: &str) -> Result<&PgafNode> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    }

    /// A client on the current primary.
    pub async fn client(&self) -> Result<tokio_postgres::Client> {
        connect(&self.url()).await
    }

    /// Loses `name`'s host: SIGKILL to its keeper's session (keeper and postmaster) and to the
    /// postmaster's children, which run in sessions of their own. Returns when all are gone.
    pub async fn kill_host(&mut self, name: &str) -> Result<()> {
        let i = self
            .nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node {name}"))?;
        kill_node(&mut self.nodes[i]);
        let pgdata = self.nodes[i].pgdata.clone();
        let pm = postmaster_pid(&pgdata);
        eventually(
            Duration::from_secs(10),
            "the killed host's processes to go",
            || async move { Ok(pm.is_none_or(|p| !alive(p))) },
        )
        .await?;
        Ok(())
    }

    /// Loses the primary's host; returns the name of the node that was primary.
    pub async fn kill_primary_host(&mut self) -> Result<String> {
        let primary = self.primary().await?;
        self.kill_host(&primary).await?;
        Ok(primary)
    }

    /// Starts a node's keeper again (`pg_autoctl run`): it rejoins as the monitor tells it.
    pub fn start_node(&mut self, name: &str) -> Result<()> {
        let i = self
            .nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node {name}"))?;
        if self.nodes[i].keeper.is_some() {
            bail!("{name} is running");
        }
        let pgdata = self.nodes[i].pgdata.to_string_lossy().into_owned();
        let keeper = self.spawn(name, &["run", "--pgdata", &pgdata])?;
        self.nodes[i].keeper = Some(keeper);
        Ok(())
    }

    /// A planned switchover (`pg_autoctl perform switchover`, which returns once done).
    pub async fn perform_switchover(&self) -> Result<()> {
        let mon = self.dir.path().join("monitor");
        self.autoctl(
            &["perform", "switchover", "--pgdata", &mon.to_string_lossy()],
            Duration::from_secs(90),
        )
        .await?;
        Ok(())
    }

    /// Makes `name` (a standby) an asynchronous one: it leaves the write quorum, so the
    /// primary's `synchronous_standby_names` becomes empty and commits no longer wait for it.
    pub async fn set_async(&self, name: &str) -> Result<()> {
        let n = self.node(name)?;
        self.autoctl(
            &[
                "set",
                "node",
                "replication-quorum",
                "false",
                "--pgdata",
                &n.pgdata.to_string_lossy(),
            ],
            Duration::from_secs(60),
        )
        .await?;
        Ok(())
    }

    /// Pauses (SIGSTOP) or resumes (SIGCONT) the WAL senders of `name` (a primary): its
    /// standbys fall behind while every process looks healthy, as over a slow link. (Pausing
    /// the standby's receiver instead would not do: the kernel's socket buffer keeps what was
    /// sent, and the standby reads it all once resumed, even after the primary is gone.)
    pub fn pause_wal_senders(&self, name: &str, paused: bool) -> Result<()> {
        let n = self.node(name)?;
        let pm = postmaster_pid(&n.pgdata).with_context(|| format!("{name} is not running"))?;
        let senders: Vec<i32> = children_of(pm)
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.contains("walsender"))
            })
            .collect();
        if senders.is_empty() {
            bail!("{name} has no WAL sender");
        }
        for p in senders {
            signal(p as u32, if paused { libc::SIGSTOP } else { libc::SIGCONT });
        }
        Ok(())
    }

    /// The name of the node other than `name`.
    pub fn other_than(&self, name: &str) -> String {
        self.nodes
            .iter()
            .map(|n| n.name.clone())
            .find(|n| n != name)
            .unwrap_or_default()
    }

    /// The monitor's and every keeper's log, for failure reports.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for name in std::iter::once("monitor").chain(self.nodes.iter().map(|n| n.name.as_str())) {
            let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            s.push_str(&format!(
                "\n===== pg_autoctl {name} =====\n{}",
                lines[lines.len().saturating_sub(40)..].join("\n")
            ));
        }
        s
    }
}

/// SIGKILL to a node's keeper session, its postmaster and the postmaster's children.
fn kill_node(node: &mut PgafNode) {
    let pm = postmaster_pid(&node.pgdata).filter(|p| alive(*p));
    let kids = pm.map(children_of).unwrap_or_default();
    if let Some(mut k) = node.keeper.take() {
        // The keeper leads its own session: its pid is the process group's id.
        signal_group(k.id() as i32, libc::SIGKILL);
        let _ = k.kill();
        let _ = k.wait();
    }
    if let Some(pm) = pm {
        signal(pm as u32, libc::SIGKILL);
    }
    for k in kids {
        signal(k as u32, libc::SIGKILL);
    }
}

fn signal_group(pgid: i32, sig: i32) {
    // SAFETY: kill(2) on a process group this module started; an error (gone) is harmless.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

impl Drop for Pgaf {
    fn drop(&mut self) {
        // Immediate shutdown of every postmaster first (it removes its shared memory), then
        // SIGKILL to whatever remains of each keeper's session.
        let pgdatas: Vec<PathBuf> = std::iter::once(self.dir.path().join("monitor"))
            .chain(self.nodes.iter().map(|n| n.pgdata.clone()))
            .collect();
        let pms: Vec<i32> = pgdatas
            .iter()
            .filter_map(|d| postmaster_pid(d))
            .filter(|p| alive(*p))
            .collect();
        let keepers: Vec<i32> = self
            .monitor
            .iter()
            .chain(self.nodes.iter().filter_map(|n| n.keeper.as_ref()))
            .map(|c| c.id() as i32)
            .collect();
        // Keepers stopped first (SIGSTOP to each supervisor and its workers; the postmaster,
        // in the same process group, is left running), so none restarts a postmaster stopped
        // below; then an immediate shutdown of each postmaster.
        for k in &keepers {
            signal(*k as u32, libc::SIGSTOP);
            for w in children_of(*k) {
                if !pms.contains(&w) {
                    signal(w as u32, libc::SIGSTOP);
                }
            }
        }
        for pm in &pms {
            signal(*pm as u32, libc::SIGQUIT);
        }
        let started = Instant::now();
        while pms.iter().any(|p| alive(*p)) && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        for pm in &pms {
            for k in children_of(*pm) {
                signal(k as u32, libc::SIGKILL);
            }
            signal(*pm as u32, libc::SIGKILL);
        }
        for k in &keepers {
            signal_group(*k, libc::SIGKILL);
        }
        for c in self
            .monitor
            .iter_mut()
            .chain(self.nodes.iter_mut().filter_map(|n| n.keeper.as_mut()))
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A client on its own connection (no TLS: loopback, `--no-ssl`).
async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (c, conn) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .context("connecting took over 5 s")??;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(c)
}
