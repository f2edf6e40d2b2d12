//! The broker's side of "nothing lost": it keeps what it queues for an offline persistent
//! session (QoS 0 messages too), accepts messages of `MAX_PAYLOAD_BYTES`, and grants QoS 1 on the
//! configured filters; and whether it lets anonymous clients in where strangers can reach it.
//! Every probe uses temporary client ids and a private topic of its own, and removes its
//! session afterwards.

use std::time::Duration;

use leasehold_config::{Config, PROBE_TOPIC_PREFIX};
use leasehold_telemetry::Check;
use rumqttc::{QoS, SubscribeReasonCode};
use tokio_util::sync::CancellationToken;

use crate::mqtt::{options, random_suffix, Conn, ProbeError};

/// Messages queued for the offline probe session: well past Mosquitto's default
/// `max_queued_messages` (1,000) and what it may hold in flight on top of it.
pub const QUEUE_PROBE: usize = 2_000;

/// Bytes of each queued probe message (at most `MAX_PAYLOAD_BYTES`): 2 MiB in all, so that a
/// `max_queued_bytes` limit that holds only a few hundred real messages is found too, where
/// messages of a few bytes each would fit under it.
pub const QUEUE_PROBE_BYTES: usize = 1_024;

/// The `i`-th queued probe message, `size` bytes long.
fn queue_message(i: usize, size: usize) -> Vec<u8> {
    let mut m = format!("probe {i} ").into_bytes();
    m.resize(size.max(m.len()), b'.');
    m
}

/// The three broker checks; `None` when `cancel` ended them (the queue probe's session removed
/// all the same).
pub async fn checks(cfg: &Config, cancel: &CancellationToken) -> Option<Vec<Check>> {
    let queue = queue(cfg, cancel).await?;
    tokio::select! {
        r = async {
            vec![queue, queue_qos0(cfg).await, payload(cfg).await, qos(cfg).await, anonymous(cfg).await]
        } => Some(r),
        _ = cancel.cancelled() => None,
    }
}

/// What a queue probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueProbe {
    pub published: usize,
    /// The broker still had the session when the probe came back.
    pub session_present: bool,
    pub received: usize,
}

/// Judges a queue probe.
pub fn judge_queue(p: QueueProbe) -> Check {
    const ID: &str = "broker.queue";
    const FIX: &str = "set max_queued_messages 0 and max_queued_bytes 0 (or limits above message rate x the longest outage) in mosquitto.conf, as deploy/mosquitto/mosquitto.conf does (docs/deployment.md, \"Broker\")";
    if !p.session_present {
        return Check::problem(
            ID,
            "the broker did not keep an offline persistent session (CONNACK without a session): everything queued while no leader is connected is lost",
            "keep persistent sessions (clean_session=false): persistence true, no persistent_client_expiration shorter than the longest outage (docs/deployment.md, \"Broker\")",
        );
    }
    // None at all is no queue limit worth the name: the broker refuses the probe's messages
    // (an ACL, or a message size limit below the probe's 1 KiB).
    if p.received == 0 && p.published > 0 {
        return Check::problem(
            ID,
            format!(
                "none of the {} messages queued for the offline probe session came back: the broker refuses the probe's messages under {PROBE_TOPIC_PREFIX} (an ACL, or a message size limit below {QUEUE_PROBE_BYTES} bytes: see broker.payload), or keeps no queue at all",
                p.published
            ),
            FIX,
        );
    }
    if p.received < p.published {
        return Check::problem(
            ID,
            format!(
                "the broker kept only {} of {} messages queued for an offline persistent session: past its queue limit it drops messages silently, so a failover or an outage longer than that loses data",
                p.received, p.published
            ),
            FIX,
        );
    }
    Check::ok(
        ID,
        format!(
            "the broker kept all {} messages queued for an offline persistent session",
            p.published
        ),
    )
}

/// Subscribes a persistent probe session, leaves, has [`QUEUE_PROBE`] messages published to it,
/// comes back and counts them; then removes the session.
/// `None` when cancelled, after removing the session all the same.
async fn queue(cfg: &Config, cancel: &CancellationToken) -> Option<Check> {
    let (id, topic) = probe_session();
    let res = tokio::select! {
        r = queue_probe(cfg, &id, &topic) => Some(r),
        _ = cancel.cancelled() => None,
    };
    let reachable = remove_session(cfg, &id).await;
    Some(match res? {
        Ok(p) => judge_queue(p),
        Err(e @ ProbeError::Connection(_)) if reachable => refused_check("broker.queue", &e),
        Err(e) => unreachable_check("broker.queue", cfg, &e),
    })
}

