//! Test inputs and their references. Every rank can compute every other rank's input, so each
//! checks its own result against a reference computed independently of the library: in `f64`
//! for floating point (with a tolerance for the order of rounding), exactly with wrapping `i128`
//! arithmetic for integers.

use ringlet::{Element, ReduceOp};
use ringlet_core::half_types::{bf16, f16};

fn mix(mut z: u64) -> u64 {
    // splitmix64: cheap, deterministic, well spread.
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn bits(rank: usize, i: usize, op: ReduceOp) -> u64 {
    mix(((rank as u64) << 40) ^ (i as u64) ^ ((op as u64) << 58))
}

fn unit(rank: usize, i: usize, op: ReduceOp) -> f64 {
    (bits(rank, i, op) >> 11) as f64 / (1u64 << 53) as f64
}

pub trait TestElem: Element {
    fn input(rank: usize, i: usize, op: ReduceOp) -> Self;
    /// The reduction of every rank's element `i`.
    fn expect(op: ReduceOp, n: usize, i: usize) -> Self;
    fn close(got: Self, want: Self, n: usize) -> bool;
}

macro_rules! float_case {
    ($t:ty, $tol:expr) => {
        impl TestElem for $t {
            fn input(rank: usize, i: usize, op: ReduceOp) -> Self {
                let u = unit(rank, i, op);
                if op == ReduceOp::Prod {
                    (0.5 + u) as $t
                } else {
                    (2.0 * u - 1.0) as $t
                }
            }
            fn expect(op: ReduceOp, n: usize, i: usize) -> Self {
                <$t>::from_f64(reference_f64(op, n, i, |r| Self::input(r, i, op).to_f64()))
            }
            fn close(got: Self, want: Self, n: usize) -> bool {
                let (g, w) = (got as f64, want as f64);
                (g - w).abs() <= $tol * n as f64 * (1.0 + w.abs())
            }
        }
    };
}

macro_rules! half_case {
    ($t:ty, $ulp:expr) => {
        impl TestElem for $t {
            /// Small integers: sums and products of up to 8 ranks are exact in 8 mantissa bits.
            fn input(rank: usize, i: usize, op: ReduceOp) -> Self {
                let b = bits(rank, i, op);
                let v = if op == ReduceOp::Prod {
                    [-2.0, -1.0, 1.0, 2.0][(b % 4) as usize]
                } else {
                    (b % 9) as f64 - 4.0
                };
                <$t>::from_f64(v)
            }
            fn expect(op: ReduceOp, n: usize, i: usize) -> Self {
                <$t>::from_f64(reference_f64(op, n, i, |r| Self::input(r, i, op).to_f64()))
            }
            fn close(got: Self, want: Self, _n: usize) -> bool {
                // Exact but for avg, whose division rounds twice (through f32) in the library.
                let (g, w) = (got.to_f64(), want.to_f64());
                g == w || (g - w).abs() <= $ulp * w.abs()
            }
        }
    };
}

macro_rules! int_case {
    ($t:ty) => {
        impl TestElem for $t {
            fn input(rank: usize, i: usize, op: ReduceOp) -> Self {
                bits(rank, i, op) as $t
            }
            fn expect(op: ReduceOp, n: usize, i: usize) -> Self {
                let vals = (0..n).map(|r| Self::input(r, i, op) as i128);
                match op {
                    ReduceOp::Sum => vals.fold(0i128, i128::wrapping_add) as $t,
                    ReduceOp::Prod => vals.fold(1i128, i128::wrapping_mul) as $t,
                    ReduceOp::Min => vals.min().expect("n >= 1") as $t,
                    ReduceOp::Max => vals.max().expect("n >= 1") as $t,
                    ReduceOp::Avg => {
                        let wrapped = vals.fold(0i128, i128::wrapping_add) as $t;
                        ((wrapped as i128) / n as i128) as $t
                    }
                }
            }
            fn close(got: Self, want: Self, _n: usize) -> bool {
                got == want
            }
        }
    };
}

fn reference_f64(op: ReduceOp, n: usize, _i: usize, val: impl Fn(usize) -> f64) -> f64 {
    let vals = (0..n).map(val);
    match op {
        ReduceOp::Sum => vals.sum(),
        ReduceOp::Avg => vals.sum::<f64>() / n as f64,
        ReduceOp::Prod => vals.product(),
        ReduceOp::Min => vals.fold(f64::INFINITY, f64::min),
        ReduceOp::Max => vals.fold(f64::NEG_INFINITY, f64::max),
    }
}

float_case!(f32, 1e-6);
float_case!(f64, 1e-14);
half_case!(f16, 1e-3);
half_case!(bf16, 8e-3);
int_case!(i32);
int_case!(i64);
int_case!(u8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_references_wrap_like_the_element_type() {
        let want = (0..3)
            .map(|r| u8::input(r, 7, ReduceOp::Sum))
            .fold(0u8, u8::wrapping_add);
        assert_eq!(u8::expect(ReduceOp::Sum, 3, 7), want);
        let want = (0..5)
            .map(|r| i64::input(r, 1, ReduceOp::Prod))
            .fold(1i64, i64::wrapping_mul);
        assert_eq!(i64::expect(ReduceOp::Prod, 5, 1), want);
    }

    #[test]
    fn half_inputs_are_exact_small_integers() {
        for i in 0..100 {
            let v = bf16::input(3, i, ReduceOp::Sum).to_f64();
            assert!(v.fract() == 0.0 && v.abs() <= 4.0);
        }
    }
}
