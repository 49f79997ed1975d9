//! One torch CPU generator per image of a batch, drawn from as diffusers' `randn_tensor` draws
//! from `generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]`.
//!
//! The pipeline draws the initial latents from these generators and then hands the same
//! generators to the scheduler, whose ancestral steps draw their per-step noise from them (see
//! `diffusers/utils/torch_utils.py::randn_tensor`): with a list of generators, image `i`'s part
//! of a `[n, ...]` tensor is `torch.randn([1, ...], generator=generator[i])`, drawn on the CPU in
//! the requested dtype, and the parts are concatenated. So image `i` only ever sees generator
//! `i`: the same seed gives the same image whatever the batch size, and a batch of `n` equals
//! `n` runs of one image.

use candle_core::{DType, Device, Tensor};

use super::{NoiseDType, TorchGenerator, TorchNoise};

/// The per-image generators of one generation, which every random draw of the run consumes in
/// order (initial latents first, then each ancestral step).
///
/// ```
/// use sdgen::rng::batch::BatchNoise;
/// use candle_core::{DType, Device};
/// let mut noise = BatchNoise::for_batch(42, 2);
/// // torch.cat([torch.randn((1, 4, 8, 8), generator=g) for g in generators])
/// let latents = noise.randn(&[2, 4, 8, 8], DType::F32, &Device::Cpu).unwrap();
/// assert_eq!(latents.dims(), &[2, 4, 8, 8]);
/// ```
#[derive(Debug, Clone)]
pub struct BatchNoise {
    generators: Vec<TorchGenerator>,
}

impl BatchNoise {
    /// One generator per seed, image `i` drawing from `seeds[i]`.
    pub fn new(seeds: &[u64]) -> Self {
        Self { generators: seeds.iter().map(|&s| TorchGenerator::new(s)).collect() }
    }

    /// `n` generators seeded `first_seed`, `first_seed + 1`, ... (wrapping at `u64::MAX`).
    pub fn for_batch(first_seed: u64, n: usize) -> Self {
        let seeds: Vec<u64> = (0..n as u64).map(|i| first_seed.wrapping_add(i)).collect();
        Self::new(&seeds)
    }

    /// Like [`BatchNoise::new`], drawing as torch release `noise` does (float16/bfloat16 noise
    /// differs between releases; see [`TorchNoise`], e.g. from [`TorchNoise::from_env`]).
    pub fn with_noise(seeds: &[u64], noise: TorchNoise) -> Self {
        let math = super::BoxMullerMath::default();
        Self { generators: seeds.iter().map(|&s| TorchGenerator::with_options(s, math, noise)).collect() }
    }

    /// Like [`BatchNoise::for_batch`], drawing as torch release `noise` does.
    pub fn for_batch_with_noise(first_seed: u64, n: usize, noise: TorchNoise) -> Self {
        let seeds: Vec<u64> = (0..n as u64).map(|i| first_seed.wrapping_add(i)).collect();
        Self::with_noise(&seeds, noise)
    }

    /// Wraps existing generators (e.g. ones with a non-default [`super::BoxMullerMath`]).
    pub fn from_generators(generators: Vec<TorchGenerator>) -> Self {
        Self { generators }
    }

    /// The number of generators (images).
    pub fn len(&self) -> usize {
        self.generators.len()
    }

    /// Whether there are no generators at all.
    pub fn is_empty(&self) -> bool {
        self.generators.is_empty()
    }

    /// The generators' seeds, in image order.
    pub fn seeds(&self) -> Vec<u64> {
        self.generators.iter().map(|g| g.seed()).collect()
    }

