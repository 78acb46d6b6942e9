//! The engine's tensor: dense f32, row-major (NCHW for images), always contiguous.

use anyhow::{ensure, Context, Result};

use crate::onnx;

/// A dense f32 tensor. `data.len()` always equals the product of `shape`
/// (1 for a scalar, whose shape is empty).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// A tensor from its shape and values; errors when the sizes disagree.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        ensure!(
            n == data.len(),
            "shape {shape:?} holds {n} values but {} were given",
            data.len()
        );
        Ok(Tensor { shape, data })
    }

    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor::full(shape, 0.0)
    }

    pub fn full(shape: &[usize], value: f32) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            data: vec![value; shape.iter().product()],
        }
    }

    pub fn scalar(value: f32) -> Tensor {
        Tensor {
            shape: vec![],
            data: vec![value],
        }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The same values under another shape with the same number of elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        ensure!(
            n == self.data.len(),
            "cannot reshape {:?} to {shape:?}",
            self.shape
        );
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// Rows of the tensor viewed as `[shape[0], rest]`, e.g. one row per sample.
    pub fn rows(&self) -> impl Iterator<Item = &[f32]> {
        let row = if self.shape.is_empty() {
            1
        } else {
            self.shape[1..].iter().product::<usize>().max(1)
        };
        self.data.chunks(row)
    }

    /// Samples `range` of the leading (batch) axis, e.g. to take a mini-batch.
    pub fn batch_slice(&self, range: std::ops::Range<usize>) -> Result<Tensor> {
        ensure!(
            !self.shape.is_empty() && range.end <= self.shape[0] && range.start <= range.end,
            "batch range {range:?} is outside a tensor of shape {:?}",
            self.shape
        );
        let row: usize = self.shape[1..].iter().product();
        let mut shape = self.shape.clone();
        shape[0] = range.len();
        Ok(Tensor {
            shape,
            data: self.data[range.start * row..range.end * row].to_vec(),
        })
    }

    /// Largest absolute element-wise difference; errors when the shapes differ.
    pub fn max_abs_diff(&self, other: &Tensor) -> Result<f32> {
        ensure!(
            self.shape == other.shape,
            "shapes differ: {:?} vs {:?}",
            self.shape,
            other.shape
        );
        Ok(self
            .data
            .iter()
            .zip(&other.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max))
    }

    /// Converts an ONNX tensor of any numeric type to f32 (integers keep their values exactly
    /// up to 2^24, which covers 8-bit quantized data and shape tensors).
    pub fn from_onnx(t: &onnx::Tensor) -> Result<Tensor> {
        ensure!(
            !matches!(t.data, onnx::Data::Bool(_)),
            "tensor `{}` is boolean; the engine computes in float32",
            t.name
        );
        Tensor::new(t.dims.clone(), t.to_f32_vec()).with_context(|| format!("tensor `{}`", t.name))
    }

    /// An ONNX float32 tensor named `name` with these values.
    pub fn to_onnx(&self, name: &str) -> onnx::Tensor {
        onnx::Tensor::new(name, self.shape.clone(), onnx::Data::F32(self.data.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_mismatch_is_an_error() {
        assert!(Tensor::new(vec![2, 3], vec![0.0; 5]).is_err());
        assert_eq!(Tensor::scalar(2.0).numel(), 1);
    }

    #[test]
    fn onnx_round_trip() {
        let t = Tensor::new(vec![2, 2], vec![1.0, -2.0, 3.5, 0.0]).unwrap();
        assert_eq!(Tensor::from_onnx(&t.to_onnx("w")).unwrap(), t);
        let i = onnx::Tensor::new("s", vec![2], onnx::Data::I64(vec![3, -1]));
        assert_eq!(Tensor::from_onnx(&i).unwrap().data, vec![3.0, -1.0]);
    }

    #[test]
    fn batch_slice_takes_rows() {
        let t = Tensor::new(vec![3, 2], (0..6).map(|v| v as f32).collect()).unwrap();
        assert_eq!(t.batch_slice(1..3).unwrap().data, vec![2.0, 3.0, 4.0, 5.0]);
        assert!(t.batch_slice(2..4).is_err());
    }
}
