//! `QMatrix` through its public API: products against f32 over the dequantized weights with a stated
//! error budget, row slicing, and every size error returned rather than panicked on.
//!
//! The budget: activations are quantized per block of `B` values (32 or 256) with scale d = max|x|/127
//! (then, for Q8_0, rounded to f16), so each quantized activation is off by at most d/2 = max|x_b|/254
//! plus 2^-11 of itself from the f16 scale. The product with exact weights w is then off by at most
//! sum_b (max|x_b| / 254) sum_{i in b} |w_i| + 2^-10 sum_i |w_i x_i|, which the tests demand (with a
//! little room for f32 summation).
//!
//! These run the best kernels the CPU has; `TIEFSEE_ISA=scalar cargo test` runs the scalar references
//! through the same checks (the unit tests compare the two directly).

use tiefsee_gguf::{GgmlType, QK_K, dequantize, quantize};
use tiefsee_kernels::cpu::{self, Isa};
use tiefsee_kernels::{KernelError, MatmulJob, QMatrix, WeightBytes, matmul_batch};

const TYPES: [GgmlType; 8] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

const FLOATS: [GgmlType; 3] = [GgmlType::F32, GgmlType::F16, GgmlType::BF16];

/// Deterministic normal-ish values (xorshift and a sum of uniforms), scaled by `scale`.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    (0..n)
        .map(|_| scale * (uniform() + uniform() + uniform() + uniform()))
        .collect()
}

/// Values per activation block for weights of type `ty`.
fn activation_block(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => 32,
        _ => QK_K,
    }
}

/// A random (rows, cols) matrix of type `ty` and its dequantized weights, (rows, cols).
fn matrix(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> (QMatrix, Vec<f32>) {
    let bytes = quantize(ty, &values(rows * cols, seed, 0.05)).unwrap();
    let w = dequantize(ty, &bytes, rows * cols).unwrap();
    (
        QMatrix::new(ty, rows, cols, WeightBytes::from_vec(bytes)).unwrap(),
        w,
    )
}

/// Checks `out` (tokens, rows) against the f64 product of `w` (rows, cols) and `x` (tokens, cols).
fn check_product(ty: GgmlType, w: &[f32], x: &[f32], out: &[f32], rows: usize, cols: usize) {
    let block = activation_block(ty);
    for (t, xt) in x.chunks_exact(cols).enumerate() {
        for (r, wr) in w.chunks_exact(cols).enumerate() {
            let exact: f64 = wr
                .iter()
                .zip(xt)
                .map(|(&w, &x)| f64::from(w) * f64::from(x))
                .sum();
            let mut bound = 0f64;
            for (wb, xb) in wr.chunks_exact(block).zip(xt.chunks_exact(block)) {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                bound +=
                    f64::from(amax) / 254.0 * wb.iter().map(|w| f64::from(w.abs())).sum::<f64>();
            }
            let magnitude: f64 = wr
                .iter()
                .zip(xt)
                .map(|(&w, &x)| f64::from((w * x).abs()))
                .sum();
            let bound = 1.01 * bound + magnitude / 1024.0 + 1e-6;
            let got = f64::from(out[t * rows + r]);
            assert!(
                (got - exact).abs() <= bound,
                "{ty:?} token {t} row {r}: {got} vs exact {exact} (bound {bound})"
            );
        }
    }
}

#[test]
fn matmul_is_within_the_8_bit_activation_budget() {
    for ty in TYPES {
        // 11 * 256 columns: a prefill goes over them in two passes (2048 + 768).
        for (rows, cols) in [(37, 2 * QK_K), (64, QK_K), (5, 4 * QK_K), (9, 11 * QK_K)] {
            let (m, w) = matrix(ty, rows, cols, (rows * cols) as u64);
            for tokens in [1, 3, 17, 64] {
                let x = values(tokens * cols, tokens as u64 + 1, 1.0);
                let mut out = vec![f32::NAN; tokens * rows];
                m.matmul(&x, &mut out).unwrap();
                check_product(ty, &w, &x, &out, rows, cols);
            }
        }
    }
}

/// Checks `out` (tokens, rows) against the f64 product of `w` (rows, cols) and `x` (tokens, cols) to
/// f32 rounding: 1e-5 of the sum of the terms' magnitudes.
fn check_f32_product(what: &str, w: &[f32], x: &[f32], out: &[f32], cols: usize) {
    let rows = w.len() / cols;
    for (t, xt) in x.chunks_exact(cols).enumerate() {
        for (r, wr) in w.chunks_exact(cols).enumerate() {
            let (exact, magnitude) = wr.iter().zip(xt).fold((0f64, 0f64), |(e, m), (&w, &x)| {
                let p = f64::from(w) * f64::from(x);
                (e + p, m + p.abs())
            });
            let got = f64::from(out[t * rows + r]);
            assert!(
                (got - exact).abs() <= 1e-5 * magnitude + 1e-9,
                "{what}, token {t} row {r}: {got} vs exact {exact}"
            );
        }
    }
}

/// From 32 tokens on (on SIMD machines), Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 rows are decoded and multiplied
/// by the f32 activations themselves (by the register kernel up to 255 tokens, by `gemm` from 256): the
/// result is then the exact product up to f32 rounding, far inside the 8-bit activation budget.
#[test]
fn a_legacy_prefill_multiplies_decoded_rows_in_f32() {
    if cpu::isa() == Isa::Scalar {
        eprintln!("skipped: the scalar kernels keep 8-bit activations");
        return;
    }
    // 130 rows: two whole tiles and a partial one, whose last row group is partial too; 40 tokens:
    // a partial group of sixteen; 256: gemm.
    let (rows, cols) = (130, 5 * QK_K);
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ] {
        let (m, w) = matrix(ty, rows, cols, 77);
        for tokens in [32, 40, 256] {
            let x = values(tokens * cols, 78, 1.0);
            let mut out = vec![f32::NAN; tokens * rows];
            m.matmul(&x, &mut out).unwrap();
            check_f32_product(&format!("{ty:?} {tokens} tokens"), &w, &x, &out, cols);
        }
    }
}

