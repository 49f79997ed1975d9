//! A model folder at a family's real size with seeded random weights: the family's bundled
//! configs and tokenizer, and each component's tensors exactly as its model code asks for them
//! (names, shapes), drawn per the layers' own init hints and stored in the run dtype. Speed and
//! memory do not depend on the weight values, so this benchmarks real sizes with no download.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use sdgen_models::clip::{ClipTextConfig, ClipTextModel};
use sdgen_models::unet::{UNet2DConditionModel, UNetConfig};
use sdgen_models::vae::{AutoencoderKL, VaeConfig};

/// Hands out a fresh random tensor for every name the model asks for, and remembers it.
struct RandomBackend {
    tensors: Mutex<HashMap<String, Tensor>>,
}

impl SimpleBackend for RandomBackend {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = match h {
            Init::Const(v) => (Tensor::ones(s, DType::F32, dev)? * v)?,
            Init::Randn { mean, stdev } => Tensor::randn(mean as f32, stdev as f32, s, dev)?,
            Init::Uniform { lo, up } => Tensor::rand(lo as f32, up as f32, s, dev)?,
            Init::Kaiming { .. } => {
                // Kaiming-normal with gain 1 over the fan-in, as the layers' default init.
                let dims = s.dims();
                let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
                Tensor::randn(0f32, (1.0 / fan_in as f64).sqrt() as f32, s, dev)?
            }
        }
        .to_dtype(dtype)?;
        self.tensors.lock().expect("not poisoned").insert(name.to_string(), t.clone());
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

fn save(backend: RandomBackend, path: &Path) -> anyhow::Result<u64> {
    let tensors = backend.tensors.into_inner().expect("not poisoned");
    let tensors: HashMap<String, Tensor> =
        tensors.into_iter().map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?))).collect::<candle_core::Result<_>>()?;
    let bytes = tensors.values().map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64).sum();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    candle_core::safetensors::save(&tensors, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(bytes)
}

fn backend() -> RandomBackend {
    RandomBackend { tensors: Mutex::new(HashMap::new()) }
}

/// Writes SD 1.5 at its real size into `dir` (skipped when `dir` already holds it). Returns the
/// bytes of weights written.
pub fn write_sd15(dir: &Path, dtype: DType, device: &Device, seed: u64) -> anyhow::Result<u64> {
    if dir.join("unet/diffusion_pytorch_model.safetensors").is_file() {
        return Ok(0);
    }
    for (name, bytes) in sdgen::loading::single_file::defaults::SD15 {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().expect("a component folder"))?;
        std::fs::write(&path, bytes)?;
    }
    // CUDA seeds its generator; candle cannot seed the CPU one (the CPU weights vary run to run,
    // which does not change a benchmark).
    let _ = device.set_seed(seed);
    let read = |c: &str| -> anyhow::Result<String> { Ok(std::fs::read_to_string(dir.join(c).join("config.json"))?) };
    let mut total = 0;

    let b = backend();
    let cfg: ClipTextConfig = serde_json::from_str(&read("text_encoder")?)?;
    {
        let vb = VarBuilder::from_backend(Box::new(RefBackend(&b)), dtype, device.clone());
        drop(ClipTextModel::new(&cfg, false, vb.pp("text_model"))?);
    }
    total += save(b, &dir.join("text_encoder/model.safetensors"))?;

    let b = backend();
    let cfg: UNetConfig = serde_json::from_str(&read("unet")?)?;
    {
        let vb = VarBuilder::from_backend(Box::new(RefBackend(&b)), dtype, device.clone());
        drop(UNet2DConditionModel::new(&cfg, vb)?);
    }
    total += save(b, &dir.join("unet/diffusion_pytorch_model.safetensors"))?;

    let b = backend();
    let cfg: VaeConfig = serde_json::from_str(&read("vae")?)?;
    {
        let vb = VarBuilder::from_backend(Box::new(RefBackend(&b)), dtype, device.clone());
        drop(AutoencoderKL::new(&cfg, true, true, vb)?);
    }
    total += save(b, &dir.join("vae/diffusion_pytorch_model.safetensors"))?;
    Ok(total)
}

/// A borrowed backend, so the tensors can be taken back after the model is built.
struct RefBackend<'a>(&'a RandomBackend);

impl SimpleBackend for RefBackend<'_> {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}