    /// `randn_tensor(shape, generator=generators, dtype=dtype)` moved to `device`: a `[n, ...]`
    /// tensor whose image `i` is generator `i`'s next `numel / n` normal values, drawn on the CPU
    /// in `dtype` (which changes the values, not just their rounding; see the module docs of
    /// [`crate::rng`]).
    ///
    /// As in diffusers, a single generator draws the whole tensor at once (a list of one
    /// generator is treated as that generator), whatever `shape[0]` is. Errors if `shape` is
    /// empty, its first dimension is not the number of generators (with more than one), or
    /// `dtype` is not a float type.
    pub fn randn(&mut self, shape: &[usize], dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let noise_dtype = match dtype {
            DType::F32 => NoiseDType::F32,
            DType::F16 => NoiseDType::F16,
            DType::BF16 => NoiseDType::BF16,
            DType::F64 => NoiseDType::F64,
            other => {
                return Err(candle_core::Error::Msg(format!("random noise: dtype {other:?} is not a float type")));
            }
        };
        let Some(&batch) = shape.first() else {
            return Err(candle_core::Error::Msg("random noise: the shape has no batch dimension".into()));
        };
        let n = self.generators.len();
        let parts = match n {
            0 => return Err(candle_core::Error::Msg("random noise: there are no generators to draw from".into())),
            1 => 1,
            _ if batch == n => n,
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "random noise: a batch of {batch} needs {batch} generators, but there are {n} (seeds {:?})",
                    self.seeds()
                )))
            }
        };
        let numel_per_part: usize = shape.iter().product::<usize>() / parts;
        let part_shape: Vec<usize> =
            if parts == 1 { shape.to_vec() } else { std::iter::once(1).chain(shape[1..].iter().copied()).collect() };
        let tensors = self.generators[..parts]
            .iter_mut()
            .map(|g| match noise_dtype {
                NoiseDType::F64 => Tensor::from_vec(g.randn_f64(numel_per_part), part_shape.as_slice(), &Device::Cpu),
                // float16/bfloat16 values are exact in f32, so converting loses nothing.
                _ => Tensor::from_vec(g.randn(numel_per_part, noise_dtype), part_shape.as_slice(), &Device::Cpu)?
                    .to_dtype(dtype),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let noise =
            if tensors.len() == 1 { tensors.into_iter().next().expect("one part") } else { Tensor::cat(&tensors, 0)? };
        noise.to_device(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn image_i_comes_from_generator_i() {
        let mut batch = BatchNoise::for_batch(7, 2);
        assert_eq!(batch.seeds(), vec![7, 8]);
        let first = batch.randn(&[2, 4, 3, 3], DType::F32, &Device::Cpu).unwrap();
        let second = batch.randn(&[2, 4, 3, 3], DType::F32, &Device::Cpu).unwrap();
        for (i, seed) in [7u64, 8].into_iter().enumerate() {
            let mut g = TorchGenerator::new(seed);
            assert_eq!(values(&first.get(i).unwrap()), g.randn(36, NoiseDType::F32), "image {i}, draw 1");
            assert_eq!(values(&second.get(i).unwrap()), g.randn(36, NoiseDType::F32), "image {i}, draw 2");
        }
    }

    #[test]
    fn dtypes_change_the_draw_not_just_the_rounding() {
        for (dtype, noise_dtype) in [(DType::F16, NoiseDType::F16), (DType::BF16, NoiseDType::BF16)] {
            let t = BatchNoise::new(&[3]).randn(&[1, 40], dtype, &Device::Cpu).unwrap();
            assert_eq!(t.dtype(), dtype);
            assert_eq!(values(&t), TorchGenerator::new(3).randn(40, noise_dtype));
        }
        let t = BatchNoise::new(&[3]).randn(&[1, 40], DType::F64, &Device::Cpu).unwrap();
        let got: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got, TorchGenerator::new(3).randn_f64(40));
    }

    #[test]
    fn one_generator_draws_the_whole_batch() {
        let t = BatchNoise::new(&[5]).randn(&[2, 20], DType::F32, &Device::Cpu).unwrap();
        assert_eq!(values(&t), TorchGenerator::new(5).randn(40, NoiseDType::F32));
    }

    #[test]
    fn mismatches_are_errors() {
        let mut two = BatchNoise::new(&[1, 2]);
        let err = two.randn(&[3, 4], DType::F32, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("batch of 3") && err.contains("[1, 2]"), "{err}");
        assert!(two.randn(&[], DType::F32, &Device::Cpu).is_err());
        assert!(two.randn(&[2, 4], DType::U8, &Device::Cpu).is_err());
        assert!(BatchNoise::new(&[]).randn(&[1, 4], DType::F32, &Device::Cpu).is_err());
    }
}
