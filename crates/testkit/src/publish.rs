//! QoS 1 publishing that counts the broker's acknowledgements: a message counts as "accepted"
//! only once the broker sent PUBACK for it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

/// The payload of numbered message `seq` of `run` for `device`, with a unique timestamp.
/// Deterministic: publishing it again is a redelivery of the same reading.
pub fn numbered(run: &str, device: &str, seq: u64) -> String {
    numbered_from(1_700_000_000_000_000, run, device, seq)
}

/// Like [`numbered`], timestamps counted from `base_micros` (runs sharing a database need
/// distinct bases, or their readings share (device_id, ts) keys).
pub fn numbered_from(base_micros: i64, run: &str, device: &str, seq: u64) -> String {
    let micros = base_micros + seq as i64;
    let secs = micros / 1_000_000;
    let sub = micros % 1_000_000;
    format!(r#"{{"device_id":"{device}","run":"{run}","seq":{seq},"ts":{secs}.{sub:06}}}"#)
}

/// Like [`numbered`] but without a timestamp: the node stamps it with its receipt time, and
/// only the MQTT DUP flag and packet id tell a redelivery from a new publish.
pub fn numbered_untimed(run: &str, device: &str, seq: u64) -> String {
    format!(r#"{{"device_id":"{device}","run":"{run}","seq":{seq}}}"#)
}

fn client(port: u16, id: &str) -> (AsyncClient, rumqttc::EventLoop) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5))
        .set_inflight(500)
        .set_clean_session(true)
        .set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
    AsyncClient::new(opts, 1000)
}

/// Polls `el` in the background, counting the broker's PUBACKs.
pub fn count_acks(mut el: rumqttc::EventLoop) -> (Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let acked = Arc::new(AtomicU64::new(0));
    let a = acked.clone();
    let poll = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    a.fetch_add(1, Ordering::SeqCst);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    (acked, poll)
}

/// Waits (at most 30 s) until `n` messages were acknowledged, then stops the poller.
async fn await_acks(acked: &AtomicU64, poll: tokio::task::JoinHandle<()>, n: u64) -> Result<()> {
    await_acks_within(acked, poll, n, Duration::from_secs(30)).await
}

