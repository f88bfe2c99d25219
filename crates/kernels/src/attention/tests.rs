//! The kernel against a naive f64 softmax attention over the same (rounded) rows, the AVX2 block steps
//! against the scalar ones, and every error case.

use super::*;

/// A small deterministic generator (splitmix64), so tests need no extra crates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn float(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn floats(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.float()).collect()
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.next() as usize % (i + 1));
        }
    }
}

/// A pool of `slots` random rows (scaled by 2 so scores spread out).
fn random_pool(format: CacheFormat, slots: usize, width: usize, rng: &mut Rng) -> RowPool {
    let mut pool = RowPool::new(format, slots, width).unwrap();
    for slot in 0..slots {
        let row: Vec<f32> = rng.floats(width).iter().map(|x| 2.0 * x).collect();
        pool.write(slot, &row).unwrap();
    }
    pool
}

/// Plain softmax attention in f64 over rows read back through `RowPool::read`.
#[allow(clippy::too_many_arguments)]
fn naive(
    pool: &RowPool,
    layout: RowLayout,
    slots: &[usize],
    queries: &[f32],
    heads: usize,
    start: usize,
    scale: f32,
) -> Vec<f32> {
    let (kw, vw) = (layout.key_width, layout.value_width);
    let n = queries.len() / (heads * kw);
    let group = heads / layout.kv_heads;
    let mut row = vec![0.0; pool.width()];
    let mut out = vec![0.0; n * heads * vw];
    for i in 0..n {
        for h in 0..heads {
            let g = h / group;
            let q = &queries[(i * heads + h) * kw..][..kw];
            let mut scores = Vec::new();
            let mut values = Vec::new();
            for &slot in &slots[..=start + i] {
                pool.read(slot, &mut row).unwrap();
                let key = &row[layout.key_offset(g)..][..kw];
                let dot: f64 = q.iter().zip(key).map(|(a, b)| *a as f64 * *b as f64).sum();
                scores.push(dot * scale as f64);
                values.push(row[layout.value_offset_of(g)..][..vw].to_vec());
            }
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            let dst = &mut out[(i * heads + h) * vw..][..vw];
            for (w, v) in weights.iter().zip(&values) {
                for (d, x) in dst.iter_mut().zip(v) {
                    *d += (w / total * *x as f64) as f32;
                }
            }
        }
    }
    out
}

/// Largest difference over the largest reference magnitude, per (query, head) row.
fn normalized_error(found: &[f32], expected: &[f32], row: usize) -> f32 {
    found
        .chunks(row)
        .zip(expected.chunks(row))
        .map(|(f, e)| {
            let diff = f
                .iter()
                .zip(e)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            diff / e.iter().map(|x| x.abs()).fold(f32::MIN_POSITIVE, f32::max)
        })
        .fold(0.0, f32::max)
}

/// The kernels this machine can run on `layout`.
fn kernels(layout: &RowLayout) -> Vec<Kernel> {
    let mut all = vec![Kernel::Scalar];
    let best = Kernel::select(cpu::detected(), layout);
    if best != Kernel::Scalar {
        all.push(best);
    }
    all
}

/// One attention call, described by its shape.
struct Case {
    format: CacheFormat,
    layout: RowLayout,
    heads: usize,
    /// Rows in the sequence (slots.len()).
    keys: usize,
    n: usize,
    start: usize,
}

impl Case {
    fn latent(format: CacheFormat, keys: usize, n: usize) -> Self {
        let layout = RowLayout::latent(512, 64);
        let heads = 16;
        let start = keys - n;
        Self {
            format,
            layout,
            heads,
            keys,
            n,
            start,
        }
    }

    fn grouped(format: CacheFormat, keys: usize, n: usize) -> Self {
        let layout = RowLayout::grouped(2, 128);
        let heads = 12;
        let start = keys - n;
        Self {
            format,
            layout,
            heads,
            keys,
            n,
            start,
        }
    }

    /// Runs every kernel under the default plan and `plans`, on a shuffled slot table, against the
    /// naive reference and against each other.
    fn check(&self, seed: u64, plans: &[Plan]) {
        let mut rng = Rng(seed);
        let slots_in_pool = self.keys + 7;
        // rows as wide as the layout needs, rounded up to whole q8 blocks
        let width = self.layout.width().next_multiple_of(32);
        let pool = random_pool(self.format, slots_in_pool, width, &mut rng);
        let mut slots: Vec<usize> = (0..slots_in_pool).collect();
        rng.shuffle(&mut slots);
        slots.truncate(self.keys);
        self.check_slots(&pool, &slots, &mut rng, plans);
    }

