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

/// One value of every type, arrays of every element type (empty ones too), nested arrays.
fn every_value() -> Vec<(&'static str, MetadataValue)> {
    use MetadataArray as A;
    use MetadataValue as V;
    vec![
        ("general.architecture", V::String("deepseek2".into())),
        ("u8", V::U8(255)),
        ("i8", V::I8(-128)),
        ("u16", V::U16(65535)),
        ("i16", V::I16(-32768)),
        ("u32", V::U32(u32::MAX)),
        ("i32", V::I32(i32::MIN)),
        ("f32", V::F32(-0.0)),
        ("bool", V::Bool(true)),
        ("string", V::String("ünïcödé ✓\0nul".into())),
        ("string.empty", V::String(String::new())),
        ("u64", V::U64(u64::MAX)),
        ("i64", V::I64(i64::MIN)),
        ("f64", V::F64(f64::MIN_POSITIVE)),
        ("arr.u8", V::Array(A::U8(vec![1, 2, 3]))),
        ("arr.i8", V::Array(A::I8(vec![-1, 0, 1]))),
        ("arr.u16", V::Array(A::U16(vec![0, 65535]))),
        ("arr.i16", V::Array(A::I16(vec![-32768, 32767]))),
        ("arr.u32", V::Array(A::U32(vec![0, u32::MAX]))),
        ("arr.i32", V::Array(A::I32(vec![i32::MIN, i32::MAX]))),
        (
            "arr.f32",
            V::Array(A::F32(vec![f32::INFINITY, -0.0, 1e-45])),
        ),
        ("arr.bool", V::Array(A::Bool(vec![false, true]))),
        (
            "arr.string",
            V::Array(A::String(vec!["".into(), "Ġthe".into()])),
        ),
        ("arr.u64", V::Array(A::U64(vec![u64::MAX]))),
        ("arr.i64", V::Array(A::I64(vec![i64::MIN]))),
        ("arr.f64", V::Array(A::F64(vec![f64::NEG_INFINITY, 0.1]))),
        ("arr.empty_f32", V::Array(A::F32(vec![]))),
        ("arr.empty_string", V::Array(A::String(vec![]))),
        (
            "arr.nested",
            V::Array(A::Array(vec![
                A::I32(vec![1, 2]),
                A::String(vec!["x".into()]),
                A::Array(vec![A::U8(vec![]), A::F64(vec![2.5])]),
                A::Bool(vec![]),
            ])),
        ),
        ("arr.empty_nested", V::Array(A::Array(vec![]))),
    ]
}

/// A shape for each type, with rows of whole blocks.
fn shape_for(ty: GgmlType) -> Vec<usize> {
    match ty.block_size() {
        1 => vec![3, 1, 5],
        32 => vec![2, 96],
        _ => vec![2, 1, 2, QK_K],
    }
}

