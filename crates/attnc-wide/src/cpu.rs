//! CPU feature detection for the full-width tiers.

use std::sync::OnceLock;

/// The full-width features this process may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Features {
    /// AVX-512 F, BW, DQ and VL (512-bit f32 FMA, masked loads and stores).
    pub avx512: bool,
    /// AVX-512 BF16 (`vdpbf16ps`, `vcvtne2ps2bf16`).
    pub avx512_bf16: bool,
    /// AVX-512 VNNI (`vpdpbusd` on zmm).
    pub avx512_vnni: bool,
    /// AMX tiles with bf16 products (`tdpbf16ps`), usable by this process.
    pub amx_bf16: bool,
    /// AMX tiles with int8 products (`tdpbusd`), usable by this process.
    pub amx_int8: bool,
}

impl Features {
    /// No full-width feature: the portable path only.
    pub const NONE: Features = Features {
        avx512: false,
        avx512_bf16: false,
        avx512_vnni: false,
        amx_bf16: false,
        amx_int8: false,
    };

    /// What this CPU has and this process may use (detected once; AMX after the kernel granted
    /// the tile-data permission).
    pub fn detect() -> Features {
        static DETECTED: OnceLock<Features> = OnceLock::new();
        *DETECTED.get_or_init(detect_uncached)
    }

    /// These features with those of `mask` cleared where `mask` lacks them.
    pub fn intersect(self, mask: Features) -> Features {
        Features {
            avx512: self.avx512 && mask.avx512,
            avx512_bf16: self.avx512_bf16 && mask.avx512_bf16,
            avx512_vnni: self.avx512_vnni && mask.avx512_vnni,
            amx_bf16: self.amx_bf16 && mask.amx_bf16,
            amx_int8: self.amx_int8 && mask.amx_int8,
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn detect_uncached() -> Features {
    let avx512 = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vl");
    let amx = amx_bits();
    let amx_usable = amx.tile && request_amx_permission();
    Features {
        avx512,
        avx512_bf16: avx512 && is_x86_feature_detected!("avx512bf16"),
        avx512_vnni: avx512 && is_x86_feature_detected!("avx512vnni"),
        amx_bf16: amx_usable && amx.bf16,
        amx_int8: amx_usable && amx.int8,
    }
}

/// The AMX bits of CPUID leaf 7 (`is_x86_feature_detected!` knows them only on nightly).
#[cfg(target_arch = "x86_64")]
struct AmxBits {
    tile: bool,
    bf16: bool,
    int8: bool,
}

#[cfg(target_arch = "x86_64")]
fn amx_bits() -> AmxBits {
    use std::arch::x86_64::__cpuid_count;
    // CPUID exists on every x86-64 CPU; leaf 0 says whether leaf 7 does.
    let max_leaf = __cpuid_count(0, 0).eax;
    if max_leaf < 7 {
        return AmxBits {
            tile: false,
            bf16: false,
            int8: false,
        };
    }
    let edx = __cpuid_count(7, 0).edx;
    AmxBits {
        bf16: edx & (1 << 22) != 0,
        tile: edx & (1 << 24) != 0,
        int8: edx & (1 << 25) != 0,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_uncached() -> Features {
    Features::NONE
}

/// Asks Linux for permission to use AMX tile data in this process (once per process; the
/// kernel refuses tile instructions without it). True when granted.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_amx_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    const SYS_ARCH_PRCTL: i64 = 158;
    let ret: i64;
    // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) only changes this process's
    // permitted xsave features; it reads and writes no user memory. The syscall clobbers rcx
    // and r11, declared below.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

#[cfg(all(target_arch = "x86_64", not(target_os = "linux")))]
fn request_amx_permission() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_is_stable_and_consistent() {
        let f = Features::detect();
        assert_eq!(f, Features::detect());
        // The extensions imply the base.
        assert!(!f.avx512_bf16 || f.avx512);
        assert!(!f.avx512_vnni || f.avx512);
        assert_eq!(f.intersect(Features::NONE), Features::NONE);
        eprintln!("full-width features: {f:?}");
    }
}