    fn check_slots(&self, pool: &RowPool, slots: &[usize], rng: &mut Rng, plans: &[Plan]) {
        let queries = rng.floats(self.n * self.heads * self.layout.key_width);
        let scale = 1.0 / (self.layout.key_width as f32).sqrt();
        let expected = naive(
            pool,
            self.layout,
            slots,
            &queries,
            self.heads,
            self.start,
            scale,
        );
        let (heads, start, len) = (self.heads, self.start, expected.len());
        let p = Problem::new(pool, self.layout, slots, &queries, heads, start, scale, len).unwrap();
        let mut plans = plans.to_vec();
        plans.push(Plan::new(&p, 4 * rayon::current_num_threads()));
        let mut outputs = Vec::new();
        for kernel in kernels(&self.layout) {
            for &plan in &plans {
                let mut out = vec![f32::NAN; len];
                run(
                    kernel,
                    std::slice::from_ref(&p),
                    &[plan],
                    &mut [&mut out[..]],
                );
                let err = normalized_error(&out, &expected, self.layout.value_width);
                assert!(
                    err < 1e-5,
                    "{kernel:?} {plan:?}: error {err:e} against naive"
                );
                outputs.push(out);
            }
        }
        // and the public entry point
        let mut out = vec![f32::NAN; len];
        attend(
            pool,
            self.layout,
            slots,
            &queries,
            heads,
            start,
            scale,
            &mut out,
        )
        .unwrap();
        let err = normalized_error(&out, &expected, self.layout.value_width);
        assert!(err < 1e-5, "attend: error {err:e} against naive");
        for out in &outputs[1..] {
            let err = normalized_error(out, &outputs[0], self.layout.value_width);
            assert!(err < 1e-5, "error {err:e} between kernels");
        }
    }
}

/// Plans that split into odd row tiles and key chunks, to exercise merging.
const SPLITS: [Plan; 3] = [
    Plan {
        row_tile: 1,
        chunk: BLOCK,
    },
    Plan {
        row_tile: 3,
        chunk: 3 * BLOCK,
    },
    Plan {
        row_tile: 8,
        chunk: 1 << 20,
    },
];

#[test]
fn latent_decode() {
    Case::latent(CacheFormat::Bf16, 1000, 1).check(1, &SPLITS);
    Case::latent(CacheFormat::Q8, 333, 1).check(2, &SPLITS);
    Case::latent(CacheFormat::Bf16, 1, 1).check(3, &SPLITS);
}

#[test]
fn latent_prefill_is_causal() {
    Case::latent(CacheFormat::Bf16, 300, 37).check(4, &SPLITS);
    Case::latent(CacheFormat::Q8, 77, 77).check(5, &SPLITS);
    Case::latent(CacheFormat::Bf16, 1000, 3).check(6, &SPLITS);
}

#[test]
fn grouped_decode_and_prefill() {
    Case::grouped(CacheFormat::Bf16, 700, 1).check(7, &SPLITS);
    Case::grouped(CacheFormat::Q8, 700, 1).check(8, &SPLITS);
    Case::grouped(CacheFormat::Bf16, 200, 21).check(9, &SPLITS);
    Case::grouped(CacheFormat::Q8, 65, 65).check(10, &SPLITS);
}

#[test]
fn keys_after_the_last_query_are_unseen() {
    let mut case = Case::grouped(CacheFormat::Bf16, 150, 5);
    case.start = 100; // queries at 100..105 of 150 rows
    case.check(11, &SPLITS);
}

#[test]
fn odd_layouts_run_scalar() {
    // head_dim 12 is not a whole number of AVX2 vectors; 4 heads on one kv head (MQA)
    let case = Case {
        format: CacheFormat::Bf16,
        layout: RowLayout::grouped(1, 12),
        heads: 4,
        keys: 90,
        n: 4,
        start: 86,
    };
    assert_eq!(Kernel::select(Isa::Avx2, &case.layout), Kernel::Scalar);
    case.check(12, &SPLITS);
    // a layout inside a wider row (128), with gaps between groups
    let layout = RowLayout {
        kv_heads: 3,
        key_width: 16,
        key_stride: 24,
        value_offset: 80,
        value_width: 8,
        value_stride: 16,
    };
    assert_eq!(layout.width(), 120);
    let case = Case {
        format: CacheFormat::Q8,
        layout,
        heads: 6,
        keys: 40,
        n: 2,
        start: 38,
    };
    case.check(13, &SPLITS);
}

