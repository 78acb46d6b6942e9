//! Regenerates the committed prost code for the ONNX protobuf schema.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let proto_dir = root.join("src/onnx/proto");
    let out = tempdir(&root)?;
    prost_build::Config::new()
        .out_dir(&out)
        .compile_protos(&[proto_dir.join("onnx.proto3")], &[&proto_dir])?;
    std::fs::rename(out.join("onnx.rs"), proto_dir.join("onnx.rs"))?;
    std::fs::remove_dir_all(&out)?;
    println!("wrote {}", proto_dir.join("onnx.rs").display());
    Ok(())
}

fn tempdir(root: &std::path::Path) -> std::io::Result<PathBuf> {
    let dir = root.join("target/protogen-out");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
