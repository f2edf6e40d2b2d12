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
//! Written here, every ack keeps its permits until it is on the wire side of the connection, so
//! `MAX_PENDING` and `MAX_PENDING_BYTES` bound both the messages held and the acks owed.
//!
//! Memory is bounded in messages and in bytes: a message holds one permit of `MAX_PENDING` and
//! one per byte (payload and topic) of `MAX_PENDING_BYTES`. When either is used up the ingest
//! stops reading from the broker (the broker's sends wait in TCP and in its queue; nothing is
//! refused) until acks return permits, and keeps the connection alive meanwhile by writing the
//! acks and its own PINGREQs. A payload over `MAX_PAYLOAD_BYTES` (a dead letter to be) is cut to
//! its first `MAX_PAYLOAD_BYTES` on arrival, its [`Inbound::original_size`] kept.
//!
//! # Layout
//! - [`IngestConfig`]: session settings (shared persistent session or a private observer one).
//! - [`MqttIngest::run`]: the event loop's I/O; one handler per event (`on_connack`,
//!   `on_event`, `on_connection_error`, `on_drained`, `on_ledger_reply`, `write_acks`).
//! - [`session`]: the connection's life as plain state (numbering, which acks may be written,
//!   backoff, client-id conflicts, the drain's DISCONNECT), unit-tested without a broker.
//! - [`Acker`]: the ack path back from the writer.
//! - [`subscriptions`]: subscribing a fleet of any size in small packets and reconciling the
//!   session with the wanted topics; [`ledger`]: where the session's subscriptions are kept.

pub mod ledger;
pub mod session;
pub mod subscriptions;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use leasehold_config::MqttEndpoint;
use leasehold_telemetry::{events, NodeStatus};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, PubAck, Publish,
    QoS, Request, Subscribe, SubscribeFilter, Transport, Unsubscribe,
};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

pub use ledger::{LedgerChange, LedgerError, LedgerFuture, MemoryLedger, SubscriptionLedger};
use session::{Dropped, Session};
use subscriptions::{Action, Kind, Subscriptions};

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the subscription ledger refused a write: this node no longer holds the lease")]
    Fenced,
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
    /// The payload; over `MAX_PAYLOAD_BYTES` only its first `MAX_PAYLOAD_BYTES` are kept.
    pub payload: Bytes,
    /// The payload's size as published (above `payload.len()` when it was cut).
    pub original_size: usize,
    /// When the ingest took it; the writer turns it into the database's time.
    pub received: Instant,
    _permit: Option<Reservation>,
}

/// Where the writer takes the ingest's messages, one by one. They travel in the runs the
/// ingest took them in (what one pass over the socket's reads gave): one channel send per run,
/// not per message, so that the two tasks do not hand each message across threads.
#[derive(Debug)]
pub struct Inbox {
    rx: mpsc::Receiver<Vec<Inbound>>,
    run: std::vec::IntoIter<Inbound>,
}

impl Inbox {
    /// An inbox of `capacity` runs and the sender of its runs (the ingest's, or a test's).
    pub fn channel(capacity: usize) -> (mpsc::Sender<Vec<Inbound>>, Inbox) {
        let (tx, rx) = mpsc::channel(capacity);
        let run = Vec::new().into_iter();
        (tx, Inbox { rx, run })
    }

    /// The next message, once there is one; `None` when the ingest is gone and every message
    /// was taken. Cancel-safe: a run received is kept in the same poll.
    pub async fn recv(&mut self) -> Option<Inbound> {
        loop {
            if let Some(m) = self.run.next() {
                return Some(m);
            }
            self.run = self.rx.recv().await?.into_iter();
        }
    }

    /// The next message if one is there now.
    pub fn try_recv(&mut self) -> Result<Inbound, mpsc::error::TryRecvError> {
        loop {
            if let Some(m) = self.run.next() {
                return Ok(m);
            }
            self.run = self.rx.try_recv()?.into_iter();
        }
    }
}

/// A message's share of `MAX_PENDING` (one) and `MAX_PENDING_BYTES` (its payload and topic
/// bytes); both return when the message is dropped, after its ack was written.
#[derive(Debug)]
struct Reservation {
    _count: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
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
            original_size: payload.len(),
            received: Instant::now(),
            _permit: None,
        }
    }
}

/// Reads of what the socket already holds (up to nine packets each) that one turn of the
/// ingest loop makes before it lets its other work (acks, commands, cancellation) go first.
const READ_AHEAD: usize = 16;

/// Drops `batch`, its messages' permits returned in one go: a semaphore takes a lock for every
/// release, which per message cost more than writing its ack.
fn release_together(batch: Vec<Inbound>) {
    let mut all: Option<Reservation> = None;
    for r in batch.into_iter().filter_map(|m| m._permit) {
        match all.as_mut() {
            Some(a) => {
                a._count.merge(r._count);
                a._bytes.merge(r._bytes);
            }
            None => all = Some(r),
        }
    }
}

/// Sends acks for committed messages back to the ingest task. Cheap to clone.
#[derive(Clone)]
pub struct Acker {
    tx: mpsc::UnboundedSender<Vec<Inbound>>,
}

impl Acker {
    /// An acker with no broker behind it (tests, tools): what it is given is dropped, never
    /// acknowledged. With [`Inbound::detached`] it runs a term's `Writer` in-process against a
    /// real database (`tests/e2e/generated.rs`).
    pub fn detached() -> Self {
        let (tx, _) = mpsc::unbounded_channel();
        Acker { tx }
    }

