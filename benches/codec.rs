//! Batch encode + decode for none / lz4 / zstd on a realistic payload (128-byte entries of structured,
//! partly repetitive text), at several batch sizes. Throughput is in raw entry bytes; the compression
//! ratio is printed once per case.
//!
//! Run: `cargo bench --bench codec`

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use walship::codec::{BatchDecoder, BatchEncoder, Compression, FrameLimits};
use walship::entry::Entry;
use walship::payload::PayloadGen;
use walship::{Epoch, NodeId, Seq, SpaceId};

fn entries(n: usize, entry_bytes: usize) -> Vec<Entry> {
    let mut gen = PayloadGen::new(42, entry_bytes);
    (0..n)
        .map(|i| Entry::new(Seq(1 + i as u64), Epoch(1), 1_700_000_000_000_000 + i as u64, 1, gen.next_payload()))
        .collect()
}

fn bench(c: &mut Criterion) {
    let space = SpaceId::new("bench-space").unwrap();
    for batch_bytes in [1024usize, 16 * 1024, 64 * 1024] {
        let n = (batch_bytes / 128).max(1);
        let es = entries(n, 128);
        let raw: usize = es.iter().map(|e| e.payload.len()).sum();
        let mut group = c.benchmark_group(format!("batch_{}k", batch_bytes / 1024));
        group.throughput(Throughput::Bytes(raw as u64));
        group.measurement_time(std::time::Duration::from_secs(3)).warm_up_time(std::time::Duration::from_secs(1));
        for comp in [Compression::None, Compression::Lz4, Compression::zstd()] {
            let name = match comp {
                Compression::None => "none".to_string(),
                Compression::Lz4 => "lz4".to_string(),
                Compression::Zstd { level } => format!("zstd{level}"),
            };
            let mut enc = BatchEncoder::new(NodeId(1), comp).with_min_compress_bytes(0);
            let frame: Bytes = enc.encode(&space, &es).unwrap();
            eprintln!(
                "batch_{}k/{name}: {} entries, {raw} raw entry bytes -> {} frame bytes, ratio {:.2}",
                batch_bytes / 1024,
                es.len(),
                frame.len(),
                raw as f64 / frame.len() as f64
            );
            group.bench_with_input(BenchmarkId::new("encode", &name), &es, |b, es| {
                b.iter(|| enc.encode(&space, es).unwrap())
            });
            let mut dec = BatchDecoder::new(FrameLimits::default());
            group.bench_with_input(BenchmarkId::new("decode", &name), &frame, |b, f| {
                b.iter(|| dec.decode(f.clone()).unwrap())
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
