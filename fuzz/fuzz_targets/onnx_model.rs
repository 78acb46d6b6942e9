//! The ONNX loader on generated models: a description (`shrink_fuzz::ModelDesc`) becomes a
//! `ModelProto`, is encoded, then loaded like a file (external data included) and analysed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|desc: shrink_fuzz::ModelDesc| {
    shrink_fuzz::init();
    let bytes = desc.to_proto().encode_to_vec();
    match shrink::onnx::load::load_model_bytes(&bytes, shrink_fuzz::model_dir()) {
        Ok(proto) => shrink_fuzz::exercise_model(proto),
        Err(e) => shrink_fuzz::render(&e),
    }
});