    /// Acknowledges `msgs` in order, without waiting. The channel needs no bound of its own:
    /// every message in it holds a `MAX_PENDING` permit.
    pub fn ack(&self, mut batch: Vec<Inbound>) {
        // `retain` moves nothing when every message is kept (QoS 1, the common case).
        batch.retain(|m| m.qos != QoS::AtMostOnce);
        // If the ingest task is gone, so is its connection: the broker redelivers.
        if !batch.is_empty() {
            let _ = self.tx.send(batch);
        }
    }
}

/// The enabled `devices` topics, `None` until they were first read from the database: until then
/// nothing is unsubscribed (the session's subscriptions are not judged against a list not known).
pub type DeviceTopics = Option<Vec<String>>;

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
    /// Payload and topic bytes of received-but-unacknowledged messages, at most.
    pub max_pending_bytes: usize,
    /// Configured topic filters (`MQTT_TOPICS`); device topics arrive on a watch channel.
    pub topics: Vec<String>,
    /// Whether a CONNACK without a session is unexpected on the first connect of this term
    /// (a previous leader has held the session).
    pub expect_session: bool,
    /// The Sparkplug B host id this session is the primary host application of (a leader's,
    /// when the cluster reads `sparkplug_b`): its STATE is online while connected, offline as
    /// its will and at a drain.
    pub sparkplug_host: Option<String>,
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
            keep_alive: cfg.node.mqtt_keep_alive,
            reconnect_max: cfg.node.mqtt_reconnect_max,
            max_payload_bytes: cfg.cluster.max_payload_bytes,
            max_pending: cfg.max_pending,
            max_pending_bytes: cfg.max_pending_bytes,
            topics: wanted_topics(cfg),
            expect_session,
            sparkplug_host: None,
        }
    }

    /// A leader's: the cluster's shared persistent session, acks after commit. `client_id` is
    /// the cluster's ([`leasehold_config::Config::client_id`]), resolved once at start.
    pub fn shared_session(
        cfg: &leasehold_config::Config,
        client_id: &leasehold_config::ClientId,
        expect_session: bool,
    ) -> Self {
        IngestConfig {
            sparkplug_host: cfg.sparkplug_host_id(&client_id.id),
            ..Self::from_config(cfg, client_id.id.clone(), false, expect_session)
        }
    }

    /// An observer's (`MQTT_MODE=development`): its own clean session, acks on receipt.
    pub fn observer(cfg: &leasehold_config::Config, client_id: String) -> Self {
        Self::from_config(cfg, client_id, true, false)
    }
}

/// The configured filters: `MQTT_TOPICS`, then every named route's filters not already among
/// them (file order). A message on any of them is delivered; the writer decides its routes.
pub fn wanted_topics(cfg: &leasehold_config::Config) -> Vec<String> {
    let mut topics = cfg.cluster.mqtt_topics.clone();
    for f in cfg.routes.iter().flat_map(|r| &r.topics) {
        if !topics.contains(f) {
            topics.push(f.clone());
        }
    }
    topics
}

/// The next value of `rx`, `None` once its sender is gone; pending forever without one.
async fn watch_changed<T: Clone>(rx: &mut Option<watch::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(rx.borrow_and_update().clone()),
            Err(_) => None,
        },
        None => std::future::pending().await,
    }
}

/// Writing one batch of acks into the socket; rumqttc's own writes use the same bound.
const ACK_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// After a drain, how long the last subscription-ledger writes may take before they are dropped.
/// Short: the hand-over to a standby waits for it (G4: within a second), and a dropped write only
/// leaves rows "pending", which the next connection reconciles.
const LEDGER_FLUSH: Duration = Duration::from_millis(250);

/// The MQTT side of a term. Built per term by the supervisor; `run` consumes it.
pub struct MqttIngest {
    cfg: IngestConfig,
    client: AsyncClient,
    eventloop: EventLoop,
    /// The connection's state; only this task reads or changes it, and it also writes the
    /// acks, so a connection change and an ack cannot interleave.
    session: Session,
    tx: Option<mpsc::Sender<Vec<Inbound>>>,
    /// Messages taken and not yet handed to the writer: sent together at the end of a pass
    /// over the socket's reads ([`MqttIngest::send_run`]).
    run: Vec<Inbound>,
    /// Messages received since the last run was sent, counted with it.
    received: u64,
    /// Committed messages coming back to be acknowledged.
    acks: mpsc::UnboundedReceiver<Vec<Inbound>>,
    /// `MAX_PENDING`: one permit per message held.
    pending: Arc<Semaphore>,
    /// `MAX_PENDING_BYTES`: one permit per payload and topic byte held.
    pending_bytes: Arc<Semaphore>,
    max_pending_bytes: usize,
    device_topics: watch::Receiver<DeviceTopics>,
    /// The configured filters when they can change while the term runs (a new cluster
    /// configuration); `None`: `cfg.topics` for good.
    configured: Option<watch::Receiver<Vec<String>>>,
    may_connect: Arc<dyn Fn() -> bool + Send + Sync>,
    connected: watch::Sender<bool>,
    subs: Subscriptions,
    ledger: Arc<dyn SubscriptionLedger>,
    /// Ledger writes, applied in order by the ledger task of `run`.
    ledger_ops: Option<mpsc::UnboundedSender<subscriptions::LedgerOp>>,
    last_full_log: Option<Instant>,
    /// When the publishes now being taken were read: the event loop reads several at once.
    read_at: Instant,
    /// The node's status: this task owns its MQTT part.
    status: NodeStatus,
    /// Subscribe failures of the node's earlier terms (the status counts over the node's life).
    failures_before: u64,
    /// The Sparkplug B STATE this session publishes, when it is a primary host's.
    state: Option<HostState>,
}