#[test]
fn sequences_share_slots() {
    let mut rng = Rng(14);
    let case = Case::latent(CacheFormat::Bf16, 120, 4);
    let pool = random_pool(case.format, 300, case.layout.width(), &mut rng);
    let mut first: Vec<usize> = (0..300).collect();
    rng.shuffle(&mut first);
    // the second sequence shares the first's 80-token prefix, then has its own rows
    let mut second = first[..80].to_vec();
    second.extend_from_slice(&first[200..240]);
    first.truncate(120);
    case.check_slots(&pool, &first, &mut rng, &SPLITS);
    case.check_slots(&pool, &second, &mut rng, &SPLITS);
}

/// Many sequences of one decode step (and a prefill chunk, and one with no new tokens) in one
/// `attend_batch` call, each against the naive reference on its own slots.
#[test]
fn batch_of_sequences() {
    let mut rng = Rng(16);
    for (format, layout, heads) in [
        (CacheFormat::Bf16, RowLayout::latent(64, 16), 4),
        (CacheFormat::Q8, RowLayout::grouped(2, 16), 6),
    ] {
        let width = layout.width().next_multiple_of(32);
        let pool = random_pool(format, 700, width, &mut rng);
        let mut order: Vec<usize> = (0..700).collect();
        rng.shuffle(&mut order);
        // (start, n): decodes at several depths, a prefill chunk, a sequence with nothing new; the
        // first three share a 30-token prefix.
        let shape = [(40, 1), (300, 1), (30, 9), (0, 17), (5, 0), (299, 1)];
        let mut tables = Vec::new();
        let mut next = 30;
        for &(start, n) in &shape {
            let mut table = order[..30.min(start + n)].to_vec();
            let own = (start + n).saturating_sub(30);
            table.extend_from_slice(&order[next..next + own]);
            next += own;
            tables.push(table);
        }
        let queries: Vec<Vec<f32>> = shape
            .iter()
            .map(|&(_, n)| rng.floats(n * heads * layout.key_width))
            .collect();
        let mut outs: Vec<Vec<f32>> = shape
            .iter()
            .map(|&(_, n)| vec![f32::NAN; n * heads * layout.value_width])
            .collect();
        let mut seqs: Vec<SequenceQueries> = tables
            .iter()
            .zip(&queries)
            .zip(&mut outs)
            .zip(&shape)
            .map(|(((slots, queries), out), &(start, _))| SequenceQueries {
                slots,
                queries,
                start,
                out,
            })
            .collect();
        attend_batch(&pool, layout, heads, 0.3, &mut seqs).unwrap();
        for (((table, q), out), &(start, _)) in tables.iter().zip(&queries).zip(&outs).zip(&shape) {
            let expected = naive(&pool, layout, table, q, heads, start, 0.3);
            let err = normalized_error(out, &expected, layout.value_width);
            assert!(err < 1e-5, "{format:?} start {start}: error {err:e}");
        }
    }
}

#[test]
fn pool_formats() {
    let mut rng = Rng(15);
    let row: Vec<f32> = rng.floats(64).iter().map(|x| 3.0 * x).collect();
    let mut out = vec![0.0; 64];

    let mut pool = RowPool::new(CacheFormat::Bf16, 3, 64).unwrap();
    assert_eq!(
        (pool.format(), pool.slots(), pool.width()),
        (CacheFormat::Bf16, 3, 64)
    );
    assert_eq!((pool.bytes_per_row(), pool.bytes()), (128, 384));
    pool.write(2, &row).unwrap();
    pool.read(2, &mut out).unwrap();
    for (&x, &y) in row.iter().zip(&out) {
        assert_eq!(y, half::bf16::from_f32(x).to_f32());
    }

    let mut pool = RowPool::new(CacheFormat::Q8, 3, 64).unwrap();
    assert_eq!((pool.bytes_per_row(), pool.bytes()), (72, 216));
    pool.write(1, &row).unwrap();
    pool.read(1, &mut out).unwrap();
    for (x, y) in row.chunks(32).zip(out.chunks(32)) {
        let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        for (a, b) in x.iter().zip(y) {
            assert!(
                (a - b).abs() <= amax / 127.0 / 2.0 * 1.0001,
                "{a} read back as {b}"
            );
        }
    }
    pool.read(0, &mut out).unwrap();
    assert!(out.iter().all(|&x| x == 0.0), "new rows are zero");
}

