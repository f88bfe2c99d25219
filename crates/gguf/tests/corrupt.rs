//! Truncated and corrupted files are refused with an error naming the file, never a panic, an
//! out-of-bounds read or an allocation sized by a corrupt count.

mod common;

use std::path::{Path, PathBuf};

use common::fixture;
use tiefsee_gguf::{GgufError, GgufFile, GgufWriter, MetadataArray, MetadataValue};

/// Writes `bytes` as a GGUF file in `dir` and opens it.
fn open_bytes(dir: &Path, bytes: &[u8]) -> (PathBuf, tiefsee_gguf::Result<GgufFile>) {
    let path = dir.join("corrupt.gguf");
    std::fs::write(&path, bytes).unwrap();
    let result = GgufFile::open(&path);
    (path, result)
}

/// Opens `bytes` and returns the error it must produce, checking that the message names the file.
fn open_err(dir: &Path, bytes: &[u8]) -> GgufError {
    let (_, result) = open_bytes(dir, bytes);
    let err = result.err().expect("a corrupt file was accepted");
    assert!(err.to_string().contains("corrupt.gguf"), "{err}");
    err
}

/// The unique position of `needle` in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> usize {
    let hits: Vec<usize> = haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(hits.len(), 1, "pattern {needle:?} not unique");
    hits[0]
}

/// A GGUF string as stored: u64 length, then the bytes.
fn gguf_string(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// Position just after metadata key `key` (where its u32 value type is).
fn kv_type_at(bytes: &[u8], key: &str) -> usize {
    let pattern = gguf_string(key);
    find(bytes, &pattern) + pattern.len()
}

/// Positions of a tensor info's fields: (n_dims, first dim, type, offset).
fn tensor_fields(bytes: &[u8], name: &str, n_dims: usize) -> (usize, usize, usize, usize) {
    let mut pattern = gguf_string(name);
    pattern.extend_from_slice(&(n_dims as u32).to_le_bytes());
    let n_dims_at = find(bytes, &pattern) + pattern.len() - 4;
    let dims_at = n_dims_at + 4;
    let type_at = dims_at + 8 * n_dims;
    (n_dims_at, dims_at, type_at, type_at + 4)
}

fn put_u32(bytes: &mut [u8], at: usize, v: u32) {
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn truncation_anywhere_before_the_end_of_the_data_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("types.gguf")).unwrap();
    let file = GgufFile::open(fixture("types.gguf")).unwrap();
    let data_end = file
        .tensor_infos()
        .iter()
        .map(|t| t.file_offset() + t.n_bytes())
        .max()
        .unwrap();
    let dense_end = (file.data_offset() + 256).min(data_end);
    drop(file);
    // Every cut in the header and the first tensors, then every 7th byte.
    let cuts = (0..dense_end).chain((dense_end..data_end).step_by(7));
    let mut n = 0;
    for cut in cuts {
        open_err(dir.path(), &bytes[..cut]);
        n += 1;
    }
    assert!(n > 9000);
    // The trailing padding after the last tensor is not needed.
    let (_, ok) = open_bytes(dir.path(), &bytes[..data_end]);
    ok.unwrap();
}

#[test]
fn flipped_header_bytes_are_errors_and_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("types.gguf")).unwrap();
    let file = GgufFile::open(fixture("types.gguf")).unwrap();
    let header_len = file.data_offset();
    // Bytes whose corruption must be detected: the fixed header, every value type id, and every tensor
    // info's n_dims, dims (of tensors with data), type and offset.
    let mut structural: Vec<usize> = (0..24).collect();
    for (key, _) in file.metadata().iter() {
        let at = kv_type_at(&bytes, key);
        structural.extend(at..at + 4);
    }
    for t in file.tensor_infos() {
        let (n_dims_at, dims_at, type_at, offset_at) =
            tensor_fields(&bytes, t.name(), t.ne().len());
        structural.extend(n_dims_at..n_dims_at + 4);
        if t.n_bytes() > 0 {
            structural.extend(dims_at..dims_at + 8 * t.ne().len());
        }
        structural.extend(type_at..type_at + 4);
        structural.extend(offset_at..offset_at + 8);
    }
    drop(file);
    let mut errors = 0;
    for i in 0..header_len {
        let mut corrupt = bytes.clone();
        corrupt[i] ^= 0xFF;
        let (_, result) = open_bytes(dir.path(), &corrupt);
        match result {
            Err(_) => errors += 1,
            Ok(f) => {
                assert!(!structural.contains(&i), "flipping byte {i} went unnoticed");
                // Whatever was accepted must be safe to use.
                for t in f.tensors() {
                    assert_eq!(t.data.len(), t.info.n_bytes());
                    let _ = t.dequantize();
                }
            }
        }
    }
    assert!(errors >= structural.len(), "{errors} errors");
}

