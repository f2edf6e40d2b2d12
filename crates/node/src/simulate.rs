//! `leasehold simulate`: a device fleet publisher with numbered, timestamped readings.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use clap::Args;
use leasehold_config::Config;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

#[derive(Args, Debug, Clone)]
pub struct SimArgs {
    /// Number of simulated devices.
    #[arg(long, default_value_t = 10)]
    pub devices: u32,
    /// Messages per second across the fleet (0 = as fast as possible).
    #[arg(long, default_value_t = 100)]
    pub rate: u64,
    /// Messages to publish (0 = until interrupted).
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
    /// MQTT QoS (0, 1 or 2).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Topic template; {device} is replaced by the device id.
    #[arg(long, default_value = "devices/{device}/telemetry")]
    pub topic: String,
    /// First sequence number.
    #[arg(long, default_value_t = 0)]
    pub start_seq: u64,
    /// Run label stored in each payload (default: random).
    #[arg(long)]
    pub run_id: Option<String>,
    /// Every Nth message is malformed (not JSON), to show dead-lettering (0 = never).
    #[arg(long, default_value_t = 0)]
    pub invalid_every: u64,
    /// Seconds between progress lines.
    #[arg(long, default_value_t = 1)]
    pub progress_every: u64,
}

/// Builds the payload of message `seq`: strictly increasing microsecond timestamps per device,
/// so no two readings of a device share the (device_id, ts) key.
pub fn payload(run: &str, device: &str, seq: u64, ts: DateTime<Utc>) -> String {
    format!(
        r#"{{"device_id":"{device}","run":"{run}","seq":{seq},"timestamp":"{}","value":{:.3}}}"#,
        ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        (seq % 1000) as f64 / 10.0
    )
}

/// The simulated devices: the topic and payload of message `seq`, timestamps strictly rising
/// per device.
struct Fleet {
    run_id: String,
    topic: String,
    invalid_every: u64,
    devices: Vec<String>,
    last_ts: Vec<DateTime<Utc>>,
}

impl Fleet {
    fn new(run_id: &str, a: &SimArgs) -> Self {
        let devices: Vec<String> = (0..a.devices.max(1))
            .map(|i| format!("dev-{i:04}"))
            .collect();
        Fleet {
            run_id: run_id.to_string(),
            topic: a.topic.clone(),
            invalid_every: a.invalid_every,
            last_ts: vec![DateTime::<Utc>::MIN_UTC; devices.len()],
            devices,
        }
    }

    fn message(&mut self, seq: u64) -> (String, String) {
        let d = (seq % self.devices.len() as u64) as usize;
        let mut ts = Utc::now();
        if ts <= self.last_ts[d] {
            ts = self.last_ts[d] + chrono::Duration::microseconds(1);
        }
        self.last_ts[d] = ts;
        let topic = self.topic.replace("{device}", &self.devices[d]);
        let body = if self.invalid_every > 0 && (seq + 1).is_multiple_of(self.invalid_every) {
            format!("not json #{seq}")
        } else {
            payload(&self.run_id, &self.devices[d], seq, ts)
        };
        (topic, body)
    }
}

/// A clean-session publisher; the returned counter counts the broker's acks.
fn connect(
    cfg: &Config,
    run_id: &str,
) -> (AsyncClient, tokio::task::JoinHandle<()>, Arc<AtomicU64>) {
    let client_id = format!("leasehold-sim-{run_id}-{}", std::process::id());
    let mut opts = MqttOptions::new(client_id, &cfg.mqtt.host, cfg.mqtt.port);
    opts.set_keep_alive(Duration::from_secs(10))
        .set_inflight(1000)
        .set_clean_session(true);
    if let Some(u) = &cfg.mqtt.username {
        opts.set_credentials(u, cfg.mqtt.password.clone().unwrap_or_default());
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    let acked = Arc::new(AtomicU64::new(0));
    let counter = acked.clone();
    let poller = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_)))
                | Ok(Event::Incoming(Packet::PubComp(_))) => {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(e) => {
                    eprintln!("simulate: broker connection error: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
    (client, poller, acked)
}

fn or(n: u64, zero: &str) -> String {
    match n {
        0 => zero.to_string(),
        n => n.to_string(),
    }
}

pub async fn run(cfg: &Config, a: SimArgs) -> anyhow::Result<ExitCode> {
    let run_id = a
        .run_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()[..8].to_string());
    let (client, poller, acked) = connect(cfg, &run_id);
    // 0, 1 or 2: the flag's range.
    let q = rumqttc::qos(a.qos)?;
    let mut fleet = Fleet::new(&run_id, &a);
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut published = 0u64;
    eprintln!(
        "simulate: run {run_id}: {} devices, {} msg/s, {} messages, QoS {} to {}",
        fleet.devices.len(),
        or(a.rate, "max"),
        or(a.count, "unlimited"),
        a.qos,
        cfg.mqtt
    );
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    while a.count == 0 || published < a.count {
        if a.rate > 0 {
            let due = Duration::from_secs_f64(published as f64 / a.rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::select! {
                    _ = &mut stop => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
        let (topic, body) = fleet.message(a.start_seq + published);
        client.publish(topic, q, false, body).await?;
        published += 1;
        if last_progress.elapsed() >= Duration::from_secs(a.progress_every.max(1)) {
            last_progress = Instant::now();
            eprintln!(
                "simulate: published {published}{} ({:.0} msg/s), acked by broker {}",
                if a.count > 0 {
                    format!("/{}", a.count)
                } else {
                    String::new()
                },
                published as f64 / started.elapsed().as_secs_f64(),
                acked.load(Ordering::Relaxed)
            );
        }
    }
    // Wait for the broker to acknowledge everything published.
    let wait_from = Instant::now();
    while q != QoS::AtMostOnce
        && acked.load(Ordering::Relaxed) < published
        && wait_from.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), poller).await;
    let acks = acked.load(Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "simulate: done: run {run_id}, published {published}, acked by broker {acks}, {:.1}s, {:.0} msg/s",
        secs,
        published as f64 / secs
    );
    if q != QoS::AtMostOnce && acks < published {
        anyhow::bail!(
            "{} messages were not acknowledged by the broker",
            published - acks
        );
    }
    Ok(ExitCode::SUCCESS)
}
