//! The broker as shipped (`deploy/mosquitto/`): QoS 0 readings published during a failover's gap
//! are queued for the cluster's session and stored (and lost without `queue_qos0_messages`, which
//! `leasehold doctor` then warns about); anonymous clients only on loopback, a user and the ACL on
//! every other listener.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use leasehold_testkit::publish::{numbered, publish_all, publish_qos0};
use leasehold_testkit::{eventually, free_port, http, Dir, Mosquitto, Postgres};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::helpers::{check, msg, Cluster};

/// Kills the leader, publishes `n` QoS 0 readings once the broker has seen its connection go,
/// then a QoS 1 marker; returns how many of the QoS 0 readings were stored once the marker was
/// (the session's queue is delivered in order).
async fn qos0_in_a_failover_gap(c: &mut Cluster, n: u64) -> Result<i64> {
    c.spawn("a")?;
    c.spawn("b")?;
    let (leader, _) = c.wait_leader().await?;
    let (_, body) = http(c.node(&leader).http_port(), "GET", "/health/mqtt").await?;
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let client_id = v["client_id"].as_str().context("client id")?.to_string();
    publish_all(
        c.mq.port,
        vec![msg("devices/w/telemetry", numbered("qos0-warm", "w", 0))],
    )
    .await?;
    c.assert_exactly_once("qos0-warm", 1).await?;
    let gone = |log: &str| {
        log.lines()
            .filter(|l| {
                l.contains(&client_id)
                    && (l.contains("closed its connection") || l.contains("disconnect"))
            })
            .count()
    };
    let before = gone(&c.mq.log());
    c.node_mut(&leader).kill9();
    eventually(
        Duration::from_secs(15),
        "the broker sees the leader's connection go",
        || async { Ok(gone(&c.mq.log()) > before) },
    )
    .await?;
    let readings = (0..n)
        .map(|i| {
            msg(
                &format!("devices/q{}/telemetry", i % 7),
                numbered("qos0-gap", "q", i),
            )
        })
        .collect();
    publish_qos0(c.mq.port, readings).await?;
    publish_all(
        c.mq.port,
        vec![msg("devices/m/telemetry", numbered("qos0-marker", "m", 0))],
    )
    .await?;
    eventually(
        Duration::from_secs(30),
        "the standby stores the marker",
        || async {
            Ok(
                c.count("SELECT count(*) FROM telemetry WHERE payload->>'run' = 'qos0-marker'")
                    .await?
                    == 1,
            )
        },
    )
    .await?;
    c.count("SELECT count(*) FROM telemetry WHERE payload->>'run' = 'qos0-gap'")
        .await
}

#[tokio::test]
async fn qos0_readings_published_while_no_leader_is_connected_are_stored_with_the_shipped_broker() {
    let mut c = Cluster::start().await.expect("cluster");
    let res = async {
        let stored = qos0_in_a_failover_gap(&mut c, 200).await?;
        ensure!(stored == 200, "{stored} of 200 QoS 0 readings stored");
        c.assert_exactly_once("qos0-gap", 200).await?;
        Ok(())
    }
    .await;
    check(&c, res);
}

/// The same gap on a broker that does not queue QoS 0 (Mosquitto's default) loses them all, and
/// `leasehold doctor` says so.
#[tokio::test]
async fn without_queue_qos0_messages_the_gap_loses_them_and_doctor_warns() {
    let pg = Postgres::start().await.expect("postgres");
    let mq = Mosquitto::start_with(
        Dir::temp("leasehold-mqtt-").expect("dir"),
        "queue_qos0_messages false",
    )
    .await
    .expect("mosquitto");
    let mut c = Cluster::with_servers(pg, mq).expect("cluster");
    let res = async {
        let stored = qos0_in_a_failover_gap(&mut c, 50).await?;
        ensure!(
            stored == 0,
            "{stored} stored: the control broker should drop them"
        );
        let out = c.cli_env(&["doctor", "--json"], &[])?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let qos0 = v["checks"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["id"] == "broker.queue_qos0"))
            .context("broker.queue_qos0 check")?;
        ensure!(qos0["level"] == "warning", "{qos0}");
        ensure!(
            qos0["fix"].to_string().contains("queue_qos0_messages true"),
            "{qos0}"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}

/// A connection with `user`/`password` (none: anonymous); `Err` when the broker refuses it.
async fn connect(
    port: u16,
    user: Option<(&str, &str)>,
) -> Result<(AsyncClient, rumqttc::EventLoop)> {
    let mut opts = MqttOptions::new(format!("acl-test-{}", free_port()?), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    if let Some((u, p)) = user {
        opts.set_credentials(u, p);
    }
    let (c, mut el) = AsyncClient::new(opts, 10);
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(anyhow::anyhow!("{e}")),
            }
        }
    })
    .await
    .context("CONNACK")??;
    Ok((c, el))
}

