//! MQTT ingest: one task owns the rumqttc event loop for a leadership term.
//!
//! Messages leave the loop as [`Inbound`] values, each tagged with the connection it arrived on and
//! holding one permit of the `MAX_PENDING` budget. They come back through [`Acker::ack`] after
//! their batch committed (the writer never waits), and the ingest task itself writes their PUBACKs
//! on the connection, in the order given, one flush per batch, and only then lets their permits
//! go. Acks are written only when the message's connection is still the current one: MQTT reuses
//! packet ids per connection, so an ack from an earlier connection would acknowledge a different,
//! newer message; such acks are dropped and the broker redelivers their messages instead.
//!
//! The acks do not go through rumqttc's request queue: its event loop takes one request per poll
//! against up to ten incoming packets, so while a backlog streams in, acks fall behind without
//! bound, and a full queue would drop them (the broker then redelivers committed messages).
//! Written here, every ack keeps its permit until it is on the wire side of the connection, so
//! `MAX_PENDING` bounds both the messages held and the acks owed.
//!
//! # Layout
//! - [`IngestConfig`]: session settings (shared persistent session or a private observer one).
//! - [`MqttIngest::run`]: connect, subscribe on every CONNACK, poll, reconnect with backoff, drain.
//! - [`Acker`]: the ack path back from the writer.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use leasehold_config::MqttEndpoint;
use leasehold_telemetry::{events, metrics};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, PubAck, Publish, QoS,
    Request, SubscribeFilter, Transport,
};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("broker refused the subscription to {0:?}")]
    SubscribeRefused(Vec<String>),
}

/// A message received from the broker and not yet acknowledged.
#[derive(Debug)]
pub struct Inbound {
    /// The connection (1, 2, ...) it arrived on.
    pub conn: u64,
    pub pkid: u16,
    pub qos: QoS,
    /// The MQTT DUP flag: the broker sent this message before, on an earlier connection of the
    /// session, and never got its ack (a redelivery, or a first delivery after a lost ack).
    pub dup: bool,
    pub topic: String,
    pub payload: Bytes,
    pub received_at: DateTime<Utc>,
    pub received: Instant,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Inbound {
    /// A message built outside the broker path (tests, benchmarks). Never acknowledged.
    pub fn detached(topic: &str, payload: &[u8]) -> Self {
        Inbound {
            conn: 0,
            pkid: 0,
            qos: QoS::AtMostOnce,
            dup: false,
            topic: topic.to_string(),
            payload: Bytes::copy_from_slice(payload),
            received_at: Utc::now(),
            received: Instant::now(),
            _permit: None,
        }
    }
}

/// Which connection is current. Only the ingest task reads or changes it, and it also writes the
/// acks, so a connection change and an ack cannot interleave.
#[derive(Debug, Default, Clone, Copy)]
struct Gate {
    conn: u64,
    connected: bool,
}

/// Sends acks for committed messages back to the ingest task. Cheap to clone.
#[derive(Clone)]
pub struct Acker {
    tx: mpsc::UnboundedSender<Vec<Inbound>>,
}

impl Acker {
    /// An acker with no broker behind it (tests, tools): what it is given is dropped, never
    /// acknowledged. With [`Inbound::detached`] it runs a term's `Writer` in-process against a
    /// real database (`tests/generated.rs`).
    pub fn detached() -> Self {
        let (tx, _) = mpsc::unbounded_channel();
        Acker { tx }
    }

