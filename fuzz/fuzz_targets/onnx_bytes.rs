//! The ONNX loader on raw bytes: protobuf decoding, the model checks, external data resolved
//! against a folder holding data files and hostile links, then the graph IR and the summary.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    shrink_fuzz::init();
    match shrink::onnx::load::load_model_bytes(data, shrink_fuzz::model_dir()) {
        Ok(proto) => shrink_fuzz::exercise_model(proto),
        Err(e) => shrink_fuzz::render(&e),
    }
});