/// `filter` subscribed, once the broker said so.
async fn subscribe(c: &AsyncClient, el: &mut rumqttc::EventLoop, filter: &str) -> Result<()> {
    c.subscribe(filter, QoS::AtLeastOnce).await?;
    tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(ev) = el.poll().await {
            if let Event::Incoming(Packet::SubAck(_)) = ev {
                return;
            }
        }
    })
    .await
    .context("SUBACK")
}

/// What a subscriber receives within a second.
async fn received(el: &mut rumqttc::EventLoop) -> Vec<String> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Ok(ev) = el.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = ev {
                got.push(p.topic.clone());
            }
        }
    })
    .await;
    got
}

async fn publish(port: u16, user: (&str, &str), topic: &str) -> Result<()> {
    let (c, mut el) = connect(port, Some(user)).await?;
    c.publish(topic, QoS::AtLeastOnce, false, "x").await?;
    // PUBACK (Mosquitto acknowledges a publish its ACL drops, without delivering it).
    tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(ev) = el.poll().await {
            if let Event::Incoming(Packet::PubAck(_)) = ev {
                return;
            }
        }
    })
    .await
    .context("PUBACK")?;
    c.disconnect().await?;
    Ok(())
}

/// The shipped listeners, ports moved to free ones on loopback: anonymous on the loopback
/// listener, refused on the other; the cluster's user reads the fleet and cannot write it; a
/// device writes only its own topics.
#[tokio::test]
async fn the_shipped_broker_lets_strangers_in_on_loopback_only_and_applies_the_acl() {
    let res = async {
        let dir = Dir::temp("leasehold-mqtt-shipped-")?;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/mosquitto");
        let conf = std::fs::read_to_string(root.join("mosquitto.conf"))?;
        let acl = dir.path().join("acl");
        std::fs::copy(root.join("acl"), &acl)?;
        let passwd = dir.path().join("passwd");
        let users = [
            ("leasehold", "cluster-pw"),
            ("meter-0001", "meter-pw"),
            ("edge-7", "edge-pw"),
        ];
        for (i, (u, p)) in users.iter().enumerate() {
            let mut cmd = std::process::Command::new("mosquitto_passwd");
            if i == 0 {
                cmd.arg("-c");
            }
            ensure!(
                cmd.arg("-b").arg(&passwd).args([u, p]).status()?.success(),
                "mosquitto_passwd"
            );
        }
        for f in [&acl, &passwd] {
            std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        }
        let (local, remote) = (free_port()?, free_port()?);
        let listeners = conf
            .split_once("\nlistener ")
            .map(|(_, l)| format!("listener {l}"))
            .context("the shipped file has listeners")?
            .replace(
                "listener 1883 127.0.0.1",
                &format!("listener {local} 127.0.0.1"),
            )
            .replace("listener 1884\n", &format!("listener {remote} 127.0.0.1\n"))
            .replace("/etc/mosquitto/passwd", &passwd.display().to_string())
            .replace("/etc/mosquitto/acl", &acl.display().to_string());
        ensure!(
            listeners.contains(&format!("listener {remote} ")),
            "the credentials listener moved"
        );
        // Mosquitto::start_with adds its own anonymous loopback listener first: these follow it.
        let mq = Mosquitto::start_with(dir, &listeners).await?;
        let _ = mq.port;

        connect(local, None)
            .await
            .context("anonymous on the loopback listener")?;
        ensure!(
            connect(remote, None).await.is_err(),
            "an anonymous client got in on the credentials listener"
        );
        ensure!(
            connect(remote, Some(("leasehold", "wrong"))).await.is_err(),
            "a wrong password got in"
        );

        let (sub, mut el) = connect(remote, Some(("leasehold", "cluster-pw"))).await?;
        subscribe(&sub, &mut el, "devices/#").await?;
        publish(
            remote,
            ("meter-0001", "meter-pw"),
            "devices/meter-0001/telemetry",
        )
        .await?;
        publish(
            remote,
            ("meter-0001", "meter-pw"),
            "devices/meter-0002/telemetry",
        )
        .await?;
        publish(
            remote,
            ("leasehold", "cluster-pw"),
            "devices/meter-0003/telemetry",
        )
        .await?;
        let got = received(&mut el).await;
        ensure!(
            got == ["devices/meter-0001/telemetry"],
            "delivered: {got:?}"
        );

        // Sparkplug B: the cluster reads the edge nodes and writes its STATE and its rebirth
        // requests; an edge node writes only its own messages and reads the host's STATE and
        // its own commands.
        subscribe(&sub, &mut el, "spBv1.0/#").await?;
        let (edge, mut edge_el) = connect(remote, Some(("edge-7", "edge-pw"))).await?;
        for f in ["spBv1.0/STATE/+", "spBv1.0/plant/NCMD/+"] {
            subscribe(&edge, &mut edge_el, f).await?;
        }
        let (cluster, edge7) = (("leasehold", "cluster-pw"), ("edge-7", "edge-pw"));
        for (user, topic) in [
            (edge7, "spBv1.0/plant/NBIRTH/edge-7"),
            (edge7, "spBv1.0/plant/DDATA/edge-7/pump"),
            (edge7, "spBv1.0/plant/NBIRTH/edge-8"),
            (edge7, "spBv1.0/STATE/leasehold"),
            (cluster, "spBv1.0/STATE/leasehold"),
            (cluster, "spBv1.0/plant/NCMD/edge-7"),
            (cluster, "spBv1.0/plant/NCMD/edge-8"),
            (cluster, "spBv1.0/plant/NDATA/edge-7"),
        ] {
            publish(remote, user, topic).await?;
        }
        let got = received(&mut el).await;
        ensure!(
            got == [
                "spBv1.0/plant/NBIRTH/edge-7",
                "spBv1.0/plant/DDATA/edge-7/pump",
                "spBv1.0/STATE/leasehold",
                "spBv1.0/plant/NCMD/edge-7",
                "spBv1.0/plant/NCMD/edge-8",
            ],
            "the cluster got: {got:?}"
        );
        let got = received(&mut edge_el).await;
        ensure!(
            got == ["spBv1.0/STATE/leasehold", "spBv1.0/plant/NCMD/edge-7"],
            "the edge node got: {got:?}"
        );
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if let Err(e) = res {
        panic!("{e:#}");
    }
}

/// A broker that requires the user `ingest` with password `right-pw`.
async fn broker_with_password() -> Result<Mosquitto> {
    let dir = Dir::temp("leasehold-mqtt-pw-")?;
    let pw = dir.path().join("passwd");
    let ok = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&pw)
        .args(["ingest", "right-pw"])
        .status()?;
    ensure!(ok.success(), "mosquitto_passwd");
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    let extra = format!("allow_anonymous false\npassword_file {}\n", pw.display());
    Mosquitto::start_with(dir, &extra).await
}

