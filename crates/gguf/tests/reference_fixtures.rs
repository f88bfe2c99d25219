//! The reader, the codecs and the writer against the `gguf` Python package (0.19.0) and llama.cpp's
//! reference quantizers, through the files `tests/fixtures/make_gguf.py` wrote: everything must match
//! bit for bit.

mod common;

use common::{exact, fixture};
use serde_json::Value;
use tiefsee_gguf::{
    GgmlType, GgufError, GgufFile, GgufWriter, MetadataArray, MetadataValue, dequantize, quantize,
};

const FILES: [&str; 3] = ["types.gguf", "align64.gguf", "quantize.gguf"];

/// `expected.json`: what the Python package reads from each fixture.
fn expected() -> Value {
    let text = std::fs::read_to_string(fixture("expected.json")).expect("read expected.json");
    serde_json::from_str(&text).expect("parse expected.json")
}

/// `dequant.f32.bin`: the package's dequantized values, little-endian f32.
fn python_dequantized() -> Vec<f32> {
    let bytes = std::fs::read(fixture("dequant.f32.bin")).expect("read dequant.f32.bin");
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// A metadata value as `expected.json` spells it (`{"t": "u32", "v": 7}`, floats as `"bits"`).
fn json_value(node: &Value) -> MetadataValue {
    let t = node["t"].as_str().expect("node type");
    let int = || node["v"].as_i64().expect("integer");
    let uint = || node["v"].as_u64().expect("unsigned integer");
    let bits = || node["bits"].as_u64().expect("float bits");
    match t {
        "u8" => MetadataValue::U8(uint() as u8),
        "i8" => MetadataValue::I8(int() as i8),
        "u16" => MetadataValue::U16(uint() as u16),
        "i16" => MetadataValue::I16(int() as i16),
        "u32" => MetadataValue::U32(uint() as u32),
        "i32" => MetadataValue::I32(int() as i32),
        "u64" => MetadataValue::U64(uint()),
        "i64" => MetadataValue::I64(int()),
        "f32" => MetadataValue::F32(f32::from_bits(bits() as u32)),
        "f64" => MetadataValue::F64(f64::from_bits(bits())),
        "bool" => MetadataValue::Bool(node["v"].as_bool().expect("bool")),
        "str" => MetadataValue::String(node["v"].as_str().expect("string").to_owned()),
        "arr" => MetadataValue::Array(json_array(node)),
        other => panic!("unknown node type {other}"),
    }
}

/// An array node (`{"t": "arr", "elem": "i32", "items": [...]}`).
fn json_array(node: &Value) -> MetadataArray {
    let items: Vec<MetadataValue> = node["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(json_value)
        .collect();
    macro_rules! collect {
        ($variant:ident) => {
            MetadataArray::$variant(
                items
                    .into_iter()
                    .map(|v| match v {
                        MetadataValue::$variant(x) => x,
                        other => panic!("mixed array: {other:?}"),
                    })
                    .collect(),
            )
        };
    }
    match node["elem"].as_str().expect("elem") {
        "u8" => collect!(U8),
        "i8" => collect!(I8),
        "u16" => collect!(U16),
        "i16" => collect!(I16),
        "u32" => collect!(U32),
        "i32" => collect!(I32),
        "u64" => collect!(U64),
        "i64" => collect!(I64),
        "f32" => collect!(F32),
        "f64" => collect!(F64),
        "bool" => collect!(Bool),
        "str" => collect!(String),
        "arr" => collect!(Array),
        other => panic!("unknown element type {other}"),
    }
}

fn file_entry<'a>(expected: &'a Value, name: &str) -> &'a Value {
    &expected["files"][name]
}

fn as_usize(v: &Value) -> usize {
    v.as_u64().expect("unsigned") as usize
}

#[test]
fn header_and_metadata_read_as_python_reads_them() {
    let expected = expected();
    for name in FILES {
        let file = GgufFile::open(fixture(name)).unwrap();
        let e = file_entry(&expected, name);
        assert_eq!(file.version(), as_usize(&e["version"]) as u32, "{name}");
        assert_eq!(file.alignment(), as_usize(&e["alignment"]), "{name}");
        assert_eq!(file.data_offset(), as_usize(&e["data_offset"]), "{name}");
        let want = e["metadata"].as_array().unwrap();
        assert_eq!(file.metadata().len(), want.len(), "{name}");
        for ((key, value), w) in file.metadata().iter().zip(want) {
            assert_eq!(key, w["key"].as_str().unwrap(), "{name}: key order");
            assert_eq!(
                exact(value),
                exact(&json_value(&w["value"])),
                "{name}: {key}"
            );
        }
    }
}

