"""A Sparkplug B edge node driven line by line, built on pysparkplug (a published Sparkplug
library nobody in this project wrote): the end-to-end tests in tests/e2e/sparkplug.rs start it,
send it commands on stdin and read what happened on stdout.

Births, deaths and the metrics' protobuf encoding are pysparkplug's. Data is sent by alias only
(pysparkplug's EdgeNode.update always adds names), through pysparkplug's own Client, payload and
Metric classes. The edge node answers rebirth requests (NCMD Node Control/Rebirth) with new
births, and stores and forwards: while the primary host's STATE is offline it keeps its data,
and sends it, marked historical, once the host is online again.

Commands (one per line; each is answered "ok <command>" once done):
  connect                 connect: NBIRTH and DBIRTH, every metric with its alias
  ndata K                 K NDATA messages, by alias
  ddata K                 K DDATA messages of the device, by alias (held while the host is offline)
  ddata_at_once K START   K DDATA messages (values of START on) all with one timestamp, as a
                          device reporting twice within a millisecond does; each one metric
                          more than the one before
  gap                     the next data message skips one sequence number
  unknown_alias           a DDATA naming alias 999, which no birth defined
  ddeath                  the device dies (DDEATH)
  wait_state online|offline   until the host's STATE says so (retained, on spBv1.0/STATE/<host>)
  quit                    NDEATH and disconnect
Events, printed when they happen:
  rebirth <n>             the n-th rebirth request arrived; births published again
  state online|offline <timestamp>
"""

import argparse
import queue
import sys
import threading
import time
import uuid

import pysparkplug as sp

DEVICE_METRICS = [
    ("temperature", 1, sp.DataType.FLOAT, 21.5),
    ("pressure", 2, sp.DataType.DOUBLE, 1.25),
    ("count", 3, sp.DataType.UINT64, 2**63 + 1),
    ("offset", 4, sp.DataType.INT8, -5),
    ("delta", 5, sp.DataType.INT16, -300),
    ("level", 6, sp.DataType.INT32, -70000),
    ("total", 7, sp.DataType.INT64, -(2**40)),
    ("mode", 8, sp.DataType.UINT8, 200),
    ("port", 9, sp.DataType.UINT16, 60000),
    ("serial", 10, sp.DataType.UINT32, 4000000000),
    ("running", 11, sp.DataType.BOOLEAN, True),
    ("label", 12, sp.DataType.STRING, "pump A"),
    ("note", 13, sp.DataType.TEXT, "line\nbreak"),
    ("id", 14, sp.DataType.UUID, "6f1c7a52-8f6b-4d7e-9a51-2c1f0d3e4b5a"),
    ("blob", 15, sp.DataType.BYTES, b"\x00\x01\xfe"),
    ("samples", 16, sp.DataType.INT16_ARRAY, (-1, 2, 300)),
    ("curve", 17, sp.DataType.FLOAT_ARRAY, (0.5, -1.25)),
    ("flags", 18, sp.DataType.BOOLEAN_ARRAY, (True, False, True, True, False, False, False, False, True)),
    ("names", 19, sp.DataType.STRING_ARRAY, ("a", "bc")),
    ("nothing", 20, sp.DataType.DOUBLE, None),
    # A metric named like the reading's own time: a metric, not the reading's timestamp.
    ("timestamp", 21, sp.DataType.INT64, 5),
]
NODE_METRICS = [
    ("uptime", 101, sp.DataType.UINT32, 0),
    ("Node Control/Rebirth", 102, sp.DataType.BOOLEAN, False),
]


def metric(name, alias, dtype, value, ts, named=True, historical=False):
    return sp.Metric(
        timestamp=ts,
        name=name if named else None,
        datatype=dtype,
        value=value,
        alias=alias,
        is_historical=historical,
        is_null=value is None,
    )


_SAY = threading.Lock()


def say(*words):
    # One write per line: paho's thread and the main loop both speak.
    with _SAY:
        sys.stdout.write(" ".join(str(w) for w in words) + "\n")
        sys.stdout.flush()


