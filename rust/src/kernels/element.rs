//! Element types of hidden states (f32, f64, f16, bf16), how they widen to the float type
//! they accumulate in (`accumulator`), and the SIMD paths that widen the half types.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::accumulator::{running_max, Accumulator};

/// An element type of hidden states.
pub trait Element: Copy + Send + Sync + 'static {
    type Accumulator: Accumulator;
    /// The numpy-style name, used in error messages.
    const NAME: &'static str;

    fn widen(self) -> Self::Accumulator;

    /// Widens a contiguous run; the half types use the `half` crate's SIMD conversion.
    fn widen_slice(source: &[Self], destination: &mut [Self::Accumulator]) {
        for (out, value) in destination.iter_mut().zip(source) {
            *out = value.widen();
        }
    }

    /// Folds four tokens' values into running sums (`SUM`: `sum[i] += (a + b) + (c + d)`)
    /// and running maxima (`MAX`, NaN propagating), widened on the fly, without writing the
    /// widened values anywhere. An unused running buffer may be empty.
    #[inline(always)]
    fn fold_four_into<const SUM: bool, const MAX: bool>(
        sum: &mut [Self::Accumulator],
        max: &mut [Self::Accumulator],
        tokens: [&[Self]; 4],
    ) {
        fold_four_widening::<Self, SUM, MAX>(sum, max, tokens);
    }

    /// The same memory seen as accumulators when no widening is needed (f32, f64),
    /// so the kernel can read it in place instead of copying it first.
    fn as_accumulator_slice(_source: &[Self]) -> Option<&[Self::Accumulator]> {
        None
    }
}

impl Element for f32 {
    type Accumulator = f32;
    const NAME: &'static str = "float32";
    fn widen(self) -> f32 {
        self
    }
    fn as_accumulator_slice(source: &[f32]) -> Option<&[f32]> {
        Some(source)
    }
}

impl Element for f64 {
    type Accumulator = f64;
    const NAME: &'static str = "float64";
    fn widen(self) -> f64 {
        self
    }
    fn as_accumulator_slice(source: &[f64]) -> Option<&[f64]> {
        Some(source)
    }
}

impl Element for f16 {
    type Accumulator = f32;
    const NAME: &'static str = "float16";
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn widen_slice(source: &[f16], destination: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma_f16c() {
            // SAFETY: the processor has F16C and AVX.
            unsafe { widen_f16_f16c(source, destination) };
            return;
        }
        source.convert_to_f32_slice(destination);
    }
    #[inline(always)]
    fn fold_four_into<const SUM: bool, const MAX: bool>(
        sum: &mut [f32],
        max: &mut [f32],
        tokens: [&[f16]; 4],
    ) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma_f16c() {
            // SAFETY: the processor has F16C and AVX.
            unsafe { fold_four_f16c::<SUM, MAX>(sum, max, tokens) };
            return;
        }
        fold_four_widening::<f16, SUM, MAX>(sum, max, tokens);
    }
}

/// `fold_four_into` for float16 with F16C: eight values of each token converted and folded
/// in registers, one load and store of each running value per four tokens.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
#[inline]
fn fold_four_f16c<const SUM: bool, const MAX: bool>(
    sum: &mut [f32],
    max: &mut [f32],
    tokens: [&[f16]; 4],
) {
    use std::arch::x86_64::{
        __m128i, _mm256_add_ps, _mm256_cmp_ps, _mm256_cvtph_ps, _mm256_loadu_ps, _mm256_max_ps,
        _mm256_or_ps, _mm256_storeu_ps, _mm_loadu_si128, _CMP_UNORD_Q,
    };
    let len = tokens
        .iter()
        .map(|token| token.len())
        .fold(usize::MAX, usize::min);
    let sum = &mut sum[..if SUM { len } else { 0 }];
    let max = &mut max[..if MAX { len } else { 0 }];
    let whole = len / 8 * 8;
    for start in (0..whole).step_by(8) {
        let halves = tokens.map(|token| &token[start..start + 8]);
        // SAFETY: every range above and below holds 8 elements (checked by the slicing);
        // unaligned loads and stores; the processor has AVX and F16C (this function's
        // target features, checked by the caller).
        unsafe {
            let [a, b, c, d] = halves
                .map(|half| _mm256_cvtph_ps(_mm_loadu_si128(half.as_ptr() as *const __m128i)));
            if SUM {
                let totals = &mut sum[start..start + 8];
                let pairs = _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d));
                let running = _mm256_loadu_ps(totals.as_ptr());
                _mm256_storeu_ps(totals.as_mut_ptr(), _mm256_add_ps(running, pairs));
            }
            if MAX {
                // As `running_max`: plain maxima, one NaN test for all four, and a NaN
                // running value kept because `maxps` returns its second operand on NaN.
                // All-ones bits (from the unordered test) are a NaN.
                let largest = &mut max[start..start + 8];
                let four = _mm256_max_ps(_mm256_max_ps(a, b), _mm256_max_ps(c, d));
                let any_nan = _mm256_or_ps(
                    _mm256_cmp_ps::<_CMP_UNORD_Q>(a, b),
                    _mm256_cmp_ps::<_CMP_UNORD_Q>(c, d),
                );
                let running = _mm256_loadu_ps(largest.as_ptr());
                let updated = _mm256_or_ps(_mm256_max_ps(four, running), any_nan);
                _mm256_storeu_ps(largest.as_mut_ptr(), updated);
            }
        }
    }
    // An unneeded running buffer is empty here, so its tail starts at 0, not `whole`.
    let (sum_tail, max_tail) = (whole.min(sum.len()), whole.min(max.len()));
    fold_four_widening::<f16, SUM, MAX>(
        &mut sum[sum_tail..],
        &mut max[max_tail..],
        tokens.map(|token| &token[whole..len]),
    );
}

