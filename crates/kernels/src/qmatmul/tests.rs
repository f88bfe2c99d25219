//! Kernel-level tests: activation quantization against `tiefsee_gguf::quantize` and every AVX2 dot
//! product against its scalar reference on the same quantized activations.

use tiefsee_gguf::{GgmlType, QK_K, quantize};

use super::activations::{ActFormat, Activations, Token};
use super::{Format, MatmulJob, QMatrix, WeightBytes, matmul_batch_with};
use crate::cpu::{self, Isa};

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

const FORMATS: [(GgmlType, Format); 8] = [
    (GgmlType::Q4_0, Format::Q4_0),
    (GgmlType::Q4_1, Format::Q4_1),
    (GgmlType::Q5_0, Format::Q5_0),
    (GgmlType::Q5_1, Format::Q5_1),
    (GgmlType::Q8_0, Format::Q8_0),
    (GgmlType::Q4_K, Format::Q4K),
    (GgmlType::Q5_K, Format::Q5K),
    (GgmlType::Q6_K, Format::Q6K),
];

#[test]
fn activations_match_the_reference_quantizers() {
    let cols = 4 * QK_K;
    let mut x = values(3 * cols, 7, 2.0);
    x[5] = 0.0;
    x[cols..cols + QK_K].fill(0.0); // an all-zero block of each format
    x[40] = -9.0; // negative extremes choose the Q8_K sign
    // A block whose scale is exactly 1 (Q8_0) or -1 (Q8_K), so that halves are rounding ties: away
    // from zero in Q8_0, to even in Q8_K.
    x[128..134].copy_from_slice(&[127.0, 2.5, -3.5, 0.5, -0.5, 126.5]);
    let mut acts = Activations::default();

    acts.quantize(ActFormat::Q8_0, &x, cols);
    for t in 0..3 {
        let reference = quantize(GgmlType::Q8_0, &x[t * cols..(t + 1) * cols]).unwrap();
        let tok = acts.token(t, 0..cols);
        for (b, block) in reference.chunks_exact(34).enumerate() {
            let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
            assert_eq!(tok.d[b].to_bits(), d.to_bits(), "token {t} block {b} scale");
            let qs: Vec<i8> = block[2..].iter().map(|&q| q as i8).collect();
            assert_eq!(&tok.qs[32 * b..32 * b + 32], &qs[..], "token {t} block {b}");
        }
    }

    acts.quantize(ActFormat::Q8K, &x, cols);
    for t in 0..3 {
        let reference = quantize(GgmlType::Q8_K, &x[t * cols..(t + 1) * cols]).unwrap();
        let tok = acts.token(t, 0..cols);
        for (b, block) in reference.chunks_exact(292).enumerate() {
            let d = f32::from_le_bytes([block[0], block[1], block[2], block[3]]);
            assert_eq!(tok.d[b].to_bits(), d.to_bits(), "token {t} block {b} scale");
            let qs: Vec<i8> = block[4..260].iter().map(|&q| q as i8).collect();
            assert_eq!(
                &tok.qs[QK_K * b..QK_K * (b + 1)],
                &qs[..],
                "token {t} block {b}"
            );
            let bsums: Vec<i16> = block[260..]
                .chunks_exact(2)
                .map(|s| i16::from_le_bytes([s[0], s[1]]))
                .collect();
            assert_eq!(
                &tok.bsums[16 * b..16 * (b + 1)],
                &bsums[..],
                "token {t} block {b} sums"
            );
        }
    }
}

/// Bound on the float reassociation error of a dot product: a few ulps of the sum of |terms|.
fn reassociation_bound(w: &[f32], tok: &Token, block: usize) -> f32 {
    let a = tok
        .qs
        .iter()
        .enumerate()
        .map(|(i, &q)| f32::from(q) * tok.d[i / block]);
    1e-5 * w.iter().zip(a).map(|(w, a)| (w * a).abs()).sum::<f32>() + 1e-30
}

/// A SIMD kernel under test: one row against four tokens, and against one.
type SimdDots<'a> = &'a dyn Fn(&[u8], &[Token; 4], &[Token; 1]) -> ([f32; 4], [f32; 1]);

