//! Shared pieces of the fuzz targets: a simplified model description that `arbitrary` can
//! generate and that turns into an ONNX `ModelProto`, and a scratch folder holding the
//! external-data files (and the links that attack them) models may point at.
//!
//! Random bytes rarely decode to a protobuf whose names connect into a graph; describing the
//! model instead lets the fuzzer spend its time in graph construction, shape inference and
//! external-data resolution rather than in the protobuf decoder.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use shrink::onnx::proto::{
    attribute_proto::AttributeType, tensor_proto::DataLocation,
    tensor_shape_proto::dimension::Value as DimValue, tensor_shape_proto::Dimension,
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

/// Caps what shrink may allocate for one tensor while fuzzing, well under libFuzzer's
/// `-rss_limit_mb`, so that an unchecked size claim shows up as a crash.
pub fn init() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        std::env::set_var("SHRINK_MEMORY_LIMIT", (256u64 << 20).to_string());
    });
}

/// Renders an error the way `main` does, so message formatting is fuzzed too.
pub fn render(e: &anyhow::Error) {
    let _ = shrink::hint::render(e);
    let _ = format!("{e:#} {e:?}");
}

/// A folder with external-data files and hostile links, created once per process:
/// `w.bin` (256 bytes), `big.bin` (4 KiB), `sub/` (a folder), `link_out.bin` (a symbolic
/// link to a file outside), `link_in.bin` (a link to `w.bin`), `hard.bin` (a hard link to a
/// file outside).
pub fn model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = tempfile::Builder::new()
            .prefix("shrink-fuzz-")
            .tempdir()
            .expect("scratch folder")
            .keep();
        let dir = root.join("model");
        let outside = root.join("outside");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let w: Vec<u8> = (0..256u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(dir.join("w.bin"), &w).unwrap();
        std::fs::write(dir.join("big.bin"), vec![0x3fu8; 4096]).unwrap();
        std::fs::write(outside.join("secret"), b"secret data, 32 bytes long.....").unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(outside.join("secret"), dir.join("link_out.bin")).unwrap();
            std::os::unix::fs::symlink("w.bin", dir.join("link_in.bin")).unwrap();
        }
        std::fs::hard_link(outside.join("secret"), dir.join("hard.bin")).unwrap();
        dir
    })
}

/// A per-process scratch file path, for targets that must hand a path to the code under test.
pub fn scratch(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("shrink-fuzz-scratch-")
            .tempdir()
            .expect("scratch folder")
            .keep()
    })
    .join(name)
}

const NAMES: &[&str] = &[
    "x", "w", "b", "y", "t0", "t1", "t2", "t3", "t4", "t5", "shape", "axes", "scale", "zp",
    "mean", "var", "",
];

/// A value name from a small pool, so that nodes connect to each other.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Name(u8);

impl Name {
    pub fn get(self) -> String {
        NAMES[self.0 as usize % NAMES.len()].to_string()
    }
}

const EXTRA_OPS: &[&str] = &["Constant", "Upsample", "If", "Loop", "QLinearConv", "NoSuchOp"];

#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Op(u8);

impl Op {
    pub fn get(self) -> String {
        let ops = shrink::onnx::shape::SUPPORTED_OPS;
        let i = self.0 as usize % (ops.len() + EXTRA_OPS.len());
        if i < ops.len() {
            ops[i].to_string()
        } else {
            EXTRA_OPS[i - ops.len()].to_string()
        }
    }
}

/// An integer that is small most of the time.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Int {
    Small(i8),
    Any(i64),
}

impl Int {
    pub fn get(self) -> i64 {
        match self {
            Int::Small(v) => v as i64,
            Int::Any(v) => v,
        }
    }
}

/// A tensor dimension: small, or a hostile claim.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum DimDesc {
    Small(u8),
    Any(i64),
}

