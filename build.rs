//! Link-time settings for libtorch (installed by `scripts/setup.sh` under `.libtorch`), and the C++ shim
//! over PyTorch's distributed engine (c10d).
//!
//! 1. An rpath to libtorch's `lib/` so that binaries and tests run without `LD_LIBRARY_PATH`.
//! 2. When the CUDA libraries are installed (GPU machines), force-link `libtorch` with
//!    `--no-as-needed`: otherwise the linker drops `libtorch_cuda` (no symbol of ours references it)
//!    and CUDA is silently unavailable. On the lean CPU install those libraries are absent and
//!    linking `libtorch_cuda` would make the binary fail to start, so we leave it out.
//! 3. `csrc/dist.cpp`, compiled against the same libtorch headers and C++ ABI as tch, exposes c10d's
//!    TCPStore and process groups to `src/distributed.rs` (cfg `lisa_c10d`). The wheel ships no Gloo
//!    headers: Gloo is compiled in when Debian's `libgloo-dev` (or `GLOO_INCLUDE_DIR`) provides them;
//!    NCCL when the CUDA runtime and NCCL headers of the CUDA wheels are installed. Without either the
//!    crate still builds, and asking for more than one process says what is missing.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/dist.cpp");
    println!("cargo:rerun-if-changed=csrc/dist_nccl.cpp");
    println!("cargo:rerun-if-changed=csrc/checkpoint.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=GLOO_INCLUDE_DIR");
    println!("cargo::rustc-check-cfg=cfg(lisa_c10d)");
    println!("cargo::rustc-check-cfg=cfg(lisa_checkpoint)");
    let Ok(libtorch) = std::env::var("LIBTORCH") else { return };
    let root = PathBuf::from(&libtorch);
    let root = root.canonicalize().unwrap_or(root);
    let lib = root.join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    let cudnn = root.join("../nvidia/cudnn/lib");
    if cudnn.exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch,--as-needed");
    }
    build_checkpoint(&root);
    build_shim(&root);
}

/// The activation-recomputation shim (`csrc/checkpoint.cpp`): a custom autograd function, which tch does not
/// bind; it needs only libtorch's autograd headers.
fn build_checkpoint(root: &Path) {
    let include = root.join("include");
    if !include.join("torch/csrc/autograd/custom_function.h").exists() {
        println!("cargo:warning=libtorch at {} has no autograd headers: activation recomputation is unavailable", root.display());
        return;
    }
    libtorch_cpp(&include).file("csrc/checkpoint.cpp").compile("lisa_checkpoint");
    println!("cargo:rustc-link-search=native={}", root.join("lib").display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-cfg=lisa_checkpoint");
}

/// The C++ ABI flag libtorch was built with: the wheel since torch 2.7 uses the new ABI; `LIBTORCH_CXX11_ABI`
/// (torch-sys's variable) overrides it for other builds.
/// A C++17 build against libtorch's headers in `include`, with its ABI.
fn libtorch_cpp(include: &Path) -> cc::Build {
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++17")
        .include(include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi().as_str())
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false);
    b
}

fn cxx11_abi() -> String {
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into())
}

fn build_shim(root: &Path) {
    let include = root.join("include");
    if !include.join("torch/csrc/distributed/c10d/TCPStore.hpp").exists() {
        let root = root.display();
        println!("cargo:warning=libtorch at {root} has no c10d headers: multi-process training is unavailable");
        return;
    }
    let gloo = std::env::var("GLOO_INCLUDE_DIR").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("/usr/include"));
    let has_gloo = gloo.join("gloo/algorithm.h").exists();
    let base = || {
        let mut b = libtorch_cpp(&include);
        if has_gloo {
            b.include(&gloo).define("USE_C10D_GLOO", None);
        }
        b
    };
    let nvidia = root.join("../nvidia");
    let find =
        |dirs: [&str; 2], header: &str| dirs.map(|d| nvidia.join(d)).into_iter().find(|d| d.join(header).exists());
    let cuda_include = find(["cu13/include", "cuda_runtime/include"], "cuda_runtime_api.h");
    let nccl_include = find(["nccl/include", "cu13/include"], "nccl.h");
    let mut has_nccl = false;
    if let (Some(cuda), Some(nccl)) = (cuda_include, nccl_include) {
        let mut b = base();
        // Its archive is named to the linker after the main shim's, which calls into it.
        b.include(cuda).include(nccl).define("USE_C10D_NCCL", None).define("USE_CUDA", None).file("csrc/dist_nccl.cpp");
        b.cargo_metadata(false);
        match b.try_compile("lisa_c10d_nccl") {
            Ok(()) => has_nccl = true,
            Err(e) => println!("cargo:warning=the NCCL backend did not compile ({e}); GPUs train in one process only"),
        }
    }
    let mut b = base();
    if has_gloo {
        b.define("LISA_GLOO", None);
    } else {
        println!(
            "cargo:warning=no Gloo headers (install libgloo-dev or set GLOO_INCLUDE_DIR): CPU training runs in one \
             process only"
        );
    }
    if has_nccl {
        b.define("LISA_NCCL", None);
    }
    b.file("csrc/dist.cpp").compile("lisa_c10d");
    // After the shim's archives, so that their references to libtorch resolve.
    println!("cargo:rustc-link-search=native={}", root.join("lib").display());
    if has_nccl {
        println!("cargo:rustc-link-lib=static=lisa_c10d_nccl");
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-cfg=lisa_c10d");
}