/// Checks `simd` (one row against four tokens, and against one) for `format` against the scalar dot
/// products, on rows of `cols` values.
fn check_dots_against_scalar(isa: &str, ty: GgmlType, format: Format, cols: usize, simd: SimdDots) {
    let w = values(cols, ty.id().into(), 0.1);
    let row = quantize(ty, &w).unwrap();
    let w = tiefsee_gguf::dequantize(ty, &row, cols).unwrap();
    let x = values(4 * cols, 99, 1.0);
    let mut acts = Activations::default();
    acts.quantize(format.activations(), &x, cols);
    let toks: [Token; 4] = std::array::from_fn(|t| acts.token(t, 0..cols));
    let (four, single) = simd(&row, &toks, &[toks[2]]);
    assert_eq!(
        single[0].to_bits(),
        four[2].to_bits(),
        "{isa} {ty:?} cols {cols}: one token vs four"
    );
    let scalar_dot = format.scalar_dot();
    for (t, tok) in toks.iter().enumerate() {
        let reference = scalar_dot(&row, tok);
        let bound = reassociation_bound(&w, tok, format.activations().block_size());
        assert!(
            (four[t] - reference).abs() <= bound,
            "{isa} {ty:?} cols {cols} token {t}: {} vs scalar {reference} (bound {bound})",
            four[t]
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_dot_products_match_scalar() {
    use super::avx2;
    if cpu::detected() < Isa::Avx2 {
        eprintln!("skipped: this CPU lacks AVX2/FMA/F16C");
        return;
    }
    for (ty, format) in FORMATS {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
        let simd = |row: &[u8], four: &[Token; 4], one: &[Token; 1]| unsafe {
            match format {
                Format::Q4_0 => (avx2::dot_q4_0(row, four), avx2::dot_q4_0(row, one)),
                Format::Q4_1 => (avx2::dot_q4_1(row, four), avx2::dot_q4_1(row, one)),
                Format::Q5_0 => (avx2::dot_q5_0(row, four), avx2::dot_q5_0(row, one)),
                Format::Q5_1 => (avx2::dot_q5_1(row, four), avx2::dot_q5_1(row, one)),
                Format::Q8_0 => (avx2::dot_q8_0(row, four), avx2::dot_q8_0(row, one)),
                Format::Q4K => (avx2::dot_q4_k(row, four), avx2::dot_q4_k(row, one)),
                Format::Q5K => (avx2::dot_q5_k(row, four), avx2::dot_q5_k(row, one)),
                Format::Q6K => (avx2::dot_q6_k(row, four), avx2::dot_q6_k(row, one)),
                Format::F32 | Format::F16 | Format::BF16 | Format::F8E4M3 => {
                    unreachable!("FORMATS are blocks")
                }
            }
        };
        check_dots_against_scalar("avx2", ty, format, 3 * QK_K, &simd);
    }
}

/// The AVX2 float-row kernel against the scalar reference, on a row with a tail of fewer than eight
/// values: within reassociation error, and one token alone the same bits as in a group of four.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_float_rows_match_scalar() {
    use super::float_rows;
    if cpu::detected() < Isa::Avx2 {
        eprintln!("skipped: this CPU lacks AVX2/FMA/F16C");
        return;
    }
    let cols = 301;
    for (ty, format) in [(GgmlType::F32, Format::F32)] {
        let row = quantize(ty, &values(cols, 5, 0.1)).unwrap();
        let w = tiefsee_gguf::dequantize(ty, &row, cols).unwrap();
        let x = values(4 * cols, 6, 1.0);
        let xs: [&[f32]; 4] = std::array::from_fn(|t| &x[t * cols..(t + 1) * cols]);
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
        let (four, one) = unsafe {
            (
                float_rows::dot(format, &row, &xs),
                float_rows::dot(format, &row, &[xs[1]]),
            )
        };
        assert_eq!(
            four[1].to_bits(),
            one[0].to_bits(),
            "{ty:?}: one token vs four"
        );
        for (t, x) in xs.iter().enumerate() {
            let scalar = float_rows::dot_scalar(format, &row, x);
            let bound = 1e-5 * w.iter().zip(*x).map(|(w, x)| (w * x).abs()).sum::<f32>();
            assert!(
                (four[t] - scalar).abs() <= bound,
                "{ty:?} token {t}: {} vs scalar {scalar}",
                four[t]
            );
        }
    }
}

/// The AVX2 FP8 decoder and row kernel against their scalar references, on a row whose blocks are
/// not multiples of sixteen (so every segment has a vector part and a scalar tail) and which holds
/// every byte, with one scale of 2^8 or more: decoding the same bits (NaN codes included), the dot
/// products within reassociation error, and one token alone the same bits as in a group of four.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_fp8_matches_scalar() {
    use super::fp8;
    if cpu::detected() < Isa::Avx2 {
        eprintln!("skipped: this CPU lacks AVX2/FMA/F16C");
        return;
    }
    let (cols, block_cols) = (301usize, 44);
    let row: Vec<u8> = (0..cols).map(|i| (i * 37 % 256) as u8).collect();
    let scales: Vec<f32> = (0..cols.div_ceil(block_cols))
        // Block 2's scale is too large to fold 2^120 into: the two-multiply path.
        .map(|b| {
            if b == 2 {
                300.0
            } else {
                0.01 + b as f32 * 0.003
            }
        })
        .collect();
    for col0 in [0, 5] {
        let n = cols - col0;
        let (mut simd, mut scalar) = (vec![0f32; n], vec![0f32; n]);
        // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
        unsafe { fp8::decode(&row[col0..], &scales, block_cols, col0, &mut simd) };
        fp8::decode_scalar(&row[col0..], &scales, block_cols, col0, &mut scalar);
        for (i, (a, b)) in simd.iter().zip(&scalar).enumerate() {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "from column {col0}, weight {i}: {a} vs {b}"
            );
        }
    }
    let numbers: Vec<u8> = row
        .iter()
        .map(|&b| if b & 0x7F == 0x7F { 0 } else { b })
        .collect();
    let x = values(4 * cols, 6, 1.0);
    let xs: [&[f32]; 4] = std::array::from_fn(|t| &x[t * cols..(t + 1) * cols]);
    // SAFETY: as above.
    let (four, one) = unsafe {
        (
            fp8::dot(&numbers, &scales, block_cols, &xs),
            fp8::dot(&numbers, &scales, block_cols, &[xs[2]]),
        )
    };
    assert_eq!(four[2].to_bits(), one[0].to_bits(), "one token vs four");
    let mut w = vec![0f32; cols];
    fp8::decode_scalar(&numbers, &scales, block_cols, 0, &mut w);
    for (t, x) in xs.iter().enumerate() {
        let scalar = fp8::dot_scalar(&numbers, &scales, block_cols, x);
        let bound = 1e-5 * w.iter().zip(*x).map(|(w, x)| (w * x).abs()).sum::<f32>();
        assert!(
            (four[t] - scalar).abs() <= bound,
            "token {t}: {} vs scalar {scalar}",
            four[t]
        );
    }
}

