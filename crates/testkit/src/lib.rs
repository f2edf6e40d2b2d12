//! Real servers for tests, benchmarks and the demo: a private PostgreSQL (initdb into a temporary
//! folder) and a private Mosquitto (the project's `deploy/mosquitto/mosquitto.conf`), both on free
//! loopback ports, plus control of `leasehold` node processes and a QoS 1 publisher.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root both servers run as an
//! unprivileged user (`postgres` if it exists, else `nobody`).
//!
//! # Layout
//! - [`Postgres`], [`Mosquitto`]: start, stop, restart, kill; stopped on drop.
//! - [`NodeProc`]: a `leasehold` process with its log file; signals.
//! - [`pgaf`]: a replicated PostgreSQL run by pg_auto_failover (monitor + two nodes), for
//!   database failover tests.
//! - [`cluster`]: servers plus nodes as one [`cluster::Cluster`], and the queries that say who
//!   leads and what was stored; the end-to-end suite and the demo build on it.
//! - [`http`]: requests to a node's HTTP port (`reqwest`).
//! - [`webhook`]: an alert webhook receiver that records what it got (`wiremock`).
//! - [`publish`]: numbered and raw QoS 1 publishing that waits for the broker's acks.
//! - [`eventually`]: await a condition instead of sleeping.

pub mod certs;
pub mod cluster;
pub mod pgaf;
pub mod prometheus;
pub mod proxy;
pub mod publish;
pub mod webhook;

use std::fs::File;
use std::future::Future;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The lease the nodes started here contend for: they leave `LEASE_NAME` at its default. Ask
/// `leasehold_store::current_leader` about it rather than reading `instance_lock` by hand.
pub const LEASE_NAME: &str = "mqtt-ingest";

/// A free TCP port on 127.0.0.1 (released before use; good enough on a test machine).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The uid/gid servers run as: ourselves, or an unprivileged user when we are root.
fn server_user() -> Option<(u32, u32)> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return None;
    }
    for name in [c"postgres", c"nobody"] {
        // SAFETY: getpwnam returns a pointer into static storage or null; read at once.
        let pw = unsafe { libc::getpwnam(name.as_ptr()) };
        if !pw.is_null() {
            // SAFETY: non-null pointer from getpwnam.
            let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
            return Some((uid, gid));
        }
    }
    Some((65534, 65534))
}