#[test]
fn corrupt_headers_get_the_right_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = std::fs::read(fixture("types.gguf")).unwrap();
    let patched = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        f(&mut b);
        open_err(d, &b)
    };

    let err = open_err(d, &[]);
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
    let err = patched(&|b| b[0..4].copy_from_slice(b"GGML"));
    assert!(matches!(err, GgufError::BadMagic { .. }), "{err}");
    for version in [0u32, 1, 4, 0x0300_0000] {
        let err = patched(&|b| put_u32(b, 4, version));
        assert!(matches!(err, GgufError::UnsupportedVersion { .. }), "{err}");
    }
    let err = patched(&|b| put_u32(b, 4, 0x0300_0000));
    assert!(err.to_string().contains("big-endian"), "{err}");

    // Counts and lengths far beyond the file: refused before anything is allocated.
    let err = patched(&|b| put_u64(b, 8, u64::MAX));
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
    let err = patched(&|b| put_u64(b, 16, 1 << 40));
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
    let err = patched(&|b| {
        let at = find(b, &gguf_string("test.u8"));
        put_u64(b, at, u64::MAX - 3);
    });
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
    let err = patched(&|b| {
        // tokenizer.ggml.tokens: type ARRAY, element type STRING, then the count.
        let at = kv_type_at(b, "tokenizer.ggml.tokens") + 8;
        put_u64(b, at, u64::MAX / 2);
    });
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
    assert!(err.to_string().contains("tokenizer.ggml.tokens"), "{err}");

    let err = patched(&|b| {
        let at = kv_type_at(b, "test.u8");
        put_u32(b, at, 13);
    });
    assert!(matches!(err, GgufError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("test.u8"), "{err}");
    let err = patched(&|b| {
        let at = find(b, "héllo".as_bytes());
        b[at] = 0xFF;
    });
    assert!(err.to_string().contains("UTF-8"), "{err}");
    let err = patched(&|b| {
        let at = find(b, &gguf_string("test.i8"));
        b[at + 8..at + 15].copy_from_slice(b"test.u8");
    });
    assert!(matches!(err, GgufError::DuplicateKey { .. }), "{err}");

    let err = patched(&|b| {
        let at = find(b, &gguf_string("q5_0"));
        b[at + 8..at + 12].copy_from_slice(b"q4_1");
    });
    assert!(matches!(err, GgufError::DuplicateTensor { .. }), "{err}");
    let err = patched(&|b| {
        let (_, _, type_at, _) = tensor_fields(b, "q8_0", 2);
        put_u32(b, type_at, 16);
    });
    assert!(matches!(err, GgufError::UnsupportedType { .. }), "{err}");
    assert!(err.to_string().contains("IQ2_XXS (id 16)"), "{err}");
    let err = patched(&|b| {
        let (_, _, type_at, _) = tensor_fields(b, "q8_0", 2);
        put_u32(b, type_at, 99);
    });
    assert!(err.to_string().contains("unknown ggml type id 99"), "{err}");
    let err = patched(&|b| {
        let (n_dims_at, _, _, _) = tensor_fields(b, "q8_0", 2);
        put_u32(b, n_dims_at, 5);
    });
    assert!(matches!(err, GgufError::InvalidTensor { .. }), "{err}");
    let err = patched(&|b| {
        let (_, dims_at, _, _) = tensor_fields(b, "q8_0", 2);
        put_u64(b, dims_at, 48);
    });
    assert!(err.to_string().contains("block size 32"), "{err}");
    let err = patched(&|b| {
        let (_, dims_at, _, _) = tensor_fields(b, "f32.odd", 3);
        put_u64(b, dims_at + 8, u64::MAX / 2);
    });
    assert!(matches!(err, GgufError::InvalidTensor { .. }), "{err}");
    let err = patched(&|b| {
        let (_, _, _, offset_at) = tensor_fields(b, "q4_1", 1);
        put_u64(b, offset_at, 1216 + 1);
    });
    assert!(matches!(err, GgufError::UnalignedTensor { .. }), "{err}");
    let err = patched(&|b| {
        // q4_1 onto q8_0's data (offset 672).
        let (_, _, _, offset_at) = tensor_fields(b, "q4_1", 1);
        put_u64(b, offset_at, 672);
    });
    assert!(matches!(err, GgufError::OverlappingTensors { .. }), "{err}");
    let err = patched(&|b| {
        let (_, _, _, offset_at) = tensor_fields(b, "q4_1", 1);
        put_u64(b, offset_at, u64::MAX - 31);
    });
    assert!(matches!(err, GgufError::TensorOutOfBounds { .. }), "{err}");
}

#[test]
fn bad_alignments_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(fixture("align64.gguf")).unwrap();
    let at = kv_type_at(&good, "general.alignment");
    for value in [0u32, 48] {
        let mut b = good.clone();
        put_u32(&mut b, at + 4, value);
        let err = open_err(dir.path(), &b);
        assert!(matches!(err, GgufError::BadAlignment { .. }), "{err}");
    }
    let mut b = good.clone();
    put_u32(&mut b, at, 5); // i32 instead of u32
    let err = open_err(dir.path(), &b);
    assert!(err.to_string().contains("i32"), "{err}");
}

#[test]
fn deeply_nested_arrays_are_refused_not_recursed_into() {
    let dir = tempfile::tempdir().unwrap();
    let nested = |levels: usize| {
        let mut a = MetadataArray::U8(vec![1]);
        for _ in 1..levels {
            a = MetadataArray::Array(vec![a]);
        }
        MetadataValue::Array(a)
    };
    for (levels, ok) in [(16, true), (17, false), (1_000, false)] {
        let mut w = GgufWriter::new();
        w.set("deep", nested(levels)).unwrap();
        let path = dir.path().join(format!("deep{levels}.gguf"));
        w.create(&path).unwrap().finish().unwrap();
        let result = GgufFile::open(&path);
        assert_eq!(result.is_ok(), ok, "{levels} levels");
        if let Err(e) = result {
            assert!(e.to_string().contains("nests arrays"), "{e}");
        }
    }
}
