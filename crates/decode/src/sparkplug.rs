//! Sparkplug B (`format = "sparkplug_b"`, docs/sparkplug.md): protobuf payloads (the Eclipse Tahu
//! schema, through `srad-types`) whose metrics are named once in a birth certificate and sent
//! afterwards by alias. Unlike the other formats, reading one depends on what came before: the
//! births and the sequence numbers of its edge node, kept in a [`Host`] that the leader loads
//! from PostgreSQL at the start of its term and records there, under the fence, after each batch.
//!
//! A data message (NBIRTH, NDATA, DBIRTH, DDATA) is one reading of device `group/edge_node` or
//! `group/edge_node/device`, timed by the payload's timestamp: `{metric name: value, ...}`, and
//! `"$timestamps": {name: time}` for the metrics whose own timestamp differs. What cannot be
//! resolved without guessing — an alias no birth defined, data of an edge node or device whose
//! birth is not held, a message after a sequence gap — is a dead letter, and the edge node is
//! asked to rebirth ([`Host::take_rebirths`]).

use std::collections::{BTreeMap, HashMap, HashSet};

use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Number, Value};
use srad_types::payload::{
    data_set, metric, template, DataSet, DataType, Message as _, Metric, Payload, Template,
};

use crate::{contains_nul_escape, DecodeError, Parsed, Unit, MAX_DEVICE_ID_LEN, MAX_READINGS};

/// The topic namespace of Sparkplug B.
pub const NAMESPACE: &str = "spBv1.0";
/// The metric an NCMD sets to `true` to ask an edge node for its births again.
pub const REBIRTH_METRIC: &str = "Node Control/Rebirth";
/// The NBIRTH / NDEATH metric that pairs a death with the birth of the same session.
const BD_SEQ: &str = "bdSeq";
/// The key of a reading that holds its metrics' own timestamps, where they differ.
pub const TIMESTAMPS_KEY: &str = "$timestamps";

/// A Sparkplug message type (the topic's third level).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    NBirth,
    NData,
    NDeath,
    DBirth,
    DData,
    DDeath,
    NCmd,
    DCmd,
}

/// The message types by their topic level.
const KINDS: [(&str, Kind); 8] = [
    ("NBIRTH", Kind::NBirth),
    ("NDATA", Kind::NData),
    ("NDEATH", Kind::NDeath),
    ("DBIRTH", Kind::DBirth),
    ("DDATA", Kind::DData),
    ("DDEATH", Kind::DDeath),
    ("NCMD", Kind::NCmd),
    ("DCMD", Kind::DCmd),
];

/// What a topic under `spBv1.0/` is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpTopic<'a> {
    /// `spBv1.0/<group>/<kind>/<edge_node>[/<device>]`.
    Message {
        group: &'a str,
        kind: Kind,
        node: &'a str,
        device: Option<&'a str>,
    },
    /// `spBv1.0/STATE/<host_id>`: a primary host's own state, never a reading.
    State,
}

/// Reads a Sparkplug topic; the error says what is wrong with it.
pub fn parse_topic(topic: &str) -> Result<SpTopic<'_>, String> {
    let parts: Vec<&str> = topic.split('/').collect();
    if parts.first() != Some(&NAMESPACE) {
        return Err(format!("topic {topic:?} is not under {NAMESPACE}/"));
    }
    if parts.get(1) == Some(&"STATE") {
        return Ok(SpTopic::State);
    }
    let level = parts.get(2).copied().unwrap_or("");
    let Some(&(_, kind)) = KINDS.iter().find(|(name, _)| *name == level) else {
        return Err(format!(
            "topic {topic:?}: {level:?} is not a Sparkplug message type"
        ));
    };
    let device_kind = matches!(kind, Kind::DBirth | Kind::DData | Kind::DDeath | Kind::DCmd);
    let want = if device_kind { 5 } else { 4 };
    if parts.len() != want || parts.iter().any(|p| p.is_empty()) {
        return Err(format!(
            "topic {topic:?}: a {} topic is {NAMESPACE}/<group>/{}/<edge_node>{}",
            parts[2],
            parts[2],
            if device_kind { "/<device>" } else { "" }
        ));
    }
    Ok(SpTopic::Message {
        group: parts[1],
        kind,
        node: parts[3],
        device: parts.get(4).copied(),
    })
}

/// A metric as a birth defined it: name, alias, datatype (the Tahu enum's number). Kept as a
/// JSON array of three in PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Def(pub String, pub Option<u64>, pub u32);

/// A birth's metric definitions, looked up by alias and by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "Vec<Def>", into = "Vec<Def>")]
pub struct Defs {
    list: Vec<Def>,
    by_alias: HashMap<u64, usize>,
    by_name: HashMap<String, usize>,
}

impl From<Vec<Def>> for Defs {
    fn from(list: Vec<Def>) -> Self {
        let defs = || list.iter().enumerate();
        let by_alias = defs().filter_map(|(k, d)| Some((d.1?, k))).collect();
        let by_name = defs().map(|(k, d)| (d.0.clone(), k)).collect();
        Defs {
            list,
            by_alias,
            by_name,
        }
    }
}

impl From<Defs> for Vec<Def> {
    fn from(d: Defs) -> Self {
        d.list
    }
}

impl Defs {
    fn alias(&self, a: u64) -> Option<&Def> {
        self.by_alias.get(&a).map(|&k| &self.list[k])
    }

    fn datatype(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).map(|&k| self.list[k].2)
    }
}

/// What the host holds of one edge node: its last birth, its sequence, its devices.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub online: bool,
    /// The NBIRTH's `bdSeq`: an NDEATH with another one belongs to an earlier session.
    pub bd_seq: Option<u64>,
    /// The last sequence number read from it (0..=255).
    pub seq: Option<u8>,
    /// A sequence gap was seen: its data is refused until its next NBIRTH (a rebirth was asked).
    pub stale: bool,
    pub birth_at: Option<DateTime<Utc>>,
    pub death_at: Option<DateTime<Utc>>,
    pub metrics: Defs,
    pub devices: BTreeMap<String, Device>,
}

/// A device of an edge node, as its last DBIRTH (and DDEATH) left it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub online: bool,
    pub birth_at: Option<DateTime<Utc>>,
    pub death_at: Option<DateTime<Utc>>,
    pub metrics: Defs,
}

/// An edge node: `(group, edge_node)`.
pub type NodeKey = (String, String);

/// An edge node a batch changed, how, and its state now ([`Host::take_changes`]).
pub type NodeChange = (NodeKey, Change, Node);

/// What changed of a node since the host's changes were last taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    /// Its sequence number only.
    Seq,
    /// Its birth, death, devices or staleness: the whole row.
    Whole,
}

/// Births, deaths and what a reading of one message did, for the events and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Happened {
    Birth {
        node: NodeKey,
        device: Option<String>,
    },
    Death {
        node: NodeKey,
        device: Option<String>,
    },
}

/// The primary host's view of every edge node. Reading a message may change it; the writer
/// records the changes ([`Host::take_changes`]) once the batch committed, and asks the edge nodes
/// of [`Host::take_rebirths`] for their births.
#[derive(Debug, Default)]
pub struct Host {
    nodes: HashMap<NodeKey, Node>,
    changed: HashMap<NodeKey, Change>,
    rebirths: Vec<NodeKey>,
    happened: Vec<Happened>,
    reads: Reads,
}

/// The QoS 1 deliveries this host read in this term, by topic and packet id: a broker that
/// redelivers them after a reconnect sends them again, DUP-flagged and in their order, after
/// messages read since — up to `MAX_PENDING` of them, far more than the half of the 256 sequence
/// numbers by which a redelivery is told from a gap otherwise. A delivery whose topic, packet id
/// and bytes were read already was read in an earlier batch, which committed before this one
/// was prepared (the writer commits in order): it is skipped whole — no reading again with the
/// births in force now, no state changed, a birth not applied twice.
#[derive(Debug)]
struct Reads {
    /// (topic and packet id hash) -> (payload hash, when noted).
    seen: HashMap<u64, (u64, u64)>,
    order: std::collections::VecDeque<(u64, u64)>,
    noted: u64,
    kept: usize,
    /// Deliveries skipped so far.
    skipped: u64,
}

impl Default for Reads {
    fn default() -> Self {
        Reads {
            seen: HashMap::new(),
            order: std::collections::VecDeque::new(),
            noted: 0,
            kept: READS_KEPT,
            skipped: 0,
        }
    }
}

/// Deliveries [`Reads`] keeps unless told ([`Host::remembering`]).
const READS_KEPT: usize = 32_768;

impl Reads {
    fn id(topic: &str, payload: &[u8], pkid: u16) -> Option<(u64, u64)> {
        use std::hash::BuildHasher;
        if pkid == 0 {
            return None;
        }
        let h = foldhash::fast::FixedState::default();
        Some((h.hash_one((topic, pkid)), h.hash_one(payload)))
    }

    /// Whether this delivery (`id`, DUP-flagged) was read already.
    fn again(&self, id: Option<(u64, u64)>, dup: bool) -> bool {
        dup && id.is_some_and(|(k, hash)| self.seen.get(&k).is_some_and(|&(h, _)| h == hash))
    }

