//! Graph IR construction and shape inference on generated graphs, with arbitrary concrete
//! input shapes. Also checks that writing the IR back and reading it again gives the same
//! graph (the IR is what quantize and distill rewrite and save).
#![no_main]

use std::collections::HashMap;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use prost::Message;

#[derive(Arbitrary, Debug)]
struct Input {
    graph: shrink_fuzz::GraphDesc,
    /// Concrete shapes for graph inputs, in order; missing ones come from the declared shape.
    shapes: Vec<Vec<u8>>,
    batch: u8,
}

fuzz_target!(|input: Input| {
    shrink_fuzz::init();
    let mut input = input;
    // The IR does not descend into subgraphs; deep nesting only slows this target down.
    input.graph.nest = 0;
    let proto = input.graph.to_proto(0);
    let graph = match shrink::onnx::Graph::from_proto(&proto) {
        Ok(g) => g,
        Err(e) => return shrink_fuzz::render(&e),
    };
    let mut shapes: HashMap<String, Vec<usize>> =
        match shrink::onnx::shape::input_shapes(&graph, input.batch as usize % 5) {
            Ok(s) => s,
            Err(e) => {
                shrink_fuzz::render(&e);
                HashMap::new()
            }
        };
    for (v, s) in graph.inputs.iter().zip(&input.shapes) {
        shapes.insert(v.name.clone(), s.iter().map(|&d| d as usize % 17).collect());
    }
    if let Err(e) = shrink::onnx::shape::infer(&graph, &shapes) {
        shrink_fuzz::render(&e);
    }
    // Round trip: the IR written back reads as the same graph.
    let written = graph.to_proto(None);
    let again = shrink::onnx::Graph::from_proto(&written)
        .expect("a graph the IR wrote must read back");
    assert_eq!(
        again.to_proto(None).encode_to_vec(),
        written.encode_to_vec(),
        "IR round trip changed the graph"
    );
});