fn chown_dir(path: &Path, user: Option<(u32, u32)>) -> Result<()> {
    if let Some((u, g)) = user {
        std::os::unix::fs::chown(path, Some(u), Some(g))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

/// Hands a file or folder to the user the servers run as (no-op when not root).
pub fn give_to_servers(path: &Path) -> Result<()> {
    chown_dir(path, server_user())
}

fn as_user(cmd: &mut Command, user: Option<(u32, u32)>) {
    if let Some((u, g)) = user {
        cmd.uid(u).gid(g);
    }
}

/// Runs a server tool (`initdb`, `pg_basebackup`) to its end as `user`; its error output is the
/// error when it fails.
pub(crate) fn run_as(cmd: &mut Command, user: Option<(u32, u32)>, what: &str) -> Result<()> {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    as_user(cmd, user);
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid we spawned; an error (already gone) is harmless here.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

fn wait_child(child: &mut Child, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A server's folder: temporary (removed on drop) or a fixed project folder (the demo).
pub enum Dir {
    Temp(tempfile::TempDir),
    Fixed(PathBuf),
}

impl Dir {
    pub fn temp(prefix: &str) -> Result<Dir> {
        Ok(Dir::Temp(
            tempfile::Builder::new().prefix(prefix).tempdir()?,
        ))
    }

    /// A fixed folder, emptied first.
    pub fn fixed(path: PathBuf) -> Result<Dir> {
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("clearing {}", path.display()))?;
        }
        std::fs::create_dir_all(&path)?;
        Ok(Dir::Fixed(path))
    }

    pub fn path(&self) -> &Path {
        match self {
            Dir::Temp(t) => t.path(),
            Dir::Fixed(p) => p,
        }
    }
}

/// Where the PostgreSQL server binaries are (`PG_BIN` overrides).
pub fn pg_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("PG_BIN") {
        return Ok(PathBuf::from(p));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL server binaries not found under /usr/lib/postgresql (install postgresql, or set PG_BIN)")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("postgres").exists())
        .collect();
    found.sort();
    found
        .pop()
        .context("no PostgreSQL version with a postgres binary under /usr/lib/postgresql")
}

/// Polls `f` every 50 ms until it returns true; fails with `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, f: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    eventually_every(timeout, Duration::from_millis(50), what, f).await
}

/// [`eventually`], polling every `every` (where each poll costs the system under measurement).
pub async fn eventually_every<F, Fut>(
    timeout: Duration,
    every: Duration,
    what: &str,
    mut f: F,
) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match f().await {
            Ok(true) => return Ok(start.elapsed()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() > timeout {
            match last_err {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what} (last error: {e:#})")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// A private PostgreSQL server.
pub struct Postgres {
    dir: Dir,
    pub port: u16,
    child: Option<Child>,
    user: Option<(u32, u32)>,
    bin: PathBuf,
    /// Extra environment of the server process (the benchmark's `LD_PRELOAD` storage shim).
    env: Vec<(String, String)>,
}

impl Postgres {
    /// initdb + start; tuned for tests (fsync off), which do not crash the OS.
    pub async fn start() -> Result<Self> {
        Self::start_in(Dir::temp("leasehold-pg-")?, false, "", &[]).await
    }

    /// Like [`Postgres::start`] with extra `postgresql.conf` lines.
    pub async fn start_with(extra_conf: &str) -> Result<Self> {
        Self::start_in(Dir::temp("leasehold-pg-")?, false, extra_conf, &[]).await
    }

    /// Start in `dir` with durable settings (benchmarks, the demo).
    pub async fn start_durable(dir: Dir) -> Result<Self> {
        Self::start_in(dir, true, "", &[]).await
    }

    /// Durable settings plus extra `postgresql.conf` lines (benchmarks).
    pub async fn start_durable_with(dir: Dir, extra_conf: &str) -> Result<Self> {
        Self::start_in(dir, true, extra_conf, &[]).await
    }

    /// Durable, with extra `postgresql.conf` lines and extra environment for the server process.
    pub async fn start_durable_env(
        dir: Dir,
        extra_conf: &str,
        env: &[(&str, String)],
    ) -> Result<Self> {
        Self::start_in(dir, true, extra_conf, env).await
    }

    async fn start_in(
        dir: Dir,
        durable: bool,
        extra_conf: &str,
        env: &[(&str, String)],
    ) -> Result<Self> {
        let user = server_user();
        let bin = pg_bin()?;
        chown_dir(dir.path(), user)?;
        let data = dir.path().join("data");
        let mut cmd = Command::new(bin.join("initdb"));
        cmd.args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "-D",
        ])
        .arg(&data);
        run_as(&mut cmd, user, "initdb")?;
        let mut conf = String::from("listen_addresses = '127.0.0.1'\nmax_connections = 200\n");
        if !durable {
            conf.push_str("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
        }
        conf.push_str(extra_conf);
        conf.push('\n');
        std::fs::write(data.join("postgresql.auto.conf"), conf)?;
        let mut pg = Postgres {
            dir,
            port: free_port()?,
            child: None,
            user,
            bin,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        };
        pg.launch().await?;
        Ok(pg)
    }

    async fn launch(&mut self) -> Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))?;
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        as_user(&mut cmd, self.user);
        self.child = Some(cmd.spawn().context("starting postgres")?);
        let url = self.url();
        eventually(
            Duration::from_secs(30),
            "postgres to accept connections",
            || {
                let url = url.clone();
                async move {
                    Ok(tokio_postgres::connect(&url, tokio_postgres::NoTls)
                        .await
                        .is_ok())
                }
            },
        )
        .await
        .with_context(|| format!("postgres log:\n{}", self.log()))?;
        Ok(())
    }

    /// The server's data directory (`postmaster.pid` is in it).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn url(&self) -> String {
        self.url_as("postgres")
    }

    /// The URL through a [`proxy::Proxy`] on `port` in front of this server.
    pub fn url_via(&self, port: u16) -> String {
        self.url()
            .replace(&format!(":{}/", self.port), &format!(":{port}/"))
    }

    /// The URL for another role of this server (trust authentication: no password).
    pub fn url_as(&self, role: &str) -> String {
        format!(
            "postgres://{role}@127.0.0.1:{}/postgres?connect_timeout=5",
            self.port
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// A client on its own connection.
    pub async fn client(&self) -> Result<tokio_postgres::Client> {
        let (c, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(c)
    }

    /// Fast shutdown (SIGINT): connections are closed, the server stops.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), libc::SIGINT);
            if !wait_child(&mut c, Duration::from_secs(20)) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        Ok(())
    }

    /// Start again on the same port and data.
    pub async fn start_again(&mut self) -> Result<()> {
        self.launch().await
    }

    /// The `application_name` of [`Postgres::start_standby`]'s standby.
    pub const STANDBY_NAME: &'static str = "leasehold_standby";

    /// A streaming standby of `primary` (`pg_basebackup -R`), named [`Postgres::STANDBY_NAME`]
    /// and made the primary's synchronous standby (`synchronous_standby_names`); returns once
    /// the primary reports it in sync. The primary must commit with `synchronous_commit` on
    /// (e.g. `Postgres::start_with("synchronous_commit = on")`) for commits to wait for it.
    pub async fn start_standby(primary: &Postgres) -> Result<Postgres> {
        let dir = Dir::temp("leasehold-pg-standby-")?;
        let user = primary.user;
        chown_dir(dir.path(), user)?;
        let data = dir.path().join("data");
        let mut cmd = Command::new(primary.bin.join("pg_basebackup"));
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
            "-X",
            "stream",
            "-R",
            "--no-sync",
            "-D",
        ])
        .arg(&data);
        run_as(&mut cmd, user, "pg_basebackup")?;
        // After -R's line: the same primary, under the name synchronous_standby_names uses.
        let mut conf = std::fs::read_to_string(data.join("postgresql.auto.conf"))?;
        conf.push_str(&format!(
            "primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name={}'\n",
            primary.port,
            Self::STANDBY_NAME
        ));
        std::fs::write(data.join("postgresql.auto.conf"), conf)?;
        let mut standby = Postgres {
            dir,
            port: free_port()?,
            child: None,
            user,
            bin: primary.bin.clone(),
            env: Vec::new(),
        };
        standby.launch().await?;
        let c = primary.client().await?;
        // Two statements: ALTER SYSTEM may not run in the implicit transaction of a batch.
        c.batch_execute(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = '{}'",
            Self::STANDBY_NAME
        ))
        .await?;
        c.batch_execute("SELECT pg_reload_conf()").await?;
        eventually(Duration::from_secs(30), "the standby to be in sync", || {
            let c = &c;
            async move {
                let rows = c
                    .query(
                        "SELECT 1 FROM pg_stat_replication
                             WHERE application_name = $1 AND sync_state = 'sync'",
                        &[&Self::STANDBY_NAME],
                    )
                    .await?;
                Ok(!rows.is_empty())
            }
        })
        .await
        .with_context(|| format!("standby log:\n{}", standby.log()))?;
        Ok(standby)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The project's broker configuration, found from this crate's location.
pub fn deploy_mosquitto_conf() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/mosquitto/mosquitto.conf")
}

/// A private Mosquitto using `deploy/mosquitto/mosquitto.conf` with its own port and folder.
pub struct Mosquitto {
    dir: Dir,
    pub port: u16,
    child: Option<Child>,
    user: Option<(u32, u32)>,
}

impl Mosquitto {
    pub async fn start() -> Result<Self> {
        Self::start_with(Dir::temp("leasehold-mqtt-")?, "").await
    }

    /// Start in `dir`, appending `extra` configuration lines.
    pub async fn start_with(dir: Dir, extra: &str) -> Result<Self> {
        let user = server_user();
        chown_dir(dir.path(), user)?;
        let base = std::fs::read_to_string(deploy_mosquitto_conf())
            .context("reading deploy/mosquitto/mosquitto.conf")?;
        let port = free_port()?;
        // The global settings (above the first listener), then a loopback listener of its own.
        let mut conf: String = base
            .lines()
            .take_while(|l| l.split_whitespace().next() != Some("listener"))
            .filter(|l| {
                let k = l.split_whitespace().next().unwrap_or("");
                !matches!(k, "persistence_location" | "log_dest" | "pid_file" | "user")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        conf.push_str(&format!(
            "persistence_location {}/\nlistener {port} 127.0.0.1\nallow_anonymous true\nlog_dest file {}/mosquitto.log\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\nconnection_messages true\n{extra}\n",
            dir.path().display(),
            dir.path().display()
        ));
        std::fs::write(dir.path().join("mosquitto.conf"), conf)?;
        let mut m = Mosquitto {
            dir,
            port,
            child: None,
            user,
        };
        m.launch().await?;
        Ok(m)
    }

    async fn launch(&mut self) -> Result<()> {
        // The broker writes mosquitto.log itself (unbuffered); stderr catches start-up errors.
        let err = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mosquitto.stderr"))?;
        let mut cmd = Command::new("mosquitto");
        cmd.arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err);
        as_user(&mut cmd, self.user);
        self.child = Some(
            cmd.spawn()
                .context("starting mosquitto (apt-get install -y mosquitto)")?,
        );
        let port = self.port;
        eventually(
            Duration::from_secs(15),
            "mosquitto to listen",
            || async move {
                Ok(tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok())
            },
        )
        .await
        .with_context(|| format!("mosquitto log:\n{}", self.log()))?;
        Ok(())
    }

    /// A broker whose anonymous clients are refused what `acls` says (entries of Mosquitto's
    /// dynamic-security plugin, e.g. `{"acltype": "subscribePattern", "topic": "a/#", "allow":
    /// false, "priority": 0}`), everything else allowed. Mosquitto 2.0.11's `acl_file` never
    /// refuses a subscription; the plugin shipped with it answers SUBACK 0x80.
    pub async fn start_refusing(acls: serde_json::Value) -> Result<Self> {
        let dir = Dir::temp("leasehold-mqtt-acl-")?;
        let plugin = [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib",
        ]
        .iter()
        .map(|d| Path::new(d).join("mosquitto_dynamic_security.so"))
        .find(|p| p.exists())
        .context("mosquitto_dynamic_security.so (mosquitto package) not found")?;
        let conf = dir.path().join("dynamic-security.json");
        std::fs::write(
            &conf,
            serde_json::json!({
                "defaultACLAccess": {"publishClientSend": true, "publishClientReceive": true,
                                     "subscribe": true, "unsubscribe": true},
                "clients": [],
                "groups": [{"groupname": "anonymous", "roles": [{"rolename": "refused"}]}],
                "anonymousGroup": "anonymous",
                "roles": [{"rolename": "refused", "acls": acls}],
            })
            .to_string(),
        )?;
        give_to_servers(&conf)?;
        let extra = format!(
            "plugin {}\nplugin_opt_config_file {}\n",
            plugin.display(),
            conf.display()
        );
        Self::start_with(dir, &extra).await
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!("{}{}", read("mosquitto.stderr"), read("mosquitto.log"))
    }

    /// The broker's process id while it runs (the benchmark reads its CPU time from /proc).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Graceful stop (SIGTERM): Mosquitto saves its persistence file on the way out.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), libc::SIGTERM);
            if !wait_child(&mut c, Duration::from_secs(10)) {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// SIGKILL: whatever was not autosaved is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn start_again(&mut self) -> Result<()> {
        self.launch().await
    }

    /// Deletes the persistence file of a stopped broker: it comes back without any session,
    /// as a broker with a lost disk or no persistence would.
    pub fn forget_sessions(&self) -> Result<()> {
        match std::fs::remove_file(self.dir.path().join("mosquitto.db")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running `leasehold` process.
pub struct NodeProc {
    pub name: String,
    child: Child,
    log: PathBuf,
    /// Where this process's lines start in `log` (a log file may hold earlier runs').
    log_from: u64,
    /// The port the node bound (it binds port 0 unless `HTTP_ADDR` is given): read from its log.
    port: std::sync::OnceLock<u16>,
}

/// The port in a node's "HTTP listening" log line (`http_url=http://127.0.0.1:PORT`, pretty or
/// JSON).
fn listening_port(log: &str) -> Option<u16> {
    let line = log.lines().find(|l| l.contains("HTTP listening"))?;
    let url = &line[line.find("http://")? + "http://".len()..];
    let end = url
        .find(|c: char| {
            !(c.is_ascii_alphanumeric() || c == '.' || c == ':' || c == '[' || c == ']')
        })
        .unwrap_or(url.len());
    url[..end].rsplit(':').next()?.parse().ok()
}

/// Peak resident memory (VmHWM) and current resident memory (VmRSS) of `pid`, in bytes.
pub fn memory_of(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

impl NodeProc {
    /// Starts `bin run` with `env` (plus INSTANCE_ID=`name`, and HTTP on port 0: the node says
    /// in its log which port it got, so no two tests race for one).
    pub fn spawn(bin: &Path, name: &str, env: &[(&str, String)], log_dir: &Path) -> Result<Self> {
        Self::spawn_args(bin, name, &[], env, log_dir)
    }

    /// [`NodeProc::spawn`] with arguments after `run` (`--config FILE`: settings only a file holds).
    pub fn spawn_args(
        bin: &Path,
        name: &str,
        args: &[&str],
        env: &[(&str, String)],
        log_dir: &Path,
    ) -> Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let file = File::options().create(true).append(true).open(&log)?;
        let log_from = file.metadata()?.len();
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("INSTANCE_ID", name)
            .env("HTTP_ADDR", "127.0.0.1:0")
            .env("LOG_LEVEL", "info,leasehold=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        Ok(NodeProc {
            name: name.to_string(),
            child,
            log,
            log_from,
            port: std::sync::OnceLock::new(),
        })
    }

    /// The node's HTTP port, once it has bound it (waits up to 15 s for the log line).
    ///
    /// # Panics
    /// When the node never says where it listens (it failed before binding): a test that asks
    /// for the port of a node that did not start has nothing else to do.
    pub fn http_port(&self) -> u16 {
        *self.port.get_or_init(|| {
            let started = Instant::now();
            loop {
                let log = self.log();
                if let Some(p) = listening_port(&log) {
                    return p;
                }
                if started.elapsed() > Duration::from_secs(15) {
                    panic!(
                        "{} never said where it listens (no \"HTTP listening\" line):\n{log}",
                        self.name
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// This process's log (not earlier runs' lines in the same file).
    pub fn log(&self) -> String {
        let all = std::fs::read(&self.log).unwrap_or_default();
        let from = (self.log_from as usize).min(all.len());
        String::from_utf8_lossy(&all[from..]).into_owned()
    }

    pub fn signal(&self, sig: i32) {
        signal(self.child.id(), sig);
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Exit status if the process has ended.
    pub fn try_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if start.elapsed() > timeout {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id(), libc::SIGCONT);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One client for every request: building one loads the TLS roots. No idle connections are
/// kept, so each request opens its own, as to a node that may have been restarted on that port.
fn client() -> Result<&'static reqwest::Client> {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    if let Some(c) = CLIENT.get() {
        return Ok(c);
    }
    // reqwest is built without a crypto provider; rustls has one (aws-lc-rs). Fails only when
    // one is installed already: fine.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let c = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        // Loopback only: an HTTP_PROXY in the environment must not carry the suite's requests.
        .no_proxy()
        .build()?;
    Ok(CLIENT.get_or_init(|| c))
}

/// A request with an empty body to a loopback port, answered within 10 s (a stopped node is an
/// error, not a hang): (status, body).
pub async fn http(port: u16, method: &str, path: &str) -> Result<(u16, String)> {
    let (status, _, body) = http_full(port, method, path, Duration::from_secs(10)).await?;
    Ok((status, body))
}

/// Like [`http`], with the response's headers and a deadline of the caller's.
pub async fn http_full(
    port: u16,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, reqwest::header::HeaderMap, String)> {
    let method = reqwest::Method::from_bytes(method.as_bytes())?;
    let resp = client()?
        .request(method, format!("http://127.0.0.1:{port}{path}"))
        .body(Vec::new())
        .timeout(timeout)
        .send()
        .await?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    Ok((status, headers, resp.text().await?))
}

/// Whether the node on `port` leads and its session is subscribed to every wanted topic:
/// connected is not enough, since what is published before the session's SUBACK (a first
/// session, or one the broker lost) is not queued for it. Harnesses start publishing after this.
pub async fn leading_and_subscribed(port: u16) -> Result<bool> {
    let (_, m) = http(port, "GET", "/metrics").await?;
    if metric(&m, "leasehold_lease_is_leader") != Some(1.0) {
        return Ok(false);
    }
    let (_, body) = http(port, "GET", "/health/mqtt").await?;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let subs = &v["subscriptions"];
    Ok(v["connected"] == true
        && subs["ledger_loaded"] == true
        && subs["pending"] == 0
        && subs["subscribed"].as_u64().unwrap_or(0) > 0)
}

/// The value of a metric in a Prometheus text exposition: `name` alone, or with some of its
/// labels (`name{reason="not_json"}`), sums every series that has those labels (so a counter
/// that gained a label, like `route`, reads as before); `None` when no series matches.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    let (base, want) = match name.split_once('{') {
        Some((b, l)) => (b, labels(l.trim_end_matches('}'))),
        None => (name, Vec::new()),
    };
    let mut found = None;
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((k, v)) = l.rsplit_once(' ') else {
            continue;
        };
        let (kb, have) = match k.split_once('{') {
            Some((b, l)) => (b, labels(l.trim_end_matches('}'))),
            None => (k, Vec::new()),
        };
        if kb != base || !want.iter().all(|w| have.contains(w)) {
            continue;
        }
        if let Ok(v) = v.parse::<f64>() {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// `a="x",b="y"` as pairs (label values here never hold `",`).
fn labels(s: &str) -> Vec<(String, String)> {
    s.split("\",")
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            Some((k.trim().to_string(), v.trim_matches('"').to_string()))
        })
        .collect()
}