fn with_password(pw: &str) -> Vec<(&'static str, String)> {
    vec![
        ("MQTT_USERNAME", "ingest".into()),
        ("MQTT_PASSWORD", pw.into()),
        ("MQTT_STEP_DOWN_AFTER", "1s".into()),
        ("ALERT_GRACE", "1s".into()),
        ("ALERT_CHECK_INTERVAL", "1s".into()),
    ]
}

async fn leader_changes(c: &Cluster) -> Result<i64> {
    c.count("SELECT count(*) FROM lease_history").await
}

/// A wrong password on every node: no node can reach the broker, so the leader keeps the lease
/// (no ping-pong), says why on /health, and the alert names the broker.
#[tokio::test]
async fn when_no_node_reaches_the_broker_the_leader_keeps_the_lease_and_the_alert_names_the_broker()
{
    let pg = Postgres::start().await.expect("postgres");
    let mq = broker_with_password().await.expect("mosquitto");
    let mut c = Cluster::with_servers(pg, mq).expect("cluster");
    let res = async {
        c.spawn_with("a", &with_password("wrong"))?;
        c.spawn_with("b", &with_password("wrong"))?;
        eventually(Duration::from_secs(20), "a leader", || async {
            Ok(c.leader().await?.is_some())
        })
        .await?;
        let open = "SELECT count(*) FROM alerts WHERE kind = 'leader_mqtt_disconnected' AND resolved_at IS NULL AND message LIKE 'the broker: no node has reached it%'";
        eventually(Duration::from_secs(40), "the alert names the broker", || async {
            Ok(c.count(open).await? == 1)
        })
        .await?;
        let (holder, epoch) = c.leader().await?.context("still a leader")?;
        ensure!(epoch == 1, "the lease moved: epoch {epoch}");
        ensure!(leader_changes(&c).await? == 1, "lease history: {}", leader_changes(&c).await?);
        let (_, body) = http(c.node(&holder).http_port(), "GET", "/health").await?;
        let h: serde_json::Value = serde_json::from_str(&body)?;
        ensure!(h["keeps_lease"].to_string().contains("no standby reached it"), "{h}");
        Ok(())
    }
    .await;
    check(&c, res);
}

