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
    // The devices' filter, the gateways' and Sparkplug's (their drains queue there too).
    c.subscribe_many(
        [TOPIC_FILTER, GATEWAY_FILTER, SPARKPLUG_FILTER]
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

/// A clean-session publisher of `run` with 1,000 messages in flight and packets up to 1 MiB (a
/// gateway's array), and its PUBACK count.
fn publisher(
    port: u16,
    run: &str,
) -> (
    AsyncClient,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
    tokio::task::JoinHandle<()>,
) {
    let mut opts = MqttOptions::new(format!("bench-pub-{run}"), "127.0.0.1", port);
    opts.set_clean_session(true)
        .set_inflight(1000)
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20);
    let (c, el) = AsyncClient::new(opts, 1000);
    let (acked, poll) = count_acks(el);
    (c, acked, poll)
}

/// Clears the message retained on `topic` (an empty retained publish, QoS 1).
pub async fn clear_retained(port: u16, topic: &str) -> Result<()> {
    let (c, acked, poll) = publisher(port, "clear-retained");
    c.publish(topic, QoS::AtLeastOnce, true, Vec::new()).await?;
    await_acks_within(&acked, poll, 1, Duration::from_secs(30)).await
}

/// Publishes `n` numbered messages of `run` (QoS 1) at `rate` per second (0: as fast as
/// possible) and waits for every PUBACK. Returns the publishing time.
pub async fn publish(port: u16, run: &str, n: u64, rate: u64) -> Result<Duration> {
    let (c, acked, poll) = publisher(port, run);
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

/// The gateways of the gateway drain; [`DEVICES`] is a multiple of it.
pub const GATEWAYS: u64 = 10;

/// Where gateways publish their arrays.
pub const GATEWAY_FILTER: &str = "gw/+/up";

/// Publishes `n` readings of `run` as gateways send them: JSON arrays of
/// [`crate::route::GATEWAY_READINGS`] readings on `gw/site-N/up`, each gateway (of
/// [`GATEWAYS`]) sending its own devices' readings — device `d` is behind gateway `d mod 10` —
/// so that `telemetry`'s key holds as many (device, topic) pairs as one message per reading
/// gives it. The same readings as [`publish`]'s (device, time and payload), the gateways taken
/// in turn.
pub async fn publish_gateways(port: u16, run: &str, n: u64) -> Result<Duration> {
    let per = crate::route::GATEWAY_READINGS;
    let (c, acked, poll) = publisher(port, run);
    let base = now_micros();
    let start = Instant::now();
    // Reading `seq` is device `seq mod DEVICES`'s, behind gateway `seq mod GATEWAYS`.
    let mut sites: Vec<std::iter::StepBy<std::ops::Range<u64>>> = (0..GATEWAYS)
        .map(|g| (g..n).step_by(GATEWAYS as usize))
        .collect();
    let mut messages = 0;
    loop {
        let before = messages;
        for (g, seqs) in sites.iter_mut().enumerate() {
            let readings: Vec<String> = seqs
                .by_ref()
                .take(per as usize)
                .map(|seq| {
                    let device = format!("dev-{:03}", seq % DEVICES);
                    numbered_from(base, run, &device, seq)
                })
                .collect();
            if readings.is_empty() {
                continue;
            }
            c.publish(
                format!("gw/site-{g}/up"),
                QoS::AtLeastOnce,
                false,
                format!("[{}]", readings.join(",")),
            )
            .await?;
            messages += 1;
        }
        if messages == before {
            break;
        }
    }
    await_acks_within(&acked, poll, messages, Duration::from_secs(600)).await?;
    Ok(start.elapsed())
}

/// Where Sparkplug B edge nodes publish.
pub const SPARKPLUG_FILTER: &str = "spBv1.0/#";
/// Edge nodes of the Sparkplug drain, and devices per edge node.
pub const SPARKPLUG_NODES: u64 = 10;
pub const SPARKPLUG_DEVICES: u64 = 10;
/// Metrics per DDATA, each sent by its alias.
pub const SPARKPLUG_METRICS: u64 = 20;

/// Publishes the births of [`SPARKPLUG_NODES`] edge nodes of group `run` (an NBIRTH each, a
/// DBIRTH per device, [`SPARKPLUG_METRICS`] double metrics with aliases), then `n` DDATA
/// messages across their devices, every metric by alias, each edge node's sequence numbers in
/// order. At QoS 1, so that the queued session holds them all (Sparkplug's own QoS 0 would be
/// queued too, with `queue_qos0_messages`). Returns the births published.
pub async fn publish_sparkplug(port: u16, run: &str, n: u64) -> Result<u64> {
    use srad_types::payload::{metric, DataType, Message as _, Metric, Payload};
    let (c, acked, poll) = publisher(port, run);
    let base = chrono::Utc::now().timestamp_millis() as u64 - n;
    let payload = |ts: u64, seq: u64, metrics: Vec<Metric>| {
        Payload {
            timestamp: Some(ts),
            metrics,
            seq: Some(seq % 256),
            uuid: None,
            body: None,
        }
        .encode_to_vec()
    };
    let metric = |name: Option<String>, alias: u64, v: f64, typed: bool| {
        let mut m = Metric::new();
        if let Some(name) = name {
            m.set_name(name);
        }
        m.set_alias(alias);
        if typed {
            m.set_datatype(DataType::Double);
        }
        m.value = Some(metric::Value::DoubleValue(v));
        m
    };
    let mut seq = vec![0u64; SPARKPLUG_NODES as usize];
    let mut sent = 0u64;
    for e in 0..SPARKPLUG_NODES {
        let mut bd = Metric::new();
        bd.set_name("bdSeq".into()).set_datatype(DataType::Int64);
        bd.value = Some(metric::Value::LongValue(0));
        let topic = format!("spBv1.0/{run}/NBIRTH/edge-{e}");
        c.publish(topic, QoS::AtLeastOnce, false, payload(base, 0, vec![bd]))
            .await?;
        sent += 1;
        for d in 0..SPARKPLUG_DEVICES {
            seq[e as usize] += 1;
            let metrics = (1..=SPARKPLUG_METRICS)
                .map(|a| metric(Some(format!("m{a:02}")), a, 0.0, true))
                .collect();
            let topic = format!("spBv1.0/{run}/DBIRTH/edge-{e}/dev-{d}");
            c.publish(
                topic,
                QoS::AtLeastOnce,
                false,
                payload(base, seq[e as usize], metrics),
            )
            .await?;
            sent += 1;
        }
    }
    let births = sent;
    for i in 0..n {
        let e = i % SPARKPLUG_NODES;
        let d = (i / SPARKPLUG_NODES) % SPARKPLUG_DEVICES;
        seq[e as usize] += 1;
        let metrics = (1..=SPARKPLUG_METRICS)
            .map(|a| metric(None, a, i as f64 + a as f64 / 100.0, false))
            .collect();
        let topic = format!("spBv1.0/{run}/DDATA/edge-{e}/dev-{d}");
        c.publish(
            topic,
            QoS::AtLeastOnce,
            false,
            payload(base + i, seq[e as usize], metrics),
        )
        .await?;
        sent += 1;
    }
    await_acks_within(&acked, poll, sent, Duration::from_secs(600)).await?;
    Ok(births)
}
