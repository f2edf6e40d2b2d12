//! Decoder micro-benchmark: the per-message CPU cost on the hot path.

use std::hint::black_box;

use chrono::Utc;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use leasehold_decode::Decoder;

fn bench(c: &mut Criterion) {
    let d = Decoder::new("devices/{device_id}/#", 256 * 1024);
    let now = Utc::now();
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    let typical = br#"{"device_id":"dev-001","run":"r","seq":123456,"timestamp":"2026-11-23T01:02:03.456789Z","value":42.5,"voltage":229.8,"current":4.12}"#;
    g.bench_function("rfc3339_timestamp", |b| {
        b.iter(|| {
            d.decode(
                black_box("devices/dev-001/telemetry"),
                black_box(typical),
                now,
            )
        })
    });
    // What `telemetry`'s rows take from a payload (`make bench`'s messages).
    let bench = br#"{"device_id":"dev-001","run":"default-1","seq":12345,"ts":1796700000.123456}"#;
    g.bench_function("light_read", |b| {
        b.iter(|| d.parse_light(black_box("devices/dev-001/telemetry"), black_box(bench)))
    });
    let epoch = br#"{"ts":1700000000123,"value":42.5}"#;
    g.bench_function("epoch_millis", |b| {
        b.iter(|| {
            d.decode(
                black_box("devices/dev-001/telemetry"),
                black_box(epoch),
                now,
            )
        })
    });
    let no_ts = br#"{"value":42.5,"state":"charging"}"#;
    g.bench_function("no_timestamp_content_hash", |b| {
        b.iter(|| {
            d.decode(
                black_box("devices/dev-001/telemetry"),
                black_box(no_ts),
                now,
            )
        })
    });
    g.bench_function("malformed", |b| {
        b.iter(|| {
            d.decode(
                black_box("devices/dev-001/telemetry"),
                black_box(b"not json"),
                now,
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
