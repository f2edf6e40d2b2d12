//! A short-lived broker connection driven step by step: connect, subscribe, publish, collect,
//! disconnect, each awaited to the broker's answer within a bound. The probes and the claim use
//! it; the options come from the ingest's [`leasehold_ingest::client_options`] (endpoint,
//! credentials, TLS), so a probe connects exactly as the node's session would.

use std::time::{Duration, Instant};

use leasehold_config::Config;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, Publish, QoS,
    SubscribeFilter, SubscribeReasonCode,
};

/// One step (connect, a SUBACK, a PUBACK) may take this long.
pub const STEP: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("broker connection: {0}")]
    Connection(#[from] ConnectionError),
    #[error("the broker did not answer {0} within {1:?}")]
    Timeout(&'static str, Duration),
    #[error("the broker refused {0}")]
    Refused(&'static str),
    #[error("broker client: {0}")]
    Client(#[from] rumqttc::ClientError),
}

/// A random suffix for temporary client ids and probe topics: 6 hex digits, so that
/// `leasehold-doctor-<suffix>` is 23 characters, the longest id every MQTT 3.1.1 broker must
/// accept.
pub fn random_suffix() -> String {
    format!("{:06x}", fastrand::u32(..0x100_0000))
}

/// The options of a temporary connection `client_id` to the configured broker.
pub fn options(cfg: &Config, client_id: &str, clean_session: bool) -> MqttOptions {
    let mut opts =
        leasehold_ingest::client_options(&cfg.mqtt, client_id, cfg.cluster.max_payload_bytes);
    // A probe publishes a message of MAX_PAYLOAD_BYTES: outgoing packets as large as incoming.
    let max = leasehold_ingest::max_incoming_packet(cfg.cluster.max_payload_bytes);
    opts.set_max_packet_size(max, max)
        .set_keep_alive(Duration::from_secs(10))
        .set_clean_session(clean_session);
    opts
}

pub struct Conn {
    client: AsyncClient,
    el: EventLoop,
}

impl Conn {
    /// Connects; returns the connection and the CONNACK's `session_present`.
    pub async fn open(opts: MqttOptions) -> Result<(Conn, bool), ProbeError> {
        // Room for a whole burst of probe publishes without polling in between.
        let (client, mut el) = AsyncClient::new(opts, 4096);
        el.network_options.set_connection_timeout(STEP.as_secs());
        let mut conn = Conn { client, el };
        let present = conn
            .until("CONNACK", STEP, |p| match p {
                Packet::ConnAck(a) => Some(a.session_present),
                _ => None,
            })
            .await?;
        Ok((conn, present))
    }

    /// A clean connection under a temporary client id of its own (`leasehold-doctor-<random>`).
    pub async fn temporary(cfg: &Config) -> Result<Conn, ProbeError> {
        let id = format!("leasehold-doctor-{}", random_suffix());
        Ok(Conn::open(options(cfg, &id, true)).await?.0)
    }

    /// Polls until `pick` finds the packet wanted, within `limit`.
    async fn until<T>(
        &mut self,
        what: &'static str,
        limit: Duration,
        mut pick: impl FnMut(Packet) -> Option<T>,
    ) -> Result<T, ProbeError> {
        let work = async {
            loop {
                if let Event::Incoming(p) = self.el.poll().await? {
                    if let Some(v) = pick(p) {
                        return Ok(v);
                    }
                }
            }
        };
        tokio::time::timeout(limit, work)
            .await
            .map_err(|_| ProbeError::Timeout(what, limit))?
    }

    /// Subscribes `filters` (QoS 1) in one packet; the SUBACK's codes, in order.
    pub async fn subscribe(
        &mut self,
        filters: &[String],
    ) -> Result<Vec<SubscribeReasonCode>, ProbeError> {
        self.client
            .subscribe_many(
                filters
                    .iter()
                    .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
            )
            .await?;
        self.until("SUBACK", STEP, |p| match p {
            Packet::SubAck(s) => Some(s.return_codes),
            _ => None,
        })
        .await
    }

    pub async fn unsubscribe(&mut self, filter: &str) -> Result<(), ProbeError> {
        self.client.unsubscribe(filter).await?;
        self.until("UNSUBACK", STEP, |p| {
            matches!(p, Packet::UnsubAck(_)).then_some(())
        })
        .await
    }

    /// Publishes `payloads` with QoS 1 and waits for every PUBACK.
    pub async fn publish_all(
        &mut self,
        topic: &str,
        retain: bool,
        payloads: impl IntoIterator<Item = Vec<u8>>,
        limit: Duration,
    ) -> Result<usize, ProbeError> {
        let mut n = 0;
        for p in payloads {
            self.client
                .publish(topic, QoS::AtLeastOnce, retain, p)
                .await?;
            n += 1;
        }
        let mut acked = 0;
        self.until("every PUBACK", limit, |p| {
            if matches!(p, Packet::PubAck(_)) {
                acked += 1;
            }
            (acked >= n).then_some(())
        })
        .await?;
        Ok(n)
    }

    /// Publishes one message with QoS 0 (no answer to wait for: a QoS 0 message may be dropped
    /// without a word, which is what the caller finds out).
    pub async fn publish_qos0(&mut self, topic: &str, payload: Vec<u8>) -> Result<(), ProbeError> {
        self.client
            .publish(topic, QoS::AtMostOnce, false, payload)
            .await?;
        // Drive the event loop until the packet is written.
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            loop {
                if let Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))) = self.el.poll().await {
                    return;
                }
            }
        })
        .await;
        Ok(())
    }

    /// Messages on `topic` arriving until `want` came, nothing came for `idle`, or `limit`
    /// passed (what came by then).
    pub async fn collect(
        &mut self,
        topic: &str,
        want: usize,
        idle: Duration,
        limit: Duration,
    ) -> Result<Vec<Publish>, ProbeError> {
        let started = Instant::now();
        let mut got = Vec::new();
        while got.len() < want {
            let left = limit.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(idle.min(left), self.el.poll()).await {
                Err(_) => break,
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.topic == topic => got.push(p),
                Ok(Ok(_)) => {}
            }
        }
        Ok(got)
    }

    /// Sends DISCONNECT and waits (briefly) until the broker has closed the connection: a probe
    /// that reconnects with the same client id must not find its previous connection still
    /// open at the broker (which would take it over, and log a session takeover).
    pub async fn close(mut self) {
        if self.client.disconnect().await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.el.poll().await.is_ok() {}
        })
        .await;
    }
}