    fn note(&mut self, id: Option<(u64, u64)>) {
        let Some((k, hash)) = id else {
            return;
        };
        self.noted += 1;
        self.seen.insert(k, (hash, self.noted));
        self.order.push_back((k, self.noted));
        while self.order.len() > self.kept {
            if let Some((old, at)) = self.order.pop_front() {
                if self.seen.get(&old).is_some_and(|v| v.1 == at) {
                    self.seen.remove(&old);
                }
            }
        }
    }
}

impl Host {
    /// The state recorded by the previous leaders.
    pub fn with_nodes(nodes: impl IntoIterator<Item = (NodeKey, Node)>) -> Self {
        Host {
            nodes: nodes.into_iter().collect(),
            ..Host::default()
        }
    }

    pub fn node(&self, group: &str, node: &str) -> Option<&Node> {
        self.nodes.get(&(group.to_string(), node.to_string()))
    }

    /// Edge nodes held, online or not.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Edge nodes online, devices online (of online edge nodes).
    pub fn online(&self) -> (usize, usize) {
        let nodes = self.nodes.values().filter(|n| n.online);
        let devices = nodes.clone().flat_map(|n| n.devices.values());
        (nodes.count(), devices.filter(|d| d.online).count())
    }

    /// The newest birth held, of any edge node or device.
    pub fn last_birth(&self) -> Option<DateTime<Utc>> {
        self.nodes
            .values()
            .flat_map(|n| std::iter::once(n.birth_at).chain(n.devices.values().map(|d| d.birth_at)))
            .flatten()
            .max()
    }

    /// The nodes changed since the last call, each with its state now: whole, or only its
    /// sequence number (a node's births are not copied for that).
    pub fn take_changes(&mut self) -> Vec<NodeChange> {
        let mut out: Vec<NodeChange> = self
            .changed
            .drain()
            .filter_map(|(k, c)| {
                let n = self.nodes.get(&k)?;
                let n = match c {
                    Change::Whole => n.clone(),
                    Change::Seq => Node {
                        seq: n.seq,
                        ..Node::default()
                    },
                };
                Some((k, c, n))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The edge nodes to ask for a rebirth, each once.
    pub fn take_rebirths(&mut self) -> Vec<NodeKey> {
        let mut seen = HashSet::new();
        self.rebirths.retain(|k| seen.insert(k.clone()));
        std::mem::take(&mut self.rebirths)
    }

    /// Births and deaths read since the last call.
    pub fn take_happened(&mut self) -> Vec<Happened> {
        std::mem::take(&mut self.happened)
    }

    /// The readings of one message on a `sparkplug_b` topic: none for a death, a command or a
    /// host's STATE; one (rarely more: a metric sent twice) for a data message; a refused unit
    /// when it cannot be read or resolved. `dup`: the broker's DUP flag — a redelivery (QoS 1)
    /// of a message already read is read again as it was, without changing the state.
    pub fn read(&mut self, topic: &str, payload: &Bytes, dup: bool) -> Vec<Unit> {
        self.read_delivery(topic, payload, dup, 0)
    }

    /// [`Host::read`] of a delivery with its MQTT packet id (0 at QoS 0): a QoS 1 message
    /// redelivered after a reconnect is known by it ([`Reads`]).
    pub fn read_delivery(
        &mut self,
        topic: &str,
        payload: &Bytes,
        dup: bool,
        pkid: u16,
    ) -> Vec<Unit> {
        let id = Reads::id(topic, payload, pkid);
        if self.reads.again(id, dup) {
            self.reads.skipped += 1;
            return Vec::new();
        }
        let units = self.read_once(topic, payload, dup);
        self.reads.note(id);
        units
    }

    /// Deliveries skipped as redeliveries of one read already ([`Reads`]): the writer counts
    /// them as duplicates.
    pub fn redeliveries_skipped(&self) -> u64 {
        self.reads.skipped
    }

    /// A host that remembers the last `deliveries` QoS 1 deliveries it read (three times
    /// `MAX_PENDING`, say: what a reconnect can redeliver).
    pub fn remembering(mut self, deliveries: usize) -> Self {
        self.reads.kept = deliveries.max(1);
        self
    }

    fn read_once(&mut self, topic: &str, payload: &Bytes, dup: bool) -> Vec<Unit> {
        let refused = |e: DecodeError| vec![Unit::refused(payload.clone(), e)];
        let (group, kind, node, device) = match parse_topic(topic) {
            Ok(SpTopic::State) => return Vec::new(),
            Ok(SpTopic::Message {
                group,
                kind,
                node,
                device,
            }) => (group, kind, node, device),
            Err(e) => return refused(DecodeError::BadSparkplug(e)),
        };
        if matches!(kind, Kind::NCmd | Kind::DCmd) {
            // Commands to edge nodes (this host's rebirth requests among them): not readings.
            return Vec::new();
        }
        let p = match decode(payload) {
            Ok(p) => p,
            Err(e) => return refused(e),
        };
        let key: NodeKey = (group.to_string(), node.to_string());
        let m = Msg {
            kind,
            device,
            name: format!("{group}/{node}"),
            p,
            raw: payload,
            dup,
        };
        match kind {
            Kind::NBirth => self.nbirth(key, &m),
            Kind::NDeath => {
                self.ndeath(key, bd_seq(&m.p));
                Vec::new()
            }
            Kind::NData | Kind::DBirth | Kind::DData | Kind::DDeath => self.data(key, &m),
            Kind::NCmd | Kind::DCmd => Vec::new(),
        }
    }

    /// An NBIRTH starts a new session of the edge node, whose data is read by its definitions
    /// from now on; a redelivery of the birth in force is only read again.
    fn nbirth(&mut self, key: NodeKey, m: &Msg<'_>) -> Vec<Unit> {
        let bd_seq = bd_seq(&m.p);
        let defs = match birth_defs(&m.p.metrics) {
            Ok(d) => d,
            Err(e) => {
                // Nothing of the node's earlier births may be applied to what follows.
                let n = self.nodes.entry(key.clone()).or_default();
                n.online = true;
                n.stale = true;
                n.seq = m.p.seq.map(|s| s as u8);
                n.bd_seq = bd_seq;
                mark(&mut self.changed, &key, Change::Whole);
                self.rebirths.push(key);
                return m.refused(DecodeError::BadSparkplug(format!("{e}; rebirth requested")));
            }
        };
        if m.dup
            && self
                .nodes
                .get(&key)
                .is_some_and(|n| n.online && n.bd_seq == bd_seq && n.metrics == defs && !n.stale)
        {
            // The same birth again (a redelivery): its reading, the state as it is.
            return reading(&m.name, &m.p, &defs, m.raw);
        }
        let at = m.p.timestamp.and_then(millis);
        let prev = self.nodes.remove(&key).unwrap_or_default();
        // A new session: every device must be born again before its data is read.
        let mut devices = prev.devices;
        for dev in devices.values_mut() {
            dev.online = false;
            dev.metrics = Defs::default();
        }
        self.nodes.insert(
            key.clone(),
            Node {
                online: true,
                bd_seq,
                seq: m.p.seq.map(|s| s as u8),
                stale: false,
                birth_at: at.or(prev.birth_at),
                death_at: prev.death_at,
                metrics: defs,
                devices,
            },
        );
        mark(&mut self.changed, &key, Change::Whole);
        self.happened.push(Happened::Birth {
            node: key.clone(),
            device: None,
        });
        let defs = &self.nodes[&key].metrics;
        reading(&m.name, &m.p, defs, m.raw)
    }

    /// An NDEATH ends the session whose `bdSeq` it carries: the edge node and its devices are
    /// offline until born again.
    fn ndeath(&mut self, key: NodeKey, bd_seq: Option<u64>) {
        if let Some(n) = self.nodes.get_mut(&key) {
            // The will of an earlier session arriving late: not this session's death.
            let earlier = matches!((bd_seq, n.bd_seq), (Some(a), Some(b)) if a != b);
            if n.online && !earlier {
                n.online = false;
                // When it was received: a will carries its connection's time.
                n.death_at = Some(Utc::now());
                for d in n.devices.values_mut() {
                    d.online = false;
                }
                mark(&mut self.changed, &key, Change::Whole);
                self.happened.push(Happened::Death {
                    node: key.clone(),
                    device: None,
                });
            }
        }
    }

    /// NDATA, DBIRTH, DDATA, DDEATH: read only while the edge node's birth holds and its
    /// sequence runs unbroken; otherwise refused, and the edge node asked for a rebirth.
    fn data(&mut self, key: NodeKey, m: &Msg<'_>) -> Vec<Unit> {
        let Host {
            nodes,
            changed,
            rebirths,
            happened,
            ..
        } = self;
        let Some(n) = nodes.get_mut(&key).filter(|n| n.online) else {
            rebirths.push(key);
            let name = &m.name;
            return m.refused(DecodeError::NoBirth(format!(
                "no NBIRTH of edge node {name} is held (it was never seen or died since); rebirth requested"
            )));
        };
        let mut held = Held {
            n,
            changed,
            rebirths,
            happened,
        };
        let redelivered = match held.follow_seq(&key, m) {
            Ok(redelivered) => redelivered,
            Err(e) => {
                held.rebirths.push(key);
                return m.refused(e);
            }
        };
        match (m.kind, m.device) {
            (Kind::NData, _) => {
                let units = reading(&m.name, &m.p, &held.n.metrics, m.raw);
                match redelivered {
                    true => units,
                    false => held.unknown_alias(key, units),
                }
            }
            (Kind::DBirth, Some(d)) => held.dbirth(key, m, d, redelivered),
            (Kind::DData, Some(d)) => held.ddata(key, m, d, redelivered),
            (Kind::DDeath, Some(d)) if !redelivered => held.ddeath(key, d),
            _ => Vec::new(),
        }
    }
}

/// A message being read by [`Host::read`], parsed once: what its helpers share.
struct Msg<'a> {
    kind: Kind,
    device: Option<&'a str>,
    /// `group/edge_node`: its edge node's device id.
    name: String,
    p: Payload,
    raw: &'a Bytes,
    /// The broker's DUP flag.
    dup: bool,
}

impl Msg<'_> {
    /// The message refused whole, kept as received.
    fn refused(&self, e: DecodeError) -> Vec<Unit> {
        vec![Unit::refused(self.raw.clone(), e)]
    }
}

/// A data message's edge node with the host's records of what reading it changed: the fields
/// of [`Host`] borrowed apart, so that the node is looked up once and both can change.
struct Held<'h> {
    n: &'h mut Node,
    changed: &'h mut HashMap<NodeKey, Change>,
    rebirths: &'h mut Vec<NodeKey>,
    happened: &'h mut Vec<Happened>,
}