/// On the f32 register kernel a token's outputs depend only on its own activations: the same token
/// among other tokens, or among fewer, gives the same bits (what lets a server batch requests
/// without changing any one's results).
#[test]
fn a_token_on_the_f32_path_does_not_depend_on_the_others() {
    let (rows, cols) = (70, 3 * QK_K);
    let (m, _) = matrix(GgmlType::Q8_0, rows, cols, 31);
    let x = values(50 * cols, 32, 1.0);
    let mut all = vec![0f32; 50 * rows];
    m.matmul(&x, &mut all).unwrap();
    // The last 33 tokens alone: each lands in another lane and group than in the batch of 50.
    let mut last = vec![0f32; 33 * rows];
    m.matmul(&x[17 * cols..], &mut last).unwrap();
    for t in 0..33 {
        for r in 0..rows {
            let (a, b) = (all[(17 + t) * rows + r], last[t * rows + r]);
            assert_eq!(a.to_bits(), b.to_bits(), "token {t} row {r}: {a} vs {b}");
        }
    }
}

/// Float weights (a safetensors checkpoint's f32, f16 or bf16, read in place) multiply the f32
/// activations as they are, row by row for a few tokens and through the f32 kernels for more: within
/// f32 rounding of the exact product, on rows whose length is not a multiple of eight.
#[test]
fn float_weights_multiply_exactly() {
    let (rows, cols) = (67, 300);
    for ty in FLOATS {
        let (m, w) = matrix(ty, rows, cols, 5);
        for tokens in [1, 3, 17, 40, 256] {
            let x = values(tokens * cols, tokens as u64 + 9, 1.0);
            let mut out = vec![f32::NAN; tokens * rows];
            m.matmul(&x, &mut out).unwrap();
            check_f32_product(&format!("{ty:?} {tokens} tokens"), &w, &x, &out, cols);
        }
    }
}

