//! What the benchmark measures: Ringlet's ring (`tcp`) or, with the `mpi` feature, the MPI
//! library's own collectives (`mpi`) on the same buffers, so one binary compares both in one run.

use clap::ValueEnum;
use ringlet::{Communicator, Element, Error, ReduceOp};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// NCCL when every rank has a CUDA device and NCCL, else Ringlet's TCP ring (decided by
    /// rank 0 for all; RINGLET_DEBUG=1 prints the device table).
    Auto,
    /// Ringlet's pipelined TCP ring.
    Tcp,
    /// NCCL on device buffers (one GPU per rank; ranks on one host share its GPUs). Fails,
    /// naming each rank that lacks a device or NCCL, where any does.
    Nccl,
    /// MPI_Allreduce, MPI_Bcast, MPI_Allgather, MPI_Reduce_scatter_block (needs the `mpi`
    /// feature and an MPI launcher).
    Mpi,
}

/// The buffers of one call. In-place backends work on `recv` alone; MPI (whose Rust bindings
/// have no `MPI_IN_PLACE`) reads `send` and writes `recv`, like nccl-tests' out-of-place mode.
pub struct Buffers<T> {
    pub send: Vec<T>,
    pub recv: Vec<T>,
}

/// The collectives the sweep calls.
pub trait Backend {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Whether all_reduce and broadcast read `send` (out of place) rather than `recv`.
    fn out_of_place(&self) -> bool;
    /// Copies the filled buffers to where the collectives run (the GPU, for device backends),
    /// outside the timed calls.
    fn upload<T: Element>(&self, _b: &Buffers<T>) -> Result<(), Error> {
        Ok(())
    }
    /// Copies the result back to `b.recv` for the check.
    fn download<T: Element>(&self, _b: &mut Buffers<T>) -> Result<(), Error> {
        Ok(())
    }
    fn all_reduce<T: Element>(&self, b: &mut Buffers<T>, op: ReduceOp) -> Result<(), Error>;
    fn broadcast<T: Element>(&self, b: &mut Buffers<T>, root: usize) -> Result<(), Error>;
    fn all_gather<T: Element>(&self, b: &mut Buffers<T>) -> Result<(), Error>;
    fn reduce_scatter<T: Element>(&self, b: &mut Buffers<T>, op: ReduceOp) -> Result<(), Error>;
    /// Reductions of the bench's own bookkeeping (timings, error counts).
    fn max_f64(&self, x: f64) -> Result<f64, Error>;
    fn sum_i64(&self, x: i64) -> Result<i64, Error>;
    fn barrier(&self) -> Result<(), Error>;
}

impl Backend for Communicator {
    fn rank(&self) -> usize {
        Communicator::rank(self)
    }
    fn world_size(&self) -> usize {
        Communicator::world_size(self)
    }
    fn out_of_place(&self) -> bool {
        false
    }
    fn all_reduce<T: Element>(&self, b: &mut Buffers<T>, op: ReduceOp) -> Result<(), Error> {
        Communicator::all_reduce(self, &mut b.recv, op)
    }
    fn broadcast<T: Element>(&self, b: &mut Buffers<T>, root: usize) -> Result<(), Error> {
        Communicator::broadcast(self, &mut b.recv, root)
    }
    fn all_gather<T: Element>(&self, b: &mut Buffers<T>) -> Result<(), Error> {
        Communicator::all_gather(self, &b.send, &mut b.recv)
    }
    fn reduce_scatter<T: Element>(&self, b: &mut Buffers<T>, op: ReduceOp) -> Result<(), Error> {
        Communicator::reduce_scatter(self, &b.send, &mut b.recv, op)
    }
    fn max_f64(&self, x: f64) -> Result<f64, Error> {
        let mut v = [x];
        Communicator::all_reduce(self, &mut v, ReduceOp::Max)?;
        Ok(v[0])
    }
    fn sum_i64(&self, x: i64) -> Result<i64, Error> {
        let mut v = [x];
        Communicator::all_reduce(self, &mut v, ReduceOp::Sum)?;
        Ok(v[0])
    }
    fn barrier(&self) -> Result<(), Error> {
        Communicator::barrier(self)
    }
}

