//! The broker side shared by every phase: persistent sessions made and dropped, and the one
//! publisher of numbered messages.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use leasehold_testkit::publish::{await_acks_within, count_acks, numbered_from};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

const TOPIC_FILTER: &str = "devices/+/telemetry";
pub const DEVICES: u64 = 100;

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Creates the persistent session `client_id` subscribed to the telemetry topics, then leaves.
pub async fn create_session(port: u16, client_id: &str) -> Result<()> {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_clean_session(false)
        .set_keep_alive(Duration::from_secs(30));
    let (c, mut el) = AsyncClient::new(opts, 10);
    // The devices' filter and the gateways' (the gateway drain queues its arrays here too).
    c.subscribe_many(
        [TOPIC_FILTER, GATEWAY_FILTER]
            .map(|f| rumqttc::SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce)),
    )
    .await?;
    let start = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("session {client_id}: {e}"),
            Err(_) => bail!("session {client_id}: no SUBACK"),
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("session {client_id}: no SUBACK");
        }
    }
    c.disconnect().await?;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while el.poll().await.is_ok() {}
    })
    .await;
    Ok(())
}

/// Deletes the persistent session `client_id` and whatever is still queued in it (a clean-session
/// connect discards it), so that finished phases do not load the broker of the next ones.
pub async fn drop_session(port: u16, client_id: &str) -> Result<()> {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_clean_session(true)
        .set_keep_alive(Duration::from_secs(30));
    let (c, mut el) = AsyncClient::new(opts, 10);
    let connected = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    match connected {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bail!("dropping session {client_id}: {e}"),
        Err(_) => bail!("dropping session {client_id}: no CONNACK"),
    }
    c.disconnect().await?;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while el.poll().await.is_ok() {}
    })
    .await;
    Ok(())
}

/// Publishes `n` numbered messages of `run` (QoS 1) at `rate` per second (0: as fast as
/// possible) and waits for every PUBACK. Returns the publishing time.
pub async fn publish(port: u16, run: &str, n: u64, rate: u64) -> Result<Duration> {
    let mut opts = MqttOptions::new(format!("bench-pub-{run}"), "127.0.0.1", port);
    opts.set_clean_session(true)
        .set_inflight(1000)
        .set_keep_alive(Duration::from_secs(30));
    let (c, el) = AsyncClient::new(opts, 1000);
    let (acked, poll) = count_acks(el);
    let base = now_micros();
    let start = Instant::now();
    for seq in 0..n {
        if rate > 0 {
            let due = Duration::from_secs_f64(seq as f64 / rate as f64);
            if let Some(w) = due.checked_sub(start.elapsed()) {
                tokio::time::sleep(w).await;
            }
        }
        let device = format!("dev-{:03}", seq % DEVICES);
        c.publish(
            format!("devices/{device}/telemetry"),
            QoS::AtLeastOnce,
            false,
            numbered_from(base, run, &device, seq),
        )
        .await?;
    }
    await_acks_within(&acked, poll, n, Duration::from_secs(600)).await?;
    Ok(start.elapsed())
}

/// Where gateways publish their arrays.
pub const GATEWAY_FILTER: &str = "gw/+/up";

/// Publishes `n` readings of `run` as gateways send them: JSON arrays of
/// [`crate::route::GATEWAY_READINGS`] readings, each of its own device and time, on
/// `gw/site-N/up`.
pub async fn publish_gateways(port: u16, run: &str, n: u64) -> Result<Duration> {
    let per = crate::route::GATEWAY_READINGS;
    let mut opts = MqttOptions::new(format!("bench-pub-{run}"), "127.0.0.1", port);
    opts.set_clean_session(true)
        .set_inflight(1000)
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (c, el) = AsyncClient::new(opts, 1000);
    let (acked, poll) = count_acks(el);
    let base = now_micros();
    let start = Instant::now();
    let messages = n.div_ceil(per);
    for m in 0..messages {
        let readings: Vec<String> = (m * per..((m + 1) * per).min(n))
            .map(|seq| {
                let device = format!("dev-{:03}", seq % DEVICES);
                numbered_from(base, run, &device, seq)
            })
            .collect();
        c.publish(
            format!("gw/site-{}/up", m % 10),
            QoS::AtLeastOnce,
            false,
            format!("[{}]", readings.join(",")),
        )
        .await?;
    }
    await_acks_within(&acked, poll, messages, Duration::from_secs(600)).await?;
    Ok(start.elapsed())
}
