//! The instruction-set level the CPU kernels run at, picked once per process.
//!
//! Three levels: `avx512` (x86-64-v4: AVX-512 F/BW/DQ/VL with AVX2, FMA and F16C), `avx2`
//! (AVX2, FMA and F16C) and `scalar` (the baseline target, SSE2 on x86-64; the only level off
//! x86-64). The best level the CPU supports is used unless `ORWCFM_CPU_ISA` names a lower one,
//! so every level can be run and tested on one machine. Every multiversioned kernel (the GEMM,
//! [`crate::backend::cpu::simd`], the Winograd transforms, the element-wise kernels) asks
//! [`level`] which of its compiled bodies to run.

use std::sync::OnceLock;

/// An instruction-set level, ordered from the plainest to the widest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

/// The environment variable that lowers the level.
pub const ENV: &str = "ORWCFM_CPU_ISA";

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// What the level means on this architecture, for `devices` and `bench`.
    pub fn describe(self) -> &'static str {
        match self {
            Isa::Scalar => "baseline target, no SIMD beyond it",
            Isa::Avx2 => "AVX2 + FMA, 256-bit",
            Isa::Avx512 => "AVX-512 F/BW/DQ/VL + FMA, 512-bit",
        }
    }

    pub fn parse(s: &str) -> Option<Isa> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" | "plain" | "none" | "baseline" => Some(Isa::Scalar),
            "avx2" | "avx2+fma" | "fma" => Some(Isa::Avx2),
            "avx512" | "avx-512" | "avx512f" => Some(Isa::Avx512),
            _ => None,
        }
    }

    /// Whether this CPU can run the level.
    pub fn supported(self) -> bool {
        self <= detected()
    }

    /// Every level this CPU runs, plainest first.
    pub fn runnable() -> impl Iterator<Item = Isa> {
        Isa::ALL.into_iter().filter(|l| l.supported())
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The best level this CPU supports.
pub fn detected() -> Isa {
    static BEST: OnceLock<Isa> = OnceLock::new();
    *BEST.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let v3 = has!("avx") && has!("avx2") && has!("fma") && has!("f16c");
            let v4 = v3 && has!("avx512f") && has!("avx512bw") && has!("avx512dq") && has!("avx512vl");
            if v4 {
                return Isa::Avx512;
            }
            if v3 {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    })
}

/// What `ORWCFM_CPU_ISA` asks for, checked: `Ok(None)` when unset, an error when it names no
/// level or one above what the CPU supports.
pub fn requested() -> Result<Option<Isa>, String> {
    let Some(v) = std::env::var_os(ENV) else { return Ok(None) };
    let s = v.to_string_lossy();
    if s.trim().is_empty() {
        return Ok(None);
    }
    let Some(isa) = Isa::parse(&s) else {
        return Err(format!("{ENV}={s}: not a level (scalar, avx2 or avx512)"));
    };
    if isa > detected() {
        return Err(format!("{ENV}={s}: this CPU supports at most {}", detected()));
    }
    Ok(Some(isa))
}

/// The level every CPU kernel of this process runs at: the detected one, or the lower one
/// `ORWCFM_CPU_ISA` asks for. A request the CPU cannot honour is reported once on stderr and
/// the detected level is used (the CLI refuses it up front through [`requested`]).
pub fn level() -> Isa {
    static LEVEL: OnceLock<Isa> = OnceLock::new();
    *LEVEL.get_or_init(|| match requested() {
        Ok(r) => r.unwrap_or_else(detected),
        Err(e) => {
            eprintln!("warning: {e}; using {}", detected());
            detected()
        }
    })
}

/// Run one of three compiled bodies of a kernel by [`level`]: `$f512` and `$f2` are `unsafe`
/// functions compiled with `#[target_feature]` for AVX-512 and AVX2+FMA, `$base` a safe one.
#[macro_export]
#[doc(hidden)]
macro_rules! __isa_select {
    ($f512:expr, $f2:expr, $base:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            match $crate::backend::cpu::isa::level() {
                // SAFETY: `level()` is never above what the CPU supports.
                $crate::backend::cpu::isa::Isa::Avx512 => unsafe { $f512 },
                $crate::backend::cpu::isa::Isa::Avx2 => unsafe { $f2 },
                $crate::backend::cpu::isa::Isa::Scalar => $base,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $base
        }
    }};
}

/// Define `pub fn $name(args)` whose body is compiled three times (AVX-512, AVX2+FMA, baseline)
/// and picked by [`level`] at each call. The body must be safe code that LLVM can vectorise.
#[macro_export]
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident $(<$($lt:lifetime),*>)? ( $($arg:ident : $ty:ty),* $(,)? ) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name $(<$($lt),*>)? ($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body $(<$($lt),*>)? ($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn v4 $(<$($lt),*>)? ($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn v3 $(<$($lt),*>)? ($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
            $crate::__isa_select!(v4($($arg),*), v3($($arg),*), body($($arg),*))
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn levels_parse_and_order() {
        assert_eq!(Isa::parse("AVX2"), Some(Isa::Avx2));
        assert_eq!(Isa::parse("avx512"), Some(Isa::Avx512));
        assert_eq!(Isa::parse("scalar"), Some(Isa::Scalar));
        assert_eq!(Isa::parse("sse9"), None);
        assert!(Isa::Scalar < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
        assert!(level() <= detected());
        assert!(Isa::Scalar.supported());
    }
}