impl DimDesc {
    pub fn get(self) -> i64 {
        match self {
            DimDesc::Small(v) => (v % 9) as i64,
            DimDesc::Any(v) => v,
        }
    }
}

const DTYPES: &[i32] = &[1, 7, 6, 2, 3, 9, 10, 11, 5, 8, 16, 17, 0, 99];

#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Dtype(u8);

impl Dtype {
    pub fn get(self) -> i32 {
        DTYPES[self.0 as usize % DTYPES.len()]
    }
}

const LOCATIONS: &[&str] = &[
    "w.bin",
    "big.bin",
    "./w.bin",
    "missing.bin",
    "../outside/secret",
    "sub/../../outside/secret",
    "/etc/passwd",
    "link_out.bin",
    "link_in.bin",
    "hard.bin",
    "sub",
    "",
    "w.bin\0",
    "sub/../w.bin",
];

#[derive(Arbitrary, Debug, Clone)]
pub enum Location {
    Known(u8),
    Any(String),
}

impl Location {
    fn get(&self) -> String {
        match self {
            Location::Known(i) => LOCATIONS[*i as usize % LOCATIONS.len()].to_string(),
            Location::Any(s) => s.clone(),
        }
    }
}

/// An external-data offset or length.
#[derive(Arbitrary, Debug, Clone)]
pub enum Count {
    Small(u16),
    Any(u64),
    Text(String),
}