#[test]
fn everything_written_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    for alignment in [None, Some(1u32), Some(256)] {
        let mut w = GgufWriter::new();
        let mut values = every_value();
        if let Some(a) = alignment {
            values.insert(1, ("general.alignment", MetadataValue::U32(a)));
        }
        for (k, v) in &values {
            w.set(*k, v.clone()).unwrap();
        }
        let mut data = Vec::new();
        for (i, ty) in GgmlType::ALL.into_iter().enumerate() {
            let shape = shape_for(ty);
            let n_bytes = ty.bytes_for(shape.iter().product()).unwrap();
            let bytes: Vec<u8> = (0..n_bytes).map(|j| (j * 31 + i * 7) as u8).collect();
            w.add_tensor(format!("blk.{i}.{}", ty.name()), &shape, ty)
                .unwrap();
            data.push(bytes);
        }
        w.add_tensor("scalar", &[], GgmlType::F32).unwrap();
        w.add_tensor("empty", &[0, 64], GgmlType::Q8_0).unwrap();
        let path = dir.path().join("all.gguf");
        let mut out = w.create(&path).unwrap();
        for (i, ty) in GgmlType::ALL.into_iter().enumerate() {
            out.write_tensor(&format!("blk.{i}.{}", ty.name()), &data[i])
                .unwrap();
        }
        out.write_tensor("scalar", &7.5f32.to_le_bytes()).unwrap();
        out.write_tensor("empty", &[]).unwrap();
        out.finish().unwrap();

        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.version(), 3);
        let align = alignment.map_or(32, |a| a as usize);
        assert_eq!(file.alignment(), align);
        assert_eq!(file.data_offset() % align, 0);
        let read: Vec<(&str, &MetadataValue)> = file.metadata().iter().collect();
        let written: Vec<(&str, &MetadataValue)> = values.iter().map(|(k, v)| (*k, v)).collect();
        assert_eq!(exact(&read), exact(&written));
        for (i, ty) in GgmlType::ALL.into_iter().enumerate() {
            let t = file.tensor(&format!("blk.{i}.{}", ty.name())).unwrap();
            assert_eq!(t.info.ggml_type(), ty);
            assert_eq!(t.info.shape(), shape_for(ty));
            assert_eq!(t.info.file_offset() % align, 0);
            assert_eq!(t.data, data[i].as_slice());
        }
        let scalar = file.tensor("scalar").unwrap();
        assert_eq!(
            (scalar.info.ne(), scalar.dequantize().unwrap()),
            (&[][..], vec![7.5])
        );
        assert_eq!(file.tensor("empty").unwrap().info.ne(), [64, 0]);
    }
}

#[test]
fn tensors_can_be_streamed_in_parts() {
    let dir = tempfile::tempdir().unwrap();
    let x: Vec<f32> = (0..4 * QK_K).map(|i| (i as f32 * 0.37).sin()).collect();
    let q = quantize(GgmlType::Q6_K, &x).unwrap();
    let mut w = GgufWriter::new();
    w.add_tensor("w", &[4, QK_K], GgmlType::Q6_K).unwrap();
    w.add_tensor("b", &[3], GgmlType::F32).unwrap();
    let path = dir.path().join("parts.gguf");
    let mut out = w.create(&path).unwrap();
    for row in q.chunks(GgmlType::Q6_K.type_size()) {
        out.write_tensor_part("w", row).unwrap();
    }
    out.write_tensor_part("b", &[0; 4]).unwrap();
    out.write_tensor_part("b", &[1; 8]).unwrap();
    out.finish().unwrap();
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.tensor("w").unwrap().data, q.as_slice());
    assert_eq!(
        file.tensor("b").unwrap().data,
        [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    );
}

#[test]
fn writer_mistakes_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = GgufWriter::new();
    w.set("a", MetadataValue::U8(1)).unwrap();
    let invalid = |r: tiefsee_gguf::Result<()>| match r {
        Err(GgufError::InvalidWrite(msg)) => msg,
        other => panic!("expected InvalidWrite, got {other:?}"),
    };
    assert!(invalid(w.set("a", MetadataValue::U8(2))).contains("twice"));
    assert!(invalid(w.set("general.alignment", MetadataValue::U32(48))).contains("power of two"));
    assert!(invalid(w.set("general.alignment", MetadataValue::U64(64))).contains("u32"));
    assert!(invalid(w.add_tensor("q", &[4, 100], GgmlType::Q4_K)).contains("256"));
    assert!(invalid(w.add_tensor("q", &[1, 1, 1, 1, 32], GgmlType::Q8_0)).contains("at most 4"));
    assert!(invalid(w.add_tensor("q", &[usize::MAX, 64], GgmlType::Q8_0)).contains("too large"));
    w.add_tensor("t0", &[32], GgmlType::Q8_0).unwrap();
    assert!(invalid(w.add_tensor("t0", &[32], GgmlType::Q8_0)).contains("twice"));
    w.add_tensor("t1", &[2], GgmlType::F16).unwrap();

    let mut out = w.clone().create(dir.path().join("w.gguf")).unwrap();
    assert!(invalid(out.write_tensor("t1", &[0; 4])).contains("due next"));
    assert!(invalid(out.write_tensor("t0", &[0; 33])).contains("34 bytes"));
    assert!(invalid(out.write_tensor_part("t0", &[0; 35])).contains("34 bytes"));
    out.write_tensor_part("t0", &[0; 30]).unwrap();
    assert!(invalid(out.write_tensor("t0", &[0; 34])).contains("partial"));
    out.write_tensor_part("t0", &[0; 4]).unwrap();
    assert!(invalid(out.finish()).contains("t1"));

    let mut out = w.create(dir.path().join("w2.gguf")).unwrap();
    out.write_tensor("t0", &[0; 34]).unwrap();
    out.write_tensor("t1", &[0; 4]).unwrap();
    assert!(invalid(out.write_tensor("t2", &[])).contains("already written"));
    out.finish().unwrap();
    let err = GgufWriter::new()
        .create(dir.path().join("no/such/dir.gguf"))
        .err()
        .unwrap();
    assert!(matches!(err, GgufError::Io { .. }), "{err}");
}