/// The AVX-512 kernels (Q4_0, Q5_0, Q8_0, Q6_K), on rows of an even and (for the legacy types, whose
/// blocks go in pairs) an odd number of blocks. Runs where the CPU has AVX-512 F/BW/VL and VNNI.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx512_dot_products_match_scalar() {
    use super::avx512;
    if cpu::detected() < Isa::Avx512 {
        eprintln!("skipped: this CPU lacks AVX-512 F/BW/VL/VNNI");
        return;
    }
    for (ty, format) in FORMATS {
        // SAFETY: the CPU has AVX-512 F/BW/VL, VNNI, AVX2, FMA and F16C (checked above).
        let simd = |row: &[u8], four: &[Token; 4], one: &[Token; 1]| unsafe {
            match format {
                Format::Q4_0 => (avx512::dot_q4_0(row, four), avx512::dot_q4_0(row, one)),
                Format::Q5_0 => (avx512::dot_q5_0(row, four), avx512::dot_q5_0(row, one)),
                Format::Q8_0 => (avx512::dot_q8_0(row, four), avx512::dot_q8_0(row, one)),
                Format::Q6K => (avx512::dot_q6_k(row, four), avx512::dot_q6_k(row, one)),
                Format::Q4_1 | Format::Q5_1 | Format::Q4K | Format::Q5K => {
                    unreachable!("filtered out below")
                }
                Format::F32 | Format::F16 | Format::BF16 | Format::F8E4M3 => {
                    unreachable!("FORMATS are blocks")
                }
            }
        };
        if matches!(
            format,
            Format::Q4_1 | Format::Q5_1 | Format::Q4K | Format::Q5K
        ) {
            continue;
        }
        check_dots_against_scalar("avx512", ty, format, 3 * QK_K, &simd);
        if format.activations() == ActFormat::Q8_0 {
            check_dots_against_scalar("avx512", ty, format, 7 * 32, &simd);
        }
    }
}

