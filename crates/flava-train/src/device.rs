//! Picking the compute device from a name (`flex`, `cuda`, `wgpu`).

use burn::prelude::*;

/// Resolves a device name. GPU backends exist only when the crate is built with the `cuda` or
/// `wgpu` feature; asking for one that is not compiled in is an error that says how to get it.
pub fn pick_device(name: &str) -> anyhow::Result<Device> {
    // `cuda:N` / `wgpu:N`: the N-th device of that kind (for data parallelism).
    if let Some((kind, index)) = name.split_once(':') {
        let index: usize = index
            .parse()
            .map_err(|_| anyhow::anyhow!("device `{name}`: expected KIND:INDEX, e.g. cuda:1"))?;
        return match kind {
            #[cfg(feature = "cuda")]
            "cuda" => Ok(Device::cuda(index)),
            "flex" | "cpu" if index == 0 => Ok(Device::flex()),
            "flex" | "cpu" => anyhow::bail!("device `{name}`: there is one CPU device, flex:0"),
            #[cfg(not(feature = "cuda"))]
            "cuda" => not_compiled(kind),
            other => anyhow::bail!("unknown device `{other}:{index}` (expected cuda:N or flex)"),
        };
    }
    match name {
        "flex" | "cpu" => Ok(Device::flex()),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Device::cuda(0)),
        #[cfg(feature = "wgpu-untuned")]
        "wgpu" => Ok(Device::wgpu(Default::default())),
        #[cfg(not(feature = "cuda"))]
        "cuda" => not_compiled(name),
        #[cfg(not(feature = "wgpu-untuned"))]
        "wgpu" => not_compiled(name),
        other => anyhow::bail!("unknown device `{other}` (expected flex, cuda or wgpu)"),
    }
}

#[allow(dead_code)] // unused when every GPU feature is enabled
fn not_compiled(name: &str) -> anyhow::Result<Device> {
    anyhow::bail!(
        "device `{name}` is not compiled in: rebuild with `cargo build --release -p flava-train --features {name}`"
    )
}