/// A persistent probe session's client id and private topic.
fn probe_session() -> (String, String) {
    let suffix = random_suffix();
    let topic = format!("{PROBE_TOPIC_PREFIX}{suffix}");
    (format!("leasehold-doctor-{suffix}"), topic)
}

/// Subscribes the persistent session `id` to `topic` with QoS 1, then leaves it offline.
async fn subscribe_offline(cfg: &Config, id: &str, topic: &str) -> Result<(), ProbeError> {
    let (mut sub, _) = Conn::open(options(cfg, id, false)).await?;
    check_granted(&sub.subscribe(&[topic.to_string()]).await?)
        .map_err(|_| ProbeError::Refused("a QoS 1 subscription to the probe topic"))?;
    sub.close().await;
    Ok(())
}

/// Removes the session `id` whatever happened to it (a clean-session connect with the same id
/// removes the session and its queue): whether the broker answered.
async fn remove_session(cfg: &Config, id: &str) -> bool {
    match Conn::open(options(cfg, id, true)).await {
        Ok((c, _)) => {
            c.close().await;
            true
        }
        Err(_) => false,
    }
}

async fn queue_probe(cfg: &Config, id: &str, topic: &str) -> Result<QueueProbe, ProbeError> {
    subscribe_offline(cfg, id, topic).await?;
    let mut publisher = Conn::temporary(cfg).await?;
    let published = publisher
        .publish_all(
            topic,
            false,
            (0..QUEUE_PROBE)
                .map(|i| queue_message(i, QUEUE_PROBE_BYTES.min(cfg.cluster.max_payload_bytes))),
            Duration::from_secs(30),
        )
        .await?;
    publisher.close().await;
    let (mut sub, session_present) = Conn::open(options(cfg, id, false)).await?;
    let received = sub
        .collect(
            topic,
            published,
            Duration::from_secs(2),
            Duration::from_secs(30),
        )
        .await?
        .len();
    sub.close().await;
    Ok(QueueProbe {
        published,
        session_present,
        received,
    })
}

/// Subscribes a persistent probe session, leaves, has one QoS 0 message published to it, comes
/// back and waits for it; then removes the session. Many devices publish at QoS 0 (Tasmota's and
/// Sparkplug's defaults): a broker that does not queue them for an offline session drops every
/// one published during a failover's gap.
async fn queue_qos0(cfg: &Config) -> Check {
    const ID: &str = "broker.queue_qos0";
    let (id, topic) = probe_session();
    let probe = async {
        subscribe_offline(cfg, &id, &topic).await?;
        let mut publisher = Conn::temporary(cfg).await?;
        publisher
            .publish_qos0(&topic, b"qos0 probe".to_vec())
            .await?;
        publisher.close().await;
        let (mut sub, _) = Conn::open(options(cfg, &id, false)).await?;
        let got = sub
            .collect(&topic, 1, Duration::from_secs(2), Duration::from_secs(5))
            .await?;
        sub.close().await;
        Ok::<_, ProbeError>(!got.is_empty())
    }
    .await;
    remove_session(cfg, &id).await;
    match probe {
        Ok(true) => Check::ok(ID, "the broker queues QoS 0 messages for an offline persistent session"),
        Ok(false) => Check::warning(
            ID,
            "the broker dropped a QoS 0 message published while the probe's persistent session was offline: every QoS 0 reading published during a failover's gap (no leader connected) is lost",
            "set queue_qos0_messages true in mosquitto.conf, as deploy/mosquitto/mosquitto.conf does (docs/guarantees.md, \"QoS 0\")",
        ),
        Err(e) => unreachable_check(ID, cfg, &e),
    }
}

/// Whether `host` is a loopback address or name (where only this host's own clients reach).
pub fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// On a broker reached at a non-loopback address, tries to connect without credentials: one
/// that lets anonymous clients in there lets anyone who reaches it read and write the fleet's
/// topics (and take the cluster's session by its client id).
async fn anonymous(cfg: &Config) -> Check {
    const ID: &str = "broker.anonymous";
    let host = &cfg.mqtt.host;
    if is_loopback(host) {
        return Check::ok(
            ID,
            format!("the broker is reached on loopback ({host}): anonymous access there is this host's only"),
        );
    }
    let mut anon = cfg.clone();
    anon.mqtt.username = None;
    anon.mqtt.password = None;
    match Conn::temporary(&anon).await {
        Ok(c) => {
            c.close().await;
            Check::warning(
                ID,
                format!("the broker at {host}:{} accepts clients without credentials on a non-loopback address: anyone who reaches it can read and write every topic, and take the cluster's session by its client id", cfg.mqtt.port),
                "set allow_anonymous false with a password_file and an acl_file on every listener not bound to loopback, as deploy/mosquitto/mosquitto.conf does (docs/deployment.md, \"2. Mosquitto\")",
            )
        }
        Err(_) => Check::ok(
            ID,
            format!(
                "the broker at {host}:{} refuses clients without credentials",
                cfg.mqtt.port
            ),
        ),
    }
}

