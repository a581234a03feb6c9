//! Generates the wire types from `proto/` with protox (pure Rust), so building
//! needs no system `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/certmesh.proto");
    let fds = protox::compile(["proto/certmesh.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
