//! Owned, typed tensor data decoded from (and encoded to) `TensorProto`.

use anyhow::{bail, ensure, Context, Result};
use half::f16;

use super::proto::{tensor_proto::DataType, TensorProto};

/// Element values of a tensor; the variant is its data type.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    F64(Vec<f64>),
    F16(Vec<f16>),
    I64(Vec<i64>),
    I32(Vec<i32>),
    I8(Vec<i8>),
    U8(Vec<u8>),
    Bool(Vec<bool>),
}

/// A named tensor with concrete dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dims: Vec<usize>,
    pub data: Data,
}

impl Data {
    pub fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::F64(v) => v.len(),
            Data::F16(v) => v.len(),
            Data::I64(v) => v.len(),
            Data::I32(v) => v.len(),
            Data::I8(v) => v.len(),
            Data::U8(v) => v.len(),
            Data::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DataType {
        match self {
            Data::F32(_) => DataType::Float,
            Data::F64(_) => DataType::Double,
            Data::F16(_) => DataType::Float16,
            Data::I64(_) => DataType::Int64,
            Data::I32(_) => DataType::Int32,
            Data::I8(_) => DataType::Int8,
            Data::U8(_) => DataType::Uint8,
            Data::Bool(_) => DataType::Bool,
        }
    }

    pub fn element_bytes(&self) -> usize {
        dtype_size(self.dtype()).unwrap_or(1)
    }
}

/// Bytes per element, None for types without a fixed size (strings).
pub fn dtype_size(dt: DataType) -> Option<usize> {
    Some(match dt {
        DataType::Float | DataType::Int32 | DataType::Uint32 => 4,
        DataType::Double | DataType::Int64 | DataType::Uint64 | DataType::Complex64 => 8,
        DataType::Float16 | DataType::Bfloat16 | DataType::Int16 | DataType::Uint16 => 2,
        DataType::Int8 | DataType::Uint8 | DataType::Bool => 1,
        DataType::Complex128 => 16,
        DataType::Float8e4m3fn
        | DataType::Float8e4m3fnuz
        | DataType::Float8e5m2
        | DataType::Float8e5m2fnuz => 1,
        _ => return None,
    })
}

pub fn dtype_name(code: i32) -> String {
    match DataType::try_from(code) {
        Ok(dt) => dt.as_str_name().to_lowercase(),
        Err(_) => format!("unknown({code})"),
    }
}

impl Tensor {
    pub fn new(name: impl Into<String>, dims: Vec<usize>, data: Data) -> Tensor {
        Tensor {
            name: name.into(),
            dims,
            data,
        }
    }

    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn byte_size(&self) -> usize {
        self.data.len() * self.data.element_bytes()
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            _ => None,
        }
    }

    /// Values as i64, for shape-like tensors of any integer type.
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        match &self.data {
            Data::I64(v) => Some(v.clone()),
            Data::I32(v) => Some(v.iter().map(|&x| x as i64).collect()),
            Data::I8(v) => Some(v.iter().map(|&x| x as i64).collect()),
            Data::U8(v) => Some(v.iter().map(|&x| x as i64).collect()),
            _ => None,
        }
    }

    /// Values converted to f32, for any numeric type.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            Data::F32(v) => v.clone(),
            Data::F64(v) => v.iter().map(|&x| x as f32).collect(),
            Data::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Data::I64(v) => v.iter().map(|&x| x as f32).collect(),
            Data::I32(v) => v.iter().map(|&x| x as f32).collect(),
            Data::I8(v) => v.iter().map(|&x| x as f32).collect(),
            Data::U8(v) => v.iter().map(|&x| x as f32).collect(),
            Data::Bool(v) => v.iter().map(|&x| x as u8 as f32).collect(),
        }
    }

    /// Decodes a `TensorProto` whose data is inline (raw or typed fields). External data must
    /// have been loaded into `raw_data` beforehand (see `onnx::load`).
    pub fn from_proto(t: &TensorProto) -> Result<Tensor> {
        let name = t.name.clone();
        let mut dims = Vec::with_capacity(t.dims.len());
        for &d in &t.dims {
            ensure!(d >= 0, "tensor `{name}` has a negative dimension {d}");
            dims.push(d as usize);
        }
        let numel = dims
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .with_context(|| {
                format!("tensor `{name}` has dimensions {dims:?} whose product overflows")
            })?;
        let dt = DataType::try_from(t.data_type).map_err(|_| {
            anyhow::anyhow!("tensor `{name}` has unknown data type {}", t.data_type)
        })?;
        let raw = !t.raw_data.is_empty() || numel == 0 && is_raw_only(t);
        let data = if raw {
            let esize = dtype_size(dt).with_context(|| {
                format!(
                    "tensor `{name}` has data type {} which shrink cannot read",
                    dtype_name(t.data_type)
                )
            })?;
            let expect = numel.checked_mul(esize).context("tensor size overflows")?;
            ensure!(
                t.raw_data.len() == expect,
                "tensor `{name}` declares {dims:?} of {} ({expect} bytes) but holds {} bytes",
                dtype_name(t.data_type),
                t.raw_data.len()
            );
            decode_raw(dt, &t.raw_data).with_context(|| format!("tensor `{name}`"))?
        } else {
            let d = match dt {
                DataType::Float => Data::F32(t.float_data.clone()),
                DataType::Double => Data::F64(t.double_data.clone()),
                DataType::Int64 => Data::I64(t.int64_data.clone()),
                DataType::Int32 => Data::I32(t.int32_data.clone()),
                DataType::Int8 => Data::I8(t.int32_data.iter().map(|&x| x as i8).collect()),
                DataType::Uint8 => Data::U8(t.int32_data.iter().map(|&x| x as u8).collect()),
                DataType::Bool => Data::Bool(t.int32_data.iter().map(|&x| x != 0).collect()),
                DataType::Float16 => Data::F16(t.int32_data.iter().map(|&x| f16::from_bits(x as u16)).collect()),
                _ => bail!(
                    "tensor `{name}` has data type {} which shrink cannot read; supported: float, double, float16, int64, int32, int8, uint8, bool",
                    dtype_name(t.data_type)
                ),
            };
            ensure!(
                d.len() == numel,
                "tensor `{name}` declares dimensions {dims:?} ({numel} values) but holds {} values",
                d.len()
            );
            d
        };
        Ok(Tensor { name, dims, data })
    }

    /// Encodes as a `TensorProto` with `raw_data` (little-endian), as exporters do.
    pub fn to_proto(&self) -> TensorProto {
        let mut raw = Vec::with_capacity(self.byte_size());
        match &self.data {
            Data::F32(v) => v
                .iter()
                .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
            Data::F64(v) => v
                .iter()
                .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
            Data::F16(v) => v
                .iter()
                .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
            Data::I64(v) => v
                .iter()
                .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
            Data::I32(v) => v
                .iter()
                .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
            Data::I8(v) => v.iter().for_each(|x| raw.push(*x as u8)),
            Data::U8(v) => raw.extend_from_slice(v),
            Data::Bool(v) => v.iter().for_each(|x| raw.push(*x as u8)),
        }
        TensorProto {
            name: self.name.clone(),
            dims: self.dims.iter().map(|&d| d as i64).collect(),
            data_type: self.data.dtype() as i32,
            raw_data: raw,
            ..Default::default()
        }
    }
}

