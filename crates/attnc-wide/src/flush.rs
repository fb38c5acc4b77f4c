//! Flush-to-zero for the span of a kernel: results that would be subnormal become 0.
//!
//! Every x86 instruction that produces (or reads) a subnormal f32 takes a microcode assist of
//! about a hundred cycles; in products of decayed weights (`γ^t` or `exp(c_i − c_j)` far
//! below 2⁻¹²⁶) nearly every vector does, and a kernel slows down several-fold. With the FTZ
//! bit set in MXCSR such a result is 0 instead: an absolute error below 2⁻¹²⁶ per operation.
//! Subnormal inputs are still read as they are (DAZ stays off), so a value the caller passes
//! reaches the arithmetic unchanged.

/// MXCSR's flush-to-zero bit.
#[cfg(target_arch = "x86_64")]
const FTZ: u32 = 1 << 15;

/// While alive, this thread flushes subnormal f32/f64 results to zero; dropping it restores
/// the thread's previous mode.
#[must_use = "the mode lasts only while the guard is alive"]
pub struct FlushToZero {
    #[cfg(target_arch = "x86_64")]
    saved: u32,
}

impl FlushToZero {
    /// Sets flush-to-zero on the calling thread (a no-op off x86-64).
    pub fn new() -> FlushToZero {
        #[cfg(target_arch = "x86_64")]
        {
            let saved = read_csr();
            write_csr(saved | FTZ);
            FlushToZero { saved }
        }
        #[cfg(not(target_arch = "x86_64"))]
        FlushToZero {}
    }
}

impl Default for FlushToZero {
    fn default() -> FlushToZero {
        FlushToZero::new()
    }
}

impl Drop for FlushToZero {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        write_csr(self.saved);
    }
}

#[cfg(target_arch = "x86_64")]
fn read_csr() -> u32 {
    let mut csr = 0u32;
    // SAFETY: stores the 32-bit MXCSR (SSE, baseline on x86-64) into a local.
    unsafe {
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
    }
    csr
}

#[cfg(target_arch = "x86_64")]
fn write_csr(csr: u32) {
    // SAFETY: loads a value read from MXCSR with only the FTZ bit changed (or restored): no
    // reserved bit is set, so no #GP.
    unsafe {
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags));
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    /// `x · y` computed where the compiler cannot fold it.
    fn product(x: f32, y: f32) -> f32 {
        std::hint::black_box(x) * std::hint::black_box(y)
    }

    #[test]
    fn subnormal_results_flush_while_the_guard_lives() {
        let tiny = f32::MIN_POSITIVE;
        assert!(product(tiny, 0.25) > 0.0, "gradual underflow by default");
        {
            let _flush = FlushToZero::new();
            assert_eq!(product(tiny, 0.25), 0.0);
            // Subnormal inputs are read as they are.
            assert_eq!(product(tiny * 0.25, 0.0), 0.0);
            assert_eq!(
                product(std::hint::black_box(1e-40f32), 1e30),
                1e-40f32 * 1e30
            );
            assert_eq!(product(tiny, 2.0), tiny * 2.0);
        }
        assert!(product(tiny, 0.25) > 0.0, "restored on drop");
    }
}
