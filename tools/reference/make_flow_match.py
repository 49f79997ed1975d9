"""Reference values for sdgen's flow-matching Euler scheduler (`schedulers/flow_match.rs`), from
diffusers' FlowMatchEulerDiscreteScheduler.

For each config below (SD 3.5's own, verbatim; other shifts; the options SD 3.5 leaves off:
shift_terminal, invert_sigmas, Karras and exponential sigmas; dynamic shifting with the
exponential and the linear time shift, given `mu` from SD 3's `calculate_shift` for a 1024² and a
512² image) and each step count, `set_timesteps(n[, mu=...])` is recorded (`timesteps`, `sigmas`).
Then, in float32, float16 and bfloat16:

- `step`: from a begin index (0, and 4 as an img2img run starts), three `step` calls with fixed
  model outputs, the sample fed back as the pipeline does;
- `scale_noise` (three of the configs): `scale_noise(x0, timesteps[i:i+1], noise)` after `set_begin_index(i)` (SD 3's
  img2img `prepare_latents`).

Writes testdata/reference/flow_match.safetensors: `x`, `x0`, `noise` ([1, 16, 4, 4] f32),
`v.{k}` (the k-th model output), `{cfg}.{n}.timesteps` / `.sigmas` (f32),
`{cfg}.step.{begin}.{dtype}` (after three steps of 10, as f32),
`{cfg}.scale_noise.{n}.{i}.{dtype}` (as f32). Its metadata key `reference` holds (JSON) the
configs, the step counts, each config's `mu` and SD 3 img2img's `t_start` for some (steps, strength) pairs
(`get_timesteps`).

  python tools/reference/make_flow_match.py
"""
import json
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
SD35 = json.loads((ROOT / "testdata/scheduler-configs/sd35.json").read_text())
DYNAMIC = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "use_dynamic_shifting": True,
           "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
CONFIGS = {
    "sd35": SD35,
    "shift1": dict(SD35, shift=1.0),
    "shift6": dict(SD35, shift=6.0),
    "terminal": dict(SD35, shift_terminal=0.02),
    "invert": dict(SD35, invert_sigmas=True),
    "karras": dict(SD35, use_karras_sigmas=True),
    "exponential": dict(SD35, use_exponential_sigmas=True),
    "dynamic_exp_1024": DYNAMIC,
    "dynamic_exp_512": DYNAMIC,
    "dynamic_lin_1024": dict(DYNAMIC, time_shift_type="linear"),
}
# SD 3's latents: 1024² → 128² latents → 64² patches of 2; 512² → 32².
IMAGE_SEQ_LEN = {"dynamic_exp_1024": 4096, "dynamic_exp_512": 1024, "dynamic_lin_1024": 4096}
# scale_noise only reads the sigmas (checked for every config): three configs are enough.
SCALE_NOISE_CONFIGS = ["sd35", "invert", "dynamic_exp_1024"]
STEP_COUNTS = [1, 2, 4, 10, 28, 50]
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
IMG2IMG = [(28, 0.6), (10, 0.75), (10, 1.0), (7, 0.3), (50, 0.95), (4, 0.5), (3, 0.33)]


def mu_of(name: str, cfg: dict) -> float | None:
    if name not in IMAGE_SEQ_LEN:
        return None
    # As SD 3's pipeline calls it, from the scheduler's (defaulted) config.
    s = FlowMatchEulerDiscreteScheduler.from_config(cfg).config
    return calculate_shift(IMAGE_SEQ_LEN[name], s.base_image_seq_len, s.max_image_seq_len, s.base_shift, s.max_shift)


def scheduler(cfg: dict, n: int, mu: float | None) -> FlowMatchEulerDiscreteScheduler:
    s = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    if mu is None:
        s.set_timesteps(n)
    else:
        s.set_timesteps(n, mu=mu)
    return s


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    shape = (1, 16, 4, 4)
    x = torch.randn(shape, generator=gen)
    x0 = torch.randn(shape, generator=gen) * 0.8
    noise = torch.randn(shape, generator=gen)
    vs = [torch.randn(shape, generator=gen) for _ in range(3)]
    tensors = {"x": x, "x0": x0, "noise": noise, **{f"v.{k}": v for k, v in enumerate(vs)}}
    mus = {}
    for name, cfg in CONFIGS.items():
        mu = mu_of(name, cfg)
        mus[name] = mu
        for n in STEP_COUNTS:
            if name == "terminal" and n == 1:
                import warnings
                warnings.filterwarnings("ignore", "invalid value encountered in divide")
            s = scheduler(cfg, n, mu)
            if s.sigmas.isnan().any():
                # shift_terminal with one step divides by 1 − sigma = 0: sdgen refuses that.
                assert name == "terminal" and n == 1, (name, n)
                continue
            tensors[f"{name}.{n}.timesteps"] = s.timesteps.to(torch.float32).contiguous()
            tensors[f"{name}.{n}.sigmas"] = s.sigmas.to(torch.float32).contiguous()
            count = len(s.timesteps)
            if name not in SCALE_NOISE_CONFIGS:
                continue
            for i in sorted({0, 1, count // 2, count - 1}):
                for dname, dtype in DTYPES.items():
                    s = scheduler(cfg, n, mu)
                    s.set_begin_index(i)
                    out = s.scale_noise(x0.to(dtype), s.timesteps[i:i + 1], noise.to(dtype))
                    assert out.dtype == dtype
                    tensors[f"{name}.scale_noise.{n}.{i}.{dname}"] = out.float().contiguous()
        for begin in (0, 4):
            for dname, dtype in DTYPES.items():
                s = scheduler(cfg, 10, mu)
                s.set_begin_index(begin)
                sample = x.to(dtype)
                for k, v in enumerate(vs):
                    sample = s.step(v.to(dtype), s.timesteps[begin + k], sample).prev_sample
                    assert sample.dtype == dtype
                tensors[f"{name}.step.{begin}.{dname}"] = sample.float().contiguous()

    t_start = []
    for steps, strength in IMG2IMG:
        # StableDiffusion3Img2ImgPipeline.get_timesteps
        init_timestep = min(steps * strength, steps)
        t_start.append([steps, strength, int(max(steps - init_timestep, 0))])
    # One metadata key: safetensors writes several in hash order, which changes the file per run.
    meta = {"configs": CONFIGS, "step_counts": STEP_COUNTS, "mu": mus, "img2img_t_start": t_start}
    save_file(tensors, ROOT / "testdata/reference/flow_match.safetensors", metadata={"reference": json.dumps(meta)})
    print("mu", mus, "t_start", t_start)


if __name__ == "__main__":
    main()