/// `Element::fold_four_into` one value at a time, widening each with `Element::widen`: the
/// default, the float16 path without F16C, and the float16 tail after whole groups of 8.
#[inline(always)]
fn fold_four_widening<T: Element, const SUM: bool, const MAX: bool>(
    sum: &mut [T::Accumulator],
    max: &mut [T::Accumulator],
    tokens: [&[T]; 4],
) {
    let len = tokens
        .iter()
        .map(|token| token.len())
        .fold(usize::MAX, usize::min);
    let [a, b, c, d] = tokens.map(|token| &token[..len]);
    let sum = &mut sum[..if SUM { len } else { 0 }];
    let max = &mut max[..if MAX { len } else { 0 }];
    for index in 0..len {
        let [a, b, c, d] = [a[index], b[index], c[index], d[index]].map(T::widen);
        if SUM {
            sum[index] += (a + b) + (c + d);
        }
        if MAX {
            max[index] = running_max(max[index], [a, b, c, d]);
        }
    }
}

/// Whether this x86-64 processor has AVX2, FMA and F16C (checked once, then cached).
#[cfg(target_arch = "x86_64")]
#[inline]
pub fn has_avx2_fma_f16c() -> bool {
    use std::sync::OnceLock;
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    })
}

/// float16 to float32 eight at a time with the F16C conversion instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
#[inline]
fn widen_f16_f16c(source: &[f16], destination: &mut [f32]) {
    use std::arch::x86_64::{__m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    let len = source.len().min(destination.len());
    let whole = len / 8 * 8;
    for start in (0..whole).step_by(8) {
        let input = &source[start..start + 8];
        let output = &mut destination[start..start + 8];
        // SAFETY: both ranges hold 8 elements (checked by the slicing above); the loads and
        // stores are unaligned.
        unsafe {
            let halves = _mm_loadu_si128(input.as_ptr() as *const __m128i);
            _mm256_storeu_ps(output.as_mut_ptr(), _mm256_cvtph_ps(halves));
        }
    }
    for (out, value) in destination[whole..len].iter_mut().zip(&source[whole..len]) {
        *out = value.to_f32();
    }
}

impl Element for bf16 {
    type Accumulator = f32;
    const NAME: &'static str = "bfloat16";
    #[inline(always)]
    fn widen(self) -> f32 {
        // bfloat16 is the top half of a float32: a shift, which the compiler vectorises.
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    #[inline(always)]
    fn widen_slice(source: &[bf16], destination: &mut [f32]) {
        for (out, value) in destination.iter_mut().zip(source) {
            *out = value.widen();
        }
    }
}

/// A mask element: nonzero marks a real token.
pub trait MaskElement: Copy + Send + Sync + 'static {
    fn is_real(self) -> bool;
}

macro_rules! integer_mask {
    ($($type:ty),*) => {$(
        impl MaskElement for $type {
            fn is_real(self) -> bool {
                self != 0
            }
        }
    )*};
}
integer_mask!(u8, i8, i32, i64);

impl MaskElement for bool {
    fn is_real(self) -> bool {
        self
    }
}

impl MaskElement for f32 {
    fn is_real(self) -> bool {
        self != 0.0
    }
}

impl MaskElement for f64 {
    fn is_real(self) -> bool {
        self != 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_types_widen_exactly() {
        let values = [0.5f32, -2.0, 65504.0, 1.0e-3, f32::INFINITY];
        let halves: Vec<f16> = values.iter().map(|&v| f16::from_f32(v)).collect();
        let mut widened = vec![0.0f32; values.len()];
        f16::widen_slice(&halves, &mut widened);
        for (half, wide) in halves.iter().zip(&widened) {
            assert_eq!(half.to_f32().to_bits(), wide.to_bits());
        }
        let brains: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
        bf16::widen_slice(&brains, &mut widened);
        for (brain, wide) in brains.iter().zip(&widened) {
            assert_eq!(brain.to_f32().to_bits(), wide.to_bits());
        }
    }

    #[test]
    fn nan_survives_widening() {
        let mut widened = [0.0f32; 1];
        bf16::widen_slice(&[bf16::NAN], &mut widened);
        assert!(widened[0].is_nan());
        f16::widen_slice(&[f16::NAN], &mut widened);
        assert!(widened[0].is_nan());
    }
}