/// Below the f32 kernels' token count, a token's outputs over float (and FP8) weights are the same
/// bits alone as in a group (the server batches requests without changing their results).
#[test]
fn a_token_over_float_weights_does_not_depend_on_the_others() {
    let (rows, cols) = (45, 264);
    let fp8 = fp8_matrix(rows, cols, [16, 128], 8).0;
    let floats = FLOATS.map(|ty| (format!("{ty:?}"), matrix(ty, rows, cols, 8).0));
    for (ty, m) in floats.into_iter().chain([("FP8".to_owned(), fp8)]) {
        let x = values(7 * cols, 3, 1.0);
        let mut all = vec![0f32; 7 * rows];
        m.matmul(&x, &mut all).unwrap();
        for t in 0..7 {
            let mut one = vec![0f32; rows];
            m.matmul(&x[t * cols..(t + 1) * cols], &mut one).unwrap();
            for r in 0..rows {
                let (a, b) = (all[t * rows + r], one[r]);
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{ty} token {t} row {r}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn a_large_matrix_splits_over_threads_without_changing_results() {
    // Big enough for several parallel tasks; each output must equal the one-row product.
    let (rows, cols) = (1000, 1024);
    for ty in [GgmlType::Q8_0, GgmlType::Q6_K] {
        let (m, w) = matrix(ty, rows, cols, 5);
        let x = values(5 * cols, 11, 1.0);
        let mut out = vec![0f32; 5 * rows];
        m.matmul(&x, &mut out).unwrap();
        check_product(ty, &w, &x, &out, rows, cols);
        for r in [0, 1, 499, 999] {
            let row = m.slice_rows(r, 1).unwrap();
            let mut one = vec![0f32; 5];
            row.matmul(&x, &mut one).unwrap();
            for t in 0..5 {
                assert_eq!(one[t], out[t * rows + r], "{ty:?} row {r} token {t}");
            }
        }
    }
}

#[test]
fn a_thin_matrix_times_many_tokens_splits_by_tokens_without_changing_results() {
    // Too few rows to keep two threads busy: the prefill is split over tokens as well.
    let (rows, cols, tokens) = (16, 2048, 200);
    let (m, w) = matrix(GgmlType::Q4_K, rows, cols, 12);
    let x = values(tokens * cols, 13, 1.0);
    let mut out = vec![0f32; tokens * rows];
    m.matmul(&x, &mut out).unwrap();
    check_product(GgmlType::Q4_K, &w, &x, &out, rows, cols);
    for t in [0, 7, 8, 99, 199] {
        let mut one = vec![0f32; rows];
        m.matmul(&x[t * cols..(t + 1) * cols], &mut one).unwrap();
        assert_eq!(one, &out[t * rows..(t + 1) * rows], "token {t}");
    }
}

#[test]
fn slice_rows_is_the_same_rows() {
    let (rows, cols) = (37, QK_K);
    for ty in TYPES {
        let (m, _) = matrix(ty, rows, cols, 3);
        let s = m.slice_rows(10, 7).unwrap();
        assert_eq!((s.rows(), s.cols(), s.ty()), (7, cols, Some(ty)));
        assert_eq!(s.data(), &m.data()[10 * m.row_bytes()..17 * m.row_bytes()]);
        let x = values(3 * cols, 9, 1.0);
        let (mut full, mut part) = (vec![0f32; 3 * rows], vec![0f32; 3 * 7]);
        m.matmul(&x, &mut full).unwrap();
        s.matmul(&x, &mut part).unwrap();
        for t in 0..3 {
            assert_eq!(
                &part[7 * t..7 * t + 7],
                &full[t * rows + 10..t * rows + 17],
                "{ty:?}"
            );
        }
        let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
        m.dequantize_row(12, &mut a);
        s.dequantize_row(2, &mut b);
        assert_eq!(a, b);
        assert!(m.slice_rows(30, 8).is_err());
        assert!(m.slice_rows(usize::MAX, 2).is_err());
        assert_eq!(m.slice_rows(37, 0).unwrap().rows(), 0);
    }
}

/// bf16 and f16 matrices are stored in panels of sixteen rows: rows read back as written, including
/// those of a partial last panel and on an odd number of columns; slices that start a panel share the
/// panels, others are copied, and both multiply to the same bits as the whole matrix; and from 1 to
/// 255 tokens a token's outputs are the same bits alone as in its batch, within f32 rounding of the
/// exact product.
#[test]
fn panels_keep_rows_slices_and_tokens() {
    for ty in [GgmlType::BF16, GgmlType::F16] {
        panels_keep(ty);
    }
}

fn panels_keep(ty: GgmlType) {
    let (rows, cols) = (37, 301);
    let (m, w) = matrix(ty, rows, cols, 21);
    assert_eq!(
        m.data().len(),
        3 * 16 * cols * 2,
        "three panels, the last padded"
    );
    let mut row = vec![0f32; cols];
    for r in 0..rows {
        m.dequantize_row(r, &mut row);
        assert_eq!(row, &w[r * cols..(r + 1) * cols], "{ty:?} row {r}");
    }
    let x = values(255 * cols, 22, 1.0);
    let mut all = vec![0f32; 255 * rows];
    m.matmul(&x, &mut all).unwrap();
    check_f32_product(&format!("{ty:?} 255 tokens"), &w, &x, &all, cols);
    for tokens in [1, 2, 3, 4, 7, 16, 17, 20] {
        let mut some = vec![0f32; tokens * rows];
        m.matmul(&x[..tokens * cols], &mut some).unwrap();
        for (i, (a, b)) in some.iter().zip(&all).enumerate() {
            let (t, r) = (i / rows, i % rows);
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{ty:?} {tokens} tokens: token {t} row {r}"
            );
        }
    }
    for (start, len) in [(16, 21), (32, 5), (10, 7), (1, 36)] {
        let s = m.slice_rows(start, len).unwrap();
        assert_eq!((s.rows(), s.cols()), (len, cols));
        s.dequantize_row(len - 1, &mut row);
        assert_eq!(row, &w[(start + len - 1) * cols..(start + len) * cols]);
        let mut part = vec![0f32; 5 * len];
        s.matmul(&x[..5 * cols], &mut part).unwrap();
        for t in 0..5 {
            let whole = &all[t * rows + start..t * rows + start + len];
            assert_eq!(
                &part[t * len..(t + 1) * len],
                whole,
                "{ty:?} slice {start}+{len}, token {t}"
            );
        }
    }
}

#[test]
fn dequantize_row_matches_the_reference() {
    for ty in TYPES {
        let (m, w) = matrix(ty, 4, 2 * QK_K, 8);
        let mut row = vec![0f32; 2 * QK_K];
        m.dequantize_row(3, &mut row);
        assert_eq!(row, &w[3 * 2 * QK_K..]);
    }
}

#[test]
fn sharing_a_buffer_through_a_range() {
    let bytes = quantize(GgmlType::Q8_0, &values(4 * 64, 1, 1.0)).unwrap();
    let row_bytes = 2 * 34;
    let owner: std::sync::Arc<dyn AsRef<[u8]> + Send + Sync> = std::sync::Arc::new(bytes.clone());
    let part = WeightBytes::new(owner.clone(), row_bytes..3 * row_bytes).unwrap();
    assert_eq!(part.as_slice(), &bytes[row_bytes..3 * row_bytes]);
    let m = QMatrix::new(GgmlType::Q8_0, 2, 64, part).unwrap();
    assert_eq!(m.data(), &bytes[row_bytes..3 * row_bytes]);
    assert!(matches!(
        WeightBytes::new(owner.clone(), 0..bytes.len() + 1),
        Err(KernelError::RangeOutOfBounds { .. })
    ));
    #[allow(clippy::reversed_empty_ranges)]
    let reversed = 5..2;
    assert!(WeightBytes::new(owner, reversed).is_err());
}

#[test]
fn size_errors_are_returned() {
    let bytes = || WeightBytes::from_vec(vec![0u8; 2 * 34]);
    assert!(matches!(
        QMatrix::new(GgmlType::Q8_0, 3, 32, bytes()),
        Err(KernelError::DataLength {
            expected: 102,
            found: 68,
            ..
        })
    ));
    assert!(matches!(
        QMatrix::new(GgmlType::Q8_0, 1, 48, bytes()),
        Err(KernelError::ColsNotWholeBlocks { cols: 48, .. })
    ));
    assert!(matches!(
        QMatrix::new(GgmlType::Q8_0, 0, 0, WeightBytes::from_vec(Vec::new())),
        Err(KernelError::ColsNotWholeBlocks { cols: 0, .. })
    ));
    assert!(matches!(
        QMatrix::new(
            GgmlType::Q8_K,
            1,
            256,
            WeightBytes::from_vec(vec![0u8; 292])
        ),
        Err(KernelError::UnsupportedType(GgmlType::Q8_K))
    ));
    assert!(QMatrix::new(GgmlType::Q8_0, usize::MAX, 32, bytes()).is_err());
    for ty in [GgmlType::Q8_K, GgmlType::Q2_K, GgmlType::Q3_K] {
        assert!(!QMatrix::supports(ty), "{ty:?}");
    }
    for ty in TYPES.into_iter().chain(FLOATS) {
        assert!(QMatrix::supports(ty), "{ty:?}");
    }

    let m = QMatrix::new(GgmlType::Q8_0, 2, 32, bytes()).unwrap();
    let mut out = vec![0f32; 4];
    assert!(matches!(
        m.matmul(&[0.0; 33], &mut out),
        Err(KernelError::InputLength { len: 33, cols: 32 })
    ));
    assert!(matches!(
        m.matmul(&[0.0; 64], &mut out[..3]),
        Err(KernelError::OutputLength {
            expected: 4,
            found: 3,
            ..
        })
    ));
    assert!(m.matmul(&[], &mut []).is_ok());
    let message = m.matmul(&[0.0; 33], &mut out).unwrap_err().to_string();
    assert!(
        message.contains("33") && message.contains("32"),
        "{message}"
    );
}

/// Runs `matrices[i]` over `inputs[i]` one call at a time and as one batch; the two must agree exactly.
fn batch_equals_one_by_one(matrices: &[&QMatrix], inputs: &[&[f32]]) {
    let sizes: Vec<usize> = matrices
        .iter()
        .zip(inputs)
        .map(|(m, x)| x.len() / m.cols() * m.rows())
        .collect();
    let alone: Vec<Vec<f32>> = matrices
        .iter()
        .zip(inputs)
        .zip(&sizes)
        .map(|((m, x), &n)| {
            let mut out = vec![0f32; n];
            m.matmul(x, &mut out).unwrap();
            out
        })
        .collect();
    let mut outs: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![f32::NAN; n]).collect();
    let mut jobs: Vec<MatmulJob> = matrices
        .iter()
        .zip(inputs)
        .zip(&mut outs)
        .map(|((matrix, x), out)| MatmulJob { matrix, x, out })
        .collect();
    matmul_batch(&mut jobs).unwrap();
    for (i, (a, b)) in alone.iter().zip(&outs).enumerate() {
        assert_eq!(a, b, "job {i}");
    }
}

#[test]
fn a_batch_equals_its_products_one_by_one() {
    // Mixed types, shapes and token counts (decode, a few tokens, a chunked prefill), in one region.
    let shapes = [
        (GgmlType::Q8_0, 300, 512, 1),
        (GgmlType::Q4_K, 64, 768, 1),
        (GgmlType::Q6_K, 200, 256, 5),
        (GgmlType::Q5_0, 17, 4096, 3),
        (GgmlType::Q4_1, 1000, 2048, 1),
        (GgmlType::Q8_0, 128, 4096, 40),
        (GgmlType::Q5_K, 33, 512, 0),
        // a legacy-format prefill: decoded rows times f32 activations
        (GgmlType::Q5_0, 150, 512, 70),
    ];
    let ms: Vec<QMatrix> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(ty, rows, cols, _))| matrix(ty, rows, cols, 20 + i as u64).0)
        .collect();
    let xs: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(_, _, cols, tokens))| values(tokens * cols, 40 + i as u64, 1.0))
        .collect();
    let matrices: Vec<&QMatrix> = ms.iter().collect();
    let inputs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
    batch_equals_one_by_one(&matrices, &inputs);
    batch_equals_one_by_one(&matrices[..1], &inputs[..1]);
    batch_equals_one_by_one(&[], &[]);
}

