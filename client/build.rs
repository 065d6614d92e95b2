//! Generates the raftwal.v1 gRPC code with the vendored protoc, so a build needs nothing
//! installed by hand.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: a build script is single-threaded, so nothing reads the environment concurrently;
    // prost-build finds protoc through PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/raftwal/v1/raftwal.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/raftwal/v1/raftwal.proto");
    Ok(())
}