fn is_raw_only(t: &TensorProto) -> bool {
    t.float_data.is_empty()
        && t.int32_data.is_empty()
        && t.int64_data.is_empty()
        && t.double_data.is_empty()
        && t.uint64_data.is_empty()
        && t.string_data.is_empty()
}

fn decode_raw(dt: DataType, b: &[u8]) -> Result<Data> {
    fn chunks<const N: usize, T>(b: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
        b.chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunks_exact yields N bytes")))
            .collect()
    }
    Ok(match dt {
        DataType::Float => Data::F32(chunks(b, f32::from_le_bytes)),
        DataType::Double => Data::F64(chunks(b, f64::from_le_bytes)),
        DataType::Float16 => Data::F16(chunks(b, f16::from_le_bytes)),
        DataType::Int64 => Data::I64(chunks(b, i64::from_le_bytes)),
        DataType::Int32 => Data::I32(chunks(b, i32::from_le_bytes)),
        DataType::Int8 => Data::I8(b.iter().map(|&x| x as i8).collect()),
        DataType::Uint8 => Data::U8(b.to_vec()),
        DataType::Bool => Data::Bool(b.iter().map(|&x| x != 0).collect()),
        other => bail!(
            "data type {} is not supported; supported: float, double, float16, int64, int32, int8, uint8, bool",
            other.as_str_name().to_lowercase()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_round_trip_all_types() {
        let cases = vec![
            Data::F32(vec![1.5, -2.0, 0.0, 3.25]),
            Data::I64(vec![1, -2, i64::MAX, 0]),
            Data::I8(vec![-128, 127, 0, 5]),
            Data::U8(vec![0, 255, 1, 2]),
            Data::F16(vec![f16::from_f32(0.5); 4]),
        ];
        for data in cases {
            let t = Tensor::new("t", vec![2, 2], data);
            assert_eq!(Tensor::from_proto(&t.to_proto()).unwrap(), t);
        }
    }

    #[test]
    fn typed_fields_are_read() {
        let p = TensorProto {
            name: "w".into(),
            dims: vec![3],
            data_type: DataType::Float as i32,
            float_data: vec![1.0, 2.0, 3.0],
            ..Default::default()
        };
        assert_eq!(
            Tensor::from_proto(&p).unwrap().as_f32().unwrap(),
            &[1.0, 2.0, 3.0]
        );
    }

    #[test]
    fn size_mismatch_names_tensor() {
        let p = TensorProto {
            name: "conv.weight".into(),
            dims: vec![1000, 1000],
            data_type: DataType::Float as i32,
            raw_data: vec![0; 16],
            ..Default::default()
        };
        let e = Tensor::from_proto(&p).unwrap_err().to_string();
        assert!(
            e.contains("conv.weight") && e.contains("4000000 bytes"),
            "{e}"
        );
    }

    #[test]
    fn overflowing_dims_are_an_error() {
        let p = TensorProto {
            name: "big".into(),
            dims: vec![i64::MAX, i64::MAX],
            data_type: DataType::Float as i32,
            raw_data: vec![0; 4],
            ..Default::default()
        };
        assert!(Tensor::from_proto(&p).is_err());
    }
}
