//! The CUDA devices of this host, through the driver API.

use crate::libs::{self, CudaLib};
use crate::CudaError;
use cudarc::driver::result;
use cudarc::driver::sys::CUdevice_attribute as Attr;

/// One device, as the driver reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    /// (major, minor): (8, 0) is sm_80.
    pub compute_capability: (u32, u32),
    pub total_memory: u64,
    /// `domain:bus:device.0`, as `nvidia-smi` prints it.
    pub pci_bus_id: String,
}

impl DeviceInfo {
    /// The architecture number NVRTC takes: 80 for sm_80.
    pub fn arch(&self) -> u32 {
        self.compute_capability.0 * 10 + self.compute_capability.1
    }
}

/// Loads the driver and initialises it: [`CudaError::NoCuda`] where there is none.
pub fn init_driver() -> Result<(), CudaError> {
    // SAFETY: is_culib_present only asks whether cudarc can open the library; no CUDA call.
    libs::require(CudaLib::Driver, || unsafe {
        cudarc::driver::sys::is_culib_present()
    })?;
    result::init().map_err(CudaError::from)
}

/// Every device the driver sees, in ordinal order.
pub fn devices() -> Result<Vec<DeviceInfo>, CudaError> {
    init_driver()?;
    let count = result::device::get_count()?;
    (0..count)
        .map(|ordinal| {
            let dev = result::device::get(ordinal)?;
            // SAFETY: `dev` is a valid device handle from cuDeviceGet after cuInit succeeded.
            let attr =
                |a: Attr| unsafe { result::device::get_attribute(dev, a) }.map_err(CudaError::from);
            let major = attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
            let minor = attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
            let domain = attr(Attr::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID)?;
            let bus = attr(Attr::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)?;
            let slot = attr(Attr::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID)?;
            Ok(DeviceInfo {
                ordinal: ordinal as usize,
                name: result::device::get_name(dev)?,
                compute_capability: (major as u32, minor as u32),
                // SAFETY: as above.
                total_memory: unsafe { result::device::total_mem(dev) }? as u64,
                pci_bus_id: format!("{domain:08x}:{bus:02x}:{slot:02x}.0"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a driver: a typed error, no panic. With one: every device described.
    #[test]
    fn devices_are_listed_or_their_absence_is_a_typed_error() {
        match devices() {
            Err(CudaError::NoCuda { library, .. }) => assert_eq!(library, "libcuda.so.1"),
            Err(e) => panic!("a driver is present but failed: {e}"),
            Ok(list) => {
                for d in list {
                    assert!(
                        !d.name.is_empty() && d.total_memory > 0 && d.arch() >= 30,
                        "{d:?}"
                    );
                    println!("{d:?}");
                }
            }
        }
    }
}