#[test]
fn avx2_steps_match_scalar() {
    if cpu::detected() < Isa::Avx2 {
        return;
    }
    let mut rng = Rng(16);
    for format in [CacheFormat::Bf16, CacheFormat::Q8] {
        let pool = random_pool(format, 50, 96, &mut rng);
        let slots = [7, 3, 49, 0, 12];
        let mut a = vec![0.0; 5 * 96];
        let mut b = vec![1.0; 5 * 96];
        Kernel::Scalar.convert(&pool, &slots, &mut a);
        Kernel::Avx2.convert(&pool, &slots, &mut b);
        assert_eq!(a, b, "{format:?} rows convert exactly");
    }
    let x: Vec<f32> = (0..4000).map(|i| -90.0 + i as f32 * 0.0225).collect();
    for chunk in x.chunks_exact(8) {
        let mut y = [0.0f32; 8];
        // SAFETY: the CPU has AVX2 (checked above); chunks of exactly 8.
        unsafe {
            let v = avx2::exp(std::arch::x86_64::_mm256_loadu_ps(chunk.as_ptr()));
            std::arch::x86_64::_mm256_storeu_ps(y.as_mut_ptr(), v);
        }
        for (&x, &y) in chunk.iter().zip(&y) {
            let e = x.exp();
            if x >= -87.0 {
                assert!((y - e).abs() <= 3e-7 * e, "exp({x}) = {y}, expected {e}");
            } else {
                assert!(y <= 2e-38, "exp({x}) = {y} should be tiny");
            }
        }
    }
}

fn attend_err(
    pool: &RowPool,
    layout: RowLayout,
    slots: &[usize],
    queries: usize,
    heads: usize,
    start: usize,
    out: usize,
) -> AttentionError {
    let queries = vec![0.5; queries];
    let mut out = vec![0.0; out];
    attend(pool, layout, slots, &queries, heads, start, 1.0, &mut out).unwrap_err()
}

#[test]
fn errors() {
    use AttentionError as E;
    assert!(matches!(
        RowPool::new(CacheFormat::Q8, 4, 40),
        Err(E::Q8Width { width: 40, .. })
    ));
    assert!(matches!(
        RowPool::new(CacheFormat::Bf16, usize::MAX, 2),
        Err(E::PoolSize { .. })
    ));
    let mut pool = RowPool::new(CacheFormat::Bf16, 4, 64).unwrap();
    assert_eq!(
        pool.write(4, &[0.0; 64]),
        Err(E::SlotOutOfRange { slot: 4, slots: 4 })
    );
    assert_eq!(
        pool.write(0, &[0.0; 63]),
        Err(E::RowLength {
            expected: 64,
            found: 63
        })
    );
    assert_eq!(
        pool.read(9, &mut [0.0; 64]),
        Err(E::SlotOutOfRange { slot: 9, slots: 4 })
    );
    assert_eq!(
        pool.read(1, &mut [0.0; 65]),
        Err(E::RowLength {
            expected: 64,
            found: 65
        })
    );

    let gqa = RowLayout::grouped(2, 16); // width 64
    let ok = |heads: usize, n: usize| (n * heads * 16, n * heads * 16);
    let (q, o) = ok(4, 2);
    assert!(
        attend_err(&pool, gqa, &[0, 1], q, 4, 0, o + 1)
            == E::OutputShape {
                expected: o,
                found: o + 1
            }
    );
    assert_eq!(
        attend_err(&pool, gqa, &[0, 1], q + 3, 4, 0, o),
        E::QueryShape {
            len: q + 3,
            row: 64
        }
    );
    assert_eq!(
        attend_err(&pool, gqa, &[0, 1], q, 4, 1, o),
        E::Positions {
            n: 2,
            start: 1,
            needed: 3,
            slots: 2
        }
    );
    assert_eq!(
        attend_err(&pool, gqa, &[0, 4], q, 4, 0, o),
        E::SlotTable {
            position: 1,
            slot: 4,
            slots: 4
        }
    );
    assert_eq!(
        attend_err(&pool, gqa, &[0, 1], 3 * 16, 3, 0, 3 * 16),
        E::Heads {
            heads: 3,
            kv_heads: 2
        }
    );
    assert_eq!(
        attend_err(&pool, gqa, &[0, 1], 0, 0, 0, 0),
        E::Heads {
            heads: 0,
            kv_heads: 2
        }
    );
    let wide = RowLayout::grouped(2, 32);
    assert_eq!(
        attend_err(&pool, wide, &[0], 64, 2, 0, 64),
        E::LayoutWidth {
            needed: 128,
            width: 64
        }
    );
    for (layout, what) in [
        (RowLayout { kv_heads: 0, ..gqa }, "kv_heads is 0"),
        (
            RowLayout {
                key_width: 0,
                ..gqa
            },
            "key_width is 0",
        ),
        (
            RowLayout {
                value_width: 0,
                ..gqa
            },
            "value_width is 0",
        ),
    ] {
        assert_eq!(
            attend_err(&pool, layout, &[0], 64, 4, 0, 64),
            E::Layout(what)
        );
    }
    // no queries is not an error
    let mut out = [];
    attend(&pool, gqa, &[0, 1], &[], 4, 0, 1.0, &mut out).unwrap();
    pool.write(0, &[1.0; 64]).unwrap();
}
