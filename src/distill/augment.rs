//! Seeded training-time augmentation of NCHW batches: random crop with zero padding,
//! horizontal flip and small shifts.
//!
//! - `crop`: pad each side by `p = round(h/8)` pixels of zeros (4 for 28 or 32 pixels, as
//!   torchvision's `RandomCrop(32, padding=4)` on CIFAR), then crop `h×w` at a uniformly random
//!   offset; this moves the image by up to `p` pixels in each direction.
//! - `shift`: move the image by up to `max(1, h/14)` pixels (2 for 28) in each direction,
//!   filling with zeros.
//! - `flip`: mirror left-right with probability 1/2.
//!
//! Each sample draws its own offsets from the training RNG in sample order, so a seed fixes
//! the augmented batch whatever the thread count.

use rand::Rng;
use serde::{Deserialize, Serialize};

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Augment {
    Crop,
    Flip,
    Shift,
}

impl Augment {
    pub fn name(self) -> &'static str {
        match self {
            Augment::Crop => "crop",
            Augment::Flip => "flip",
            Augment::Shift => "shift",
        }
    }
}

/// Augments `x` (`[n, c, h, w]`) in place. Augmentations run in a fixed order (crop, shift,
/// flip) whatever order they were listed in.
pub fn apply(augs: &[Augment], x: &mut [f32], shape: [usize; 4], rng: &mut impl Rng) {
    if augs.is_empty() {
        return;
    }
    let [_, c, h, w] = shape;
    let has = |a| augs.contains(&a);
    let pad = ((h as f64 / 8.0).round() as i64).max(1);
    let max_shift = (h as i64 / 14).max(1);
    let mut scratch = vec![0f32; c * h * w];
    for sample in x.chunks_mut(c * h * w) {
        let (mut dy, mut dx) = (0i64, 0i64);
        if has(Augment::Crop) {
            // Crop offset `o` in the padded image moves content by `pad - o`.
            dy += pad - rng.random_range(0..=2 * pad);
            dx += pad - rng.random_range(0..=2 * pad);
        }
        if has(Augment::Shift) {
            dy += rng.random_range(-max_shift..=max_shift);
            dx += rng.random_range(-max_shift..=max_shift);
        }
        let flip = has(Augment::Flip) && rng.random_bool(0.5);
        if dy != 0 || dx != 0 {
            translate(sample, &mut scratch, c, h, w, dy, dx);
        }
        if flip {
            for row in sample.chunks_mut(w) {
                row.reverse();
            }
        }
    }
}

/// `out[i][j] = in[i - dy][j - dx]`, zero where that falls outside the image.
fn translate(
    sample: &mut [f32],
    scratch: &mut [f32],
    c: usize,
    h: usize,
    w: usize,
    dy: i64,
    dx: i64,
) {
    scratch.fill(0.0);
    let (h, w) = (h as i64, w as i64);
    for ch in 0..c {
        let base = ch * (h * w) as usize;
        for i in 0..h {
            let si = i - dy;
            if !(0..h).contains(&si) {
                continue;
            }
            let (j0, j1) = ((dx).max(0), (w + dx).min(w));
            if j0 >= j1 {
                continue;
            }
            let dst = base + (i * w + j0) as usize;
            let src = base + (si * w + j0 - dx) as usize;
            let len = (j1 - j0) as usize;
            scratch[dst..dst + len].copy_from_slice(&sample[src..src + len]);
        }
    }
    sample.copy_from_slice(scratch);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn image(n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
        (0..n * c * h * w).map(|v| v as f32 + 1.0).collect()
    }

    #[test]
    fn translate_moves_content_and_fills_zeros() {
        let mut x = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0];
        let mut s = vec![0.0; 9];
        translate(&mut x, &mut s, 1, 3, 3, 1, -1);
        assert_eq!(x, vec![0.0, 0.0, 0.0, 2.0, 3.0, 0.0, 5.0, 6.0, 0.0]);
        let mut x = vec![1.0; 4];
        translate(&mut x, &mut [0.0; 4], 1, 2, 2, 0, 5);
        assert_eq!(x, vec![0.0; 4]);
    }

    #[test]
    fn same_seed_same_augmentation() {
        let shape = [8, 2, 28, 28];
        let all = [Augment::Crop, Augment::Flip, Augment::Shift];
        let (mut a, mut b) = (image(8, 2, 28, 28), image(8, 2, 28, 28));
        apply(&all, &mut a, shape, &mut ChaCha8Rng::seed_from_u64(7));
        apply(&all, &mut b, shape, &mut ChaCha8Rng::seed_from_u64(7));
        assert_eq!(a, b);
        let mut c = image(8, 2, 28, 28);
        apply(&all, &mut c, shape, &mut ChaCha8Rng::seed_from_u64(8));
        assert_ne!(a, c);
        assert_ne!(a, image(8, 2, 28, 28));
    }

    #[test]
    fn flip_mirrors_rows_and_keeps_values() {
        let shape = [64, 1, 4, 4];
        let orig = image(64, 1, 4, 4);
        let mut x = orig.clone();
        apply(
            &[Augment::Flip],
            &mut x,
            shape,
            &mut ChaCha8Rng::seed_from_u64(1),
        );
        let mut flipped = 0;
        for (a, b) in x.chunks(16).zip(orig.chunks(16)) {
            if a != b {
                flipped += 1;
                let mut r = b.to_vec();
                r.chunks_mut(4).for_each(|row| row.reverse());
                assert_eq!(a, &r[..]);
            }
        }
        assert!((16..48).contains(&flipped), "{flipped} of 64 flipped");
    }

    #[test]
    fn crop_moves_at_most_the_padding() {
        // One bright pixel in the centre of a 32x32 image ends up within 4 pixels of it.
        let shape = [50, 1, 32, 32];
        let mut x = vec![0f32; 50 * 1024];
        for s in x.chunks_mut(1024) {
            s[16 * 32 + 16] = 1.0;
        }
        apply(
            &[Augment::Crop],
            &mut x,
            shape,
            &mut ChaCha8Rng::seed_from_u64(3),
        );
        let mut moved = 0;
        for s in x.chunks(1024) {
            let at = s.iter().position(|&v| v == 1.0).unwrap();
            let (i, j) = (at / 32, at % 32);
            assert!(i.abs_diff(16) <= 4 && j.abs_diff(16) <= 4);
            moved += usize::from(at != 16 * 32 + 16);
        }
        assert!(moved > 30);
    }
}
