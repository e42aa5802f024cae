//! f32 `exp` and `erf` that vectorise, and [`widest_fn!`](crate::widest_fn), which
//! compiles a loop for the widest vector unit the CPU has, for the CPU kernels'
//! element-wise passes.
//!
//! `f32::exp` and `libm::erff` are calls the compiler cannot vectorise: GELU's erf was
//! about a tenth of the ViT's training step (perf, 2 threads). Here `exp` is Cephes'
//! `expf` (a degree-6 polynomial after reducing by ln 2; within 2 ulp of the correctly
//! rounded value, tested) and `erf` is the approximation PyTorch's vectorised CPU erf
//! uses (Abramowitz and Stegun 7.1.26: absolute error under 1.5e-7 in exact arithmetic, 5e-7
//! in f32, tested; an absolute bound, as GELU needs, not a relative one near 0), both branch
//! free so a loop over them becomes vector code.
//!
//! Rust never contracts a multiply and an add into a fused multiply-add, and every
//! operation here is an IEEE operation element by element, so the 16-lane, 8-lane and
//! scalar code give the same bits: results do not depend on the machine's vector unit
//! (tested).

/// e^x for f32; NaN stays NaN, and x is clamped to [-87, 88] (e^-87 is 1.6e-38, a
/// normal float; GELU and softmax only take exp of values at most 0).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, so n * LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer (ties to even)
    // without a call to `roundf`.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = (((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 5.000_000_1e-1) * (r * r) + r + 1.0;
    // `shifted` is 1.5 * 2^23 + n, whose bits are 0x4B40_0000 + n: n as an integer
    // without a float-to-int cast (`as i32` saturates, and the compiler scalarises it).
    // n is in [-126, 127] after the clamp, so 2^n is a normal float.
    let n_bits = shifted.to_bits().wrapping_sub(0x4B40_0000);
    p * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// erf(x) for f32 (Abramowitz and Stegun 7.1.26), odd, saturating to +-1.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_8;
    const A4: f32 = -1.453_152;
    const A5: f32 = 1.061_405_4;
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = ((((A5 * t + A4) * t + A3) * t + A2) * t + A1) * t;
    (1.0 - poly * exp(-(a * a))).copysign(x)
}

/// `widest_fn! { pub fn name(args) { body } }` defines `name`, which runs `body`
/// compiled for AVX-512 or AVX2 when the CPU has them (checked at run time), else as it
/// is. The body is inlined into each variant, with everything it calls that is
/// `#[inline(always)]` (`exp`, `erf`), so its loops become vector code of that width. (A
/// closure passed to a `#[target_feature]` function is not reliably inlined: GELU's
/// backward stayed scalar that way.)
#[macro_export]
macro_rules! widest_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $crate::widest_fn! { $(#[$meta])* $vis fn $name($($arg: $ty),*) -> () $body }
    };
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn body($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2 (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> Vec<f32> {
        // Dense around 0, out to the clamps and beyond, with both signs.
        let mut v: Vec<f32> = (-20000..=20000).map(|i| i as f32 * 1e-3).collect();
        v.extend((-1000..=1000).map(|i| i as f32 * 0.1));
        v.extend([f32::MIN_POSITIVE, -f32::MIN_POSITIVE, 1e-30, -1e-30, 87.5, -87.5, 88.0, -88.0, 1e30, -1e30]);
        v
    }

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_2_ulp_of_libm_where_it_does_not_clamp() {
        for x in grid().into_iter().filter(|x| (-87.0..=88.0).contains(x)) {
            let (got, want) = (exp(x), x.exp());
            assert!(ulps(got, want) <= 2, "exp({x}) = {got}, libm {want}");
        }
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(-1e30), exp(-87.0));
        assert!(exp(f32::NEG_INFINITY) > 0.0 && exp(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn erf_is_within_5e_7_of_libm_and_odd() {
        for x in grid() {
            let (got, want) = (erf(x), libm::erff(x));
            assert!((got - want).abs() < 5e-7, "erf({x}) = {got}, libm {want}");
            assert_eq!(erf(-x), -got);
        }
        assert_eq!(erf(f32::INFINITY), 1.0);
        assert_eq!(erf(f32::NEG_INFINITY), -1.0);
        assert!(erf(f32::NAN).is_nan());
    }

    crate::widest_fn! {
        fn wide(xs: &[f32], out: &mut [u32]) {
            for (o, &x) in out.iter_mut().zip(xs) {
                *o = (erf(x) + exp(-x.abs())).to_bits();
            }
        }
    }

    /// The vector code and the scalar code give the same bits.
    #[test]
    fn the_widest_code_gives_the_scalar_bits() {
        let xs = grid();
        let plain: Vec<u32> = xs.iter().map(|&x| (erf(x) + exp(-x.abs())).to_bits()).collect();
        let mut out = vec![0u32; xs.len()];
        wide(&xs, &mut out);
        assert_eq!(plain, out);
    }
}
