//! Run-time choice of the instruction set every kernel dispatches on.
//!
//! Detected once per process. `TIEFSEE_ISA=scalar` forces the scalar reference kernels everywhere and
//! `TIEFSEE_ISA=avx2` caps an AVX-512 machine at AVX2 (for debugging and for comparing in benchmarks).

use std::sync::OnceLock;

/// The instruction sets the kernels are written for, best last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust, the reference every SIMD kernel is tested against.
    Scalar,
    /// x86-64 AVX2 with FMA and F16C (Haswell, Zen and later).
    Avx2,
    /// AVX2 plus AVX-512 F, BW, VL and VNNI (Ice Lake, Sapphire Rapids, Zen 4 and later).
    Avx512,
}

impl Isa {
    /// A short lowercase name for logs and benchmark output.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

/// The best instruction set this CPU supports (detected on first call), capped by `TIEFSEE_ISA`
/// (`scalar` or `avx2`; other values are ignored).
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = match std::env::var("TIEFSEE_ISA") {
            Ok(v) if v.eq_ignore_ascii_case("scalar") => Isa::Scalar,
            Ok(v) if v.eq_ignore_ascii_case("avx2") => Isa::Avx2,
            _ => Isa::Avx512,
        };
        detected().min(cap)
    })
}

/// The best instruction set the CPU supports, ignoring the environment.
pub fn detected() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
            {
                return Isa::Avx512;
            }
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}
