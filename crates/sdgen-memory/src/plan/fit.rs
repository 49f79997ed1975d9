//! Fitting a stage's activation coefficients to measured peaks.
//!
//! The formula is linear in its coefficients once it is known which moment (feature maps or
//! attention, see [`super::ActivationModel`]) gives each measurement's peak. So the fit
//! alternates: assign each measurement to the moment the current coefficients say peaks, solve
//! non-negative least squares for that assignment, repeat until the assignment holds still.
//! Five unknowns at most: every subset of free terms is solved exactly and the best
//! non-negative solution kept (what an active-set NNLS converges to, without its iterations).
//!
//! Errors are relative (a 100 MB miss weighs as much at 1 GB as 10 MB at 100 MB), and relative
//! to the stage's whole peak when the measurement says what weights were resident.

use serde::{Deserialize, Serialize};

use super::activation::{ActivationInputs, ActivationModel, Coefficients, Features, TERMS};

/// One measured activation peak (bytes above the memory in use before the forward), as the
/// benchmark binary records them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// What ran.
    pub inputs: ActivationInputs,
    /// Measured peak activation bytes.
    pub activation_bytes: u64,
    /// Weights resident meanwhile. Fits weigh errors relative to the stage's whole peak
    /// (weights + activations), which is what the budget is compared with: 50 MB missed on a
    /// 3.5 GB stage matters as little as it does. 0 = relative to the activations alone.
    #[serde(default)]
    pub weight_bytes: u64,
}

impl Measurement {
    /// A measurement of `activation_bytes` for `inputs`, weighed against the activations alone.
    pub fn new(inputs: ActivationInputs, activation_bytes: u64) -> Self {
        Self { inputs, activation_bytes, weight_bytes: 0 }
    }

    fn weight(&self) -> f64 {
        ((self.activation_bytes + self.weight_bytes) as f64).max(1.0)
    }
}

/// A coefficient of the formula, for holding it at its starting value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Term {
    /// `bytes_per_pixel`.
    Pixel,
    /// `bytes_per_pixel_at_attention`.
    PixelAtAttention,
    /// `bytes_per_score`.
    Score,
    /// `bytes_per_output_pixel`.
    OutputPixel,
    /// `fixed_bytes`.
    Fixed,
    /// `bytes_per_column_element`.
    Column,
}

impl Term {
    fn index(self) -> usize {
        self as usize
    }
}

/// Why coefficients could not be fitted.
#[derive(Debug, Clone, PartialEq)]
pub enum FitError {
    /// No measurements, or only zero ones.
    NoMeasurements,
    /// No non-negative combination of the formula's terms explains the measurements.
    NoSolution,
}

impl std::fmt::Display for FitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FitError::NoMeasurements => f.write_str("no non-zero measurements to fit activation coefficients to"),
            FitError::NoSolution => {
                f.write_str("no non-negative activation coefficients fit the measurements (check their inputs)")
            }
        }
    }
}

impl std::error::Error for FitError {}

/// Fits `model`'s coefficients to `measurements`, starting from `start` (the architecture's
/// estimate: it decides which moment peaks in each measurement at first) and keeping the
/// `held` terms at their starting values.
///
/// Hold what the measurements cannot show: the feature-map term when attention peaks in every
/// measurement (unsliced UNet runs) although the planner will also choose sliced runs where it
/// does not, or the attention terms of a VAE measured only at sizes where its convolutions
/// peak. A free term no measurement exercises comes out 0.
pub fn fit_coefficients(
    model: &ActivationModel,
    measurements: &[Measurement],
    start: &Coefficients,
    held: &[Term],
) -> Result<Coefficients, FitError> {
    let rows: Vec<(Features, f64, f64)> = measurements
        .iter()
        .filter(|m| m.activation_bytes > 0)
        .map(|m| (model.features(&m.inputs), m.activation_bytes as f64, m.weight()))
        .collect();
    if rows.is_empty() {
        return Err(FitError::NoMeasurements);
    }
    let held: Vec<usize> = held.iter().map(|t| t.index()).collect();
    let mut coef = *start;
    let mut assignment: Vec<bool> = rows.iter().map(|(f, _, _)| coef.attention_dominates(f)).collect();
    for _ in 0..16 {
        coef = solve(&rows, &assignment, start, &held)?;
        let next: Vec<bool> = rows
            .iter()
            .zip(&assignment)
            .map(|((f, _, _), &was)| {
                // Keep ties where they were, so the loop cannot flip between equal solutions.
                let maps = coef.bytes_per_pixel * f.pixel;
                let att = coef.bytes_per_pixel_at_attention * f.pixel + coef.bytes_per_score * f.score;
                if (att - maps).abs() <= 1e-9 * att.abs().max(maps.abs()) {
                    was
                } else {
                    att > maps
                }
            })
            .collect();
        if next == assignment {
            break;
        }
        assignment = next;
    }
    Ok(coef)
}

