//! The float types sums are carried in (`f32`, `f64`) and the arithmetic the element paths
//! and the fused kernel share: pairwise folds and the NaN-propagating running maximum. It
//! depends on no other kernel module, so `element` and `pool` both stand on it (before, each
//! took from the other).

use std::ops::{Add, AddAssign, Div, Mul};

/// The float type sums are carried in: `f32` for 16- and 32-bit input, `f64` for `f64`.
pub trait Accumulator:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + AddAssign
    + Mul<Output = Self>
    + Div<Output = Self>
    + std::fmt::Debug
    + 'static
{
    const ZERO: Self;
    const NEG_INFINITY: Self;
    const NAN: Self;
    fn from_f64(value: f64) -> Self;
    fn is_nan(self) -> bool;
}

impl Accumulator for f32 {
    const ZERO: Self = 0.0;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    const NAN: Self = f32::NAN;
    fn from_f64(value: f64) -> Self {
        value as f32
    }
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
}

impl Accumulator for f64 {
    const ZERO: Self = 0.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    const NAN: Self = f64::NAN;
    fn from_f64(value: f64) -> Self {
        value
    }
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
}

/// `(v0 op v1) op (v2 op v3)` for four values, `v0` for one.
#[inline(always)]
pub(crate) fn pairwise<A: Copy, const N: usize>(values: [A; N], op: impl Fn(A, A) -> A) -> A {
    match N {
        4 => op(op(values[0], values[1]), op(values[2], values[3])),
        1 => values[0],
        _ => {
            let mut total = values[0];
            for &value in &values[1..] {
                total = op(total, value);
            }
            total
        }
    }
}

/// `a > b ? a : b`: one `maxps`. Not NaN-safe alone: it returns `b` when either is NaN.
#[inline(always)]
pub(crate) fn greater<A: Accumulator>(a: A, b: A) -> A {
    if a > b {
        a
    } else {
        b
    }
}

/// The running maximum after `values`, NaN once any value so far is NaN (as torch.amax).
///
/// The maximum of the new values is taken with plain `maxps` (which may drop a NaN) and the
/// NaN test is done once for all of them (`cmpunordps`, which folds pairs); a NaN running
/// value survives because `greater` returns its second operand on NaN. Eight operations per
/// four tokens instead of sixteen for pairwise NaN-safe maxima. The NaN arm is a constant,
/// not the running value: a select whose arm was the loaded running value (`keep ? a : b`)
/// became a masked store (`vmaskmovps`), which AMD Zen microcodes; that made max 3.2x
/// slower than mean (3,229 vs 1,019 µs, [32,256,768] float32, one thread).
#[inline(always)]
pub(crate) fn running_max<A: Accumulator, const N: usize>(running: A, values: [A; N]) -> A {
    let any_nan = values
        .iter()
        .fold(false, |seen, value| seen | value.is_nan());
    let largest = pairwise(values, greater);
    if any_nan {
        A::NAN
    } else {
        greater(largest, running)
    }
}