#[cfg(feature = "mpi")]
pub use self::mpi_backend::MpiBackend;

#[cfg(feature = "mpi")]
mod mpi_backend {
    use super::{Backend, Buffers};
    use ringlet::mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
    use ringlet::mpi::topology::{Communicator as _, SimpleCommunicator};
    use ringlet::{DType, Element, Error, ReduceOp};

    /// `MPI_COMM_WORLD` of an initialised MPI.
    pub struct MpiBackend {
        pub world: SimpleCommunicator,
    }

    /// Runs `$body` with `$S` the Rust type MPI knows for `$T`'s data type; `$T` and `$S` are
    /// the same type at run time, so the slice casts in `$body` never fail.
    macro_rules! as_mpi_type {
        ($T:ty, $S:ident => $body:expr) => {
            match <$T as Element>::DTYPE {
                DType::F32 => {
                    type $S = f32;
                    $body
                }
                DType::F64 => {
                    type $S = f64;
                    $body
                }
                DType::I32 => {
                    type $S = i32;
                    $body
                }
                DType::I64 => {
                    type $S = i64;
                    $body
                }
                DType::U8 => {
                    type $S = u8;
                    $body
                }
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "MPI has no {} datatype: use float, double, int32, int64 or uint8 with --backend mpi",
                        other.name()
                    )))
                }
            }
        };
    }

    fn mpi_op(op: ReduceOp) -> Result<SystemOperation, Error> {
        Ok(match op {
            ReduceOp::Sum => SystemOperation::sum(),
            ReduceOp::Prod => SystemOperation::product(),
            ReduceOp::Min => SystemOperation::min(),
            ReduceOp::Max => SystemOperation::max(),
            ReduceOp::Avg => {
                return Err(Error::InvalidArgument(
                    "MPI has no avg reduction: use sum, prod, min or max with --backend mpi".into(),
                ))
            }
        })
    }

    fn cast<T: Element, S: Element>(v: &[T]) -> &[S] {
        bytemuck::cast_slice(v)
    }

    fn cast_mut<T: Element, S: Element>(v: &mut [T]) -> &mut [S] {
        bytemuck::cast_slice_mut(v)
    }

    impl Backend for MpiBackend {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn world_size(&self) -> usize {
            self.world.size() as usize
        }
        fn out_of_place(&self) -> bool {
            true
        }
        fn all_reduce<T: Element>(&self, b: &mut Buffers<T>, op: ReduceOp) -> Result<(), Error> {
            let op = mpi_op(op)?;
            as_mpi_type!(T, S => self.world.all_reduce_into(cast::<T, S>(&b.send), cast_mut::<T, S>(&mut b.recv), op));
            Ok(())
        }
        fn broadcast<T: Element>(&self, b: &mut Buffers<T>, root: usize) -> Result<(), Error> {
            let root = self.world.process_at_rank(root as i32);
            as_mpi_type!(T, S => root.broadcast_into(cast_mut::<T, S>(&mut b.recv)));
            Ok(())
        }
        fn all_gather<T: Element>(&self, b: &mut Buffers<T>) -> Result<(), Error> {
            as_mpi_type!(T, S => self.world.all_gather_into(cast::<T, S>(&b.send), cast_mut::<T, S>(&mut b.recv)));
            Ok(())
        }
        fn reduce_scatter<T: Element>(
            &self,
            b: &mut Buffers<T>,
            op: ReduceOp,
        ) -> Result<(), Error> {
            let op = mpi_op(op)?;
            as_mpi_type!(T, S => self.world.reduce_scatter_block_into(cast::<T, S>(&b.send), cast_mut::<T, S>(&mut b.recv), op));
            Ok(())
        }
        fn max_f64(&self, x: f64) -> Result<f64, Error> {
            let mut out = 0.0;
            self.world
                .all_reduce_into(&x, &mut out, SystemOperation::max());
            Ok(out)
        }
        fn sum_i64(&self, x: i64) -> Result<i64, Error> {
            let mut out = 0;
            self.world
                .all_reduce_into(&x, &mut out, SystemOperation::sum());
            Ok(out)
        }
        fn barrier(&self) -> Result<(), Error> {
            self.world.barrier();
            Ok(())
        }
    }
}
