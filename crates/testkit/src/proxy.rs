//! A TCP proxy on loopback that a test can cut or slow down: the network faults between one node
//! and PostgreSQL or the broker, without touching the others.
//!
//! - [`Proxy::blackhole`]: a partition. Bytes in flight are discarded, new connections are accepted
//!   but never reach the server; clients see hangs, not errors, and must rely on their timeouts.
//! - [`Proxy::restore`]: closes every connection (their byte streams are broken) and passes again.
//! - [`Proxy::set_delay`]: every chunk from client to server waits this long (a slow server).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

struct State {
    blackhole: AtomicBool,
    delay_us: AtomicU64,
    /// Bumped by `restore`: every connection older than this closes.
    generation: watch::Sender<u64>,
}

pub struct Proxy {
    pub port: u16,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: u16) -> Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(State {
            blackhole: AtomicBool::new(false),
            delay_us: AtomicU64::new(0),
            generation: watch::Sender::new(0),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let _ = relay(client, upstream, st).await;
                });
            }
        });
        Ok(Proxy { port, state, task })
    }

    pub fn blackhole(&self) {
        self.state.blackhole.store(true, Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.state.blackhole.store(false, Ordering::SeqCst);
        self.state.generation.send_modify(|g| *g += 1);
    }

    pub fn set_delay(&self, d: Duration) {
        self.state
            .delay_us
            .store(d.as_micros() as u64, Ordering::SeqCst);
    }

    pub fn is_cut(&self) -> bool {
        self.state.blackhole.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.state.generation.send_modify(|g| *g += 1);
    }
}

async fn relay(client: TcpStream, upstream: u16, st: Arc<State>) -> Result<()> {
    let mut gen = st.generation.subscribe();
    gen.borrow_and_update();
    // A partition swallows new connections too: hold them until restored.
    while st.blackhole.load(Ordering::SeqCst) {
        tokio::select! {
            _ = gen.changed() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    let server = TcpStream::connect(("127.0.0.1", upstream)).await?;
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, st.clone(), true);
    let down = pump(sr, cw, st.clone(), false);
    tokio::select! {
        _ = gen.changed() => {}
        _ = async { tokio::join!(up, down) } => {}
    }
    Ok(())
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    st: Arc<State>,
    delayed: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if st.blackhole.load(Ordering::SeqCst) {
            continue; // dropped on the floor, like a partition
        }
        let d = st.delay_us.load(Ordering::SeqCst);
        if delayed && d > 0 {
            tokio::time::sleep(Duration::from_micros(d)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