/// The best non-negative least-squares solution for one assignment of measurements to moments.
fn solve(
    rows: &[(Features, f64, f64)],
    attention: &[bool],
    start: &Coefficients,
    held: &[usize],
) -> Result<Coefficients, FitError> {
    let start = start.to_array();
    // Design rows over [pixel, pixel at attention, score, output pixel, 1, column], each divided
    // by its weight, with held terms moved to the target side.
    let design: Vec<([f64; TERMS], f64)> = rows
        .iter()
        .zip(attention)
        .map(|((f, y, w), &att)| {
            let mut x = if att {
                [0.0, f.pixel, f.score, f.output_pixel, 1.0, f.column]
            } else {
                [f.pixel, 0.0, 0.0, f.output_pixel, 1.0, f.column]
            };
            let mut y = *y;
            for &j in held {
                y -= x[j] * start[j];
                x[j] = 0.0;
            }
            (x.map(|v| v / w), y / w)
        })
        .collect();
    // Scale columns to comparable magnitudes (scores reach 1e10, the constant is 1).
    let mut scale = [0f64; TERMS];
    for (x, _) in &design {
        for j in 0..TERMS {
            scale[j] = scale[j].max(x[j].abs());
        }
    }
    let free: Vec<usize> = (0..TERMS).filter(|&j| scale[j] > 0.0).collect();
    let mut best: Option<(f64, [f64; TERMS])> = None;
    for mask in 1u32..(1 << free.len()) {
        let cols: Vec<usize> = free.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, &j)| j).collect();
        let Some(beta) = least_squares(&design, &cols, &scale) else { continue };
        if beta.iter().any(|&b| b < 0.0) {
            continue;
        }
        let mut coef = [0f64; TERMS];
        for (k, &j) in cols.iter().enumerate() {
            coef[j] = beta[k] / scale[j];
        }
        let residual: f64 = design.iter().map(|(x, y)| (dot(x, &coef) - y).powi(2)).sum();
        // Ties (collinear terms) go to the solution found first: fewer, earlier terms.
        if best.as_ref().is_none_or(|(r, _)| residual < r - 1e-12) {
            best = Some((residual, coef));
        }
    }
    let (_, mut coef) = best.ok_or(FitError::NoSolution)?;
    for &j in held {
        coef[j] = start[j];
    }
    Ok(Coefficients::from_array(coef))
}

/// Fits one factor for all of `start`'s coefficients (least squares on the relative error):
/// for when a few measurements should calibrate a formula derived from the architecture
/// without moving its shape.
pub fn fit_scale(
    model: &ActivationModel,
    start: &Coefficients,
    measurements: &[Measurement],
) -> Result<Coefficients, FitError> {
    let rows: Vec<(f64, f64)> = measurements
        .iter()
        .filter(|m| m.activation_bytes > 0)
        .map(|m| (start.apply(&model.features(&m.inputs)) / m.weight(), m.activation_bytes as f64 / m.weight()))
        .collect();
    if rows.is_empty() {
        return Err(FitError::NoMeasurements);
    }
    // Minimise Σ (k·p − y)² over the weighted predictions p and measurements y: k = Σpy / Σp².
    let (py, pp) = rows.iter().fold((0.0, 0.0), |(a, b), (p, y)| (a + p * y, b + p * p));
    if pp <= 0.0 {
        return Err(FitError::NoSolution);
    }
    Ok(start.scaled(py / pp))
}

/// Error of `coefficients` on each measurement, relative to its weight: `(estimate − measured)
/// / (measured + weights)` (see [`Measurement::weight_bytes`]).
pub fn relative_errors(model: &ActivationModel, coefficients: &Coefficients, measurements: &[Measurement]) -> Vec<f64> {
    measurements
        .iter()
        .map(|m| (coefficients.apply(&model.features(&m.inputs)) - m.activation_bytes as f64) / m.weight())
        .collect()
}

