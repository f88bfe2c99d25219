//! Run-time choice of the instruction set every kernel dispatches on.
//!
//! Detected once per process. `TIEFSEE_ISA=scalar` forces the scalar reference kernels everywhere
//! (for debugging and for comparing against them in benchmarks).

use std::sync::OnceLock;

/// The instruction sets the kernels are written for, best last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust, the reference every SIMD kernel is tested against.
    Scalar,
    /// x86-64 AVX2 with FMA and F16C (Haswell, Zen and later).
    Avx2,
}

impl Isa {
    /// A short lowercase name for logs and benchmark output.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
        }
    }
}

/// The best instruction set this CPU supports (detected on first call), unless `TIEFSEE_ISA=scalar`.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var("TIEFSEE_ISA").is_ok_and(|v| v.eq_ignore_ascii_case("scalar")) {
            Isa::Scalar
        } else {
            detected()
        }
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
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}
