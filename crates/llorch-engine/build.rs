//! Links cuBLAS dynamically when asked to (`LLORCH_CUDA_CUBLAS=dynamic`, set by
//! scripts/build-cuda.sh): llama-cpp-sys-2 links cuBLAS statically by name, and a CUDA toolkit
//! from PyPI wheels ships only the shared libraries, so that script puts empty archives under
//! the static names and the libraries themselves are linked here.

fn main() {
    println!("cargo:rerun-if-env-changed=LLORCH_CUDA_CUBLAS");
    let cuda = std::env::var_os("CARGO_FEATURE_CUDA").is_some();
    match std::env::var("LLORCH_CUDA_CUBLAS").as_deref() {
        Ok("dynamic") if cuda => {
            println!("cargo:rustc-link-lib=dylib=cublas");
            println!("cargo:rustc-link-lib=dylib=cublasLt");
        }
        Ok("dynamic") | Ok("static") | Err(_) => {}
        Ok(other) => panic!("LLORCH_CUDA_CUBLAS={other:?}: expected \"dynamic\" or \"static\""),
    }
}