/// A Sparkplug 3.0 primary host's STATE: its topic and the timestamp of this term's birth, which
/// its will (the death) carries too, so that an edge node tells a late will from a new birth.
#[derive(Debug, Clone)]
struct HostState {
    topic: String,
    since_ms: u64,
    /// Online is still to be sent on this connection (the request queue was full).
    pending: bool,
}

/// Whether a STATE payload says offline: JSON with `"online": false`, however spaced. A payload
/// far larger than a STATE is not read (it would be parsed on the event loop's task).
fn says_offline(payload: &[u8]) -> bool {
    payload.len() <= 4096
        && serde_json::from_slice::<serde_json::Value>(payload)
            .is_ok_and(|v| v.get("online").and_then(serde_json::Value::as_bool) == Some(false))
}

/// The payload of a primary host's STATE (Sparkplug 3.0): `{"online": .., "timestamp": ms}`.
pub fn state_payload(online: bool, timestamp_ms: u64) -> Vec<u8> {
    format!(r#"{{"online":{online},"timestamp":{timestamp_ms}}}"#).into_bytes()
}

/// The STATE topic of a primary host.
pub fn state_topic(host_id: &str) -> String {
    format!("spBv1.0/STATE/{host_id}")
}

/// Publishes on the term's connection: Sparkplug rebirth requests. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    client: AsyncClient,
}

impl Publisher {
    /// Queues `payload` on `topic` at QoS 0 (a command: a later one replaces a lost one); false
    /// when the connection's request queue is full.
    pub fn command(&self, topic: &str, payload: Vec<u8>) -> bool {
        self.client
            .try_publish(topic, QoS::AtMostOnce, false, payload)
            .is_ok()
    }
}

/// Whether the loop goes on after an event.
enum Flow {
    Go,
    Stop(Result<(), IngestError>),
}

