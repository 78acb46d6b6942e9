//! Reading and writing `.onnx` files, including external data kept beside the model.
//!
//! External data is resolved strictly inside the model's folder: absolute paths, `..`,
//! symlinks or hard links that lead elsewhere, and offsets or lengths beyond the data file
//! are refused (the attack classes behind CVE-2022-25882, CVE-2024-27318 and their
//! follow-ups).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use prost::Message;

use super::proto::{tensor_proto::DataLocation, GraphProto, ModelProto, TensorProto};
use crate::hint::HintExt;

/// Protobuf cannot encode messages above 2 GiB; larger files are not ONNX models.
const MAX_MODEL_BYTES: u64 = 2 << 30;

/// Reads and decodes a model, loading external data into the tensors that reference it.
pub fn load_model(path: &Path) -> Result<ModelProto> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read model {}", path.display()))
        .hint("check the path; models are `.onnx` files exported with e.g. torch.onnx.export")?;
    ensure!(meta.is_file(), "{} is not a file", path.display());
    ensure!(
        meta.len() <= MAX_MODEL_BYTES,
        "{} is {} bytes, larger than a protobuf message can be; models over 2 GB keep weights in external data files",
        path.display(),
        meta.len()
    );
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read model {}", path.display()))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    load_model_bytes(&bytes, &dir).with_context(|| format!("cannot load {}", path.display()))
}

/// Decodes a model read from a file in `dir` and loads its external data from `dir`.
pub fn load_model_bytes(bytes: &[u8], dir: &Path) -> Result<ModelProto> {
    let mut model = decode_model(bytes)
        .context("not a valid ONNX model")
        .hint("the file may be truncated or not an ONNX file; re-export it and check it with `python -c \"import onnx; onnx.checker.check_model('MODEL')\"`")?;
    load_external_data(&mut model, dir).context("cannot load external data")?;
    Ok(model)
}

/// Decodes a model from bytes and checks that it looks like ONNX (has a graph and opsets).
pub fn decode_model(bytes: &[u8]) -> Result<ModelProto> {
    let model =
        ModelProto::decode(bytes).map_err(|e| anyhow::anyhow!("protobuf decoding failed: {e}"))?;
    ensure!(model.graph.is_some(), "the file holds no graph");
    ensure!(
        model.ir_version > 0 && !model.opset_import.is_empty(),
        "the file has no IR version or opset imports"
    );
    Ok(model)
}

/// Encodes and writes a model atomically.
pub fn save_model(model: &ModelProto, path: &Path) -> Result<()> {
    let bytes = model.encode_to_vec();
    ensure!(
        bytes.len() as u64 <= MAX_MODEL_BYTES,
        "the model is {} bytes, over the 2 GB protobuf limit",
        bytes.len()
    );
    crate::util::write_atomic(path, &bytes)
}