impl Held<'_> {
    /// Follows the edge node's sequence number: whether `m` is a redelivery of a message already
    /// read, or why it cannot be read after messages were lost (the caller asks for the rebirth).
    fn follow_seq(&mut self, key: &NodeKey, m: &Msg<'_>) -> Result<bool, DecodeError> {
        let (n, name) = (&mut *self.n, &m.name);
        if n.stale {
            if let Some(s) = m.p.seq {
                n.seq = Some(s as u8);
                mark(self.changed, key, Change::Seq);
            }
            return Err(DecodeError::SequenceGap(format!(
                "edge node {name} lost messages before this one; waiting for the rebirth requested"
            )));
        }
        // A redelivery of a message already read (at or up to half the sequence behind the last
        // one): read again with the births in force, the state left as it is; the table settles
        // it as a duplicate.
        let redelivered = m.dup
            && matches!((n.seq, m.p.seq),
                (Some(last), Some(s)) if s <= 255 && last.wrapping_sub(s as u8) < 128);
        if !redelivered {
            if let (Some(last), Some(s)) = (n.seq, m.p.seq) {
                let want = last.wrapping_add(1);
                if s != u64::from(want) {
                    n.seq = Some(s as u8);
                    n.stale = true;
                    mark(self.changed, key, Change::Whole);
                    return Err(DecodeError::SequenceGap(format!(
                        "edge node {name}: seq {s} after {last}, {want} expected: messages were lost; rebirth requested"
                    )));
                }
            }
            if let Some(s) = m.p.seq {
                n.seq = Some(s as u8);
                mark(self.changed, key, Change::Seq);
            }
        }
        Ok(redelivered)
    }

    /// A DBIRTH: the device's data is read by its definitions from now on. One that cannot be
    /// read takes the device's earlier birth with it.
    fn dbirth(&mut self, key: NodeKey, m: &Msg<'_>, d: &str, redelivered: bool) -> Vec<Unit> {
        let full = format!("{}/{d}", m.name);
        let defs = match birth_defs(&m.p.metrics) {
            Ok(defs) => defs,
            Err(e) if redelivered => return m.refused(DecodeError::BadSparkplug(e)),
            Err(e) => {
                // The device's earlier birth no longer holds either.
                if let Some(dev) = self.n.devices.get_mut(d) {
                    dev.online = false;
                    dev.metrics = Defs::default();
                }
                mark(self.changed, &key, Change::Whole);
                self.rebirths.push(key);
                return m.refused(DecodeError::BadSparkplug(format!("{e}; rebirth requested")));
            }
        };
        let units = reading(&full, &m.p, &defs, m.raw);
        if !redelivered {
            let at = m.p.timestamp.and_then(millis);
            let dev = self.n.devices.entry(d.to_string()).or_default();
            dev.online = true;
            dev.birth_at = at.or(dev.birth_at);
            dev.metrics = defs;
            mark(self.changed, &key, Change::Whole);
            self.happened.push(Happened::Birth {
                node: key.clone(),
                device: Some(d.to_string()),
            });
        }
        units
    }

    /// A DDATA: read only while the device's birth is held.
    fn ddata(&mut self, key: NodeKey, m: &Msg<'_>, d: &str, redelivered: bool) -> Vec<Unit> {
        let full = format!("{}/{d}", m.name);
        let Some(dev) = self.n.devices.get(d).filter(|x| x.online) else {
            let asked = match redelivered {
                true => "",
                false => {
                    self.rebirths.push(key);
                    "; rebirth requested"
                }
            };
            return m.refused(DecodeError::NoBirth(format!(
                "no DBIRTH of device {full} is held (it was never seen or died since){asked}"
            )));
        };
        let units = reading(&full, &m.p, &dev.metrics, m.raw);
        match redelivered {
            true => units,
            false => self.unknown_alias(key, units),
        }
    }

    /// A DDEATH: the device's data is refused until it is born again.
    fn ddeath(&mut self, key: NodeKey, d: &str) -> Vec<Unit> {
        if let Some(dev) = self.n.devices.get_mut(d).filter(|x| x.online) {
            dev.online = false;
            dev.death_at = Some(Utc::now());
            mark(self.changed, &key, Change::Whole);
            self.happened.push(Happened::Death {
                node: key.clone(),
                device: Some(d.to_string()),
            });
        }
        Vec::new()
    }

    /// Asks for a rebirth when a reading named an alias its birth did not define.
    fn unknown_alias(&mut self, key: NodeKey, units: Vec<Unit>) -> Vec<Unit> {
        if units
            .iter()
            .any(|u| matches!(u.decoded, Some(Err(DecodeError::UnknownAlias(_)))))
        {
            self.rebirths.push(key);
        }
        units
    }
}

/// The `bdSeq` of an NBIRTH or NDEATH: what pairs a death with the birth of its session.
fn bd_seq(p: &Payload) -> Option<u64> {
    p.metrics
        .iter()
        .find(|m| m.name.as_deref() == Some(BD_SEQ))
        .and_then(int_of)
}

/// A message read on its own, without its edge node's births or sequence (`leasehold replay`, an
/// observer): births and metrics sent by name are read, an alias is refused (`unknown_alias`),
/// nothing is remembered. Deaths, commands and STATE hold no reading.
pub fn read_alone(topic: &str, payload: &Bytes) -> Vec<Unit> {
    let refused = |e: DecodeError| vec![Unit::refused(payload.clone(), e)];
    let device = match parse_topic(topic) {
        Ok(SpTopic::Message {
            group,
            kind: Kind::NBirth | Kind::NData,
            node,
            ..
        }) => format!("{group}/{node}"),
        Ok(SpTopic::Message {
            group,
            kind: Kind::DBirth | Kind::DData,
            node,
            device: Some(d),
        }) => format!("{group}/{node}/{d}"),
        Ok(_) => return Vec::new(),
        Err(e) => return refused(DecodeError::BadSparkplug(e)),
    };
    match decode(payload) {
        Ok(p) => reading(&device, &p, &Defs::default(), payload),
        Err(e) => refused(e),
    }
}

fn decode(payload: &Bytes) -> Result<Payload, DecodeError> {
    Payload::decode(payload.as_ref())
        .map_err(|e| DecodeError::BadSparkplug(format!("not a Sparkplug B payload: {e}")))
}

/// Notes that `key` changed by at least `c`.
fn mark(changed: &mut HashMap<NodeKey, Change>, key: &NodeKey, c: Change) {
    let e = changed.entry(key.clone()).or_insert(c);
    *e = (*e).max(c);
}

/// The definitions a birth makes: every metric with its name, alias and datatype.
fn birth_defs(metrics: &[Metric]) -> Result<Defs, String> {
    let mut list = Vec::with_capacity(metrics.len());
    let mut aliases = HashSet::with_capacity(metrics.len());
    for (k, m) in metrics.iter().enumerate() {
        let Some(name) = &m.name else {
            return Err(format!("metric {} of the birth has no name", k + 1));
        };
        if name.contains('\0') {
            // jsonb (and text) cannot hold U+0000: the births could not be recorded.
            return Err(format!(
                "metric {} of the birth has U+0000 in its name",
                k + 1
            ));
        }
        if let Some(a) = m.alias {
            if !aliases.insert(a) {
                return Err(format!(
                    "alias {a} is defined twice by the birth (metric {} {name:?})",
                    k + 1
                ));
            }
        }
        list.push(Def(name.clone(), m.alias, m.datatype.unwrap_or(0)));
    }
    Ok(Defs::from(list))
}

/// The whole-number value of a metric (a `bdSeq`).
fn int_of(m: &Metric) -> Option<u64> {
    match m.value.as_ref()? {
        metric::Value::IntValue(v) => Some(u64::from(*v)),
        metric::Value::LongValue(v) => Some(*v),
        _ => None,
    }
}

/// The last millisecond of the year 9999: later times are refused (PostgreSQL cannot read
/// them back from JSON text, and they are mostly microseconds sent as milliseconds).
const MAX_MILLIS: u64 = 253_402_300_799_999;

