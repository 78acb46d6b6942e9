//! The `.npz` dataset reader: archives generated from a description (valid, malformed
//! headers, size claims larger than the data, damaged zip structure) or raw bytes, opened
//! as a dataset and streamed to the end.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Archive {
    Described(shrink_fuzz::NpzDesc),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    archive: Archive,
    pre: shrink_fuzz::Pre,
    /// A sample shape to open the dataset for, besides the shapes the archive declares.
    sample: [u8; 3],
    batch: u8,
}

fuzz_target!(|input: Input| {
    shrink_fuzz::init();
    let bytes = match &input.archive {
        Archive::Described(d) => {
            for e in &d.entries {
                let npy = e.array.to_bytes();
                if let Err(e) = shrink::data::npy::read_header(&mut &npy[..]) {
                    shrink_fuzz::render(&e);
                }
            }
            d.to_bytes()
        }
        Archive::Raw(b) => b.clone(),
    };
    let path = shrink_fuzz::scratch("d.npz");
    std::fs::write(&path, &bytes).expect("write scratch file");
    let mut samples = vec![input.sample.map(|d| d as usize % 9)];
    // The shapes `x` declares, so that the reader gets past the shape check.
    if let Ok((shape, _)) = shrink::data::npy::read_npz_array(&path, "x") {
        if shape.len() == 4 {
            samples.push([shape[1], shape[2], shape[3]]);
            samples.push([shape[3], shape[1], shape[2]]);
        } else if shape.len() == 3 {
            samples.push([1, shape[1], shape[2]]);
        }
    }
    let _ = shrink::data::npy::read_npz_array(&path, "y");
    shrink_fuzz::exercise_dataset(&path, &input.pre, &samples, input.batch as usize % 70 + 1);
});
