//! Element types, reduction ops and the reduction loops.
//!
//! Integer semantics (the same as NCCL's): `Sum` and `Prod` wrap on overflow; `Avg` is the
//! wrapping sum divided by the number of ranks, truncated toward zero. Floating-point `Avg` is the
//! sum divided by the number of ranks. `f16` and `bf16` reduce pairwise in `f32` and round back,
//! so every step of a ring rounds to the element type, as NCCL does.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use std::fmt;

/// The element type of a collective's buffer, as named on the wire and on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum DType {
    F32 = 1,
    F64 = 2,
    F16 = 3,
    BF16 = 4,
    I32 = 5,
    I64 = 6,
    U8 = 7,
}

impl DType {
    pub const ALL: [DType; 7] = [
        DType::F32,
        DType::F64,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::I64,
        DType::U8,
    ];

    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::F16 | DType::BF16 => 2,
            DType::U8 => 1,
        }
    }

    /// The nccl-tests name (`float`, `double`, `half`, `bfloat16`, `int32`, `int64`, `uint8`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float",
            DType::F64 => "double",
            DType::F16 => "half",
            DType::BF16 => "bfloat16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::U8 => "uint8",
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }

    pub fn from_wire(code: u8) -> Option<DType> {
        DType::ALL.into_iter().find(|d| *d as u8 == code)
    }

    /// Accepts the nccl-tests names and the Rust ones (`f32`, `bf16`, …).
    pub fn parse(s: &str) -> Option<DType> {
        Some(match s {
            "float" | "f32" | "float32" => DType::F32,
            "double" | "f64" | "float64" => DType::F64,
            "half" | "f16" | "float16" => DType::F16,
            "bfloat16" | "bf16" => DType::BF16,
            "int32" | "i32" | "int" => DType::I32,
            "int64" | "i64" => DType::I64,
            "uint8" | "u8" => DType::U8,
            _ => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A reduction. `Avg` reduces like `Sum` and divides by the number of ranks at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum ReduceOp {
    Sum = 1,
    Prod = 2,
    Min = 3,
    Max = 4,
    Avg = 5,
}

impl ReduceOp {
    pub const ALL: [ReduceOp; 5] = [
        ReduceOp::Sum,
        ReduceOp::Prod,
        ReduceOp::Min,
        ReduceOp::Max,
        ReduceOp::Avg,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Prod => "prod",
            ReduceOp::Min => "min",
            ReduceOp::Max => "max",
            ReduceOp::Avg => "avg",
        }
    }

    pub fn from_wire(code: u8) -> Option<ReduceOp> {
        ReduceOp::ALL.into_iter().find(|o| *o as u8 == code)
    }

    pub fn parse(s: &str) -> Option<ReduceOp> {
        ReduceOp::ALL.into_iter().find(|o| o.name() == s)
    }

    /// The op applied pairwise while reducing (`Avg` sums first).
    pub fn pairwise(self) -> ReduceOp {
        if self == ReduceOp::Avg {
            ReduceOp::Sum
        } else {
            self
        }
    }
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A type a collective can move and reduce: `f32`, `f64`, `f16`, `bf16`, `i32`, `i64` and `u8`
/// (sealed: the wire names exactly these, and the engine relies on their size and alignment).
pub trait Element:
    bytemuck::Pod + Send + Sync + PartialEq + fmt::Debug + sealed::Sealed + 'static
{
    const DTYPE: DType;

    /// `acc[i] = acc[i] (op) src[i]`, with `Avg` treated as `Sum`. Lengths must match.
    fn reduce_into(op: ReduceOp, acc: &mut [Self], src: &[Self]);

    /// Finishes an `Avg`: divides every element by `n`.
    fn divide_by(buf: &mut [Self], n: usize);

    /// Exact for every value of the integer types and of `f32`/`f16`/`bf16`.
    fn to_f64(self) -> f64;

    /// Rounds (floats) or truncates and wraps (integers) to the element type.
    fn from_f64(v: f64) -> Self;
}

// Plain loops over zipped slices: LLVM vectorises each of these arms.
macro_rules! native_reduce {
    ($op:expr, $acc:expr, $src:expr, $add:expr, $mul:expr, $min:expr, $max:expr) => {{
        assert_eq!($acc.len(), $src.len(), "reduce_into: length mismatch");
        let pairs = $acc.iter_mut().zip($src.iter());
        match $op {
            ReduceOp::Sum | ReduceOp::Avg => pairs.for_each(|(a, b)| *a = $add(*a, *b)),
            ReduceOp::Prod => pairs.for_each(|(a, b)| *a = $mul(*a, *b)),
            ReduceOp::Min => pairs.for_each(|(a, b)| *a = $min(*a, *b)),
            ReduceOp::Max => pairs.for_each(|(a, b)| *a = $max(*a, *b)),
        }
    }};
}

macro_rules! float_element {
    ($t:ty, $dtype:expr) => {
        impl Element for $t {
            const DTYPE: DType = $dtype;
            fn reduce_into(op: ReduceOp, acc: &mut [Self], src: &[Self]) {
                native_reduce!(
                    op,
                    acc,
                    src,
                    |a: $t, b: $t| a + b,
                    |a: $t, b: $t| a * b,
                    <$t>::min,
                    <$t>::max
                )
            }
            fn divide_by(buf: &mut [Self], n: usize) {
                let n = n as $t;
                buf.iter_mut().for_each(|x| *x /= n);
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
        }
    };
}

macro_rules! int_element {
    ($t:ty, $dtype:expr) => {
        impl Element for $t {
            const DTYPE: DType = $dtype;
            fn reduce_into(op: ReduceOp, acc: &mut [Self], src: &[Self]) {
                native_reduce!(
                    op,
                    acc,
                    src,
                    <$t>::wrapping_add,
                    <$t>::wrapping_mul,
                    <$t>::min,
                    <$t>::max
                )
            }
            fn divide_by(buf: &mut [Self], n: usize) {
                // In i128: `n as u8` would wrap for 256 ranks or more.
                if n > 1 {
                    let n = n as i128;
                    buf.iter_mut().for_each(|x| *x = (*x as i128 / n) as $t);
                }
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn from_f64(v: f64) -> Self {
                (v as i128) as $t
            }
        }
    };
}

/// Half-precision elements are widened to `f32` a block at a time (with `half`'s vectorised slice
/// conversions), reduced there, and rounded back: converting element by element in the loop
/// was 13x slower for `f16`.
const HALF_BLOCK: usize = 1024;

macro_rules! half_element {
    ($t:ty, $dtype:expr) => {
        impl Element for $t {
            const DTYPE: DType = $dtype;
            fn reduce_into(op: ReduceOp, acc: &mut [Self], src: &[Self]) {
                assert_eq!(acc.len(), src.len(), "reduce_into: length mismatch");
                let (mut a32, mut b32) = ([0f32; HALF_BLOCK], [0f32; HALF_BLOCK]);
                for (acc, src) in acc.chunks_mut(HALF_BLOCK).zip(src.chunks(HALF_BLOCK)) {
                    let (a, b) = (&mut a32[..acc.len()], &mut b32[..acc.len()]);
                    acc.convert_to_f32_slice(a);
                    src.convert_to_f32_slice(b);
                    f32::reduce_into(op, a, b);
                    acc.convert_from_f32_slice(a);
                }
            }
            fn divide_by(buf: &mut [Self], n: usize) {
                let n = n as f32;
                buf.iter_mut()
                    .for_each(|x| *x = <$t>::from_f32(x.to_f32() / n));
            }
            fn to_f64(self) -> f64 {
                self.to_f64()
            }
            fn from_f64(v: f64) -> Self {
                <$t>::from_f64(v)
            }
        }
    };
}

impl sealed::Sealed for f32 {}
impl sealed::Sealed for f64 {}
impl sealed::Sealed for f16 {}
impl sealed::Sealed for bf16 {}
impl sealed::Sealed for i32 {}
impl sealed::Sealed for i64 {}
impl sealed::Sealed for u8 {}

float_element!(f32, DType::F32);
float_element!(f64, DType::F64);
half_element!(f16, DType::F16);
half_element!(bf16, DType::BF16);
int_element!(i32, DType::I32);
int_element!(i64, DType::I64);
int_element!(u8, DType::U8);

/// Calls `$body` with the type alias `$T` bound to the Rust type of a runtime [`DType`].
#[macro_export]
macro_rules! with_dtype {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::DType::F64 => {
                type $T = f64;
                $body
            }
            $crate::DType::F16 => {
                type $T = $crate::dtype::half_types::f16;
                $body
            }
            $crate::DType::BF16 => {
                type $T = $crate::dtype::half_types::bf16;
                $body
            }
            $crate::DType::I32 => {
                type $T = i32;
                $body
            }
            $crate::DType::I64 => {
                type $T = i64;
                $body
            }
            $crate::DType::U8 => {
                type $T = u8;
                $body
            }
        }
    };
}

/// Re-exported so that [`with_dtype!`] works without a direct dependency on `half`.
pub mod half_types {
    pub use half::{bf16, f16};
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: Element>(a: &[f64], b: &[f64]) {
        for op in ReduceOp::ALL {
            let mut acc: Vec<T> = a.iter().map(|&v| T::from_f64(v)).collect();
            let src: Vec<T> = b.iter().map(|&v| T::from_f64(v)).collect();
            T::reduce_into(op, &mut acc, &src);
            for i in 0..a.len() {
                let (x, y) = (T::from_f64(a[i]).to_f64(), T::from_f64(b[i]).to_f64());
                let want = match op {
                    ReduceOp::Sum | ReduceOp::Avg => x + y,
                    ReduceOp::Prod => x * y,
                    ReduceOp::Min => x.min(y),
                    ReduceOp::Max => x.max(y),
                };
                assert_eq!(acc[i], T::from_f64(want), "{} {op} at {i}", T::DTYPE);
            }
        }
    }

    #[test]
    fn pairwise_ops_match_f64_for_every_type() {
        let a = [1.0, -2.0, 3.0, 0.0, 7.0, 100.0, 5.0];
        let b = [4.0, 5.0, -6.0, 1.0, 7.0, 2.0, 0.5];
        check::<f32>(&a, &b);
        check::<f64>(&a, &b);
        check::<f16>(&a, &b);
        check::<bf16>(&a, &b);
        let ai = [1.0, -2.0, 3.0, 0.0, 7.0, 100.0, 5.0];
        let bi = [4.0, 5.0, -6.0, 1.0, 7.0, 2.0, 0.0];
        check::<i32>(&ai, &bi);
        check::<i64>(&ai, &bi);
        check::<u8>(&[1.0, 2.0, 3.0, 200.0], &[4.0, 5.0, 6.0, 1.0]);
    }

    #[test]
    fn integer_sum_and_prod_wrap_and_avg_truncates() {
        let mut a = [250u8, 16];
        u8::reduce_into(ReduceOp::Sum, &mut a, &[10, 16]);
        assert_eq!(a, [4, 32]);
        u8::reduce_into(ReduceOp::Prod, &mut a, &[64, 8]);
        assert_eq!(a, [0, 0]);
        let mut b = [7i32, -7];
        i32::divide_by(&mut b, 2);
        assert_eq!(b, [3, -3]);
        let mut c = [255u8, 200];
        u8::divide_by(&mut c, 300);
        assert_eq!(c, [0, 0], "300 ranks must not wrap to 44");
        let mut d = [255u8];
        u8::divide_by(&mut d, 256);
        assert_eq!(d, [0]);
    }

    #[test]
    fn half_types_reduce_across_block_boundaries() {
        let n = 2 * HALF_BLOCK + 7;
        let a: Vec<f16> = (0..n).map(|i| f16::from_f32((i % 50) as f32)).collect();
        let b: Vec<f16> = (0..n)
            .map(|i| f16::from_f32((i % 7) as f32 - 3.0))
            .collect();
        let mut acc = a.clone();
        f16::reduce_into(ReduceOp::Sum, &mut acc, &b);
        for i in 0..n {
            assert_eq!(acc[i].to_f32(), a[i].to_f32() + b[i].to_f32(), "at {i}");
        }
    }

    #[test]
    fn wire_codes_and_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_wire(d as u8), Some(d));
            assert_eq!(DType::parse(d.name()), Some(d));
        }
        for o in ReduceOp::ALL {
            assert_eq!(ReduceOp::from_wire(o as u8), Some(o));
            assert_eq!(ReduceOp::parse(o.name()), Some(o));
        }
        assert_eq!(DType::from_wire(0), None);
        assert_eq!(ReduceOp::from_wire(99), None);
    }
}
