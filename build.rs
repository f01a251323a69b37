//! Link-time settings for libtorch (installed by `scripts/setup.sh` under `.libtorch`).
//!
//! 1. An rpath to libtorch's `lib/` so that binaries and tests run without `LD_LIBRARY_PATH`.
//! 2. When the CUDA libraries are installed (GPU machines), force-link `libtorch` with
//!    `--no-as-needed`: otherwise the linker drops `libtorch_cuda` (no symbol of ours references it)
//!    and CUDA is silently unavailable. On the lean CPU install those libraries are absent and
//!    linking `libtorch_cuda` would make the binary fail to start, so we leave it out.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Ok(libtorch) = std::env::var("LIBTORCH") else { return };
    let root = PathBuf::from(&libtorch);
    let root = root.canonicalize().unwrap_or(root);
    let lib = root.join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    let cudnn = root.join("../nvidia/cudnn/lib");
    if cudnn.exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch,--as-needed");
    }
}