/// The bf16 and f16 panel kernels sum each token's row as one chain of FMAs over the columns in
/// order, which is what the scalar code does with `mul_add`: the same bits, over every tile shape (one
/// to six tokens, one to four panels at once) and a partial last panel.
#[cfg(target_arch = "x86_64")]
#[test]
fn panels_match_scalar_bit_for_bit() {
    if cpu::detected() < Isa::Avx2 {
        eprintln!("skipped: this CPU lacks AVX2/FMA/F16C");
        return;
    }
    let (rows, cols) = (75, 301);
    for ty in [GgmlType::BF16, GgmlType::F16] {
        let bytes = quantize(ty, &values(rows * cols, 4, 0.05)).unwrap();
        let m = QMatrix::new(ty, rows, cols, WeightBytes::from_vec(bytes)).unwrap();
        panels_against_scalar(ty, &m, cols);
    }
}

fn panels_against_scalar(ty: GgmlType, m: &QMatrix, cols: usize) {
    let rows = m.rows();
    for tokens in [1, 2, 3, 5, 6, 16, 40] {
        let x = values(tokens * cols, tokens as u64, 1.0);
        let (mut fast, mut slow) = (vec![0f32; tokens * rows], vec![0f32; tokens * rows]);
        for (isa, out) in [(Isa::Avx2, &mut fast), (Isa::Scalar, &mut slow)] {
            let job = MatmulJob {
                matrix: m,
                x: &x,
                out,
            };
            matmul_batch_with(isa, &mut [job]).unwrap();
        }
        for (i, (f, s)) in fast.iter().zip(&slow).enumerate() {
            assert_eq!(
                f.to_bits(),
                s.to_bits(),
                "{ty:?} {tokens} tokens, index {i}: {f} vs {s}"
            );
        }
    }
}

/// Whole products through `matmul_batch_with` for every SIMD level this CPU has, against the scalar
/// kernels (AVX-512 falls back to AVX2 for the types it has no kernel for).
#[test]
fn simd_matmul_matches_scalar_matmul() {
    for isa in [Isa::Avx2, Isa::Avx512] {
        if cpu::detected() < isa {
            eprintln!("skipped {}: not supported by this CPU", isa.name());
            continue;
        }
        for (ty, _) in FORMATS {
            let (rows, cols) = (37, 2 * QK_K);
            let bytes = quantize(ty, &values(rows * cols, 3, 0.05)).unwrap();
            let m = QMatrix::new(ty, rows, cols, WeightBytes::from_vec(bytes)).unwrap();
            for tokens in [1, 3, 6, 17] {
                let x = values(tokens * cols, tokens as u64, 1.0);
                let (mut fast, mut slow) = (vec![0f32; tokens * rows], vec![0f32; tokens * rows]);
                for (isa, out) in [(isa, &mut fast), (Isa::Scalar, &mut slow)] {
                    let job = MatmulJob {
                        matrix: &m,
                        x: &x,
                        out,
                    };
                    matmul_batch_with(isa, &mut [job]).unwrap();
                }
                let scale = slow.iter().fold(0f32, |a, v| a.max(v.abs()));
                for (i, (f, s)) in fast.iter().zip(&slow).enumerate() {
                    assert!(
                        (f - s).abs() <= 1e-5 * scale,
                        "{} {ty:?} tokens {tokens} index {i}: {f} vs {s}",
                        isa.name()
                    );
                }
            }
        }
    }
}
