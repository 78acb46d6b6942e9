//! Reuse of activation and gradient buffers across training steps. Every step of a given
//! batch size allocates the same sizes, so keeping freed buffers avoids the page faults and
//! zeroing of fresh large allocations (a quarter of a small CNN's step time otherwise).

use std::sync::Mutex;

use super::Tensor;

/// Free lists of f32 and u32 buffers; their contents are stale, so users must overwrite.
#[derive(Debug, Default)]
pub struct Buffers {
    f32s: Mutex<Vec<Vec<f32>>>,
    u32s: Mutex<Vec<Vec<u32>>>,
}

/// Beyond this many free buffers of a kind, the oldest are released to the allocator.
const MAX_FREE: usize = 512;

fn take_from<T: Copy + Default>(list: &Mutex<Vec<Vec<T>>>, len: usize) -> Vec<T> {
    let mut free = list.lock().unwrap_or_else(|e| e.into_inner());
    // Prefer the shortest buffer already at least `len` long: truncating it writes nothing,
    // while growing one (`resize`) zero-fills the extension.
    let mut best: Option<usize> = None;
    for (i, v) in free.iter().enumerate() {
        if v.len() >= len && best.is_none_or(|b| v.len() < free[b].len()) {
            best = Some(i);
            if v.len() == len {
                break;
            }
        }
    }
    let best = best.or_else(|| free.iter().position(|v| v.capacity() >= len));
    match best {
        Some(i) => {
            let mut v = free.swap_remove(i);
            drop(free);
            if v.len() >= len {
                v.truncate(len);
            } else {
                v.resize(len, T::default());
            }
            v
        }
        None => vec![T::default(); len],
    }
}

fn give_to<T>(list: &Mutex<Vec<Vec<T>>>, v: Vec<T>) {
    if v.capacity() == 0 {
        return;
    }
    let mut free = list.lock().unwrap_or_else(|e| e.into_inner());
    if free.len() >= MAX_FREE {
        free.remove(0);
    }
    free.push(v);
}

impl Buffers {
    /// A buffer of `len` values with unspecified contents.
    pub fn take(&self, len: usize) -> Vec<f32> {
        take_from(&self.f32s, len)
    }
    pub fn zeros(&self, len: usize) -> Vec<f32> {
        let mut v = self.take(len);
        v.fill(0.0);
        v
    }
    pub fn take_u32(&self, len: usize) -> Vec<u32> {
        take_from(&self.u32s, len)
    }
    pub fn give(&self, v: Vec<f32>) {
        give_to(&self.f32s, v)
    }
    pub fn give_u32(&self, v: Vec<u32>) {
        give_to(&self.u32s, v)
    }
    /// A tensor of `shape` with unspecified contents, for kernels that write every value.
    pub fn tensor(&self, shape: &[usize]) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            data: self.take(shape.iter().product()),
        }
    }
    pub fn zeros_tensor(&self, shape: &[usize]) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            data: self.zeros(shape.iter().product()),
        }
    }
    pub fn copy_of(&self, t: &Tensor) -> Tensor {
        let mut data = self.take(t.data.len());
        data.copy_from_slice(&t.data);
        Tensor {
            shape: t.shape.clone(),
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_the_smallest_fitting_buffer() {
        let b = Buffers::default();
        b.give(vec![1.0; 10]);
        b.give(vec![2.0; 4]);
        let v = b.take(3);
        assert_eq!(v, vec![2.0; 3]);
        assert_eq!(v.capacity(), 4);
        b.give(v);
        // The 3-long buffer is too short for 4 now; the 10-long one is taken instead.
        assert_eq!(b.take(4), vec![1.0; 4]);
        let w = b.take(12);
        assert_eq!(w.len(), 12);
        assert_eq!(b.zeros(5), vec![0.0; 5]);
    }
}
