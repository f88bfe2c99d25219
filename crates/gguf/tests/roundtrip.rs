//! Rust writer to Rust reader, and quantization against f32 with a stated error budget.

mod common;

use common::{exact, fixture};
use tiefsee_gguf::{
    GgmlType, GgufError, GgufFile, GgufWriter, MetadataArray, MetadataValue, QK_K, dequantize,
    quantize, quantize_into,
};

/// The fixed quantization input of `quantize.gguf`: 16 rows of 256 values (see make_gguf.py).
fn quantize_input() -> Vec<f32> {
    let file = GgufFile::open(fixture("quantize.gguf")).unwrap();
    file.tensor("input").unwrap().dequantize().unwrap()
}

/// Rows of `quantize_input` holding ordinary data (not the zero, constant, tie, subnormal, overflow and
/// sign-tie edge cases), by row index.
const ORDINARY_ROWS: [usize; 9] = [0, 1, 2, 3, 4, 5, 6, 9, 14];

/// Root-mean-square error of `y` against `x`, relative to the root-mean-square of `x`.
fn relative_rmse(x: &[f32], y: &[f32]) -> f64 {
    let err: f64 = x
        .iter()
        .zip(y)
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
        .sum();
    let norm: f64 = x.iter().map(|&a| f64::from(a).powi(2)).sum();
    (err / norm).sqrt()
}

/// Error budgets: worst relative RMSE over the ordinary rows (measured with margin; llama.cpp's
/// `test-quantize-fns` uses absolute budgets on uniform data of the same order).
fn budget(ty: GgmlType) -> f64 {
    match ty {
        GgmlType::F32 => 0.0,
        GgmlType::F16 => 1e-3,
        GgmlType::BF16 => 4e-3,
        GgmlType::Q8_0 => 0.015,
        GgmlType::Q8_K => 0.025,
        GgmlType::Q6_K => 0.04,
        GgmlType::Q5_1 | GgmlType::Q5_K => 0.07,
        GgmlType::Q5_0 => 0.1,
        GgmlType::Q4_K => 0.13,
        GgmlType::Q4_1 => 0.15,
        GgmlType::Q4_0 => 0.2,
        GgmlType::Q3_K => 0.25,
        GgmlType::Q2_K => 0.45,
    }
}

#[test]
fn quantization_error_is_within_budget() {
    let x = quantize_input();
    for ty in GgmlType::ALL {
        let q = quantize(ty, &x).unwrap();
        assert_eq!(q.len(), ty.bytes_for(x.len()).unwrap());
        let y = dequantize(ty, &q, x.len()).unwrap();
        let worst = ORDINARY_ROWS
            .iter()
            .map(|&r| relative_rmse(&x[r * 256..(r + 1) * 256], &y[r * 256..(r + 1) * 256]))
            .fold(0f64, f64::max);
        println!("{ty:>5}: worst relative rmse {worst:.4}");
        assert!(
            worst <= budget(ty),
            "{ty}: relative rmse {worst} over budget {}",
            budget(ty)
        );
        // Zeros (row 7) come back as zeros, a constant row (8) within the budget.
        assert!(y[7 * 256..8 * 256].iter().all(|&v| v == 0.0), "{ty}: zeros");
        let constant = relative_rmse(&x[8 * 256..9 * 256], &y[8 * 256..9 * 256]);
        assert!(
            constant <= budget(ty),
            "{ty}: constant row error {constant}"
        );
    }
}