class Node:
    def __init__(self, args):
        self.args = args
        self.cmds = queue.Queue()
        self.rebirths = 0
        self.skip = False
        self.held = []
        self.state = None
        self.state_changed = threading.Condition()
        now = sp.get_current_timestamp()
        self.device = sp.Device(
            args.device,
            metrics=[metric(n, a, t, v, now) for n, a, t, v in DEVICE_METRICS],
        )
        self.edge = sp.EdgeNode(
            args.group,
            args.node,
            metrics=[metric(n, a, t, v, now) for n, a, t, v in NODE_METRICS],
            client=sp.Client(client_id=f"edge-{args.node}-{uuid.uuid4().hex[:8]}"),
            cmd_callback=self.on_ncmd,
        )
        self.edge.register(self.device)
        # pysparkplug's EdgeNode marks itself connected before its connect callback publishes
        # the births: "connect" waits for the DBIRTH itself, or data would go out before it.
        self.birthed = threading.Event()
        client_publish = self.edge._client.publish

        def publish(message, **kw):
            client_publish(message, **kw)
            if message.topic.message_type == sp.MessageType.DBIRTH and message.topic.device_id == args.device:
                self.birthed.set()

        self.edge._client.publish = publish
        # The primary host's STATE, watched from the start (before the edge node is born, as a
        # Sparkplug 3.0 edge node waits for its host) on a connection of its own.
        self.watch = sp.Client(client_id=f"state-{args.node}-{uuid.uuid4().hex[:8]}")
        self.watch.subscribe(
            sp.Topic(message_type=sp.MessageType.STATE, sparkplug_host_id=args.host),
            sp.QoS.AT_LEAST_ONCE,
            self.on_state,
        )
        self.watch.connect(args.host_addr, port=args.port, blocking=False)

    def on_ncmd(self, _edge, message):
        for m in message.payload.metrics:
            if m.name == "Node Control/Rebirth" and m.value:
                # Not in paho's thread: the main loop publishes the births.
                self.cmds.put("rebirth")

    def on_state(self, _client, message):
        p = message.payload
        with self.state_changed:
            self.state = "online" if p.online else "offline"
            self.state_changed.notify_all()
        say("state", self.state, p.timestamp)
        if p.online:
            self.cmds.put("forward")

    def seq(self):
        if self.skip:
            self.skip = False
            self.edge._seq  # one number never sent
        return self.edge._seq

    def publish(self, kind, payload, device=None):
        topic = sp.Topic(
            message_type=kind,
            group_id=self.args.group,
            edge_node_id=self.args.node,
            device_id=device,
        )
        self.edge._client.publish(
            sp.Message(topic=topic, payload=payload, qos=sp.QoS.AT_MOST_ONCE, retain=False),
            include_dtypes=True,
        )

    def data(self, k, ts, historical=False, n=3):
        metrics = tuple(
            metric(None, a, t, value_of(t, v, k), ts, named=False, historical=historical)
            for _, a, t, v in DEVICE_METRICS[:n]
        )
        return metrics

    def rebirth(self):
        # What EdgeNode does on connect: NBIRTH (seq 0, with bdSeq), then the DBIRTH.
        self.rebirths += 1
        e = self.edge
        e._EdgeNode__seq_cycler = __import__("itertools").cycle(range(256))
        now = sp.get_current_timestamp()
        self.publish(
            sp.MessageType.NBIRTH,
            sp.NBirth(timestamp=now, seq=e._seq, metrics=(*e.metrics.values(), e._bd_seq_metric)),
        )
        self.publish(
            sp.MessageType.DBIRTH,
            sp.DBirth(timestamp=now, seq=e._seq, metrics=tuple(self.device.metrics.values())),
            device=self.args.device,
        )
        say("rebirth", self.rebirths)

    def run(self):
        threading.Thread(target=self.read_stdin, daemon=True).start()
        while True:
            line = self.cmds.get()
            words = line.split()
            if not words:
                continue
            cmd, rest = words[0], words[1:]
            if cmd == "connect":
                self.birthed.clear()
                self.edge.connect(self.args.host_addr, port=self.args.port, blocking=False)
                if not self.birthed.wait(10):
                    say("timeout", line)
                    sys.exit(1)
            elif cmd == "rebirth":
                self.rebirth()
                continue
            elif cmd == "forward":
                held, self.held = self.held, []
                for k, ts in held:
                    self.publish(
                        sp.MessageType.DDATA,
                        sp.DData(timestamp=ts, seq=self.seq(), metrics=self.data(k, ts, historical=True)),
                        device=self.args.device,
                    )
                if held:
                    say("forwarded", len(held))
                continue
            elif cmd == "ndata":
                for k in range(int(rest[0])):
                    now = sp.get_current_timestamp()
                    m = (metric(None, 101, sp.DataType.UINT32, k, now, named=False),)
                    self.publish(sp.MessageType.NDATA, sp.NData(timestamp=now, seq=self.seq(), metrics=m))
                    time.sleep(0.002)
            elif cmd == "ddata":
                start = int(rest[1]) if len(rest) > 1 else 0
                for k in range(start, start + int(rest[0])):
                    now = sp.get_current_timestamp()
                    if self.state == "offline":
                        self.held.append((k, now))
                    else:
                        self.publish(
                            sp.MessageType.DDATA,
                            sp.DData(timestamp=now, seq=self.seq(), metrics=self.data(k, now)),
                            device=self.args.device,
                        )
                    time.sleep(0.002)
            elif cmd == "ddata_at_once":
                now = sp.get_current_timestamp()
                start = int(rest[1])
                for i in range(int(rest[0])):
                    metrics = self.data(start + i, now, n=3 + i)
                    self.publish(
                        sp.MessageType.DDATA,
                        sp.DData(timestamp=now, seq=self.seq(), metrics=metrics),
                        device=self.args.device,
                    )
            elif cmd == "gap":
                self.skip = True
            elif cmd == "unknown_alias":
                now = sp.get_current_timestamp()
                m = (metric(None, 999, sp.DataType.DOUBLE, 1.0, now, named=False),)
                self.publish(sp.MessageType.DDATA, sp.DData(timestamp=now, seq=self.seq(), metrics=m), device=self.args.device)
            elif cmd == "ddeath":
                self.edge.deregister(self.args.device)
            elif cmd == "wait_state":
                with self.state_changed:
                    ok = self.state_changed.wait_for(lambda: self.state == rest[0], timeout=60)
                if not ok:
                    say("timeout", line)
                    sys.exit(1)
            elif cmd == "quit":
                if self.edge._connected:
                    self.edge.disconnect()
                self.watch.disconnect()
                say("ok", line)
                return
            say("ok", line)

    def read_stdin(self):
        for line in sys.stdin:
            self.cmds.put(line.strip())
        self.cmds.put("quit")


def value_of(dtype, v, k):
    # Data values that say which message they came from.
    if dtype == sp.DataType.FLOAT:
        return float(k) + 0.5
    if dtype == sp.DataType.DOUBLE:
        return k * 2.0
    if dtype == sp.DataType.UINT64:
        return 2**63 + k
    return v


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host-addr", default="127.0.0.1")
    p.add_argument("--group", default="plant")
    p.add_argument("--node", default="edge1")
    p.add_argument("--device", default="pump1")
    p.add_argument("--host", required=True, help="the primary host id whose STATE is watched")
    Node(p.parse_args()).run()


if __name__ == "__main__":
    main()