impl Count {
    fn get(&self) -> String {
        match self {
            Count::Small(v) => v.to_string(),
            Count::Any(v) => v.to_string(),
            Count::Text(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
pub enum Payload {
    /// `raw_data` of exactly the declared size (when that is small), filled with a pattern.
    RawExact(u8),
    Raw(Vec<u8>),
    Floats(Vec<f32>),
    Int64s(Vec<Int>),
    Int32s(Vec<i32>),
    External {
        location: Location,
        offset: Option<Count>,
        length: Option<Count>,
        extra_keys: bool,
    },
}

#[derive(Arbitrary, Debug, Clone)]
pub struct TensorDesc {
    pub name: Name,
    pub dtype: Dtype,
    /// None: one dimension, as long as the payload.
    pub dims: Option<Vec<DimDesc>>,
    pub payload: Payload,
}

fn elem_size(dtype: i32) -> Option<usize> {
    Some(match dtype {
        1 | 6 | 12 => 4,
        7 | 11 | 13 => 8,
        2 | 3 | 9 | 17 => 1,
        5 | 4 | 10 | 16 => 2,
        _ => return None,
    })
}

impl TensorDesc {
    pub fn to_proto(&self) -> TensorProto {
        let mut t = TensorProto {
            name: self.name.get(),
            data_type: self.dtype.get(),
            ..Default::default()
        };
        let payload_len = match &self.payload {
            Payload::Raw(v) => v.len(),
            Payload::Floats(v) => v.len(),
            Payload::Int64s(v) => v.len(),
            Payload::Int32s(v) => v.len(),
            Payload::RawExact(_) | Payload::External { .. } => 1,
        };
        t.dims = match &self.dims {
            Some(d) => d.iter().map(|d| d.get()).collect(),
            None => vec![payload_len as i64],
        };
        match &self.payload {
            Payload::RawExact(seed) => {
                let numel = t
                    .dims
                    .iter()
                    .try_fold(1u64, |a, &d| a.checked_mul(u64::try_from(d).ok()?));
                let bytes = numel.and_then(|n| n.checked_mul(elem_size(t.data_type)? as u64));
                if let Some(n) = bytes.filter(|&n| n <= 1 << 16) {
                    t.raw_data = (0..n)
                        .map(|i| (i as u8).wrapping_mul(*seed) & 0x3f)
                        .collect();
                }
            }
            Payload::Raw(v) => t.raw_data = v.clone(),
            Payload::Floats(v) => t.float_data = v.clone(),
            Payload::Int64s(v) => t.int64_data = v.iter().map(|i| i.get()).collect(),
            Payload::Int32s(v) => t.int32_data = v.clone(),
            Payload::External {
                location,
                offset,
                length,
                extra_keys,
            } => {
                t.data_location = DataLocation::External as i32;
                let kv = |k: &str, v: String| StringStringEntryProto {
                    key: k.into(),
                    value: v,
                };
                t.external_data.push(kv("location", location.get()));
                if let Some(o) = offset {
                    t.external_data.push(kv("offset", o.get()));
                }
                if let Some(l) = length {
                    t.external_data.push(kv("length", l.get()));
                }
                if *extra_keys {
                    t.external_data.push(kv("checksum", "0".into()));
                    t.external_data.push(kv("location", "../dup".into()));
                }
            }
        }
        t
    }
}

const ATTRS: &[&str] = &[
    "kernel_shape",
    "strides",
    "pads",
    "dilations",
    "group",
    "axis",
    "axes",
    "perm",
    "transA",
    "transB",
    "auto_pad",
    "ceil_mode",
    "to",
    "value",
    "value_float",
    "value_floats",
    "value_int",
    "value_ints",
    "keepdims",
    "split",
    "allowzero",
    "starts",
    "ends",
    "output_padding",
    "output_shape",
    "scales",
    "start",
    "end",
    "alpha",
    "epsilon",
    "then_branch",
];

const STRINGS: &[&str] = &["NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER", "nearest", ""];

#[derive(Arbitrary, Debug, Clone)]
pub enum AttrValue {
    Int(Int),
    Ints(Vec<Int>),
    Float(f32),
    Floats(Vec<f32>),
    Str(u8),
    AnyStr(Vec<u8>),
    Tensor(TensorDesc),
    Graph(Box<GraphDesc>),
}

#[derive(Arbitrary, Debug, Clone)]
pub struct AttrDesc {
    pub name: u8,
    /// Whether the `type` field matches the value (exporters sometimes leave it unset).
    pub typed: u8,
    pub value: AttrValue,
}

impl AttrDesc {
    fn to_proto(&self, depth: usize) -> AttributeProto {
        let mut a = AttributeProto {
            name: ATTRS[self.name as usize % ATTRS.len()].to_string(),
            ..Default::default()
        };
        let ty = match &self.value {
            AttrValue::Int(v) => {
                a.i = v.get();
                AttributeType::Int
            }
            AttrValue::Ints(v) => {
                a.ints = v.iter().map(|i| i.get()).collect();
                AttributeType::Ints
            }
            AttrValue::Float(v) => {
                a.f = *v;
                AttributeType::Float
            }
            AttrValue::Floats(v) => {
                a.floats = v.clone();
                AttributeType::Floats
            }
            AttrValue::Str(i) => {
                a.s = STRINGS[*i as usize % STRINGS.len()].as_bytes().to_vec();
                AttributeType::String
            }
            AttrValue::AnyStr(v) => {
                a.s = v.clone();
                AttributeType::String
            }
            AttrValue::Tensor(t) => {
                a.t = Some(t.to_proto());
                AttributeType::Tensor
            }
            AttrValue::Graph(g) => {
                a.g = Some(g.to_proto(depth + 1));
                AttributeType::Graph
            }
        };
        a.r#type = match self.typed % 3 {
            0 => ty as i32,
            1 => 0,
            _ => (self.typed as i32) % 14,
        };
        a
    }
}

#[derive(Arbitrary, Debug, Clone)]
pub struct NodeDesc {
    pub op: Op,
    pub domain: u8,
    pub name: Option<Name>,
    pub inputs: Vec<Name>,
    pub outputs: Vec<Name>,
    pub attrs: Vec<AttrDesc>,
}

impl NodeDesc {
    fn to_proto(&self, i: usize, depth: usize) -> NodeProto {
        NodeProto {
            name: match self.name {
                Some(n) => format!("{}{i}", n.get()),
                None => String::new(),
            },
            op_type: self.op.get(),
            domain: match self.domain % 8 {
                1 => "ai.onnx".into(),
                2 => "com.microsoft".into(),
                _ => String::new(),
            },
            input: self.inputs.iter().map(|n| n.get()).collect(),
            output: self.outputs.iter().map(|n| n.get()).collect(),
            attribute: self.attrs.iter().map(|a| a.to_proto(depth)).collect(),
            ..Default::default()
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
pub enum DimInfo {
    Fixed(DimDesc),
    Param(bool),
    Unknown,
}

#[derive(Arbitrary, Debug, Clone)]
pub struct ValueDesc {
    pub name: Name,
    pub elem_type: Dtype,
    pub shape: Option<Vec<DimInfo>>,
    pub untyped: bool,
}

impl ValueDesc {
    pub fn to_proto(&self) -> ValueInfoProto {
        let shape = self.shape.as_ref().map(|dims| TensorShapeProto {
            dim: dims
                .iter()
                .map(|d| Dimension {
                    value: match d {
                        DimInfo::Fixed(v) => Some(DimValue::DimValue(v.get())),
                        DimInfo::Param(true) => Some(DimValue::DimParam("batch".into())),
                        DimInfo::Param(false) => Some(DimValue::DimParam(String::new())),
                        DimInfo::Unknown => None,
                    },
                    denotation: String::new(),
                })
                .collect(),
        });
        ValueInfoProto {
            name: self.name.get(),
            r#type: (!self.untyped).then(|| TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: self.elem_type.get(),
                    shape,
                })),
                denotation: String::new(),
            }),
            ..Default::default()
        }
    }
}

/// Nesting depths to try: mostly none (encoding cost grows with the square of the depth).
const NESTING: [usize; 8] = [0, 0, 0, 0, 1, 3, 98, 120];

#[derive(Arbitrary, Debug, Clone)]
pub struct GraphDesc {
    pub inputs: Vec<ValueDesc>,
    pub outputs: Vec<ValueDesc>,
    pub value_info: Vec<ValueDesc>,
    pub initializers: Vec<TensorDesc>,
    pub nodes: Vec<NodeDesc>,
    /// Wraps the graph in nested `If` subgraphs, around prost's recursion limit of 100
    /// (see `NESTING`).
    pub nest: u8,
}

impl GraphDesc {
    pub fn to_proto(&self, depth: usize) -> GraphProto {
        let mut g = GraphProto {
            name: "g".into(),
            input: self.inputs.iter().map(ValueDesc::to_proto).collect(),
            output: self.outputs.iter().map(ValueDesc::to_proto).collect(),
            value_info: self.value_info.iter().map(ValueDesc::to_proto).collect(),
            initializer: self.initializers.iter().map(TensorDesc::to_proto).collect(),
            node: self
                .nodes
                .iter()
                .enumerate()
                .map(|(i, n)| n.to_proto(i, depth))
                .collect(),
            ..Default::default()
        };
        // Nesting only at the top keeps generated inputs small while still reaching
        // depths past prost's recursion limit.
        let levels = NESTING[self.nest as usize % NESTING.len()];
        if depth == 0 && levels > 0 {
            let mut inner = g.clone();
            for _ in 0..levels {
                inner = GraphProto {
                    name: "nested".into(),
                    node: vec![NodeProto {
                        op_type: "If".into(),
                        attribute: vec![AttributeProto {
                            name: "then_branch".into(),
                            r#type: AttributeType::Graph as i32,
                            g: Some(inner),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                    ..Default::default()
                };
            }
            g.node.push(inner.node.remove(0));
        }
        g
    }
}

#[derive(Arbitrary, Debug, Clone)]
pub struct ModelDesc {
    pub ir_version: u8,
    pub opset: Option<u8>,
    pub ai_onnx_domain: bool,
    pub extra_opset: bool,
    pub graph: Option<GraphDesc>,
}

impl ModelDesc {
    pub fn to_proto(&self) -> ModelProto {
        let mut opset_import = Vec::new();
        if let Some(v) = self.opset {
            opset_import.push(OperatorSetIdProto {
                domain: if self.ai_onnx_domain {
                    "ai.onnx".into()
                } else {
                    String::new()
                },
                version: (v % 24) as i64,
            });
        }
        if self.extra_opset {
            opset_import.push(OperatorSetIdProto {
                domain: "com.microsoft".into(),
                version: 1,
            });
        }
        ModelProto {
            ir_version: (self.ir_version % 12) as i64,
            opset_import,
            producer_name: "fuzz".into(),
            graph: self.graph.as_ref().map(|g| g.to_proto(0)),
            ..Default::default()
        }
    }
}

/// Everything `shrink inspect` does with a model before handing it to a backend: IR
/// construction, the summary (shape inference at batch 1), the sample shape, and shape
/// inference at another batch size.
pub fn exercise_model(proto: ModelProto) {
    let model = match shrink::onnx::Model::from_proto(proto) {
        Ok(m) => m,
        Err(e) => return render(&e),
    };
    if let Err(e) = shrink::onnx::summary::summarize(&model) {
        render(&e);
    }
    if let Err(e) = shrink::bench::measure::sample_shape(&model) {
        render(&e);
    }
    let g = &model.graph;
    match shrink::onnx::shape::input_shapes(g, 3) {
        Ok(shapes) => {
            if let Err(e) = shrink::onnx::shape::infer(g, &shapes) {
                render(&e);
            }
        }
        Err(e) => render(&e),
    }
    let _ = model.to_proto();
}

const NPY_DESCRS: &[&str] = &[
    "<f4", "|u1", "<f8", "<u1", "|i1", "<i8", "<i4", "<i2", "<u2", ">f4", "<c8", "O", "",
];
const NPZ_NAMES: &[&str] = &["x.npy", "y.npy", "z.npy", "x", "X.npy"];

#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum ShapeDim {
    Small(u8),
    Any(u64),
}

impl ShapeDim {
    fn get(self) -> u64 {
        match self {
            ShapeDim::Small(v) => (v % 33) as u64,
            ShapeDim::Any(v) => v,
        }
    }
}

#[derive(Arbitrary, Debug, Clone)]
pub enum NpyData {
    /// Exactly as many bytes as the header declares (when that is small).
    Exact(u8),
    Bytes(Vec<u8>),
    Floats(Vec<f32>),
}

/// One `.npy` array: a header (possibly malformed) and its data.
#[derive(Arbitrary, Debug, Clone)]
pub struct NpyDesc {
    pub version: u8,
    pub descr: u8,
    pub fortran: bool,
    pub shape: Vec<ShapeDim>,
    /// Replaces the header dictionary text.
    pub header_text: Option<String>,
    /// Declares this header length instead of the real one.
    pub header_len: Option<u32>,
    pub data: NpyData,
}

impl NpyDesc {
    pub fn to_bytes(&self) -> Vec<u8> {
        let descr = NPY_DESCRS[self.descr as usize % NPY_DESCRS.len()];
        let dims: Vec<u64> = self.shape.iter().map(|d| d.get()).collect();
        let shape = dims.iter().map(|d| format!("{d}, ")).collect::<String>();
        let mut dict = match &self.header_text {
            Some(t) => t.clone(),
            None => format!(
                "{{'descr': '{descr}', 'fortran_order': {}, 'shape': ({shape}), }}",
                if self.fortran { "True" } else { "False" }
            ),
        };
        while (dict.len() + 11) % 64 != 0 {
            dict.push(' ');
        }
        dict.push('\n');
        let version = match self.version % 5 {
            0 | 1 => 1,
            2 => 2,
            3 => 3,
            _ => self.version,
        };
        let mut b = b"\x93NUMPY".to_vec();
        b.push(version);
        b.push(0);
        let len = self.header_len.unwrap_or(dict.len() as u32);
        if version == 1 {
            b.extend_from_slice(&(len as u16).to_le_bytes());
        } else {
            b.extend_from_slice(&len.to_le_bytes());
        }
        b.extend_from_slice(dict.as_bytes());
        match &self.data {
            NpyData::Exact(seed) => {
                let size = match descr {
                    "<f4" | "<i4" | ">f4" => 4,
                    "<f8" | "<i8" | "<c8" => 8,
                    "<i2" | "<u2" => 2,
                    _ => 1,
                };
                let n = dims
                    .iter()
                    .try_fold(size as u64, |a, &d| a.checked_mul(d))
                    .filter(|&n| n <= 1 << 16);
                if let Some(n) = n {
                    b.extend((0..n).map(|i| (i as u8).wrapping_mul(*seed) & 0x3f));
                }
            }
            NpyData::Bytes(v) => b.extend_from_slice(v),
            NpyData::Floats(v) => v.iter().for_each(|f| b.extend_from_slice(&f.to_le_bytes())),
        }
        b
    }
}

#[derive(Arbitrary, Debug, Clone)]
pub struct NpzEntry {
    pub name: u8,
    pub deflate: bool,
    pub array: NpyDesc,
}

/// An `.npz` archive: entries written with the zip crate, then optionally damaged.
#[derive(Arbitrary, Debug, Clone)]
pub struct NpzDesc {
    pub entries: Vec<NpzEntry>,
    pub truncate: Option<u16>,
    pub flip: Option<(u16, u8)>,
}

impl NpzDesc {
    pub fn to_bytes(&self) -> Vec<u8> {
        use std::io::Write;
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for e in &self.entries {
            let method = if e.deflate {
                zip::CompressionMethod::Deflated
            } else {
                zip::CompressionMethod::Stored
            };
            let opts = zip::write::SimpleFileOptions::default().compression_method(method);
            let name = NPZ_NAMES[e.name as usize % NPZ_NAMES.len()];
            if w.start_file(name, opts).is_err() {
                continue;
            }
            let _ = w.write_all(&e.array.to_bytes());
        }
        let mut b = w.finish().map(|c| c.into_inner()).unwrap_or_default();
        if let Some((at, x)) = self.flip {
            if !b.is_empty() {
                let i = at as usize % b.len();
                b[i] ^= x;
            }
        }
        if let Some(t) = self.truncate {
            b.truncate(t as usize);
        }
        b
    }
}

/// Preprocessing options for dataset targets.
#[derive(Arbitrary, Debug, Clone)]
pub struct Pre {
    pub limit: Option<u16>,
    pub bgr: bool,
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
}

impl Pre {
    pub fn get(&self) -> shrink::data::Preprocess {
        shrink::data::Preprocess {
            limit: self.limit.map(usize::from),
            channel_order: self.bgr.then_some(shrink::data::ChannelOrder::Bgr),
            mean: self.mean.clone(),
            std: self.std.clone(),
            ..Default::default()
        }
    }
}

/// Opens a dataset for each candidate sample shape and streams it to the end.
pub fn exercise_dataset(path: &Path, pre: &Pre, samples: &[[usize; 3]], batch: usize) {
    for &sample in samples {
        let ds = match shrink::data::Dataset::open(path, &pre.get(), sample) {
            Ok(d) => d,
            Err(e) => {
                render(&e);
                continue;
            }
        };
        match ds.batches(batch) {
            Ok(mut it) => loop {
                match it.next_batch() {
                    Ok(Some(b)) => assert_eq!(b.x.len(), b.shape.iter().product::<usize>()),
                    Ok(None) => break,
                    Err(e) => {
                        render(&e);
                        break;
                    }
                }
            },
            Err(e) => render(&e),
        }
        if let Err(e) = ds.load_all() {
            render(&e);
        }
    }
}