/// Waits (at most `limit`) until `n` messages were acknowledged, then stops the poller.
pub async fn await_acks_within(
    acked: &AtomicU64,
    poll: tokio::task::JoinHandle<()>,
    n: u64,
    limit: Duration,
) -> Result<()> {
    let start = Instant::now();
    while acked.load(Ordering::SeqCst) < n {
        if start.elapsed() > limit {
            poll.abort();
            bail!(
                "broker acknowledged only {} of {n}",
                acked.load(Ordering::SeqCst)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    poll.abort();
    Ok(())
}

/// Publishes `msgs` (topic, payload) with QoS 1 and waits until the broker acknowledged all.
pub async fn publish_all(port: u16, msgs: Vec<(String, Vec<u8>)>) -> Result<()> {
    let id = format!("test-pub-{}", fastid());
    let (c, el) = client(port, &id);
    let n = msgs.len() as u64;
    let (acked, poll) = count_acks(el);
    for (t, p) in msgs {
        c.publish(t, QoS::AtLeastOnce, false, p).await?;
    }
    await_acks(&acked, poll, n).await
}

fn fastid() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

/// A background publisher of numbered messages at a steady rate.
pub struct Stream {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<u64>>,
    pub run: String,
}

impl Stream {
    /// Publishes `devices/<device>/telemetry` messages numbered from 0, `rate` per second.
    pub fn start(port: u16, run: &str, devices: u32, rate: u64) -> Stream {
        Self::start_with(port, run, devices, rate, numbered)
    }

    /// Like [`Stream::start`] with payloads made by `body(run, device, seq)`.
    pub fn start_with(
        port: u16,
        run: &str,
        devices: u32,
        rate: u64,
        body: fn(&str, &str, u64) -> String,
    ) -> Stream {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let run_s = run.to_string();
        let task = tokio::spawn(async move {
            let (c, el) = client(port, &format!("test-stream-{}", fastid()));
            let (acked, poll) = count_acks(el);
            let start = Instant::now();
            let mut seq = 0u64;
            while !s.load(Ordering::SeqCst) {
                let due = Duration::from_secs_f64(seq as f64 / rate as f64);
                if let Some(w) = due.checked_sub(start.elapsed()) {
                    tokio::time::sleep(w).await;
                }
                let device = format!("dev-{:03}", seq % devices as u64);
                c.publish(
                    format!("devices/{device}/telemetry"),
                    QoS::AtLeastOnce,
                    false,
                    body(&run_s, &device, seq),
                )
                .await?;
                seq += 1;
            }
            await_acks(&acked, poll, seq).await?;
            Ok(seq)
        });
        Stream {
            stop,
            task,
            run: run.to_string(),
        }
    }

    /// Stops publishing; returns how many messages the broker accepted (all of them acked).
    pub async fn stop(self) -> Result<u64> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await?
    }
}

/// Polls `el`, pairing each first send of a packet id with the next sequence number of
/// `submitted`, and moves it to `acked` when its PUBACK arrives.
async fn track_acks(
    mut el: EventLoop,
    submitted: Arc<std::sync::Mutex<std::collections::VecDeque<u64>>>,
    acked: Arc<std::sync::Mutex<std::collections::BTreeSet<u64>>>,
) {
    // Packet ids are reused only after their PUBACK, so an Outgoing::Publish with a pkid
    // already in flight is a resend, otherwise it is the next submitted message.
    let mut inflight = std::collections::HashMap::<u16, u64>::new();
    loop {
        match el.poll().await {
            Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => {
                if let std::collections::hash_map::Entry::Vacant(slot) = inflight.entry(pkid) {
                    if let Some(seq) = submitted.lock().ok().and_then(|mut q| q.pop_front()) {
                        slot.insert(seq);
                    }
                }
            }
            Ok(Event::Incoming(Packet::PubAck(a))) => {
                if let Some(seq) = inflight.remove(&a.pkid) {
                    if let Ok(mut s) = acked.lock() {
                        s.insert(seq);
                    }
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(c))) if !c.session_present => {
                // The client dropped its unacknowledged publishes: never accepted.
                inflight.clear();
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A publisher that knows exactly which messages the broker acknowledged: the basis of "lost"
/// (acknowledged by the broker, not stored). It survives broker restarts (rumqttc reconnects and
/// resends what was not acknowledged; a message is counted only once its PUBACK arrives).
pub struct Tracked {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<TrackedReport>>,
    pub run: String,
}

/// What a [`Tracked`] publisher did.
#[derive(Debug, Clone, Default)]
pub struct TrackedReport {
    pub published: u64,
    /// Sequence numbers the broker acknowledged.
    pub acked: std::collections::BTreeSet<u64>,
}

impl Tracked {
    /// `rate` messages per second (0: as fast as the broker takes them) on `devices` devices.
    pub fn start(port: u16, run: &str, devices: u32, rate: u64) -> Tracked {
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let (s, pz) = (stop.clone(), paused.clone());
        let run_s = run.to_string();
        let task = tokio::spawn(async move {
            let mut opts = MqttOptions::new(format!("chaos-pub-{}", fastid()), "127.0.0.1", port);
            opts.set_keep_alive(Duration::from_secs(5))
                .set_inflight(200)
                .set_clean_session(false);
            let (c, el) = AsyncClient::new(opts, 200);
            let submitted = Arc::new(std::sync::Mutex::new(
                std::collections::VecDeque::<u64>::new(),
            ));
            let acked = Arc::new(std::sync::Mutex::new(
                std::collections::BTreeSet::<u64>::new(),
            ));
            let poll = tokio::spawn(track_acks(el, submitted.clone(), acked.clone()));
            let start = Instant::now();
            let base = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as i64)
                .unwrap_or(1_800_000_000_000_000);
            let mut seq = 0u64;
            let mut paused_for = Duration::ZERO;
            while !s.load(Ordering::SeqCst) {
                if pz.load(Ordering::SeqCst) {
                    let t = Instant::now();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    paused_for += t.elapsed();
                    continue;
                }
                if rate > 0 {
                    let due = Duration::from_secs_f64(seq as f64 / rate as f64) + paused_for;
                    if let Some(w) = due.checked_sub(start.elapsed()) {
                        tokio::time::sleep(w).await;
                    }
                }
                let device = format!("dev-{:03}", seq % devices as u64);
                if let Ok(mut q) = submitted.lock() {
                    q.push_back(seq);
                }
                c.publish(
                    format!("devices/{device}/telemetry"),
                    QoS::AtLeastOnce,
                    false,
                    numbered_from(base, &run_s, &device, seq),
                )
                .await?;
                seq += 1;
                // Publishing into rumqttc's queue is always ready, so a publisher behind schedule
                // would never yield and starve the other tasks of this process (the proxies).
                if seq.is_multiple_of(64) {
                    tokio::task::yield_now().await;
                }
            }
            // Give outstanding publishes time to be acknowledged (resent after a broker restart).
            let wait = Instant::now();
            while wait.elapsed() < Duration::from_secs(15) {
                let n = acked.lock().map(|a| a.len() as u64).unwrap_or(0);
                if n >= seq {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            poll.abort();
            let acked = acked.lock().map(|a| a.clone()).unwrap_or_default();
            Ok(TrackedReport {
                published: seq,
                acked,
            })
        });
        Tracked {
            stop,
            paused,
            task,
            run: run.to_string(),
        }
    }

    /// Holds publishing (e.g. to let the broker autosave) until [`Tracked::resume`].
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    pub async fn stop(self) -> Result<TrackedReport> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await?
    }
}

/// Publishes every message with QoS 0 (no acknowledgement exists) and returns once each was
/// written to the broker's socket and the connection was closed cleanly (DISCONNECT sent first,
/// so the broker has read everything before it).
pub async fn publish_qos0(port: u16, msgs: Vec<(String, Vec<u8>)>) -> Result<()> {
    let id = format!("test-pub0-{}", fastid());
    let (c, mut el) = client(port, &id);
    let n = msgs.len();
    let sender = {
        let c = c.clone();
        tokio::spawn(async move {
            for (t, p) in msgs {
                c.publish(t, QoS::AtMostOnce, false, p).await?;
            }
            c.disconnect().await?;
            Ok::<_, anyhow::Error>(())
        })
    };
    let mut sent = 0;
    let done = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(_))) => sent += 1,
                Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(anyhow::anyhow!("publishing QoS 0: {e}")),
            }
        }
    })
    .await;
    sender.await??;
    done.map_err(|_| anyhow::anyhow!("QoS 0 publishing did not finish within 30s"))??;
    anyhow::ensure!(sent == n, "{sent} of {n} QoS 0 messages written");
    Ok(())
}