#[test]
fn jobs_sharing_an_input_quantize_it_once_and_agree() {
    // An expert's gate and up read the same activations; so do weights of both activation formats.
    let (gate, _) = matrix(GgmlType::Q8_0, 96, 512, 1);
    let (up, _) = matrix(GgmlType::Q8_0, 96, 512, 2);
    let (k_quant, _) = matrix(GgmlType::Q4_K, 40, 512, 3);
    let (wide, _) = matrix(GgmlType::Q8_0, 8, 1024, 4);
    let x = values(4 * 512, 5, 1.0);
    let matrices = [&gate, &up, &k_quant, &wide, &gate];
    // `wide` reads the same buffer as 2 tokens of 1024 columns.
    let inputs: [&[f32]; 5] = [&x, &x, &x, &x, &x[..512]];
    batch_equals_one_by_one(&matrices, &inputs);
}

#[test]
fn batch_size_errors_name_the_job() {
    let (m, _) = matrix(GgmlType::Q8_0, 2, 32, 1);
    let x = [0.5f32; 32];
    let (mut good, mut bad) = (vec![0f32; 2], vec![7f32; 3]);
    let mut jobs = [
        MatmulJob {
            matrix: &m,
            x: &x,
            out: &mut good,
        },
        MatmulJob {
            matrix: &m,
            x: &x,
            out: &mut bad,
        },
    ];
    let err = matmul_batch(&mut jobs).unwrap_err();
    assert!(
        matches!(&err, KernelError::Job { index: 1, source } if matches!(**source, KernelError::OutputLength { expected: 2, found: 3, .. })),
        "{err}"
    );
    assert!(err.to_string().starts_with("job 1 of the batch"), "{err}");
    // Nothing ran: errors are found before any product.
    assert_eq!(good, [0.0; 2]);
    assert_eq!(bad, [7.0; 3]);
    let mut jobs = [MatmulJob {
        matrix: &m,
        x: &x[..31],
        out: &mut good,
    }];
    assert!(matches!(
        matmul_batch(&mut jobs),
        Err(KernelError::Job { index: 0, source }) if matches!(*source, KernelError::InputLength { len: 31, cols: 32 })
    ));
}

