//! Compiles the C++ for what tch's API lacks (csrc/varlen.cpp: packed flash attention, backward from an
//! output gradient; csrc/fused.cpp: NVRTC-compiled fused kernels as autograd functions; csrc/block.cpp:
//! the LLM block with an explicit backward; csrc/trace.cpp: libtorch's profiler as a timeline; csrc/storage.cpp:
//! freeing and restoring a storage's memory, ZeRO-3's reshard after forward) against the libtorch that torch-sys found, with its flags.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/varlen.cpp");
    println!("cargo:rerun-if-changed=csrc/fused.cpp");
    println!("cargo:rerun-if-changed=csrc/fused.h");
    println!("cargo:rerun-if-changed=csrc/block.cpp");
    println!("cargo:rerun-if-changed=csrc/trace.cpp");
    println!("cargo:rerun-if-changed=csrc/storage.cpp");
    let lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys passes DEP_TCH_LIBTORCH_LIB"));
    let root = lib.parent().expect("libtorch's lib folder has a parent").to_path_buf();
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        // pip's torch (the only libtorch this project builds against) uses the C++11 ABI.
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/varlen.cpp")
        .file("csrc/fused.cpp")
        .file("csrc/block.cpp")
        .file("csrc/trace.cpp")
        .file("csrc/storage.cpp")
        .compile("idavlm_varlen");
}
