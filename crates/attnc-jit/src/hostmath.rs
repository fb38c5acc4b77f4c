//! Scalar math functions the generated code calls by symbol (scalar tails and ops without an
//! inline vector form). Each is computed in f64 and rounded once, so it is correctly rounded
//! in practice.

/// `exp(x)`.
pub extern "C" fn attnc_exp(x: f32) -> f32 {
    (x as f64).exp() as f32
}

/// `ln(x)` (NaN for x < 0, -inf for 0).
pub extern "C" fn attnc_log(x: f32) -> f32 {
    (x as f64).ln() as f32
}

/// `tanh(x)`.
pub extern "C" fn attnc_tanh(x: f32) -> f32 {
    (x as f64).tanh() as f32
}

/// `1 / (1 + exp(-x))`.
pub extern "C" fn attnc_sigmoid(x: f32) -> f32 {
    (1.0 / (1.0 + (-(x as f64)).exp())) as f32
}

/// `x` for `x > 0`, else `exp(x) - 1`.
pub extern "C" fn attnc_elu(x: f32) -> f32 {
    let x = x as f64;
    (if x > 0.0 { x } else { x.exp_m1() }) as f32
}

/// The symbol table handed to the JIT: (name, address).
pub fn symbols() -> Vec<(&'static str, *const u8)> {
    vec![
        ("attnc_exp", attnc_exp as *const u8),
        ("attnc_log", attnc_log as *const u8),
        ("attnc_tanh", attnc_tanh as *const u8),
        ("attnc_sigmoid", attnc_sigmoid as *const u8),
        ("attnc_elu", attnc_elu as *const u8),
    ]
}