/// The value of e4m3 byte `b` from the format's definition (OCP FP8: bias 7, subnormals below
/// exponent 1, S.1111.111 NaN), as DeepSeek's checkpoints store weights.
fn e4m3(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (exponent, mantissa) = (i32::from((b >> 3) & 0xF), f64::from(b & 7));
    let magnitude = match exponent {
        15 if mantissa == 7.0 => f64::NAN,
        0 => 2f64.powi(-6) * mantissa / 8.0,
        e => 2f64.powi(e - 7) * (1.0 + mantissa / 8.0),
    };
    (sign * magnitude) as f32
}

/// A random FP8 matrix (no NaN bytes) with a random positive scale per `block` and its weights as the
/// reference dequantizes them, `f32(e4m3) * scale`.
fn fp8_matrix(rows: usize, cols: usize, block: [usize; 2], seed: u64) -> (QMatrix, Vec<f32>) {
    let levels = values(rows * cols, seed, 60.0);
    let bytes: Vec<u8> = levels
        .iter()
        .map(|&v| {
            let b = (v.abs().min(126.0) as u8) | if v < 0.0 { 0x80 } else { 0 };
            if b & 0x7F == 0x7F { b - 1 } else { b }
        })
        .collect();
    let grid = [rows.div_ceil(block[0]), cols.div_ceil(block[1])];
    let scales: Vec<f32> = values(grid[0] * grid[1], seed + 1, 1e-3)
        .iter()
        .map(|s| s.abs() + 1e-4)
        .collect();
    let w = bytes
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            let (r, c) = (i / cols, i % cols);
            e4m3(b) * scales[r / block[0] * grid[1] + c / block[1]]
        })
        .collect();
    let m = QMatrix::fp8(rows, cols, WeightBytes::from_vec(bytes), scales, block).unwrap();
    (m, w)
}