#[test]
fn tensor_infos_read_as_python_reads_them() {
    let expected = expected();
    for name in FILES {
        let file = GgufFile::open(fixture(name)).unwrap();
        let want = file_entry(&expected, name)["tensors"].as_array().unwrap();
        assert_eq!(file.tensor_infos().len(), want.len(), "{name}");
        for (info, w) in file.tensor_infos().iter().zip(want) {
            let ne: Vec<usize> = w["ne"].as_array().unwrap().iter().map(as_usize).collect();
            assert_eq!(info.name(), w["name"].as_str().unwrap());
            assert_eq!(
                info.ggml_type().id(),
                as_usize(&w["type"]) as u32,
                "{}",
                info.name()
            );
            assert_eq!(info.ne(), ne.as_slice(), "{}", info.name());
            let mut shape = ne.clone();
            shape.reverse();
            assert_eq!(info.shape(), shape, "{}", info.name());
            assert_eq!(
                info.offset(),
                w["offset"].as_u64().unwrap(),
                "{}",
                info.name()
            );
            assert_eq!(info.n_bytes(), as_usize(&w["n_bytes"]), "{}", info.name());
            assert_eq!(
                info.n_elements(),
                as_usize(&w["n_elements"]),
                "{}",
                info.name()
            );
            assert_eq!(
                info.file_offset(),
                file.data_offset() + info.offset() as usize
            );
        }
    }
}

#[test]
fn dequantization_matches_python_bit_for_bit() {
    let expected = expected();
    let values = python_dequantized();
    let mut types_seen = Vec::new();
    for name in FILES {
        let file = GgufFile::open(fixture(name)).unwrap();
        let want = file_entry(&expected, name)["tensors"].as_array().unwrap();
        for (tensor, w) in file.tensors().zip(want) {
            let Some(at) = w["dequant"].as_object() else {
                continue; // Q8_K: the package has no dequantizer for it.
            };
            let (offset, len) = (as_usize(&at["offset"]), as_usize(&at["len"]));
            let got = tensor.dequantize().unwrap();
            assert_eq!(got.len(), len, "{}", tensor.info.name());
            for (i, (g, p)) in got.iter().zip(&values[offset..offset + len]).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    p.to_bits(),
                    "{name}: {} ({}) element {i}: {g} vs Python {p}",
                    tensor.info.name(),
                    tensor.info.ggml_type()
                );
            }
            types_seen.push(tensor.info.ggml_type());
        }
    }
    for t in GgmlType::ALL.into_iter().filter(|&t| t != GgmlType::Q8_K) {
        assert!(types_seen.contains(&t), "no fixture dequantizes {t}");
    }
}

#[test]
fn quantization_matches_python_byte_for_byte() {
    let expected = expected();
    let file = GgufFile::open(fixture("quantize.gguf")).unwrap();
    let input = file.tensor("input").unwrap().dequantize().unwrap();
    let types = expected["python_quantized"].as_array().unwrap();
    assert_eq!(types.len(), 7);
    for t in types {
        let t = t.as_str().unwrap();
        let python = file.tensor(&t.to_lowercase()).unwrap();
        let ty = python.info.ggml_type();
        assert_eq!(ty.name(), t);
        let ours = quantize(ty, &input).unwrap();
        if ours != python.data {
            let block = ty.type_size();
            let first = ours
                .chunks(block)
                .zip(python.data.chunks(block))
                .position(|(a, b)| a != b)
                .unwrap();
            panic!(
                "{t}: block {first} (values {}..) differs: ours {:?}, Python {:?}",
                first * ty.block_size(),
                &ours[first * block..(first + 1) * block],
                &python.data[first * block..(first + 1) * block]
            );
        }
        // And the bytes decode to what the package decodes them to (checked above) and back.
        assert_eq!(
            exact(&dequantize(ty, &ours, input.len()).unwrap()),
            exact(&python.dequantize().unwrap())
        );
    }
}

#[test]
fn k_quantization_matches_llama_cpp_byte_for_byte() {
    let file = GgufFile::open(fixture("kquants_llamacpp.gguf")).unwrap();
    let input = file.tensor("input").unwrap().dequantize().unwrap();
    assert_eq!(input.len(), 64 * 256);
    for ty in [
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
    ] {
        let reference = file.tensor(&ty.name().to_lowercase()).unwrap();
        assert_eq!(reference.info.ggml_type(), ty);
        let ours = quantize(ty, &input).unwrap();
        let block = ty.type_size();
        let differing: Vec<usize> = ours
            .chunks(block)
            .zip(reference.data.chunks(block))
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i)
            .collect();
        assert!(
            differing.is_empty(),
            "{ty}: blocks {differing:?} differ from llama.cpp's"
        );
    }
}

