//! Compiles the .proto files with protox (pure Rust, no protoc needed at build time), then
//! generates prost message types and their proto3-JSON serde impls (pbjson), and for each
//! service a module of RPC descriptors (one type per method implementing `wrenn_proto::Rpc`:
//! its path and message types), so clients and servers name methods by type, not by string.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/process/process.proto",
        "proto/filesystem/filesystem.proto",
        "proto/agent/agent.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("descriptors.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&descriptors),
    )?;

    prost_build::Config::new()
        .service_generator(Box::new(RpcDescriptors))
        .compile_well_known_types()
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(descriptors)?;

    pbjson_build::Builder::new()
        .register_descriptors(&std::fs::read(&descriptor_path)?)?
        .ignore_unknown_fields()
        .build(&[".process", ".filesystem", ".wrenn.agent.v1"])?;
    Ok(())
}

/// Writes `pub mod <service>` with a unit type per method, implementing `crate::Rpc`.
struct RpcDescriptors;

fn snake_case(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

impl prost_build::ServiceGenerator for RpcDescriptors {
    fn generate(&mut self, service: prost_build::Service, buf: &mut String) {
        use std::fmt::Write;
        let service_path = format!("/{}.{}", service.package, service.proto_name);
        let outer = |rust_type: &str| {
            if rust_type.starts_with("::") || rust_type.starts_with("crate::") {
                rust_type.to_string()
            } else {
                format!("super::{rust_type}")
            }
        };
        let _ = writeln!(
            buf,
            "/// The RPCs of `{}.{}`.\npub mod {} {{",
            service.package,
            service.proto_name,
            snake_case(&service.name)
        );
        let _ = writeln!(
            buf,
            "    /// The service's path prefix.\n    pub const SERVICE: &str = {service_path:?};"
        );
        for method in &service.methods {
            let path = format!("{service_path}/{}", method.proto_name);
            let _ = writeln!(
                buf,
                "    /// `rpc {name}`: `{path}`.\n    #[derive(Debug, Clone, Copy)]\n    pub struct {name};\n    impl crate::Rpc for {name} {{\n        const PATH: &'static str = {path:?};\n        const CLIENT_STREAMING: bool = {cs};\n        const SERVER_STREAMING: bool = {ss};\n        type Request = {req};\n        type Response = {resp};\n    }}",
                name = method.proto_name,
                cs = method.client_streaming,
                ss = method.server_streaming,
                req = outer(&method.input_type),
                resp = outer(&method.output_type),
            );
        }
        let _ = writeln!(buf, "}}");
    }
}