/// Only the standby has the right password: the leader hands over to it, once, and it stays.
#[tokio::test]
async fn a_leader_cut_off_from_the_broker_hands_over_to_a_standby_that_reaches_it_once() {
    let pg = Postgres::start().await.expect("postgres");
    let mq = broker_with_password().await.expect("mosquitto");
    let mut c = Cluster::with_servers(pg, mq).expect("cluster");
    let res = async {
        c.spawn_with("a", &with_password("wrong"))?;
        eventually(Duration::from_secs(20), "a leads", || async {
            Ok(c.leader().await?.is_some_and(|(l, _)| l == "a"))
        })
        .await?;
        c.spawn_with("b", &with_password("right-pw"))?;
        eventually(Duration::from_secs(40), "b leads", || async {
            Ok(c.leader().await?.is_some_and(|(l, _)| l == "b"))
        })
        .await?;
        // The session never existed (a never reached the broker): what is published before
        // b's SUBACK is not queued for it.
        let port = c.node("b").http_port();
        eventually(Duration::from_secs(20), "b subscribed", || async {
            Ok(leasehold_testkit::leading_and_subscribed(port)
                .await
                .unwrap_or(false))
        })
        .await?;
        let readings: Vec<(String, Vec<u8>)> = (0..20)
            .map(|i| {
                msg(
                    &format!("devices/p{}/telemetry", i % 3),
                    numbered("reach", "p", i),
                )
            })
            .collect();
        let mut opts = MqttOptions::new("reach-pub", "127.0.0.1", c.mq.port);
        opts.set_credentials("ingest", "right-pw");
        let (p, mut el) = AsyncClient::new(opts, 100);
        for (t, body) in readings {
            p.publish(t, QoS::AtLeastOnce, false, body).await?;
        }
        let mut acked = 0;
        tokio::time::timeout(Duration::from_secs(10), async {
            while acked < 20 {
                if let Ok(Event::Incoming(Packet::PubAck(_))) = el.poll().await {
                    acked += 1;
                }
            }
        })
        .await
        .context("PUBACKs")?;
        c.assert_exactly_once("reach", 20).await?;
        let (holder, epoch) = c.leader().await?.context("a leader")?;
        ensure!(
            holder == "b" && epoch == 2,
            "{holder}@{epoch}: one hand-over, no way back"
        );
        Ok(())
    }
    .await;
    check(&c, res);
}