/// What one message sent through the broker came to: how publishing it went, and the size
/// received (`None`: nothing arrived).
type Passed = (Result<(), ProbeError>, Option<usize>);

/// Publishes one message of `size` bytes to a private topic and waits to receive it.
async fn pass_one(cfg: &Config, size: usize) -> Result<Passed, ProbeError> {
    let suffix = random_suffix();
    let topic = format!("{PROBE_TOPIC_PREFIX}{suffix}");
    let (mut sub, _) =
        Conn::open(options(cfg, &format!("leasehold-doctor-{suffix}"), true)).await?;
    sub.subscribe(std::slice::from_ref(&topic)).await?;
    let sent = async {
        let mut p = Conn::temporary(cfg).await?;
        p.publish_all(&topic, false, [vec![b'x'; size]], Duration::from_secs(10))
            .await?;
        p.close().await;
        Ok::<_, ProbeError>(())
    }
    .await;
    let got = sub
        .collect(&topic, 1, Duration::from_secs(5), Duration::from_secs(5))
        .await?;
    sub.close().await;
    Ok((sent, got.first().map(|p| p.payload.len())))
}

/// A small message, to tell a size limit from a broker that passes no probe message at all.
const SMALL_PROBE_BYTES: usize = 16;

/// Publishes one message of `MAX_PAYLOAD_BYTES` to a private topic and waits to receive it; when
/// it does not arrive, a small one, so that a refused probe topic is not taken for a size limit.
async fn payload(cfg: &Config) -> Check {
    const ID: &str = "broker.payload";
    let size = cfg.cluster.max_payload_bytes;
    match pass_one(cfg, size).await {
        Ok((_, Some(n))) if n == size => Check::ok(
            ID,
            format!("the broker passed a message of MAX_PAYLOAD_BYTES ({size} bytes)"),
        ),
        Ok((sent, got)) => {
            let small = SMALL_PROBE_BYTES.min(size);
            if !matches!(pass_one(cfg, small).await, Ok((_, Some(n))) if n == small) {
                return Check::problem(
                    ID,
                    format!(
                        "the broker passed neither a message of MAX_PAYLOAD_BYTES ({size} bytes) nor one of {small} bytes on the probe's topic under {PROBE_TOPIC_PREFIX}: it refuses the probe (an ACL?), so the size limit could not be checked"
                    ),
                    format!("let Leasehold's broker user publish and subscribe under {PROBE_TOPIC_PREFIX} (doctor's probe topics), then run doctor again"),
                );
            }
            Check::problem(
                ID,
                format!(
                    "the broker did not pass a message of MAX_PAYLOAD_BYTES ({size} bytes){}: devices' messages that large are lost at the broker",
                    match (sent, got) {
                        (Err(e), _) => format!(" (publishing it: {e})"),
                        (_, Some(n)) => format!(" (received {n} bytes)"),
                        _ => String::new(),
                    }
                ),
                "raise the broker's max_packet_size / message_size_limit above MAX_PAYLOAD_BYTES plus the topic and headers, or lower MAX_PAYLOAD_BYTES",
            )
        }
        Err(e) => unreachable_check(ID, cfg, &e),
    }
}

/// The failed filters of a SUBACK: refused (0x80) or granted below QoS 1.
fn check_granted(codes: &[SubscribeReasonCode]) -> Result<(), Vec<usize>> {
    let bad: Vec<usize> = codes
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            !matches!(
                c,
                SubscribeReasonCode::Success(QoS::AtLeastOnce | QoS::ExactlyOnce)
            )
        })
        .map(|(i, _)| i)
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad)
    }
}