#[test]
fn codec_size_mismatches_are_errors() {
    let err = quantize(GgmlType::Q4_K, &[0.0; 100]).unwrap_err();
    assert!(
        err.to_string().contains("Q4_K") && err.to_string().contains("256"),
        "{err}"
    );
    assert!(dequantize(GgmlType::Q8_0, &[0; 33], 32).is_err());
    assert!(dequantize(GgmlType::Q8_0, &[0; 34], 31).is_err());
    let mut small = [0u8; 10];
    assert!(quantize_into(GgmlType::F16, &[1.0; 6], &mut small).is_err());
}

#[test]
fn parallel_quantization_equals_block_by_block() {
    // Spans several parallel tasks (16k values each) and a partial last task.
    let x: Vec<f32> = (0..157 * QK_K)
        .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
        .collect();
    for ty in [GgmlType::Q4_K, GgmlType::Q8_0, GgmlType::BF16] {
        let whole = quantize(ty, &x).unwrap();
        let by_block: Vec<u8> = x
            .chunks(ty.block_size())
            .flat_map(|b| quantize(ty, b).unwrap())
            .collect();
        assert_eq!(whole, by_block, "{ty}");
    }
}

/// Writes every type quantized by Rust beside its Rust dequantization, with the metadata of
/// `types.gguf`, and reads it back. With `TIEFSEE_GGUF_KEEP=path` the file is kept there, for
/// `tests/fixtures/make_gguf.py --check path` to verify with the Python package.
#[test]
fn rust_quantized_file_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = std::env::var_os("TIEFSEE_GGUF_KEEP")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| dir.path().join("rust.gguf"));
    let x = quantize_input();
    let types = GgufFile::open(fixture("types.gguf")).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in types.metadata().iter() {
        w.set(k, v.clone()).unwrap();
    }
    w.add_tensor("input", &[16, 256], GgmlType::F32).unwrap();
    let mut planned = Vec::new();
    for ty in GgmlType::ALL.into_iter().filter(|&t| t != GgmlType::F32) {
        let q = quantize(ty, &x).unwrap();
        let y = dequantize(ty, &q, x.len()).unwrap();
        let name = ty.name().to_lowercase();
        w.add_tensor(name.clone(), &[16, 256], ty).unwrap();
        w.add_tensor(format!("{name}.dequant"), &[16, 256], GgmlType::F32)
            .unwrap();
        planned.push((name, q, y));
    }
    let f32_bytes = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
    let mut out = w.create(&path).unwrap();
    out.write_tensor("input", &f32_bytes(&x)).unwrap();
    for (name, q, y) in &planned {
        out.write_tensor(name, q).unwrap();
        out.write_tensor(&format!("{name}.dequant"), &f32_bytes(y))
            .unwrap();
    }
    out.finish().unwrap();

    let file = GgufFile::open(&path).unwrap();
    assert_eq!(
        exact(&file.metadata().iter().collect::<Vec<_>>()),
        exact(&types.metadata().iter().collect::<Vec<_>>())
    );
    for (name, q, y) in &planned {
        let t = file.tensor(name).unwrap();
        assert_eq!(t.data, q.as_slice());
        assert_eq!(exact(&t.dequantize().unwrap()), exact(y));
    }
}