/// A Sparkplug time (milliseconds since the epoch), up to the year 9999.
fn millis(ms: u64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_millis(i64::try_from(ms).ok().filter(|_| ms <= MAX_MILLIS)?)
}

fn time_text(t: DateTime<Utc>) -> Value {
    Value::String(t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// One group of a message's metrics: a reading.
struct Group {
    ts: Option<u64>,
    fields: Map<String, Value>,
    timestamps: Map<String, Value>,
}

impl Group {
    fn at(ts: Option<u64>) -> Self {
        Group {
            ts,
            fields: Map::new(),
            timestamps: Map::new(),
        }
    }

    /// A metric's value, and its own instant when it is not the reading's (checked in range).
    fn put(&mut self, name: String, value: Value, own: Option<u64>) {
        if let Some(t) = own.filter(|t| Some(*t) != self.ts).and_then(millis) {
            self.timestamps.insert(name.clone(), time_text(t));
        }
        self.fields.insert(name, value);
    }

    fn take(&mut self, name: &str) -> Option<Value> {
        self.timestamps.remove(name);
        self.fields.remove(name)
    }

    /// The reading as a unit of `device`, decoded here already: a Sparkplug reading has no
    /// JSON of its own to read a device id or timestamp from.
    fn into_unit(self, device: &str, raw: &Bytes, label: Option<String>) -> Unit {
        let mut object = self.fields;
        if !self.timestamps.is_empty() {
            object.insert(TIMESTAMPS_KEY.into(), Value::Object(self.timestamps));
        }
        let timestamp = match self.ts {
            None => Ok(None),
            Some(t) => millis(t)
                .map(Some)
                .ok_or_else(|| DecodeError::BadTimestamp {
                    field: "timestamp",
                    reason: format!("{t} ms is out of range"),
                }),
        };
        let payload = Bytes::from(Value::Object(object).to_string());
        // Device id and timestamp only: a route that reads JSON paths parses the payload again
        // (`Decoder::parse_full`), the default route never does.
        let decoded = match contains_nul_escape(&payload) {
            true => Err(DecodeError::NulEscape),
            false => timestamp.map(|ts| Parsed {
                object: None,
                text: None,
                device_id: Some(device.to_string()),
                timestamp: Ok(ts),
            }),
        };
        Unit {
            payload,
            raw: raw.clone(),
            label,
            decoded: Some(decoded),
        }
    }
}

/// A further value of a metric the message's reading holds: into the first other reading of
/// its instant without it, or a new one.
fn elsewhere(groups: &mut Vec<Group>, name: String, value: Value, own: Option<u64>) {
    let at = match groups
        .iter()
        .skip(1)
        .position(|g| g.ts == own && !g.fields.contains_key(&name))
    {
        Some(i) => i + 1,
        None => {
            groups.push(Group::at(own));
            groups.len() - 1
        }
    };
    groups[at].put(name, value, own);
}

/// The readings of a data message of `device`, its metrics resolved by `defs`: one, unless a
/// metric appears twice (values of several instants, as store and forward sends them), whose
/// later values go into readings at their own timestamps.
fn reading(device: &str, p: &Payload, defs: &Defs, raw: &Bytes) -> Vec<Unit> {
    let refused = |e: DecodeError| vec![Unit::refused(raw.clone(), e)];
    if device.chars().count() > MAX_DEVICE_ID_LEN {
        return refused(DecodeError::DeviceIdTooLong);
    }
    if p.metrics.len() > MAX_READINGS {
        return refused(DecodeError::TooManyReadings { n: p.metrics.len() });
    }
    let mut groups = vec![Group::at(p.timestamp)];
    // Each metric of the message's reading, with its own instant.
    let mut main_own: HashMap<String, Option<u64>> = HashMap::new();
    let mut array_values = 0usize;
    for (k, m) in p.metrics.iter().enumerate() {
        let (name, value) = match read_metric(k, m, defs, device, &mut array_values) {
            Ok(Some(metric)) => metric,
            Ok(None) => continue,
            Err(e) => return refused(e),
        };
        let own = m.timestamp.or(p.timestamp);
        place(&mut groups, &mut main_own, name, value, own);
    }
    let n = groups.len();
    let label = |k: usize| (n > 1).then(|| format!("reading {} of {n}", k + 1));
    let units = groups.into_iter().enumerate();
    units
        .map(|(k, g)| g.into_unit(device, raw, label(k)))
        .collect()
}

/// Metric `k` (from 0) of a data message of `device`, resolved by `defs`: its name and value;
/// `None` for a template's definition, which is no value. `array_values` counts the values of
/// the message's arrays so far, which `MAX_ARRAY` bounds.
fn read_metric(
    k: usize,
    m: &Metric,
    defs: &Defs,
    device: &str,
    array_values: &mut usize,
) -> Result<Option<(String, Value)>, DecodeError> {
    let (name, datatype) = match (&m.name, m.alias) {
        (Some(n), _) => (
            n.clone(),
            m.datatype.or_else(|| defs.datatype(n)).unwrap_or(0),
        ),
        (None, Some(a)) => {
            let d = defs.alias(a).ok_or_else(|| {
                DecodeError::UnknownAlias(format!(
                    "metric {} has alias {a}, which no birth of {device} defined; rebirth requested",
                    k + 1
                ))
            })?;
            (d.0.clone(), m.datatype.unwrap_or(d.2))
        }
        (None, None) => {
            return Err(DecodeError::BadSparkplug(format!(
                "metric {} has neither a name nor an alias",
                k + 1
            )))
        }
    };
    if name == TIMESTAMPS_KEY {
        return Err(DecodeError::BadSparkplug(format!(
            "a metric named {TIMESTAMPS_KEY:?} cannot be told from the reading's own field"
        )));
    }
    if matches!(&m.value, Some(metric::Value::TemplateValue(t)) if t.is_definition == Some(true)) {
        // A template's definition (a birth's `_types_/...`): a type, not a value.
        return Ok(None);
    }
    let value = match metric_value(m, datatype) {
        Ok(v) => v,
        Err(e) => return Err(DecodeError::BadSparkplug(format!("metric {name:?}: {e}"))),
    };
    if let Value::Array(a) = &value {
        *array_values += a.len();
        if *array_values > MAX_ARRAY {
            return Err(DecodeError::BadSparkplug(format!(
                "its arrays hold over {MAX_ARRAY} values"
            )));
        }
    }
    if let Some(t) = m.timestamp.filter(|t| millis(*t).is_none()) {
        return Err(DecodeError::BadSparkplug(format!(
            "metric {name:?}: timestamp {t} is out of range (after the year 9999)"
        )));
    }
    Ok(Some((name, value)))
}

/// A metric's value into the message's readings (`groups`, the first the message's own;
/// `main_own`: each metric of that one, with its own instant). The message's reading holds each
/// metric once, at the payload's instant when one of its values is; the other values of a
/// metric sent twice go into readings at their own instants (each reading of one instant
/// holding a metric once).
fn place(
    groups: &mut Vec<Group>,
    main_own: &mut HashMap<String, Option<u64>>,
    name: String,
    value: Value,
    own: Option<u64>,
) {
    match main_own.get(&name).copied() {
        None => {
            main_own.insert(name.clone(), own);
            groups[0].put(name, value, own);
        }
        Some(earlier) if own == groups[0].ts && earlier != groups[0].ts => {
            let moved = groups[0].take(&name);
            main_own.insert(name.clone(), own);
            groups[0].put(name.clone(), value, own);
            if let Some(v) = moved {
                elsewhere(groups, name, v, earlier);
            }
        }
        Some(_) => elsewhere(groups, name, value, own),
    }
}

/// A metric's value as JSON, read by its datatype (the birth's when the message omits it).
fn metric_value(m: &Metric, datatype: u32) -> Result<Value, String> {
    if m.is_null == Some(true) {
        return Ok(Value::Null);
    }
    let Some(v) = &m.value else {
        return Ok(Value::Null);
    };
    let dt = DataType::try_from(datatype as i32).unwrap_or(DataType::Unknown);
    Ok(match v {
        metric::Value::IntValue(x) => int_value(u64::from(*x), dt),
        metric::Value::LongValue(x) => int_value(*x, dt),
        metric::Value::FloatValue(x) => float(f64::from(*x), Some(*x)),
        metric::Value::DoubleValue(x) => float(*x, None),
        metric::Value::BooleanValue(x) => Value::Bool(*x),
        metric::Value::StringValue(s) => Value::String(s.clone()),
        metric::Value::BytesValue(b) => bytes_value(b, dt)?,
        metric::Value::DatasetValue(d) => dataset(d)?,
        metric::Value::TemplateValue(t) => template_value(t)?,
        metric::Value::ExtensionValue(_) => Value::Null,
    })
}

/// An integer as its datatype reads it: a signed type's two's complement (of its own width, so
/// both encodings seen in the wild, sign-extended or not, read the same), a time in ms.
fn int_value(x: u64, dt: DataType) -> Value {
    match dt {
        DataType::Int8 => Value::from(x as u8 as i8),
        DataType::Int16 => Value::from(x as u16 as i16),
        DataType::Int32 => Value::from(x as u32 as i32),
        DataType::Int64 => Value::from(x as i64),
        DataType::UInt8 | DataType::UInt16 | DataType::UInt32 => Value::from(x as u32),
        DataType::DateTime => match millis(x) {
            Some(t) => time_text(t),
            None => Value::from(x),
        },
        _ => Value::from(x),
    }
}

/// A float as JSON: a 32-bit one by its shortest text (0.1, not 0.10000000149011612); NaN and
/// the infinities, which JSON has no number for, as text.
fn float(x: f64, single: Option<f32>) -> Value {
    if !x.is_finite() {
        return Value::String(
            match x {
                x if x.is_nan() => "NaN",
                x if x > 0.0 => "Infinity",
                _ => "-Infinity",
            }
            .into(),
        );
    }
    let x = match single {
        Some(f) => f.to_string().parse::<f64>().unwrap_or(x),
        None => x,
    };
    Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// The most values one array metric is read into (its JSON is several times its bytes).
const MAX_ARRAY: usize = 100_000;

/// Bytes as their datatype packs them (Sparkplug 3.0, little-endian arrays), else as base64.
fn bytes_value(b: &[u8], dt: DataType) -> Result<Value, String> {
    fn each<const N: usize>(
        b: &[u8],
        name: &str,
        f: impl Fn([u8; N]) -> Value,
    ) -> Result<Value, String> {
        if b.len() / N > MAX_ARRAY {
            return Err(format!(
                "{name} of {} values, over {MAX_ARRAY}",
                b.len() / N
            ));
        }
        if !b.len().is_multiple_of(N) {
            return Err(format!(
                "{name} of {} bytes, not a multiple of {N}",
                b.len()
            ));
        }
        Ok(Value::Array(
            b.chunks_exact(N)
                .map(|c| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(c);
                    f(a)
                })
                .collect(),
        ))
    }
    match dt {
        DataType::Int8Array => each::<1>(b, "Int8Array", |a| Value::from(a[0] as i8)),
        DataType::UInt8Array => each::<1>(b, "UInt8Array", |a| Value::from(a[0])),
        DataType::Int16Array => each::<2>(b, "Int16Array", |a| Value::from(i16::from_le_bytes(a))),
        DataType::UInt16Array => {
            each::<2>(b, "UInt16Array", |a| Value::from(u16::from_le_bytes(a)))
        }
        DataType::Int32Array => each::<4>(b, "Int32Array", |a| Value::from(i32::from_le_bytes(a))),
        DataType::UInt32Array => {
            each::<4>(b, "UInt32Array", |a| Value::from(u32::from_le_bytes(a)))
        }
        DataType::Int64Array => each::<8>(b, "Int64Array", |a| Value::from(i64::from_le_bytes(a))),
        DataType::UInt64Array => {
            each::<8>(b, "UInt64Array", |a| Value::from(u64::from_le_bytes(a)))
        }
        DataType::FloatArray => each::<4>(b, "FloatArray", |a| {
            let f = f32::from_le_bytes(a);
            float(f64::from(f), Some(f))
        }),
        DataType::DoubleArray => {
            each::<8>(b, "DoubleArray", |a| float(f64::from_le_bytes(a), None))
        }
        DataType::DateTimeArray => each::<8>(b, "DateTimeArray", |a| {
            let ms = u64::from_le_bytes(a);
            millis(ms).map_or(Value::from(ms), time_text)
        }),
        DataType::BooleanArray => {
            let Some((count, bits)) = b.split_first_chunk::<4>() else {
                return Err(format!(
                    "BooleanArray of {} bytes, without its count",
                    b.len()
                ));
            };
            let n = u32::from_le_bytes(*count) as usize;
            if n > MAX_ARRAY {
                return Err(format!("BooleanArray of {n} values, over {MAX_ARRAY}"));
            }
            if bits.len() * 8 < n {
                return Err(format!(
                    "BooleanArray of {n} values in {} bytes",
                    bits.len()
                ));
            }
            // Packed most significant bit first.
            Ok(Value::Array(
                (0..n)
                    .map(|i| Value::Bool(bits[i / 8] & (0x80 >> (i % 8)) != 0))
                    .collect(),
            ))
        }
        DataType::StringArray => {
            let text =
                std::str::from_utf8(b).map_err(|_| "StringArray that is not UTF-8".to_string())?;
            // Each string ends with a NUL.
            let mut parts: Vec<&str> = text.split('\0').collect();
            if parts.last() == Some(&"") {
                parts.pop();
            }
            Ok(Value::Array(
                parts.into_iter().map(|s| Value::String(s.into())).collect(),
            ))
        }
        _ => Ok(Value::String(
            base64::engine::general_purpose::STANDARD.encode(b),
        )),
    }
}

/// A DataSet: `{"columns": [...], "types": [...], "rows": [[...], ...]}`.
fn dataset(d: &DataSet) -> Result<Value, String> {
    let types: Vec<DataType> = d
        .types
        .iter()
        .map(|t| DataType::try_from(*t as i32).unwrap_or(DataType::Unknown))
        .collect();
    let mut rows = Vec::with_capacity(d.rows.len());
    for (r, row) in d.rows.iter().enumerate() {
        let mut out = Vec::with_capacity(row.elements.len());
        for (c, e) in row.elements.iter().enumerate() {
            let dt = types.get(c).copied().unwrap_or(DataType::Unknown);
            out.push(match &e.value {
                None => Value::Null,
                Some(data_set::data_set_value::Value::IntValue(x)) => int_value(u64::from(*x), dt),
                Some(data_set::data_set_value::Value::LongValue(x)) => int_value(*x, dt),
                Some(data_set::data_set_value::Value::FloatValue(x)) => {
                    float(f64::from(*x), Some(*x))
                }
                Some(data_set::data_set_value::Value::DoubleValue(x)) => float(*x, None),
                Some(data_set::data_set_value::Value::BooleanValue(x)) => Value::Bool(*x),
                Some(data_set::data_set_value::Value::StringValue(s)) => Value::String(s.clone()),
                Some(data_set::data_set_value::Value::ExtensionValue(_)) => {
                    return Err(format!(
                        "row {} column {} holds an extension value",
                        r + 1,
                        c + 1
                    ))
                }
            });
        }
        rows.push(Value::Array(out));
    }
    let types: Vec<&str> = types.iter().map(|t| t.as_str_name()).collect();
    Ok(json!({"columns": d.columns, "types": types, "rows": rows}))
}

/// A template instance: `{"template_ref", "version", "metrics": {...}, "parameters": {...}}`.
fn template_value(t: &Template) -> Result<Value, String> {
    let mut metrics = Map::new();
    for (k, m) in t.metrics.iter().enumerate() {
        let name = match (&m.name, m.alias) {
            (Some(n), _) => n.clone(),
            (None, Some(a)) => format!("alias {a}"),
            (None, None) => format!("metric {}", k + 1),
        };
        let v = metric_value(m, m.datatype.unwrap_or(0)).map_err(|e| format!("{name}: {e}"))?;
        metrics.insert(name, v);
    }
    let mut parameters = Map::new();
    for (k, p) in t.parameters.iter().enumerate() {
        let name = p
            .name
            .clone()
            .unwrap_or_else(|| format!("parameter {}", k + 1));
        let dt = DataType::try_from(p.r#type.unwrap_or(0) as i32).unwrap_or(DataType::Unknown);
        let v = match &p.value {
            None => Value::Null,
            Some(template::parameter::Value::IntValue(x)) => int_value(u64::from(*x), dt),
            Some(template::parameter::Value::LongValue(x)) => int_value(*x, dt),
            Some(template::parameter::Value::FloatValue(x)) => float(f64::from(*x), Some(*x)),
            Some(template::parameter::Value::DoubleValue(x)) => float(*x, None),
            Some(template::parameter::Value::BooleanValue(x)) => Value::Bool(*x),
            Some(template::parameter::Value::StringValue(s)) => Value::String(s.clone()),
            Some(template::parameter::Value::ExtensionValue(_)) => Value::Null,
        };
        parameters.insert(name, v);
    }
    let mut o = Map::new();
    if let Some(r) = &t.template_ref {
        o.insert("template_ref".into(), Value::String(r.clone()));
    }
    if let Some(v) = &t.version {
        o.insert("version".into(), Value::String(v.clone()));
    }
    o.insert("metrics".into(), Value::Object(metrics));
    if !parameters.is_empty() {
        o.insert("parameters".into(), Value::Object(parameters));
    }
    Ok(Value::Object(o))
}

/// The payload of a rebirth request (NCMD): `Node Control/Rebirth` = true, at `now_ms`.
pub fn rebirth_request(now_ms: u64) -> Vec<u8> {
    let mut m = Metric::new();
    m.set_name(REBIRTH_METRIC.to_string())
        .set_datatype(DataType::Boolean)
        .set_timestamp(now_ms);
    m.value = Some(metric::Value::BooleanValue(true));
    Payload {
        timestamp: Some(now_ms),
        metrics: vec![m],
        ..Payload::default()
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metric(name: Option<&str>, alias: Option<u64>, dt: DataType, v: metric::Value) -> Metric {
        let mut m = Metric::new();
        if let Some(n) = name {
            m.set_name(n.into());
        }
        if let Some(a) = alias {
            m.set_alias(a);
        }
        m.set_datatype(dt);
        m.value = Some(v);
        m
    }

    fn payload(ts: u64, seq: u64, metrics: Vec<Metric>) -> Bytes {
        Bytes::from(
            Payload {
                timestamp: Some(ts),
                metrics,
                seq: Some(seq),
                uuid: None,
                body: None,
            }
            .encode_to_vec(),
        )
    }

    fn text(u: &Unit) -> String {
        String::from_utf8_lossy(&u.payload).into_owned()
    }

    fn reason(u: &Unit) -> String {
        match &u.decoded {
            Some(Err(e)) => e.to_string(),
            other => format!("not refused: {other:?}"),
        }
    }

    fn birth(h: &mut Host) {
        let b = payload(
            1_700_000_000_000,
            0,
            vec![
                metric(
                    Some("bdSeq"),
                    None,
                    DataType::Int64,
                    metric::Value::LongValue(3),
                ),
                metric(
                    Some("Temp"),
                    Some(1),
                    DataType::Float,
                    metric::Value::FloatValue(21.5),
                ),
                metric(
                    Some("Offset"),
                    Some(2),
                    DataType::Int16,
                    metric::Value::IntValue(0xFFFF_FFFE),
                ),
            ],
        );
        let u = h.read("spBv1.0/plant/NBIRTH/edge1", &b, false);
        assert_eq!(u.len(), 1);
        assert_eq!(
            text(&u[0]),
            r#"{"Offset":-2,"Temp":21.5,"bdSeq":3}"#,
            "{u:?}"
        );
    }

    #[test]
    fn aliases_resolve_by_the_birth_and_values_read_by_their_datatype() {
        let mut h = Host::default();
        birth(&mut h);
        let d = payload(
            1_700_000_001_000,
            1,
            vec![
                metric(
                    None,
                    Some(1),
                    DataType::Float,
                    metric::Value::FloatValue(0.1),
                ),
                // Without its datatype: the birth's (Int16) reads it.
                {
                    let mut m = Metric::new();
                    m.set_alias(2);
                    m.value = Some(metric::Value::IntValue(65535));
                    m
                },
            ],
        );
        let u = h.read("spBv1.0/plant/NDATA/edge1", &d, false);
        assert_eq!(text(&u[0]), r#"{"Offset":-1,"Temp":0.1}"#);
        let Some(Ok(p)) = &u[0].decoded else {
            panic!("{u:?}")
        };
        assert_eq!(p.device_id.as_deref(), Some("plant/edge1"));
        assert_eq!(
            p.timestamp.as_ref().ok().copied().flatten(),
            DateTime::from_timestamp_millis(1_700_000_001_000)
        );
        assert_eq!(h.node("plant", "edge1").and_then(|n| n.seq), Some(1));
    }

    #[test]
    fn an_unknown_alias_a_gap_or_no_birth_is_refused_and_asks_for_a_rebirth() {
        let mut h = Host::default();
        let d = payload(
            1,
            0,
            vec![metric(
                None,
                Some(1),
                DataType::Float,
                metric::Value::FloatValue(1.0),
            )],
        );
        let u = h.read("spBv1.0/plant/NDATA/edge1", &d, false);
        assert!(reason(&u[0]).contains("no NBIRTH"), "{u:?}");
        assert_eq!(h.take_rebirths().len(), 1);
        birth(&mut h);
        let unknown = payload(
            2,
            1,
            vec![metric(
                None,
                Some(9),
                DataType::Float,
                metric::Value::FloatValue(1.0),
            )],
        );
        let u = h.read("spBv1.0/plant/NDATA/edge1", &unknown, false);
        assert!(reason(&u[0]).contains("alias 9"), "{u:?}");
        assert_eq!(h.take_rebirths(), vec![("plant".into(), "edge1".into())]);
        // seq 1 was read (refused for its alias, not lost): 3 skips 2.
        let gap = payload(
            3,
            3,
            vec![metric(
                None,
                Some(1),
                DataType::Float,
                metric::Value::FloatValue(1.0),
            )],
        );
        let u = h.read("spBv1.0/plant/NDATA/edge1", &gap, false);
        assert!(reason(&u[0]).contains("seq 3 after 1"), "{u:?}");
        // Until the rebirth, nothing of it is read.
        let next = payload(
            4,
            4,
            vec![metric(
                None,
                Some(1),
                DataType::Float,
                metric::Value::FloatValue(1.0),
            )],
        );
        let u = h.read("spBv1.0/plant/NDATA/edge1", &next, false);
        assert!(reason(&u[0]).contains("waiting for the rebirth"), "{u:?}");
        assert_eq!(h.take_rebirths().len(), 1);
        birth(&mut h);
        let ok = payload(
            5,
            1,
            vec![metric(
                None,
                Some(1),
                DataType::Float,
                metric::Value::FloatValue(2.0),
            )],
        );
        assert_eq!(
            text(&h.read("spBv1.0/plant/NDATA/edge1", &ok, false)[0]),
            r#"{"Temp":2.0}"#
        );
    }

    #[test]
    fn a_late_death_of_an_earlier_session_is_ignored() {
        let mut h = Host::default();
        birth(&mut h);
        let old = payload(
            5,
            0,
            vec![metric(
                Some("bdSeq"),
                None,
                DataType::Int64,
                metric::Value::LongValue(2),
            )],
        );
        assert!(h.read("spBv1.0/plant/NDEATH/edge1", &old, false).is_empty());
        assert!(h.node("plant", "edge1").is_some_and(|n| n.online));
        let now = payload(
            6,
            0,
            vec![metric(
                Some("bdSeq"),
                None,
                DataType::Int64,
                metric::Value::LongValue(3),
            )],
        );
        assert!(h.read("spBv1.0/plant/NDEATH/edge1", &now, false).is_empty());
        assert!(h.node("plant", "edge1").is_some_and(|n| !n.online));
        assert_eq!(h.online(), (0, 0));
    }

    #[test]
    fn arrays_datasets_and_templates_become_json() {
        let b = |dt, bytes: Vec<u8>| {
            let m = metric(Some("a"), None, dt, metric::Value::BytesValue(bytes));
            metric_value(&m, dt as u32)
        };
        assert_eq!(
            b(DataType::Int16Array, vec![0xFE, 0xFF, 2, 0]),
            Ok(serde_json::json!([-2, 2]))
        );
        assert_eq!(
            b(DataType::BooleanArray, vec![3, 0, 0, 0, 0b1010_0000]),
            Ok(serde_json::json!([true, false, true]))
        );
        assert_eq!(
            b(DataType::StringArray, b"ab\0\0c\0".to_vec()),
            Ok(serde_json::json!(["ab", "", "c"]))
        );
        assert_eq!(
            b(DataType::FloatArray, 0.1f32.to_le_bytes().to_vec()),
            Ok(serde_json::json!([0.1]))
        );
        assert!(b(DataType::Int32Array, vec![1, 2, 3]).is_err());
        let ds = DataSet {
            num_of_columns: Some(2),
            columns: vec!["n".into(), "ok".into()],
            types: vec![DataType::Int8 as u32, DataType::Boolean as u32],
            rows: vec![data_set::Row {
                elements: vec![
                    data_set::DataSetValue {
                        value: Some(data_set::data_set_value::Value::IntValue(255)),
                    },
                    data_set::DataSetValue {
                        value: Some(data_set::data_set_value::Value::BooleanValue(true)),
                    },
                ],
            }],
        };
        assert_eq!(
            dataset(&ds),
            Ok(
                serde_json::json!({"columns": ["n", "ok"], "types": ["Int8", "Boolean"], "rows": [[-1, true]]})
            )
        );
        assert_eq!(float(f64::NAN, None), Value::String("NaN".into()));
    }

    /// Templates as Ignition sends them: the definition in the birth (`_types_/Motor`) is a type,
    /// not a value, and is left out of the reading; an instance is its metrics by name (an
    /// alias-only one by its alias), nested templates within, and its parameters.
    #[test]
    fn a_template_instance_is_read_and_its_definition_left_out() {
        let template = |r: Option<&str>, definition: bool, metrics: Vec<Metric>| Template {
            version: Some("v1".into()),
            metrics,
            parameters: vec![template::Parameter {
                name: Some("Rated".into()),
                r#type: Some(DataType::Float as u32),
                value: Some(template::parameter::Value::FloatValue(7.5)),
            }],
            template_ref: r.map(Into::into),
            is_definition: Some(definition),
        };
        let rpm = |v| {
            metric(
                Some("RPM"),
                None,
                DataType::Int32,
                metric::Value::IntValue(v),
            )
        };
        let bearing = template(
            Some("Bearing"),
            false,
            vec![metric(
                Some("Temp"),
                None,
                DataType::Double,
                metric::Value::DoubleValue(61.25),
            )],
        );
        let definition = template(None, true, vec![rpm(0)]);
        let instance = template(
            Some("Motor"),
            false,
            vec![
                rpm(1500),
                metric(None, Some(9), DataType::Int8, metric::Value::IntValue(0xFF)),
                metric(
                    Some("Bearing"),
                    None,
                    DataType::Template,
                    metric::Value::TemplateValue(bearing),
                ),
            ],
        );
        let mut h = Host::default();
        let u = h.read(
            "spBv1.0/plant/NBIRTH/edge1",
            &payload(
                1_700_000_000_000,
                0,
                vec![
                    metric(
                        Some("bdSeq"),
                        None,
                        DataType::Int64,
                        metric::Value::LongValue(1),
                    ),
                    metric(
                        Some("_types_/Motor"),
                        None,
                        DataType::Template,
                        metric::Value::TemplateValue(definition),
                    ),
                    metric(
                        Some("Motor 1"),
                        Some(5),
                        DataType::Template,
                        metric::Value::TemplateValue(instance),
                    ),
                ],
            ),
            false,
        );
        assert_eq!(u.len(), 1, "{u:?}");
        let v: Value = serde_json::from_slice(&u[0].payload).expect("JSON");
        assert_eq!(
            v.get("_types_/Motor"),
            None,
            "a definition is no reading: {v}"
        );
        assert_eq!(
            v["Motor 1"],
            serde_json::json!({
                "template_ref": "Motor",
                "version": "v1",
                "metrics": {
                    "RPM": 1500,
                    "alias 9": -1,
                    "Bearing": {
                        "template_ref": "Bearing",
                        "version": "v1",
                        "metrics": {"Temp": 61.25},
                        "parameters": {"Rated": 7.5}
                    }
                },
                "parameters": {"Rated": 7.5}
            })
        );
    }

    #[test]
    fn every_array_datatype_reads_little_endian() {
        let b = |dt, bytes: Vec<u8>| {
            let m = metric(Some("a"), None, dt, metric::Value::BytesValue(bytes));
            metric_value(&m, dt as u32)
        };
        let le = |xs: &[u64], n: usize| -> Vec<u8> {
            xs.iter()
                .flat_map(|x| x.to_le_bytes()[..n].to_vec())
                .collect()
        };
        assert_eq!(
            b(DataType::Int8Array, vec![0x80, 1]),
            Ok(serde_json::json!([-128, 1]))
        );
        assert_eq!(
            b(DataType::UInt8Array, vec![0xFF, 0]),
            Ok(serde_json::json!([255, 0]))
        );
        assert_eq!(
            b(DataType::UInt16Array, le(&[65535, 2], 2)),
            Ok(serde_json::json!([65535, 2]))
        );
        assert_eq!(
            b(DataType::Int32Array, le(&[u64::from(u32::MAX), 7], 4)),
            Ok(serde_json::json!([-1, 7]))
        );
        assert_eq!(
            b(DataType::UInt32Array, le(&[u64::from(u32::MAX)], 4)),
            Ok(serde_json::json!([4_294_967_295u32]))
        );
        assert_eq!(
            b(DataType::Int64Array, le(&[u64::MAX], 8)),
            Ok(serde_json::json!([-1]))
        );
        assert_eq!(
            b(DataType::UInt64Array, le(&[u64::MAX], 8)),
            Ok(serde_json::json!([u64::MAX]))
        );
        assert_eq!(
            b(DataType::DoubleArray, 2.5f64.to_le_bytes().to_vec()),
            Ok(serde_json::json!([2.5]))
        );
        assert_eq!(
            b(DataType::DateTimeArray, le(&[1_700_000_000_500], 8)),
            Ok(serde_json::json!(["2023-11-14T22:13:20.500Z"]))
        );
        assert_eq!(
            b(DataType::File, vec![1, 2, 3]),
            Ok(serde_json::json!("AQID"))
        );
        assert_eq!(
            b(DataType::Bytes, vec![0xFF]),
            Ok(serde_json::json!("/w=="))
        );
        let at = metric(
            Some("at"),
            None,
            DataType::DateTime,
            metric::Value::LongValue(1_700_000_000_500),
        );
        assert_eq!(
            metric_value(&at, DataType::DateTime as u32),
            Ok(serde_json::json!("2023-11-14T22:13:20.500Z"))
        );
        assert!(b(DataType::UInt64Array, vec![0; 12]).is_err());
        assert!(b(DataType::BooleanArray, vec![9, 0, 0, 0, 0xFF]).is_err());
    }

    #[test]
    fn a_metric_sent_twice_is_read_at_each_of_its_instants() {
        let mut h = Host::default();
        birth(&mut h);
        let mut a = metric(
            None,
            Some(1),
            DataType::Float,
            metric::Value::FloatValue(1.0),
        );
        a.set_timestamp(1_700_000_000_500);
        let mut b = metric(
            None,
            Some(1),
            DataType::Float,
            metric::Value::FloatValue(2.0),
        );
        b.set_timestamp(1_700_000_000_600);
        let u = h.read(
            "spBv1.0/plant/NDATA/edge1",
            &payload(1_700_000_001_000, 1, vec![a, b]),
            false,
        );
        assert_eq!(u.len(), 2, "{u:?}");
        assert_eq!(
            text(&u[0]),
            r#"{"$timestamps":{"Temp":"2023-11-14T22:13:20.500Z"},"Temp":1.0}"#
        );
        assert_eq!(text(&u[1]), r#"{"Temp":2.0}"#);
    }

    #[test]
    fn topics_and_payloads_that_are_not_sparkplug_are_refused() {
        let mut h = Host::default();
        let u = h.read("spBv1.0/plant/NOPE/edge1", &Bytes::from_static(b"x"), false);
        assert!(
            reason(&u[0]).contains("not a Sparkplug message type"),
            "{u:?}"
        );
        let u = h.read(
            "spBv1.0/plant/NDATA/edge1",
            &Bytes::from_static(b"\xff\xff"),
            false,
        );
        assert!(reason(&u[0]).contains("not a Sparkplug B payload"), "{u:?}");
        assert!(h
            .read("spBv1.0/STATE/host", &Bytes::from_static(b"{}"), false)
            .is_empty());
        assert!(h
            .read("spBv1.0/plant/NCMD/edge1", &Bytes::new(), false)
            .is_empty());
    }

    // An outside review's cases (each failed before its fix).

    // ---- review 22 (outside reviewer): each of these fails on 2aa03f1 ----

    fn ok(u: &Unit) -> bool {
        matches!(u.decoded, Some(Ok(_)))
    }

    fn ts_of(u: &Unit) -> Option<DateTime<Utc>> {
        match &u.decoded {
            Some(Ok(p)) => p.timestamp.as_ref().ok().copied().flatten(),
            _ => None,
        }
    }

    /// R22-A: a QoS 1 message the broker delivers again (its PUBACK was not written before the
    /// connection dropped, or the leader died between recording the state and acking) is not a
    /// sequence gap: the node must not turn stale and refuse everything until a rebirth.
    #[test]
    fn r22_a_redelivered_message_is_not_a_sequence_gap() {
        let mut h = Host::default();
        birth(&mut h);
        let d = |seq: u64| {
            payload(
                1_700_000_001_000 + seq,
                seq,
                vec![metric(
                    None,
                    Some(1),
                    DataType::Float,
                    metric::Value::FloatValue(1.0),
                )],
            )
        };
        let first = d(1);
        assert!(ok(&h.read("spBv1.0/plant/NDATA/edge1", &first, false)[0]));
        let again = h.read("spBv1.0/plant/NDATA/edge1", &first, true);
        let next = h.read("spBv1.0/plant/NDATA/edge1", &d(2), false);
        assert!(
            ok(&next[0]),
            "the redelivery read as {:?}; the next message as {:?}",
            again[0].decoded,
            next[0].decoded
        );
    }

    /// A reconnect under a backlog: the broker redelivers every unacknowledged QoS 1 message,
    /// DUP-flagged, in order — here 201 of one edge node, more than half of the 256 sequence
    /// numbers behind the last one read. Each is known by its topic, packet id and bytes and
    /// skipped (it was read, and its batch committed, before); none is a sequence gap, and the
    /// next new message follows the last one read. (Failed before: the first redelivery, seq
    /// 144 after 88, was a gap.)
    #[test]
    fn a_backlog_redelivered_after_a_reconnect_is_not_a_sequence_gap() {
        let mut h = Host::default();
        birth(&mut h);
        let d = |seq: u64| {
            payload(
                1_700_000_001_000 + seq,
                seq % 256,
                vec![metric(
                    None,
                    Some(1),
                    DataType::Float,
                    metric::Value::FloatValue(seq as f32),
                )],
            )
        };
        let topic = "spBv1.0/plant/NDATA/edge1";
        for k in 1..=600u64 {
            let u = h.read_delivery(topic, &d(k), false, k as u16);
            assert!(ok(&u[0]), "{k}: {:?}", u[0].decoded);
        }
        for k in 400..=600u64 {
            let u = h.read_delivery(topic, &d(k), true, k as u16);
            assert!(
                u.is_empty(),
                "redelivery {k}: {:?}",
                u.first().map(|u| &u.decoded)
            );
        }
        assert_eq!(h.redeliveries_skipped(), 201);
        assert_eq!(
            h.node("plant", "edge1").and_then(|n| n.seq),
            Some((600 % 256) as u8)
        );
        let u = h.read_delivery(topic, &d(601), false, 601);
        assert!(ok(&u[0]), "{:?}", u[0].decoded);
        // A DUP message never read (other bytes) is still judged by its sequence number.
        let other = payload(1, 200, vec![]);
        let u = h.read_delivery(topic, &other, true, 456);
        assert!(!ok(&u[0]), "an unknown message out of sequence is a gap");
    }

    /// Two births within the redelivered backlog (a rebirth this host asked for, say): the
    /// older session's NBIRTH, DBIRTH and data come again after the reconnect and are skipped,
    /// not applied again — the births in force stay the newest, and live data goes on.
    #[test]
    fn births_redelivered_after_a_reconnect_are_not_applied_again() {
        let mut h = Host::default();
        let nbirth = |bd: u64| {
            payload(
                1_700_000_000_000 + bd,
                0,
                vec![
                    metric(
                        Some("bdSeq"),
                        None,
                        DataType::Int64,
                        metric::Value::LongValue(bd),
                    ),
                    metric(
                        Some("t"),
                        Some(1),
                        DataType::Float,
                        metric::Value::FloatValue(0.0),
                    ),
                ],
            )
        };
        let ndata = |seq: u64, v: f32| {
            payload(
                1_700_000_001_000 + seq,
                seq % 256,
                vec![metric(
                    None,
                    Some(1),
                    DataType::Float,
                    metric::Value::FloatValue(v),
                )],
            )
        };
        let (nb, nd) = ("spBv1.0/plant/NBIRTH/edge1", "spBv1.0/plant/NDATA/edge1");
        let mut sent: Vec<(&str, Bytes, u16)> = Vec::new();
        let mut pkid = 0u16;
        let mut send = |h: &mut Host, topic: &'static str, p: Bytes| {
            pkid += 1;
            let u = h.read_delivery(topic, &p, false, pkid);
            sent.push((topic, p, pkid));
            u
        };
        send(&mut h, nb, nbirth(1));
        for k in 1..=200 {
            send(&mut h, nd, ndata(k, k as f32));
        }
        send(&mut h, nb, nbirth(2));
        for k in 1..=200 {
            let u = send(&mut h, nd, ndata(k, 1000.0 + k as f32));
            assert!(ok(&u[0]), "{:?}", u[0].decoded);
        }
        for (topic, p, id) in &sent {
            assert!(
                h.read_delivery(topic, p, true, *id).is_empty(),
                "{topic} {id}"
            );
        }
        assert_eq!(h.node("plant", "edge1").and_then(|n| n.bd_seq), Some(2));
        let u = h.read_delivery(nd, &ndata(201, 1201.0), false, 9999);
        assert!(ok(&u[0]), "live data after the backlog: {:?}", u[0].decoded);
    }

    /// R22-B: the state the writer records after the batch (jsonb) never holds U+0000, which
    /// PostgreSQL's jsonb refuses (the writer would retry that statement forever).
    #[test]
    fn r22_the_state_to_record_never_holds_a_nul() {
        let mut h = Host::default();
        let b = payload(
            1_700_000_000_000,
            0,
            vec![metric(
                Some("bad\u{0}name"),
                Some(1),
                DataType::Int32,
                metric::Value::IntValue(1),
            )],
        );
        let u = h.read("spBv1.0/plant/NBIRTH/edge1", &b, false);
        assert!(!ok(&u[0]), "the reading itself is refused: {u:?}");
        for (_, _, n) in h.take_changes() {
            let m = serde_json::to_string(&n.metrics).unwrap();
            let d = serde_json::to_string(&n.devices).unwrap();
            assert!(
                !m.contains("\\u0000") && !d.contains("\\u0000"),
                "to record as jsonb: metrics {m} devices {d}"
            );
        }
    }

    /// R22-C: a metric sent twice, its second value at the payload's own time (the last sample
    /// of a store-and-forward flush): two readings of one device and topic at one instant, the
    /// second a `conflict` dead letter.
    #[test]
    fn r22_readings_of_one_message_never_share_a_timestamp() {
        let mut h = Host::default();
        birth(&mut h);
        let t = 1_700_000_001_000;
        let mut a = metric(
            None,
            Some(1),
            DataType::Float,
            metric::Value::FloatValue(1.0),
        );
        a.set_timestamp(t - 100);
        let mut b = metric(
            None,
            Some(1),
            DataType::Float,
            metric::Value::FloatValue(2.0),
        );
        b.set_timestamp(t);
        let u = h.read(
            "spBv1.0/plant/NDATA/edge1",
            &payload(t, 1, vec![a, b]),
            false,
        );
        assert_eq!(u.len(), 2, "{u:?}");
        assert_ne!(
            ts_of(&u[0]),
            ts_of(&u[1]),
            "{} and {} at one instant",
            text(&u[0]),
            text(&u[1])
        );
    }

    /// R22-D: a birth that gives one alias to two metrics: data by that alias is not guessed.
    #[test]
    fn r22_an_alias_defined_twice_is_not_guessed() {
        let mut h = Host::default();
        let b = payload(
            1,
            0,
            vec![
                metric(
                    Some("inlet"),
                    Some(7),
                    DataType::Float,
                    metric::Value::FloatValue(1.0),
                ),
                metric(
                    Some("outlet"),
                    Some(7),
                    DataType::Float,
                    metric::Value::FloatValue(2.0),
                ),
            ],
        );
        h.read("spBv1.0/plant/NBIRTH/edge1", &b, false);
        let d = payload(
            2,
            1,
            vec![metric(
                None,
                Some(7),
                DataType::Float,
                metric::Value::FloatValue(3.0),
            )],
        );
        let u = h.read("spBv1.0/plant/NDATA/edge1", &d, false);
        assert!(!ok(&u[0]), "alias 7 read as {}", text(&u[0]));
    }

    /// R22-E: a DBIRTH that is refused leaves the device's previous aliases in force: the
    /// next DDATA is read by the old birth (and no rebirth is asked).
    #[test]
    fn r22_a_refused_dbirth_does_not_leave_the_old_aliases_in_force() {
        let mut h = Host::default();
        birth(&mut h);
        let t = "spBv1.0/plant/DBIRTH/edge1/pump1";
        let u = h.read(
            t,
            &payload(
                2,
                1,
                vec![metric(
                    Some("temp"),
                    Some(50),
                    DataType::Float,
                    metric::Value::FloatValue(1.0),
                )],
            ),
            false,
        );
        assert!(ok(&u[0]));
        // Born again: alias 50 is now "pressure"; one metric lacks its name.
        let nameless = metric(
            None,
            Some(51),
            DataType::Float,
            metric::Value::FloatValue(0.0),
        );
        let u = h.read(
            t,
            &payload(
                3,
                2,
                vec![
                    metric(
                        Some("pressure"),
                        Some(50),
                        DataType::Float,
                        metric::Value::FloatValue(9.0),
                    ),
                    nameless,
                ],
            ),
            false,
        );
        assert!(!ok(&u[0]));
        let d = h.read(
            "spBv1.0/plant/DDATA/edge1/pump1",
            &payload(
                4,
                3,
                vec![metric(
                    None,
                    Some(50),
                    DataType::Float,
                    metric::Value::FloatValue(9.5),
                )],
            ),
            false,
        );
        assert!(!ok(&d[0]), "read by the previous DBIRTH: {}", text(&d[0]));
    }

    /// R22-F: a reading is not many times the size of its message (G5: memory bounded in
    /// bytes). A BooleanArray of a 256 KiB message becomes ~12 MB of JSON.
    #[test]
    fn r22_a_reading_is_not_many_times_its_message() {
        let n_bytes = 256 * 1024 - 64;
        let mut bytes = ((n_bytes * 8) as u32).to_le_bytes().to_vec();
        bytes.extend(std::iter::repeat_n(0u8, n_bytes));
        let raw = payload(
            1_700_000_000_000,
            0,
            vec![metric(
                Some("b"),
                None,
                DataType::BooleanArray,
                metric::Value::BytesValue(bytes),
            )],
        );
        let u = read_alone("spBv1.0/plant/NDATA/edge1", &raw);
        assert!(
            u[0].payload.len() <= 4 * raw.len(),
            "a {} byte message became a {} byte reading",
            raw.len(),
            u[0].payload.len()
        );
    }

    /// R22-G: times past the year 9999 (a timestamp in microseconds, a common edge-node bug)
    /// are refused as the JSON and SenML formats refuse them, not stored as the year 55,000.
    #[test]
    fn r22_a_time_past_the_year_9999_is_refused() {
        let mut h = Host::default();
        birth(&mut h);
        let us = 1_700_000_001_000_000; // microseconds
        let mut m = metric(
            None,
            Some(1),
            DataType::Float,
            metric::Value::FloatValue(1.0),
        );
        m.set_timestamp(us - 5);
        let u = h.read("spBv1.0/plant/NDATA/edge1", &payload(us, 1, vec![m]), false);
        assert!(!ok(&u[0]), "stored at {:?}: {}", ts_of(&u[0]), text(&u[0]));
    }

    /// R22-H: a device born with a far-future timestamp: its recorded state loads back, and
    /// its birth_at is text PostgreSQL reads as timestamptz (`leasehold status`).
    #[test]
    fn r22_a_far_future_birth_is_recorded_as_text_postgres_reads() {
        let mut h = Host::default();
        birth(&mut h);
        h.read(
            "spBv1.0/plant/DBIRTH/edge1/pump1",
            &payload(
                1_700_000_000_000_000,
                1,
                vec![metric(
                    Some("temp"),
                    Some(50),
                    DataType::Float,
                    metric::Value::FloatValue(1.0),
                )],
            ),
            false,
        );
        let (_, _, n) = h.take_changes().pop().unwrap();
        let v = serde_json::to_value(&n.devices).unwrap();
        let back: BTreeMap<String, Device> = serde_json::from_value(v.clone()).expect("loads back");
        assert_eq!(back, n.devices);
        let at = v["pump1"]["birth_at"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(!at.starts_with('+'), "devices jsonb holds birth_at {at:?}");
    }
}
