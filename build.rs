//! Generates the gRPC code and the reflection descriptor from `proto/` with `protox`, a pure-Rust
//! protobuf compiler, so a fresh machine needs nothing but cargo (no system `protoc`).

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/headcount/v1/headcount.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("headcount_descriptor.bin"), fds.encode_to_vec())?;
    // Small per-stream buffers (see `proto/codec.rs`): tonic's default codec reserves 8 KiB each way
    // on every stream, which dominated the aggregator's memory with 10,000 idle streams.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::proto::codec::LeanCodec")
        .compile_fds(fds)?;
    Ok(())
}