    /// Acknowledges `msgs` in order, without waiting. The channel needs no bound of its own:
    /// every message in it holds a `MAX_PENDING` permit.
    pub fn ack(&self, msgs: impl IntoIterator<Item = Inbound>) {
        let batch: Vec<Inbound> = msgs
            .into_iter()
            .filter(|m| m.qos != QoS::AtMostOnce)
            .collect();
        // If the ingest task is gone, so is its connection: the broker redelivers.
        if !batch.is_empty() {
            let _ = self.tx.send(batch);
        }
    }
}

/// Session settings.
#[derive(Clone, Debug)]
pub struct IngestConfig {
    pub endpoint: MqttEndpoint,
    pub client_id: String,
    /// `false` for the cluster's shared persistent session, `true` for an observer.
    pub clean_session: bool,
    /// Ack after commit (production) or let the client ack on receipt (observer).
    pub manual_acks: bool,
    pub keep_alive: Duration,
    pub reconnect_max: Duration,
    pub max_payload_bytes: usize,
    pub max_pending: usize,
    /// Configured topic filters (`MQTT_TOPICS`); device topics arrive on a watch channel.
    pub topics: Vec<String>,
    /// Whether a CONNACK without a session is unexpected on the first connect of this term
    /// (a previous leader has held the session).
    pub expect_session: bool,
}

/// MQTT packet ids are 16 bits. A refused message keeps its id until the next connection, and a
/// broker that hands ids out sequentially without checking which are in flight (Mosquitto 2.0.11)
/// reuses it after 65535 sends: an ack for the new holder of that id would then acknowledge the
/// refused message, which is lost. So refusals on one connection are capped below that.
pub fn refusal_limit(max_pending: usize) -> u64 {
    (65_535u64.saturating_sub(max_pending as u64 + 5_000)).max(1_000)
}

impl IngestConfig {
    fn from_config(
        cfg: &leasehold_config::Config,
        client_id: String,
        observer: bool,
        expect_session: bool,
    ) -> Self {
        IngestConfig {
            endpoint: cfg.mqtt.clone(),
            client_id,
            clean_session: observer,
            manual_acks: !observer,
            keep_alive: cfg.mqtt_keep_alive,
            reconnect_max: cfg.mqtt_reconnect_max,
            max_payload_bytes: cfg.max_payload_bytes,
            max_pending: cfg.max_pending,
            topics: cfg.mqtt_topics.clone(),
            expect_session,
        }
    }

    /// A leader's: the cluster's shared persistent session, acks after commit. `client_id` is
    /// the cluster's ([`leasehold_config::Config::client_id`]), resolved once at start.
    pub fn shared_session(
        cfg: &leasehold_config::Config,
        client_id: &leasehold_config::ClientId,
        expect_session: bool,
    ) -> Self {
        Self::from_config(cfg, client_id.id.clone(), false, expect_session)
    }

