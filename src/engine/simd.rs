//! Run-time selection of AVX2+FMA code for the hot inner loops.
//!
//! The crate is built for the baseline x86-64 target (SSE2), which leaves the element-wise
//! and depthwise loops at a quarter of the vector width this class of CPU has. `multiversion!`
//! compiles a leaf function twice, once as is and once with AVX2 and FMA enabled, and picks
//! the second when the CPU has them. Rust does not contract `a * b + c` into FMA and does not
//! reorder float sums, so both versions compute bit-identical results; only the speed
//! differs. This is the engine's one use of `unsafe` besides `linalg`: calling a
//! `#[target_feature]` function, sound once the feature is detected.

/// Whether the CPU runs AVX2 and FMA code (cached by the standard library).
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines a function whose body is also compiled with AVX2 and FMA enabled and dispatched to
/// at run time. Use it on leaf functions holding the loops: closures defined inside do not
/// inherit the target features, so parallel drivers stay outside and call the leaf.
macro_rules! multiversion {
    ($(#[$attr:meta])* $vis:vis fn $name:ident $(<$($lt:lifetime),*>)? ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        $vis fn $name $(<$($lt),*>)? ($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn fast $(<$($lt),*>)? ($($arg: $ty),*) $(-> $ret)? $body
                if $crate::engine::simd::has_avx2_fma() {
                    // SAFETY: `fast` requires only AVX2 and FMA, which the CPU was just found
                    // to support.
                    #[allow(unsafe_code)]
                    let r = unsafe { fast($($arg),*) };
                    return r;
                }
            }
            $body
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    multiversion! {
        fn scaled_sum(x: &[f32], a: f32) -> f32 {
            let mut acc = [0f32; 8];
            for c in x.chunks_exact(8) {
                for l in 0..8 {
                    acc[l] += a * c[l];
                }
            }
            acc.iter().sum()
        }
    }

    #[test]
    fn both_versions_agree_bit_for_bit() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 997.0 - 0.5)
            .collect();
        let want: f32 = {
            let mut acc = [0f32; 8];
            for c in x.chunks_exact(8) {
                for l in 0..8 {
                    acc[l] += 0.3 * c[l];
                }
            }
            acc.iter().sum()
        };
        assert_eq!(scaled_sum(&x, 0.3).to_bits(), want.to_bits());
    }
}