/// Every tensor of the model, subgraphs (`If`/`Loop` bodies, graph attributes of any op)
/// and sparse initializers included: external data must be resolved here, under our checks,
/// wherever it hides, never left for a backend to follow. prost's recursion limit bounds the
/// nesting depth.
fn all_tensors_mut(model: &mut ModelProto) -> Vec<&mut TensorProto> {
    fn graph<'a>(g: &'a mut GraphProto, out: &mut Vec<&'a mut TensorProto>) {
        out.extend(g.initializer.iter_mut());
        for s in g.sparse_initializer.iter_mut() {
            out.extend(s.values.as_mut());
            out.extend(s.indices.as_mut());
        }
        for n in g.node.iter_mut() {
            for a in n.attribute.iter_mut() {
                out.extend(a.t.as_mut());
                out.extend(a.tensors.iter_mut());
                if let Some(s) = a.sparse_tensor.as_mut() {
                    out.extend(s.values.as_mut());
                    out.extend(s.indices.as_mut());
                }
                for s in a.sparse_tensors.iter_mut() {
                    out.extend(s.values.as_mut());
                    out.extend(s.indices.as_mut());
                }
                if let Some(sub) = a.g.as_mut() {
                    graph(sub, out);
                }
                for sub in a.graphs.iter_mut() {
                    graph(sub, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    if let Some(g) = model.graph.as_mut() {
        graph(g, &mut out);
    }
    for f in model.functions.iter_mut() {
        for n in f.node.iter_mut() {
            for a in n.attribute.iter_mut() {
                out.extend(a.t.as_mut());
                out.extend(a.tensors.iter_mut());
                if let Some(sub) = a.g.as_mut() {
                    graph(sub, &mut out);
                }
                for sub in a.graphs.iter_mut() {
                    graph(sub, &mut out);
                }
            }
        }
    }
    out
}

fn load_external_data(model: &mut ModelProto, dir: &Path) -> Result<()> {
    let mut files: HashMap<PathBuf, (std::fs::File, u64)> = HashMap::new();
    // Bytes loaded so far: many small tensors can claim as much as one huge one.
    let mut total: u64 = 0;
    for t in all_tensors_mut(model) {
        if t.data_location != DataLocation::External as i32 {
            continue;
        }
        let name = t.name.clone();
        let mut kv: HashMap<&str, &str> = HashMap::new();
        for e in &t.external_data {
            // A second `location` could point a later reader somewhere other than what
            // we checked; ONNX lists each key once.
            ensure!(
                kv.insert(e.key.as_str(), e.value.as_str()).is_none(),
                "tensor `{name}` lists external data key `{}` twice",
                e.key
            );
        }
        let location = kv
            .get("location")
            .with_context(|| format!("tensor `{name}` has external data without a `location`"))?;
        let parse = |k: &str| -> Result<Option<u64>> {
            kv.get(k)
                .map(|v| {
                    v.parse::<u64>().with_context(|| {
                        format!("tensor `{name}`: external data `{k}` is `{v}`, not a byte count")
                    })
                })
                .transpose()
        };
        let offset = parse("offset")?.unwrap_or(0);
        let length = parse("length")?;
        let file_path =
            resolve_inside(dir, location).with_context(|| format!("tensor `{name}`"))?;
        if !files.contains_key(&file_path) {
            let opened = open_checked(&file_path, location).with_context(|| {
                format!(
                    "tensor `{name}`: cannot open external data file {}",
                    file_path.display()
                )
            })?;
            files.insert(file_path.clone(), opened);
        }
        let Some((file, file_len)) = files.get_mut(&file_path) else {
            bail!("external data file {} vanished", file_path.display());
        };
        let length = match length {
            Some(l) => l,
            None => file_len.checked_sub(offset).with_context(|| {
                format!("tensor `{name}`: offset {offset} is beyond the end of {location} ({file_len} bytes)")
            })?,
        };
        let end = offset
            .checked_add(length)
            .with_context(|| format!("tensor `{name}`: offset + length overflows"))?;
        ensure!(
            end <= *file_len,
            "tensor `{name}`: external data [{offset}, {end}) is beyond the end of {location} ({file_len} bytes)"
        );
        let mut numel: u64 = 1;
        for &d in &t.dims {
            ensure!(d >= 0, "tensor `{name}` has a negative dimension");
            numel = numel
                .checked_mul(d as u64)
                .with_context(|| format!("tensor `{name}`: size overflows"))?;
        }
        if let Ok(dt) = super::proto::tensor_proto::DataType::try_from(t.data_type) {
            if let Some(es) = super::tensor::dtype_size(dt) {
                let want = numel
                    .checked_mul(es as u64)
                    .with_context(|| format!("tensor `{name}`: size overflows"))?;
                ensure!(
                    want == length,
                    "tensor `{name}`: dimensions {:?} need {want} bytes but external data gives {length}",
                    t.dims
                );
            }
        }
        // A sparse file can be terabytes long while occupying nothing on disk.
        total = total.saturating_add(length);
        crate::util::ensure_fits_in_memory(Some(total), || {
            format!("external data (up to tensor `{name}`, in {location})")
        })?;
        let length = usize::try_from(length)
            .with_context(|| format!("tensor `{name}`: {length} bytes do not fit in memory"))?;
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(offset))?;
        let mut buf = vec![0u8; length];
        file.read_exact(&mut buf)
            .with_context(|| format!("tensor `{name}`: cannot read external data"))?;
        t.raw_data = buf;
        t.data_location = DataLocation::Default as i32;
        t.external_data.clear();
    }
    Ok(())
}

/// Resolves an external-data `location` strictly inside `dir`.
pub fn resolve_inside(dir: &Path, location: &str) -> Result<PathBuf> {
    let rel = Path::new(location);
    ensure!(!location.is_empty(), "external data location is empty");
    ensure!(
        !location.contains('\0'),
        "external data location contains a NUL byte"
    );
    for c in rel.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => bail!("external data location `{location}` uses `..`; data files must sit in the model's folder"),
            Component::RootDir | Component::Prefix(_) => {
                bail!("external data location `{location}` is absolute; data files must sit in the model's folder")
            }
        }
    }
    let joined = dir.join(rel);
    let root = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve the model's folder {}", dir.display()))?;
    let real = joined
        .canonicalize()
        .with_context(|| format!("external data file {} does not exist", joined.display()))?;
    ensure!(
        real.starts_with(&root),
        "external data location `{location}` leads outside the model's folder (to {}) through a symbolic link",
        real.display()
    );
    let meta = std::fs::metadata(&real)?;
    ensure!(
        meta.is_file(),
        "external data location `{location}` is not a regular file"
    );
    check_links(&meta, location)?;
    Ok(real)
}

/// Refuses a file with more than one hard link.
fn check_links(meta: &std::fs::Metadata, location: &str) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // A hard link gives a file a second name inside the folder while its bytes belong to
        // a file elsewhere (e.g. /etc/shadow); ONNX's own fix refuses them too.
        ensure!(
            meta.nlink() == 1,
            "external data file `{location}` has {} hard links; refusing it because it may be a link to a file outside the model's folder",
            meta.nlink()
        );
    }
    #[cfg(not(unix))]
    let _ = (meta, location);
    Ok(())
}