    /// An observer's (`MQTT_MODE=development`): its own clean session, acks on receipt.
    pub fn observer(cfg: &leasehold_config::Config, client_id: String) -> Self {
        Self::from_config(cfg, client_id, true, false)
    }
}

/// Disconnects within this time after CONNACK count toward a client-id conflict.
const QUICK_DISCONNECT: Duration = Duration::from_secs(3);
/// Consecutive quick disconnects that raise a client-id conflict.
const CONFLICT_AFTER: u32 = 3;
/// Writing one batch of acks into the socket; rumqttc's own writes use the same bound.
const ACK_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// The MQTT side of a term. Built per term by the supervisor; `run` consumes it.
pub struct MqttIngest {
    cfg: IngestConfig,
    client: AsyncClient,
    eventloop: EventLoop,
    gate: Gate,
    tx: Option<mpsc::Sender<Inbound>>,
    /// Committed messages coming back to be acknowledged.
    acks: mpsc::UnboundedReceiver<Vec<Inbound>>,
    pending: Arc<Semaphore>,
    device_topics: watch::Receiver<Vec<String>>,
    may_connect: Arc<dyn Fn() -> bool + Send + Sync>,
    connected: watch::Sender<bool>,
}

/// The broker's TLS configuration: always verified (chain and name), against MQTT_CA_FILE or
/// the system roots, with the client certificate when one is configured.
pub fn tls_config(
    ep: &leasehold_config::MqttEndpoint,
) -> Result<leasehold_tls::rustls::ClientConfig, leasehold_tls::TlsError> {
    let roots = match &ep.ca_file {
        Some(path) => leasehold_tls::Roots::File {
            setting: "MQTT_CA_FILE",
            path: path.clone(),
        },
        None => leasehold_tls::Roots::System {
            setting: "MQTT_CA_FILE",
        },
    };
    let identity = match (&ep.client_cert, &ep.client_key) {
        (Some(cert), Some(key)) => Some(leasehold_tls::Identity {
            cert_setting: "MQTT_CLIENT_CERT",
            cert: cert.clone(),
            key_setting: "MQTT_CLIENT_KEY",
            key: key.clone(),
        }),
        _ => None,
    };
    leasehold_tls::client_config(leasehold_tls::Verify::Full, &roots, identity.as_ref())
}

/// A configuration that trusts nothing: every handshake fails with an unknown-issuer error.
fn empty_roots() -> leasehold_tls::rustls::ClientConfig {
    leasehold_tls::rustls::ClientConfig::builder_with_provider(Arc::new(
        leasehold_tls::rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map(|b| {
        b.with_root_certificates(leasehold_tls::rustls::RootCertStore::empty())
            .with_no_client_auth()
    })
    .unwrap_or_else(|_| {
        leasehold_tls::rustls::ClientConfig::builder()
            .with_root_certificates(leasehold_tls::rustls::RootCertStore::empty())
            .with_no_client_auth()
    })
}

impl MqttIngest {
    /// Whether the broker connection is up, for whoever must act when it stays down.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }

    /// Builds the session; messages are delivered on the returned receiver.
    pub fn new(
        cfg: IngestConfig,
        device_topics: watch::Receiver<Vec<String>>,
        may_connect: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> (MqttIngest, Acker, mpsc::Receiver<Inbound>) {
        let mut opts = MqttOptions::new(&cfg.client_id, &cfg.endpoint.host, cfg.endpoint.port);
        opts.set_keep_alive(cfg.keep_alive)
            .set_clean_session(cfg.clean_session)
            .set_manual_acks(cfg.manual_acks);
        // Above MAX_PAYLOAD_BYTES so an oversized message is dead-lettered, not a reconnect loop.
        let max_packet = (cfg.max_payload_bytes * 2 + 64 * 1024).max(2 * 1024 * 1024);
        opts.set_max_packet_size(max_packet, 64 * 1024);
        if let (Some(u), p) = (&cfg.endpoint.username, &cfg.endpoint.password) {
            opts.set_credentials(u, p.clone().unwrap_or_default());
        }
        if cfg.endpoint.tls {
            match tls_config(&cfg.endpoint) {
                Ok(c) => opts.set_transport(Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(Arc::new(c)),
                )),
                // `leasehold run` checks this before starting; here the connection attempts
                // fail and say why instead of falling back to plain text.
                Err(e) => {
                    tracing::error!(error = %e, "MQTT TLS set-up failed; connections will fail");
                    opts.set_transport(Transport::tls_with_config(
                        rumqttc::TlsConfiguration::Rustls(Arc::new(empty_roots())),
                    ))
                }
            };
        }
        // Subscriptions, pings and DISCONNECT only: acks are written by `write_acks`.
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        eventloop.network_options.set_connection_timeout(5);
        let (tx, rx) = mpsc::channel(cfg.max_pending.max(1));
        let pending = Arc::new(Semaphore::new(cfg.max_pending));
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let acker = Acker { tx: acks_tx };
        (
            MqttIngest {
                cfg,
                client,
                eventloop,
                gate: Gate::default(),
                tx: Some(tx),
                acks,
                pending,
                device_topics,
                may_connect,
                connected: watch::Sender::new(false),
            },
            acker,
            rx,
        )
    }

    fn pending_count(&self) -> usize {
        self.cfg.max_pending - self.pending.available_permits()
    }

    fn wanted_topics(&self) -> BTreeSet<String> {
        self.cfg
            .topics
            .iter()
            .cloned()
            .chain(self.device_topics.borrow().iter().cloned())
            .collect()
    }

    /// Runs until `cancel` (stop at once: nothing more is acknowledged), or until `drain` has
    /// been requested and every forwarded message was acknowledged or dropped by the writer; then
    /// the acks are flushed and the connection closed with DISCONNECT.
    pub async fn run(
        mut self,
        cancel: CancellationToken,
        drain: CancellationToken,
    ) -> Result<(), IngestError> {
        let broker = self.cfg.endpoint.to_string();
        let mut connections = 0u64;
        let mut connected_at: Option<Instant> = None;
        let mut backoff = Duration::from_millis(100);
        let mut quick_disconnects = 0u32;
        let mut subscribed: BTreeSet<String> = BTreeSet::new();
        let mut overflowed = false;
        // Messages refused on the current connection (see `refusal_limit`).
        let mut refused = 0u64;
        let refuse_at_most = refusal_limit(self.cfg.max_pending);
        let mut last_full_log: Option<Instant> = None;
        let mut disconnecting = false;
        // An overflow's DISCONNECT is on its way; reconnect once it is out.
        let mut refill = false;
        // Cleared when the topic source is gone: its channel would report "changed" forever.
        let mut topics_open = true;
        let full = self.cfg.max_pending as u32;
        let result = loop {
            metrics().messages_pending.set(self.pending_count() as i64);
            if self.eventloop.network.is_none() && !(self.may_connect)() {
                tracing::info!("not connecting to the broker: this node may no longer ingest");
                break Ok(());
            }
            let draining = self.tx.is_none();
            let sem = self.pending.clone();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break Ok(()),
                _ = drain.cancelled(), if !draining => {
                    // Stop intake: what arrives from now on stays unacknowledged in the session
                    // and goes to the next leader. The writer finishes what it has.
                    self.tx = None;
                    tracing::info!(pending = self.pending_count(), "intake stopped; waiting for the writer to commit and acknowledge");
                }
                all = sem.acquire_many_owned(full), if (draining || overflowed) && !disconnecting && !refill => {
                    drop(all);
                    if draining {
                        // Everything forwarded is acknowledged: DISCONNECT goes out after the acks.
                        disconnecting = true;
                        if self.eventloop.network.is_none() || self.client.try_disconnect().is_err() {
                            break Ok(());
                        }
                    } else {
                        // Messages refused while full are still in flight at the broker; a new
                        // connection makes it redeliver them. DISCONNECT is queued behind the acks
                        // just sent, so they reach the broker first: cutting the connection here
                        // would purge them and have committed messages redelivered.
                        overflowed = false;
                        tracing::info!("pending messages drained after an overflow; reconnecting to receive what was refused");
                        if self.client.try_disconnect().is_ok() {
                            refill = true;
                        } else {
                            self.on_disconnect();
                            self.eventloop.clean();
                        }
                    }
                }
                Some(batch) = self.acks.recv() => self.write_acks(batch).await,
                changed = self.device_topics.changed(), if connected_at.is_some() && topics_open => {
                    if changed.is_err() {
                        // The topic source is gone (shutting down): keep the current topics.
                        topics_open = false;
                        continue;
                    }
                    self.resubscribe(&mut subscribed, false);
                }
                ev = self.eventloop.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        let reconnect = connections > 0;
                        connections += 1;
                        self.gate = Gate { conn: connections, connected: true };
                        connected_at = Some(Instant::now());
                        refused = 0;
                        self.connected.send_replace(true);
                        backoff = Duration::from_millis(100);
                        events::MqttConnected { broker: &broker, session_present: ack.session_present, reconnect }.emit();
                        if !self.cfg.clean_session && !ack.session_present && (reconnect || self.cfg.expect_session) {
                            events::MqttSessionLost { client_id: &self.cfg.client_id }.emit();
                        }
                        // Subscriptions are re-sent on every connect: a lost session lost them too.
                        subscribed.clear();
                        self.resubscribe(&mut subscribed, true);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        metrics().messages_received.inc();
                        if self.tx.is_none() {
                            // Draining: not ours to acknowledge any more.
                            continue;
                        }
                        let permit = match self.pending.clone().try_acquire_owned() {
                            Ok(permit) => Some(permit),
                            Err(_) => {
                                // MAX_PENDING is full: stop reading until the writer frees a slot.
                                // The broker's sends back up in TCP and in its own queue, which
                                // takes no packet ids and refuses nothing. Half a keep-alive at
                                // most, so pings still go out while the writer is stuck.
                                if last_full_log.is_none_or(|t: Instant| t.elapsed() > Duration::from_secs(10)) {
                                    events::PendingOverflow { max_pending: self.cfg.max_pending }.emit();
                                    last_full_log = Some(Instant::now());
                                }
                                metrics().messages_pending.set(self.pending_count() as i64);
                                // Slots come back as their acks are written, which is done here.
                                let deadline = tokio::time::sleep(self.cfg.keep_alive / 2);
                                tokio::pin!(deadline);
                                let waited = loop {
                                    tokio::select! {
                                        biased;
                                        _ = cancel.cancelled() => break None,
                                        p = self.pending.clone().acquire_owned() => break Some(p.ok()),
                                        Some(batch) = self.acks.recv() => self.write_acks(batch).await,
                                        _ = &mut deadline => break Some(None),
                                    }
                                };
                                match waited {
                                    Some(permit) => permit,
                                    None => break Ok(()),
                                }
                            }
                        };
                        match permit {
                            Some(permit) => self.forward(p, connections, permit),
                            None => {
                                // Refused: it stays in flight at the broker and comes back on the
                                // next connection (made once everything held is acknowledged).
                                overflowed = true;
                                refused += 1;
                                metrics().messages_overflow.inc();
                                if refused >= refuse_at_most && !refill {
                                    // Cut now, before the broker could reuse a refused message's
                                    // packet id: acks still owed on this connection are dropped
                                    // and their messages redelivered (duplicates), never lost.
                                    tracing::warn!(refused, "too many messages refused on one connection; reconnecting now");
                                    overflowed = false;
                                    self.on_disconnect();
                                    self.eventloop.clean();
                                }
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(s))) => {
                        let refused = s.return_codes.iter().filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)).count();
                        if refused > 0 {
                            tracing::error!(refused, "broker refused {refused} topic filter(s); check the broker ACL");
                        }
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) if refill => {
                        // Acks are out; connect again at once for the redelivery.
                        refill = false;
                        self.on_disconnect();
                        self.eventloop.clean();
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                        tracing::info!("acks flushed; disconnected from the broker");
                        break Ok(());
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let was_up = connected_at.take();
                        self.on_disconnect();
                        if disconnecting {
                            break Ok(());
                        }
                        match was_up {
                            Some(t) if t.elapsed() < QUICK_DISCONNECT => quick_disconnects += 1,
                            Some(_) => quick_disconnects = 0,
                            None => {}
                        }
                        if quick_disconnects >= CONFLICT_AFTER {
                            events::MqttClientIdConflict { client_id: &self.cfg.client_id, quick_disconnects }.emit();
                            quick_disconnects = 0;
                        }
                        let wait = backoff.mul_f64(0.5 + fastrand::f64() * 0.5);
                        events::MqttDisconnected { error: &DisplayConnErr(&e), retry_in_ms: wait.as_millis() }.emit();
                        backoff = (backoff * 2).min(self.cfg.reconnect_max);
                        tokio::select! {
                            _ = cancel.cancelled() => break Ok(()),
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            }
        };
        self.gate.connected = false;
        self.connected.send_replace(false);
        metrics().mqtt_connected.set(0);
        metrics().mqtt_subscribed_topics.set(0);
        result
    }

    /// Hands a message, with its `MAX_PENDING` permit, to the writer.
    fn forward(&mut self, p: Publish, conn: u64, permit: OwnedSemaphorePermit) {
        let Some(tx) = &self.tx else {
            return;
        };
        let msg = Inbound {
            conn,
            pkid: p.pkid,
            qos: p.qos,
            dup: p.dup,
            topic: p.topic,
            payload: p.payload,
            received_at: Utc::now(),
            received: Instant::now(),
            _permit: Some(permit),
        };
        // Capacity equals MAX_PENDING and each message holds a permit, so this cannot be full;
        // if the writer is gone the message is simply not acknowledged.
        let _ = tx.try_send(msg);
    }

    /// Writes the PUBACKs of `batch` on the current connection with one flush; acks of an
    /// earlier connection are dropped (their packet ids may now name other messages). The
    /// messages' permits return when `batch` is dropped, after their acks were handed over.
    async fn write_acks(&mut self, batch: Vec<Inbound>) {
        if !self.cfg.manual_acks {
            // The client acknowledged them on receipt (observer sessions).
            return;
        }
        let Gate { conn, connected } = self.gate;
        let current = |m: &&Inbound| connected && m.conn == conn;
        let stale = batch.iter().filter(|m| !current(m)).count() as u64;
        if stale > 0 {
            tracing::info!(count = stale, "acks dropped: their messages arrived on an earlier connection and will be redelivered");
            metrics().acks_dropped_stale.inc_by(stale);
        }
        let Some(network) = self.eventloop.network.as_mut() else {
            return;
        };
        let mut exactly_once = Vec::new();
        let written = tokio::time::timeout(ACK_WRITE_TIMEOUT, async {
            for m in batch.iter().filter(current) {
                if m.qos == QoS::ExactlyOnce {
                    // rumqttc must record the PUBREC to accept the broker's PUBREL.
                    exactly_once.push(m.pkid);
                    continue;
                }
                network.write(Packet::PubAck(PubAck::new(m.pkid))).await?;
            }
            network.flush().await
        })
        .await;
        // A broken connection shows in the next poll, which reconnects; the broker redelivers
        // whatever was not acknowledged.
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = ?e, "could not write acks; the broker will redeliver their messages")
            }
            Err(_) => {
                tracing::warn!("writing acks timed out; the broker will redeliver their messages")
            }
        }
        for pkid in exactly_once {
            let mut p = Publish::new("", QoS::ExactlyOnce, Vec::<u8>::new());
            p.pkid = pkid;
            if let Err(e) = self.client.try_ack(&p) {
                tracing::warn!(error = %e, pkid, "could not queue a PUBREC; the broker will redeliver the message");
            }
        }
    }

    /// Brings subscriptions in line with configured + device topics; never awaits.
    fn resubscribe(&mut self, subscribed: &mut BTreeSet<String>, connect: bool) {
        let wanted = self.wanted_topics();
        let add: Vec<String> = wanted.difference(subscribed).cloned().collect();
        let remove: Vec<String> = subscribed.difference(&wanted).cloned().collect();
        if !add.is_empty() {
            let filters = add
                .iter()
                .map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
            if let Err(e) = self.client.try_subscribe_many(filters) {
                tracing::error!(error = %e, topics = ?add, "could not queue subscription");
                return;
            }
        }
        for t in &remove {
            if let Err(e) = self.client.try_unsubscribe(t.clone()) {
                tracing::warn!(error = %e, topic = %t, "could not queue unsubscribe");
            }
        }
        if connect || !add.is_empty() || !remove.is_empty() {
            *subscribed = wanted;
            let devices = self.device_topics.borrow().len();
            events::TopicsSubscribed {
                configured: &self.cfg.topics,
                devices,
                total: subscribed.len(),
            }
            .emit();
            if !add.is_empty() && !connect {
                tracing::info!(added = ?add, removed = ?remove, "device topics changed; subscriptions updated");
            }
        }
    }

    /// The connection is gone: bump the connection number first, so no ack of the old
    /// connection is written from now on; then drop the socket with whatever was buffered on it
    /// and the publishes buffered from the dead connection (the broker redelivers both).
    fn on_disconnect(&mut self) {
        self.gate.conn = self.gate.conn.wrapping_add(1_000_000);
        self.gate.connected = false;
        self.eventloop.clean();
        self.eventloop.state.events.clear();
        self.eventloop
            .pending
            .retain(|r| !matches!(r, Request::PubAck(_) | Request::PubRec(_)));
        self.connected.send_replace(false);
        metrics().mqtt_connected.set(0);
    }
}

struct DisplayConnErr<'a>(&'a ConnectionError);
impl std::fmt::Display for DisplayConnErr<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            ConnectionError::ConnectionRefused(code) => {
                write!(f, "connection refused by broker: {code:?}")
            }
            other => write!(f, "{other}"),
        }
    }
}
