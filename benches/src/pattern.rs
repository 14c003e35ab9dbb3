//! The data each rank starts from, and the exact result every element must end with.
//!
//! Inputs are small integers (from {-2, -1, 1, 2}, or {1, 2, 3, 4} for `uint8`), so sums and
//! products of up to 8 ranks are exact in every element type, `bfloat16` included; the expected
//! value is computed in `f64` (wrapping for integers) and compared exactly, except for a
//! floating-point `avg`, whose division may round differently by one unit in the last place.

use ringlet_core::{DType, Element, ReduceOp};

pub fn input(dtype: DType, rank: usize, i: usize) -> f64 {
    let k = (rank * 3 + i * 7 + 1) % 4;
    match dtype {
        DType::U8 => (k + 1) as f64,
        _ => [-2.0, -1.0, 1.0, 2.0][k],
    }
}

pub fn fill<T: Element>(buf: &mut [T], rank: usize, offset: usize) {
    for (i, x) in buf.iter_mut().enumerate() {
        *x = T::from_f64(input(T::DTYPE, rank, offset + i));
    }
}

/// The reduction over all ranks of element `i`, in the element type.
pub fn reduced<T: Element>(op: ReduceOp, n: usize, i: usize) -> T {
    let vals = (0..n).map(|r| input(T::DTYPE, r, i));
    let exact = match op.pairwise() {
        ReduceOp::Sum => vals.sum::<f64>(),
        ReduceOp::Prod => vals.product(),
        ReduceOp::Min => vals.fold(f64::INFINITY, f64::min),
        _ => vals.fold(f64::NEG_INFINITY, f64::max),
    };
    if op != ReduceOp::Avg {
        return T::from_f64(exact);
    }
    if T::DTYPE.is_float() {
        T::from_f64(exact / n as f64)
    } else {
        // Integer avg is the wrapped sum, divided with truncation.
        let mut v = [T::from_f64(exact)];
        T::divide_by(&mut v, n);
        v[0]
    }
}

/// Whether `got` is the right answer `want`.
pub fn matches<T: Element>(got: T, want: T, op: ReduceOp) -> bool {
    if got == want {
        return true;
    }
    if op == ReduceOp::Avg && T::DTYPE.is_float() {
        let (g, w) = (got.to_f64(), want.to_f64());
        let ulp = match T::DTYPE {
            DType::F16 => 1e-3,
            DType::BF16 => 8e-3,
            DType::F32 => 2e-7,
            _ => 3e-16,
        };
        return (g - w).abs() <= ulp * w.abs().max(1.0);
    }
    false
}

/// Counts elements of `buf` (holding global elements `offset..`) that differ from `expected`.
pub fn count_wrong<T: Element>(
    buf: &[T],
    offset: usize,
    op: ReduceOp,
    expected: impl Fn(usize) -> T,
) -> u64 {
    buf.iter()
        .enumerate()
        .filter(|(i, &x)| !matches(x, expected(offset + i), op))
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringlet_core::half_types::bf16;

    #[test]
    fn expected_values_are_exact_small_integers() {
        assert_eq!(
            reduced::<f32>(ReduceOp::Sum, 1, 0),
            input(DType::F32, 0, 0) as f32
        );
        let want: f64 = (0..8).map(|r| input(DType::BF16, r, 5)).product();
        assert_eq!(reduced::<bf16>(ReduceOp::Prod, 8, 5).to_f64(), want);
        assert_eq!(
            reduced::<u8>(ReduceOp::Sum, 2, 0),
            (input(DType::U8, 0, 0) + input(DType::U8, 1, 0)) as u8
        );
        assert!(matches(1.0f32, 1.0, ReduceOp::Sum));
        assert!(!matches(1.0f32, 1.5, ReduceOp::Sum));
    }
}