/// Opens a path [`resolve_inside`] accepted and checks the opened file itself: if the path
/// was swapped for a link between the check and the open, the handle's file differs from
/// the one the path names now, or has several links, and it is refused.
fn open_checked(real: &Path, location: &str) -> Result<(std::fs::File, u64)> {
    let f = std::fs::File::open(real)?;
    let meta = f.metadata()?;
    ensure!(
        meta.is_file(),
        "external data location `{location}` is not a regular file"
    );
    check_links(&meta, location)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let now = std::fs::symlink_metadata(real)?;
        ensure!(
            !now.file_type().is_symlink() && (now.dev(), now.ino()) == (meta.dev(), meta.ino()),
            "external data file `{location}` changed while it was opened; refusing it"
        );
    }
    Ok((f, meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::StringStringEntryProto;

    fn ext_tensor(
        location: &str,
        offset: Option<u64>,
        length: Option<u64>,
        dims: Vec<i64>,
    ) -> TensorProto {
        let mut kv = vec![StringStringEntryProto {
            key: "location".into(),
            value: location.into(),
        }];
        if let Some(o) = offset {
            kv.push(StringStringEntryProto {
                key: "offset".into(),
                value: o.to_string(),
            });
        }
        if let Some(l) = length {
            kv.push(StringStringEntryProto {
                key: "length".into(),
                value: l.to_string(),
            });
        }
        TensorProto {
            name: "w".into(),
            dims,
            data_type: 1,
            data_location: DataLocation::External as i32,
            external_data: kv,
            ..Default::default()
        }
    }

    fn model_with(t: TensorProto) -> ModelProto {
        ModelProto {
            ir_version: 8,
            opset_import: vec![crate::onnx::proto::OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            graph: Some(crate::onnx::proto::GraphProto {
                initializer: vec![t],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn external_data_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let vals: Vec<u8> = [1.0f32, 2.0, 3.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let mut data = vec![0u8; 8];
        data.extend_from_slice(&vals);
        std::fs::write(dir.path().join("w.bin"), &data).unwrap();
        let mut m = model_with(ext_tensor("w.bin", Some(8), Some(12), vec![3]));
        load_external_data(&mut m, dir.path()).unwrap();
        let t = crate::onnx::Tensor::from_proto(&m.graph.unwrap().initializer[0]).unwrap();
        assert_eq!(t.as_f32().unwrap(), &[1.0, 2.0, 3.0]);
    }

    #[test]
    fn traversal_and_absolute_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for loc in ["../secret.bin", "/etc/passwd", "a/../../x"] {
            let mut m = model_with(ext_tensor(loc, None, None, vec![1]));
            let e = format!("{:#}", load_external_data(&mut m, dir.path()).unwrap_err());
            assert!(e.contains("`..`") || e.contains("absolute"), "{loc}: {e}");
        }
    }

    #[test]
    fn symlink_out_of_folder_is_refused() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), [0u8; 4]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("w.bin"))
            .unwrap();
        let mut m = model_with(ext_tensor("w.bin", None, None, vec![1]));
        let e = format!("{:#}", load_external_data(&mut m, dir.path()).unwrap_err());
        assert!(e.contains("outside the model's folder"), "{e}");
    }

    #[test]
    fn hardlink_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("orig"), [0u8; 4]).unwrap();
        std::fs::hard_link(dir.path().join("orig"), dir.path().join("w.bin")).unwrap();
        let mut m = model_with(ext_tensor("w.bin", None, None, vec![1]));
        let e = format!("{:#}", load_external_data(&mut m, dir.path()).unwrap_err());
        assert!(e.contains("hard links"), "{e}");
    }

    #[test]
    fn offsets_beyond_file_and_overflow_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("w.bin"), [0u8; 8]).unwrap();
        for (off, len) in [
            (Some(4), Some(8)),
            (Some(u64::MAX), Some(2)),
            (Some(16), None),
        ] {
            let mut m = model_with(ext_tensor("w.bin", off, len, vec![2]));
            assert!(
                load_external_data(&mut m, dir.path()).is_err(),
                "{off:?} {len:?}"
            );
        }
        // A length that disagrees with the declared dimensions.
        let mut m = model_with(ext_tensor("w.bin", Some(0), Some(8), vec![1000]));
        assert!(load_external_data(&mut m, dir.path()).is_err());
    }
}