/// What became of a message taken from the broker.
enum Taken {
    Done,
    Cancelled,
    /// The connection broke while intake was paused.
    Lost(ConnectionError),
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

/// The largest packet Leasehold accepts from the broker: above `MAX_PAYLOAD_BYTES`, so an
/// oversized message is dead-lettered rather than a reconnect loop.
pub fn max_incoming_packet(max_payload_bytes: usize) -> usize {
    (max_payload_bytes * 2 + 64 * 1024).max(2 * 1024 * 1024)
}

/// The broker connection's options for `client_id`: the configured endpoint, credentials and
/// TLS, and packet limits above `max_payload_bytes`. Every connection Leasehold makes to the
/// broker (the session, an observer, `leasehold doctor`'s probes) starts from these.
pub fn client_options(
    endpoint: &MqttEndpoint,
    client_id: &str,
    max_payload_bytes: usize,
) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, &endpoint.host, endpoint.port);
    // Incoming: above MAX_PAYLOAD_BYTES so an oversized message is dead-lettered, not a
    // reconnect loop. Outgoing: subscriptions are split into packets far below this.
    opts.set_max_packet_size(
        max_incoming_packet(max_payload_bytes),
        subscriptions::MAX_OUTGOING_PACKET,
    );
    if let (Some(u), p) = (&endpoint.username, &endpoint.password) {
        opts.set_credentials(u, p.clone().unwrap_or_default());
    }
    if endpoint.tls {
        let config = tls_config(endpoint).unwrap_or_else(|e| {
            // `leasehold run` checks this before starting; here the connection attempts
            // fail and say why instead of falling back to plain text.
            tracing::error!(error = %e, "MQTT TLS set-up failed; connections will fail");
            empty_roots()
        });
        let tls = rumqttc::TlsConfiguration::Rustls(Arc::new(config));
        opts.set_transport(Transport::tls_with_config(tls));
    }
    opts
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
    /// Publishes on this term's connection (Sparkplug rebirth requests).
    pub fn publisher(&self) -> Publisher {
        Publisher {
            client: self.client.clone(),
        }
    }

    /// Whether the broker connection is up, for whoever must act when it stays down.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }

    /// Builds the session; messages are delivered on the returned receiver. Its subscriptions
    /// are remembered in a [`MemoryLedger`] unless [`MqttIngest::with_ledger`] gives another.
    pub fn new(
        cfg: IngestConfig,
        device_topics: watch::Receiver<DeviceTopics>,
        may_connect: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> (MqttIngest, Acker, Inbox) {
        let mut opts = client_options(&cfg.endpoint, &cfg.client_id, cfg.max_payload_bytes);
        opts.set_keep_alive(cfg.keep_alive)
            .set_clean_session(cfg.clean_session)
            .set_manual_acks(cfg.manual_acks);
        let state = cfg.sparkplug_host.as_deref().map(|id| HostState {
            topic: state_topic(id),
            since_ms: Utc::now().timestamp_millis().max(0) as u64,
            pending: false,
        });
        if let Some(st) = &state {
            // Published by the broker when this connection dies without a DISCONNECT.
            opts.set_last_will(rumqttc::LastWill::new(
                st.topic.clone(),
                state_payload(false, st.since_ms),
                QoS::AtLeastOnce,
                true,
            ));
        }
        // DISCONNECT and PUBRECs only: acks are written by `write_acks`, pings during a pause by
        // `ping`, subscriptions are queued on the event loop a window at a time.
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        eventloop.network_options.set_connection_timeout(5);
        // A run holds at least one message and its permit, so the channel is never full.
        let (tx, rx) = Inbox::channel(cfg.max_pending.max(1));
        let pending = Arc::new(Semaphore::new(cfg.max_pending));
        let max_pending_bytes = cfg
            .max_pending_bytes
            .clamp(1, (u32::MAX as usize).min(Semaphore::MAX_PERMITS));
        let pending_bytes = Arc::new(Semaphore::new(max_pending_bytes));
        let (acks_tx, acks) = mpsc::unbounded_channel();
        let acker = Acker { tx: acks_tx };
        let subs = Subscriptions::new(cfg.topics.clone());
        let session = Session::new(cfg.clean_session, cfg.expect_session, cfg.reconnect_max);
        (
            MqttIngest {
                cfg,
                client,
                eventloop,
                session,
                tx: Some(tx),
                run: Vec::new(),
                received: 0,
                acks,
                pending,
                pending_bytes,
                max_pending_bytes,
                device_topics,
                configured: None,
                may_connect,
                connected: watch::Sender::new(false),
                subs,
                ledger: Arc::new(MemoryLedger::default()),
                ledger_ops: None,
                last_full_log: None,
                read_at: Instant::now(),
                status: NodeStatus::default(),
                failures_before: 0,
                state,
            },
            acker,
            rx,
        )
    }

    /// Remembers the session's subscriptions in `ledger` (the leader's: PostgreSQL, fenced).
    pub fn with_ledger(mut self, ledger: Arc<dyn SubscriptionLedger>) -> Self {
        self.ledger = ledger;
        self
    }

    /// Configured filters that follow `topics` while the term runs (the cluster's configuration
    /// applied live): added ones subscribed before removed ones are unsubscribed.
    pub fn with_configured_topics(mut self, topics: watch::Receiver<Vec<String>>) -> Self {
        self.configured = Some(topics);
        self
    }

    /// Reports into the node's status (a private one unless given).
    pub fn with_status(mut self, status: NodeStatus) -> Self {
        self.failures_before = status.mqtt().subscribe_failures;
        self.status = status;
        self
    }

    /// Publishes the pending counts (status and gauges).
    fn report_pending(&self) {
        let (pending, pending_bytes) = (self.pending_count(), self.pending_byte_count());
        self.status.set_pending(pending, pending_bytes);
        events::PendingChanged {
            pending,
            pending_bytes,
        }
        .emit();
    }

    /// Publishes the subscriptions' state (status and gauges).
    fn report_subscriptions(&self) {
        let subs = self.subs.status();
        events::SubscriptionsChanged { status: &subs }.emit();
        let failures = self.failures_before + subs.refusals;
        self.status.update_mqtt(|m| {
            m.subscribe_failures = failures;
            m.subscriptions = subs;
        });
    }

    fn pending_count(&self) -> usize {
        self.cfg.max_pending - self.pending.available_permits()
    }

    fn pending_byte_count(&self) -> usize {
        self.max_pending_bytes - self.pending_bytes.available_permits()
    }

    /// Runs until `cancel` (stop at once: nothing more is acknowledged), or until `drain` has
    /// been requested and every forwarded message was acknowledged or dropped by the writer; then
    /// the acks are flushed and the connection closed with DISCONNECT.
    pub async fn run(
        mut self,
        cancel: CancellationToken,
        drain: CancellationToken,
    ) -> Result<(), IngestError> {
        let (ledger_task, mut replies) = self.start_ledger();
        self.on_device_topics();

        // Cleared when the topic source is gone: its channel would report "changed" forever.
        let mut topics_open = true;
        let mut configured = self.configured.take();
        if let Some(rx) = configured.as_mut() {
            let topics = rx.borrow_and_update().clone();
            self.set_configured(topics);
        }
        let full = self.cfg.max_pending as u32;
        let result = loop {
            self.report_pending();
            if self.eventloop.network.is_none() && !(self.may_connect)() {
                tracing::info!("not connecting to the broker: this node may no longer ingest");
                break Ok(());
            }
            let draining = self.tx.is_none();
            let sem = self.pending.clone();
            let retry_at = self.subs.next_retry();
            let retry = tokio::time::sleep_until(
                retry_at
                    .map(tokio::time::Instant::from_std)
                    .unwrap_or_else(tokio::time::Instant::now),
            );
            let flow = tokio::select! {
                biased;
                _ = cancel.cancelled() => break Ok(()),
                _ = drain.cancelled(), if !draining => {
                    self.stop_intake();
                    Flow::Go
                }
                all = sem.acquire_many_owned(full), if draining && !self.session.is_disconnecting() => {
                    drop(all);
                    self.on_drained()
                }
                Some(batch) = self.acks.recv() => {
                    self.write_acks(batch).await;
                    Flow::Go
                }
                Some(reply) = replies.recv() => self.on_ledger_reply(reply),
                changed = self.device_topics.changed(), if topics_open => {
                    if changed.is_err() {
                        // The topic source is gone (shutting down): keep the current topics.
                        topics_open = false;
                    } else {
                        self.on_device_topics();
                    }
                    Flow::Go
                }
                changed = watch_changed(&mut configured) => {
                    match changed {
                        Some(topics) => self.set_configured(topics),
                        // The configuration's source is gone (shutting down): keep these.
                        None => configured = None,
                    }
                    Flow::Go
                }
                _ = retry, if retry_at.is_some() => {
                    let actions = self.subs.retry_due(Instant::now());
                    self.execute(actions);
                    Flow::Go
                }
                ev = self.eventloop.poll() => self.on_poll(ev, &cancel, &drain).await,
            };
            match flow {
                Flow::Go => {}
                Flow::Stop(r) => break r,
            }
        };
        self.closed(ledger_task, cancel.is_cancelled() || result.is_err())
            .await;
        result
    }

    /// Starts the ledger task, which applies the session's ledger writes in order without ever
    /// making the event loop wait for the database; its answers come on the receiver returned.
    fn start_ledger(
        &mut self,
    ) -> (
        tokio::task::JoinHandle<()>,
        mpsc::UnboundedReceiver<ledger::Reply>,
    ) {
        let (ops_tx, ops_rx) = mpsc::unbounded_channel();
        let (replies_tx, replies) = mpsc::unbounded_channel();
        let ledger_task = tokio::spawn(ledger::run(
            self.ledger.clone(),
            self.cfg.client_id.clone(),
            ops_rx,
            replies_tx,
        ));
        self.ledger_ops = Some(ops_tx);
        (ledger_task, replies)
    }

    /// What the event loop read: a PUBLISH handed to the writer, with the ones read together
    /// with it; any other event, or the connection's error, handled.
    async fn on_poll(
        &mut self,
        ev: Result<Event, ConnectionError>,
        cancel: &CancellationToken,
        drain: &CancellationToken,
    ) -> Flow {
        let ev = match ev {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let conn = self.session.conn();
                self.read_at = Instant::now();
                let taken = match self.take(p, conn, cancel, drain).await {
                    Taken::Done => self.take_buffered(conn, cancel, drain).await,
                    other => other,
                };
                self.send_run();
                match taken {
                    Taken::Done => return Flow::Go,
                    Taken::Cancelled => return Flow::Stop(Ok(())),
                    Taken::Lost(e) => Err(e),
                }
            }
            other => other,
        };
        match ev {
            Ok(ev) => self.on_event(ev),
            Err(e) => self.on_connection_error(e, cancel).await,
        }
    }

    /// The connection is over: nothing more is acknowledged, and the ledger task ends.
    async fn closed(&mut self, ledger_task: tokio::task::JoinHandle<()>, hard_stop: bool) {
        self.session.lost();
        self.connected.send_replace(false);
        self.subs.disconnected();
        // Let the last ledger writes (grants, removals) through after a clean stop; after a hard
        // stop they are dropped: the rows stay "pending" and the next connection reconciles them.
        self.ledger_ops = None;
        if hard_stop {
            ledger_task.abort();
        } else if tokio::time::timeout(LEDGER_FLUSH, ledger_task)
            .await
            .is_err()
        {
            tracing::warn!("subscription ledger writes did not finish within {LEDGER_FLUSH:?}; the next connection reconciles them");
        }
        events::MqttClosed.emit();
        self.status.update_mqtt(|m| {
            m.connected = false;
            m.subscriptions = Default::default();
        });
        events::SubscriptionsChanged {
            status: &Default::default(),
        }
        .emit();
    }

    /// Everything forwarded is acknowledged after a drain: DISCONNECT goes out after the acks
    /// (and after a primary host's STATE offline: a DISCONNECT sends no will).
    fn on_drained(&mut self) -> Flow {
        self.session.drained();
        if let (Some(st), Some(_)) = (&self.state, &self.eventloop.network) {
            let offline = state_payload(false, st.since_ms);
            if let Err(e) =
                self.client
                    .try_publish(st.topic.clone(), QoS::AtLeastOnce, true, offline)
            {
                tracing::warn!(error = %e, topic = %st.topic, "Sparkplug STATE offline not sent");
            }
        }
        if self.eventloop.network.is_none() || self.client.try_disconnect().is_err() {
            return Flow::Stop(Ok(()));
        }
        Flow::Go
    }

    /// The ledger task answered: the rows of a connection, an intent written, or fenced.
    fn on_ledger_reply(&mut self, reply: ledger::Reply) -> Flow {
        let now = Instant::now();
        let actions = match reply {
            ledger::Reply::Loaded { conn, rows } => self.subs.loaded(conn, rows, now),
            ledger::Reply::IntentWritten(chunk) => self.subs.intent_written(chunk),
            ledger::Reply::Fenced => {
                tracing::error!("subscription ledger write fenced: this node no longer holds the lease; ending the term");
                return Flow::Stop(Err(IngestError::Fenced));
            }
        };
        self.execute(actions);
        self.publish_online();
        Flow::Go
    }

    /// The enabled `devices` topics changed.
    fn on_device_topics(&mut self) {
        let topics = self.device_topics.borrow_and_update().clone();
        let actions = self
            .subs
            .set_device_topics(topics.as_deref(), Instant::now());
        self.execute(actions);
    }

    /// The configured filters changed (or were first read).
    fn set_configured(&mut self, topics: Vec<String>) {
        let actions = self.subs.set_configured(topics, Instant::now());
        self.execute(actions);
    }

    /// A primary host's STATE online, if still to be sent on this connection, once its
    /// subscriptions are in place (Sparkplug 3.0: an edge node born on our online must find us
    /// subscribed): queued on the connection, or tried again at the next event.
    fn publish_online(&mut self) {
        if !self.subs.settled() {
            return;
        }
        let Some(st) = self.state.as_mut().filter(|st| st.pending) else {
            return;
        };
        let online = state_payload(true, st.since_ms);
        match self
            .client
            .try_publish(st.topic.clone(), QoS::AtLeastOnce, true, online)
        {
            Ok(()) => {
                st.pending = false;
                tracing::info!(topic = %st.topic, "Sparkplug primary host online");
            }
            Err(e) => {
                tracing::debug!(error = %e, topic = %st.topic, "Sparkplug STATE online not queued yet")
            }
        }
    }

    /// A packet from the event loop other than a PUBLISH.
    fn on_event(&mut self, ev: Event) -> Flow {
        let flow = self.on_packet(ev);
        self.publish_online();
        flow
    }

    fn on_packet(&mut self, ev: Event) -> Flow {
        match ev {
            Event::Incoming(Packet::ConnAck(ack)) => self.on_connack(ack.session_present),
            Event::Outgoing(Outgoing::Subscribe(pkid)) => self.subs.outgoing(Kind::Subscribe, pkid),
            Event::Outgoing(Outgoing::Unsubscribe(pkid)) => {
                self.subs.outgoing(Kind::Unsubscribe, pkid)
            }
            Event::Incoming(Packet::SubAck(s)) => {
                let actions = self.subs.suback(s.pkid, &s.return_codes, Instant::now());
                self.execute(actions);
            }
            Event::Incoming(Packet::UnsubAck(u)) => {
                let actions = self.subs.unsuback(u.pkid, Instant::now());
                self.execute(actions);
            }
            Event::Outgoing(Outgoing::Disconnect) => {
                tracing::info!("acks flushed; disconnected from the broker");
                return Flow::Stop(Ok(()));
            }
            _ => {}
        }
        Flow::Go
    }

    fn on_connack(&mut self, session_present: bool) {
        let c = self.session.connack(session_present, Instant::now());
        self.connected.send_replace(true);
        if let Some(st) = &mut self.state {
            // Online at every connection of the term, with the term's timestamp (its will's).
            st.pending = true;
        }
        self.publish_online();
        // Reconcile the session's subscriptions with what is wanted: from the ledger, or from
        // nothing when the broker has no session. (Before the connect is reported, so /health
        // never shows the new connection with the old connection's subscriptions.)
        let actions = self.subs.connected(c.conn, session_present, Instant::now());
        self.execute(actions);
        events::MqttConnected {
            broker: &self.cfg.endpoint.to_string(),
            session_present,
            reconnect: c.reconnect,
        }
        .emit();
        let lost_at = c.session_lost.then(Utc::now);
        self.status.update_mqtt(|m| {
            m.connected = true;
            m.reconnects += u64::from(c.reconnect);
            if lost_at.is_some() {
                m.session_lost_at = lost_at;
            }
        });
        if c.session_lost {
            events::MqttSessionLost {
                client_id: &self.cfg.client_id,
            }
            .emit();
        }
    }

    /// The connection broke or could not be made: drop what belonged to it, then wait out the
    /// backoff (or stop, after a drain's DISCONNECT).
    async fn on_connection_error(
        &mut self,
        e: ConnectionError,
        cancel: &CancellationToken,
    ) -> Flow {
        // The session first: from here on no ack of the old connection is written.
        let dropped = self
            .session
            .connection_error(Instant::now(), fastrand::f64());
        self.on_disconnect();
        let (wait, conflict) = match dropped {
            Dropped::Finished => return Flow::Stop(Ok(())),
            Dropped::Reconnect { wait, conflict } => (wait, conflict),
        };
        if let Some(quick_disconnects) = conflict {
            events::MqttClientIdConflict {
                client_id: &self.cfg.client_id,
                quick_disconnects,
            }
            .emit();
            let now = Utc::now();
            self.status
                .update_mqtt(|m| m.client_id_conflict_at = Some(now));
        }
        events::MqttDisconnected {
            error: &DisplayConnErr(&e),
            retry_in_ms: wait.as_millis(),
        }
        .emit();
        tokio::select! {
            _ = cancel.cancelled() => Flow::Stop(Ok(())),
            _ = tokio::time::sleep(wait) => Flow::Go,
        }
    }

    /// Stops intake: what arrives from now on stays unacknowledged in the session and goes to
    /// the next leader. The writer finishes what it has.
    fn stop_intake(&mut self) {
        self.tx = None;
        tracing::info!(
            pending = self.pending_count(),
            "intake stopped; waiting for the writer to commit and acknowledge"
        );
    }

    /// Carries out what the subscription state asks for, in order: ledger writes go to the
    /// ledger task, packets are queued on the event loop (never into the bounded request
    /// channel, which a large fleet would overflow).
    fn execute(&mut self, actions: Vec<Action>) {
        self.report_subscriptions();
        for a in actions {
            match a {
                Action::Ledger(op) => {
                    // If the ledger task is gone it said why (fenced) or the term is ending.
                    if let Some(tx) = &self.ledger_ops {
                        let _ = tx.send(op);
                    }
                }
                Action::Send { kind, filters, .. } => {
                    self.eventloop.pending.push_back(match kind {
                        Kind::Subscribe => Request::Subscribe(Subscribe::new_many(
                            filters
                                .into_iter()
                                .map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce)),
                        )),
                        Kind::Unsubscribe => Request::Unsubscribe(Unsubscribe {
                            pkid: 0,
                            topics: filters,
                        }),
                    })
                }
            }
        }
    }

    /// A message from the broker: cut to `MAX_PAYLOAD_BYTES` if larger, then handed to the
    /// writer once it fits both `MAX_PENDING` and `MAX_PENDING_BYTES`. Until then nothing more is
    /// read from the broker (its sends wait in TCP and in its queue; nothing is refused), while
    /// acks are still written and the connection is kept alive with PINGREQs.
    async fn take(
        &mut self,
        p: Publish,
        conn: u64,
        cancel: &CancellationToken,
        drain: &CancellationToken,
    ) -> Taken {
        self.received += 1;
        if self.tx.is_none() {
            // Draining: not ours to acknowledge any more.
            return Taken::Done;
        }
        self.on_own_state(&p);
        let original_size = p.payload.len();
        let payload = if original_size > self.cfg.max_payload_bytes {
            // A copy, so the large buffer is freed now rather than held until the ack.
            Bytes::copy_from_slice(&p.payload[..self.cfg.max_payload_bytes])
        } else {
            p.payload
        };
        let cost = (payload.len() + p.topic.len()).clamp(1, self.max_pending_bytes) as u32;
        let reserved = match self.try_reserve(cost) {
            Some(r) => r,
            // The run's messages hold room too: the writer must have them to free it.
            None => match self.send_run().wait_for_room(cost, cancel, drain).await {
                Ok(r) => r,
                Err(taken) => return taken,
            },
        };
        // Handed to the writer with its share of `MAX_PENDING` and `MAX_PENDING_BYTES`, in this
        // pass's run.
        if self.tx.is_some() {
            self.run.push(Inbound {
                conn,
                pkid: p.pkid,
                qos: p.qos,
                dup: p.dup,
                topic: p.topic,
                payload,
                original_size,
                received: self.read_at,
                _permit: Some(reserved),
            });
        }
        Taken::Done
    }

    /// Hands the messages taken so far to the writer, and counts those received. The channel's
    /// capacity equals MAX_PENDING and each run holds at least one message's permit, so it
    /// cannot be full; if the writer is gone, the messages are simply not acknowledged.
    fn send_run(&mut self) -> &mut Self {
        if self.received > 0 {
            let count = std::mem::take(&mut self.received);
            events::MessagesReceived { count }.emit();
        }
        if !self.run.is_empty() {
            let next = Vec::with_capacity(self.run.len());
            let run = std::mem::replace(&mut self.run, next);
            if let Some(tx) = &self.tx {
                let _ = tx.try_send(run);
            }
        }
        self
    }

    /// A STATE of ours saying offline while we are the host (a late will of ours, another host
    /// misconfigured with our id): Sparkplug 3.0 says to say online again.
    fn on_own_state(&mut self, p: &Publish) {
        if let Some(st) = self.state.as_mut() {
            if p.topic == st.topic && says_offline(&p.payload) {
                st.pending = true;
                self.publish_online();
            }
        }
    }

    /// Waits until a message of `cost` bytes fits both `MAX_PENDING` and `MAX_PENDING_BYTES`,
    /// reading nothing from the broker meanwhile. `Err`: what became of the message instead.
    async fn wait_for_room(
        &mut self,
        cost: u32,
        cancel: &CancellationToken,
        drain: &CancellationToken,
    ) -> Result<Reservation, Taken> {
        self.report_full();
        self.report_pending();
        let mut ping = tokio::time::interval_at(
            tokio::time::Instant::now() + self.cfg.keep_alive / 2,
            self.cfg.keep_alive / 2,
        );
        loop {
            let (count, bytes) = (self.pending.clone(), self.pending_bytes.clone());
            let reserve = async move {
                let c = count.acquire_owned().await.ok()?;
                let b = bytes.acquire_many_owned(cost).await.ok()?;
                Some(Reservation {
                    _count: c,
                    _bytes: b,
                })
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(Taken::Cancelled),
                _ = drain.cancelled() => {
                    // This message stays unacknowledged in the session.
                    self.stop_intake();
                    return Err(Taken::Done);
                }
                r = reserve => match r {
                    Some(r) => {
                        // Read from the socket only now.
                        self.read_at = Instant::now();
                        break Ok(r);
                    }
                    None => return Err(Taken::Cancelled),
                },
                // Permits come back as their acks are written, which is done here.
                Some(batch) = self.acks.recv() => self.write_acks(batch).await,
                _ = ping.tick() => {
                    if let Err(e) = self.ping().await {
                        return Err(Taken::Lost(e));
                    }
                }
            }
        }
    }

    /// The budget is used up: said at most every ten seconds, not for every message held back.
    fn report_full(&mut self) {
        if self
            .last_full_log
            .is_none_or(|t: Instant| t.elapsed() > Duration::from_secs(10))
        {
            let (setting, limit) = match self.pending.available_permits() {
                0 => ("MAX_PENDING", self.cfg.max_pending),
                _ => ("MAX_PENDING_BYTES", self.max_pending_bytes),
            };
            events::PendingOverflow {
                setting,
                limit,
                pending: self.pending_count(),
                pending_bytes: self.pending_byte_count(),
            }
            .emit();
            self.last_full_log = Some(Instant::now());
        }
    }

    /// Takes the publishes rumqttc read together with the one just taken (it reads up to nine
    /// packets at a time and buffers them), as `poll` would return them, one by one: without
    /// building this loop's `select!`, and publishing the pending counts, once per message.
    /// Then reads on what the socket already holds, without waiting, up to [`READ_AHEAD`]
    /// reads: a turn of `poll` (its `select!`, a timer) and of this loop costs more than the
    /// nine messages it would bring. Stops at the first other event, which `poll` then returns,
    /// when the socket holds nothing more, or, before a read, once cancelled or draining.
    async fn take_buffered(
        &mut self,
        conn: u64,
        cancel: &CancellationToken,
        drain: &CancellationToken,
    ) -> Taken {
        let mut reads = 0;
        loop {
            if self.eventloop.state.events.is_empty() {
                // Checked once a read (each check takes the token's lock), not once a message.
                if reads == READ_AHEAD || cancel.is_cancelled() || drain.is_cancelled() {
                    break;
                }
                reads += 1;
                match self.read_ready() {
                    Ok(true) => self.read_at = Instant::now(),
                    Ok(false) => break,
                    Err(e) => return Taken::Lost(ConnectionError::MqttState(e)),
                }
            }
            let events = &mut self.eventloop.state.events;
            if !matches!(events.front(), Some(Event::Incoming(Packet::Publish(_)))) {
                break;
            }
            let Some(Event::Incoming(Packet::Publish(p))) = events.pop_front() else {
                break;
            };
            match self.take(p, conn, cancel, drain).await {
                Taken::Done => {}
                other => return other,
            }
        }
        Taken::Done
    }

    /// Reads the packets the socket holds now into rumqttc's events, and writes its replies
    /// to them, as its event loop does; `false` when nothing could be read without waiting.
    /// Only with nothing left to write: a reply rumqttc cannot buffer makes its read wait,
    /// and a read given up then would lose that reply (a PUBCOMP, an observer's PUBACK).
    fn read_ready(&mut self) -> Result<bool, rumqttc::StateError> {
        use futures_util::FutureExt;
        let Some(network) = self.eventloop.network.as_mut() else {
            return Ok(false);
        };
        match network.flush().now_or_never() {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(e),
            None => return Ok(false),
        }
        match network.readb(&mut self.eventloop.state).now_or_never() {
            None => Ok(false),
            Some(Err(e)) => Err(e),
            // A flush that would wait stays buffered: the next read, poll or ack flushes it.
            Some(Ok(())) => match network.flush().now_or_never() {
                Some(Err(e)) => Err(e),
                _ => Ok(true),
            },
        }
    }

    fn try_reserve(&self, cost: u32) -> Option<Reservation> {
        let count = self.pending.clone().try_acquire_owned().ok()?;
        let bytes = self
            .pending_bytes
            .clone()
            .try_acquire_many_owned(cost)
            .ok()?;
        Some(Reservation {
            _count: count,
            _bytes: bytes,
        })
    }

    /// Keeps the connection alive while intake is paused (the event loop, which would send its
    /// own pings, is not polled then: it would read more messages).
    async fn ping(&mut self) -> Result<(), ConnectionError> {
        let Some(network) = self.eventloop.network.as_mut() else {
            return Err(ConnectionError::Io(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "no connection to ping",
            )));
        };
        let sent = tokio::time::timeout(ACK_WRITE_TIMEOUT, async {
            network.write(Packet::PingReq).await?;
            network.flush().await
        })
        .await;
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ConnectionError::MqttState(e)),
            Err(_) => Err(ConnectionError::FlushTimeout),
        }
    }

    /// Writes the PUBACKs of `batch` on the current connection with one flush; acks of an
    /// earlier connection are dropped (their packet ids may now name other messages). The
    /// messages' permits return when `batch` is dropped, after their acks were handed over.
    async fn write_acks(&mut self, batch: Vec<Inbound>) {
        if !self.cfg.manual_acks {
            // The client acknowledged them on receipt (observer sessions).
            return;
        }
        let session = &self.session;
        let current = |m: &&Inbound| session.may_ack(m.conn);
        let stale = batch.iter().filter(|m| !current(m)).count() as u64;
        if stale > 0 {
            events::AcksDroppedStale { count: stale }.emit();
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
        release_together(batch);
        for pkid in exactly_once {
            let mut p = Publish::new("", QoS::ExactlyOnce, Vec::<u8>::new());
            p.pkid = pkid;
            if let Err(e) = self.client.try_ack(&p) {
                tracing::warn!(error = %e, pkid, "could not queue a PUBREC; the broker will redeliver the message");
            }
        }
    }

    /// The connection is gone (the session already knows, so no ack of it is written any more):
    /// drop the socket with whatever was buffered on it and the publishes buffered from the dead
    /// connection (the broker redelivers both). Queued subscription packets are dropped too: the
    /// next connection reconciles from the ledger.
    fn on_disconnect(&mut self) {
        self.eventloop.clean();
        self.eventloop.state.events.clear();
        self.eventloop.pending.retain(|r| {
            !matches!(
                r,
                Request::PubAck(_)
                    | Request::PubRec(_)
                    | Request::Subscribe(_)
                    | Request::Unsubscribe(_)
            )
        });
        // The subscriptions shown stay as the connection left them until the next one
        // reconciles them (/health reports the connection itself as down).
        self.subs.disconnected();
        self.connected.send_replace(false);
        self.status.update_mqtt(|m| m.connected = false);
        events::MqttClosed.emit();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_says_offline_however_it_is_spaced() {
        assert!(says_offline(br#"{"online":false,"timestamp":1}"#));
        assert!(says_offline(b"{ \"online\" : false,\n \"timestamp\" : 2 }"));
        assert!(says_offline(&state_payload(false, 3)));
        assert!(!says_offline(&state_payload(true, 3)));
        assert!(!says_offline(br#"{"online":"false"}"#));
        assert!(!says_offline(b"offline"));
        assert!(!says_offline(br#"{"timestamp":1}"#));
        let padded = format!(r#"{{"online":false,"pad":"{}"}}"#, " ".repeat(5000));
        assert!(!says_offline(padded.as_bytes()));
    }
}
