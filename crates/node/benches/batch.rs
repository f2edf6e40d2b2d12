//! Batch builder micro-benchmark: turning a batch of received messages into the rows and dead
//! letters of one write (decode every message, place receipt times on the database clock,
//! settle duplicates and conflicts inside the batch).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use leasehold_decode::Decoder;
use leasehold_ingest::Inbound;
use leasehold_node::batch::{prepare, DbClock, Routing};

fn batch(n: usize, bad_every: usize) -> Vec<Inbound> {
    (0..n)
        .map(|i| {
            let topic = format!("devices/dev-{:03}/telemetry", i % 100);
            let body = if bad_every > 0 && i % bad_every == 0 {
                "not json".to_string()
            } else {
                format!(r#"{{"device_id":"dev-{:03}","seq":{i},"timestamp":"2026-11-23T01:02:03.{:06}Z","value":42.5}}"#, i % 100, i % 1_000_000)
            };
            Inbound::detached(&topic, body.as_bytes())
        })
        .collect()
}

fn run(d: &Decoder, msgs: &[Inbound]) -> leasehold_node::batch::Prepared {
    let mut clock = DbClock::new(chrono::Utc::now(), std::time::Instant::now());
    let telemetry = [leasehold_store::routes::ResolvedRoute::telemetry()];
    let no_routes = Routing {
        routes: &telemetry,
        written_by: "bench",
        lease_epoch: 1,
        suspended: &[],
        redelivery_window: std::time::Duration::from_secs(3600),
    };
    prepare(d, msgs, &mut clock, 256 * 1024, no_routes)
}

fn bench(c: &mut Criterion) {
    let d = Decoder::new("devices/{device_id}/#", 256 * 1024);
    let mut g = c.benchmark_group("batch");
    for n in [100usize, 1000] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("decode_batch_{n}"), |b| {
            b.iter_batched(
                || batch(n, 0),
                |msgs| black_box(run(&d, &msgs)).rows.len(),
                BatchSize::LargeInput,
            )
        });
    }
    g.throughput(Throughput::Elements(1000));
    g.bench_function("decode_batch_1000_with_1pct_bad", |b| {
        b.iter_batched(
            || batch(1000, 100),
            |msgs| black_box(run(&d, &msgs)).dead.len(),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
