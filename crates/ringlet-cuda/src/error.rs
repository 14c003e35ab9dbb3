//! What can go wrong with CUDA, as values.

/// Errors of the CUDA layer.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A CUDA library is not on this machine (or not where we looked).
    #[error("no CUDA: {library} was not found (looked in: {searched}); install it or set {env}")]
    NoCuda {
        library: &'static str,
        searched: String,
        env: &'static str,
    },
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("NVRTC could not compile {kernel} for sm_{arch}: {log}")]
    Compile {
        kernel: &'static str,
        arch: u32,
        log: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl CudaError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> CudaError {
        CudaError::Io {
            context: context.into(),
            source,
        }
    }
}

/// CUDA's errors as the collectives report them.
impl From<CudaError> for ringlet_core::Error {
    fn from(e: CudaError) -> Self {
        ringlet_core::Error::Device(e.to_string())
    }
}

impl From<cudarc::driver::DriverError> for CudaError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        CudaError::Driver(format!("{e:?}"))
    }
}