fn dot(a: &[f64; TERMS], b: &[f64; TERMS]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Ordinary least squares on the chosen (scaled) columns, by the normal equations and
/// Gauss-Jordan elimination with partial pivoting; `None` when they are (nearly) singular.
fn least_squares(rows: &[([f64; TERMS], f64)], cols: &[usize], scale: &[f64; TERMS]) -> Option<Vec<f64>> {
    let k = cols.len();
    let mut m = vec![vec![0f64; k + 1]; k];
    for (x, y) in rows {
        let xs: Vec<f64> = cols.iter().map(|&j| x[j] / scale[j]).collect();
        for r in 0..k {
            for c in 0..k {
                m[r][c] += xs[r] * xs[c];
            }
            m[r][k] += xs[r] * y;
        }
    }
    let norm = m.iter().flat_map(|r| r[..k].iter()).fold(0f64, |a, &v| a.max(v.abs()));
    for col in 0..k {
        let pivot = (col..k).max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))?;
        if m[pivot][col].abs() <= 1e-10 * norm.max(f64::MIN_POSITIVE) {
            return None;
        }
        m.swap(col, pivot);
        let pivot_row = m[col].clone();
        for (r, row) in m.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot_row[col];
                for (x, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                    *x -= f * p;
                }
            }
        }
    }
    Some((0..k).map(|r| m[r][k] / m[r][r]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::activation::{AttentionShape, BatchRule, CoefficientTable};

    fn model(heads: usize) -> ActivationModel {
        ActivationModel {
            batch: BatchRule::Images,
            attention: Some(AttentionShape { heads, pixels_per_token: 64, extra_tokens: 0 }),
            coefficients: CoefficientTable::default(),
            fast: Default::default(),
            conv_column_elements_per_pixel: None,
        }
    }

    fn c(px: f64, pxa: f64, score: f64, out: f64, fixed: f64) -> Coefficients {
        Coefficients {
            bytes_per_pixel: px,
            bytes_per_pixel_at_attention: pxa,
            bytes_per_score: score,
            bytes_per_output_pixel: out,
            fixed_bytes: fixed,
            bytes_per_column_element: 0.0,
        }
    }

    /// Measurements of `truth` at sizes and batches, each off by the next `noise` fraction.
    fn synthetic(m: &ActivationModel, truth: &Coefficients, sides: &[usize], noise: &[f64]) -> Vec<Measurement> {
        let mut out = Vec::new();
        for &px in sides {
            for items in [1, 2, 4] {
                let inputs = ActivationInputs::new(px, px, items, 1);
                let exact = truth.apply(&m.features(&inputs));
                let bytes = (exact * (1.0 + noise[out.len() % noise.len()])).round() as u64;
                out.push(Measurement::new(inputs, bytes));
            }
        }
        out
    }

    #[test]
    fn recovers_exact_coefficients_of_both_moments() {
        // A VAE-like stage: feature maps peak at 256², the attention beyond (bounded by the
        // engine's chunking from 1024² with 4 items on).
        let m = model(1);
        let truth = c(5000.0, 300.0, 80.0, 0.0, 2e8);
        let data = synthetic(&m, &truth, &[256, 384, 512, 768, 1024, 1280], &[0.0]);
        // Start from a rough guess; output pixels are not exercised (held at 0).
        let start = c(3000.0, 100.0, 10.0, 0.0, 0.0);
        let fitted = fit_coefficients(&m, &data, &start, &[Term::OutputPixel]).unwrap();
        for (got, want) in fitted.to_array().iter().zip(truth.to_array()) {
            assert!((got - want).abs() <= 1e-6 * want.max(1.0), "{fitted:?}");
        }
    }

    #[test]
    fn tolerates_noise_and_stays_non_negative() {
        let m = model(8);
        let truth = c(450.0, 210.0, 8.0, 0.0, 6.5e7);
        let data = synthetic(&m, &truth, &[256, 384, 512, 640], &[0.03, -0.02, 0.01, -0.03]);
        // Attention peaks in every measurement: the feature-map term is held (and the output
        // pixels, which these runs do not exercise apart from the pixels).
        let start = c(450.0, 100.0, 10.0, 0.0, 0.0);
        let fitted = fit_coefficients(&m, &data, &start, &[Term::Pixel, Term::OutputPixel]).unwrap();
        assert!(fitted.to_array().iter().all(|&v| v >= 0.0), "{fitted:?}");
        assert_eq!(fitted.bytes_per_pixel, 450.0);
        assert!((fitted.bytes_per_score - 8.0).abs() < 0.4, "{fitted:?}");
        let clean = synthetic(&m, &truth, &[256, 384, 512, 640], &[0.0]);
        let errors = relative_errors(&m, &fitted, &clean);
        assert!(errors.iter().all(|e| e.abs() < 0.05), "{errors:?}");
    }

    #[test]
    fn errors_can_be_relative_to_the_whole_stage() {
        let m = model(8);
        let one = Measurement {
            weight_bytes: 9_000_000_000,
            ..Measurement::new(ActivationInputs::new(64, 64, 1, 1), 1_000_000_000)
        };
        assert_eq!(relative_errors(&m, &Coefficients::default(), &[one]), vec![-0.1]);
    }

    #[test]
    fn scale_fit_calibrates_a_derived_formula() {
        let m = model(8);
        let truth = c(600.0, 200.0, 9.0, 0.0, 3e7);
        let fitted = fit_scale(&m, &truth.scaled(0.5), &synthetic(&m, &truth, &[256, 512], &[0.0])).unwrap();
        assert!((fitted.bytes_per_score - 9.0).abs() < 1e-9, "{fitted:?}");
        assert_eq!(fit_scale(&m, &truth, &[]), Err(FitError::NoMeasurements));
        assert_eq!(fit_coefficients(&m, &[], &truth, &[]), Err(FitError::NoMeasurements));
    }
}
