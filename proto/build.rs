//! Generates the gRPC code with protox, a pure-Rust protobuf compiler: no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=moat/sync/v1/sync.proto");
    let fds = protox::compile(["moat/sync/v1/sync.proto"], ["."])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