/// Judges the SUBACK codes of the configured filters.
pub fn judge_qos(filters: &[String], codes: &[SubscribeReasonCode]) -> Check {
    const ID: &str = "broker.qos";
    if filters.is_empty() {
        return Check::ok(ID, "no MQTT_TOPICS configured (device topics only)");
    }
    if codes.len() != filters.len() {
        return Check::problem(
            ID,
            format!(
                "the broker answered {} codes for {} topic filters",
                codes.len(),
                filters.len()
            ),
            "check the broker's logs",
        );
    }
    match check_granted(codes) {
        Ok(()) => Check::ok(
            ID,
            format!(
                "the broker grants QoS 1 on all {} configured topic filters",
                filters.len()
            ),
        ),
        Err(bad) => Check::problem(
            ID,
            format!(
                "the broker refused or granted below QoS 1: {}; messages on them are not kept for the session",
                bad.iter()
                    .map(|&i| format!("{:?} ({:?})", filters[i], codes[i]))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "allow this user to subscribe to these filters with QoS 1 (the broker's ACL), or correct MQTT_TOPICS",
        ),
    }
}

/// Subscribes the configured filters with a clean temporary client, reads the SUBACK,
/// unsubscribes.
async fn qos(cfg: &Config) -> Check {
    // Every filter the leader subscribes: MQTT_TOPICS and the routes'.
    let filters = leasehold_ingest::wanted_topics(cfg);
    if filters.is_empty() {
        return judge_qos(&filters, &[]);
    }
    let res = async {
        let mut c = Conn::temporary(cfg).await?;
        let mut codes = Vec::with_capacity(filters.len());
        for chunk in filters.chunks(50) {
            codes.extend(c.subscribe(chunk).await?);
        }
        for f in &filters {
            c.unsubscribe(f).await?;
        }
        c.close().await;
        Ok::<_, ProbeError>(codes)
    }
    .await;
    match res {
        Ok(codes) => judge_qos(&filters, &codes),
        Err(e) => unreachable_check("broker.qos", cfg, &e),
    }
}

/// The broker answers a new connection but closed the probe's mid-probe: what it does to a
/// client it refuses something (Mosquitto's dynamic security on a denied publish).
fn refused_check(id: &str, e: &ProbeError) -> Check {
    Check::problem(
        id,
        format!("the broker closed the probe's connection while it used a topic under {PROBE_TOPIC_PREFIX} ({e}): it refuses the probe (an ACL?), so this could not be checked"),
        format!("let Leasehold's broker user publish and subscribe under {PROBE_TOPIC_PREFIX} (doctor's probe topics), then run doctor again"),
    )
}

/// A probe that could not talk to the broker.
fn unreachable_check(id: &str, cfg: &Config, e: &ProbeError) -> Check {
    Check::problem(
        id,
        format!("could not probe the broker at {}: {e}", cfg.mqtt),
        "check MQTT_URL, the credentials and TLS settings, and that the broker is running",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_telemetry::CheckLevel;

    #[test]
    fn loopback_is_told_from_other_addresses() {
        for h in [
            "127.0.0.1",
            "127.0.0.2",
            "::1",
            "[::1]",
            "localhost",
            "LOCALHOST",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in [
            "10.0.0.5",
            "broker.example.com",
            "0.0.0.0",
            "::",
            "192.168.1.1",
        ] {
            assert!(!is_loopback(h), "{h}");
        }
    }

    #[test]
    fn a_broker_that_returns_nothing_is_not_said_to_have_a_queue_limit() {
        let c = judge_queue(QueueProbe {
            published: QUEUE_PROBE,
            session_present: true,
            received: 0,
        });
        assert_eq!(c.level, CheckLevel::Problem);
        assert!(
            c.summary.contains("refuses") && !c.summary.contains("past its queue limit"),
            "{}",
            c.summary
        );
    }

    #[test]
    fn a_broker_that_drops_past_its_queue_limit_is_a_problem() {
        let p = QueueProbe {
            published: 2000,
            session_present: true,
            received: 1000,
        };
        let c = judge_queue(p);
        assert_eq!(c.level, CheckLevel::Problem);
        assert!(c.summary.contains("1000 of 2000"), "{}", c.summary);
        assert!(c
            .fix
            .as_deref()
            .unwrap_or("")
            .contains("max_queued_messages"));
        let all = judge_queue(QueueProbe {
            received: 2000,
            ..p
        });
        assert_eq!(all.level, CheckLevel::Ok);
        let lost = judge_queue(QueueProbe {
            session_present: false,
            received: 0,
            ..p
        });
        assert_eq!(lost.level, CheckLevel::Problem);
    }

    #[test]
    fn a_filter_granted_below_qos_1_is_a_problem() {
        let f = vec!["a/#".to_string(), "b/#".to_string()];
        let ok = [SubscribeReasonCode::Success(QoS::AtLeastOnce); 2];
        assert_eq!(judge_qos(&f, &ok).level, CheckLevel::Ok);
        let bad = [
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Success(QoS::AtMostOnce),
        ];
        let c = judge_qos(&f, &bad);
        assert_eq!(c.level, CheckLevel::Problem);
        assert!(c.summary.contains("b/#") && !c.summary.contains("a/#"));
        let refused = [
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
        ];
        assert!(judge_qos(&f, &refused).summary.contains("a/#"));
    }
}
