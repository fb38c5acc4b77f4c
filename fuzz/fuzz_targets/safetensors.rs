//! Any bytes as a safetensors file: the reader returns named tensors or an error, never
//! panics, and every tensor it returns has exactly as many elements as its shape says.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(tensors) = attnc::io::parse_safetensors(bytes) {
        for (name, tensor) in &tensors {
            let elements = attnc::io::shape_product(&tensor.shape).expect("a parsed shape fits");
            assert_eq!(elements, tensor.len(), "{name}: shape {:?}", tensor.shape);
        }
    }
});
