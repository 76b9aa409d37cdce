//! Generates the control API's types and gRPC stubs from the proto, with a
//! pure-Rust protobuf compiler (protox): no protoc on the build machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../proto/vigil/control/v1/control.proto";
    println!("cargo:rerun-if-changed={proto}");
    let files = protox::compile([proto], ["../proto"])?;
    tonic_prost_build::configure().compile_fds(files)?;
    Ok(())
}
