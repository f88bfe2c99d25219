//! Attention over the paged KV cache: ms per call, effective GFLOP/s and cache GB/s.
//!
//! `cargo bench -p tiefsee-kernels --bench attention [-- FILTER]` runs the cases whose name contains
//! FILTER; `TIEFSEE_ISA=scalar` runs the scalar reference kernel instead. Each case reports the best of several repetitions (the machine is shared).

use std::time::Instant;

use tiefsee_kernels::attention::{CacheFormat, RowLayout, RowPool, attend};
use tiefsee_kernels::cpu;

/// A small deterministic generator (xorshift64*), uniform floats in [-1, 1).
struct Rng(u64);

impl Rng {
    fn float(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

struct Case {
    name: &'static str,
    layout: RowLayout,
    heads: usize,
    keys: usize,
    n: usize,
}

fn bench(case: &Case, format: CacheFormat, rng: &mut Rng) {
    let width = case.layout.width();
    // twice the slots the sequence needs, the sequence on every other one, as a paged cache would be
    let mut pool = RowPool::new(format, 2 * case.keys, width).expect("pool");
    let mut row = vec![0.0; width];
    for slot in 0..pool.slots() {
        row.iter_mut().for_each(|x| *x = rng.float());
        pool.write(slot, &row).expect("row");
    }
    let slots: Vec<usize> = (0..case.keys).map(|p| 2 * p).collect();
    let (kw, vw) = (case.layout.key_width, case.layout.value_width);
    let queries: Vec<f32> = (0..case.n * case.heads * kw).map(|_| rng.float()).collect();
    let mut out = vec![0.0; case.n * case.heads * vw];
    let start = case.keys - case.n;
    let scale = 1.0 / (kw as f32).sqrt();
    let mut call = || {
        attend(
            &pool,
            case.layout,
            &slots,
            &queries,
            case.heads,
            start,
            scale,
            &mut out,
        )
        .expect("attend")
    };

    call();
    let mut best = f64::INFINITY;
    let budget = Instant::now();
    let mut reps = 0;
    while reps < 5 || (budget.elapsed().as_secs_f64() < 2.0 && reps < 200) {
        let t = Instant::now();
        call();
        best = best.min(t.elapsed().as_secs_f64());
        reps += 1;
    }
    let seen: usize = (0..case.n).map(|i| start + i + 1).sum();
    let flops = 2.0 * (seen * case.heads * (kw + vw)) as f64;
    let bytes = (case.keys * pool.bytes_per_row()) as f64;
    println!(
        "{:<34} {:>5} {:>9.3} ms {:>8.1} GFLOP/s {:>7.2} GB/s",
        case.name,
        format!("{format:?}").to_lowercase(),
        best * 1e3,
        flops / best * 1e-9,
        bytes / best * 1e-9,
    );
}

fn main() {
    println!(
        "attention kernel: {} on {} rayon threads (best of repeated calls)",
        cpu::isa().name(),
        rayon::current_num_threads()
    );
    let cases = [
        Case {
            name: "latent 16x(512+64), 4096 keys, n=1",
            layout: RowLayout::latent(512, 64),
            heads: 16,
            keys: 4096,
            n: 1,
        },
        Case {
            name: "latent 16x(512+64), 4096 keys, n=64",
            layout: RowLayout::latent(512, 64),
            heads: 16,
            keys: 4096,
            n: 64,
        },
        Case {
            name: "gqa 12/2x128, 4096 keys, n=1",
            layout: RowLayout::grouped(2, 128),
            heads: 12,
            keys: 4096,
            n: 1,
        },
    ];
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for case in cases
        .iter()
        .filter(|c| filter.as_ref().is_none_or(|f| c.name.contains(f.as_str())))
    {
        for format in [CacheFormat::Bf16, CacheFormat::Q8] {
            bench(case, format, &mut rng);
        }
    }
}
