//! The wire contract: Rust types and gRPC stubs generated from `proto/headcount/v1/headcount.proto`.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

pub mod codec;
pub mod metadata;
pub mod schedule;

/// Version 1 of the Headcount protocol.
pub mod v1 {
    tonic::include_proto!("headcount.v1");

    /// Encoded `FileDescriptorSet` of the protocol, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("headcount_descriptor");
}