/// DeepSeek's FP8 weights, read in place, multiply the f32 activations within f32 rounding of the
/// exact product over `f32(e4m3) * scale`, for every token count (row by row, the register kernel,
/// gemm), with partial blocks at both edges and blocks whose width is not a multiple of eight.
#[test]
fn fp8_weights_multiply_exactly() {
    for (rows, cols, block) in [(150, 300, [128, 128]), (40, 90, [16, 12])] {
        let (m, w) = fp8_matrix(rows, cols, block, 11);
        assert_eq!(
            (m.rows(), m.cols(), m.ty(), m.row_bytes()),
            (rows, cols, None, cols)
        );
        for tokens in [1, 3, 17, 40, 256] {
            let x = values(tokens * cols, tokens as u64 + 3, 1.0);
            let mut out = vec![f32::NAN; tokens * rows];
            m.matmul(&x, &mut out).unwrap();
            check_f32_product(
                &format!("FP8 {block:?} {tokens} tokens"),
                &w,
                &x,
                &out,
                cols,
            );
        }
    }
}

/// Every e4m3 byte decodes to its value: a one-row matrix of all 256 bytes (scale 1) by
/// `dequantize_row`, and of the 254 numbers times one-hot tokens on every product path. The two NaN
/// codes, which DeepSeek's quantizer never writes, read as +-480 (documented in `QMatrix::fp8`).
#[test]
fn fp8_decodes_every_byte() {
    let bytes: Vec<u8> = (0..=255).collect();
    let m = QMatrix::fp8(1, 256, WeightBytes::from_vec(bytes), vec![1.0], [1, 256]).unwrap();
    let mut row = vec![0f32; 256];
    m.dequantize_row(0, &mut row);
    for (b, v) in row.iter().enumerate() {
        let expected = match e4m3(b as u8) {
            nan if nan.is_nan() => 480f32.copysign(if b & 0x80 != 0 { -1.0 } else { 1.0 }),
            number => number,
        };
        assert_eq!(
            v.to_bits(),
            expected.to_bits(),
            "byte {b:#04x}: {v} vs {expected}"
        );
    }
    assert_eq!(
        (e4m3(0x7E), e4m3(0x08), e4m3(0x01)),
        (448.0, 2f32.powi(-6), 2f32.powi(-9))
    );

    let numbers: Vec<u8> = (0..=255u8).filter(|b| b & 0x7F != 0x7F).collect();
    let cols = numbers.len();
    let m = QMatrix::fp8(
        1,
        cols,
        WeightBytes::from_vec(numbers.clone()),
        vec![0.5],
        [1, cols],
    )
    .unwrap();
    for tokens in [3, 40, cols] {
        let mut x = vec![0f32; tokens * cols];
        for t in 0..tokens {
            x[t * cols + t] = 1.0;
        }
        let mut out = vec![f32::NAN; tokens];
        m.matmul(&x, &mut out).unwrap();
        for (t, v) in out.iter().enumerate() {
            let expected = e4m3(numbers[t]) * 0.5;
            // A sum of products: -0 comes out +0.
            assert_eq!(*v, expected, "{tokens} tokens, byte {:#04x}", numbers[t]);
        }
    }
}