#[test]
fn writer_reproduces_the_python_files_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    for name in FILES {
        let file = GgufFile::open(fixture(name)).unwrap();
        let mut writer = GgufWriter::new();
        for (key, value) in file.metadata().iter() {
            writer.set(key, value.clone()).unwrap();
        }
        for info in file.tensor_infos() {
            writer
                .add_tensor(info.name(), &info.shape(), info.ggml_type())
                .unwrap();
        }
        let out = dir.path().join(name);
        let mut data = writer.create(&out).unwrap();
        for tensor in file.tensors() {
            data.write_tensor(tensor.info.name(), tensor.data).unwrap();
        }
        data.finish().unwrap();
        let ours = std::fs::read(&out).unwrap();
        let python = std::fs::read(fixture(name)).unwrap();
        assert_eq!(ours.len(), python.len(), "{name}: length");
        if let Some(i) = ours.iter().zip(&python).position(|(a, b)| a != b) {
            panic!("{name}: first difference at byte {i}");
        }
    }
}

#[test]
fn version_2_files_read_like_version_3() {
    let bytes = std::fs::read(fixture("types.gguf")).unwrap();
    let mut v2 = bytes.clone();
    v2[4..8].copy_from_slice(&2u32.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.gguf");
    std::fs::write(&path, &v2).unwrap();
    let a = GgufFile::open(fixture("types.gguf")).unwrap();
    let b = GgufFile::open(&path).unwrap();
    assert_eq!(b.version(), 2);
    assert_eq!(
        exact(&a.metadata().iter().collect::<Vec<_>>()),
        exact(&b.metadata().iter().collect::<Vec<_>>())
    );
    assert_eq!(a.tensor_infos(), b.tensor_infos());
    for (x, y) in a.tensors().zip(b.tensors()) {
        assert_eq!(x.data, y.data);
    }
}

#[test]
fn typed_accessors_are_strict_and_name_the_key() {
    let file = GgufFile::open(fixture("types.gguf")).unwrap();
    let md = file.metadata();
    assert_eq!(md.get_str("general.architecture").unwrap(), "tiefsee-test");
    assert_eq!(md.get_u32("deepseek2.block_count").unwrap(), 27);
    assert_eq!(
        md.get_f32("deepseek2.attention.layer_norm_rms_epsilon")
            .unwrap(),
        1e-6
    );
    assert!(!md.get_bool("deepseek2.expert_weights_norm").unwrap());
    assert_eq!(md.get_u8("test.u8").unwrap(), 200);
    assert_eq!(md.get_i8("test.i8").unwrap(), -100);
    assert_eq!(md.get_u16("test.u16").unwrap(), 60000);
    assert_eq!(md.get_i16("test.i16").unwrap(), -30000);
    assert_eq!(md.get_i32("test.i32").unwrap(), -2_000_000_000);
    assert_eq!(md.get_u64("test.u64").unwrap(), u64::MAX - 4);
    assert_eq!(md.get_i64("test.i64").unwrap(), i64::MIN + 7);
    assert_eq!(md.get_f64("test.f64").unwrap(), std::f64::consts::E);
    assert_eq!(md.get_str("test.string_empty").unwrap(), "");
    let tokens = md.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 300);
    assert_eq!(tokens[5], "<｜begin▁of▁sentence｜>");
    assert_eq!(
        md.get_f32_array("tokenizer.ggml.scores").unwrap().len(),
        300
    );
    assert_eq!(
        md.get_i32_array("tokenizer.ggml.token_type").unwrap().len(),
        300
    );
    assert_eq!(
        md.get_u8_array("test.arr_u8").unwrap(),
        [0, 1, 127, 128, 255]
    );
    assert_eq!(
        md.get_bool_array("test.arr_bool").unwrap(),
        [true, false, true]
    );
    assert_eq!(md.get_array("test.nested_deep").unwrap().len(), 2);

    let err = md.get_u64("deepseek2.block_count").unwrap_err();
    assert!(matches!(err, GgufError::WrongType { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("types.gguf")
            && msg.contains("deepseek2.block_count")
            && msg.contains("u32")
            && msg.contains("u64"),
        "{msg}"
    );
    let msg = md
        .get_str_array("tokenizer.ggml.scores")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("array of f32") && msg.contains("array of string"),
        "{msg}"
    );
    let err = md
        .get_u32("deepseek2.leading_dense_block_count")
        .unwrap_err();
    assert!(matches!(err, GgufError::MissingKey { .. }), "{err}");
    assert!(md.get("deepseek2.leading_dense_block_count").is_none());
    let err = file.tensor("output.weight").unwrap_err();
    assert!(err.to_string().contains("output.weight"), "{err}");
    assert!(file.contains_tensor("q4_k.3d"));
}
