//! Checks against `testdata/reference/randn.json` (written by `tools/reference/make_randn.py`
//! with real torch). Stored values must match **exactly** (bit patterns, every dtype); the float64
//! sum over all values, which covers the elements that are not stored, must agree to 1e-9
//! relative (torch sums in a different order).

use super::*;
use serde_json::Value;

const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/reference/randn.json");

fn reference() -> Value {
    let text = std::fs::read_to_string(REFERENCE)
        .unwrap_or_else(|e| panic!("{REFERENCE}: {e} (run tools/reference/make_randn.py)"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{REFERENCE}: {e}"))
}

fn dtype(name: &str) -> NoiseDType {
    match name {
        "float32" => NoiseDType::F32,
        "float16" => NoiseDType::F16,
        "bfloat16" => NoiseDType::BF16,
        "float64" => NoiseDType::F64,
        other => panic!("{REFERENCE}: unknown dtype {other}"),
    }
}

/// Bit patterns of one draw in its native dtype, as the reference stores them.
fn draw_bits(g: &mut TorchGenerator, numel: usize, dt: NoiseDType) -> (Vec<u64>, f64) {
    let (bits, values): (Vec<u64>, Vec<f64>) = match dt {
        NoiseDType::F64 => g.randn_f64(numel).into_iter().map(|v| (v.to_bits(), v)).unzip(),
        _ => g
            .randn(numel, dt)
            .into_iter()
            .map(|v| {
                let bits = match dt {
                    NoiseDType::F16 => half::f16::from_f32(v).to_bits() as u64,
                    NoiseDType::BF16 => half::bf16::from_f32(v).to_bits() as u64,
                    _ => v.to_bits() as u64,
                };
                (bits, v as f64)
            })
            .unzip(),
    };
    (bits, values.iter().sum())
}

fn hex_list(v: &Value) -> Vec<u64> {
    v.as_array()
        .expect("hex list")
        .iter()
        .map(|s| u64::from_str_radix(s.as_str().expect("hex string"), 16).expect("hex"))
        .collect()
}

/// Compares one draw with its reference entry; returns a description of the first mismatch.
fn check(entry: &Value, got: &[u64], sum: f64, what: &str) -> Result<(), String> {
    let n = got.len();
    let (head, tail) = match entry.get("values") {
        Some(all) => (hex_list(all), vec![]),
        None => (hex_list(&entry["head"]), hex_list(&entry["tail"])),
    };
    let tail_at = n - tail.len();
    let pairs = head.iter().enumerate().chain(tail.iter().enumerate().map(|(i, b)| (tail_at + i, b)));
    for (i, &want) in pairs {
        if got[i] != want {
            return Err(format!("{what}: element {i} is {:#x}, torch gives {want:#x}", got[i]));
        }
    }
    let want_sum = entry["sum"].as_f64().expect("sum");
    if (sum - want_sum).abs() > 1e-9 * want_sum.abs().max(1.0) {
        return Err(format!("{what}: sum {sum}, torch gives {want_sum}"));
    }
    Ok(())
}

fn check_cases(section: &Value, math: BoxMullerMath) -> usize {
    let mut failures = vec![];
    let cases = section["cases"].as_array().expect("cases");
    for case in cases {
        let seed = case["seed"].as_u64().expect("seed");
        let numel = case["numel"].as_u64().expect("numel") as usize;
        let dt = dtype(case["dtype"].as_str().expect("dtype"));
        let (bits, sum) = draw_bits(&mut TorchGenerator::with_math(seed, math), numel, dt);
        let what = format!("{math:?} seed {seed} numel {numel} {dt:?}");
        if let Err(e) = check(case, &bits, sum, &what) {
            failures.push(e);
        }
    }
    for seq in section["sequences"].as_array().expect("sequences") {
        let seed = seq["seed"].as_u64().expect("seed");
        let mut g = TorchGenerator::with_math(seed, math);
        for (k, draw) in seq["draws"].as_array().expect("draws").iter().enumerate() {
            let numel = draw["numel"].as_u64().expect("numel") as usize;
            let dt = dtype(draw["dtype"].as_str().expect("dtype"));
            let (bits, sum) = draw_bits(&mut g, numel, dt);
            let what = format!("{math:?} sequence seed {seed} draw {k} ({numel} x {dt:?})");
            if let Err(e) = check(draw, &bits, sum, &what) {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
    cases.len()
}

#[test]
fn matches_torch_on_avx2() {
    let r = reference();
    assert_eq!(r["avx2"]["capability"], "AVX2");
    assert_eq!(check_cases(&r["avx2"], BoxMullerMath::Avx2), 240);
}

#[test]
fn matches_torch_default_capability_with_libm() {
    let r = reference();
    assert_eq!(r["scalar"]["capability"], "DEFAULT");
    assert!(check_cases(&r["scalar"], BoxMullerMath::Libm) > 0);
}

#[test]
fn f64_noise_as_f32_is_the_rounded_doubles() {
    for numel in [3, 40] {
        let wide = TorchGenerator::new(7).randn_f64(numel);
        let narrow = TorchGenerator::new(7).randn(numel, NoiseDType::F64);
        assert_eq!(narrow, wide.iter().map(|&v| v as f32).collect::<Vec<_>>());
    }
}

#[test]
fn only_low_32_seed_bits_matter_but_seed_is_kept() {
    let mut a = TorchGenerator::new((1 << 32) + 7);
    let mut b = TorchGenerator::new(7);
    assert_eq!(a.seed(), (1 << 32) + 7);
    assert_eq!(a.randn(100, NoiseDType::F32), b.randn(100, NoiseDType::F32));
}

#[test]
fn cached_normal_survives_a_vector_fill() {
    // A scalar draw returns `r cos θ` and caches `r sin θ`; normal_fill neither uses nor drops it,
    // so the next scalar draw, after a vector fill, is still the second half of the same pair.
    let pair = TorchGenerator::new(3).randn_f64(2);
    let mut g = TorchGenerator::new(3);
    assert_eq!(g.randn(1, NoiseDType::F64)[0], pair[0] as f32);
    let _ = g.randn(32, NoiseDType::F32);
    assert!(g.next_double_normal.is_some());
    assert_eq!(g.randn(1, NoiseDType::F64)[0], pair[1] as f32);
    assert!(g.next_double_normal.is_none());
}

#[test]
fn mt19937_matches_reference_stream() {
    // The 10000th output of std::mt19937 seeded with 5489 is 4123659995 (C++11 [rand.predef]).
    let mut mt = Mt19937::new(5489);
    let v = (0..10_000).map(|_| mt.next_u32()).last();
    assert_eq!(v, Some(4_123_659_995));
}