/// A row slice of an FP8 matrix keeps its rows' scales (the slice may start inside a block), and
/// `dequantize_row` gives the reference weights.
#[test]
fn fp8_row_slices_and_rows() {
    let (rows, cols) = (150, 300);
    let (m, w) = fp8_matrix(rows, cols, [128, 128], 12);
    let s = m.slice_rows(100, 50).unwrap();
    let x = values(5 * cols, 13, 1.0);
    let (mut all, mut part) = (vec![0f32; 5 * rows], vec![0f32; 5 * 50]);
    m.matmul(&x, &mut all).unwrap();
    s.matmul(&x, &mut part).unwrap();
    for t in 0..5 {
        assert_eq!(
            &part[t * 50..(t + 1) * 50],
            &all[t * rows + 100..(t + 1) * rows]
        );
    }
    let mut row = vec![0f32; cols];
    s.dequantize_row(40, &mut row);
    assert_eq!(row, &w[140 * cols..141 * cols]);
}

#[test]
fn fp8_size_errors_are_returned() {
    let bytes = |n| WeightBytes::from_vec(vec![0u8; n]);
    assert!(matches!(
        QMatrix::fp8(3, 4, bytes(11), vec![1.0], [128, 128]),
        Err(KernelError::Fp8Shape {
            expected_bytes: 12,
            found_bytes: 11,
            ..
        })
    ));
    let message = QMatrix::fp8(200, 4, bytes(800), vec![1.0], [128, 128])
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("2 block scales") && message.contains("1 scales"),
        "{message}"
    );
    assert!(QMatrix::fp8(2, 2, bytes(4), vec![1.0], [0, 128]).is_err());
    assert!(QMatrix::fp8(0, 0, bytes(0), vec![], [128, 128]).is_err());
    assert!(QMatrix::fp8(usize::MAX, 2, bytes(4), vec![1.0], [128, 128]).is_err());
}
