//! QoS 1 publishing that counts the broker's acknowledgements: a message counts as "accepted"
//! only once the broker sent PUBACK for it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// The payload of numbered message `seq` of `run` for `device`, with a unique timestamp.
pub fn numbered(run: &str, device: &str, seq: u64) -> String {
    // Microsecond timestamps from a fixed base keep (device_id, ts) unique per seq.
    let micros = 1_700_000_000_000_000i64 + seq as i64;
    let secs = micros / 1_000_000;
    let sub = micros % 1_000_000;
    format!(r#"{{"device_id":"{device}","run":"{run}","seq":{seq},"ts":{secs}.{sub:06}}}"#)
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
fn count_acks(mut el: rumqttc::EventLoop) -> (Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
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
    let start = Instant::now();
    while acked.load(Ordering::SeqCst) < n {
        if start.elapsed() > Duration::from_secs(30) {
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
                    numbered(&run_s, &device, seq),
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
