//! GGUF metadata: typed key/value pairs (`deepseek2.block_count`, `tokenizer.ggml.tokens`, ...).
//!
//! Value types and ids follow ggml's `docs/gguf.md` (`enum gguf_metadata_value_type`). Arrays carry one
//! element type; an array of arrays holds inner arrays that may each have their own element type (the
//! `gguf` Python package writes and reads these; llama.cpp itself refuses them). Accessors are strict, as
//! llama.cpp's are: a `u32` key read as `u64` is an error naming the key and both types.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::error::{GgufError, Result};

/// The type tag of a metadata value or array element; the discriminant is the GGUF id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    /// The type with this GGUF id (0..=12).
    pub fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        [
            U8, I8, U16, I16, U32, I32, F32, Bool, String, Array, U64, I64, F64,
        ]
        .get(usize::try_from(id).ok()?)
        .copied()
    }

    /// The id GGUF stores for this type.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// Lower-case name used in error messages (`"u32"`, `"string"`).
    pub fn name(self) -> &'static str {
        match self {
            Self::U8 => "u8",
            Self::I8 => "i8",
            Self::U16 => "u16",
            Self::I16 => "i16",
            Self::U32 => "u32",
            Self::I32 => "i32",
            Self::F32 => "f32",
            Self::Bool => "bool",
            Self::String => "string",
            Self::Array => "array",
            Self::U64 => "u64",
            Self::I64 => "i64",
            Self::F64 => "f64",
        }
    }

    /// Size in bytes of one value of a fixed-size type; `None` for strings and arrays.
    pub fn fixed_size(self) -> Option<usize> {
        match self {
            Self::U8 | Self::I8 | Self::Bool => Some(1),
            Self::U16 | Self::I16 => Some(2),
            Self::U32 | Self::I32 | Self::F32 => Some(4),
            Self::U64 | Self::I64 | Self::F64 => Some(8),
            Self::String | Self::Array => None,
        }
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(MetadataArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array: all elements share the element type, named by the variant.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<MetadataArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl MetadataValue {
    /// The value's type tag.
    pub fn value_type(&self) -> ValueType {
        match self {
            Self::U8(_) => ValueType::U8,
            Self::I8(_) => ValueType::I8,
            Self::U16(_) => ValueType::U16,
            Self::I16(_) => ValueType::I16,
            Self::U32(_) => ValueType::U32,
            Self::I32(_) => ValueType::I32,
            Self::F32(_) => ValueType::F32,
            Self::Bool(_) => ValueType::Bool,
            Self::String(_) => ValueType::String,
            Self::Array(_) => ValueType::Array,
            Self::U64(_) => ValueType::U64,
            Self::I64(_) => ValueType::I64,
            Self::F64(_) => ValueType::F64,
        }
    }

    /// The type spelled out for messages: `"u32"`, `"array of string"`, `"array of array"`.
    pub fn type_description(&self) -> String {
        match self {
            Self::Array(a) => format!("array of {}", a.element_type().name()),
            other => other.value_type().name().to_owned(),
        }
    }
}

impl MetadataArray {
    /// The element type.
    pub fn element_type(&self) -> ValueType {
        match self {
            Self::U8(_) => ValueType::U8,
            Self::I8(_) => ValueType::I8,
            Self::U16(_) => ValueType::U16,
            Self::I16(_) => ValueType::I16,
            Self::U32(_) => ValueType::U32,
            Self::I32(_) => ValueType::I32,
            Self::F32(_) => ValueType::F32,
            Self::Bool(_) => ValueType::Bool,
            Self::String(_) => ValueType::String,
            Self::Array(_) => ValueType::Array,
            Self::U64(_) => ValueType::U64,
            Self::I64(_) => ValueType::I64,
            Self::F64(_) => ValueType::F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::U8(v) => v.len(),
            Self::I8(v) => v.len(),
            Self::U16(v) => v.len(),
            Self::I16(v) => v.len(),
            Self::U32(v) => v.len(),
            Self::I32(v) => v.len(),
            Self::F32(v) => v.len(),
            Self::Bool(v) => v.len(),
            Self::String(v) => v.len(),
            Self::Array(v) => v.len(),
            Self::U64(v) => v.len(),
            Self::I64(v) => v.len(),
            Self::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The metadata of one GGUF file, in file order, with typed lookups by key.
#[derive(Debug, Clone)]
pub struct Metadata {
    path: PathBuf,
    entries: Vec<(String, MetadataValue)>,
    index: HashMap<String, usize>,
}

/// Generates strict accessors for a scalar type and for arrays of it.
macro_rules! accessors {
    ($($get:ident, $get_array:ident, $variant:ident, $t:ty, $name:literal;)*) => {$(
        #[doc = concat!("The ", $name, " value of `key`; an error if it is missing or of another type.")]
        pub fn $get(&self, key: &str) -> Result<$t> {
            match self.require(key)? {
                MetadataValue::$variant(v) => Ok(*v),
                other => Err(self.wrong_type(key, $name, other)),
            }
        }

        #[doc = concat!("The array of ", $name, " stored under `key`; an error if it is missing or of another type.")]
        pub fn $get_array(&self, key: &str) -> Result<&[$t]> {
            match self.require(key)? {
                MetadataValue::Array(MetadataArray::$variant(v)) => Ok(v),
                other => Err(self.wrong_type(key, concat!("array of ", $name), other)),
            }
        }
    )*};
}

impl Metadata {
    /// Builds the metadata of `path` from its entries in file order; duplicate keys are an error.
    pub(crate) fn new(path: PathBuf, entries: Vec<(String, MetadataValue)>) -> Result<Self> {
        let mut index = HashMap::with_capacity(entries.len());
        for (i, (key, _)) in entries.iter().enumerate() {
            if index.insert(key.clone(), i).is_some() {
                return Err(GgufError::DuplicateKey {
                    path,
                    key: key.clone(),
                });
            }
        }
        Ok(Self {
            path,
            entries,
            index,
        })
    }

    /// Number of key/value pairs.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no key/value pairs.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The key/value pairs in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &MetadataValue)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The value of `key`, if present (for optional keys).
    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    /// The value of `key`, or an error naming the key and the file.
    pub fn require(&self, key: &str) -> Result<&MetadataValue> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            path: self.path.clone(),
            key: key.to_owned(),
        })
    }

    accessors! {
        get_u8, get_u8_array, U8, u8, "u8";
        get_i8, get_i8_array, I8, i8, "i8";
        get_u16, get_u16_array, U16, u16, "u16";
        get_i16, get_i16_array, I16, i16, "i16";
        get_u32, get_u32_array, U32, u32, "u32";
        get_i32, get_i32_array, I32, i32, "i32";
        get_f32, get_f32_array, F32, f32, "f32";
        get_bool, get_bool_array, Bool, bool, "bool";
        get_u64, get_u64_array, U64, u64, "u64";
        get_i64, get_i64_array, I64, i64, "i64";
        get_f64, get_f64_array, F64, f64, "f64";
    }

    /// The string value of `key` (e.g. `general.architecture`).
    pub fn get_str(&self, key: &str) -> Result<&str> {
        match self.require(key)? {
            MetadataValue::String(s) => Ok(s),
            other => Err(self.wrong_type(key, "string", other)),
        }
    }

    /// The array of strings under `key` (e.g. `tokenizer.ggml.tokens`).
    pub fn get_str_array(&self, key: &str) -> Result<&[String]> {
        match self.require(key)? {
            MetadataValue::Array(MetadataArray::String(v)) => Ok(v),
            other => Err(self.wrong_type(key, "array of string", other)),
        }
    }

    /// The array under `key`, whatever its element type.
    pub fn get_array(&self, key: &str) -> Result<&MetadataArray> {
        match self.require(key)? {
            MetadataValue::Array(a) => Ok(a),
            other => Err(self.wrong_type(key, "array", other)),
        }
    }

    fn wrong_type(&self, key: &str, expected: &'static str, found: &MetadataValue) -> GgufError {
        GgufError::WrongType {
            path: self.path.clone(),
            key: key.to_owned(),
            expected,
            found: found.type_description(),
        }
    }
}
