//! Any bytes as a `.npy` file: the reader returns a tensor or an error, never panics, and a
//! tensor it returns has exactly as many elements as its shape says and encodes back.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(tensor) = attnc::io::parse_npy(bytes) {
        let elements = attnc::io::shape_product(&tensor.shape).expect("a parsed shape fits");
        assert_eq!(elements, tensor.len(), "shape {:?}", tensor.shape);
        attnc::io::encode_npy(&tensor).expect("a parsed tensor encodes");
    }
});
