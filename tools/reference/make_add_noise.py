"""Reference values for sdgen's `Scheduler::add_noise` (the img2img start), straight from diffusers.

For each scheduler kind (sdgen's CLI names; "dpm++2m-karras" is DPMSolverMultistepScheduler with
use_karras_sigmas=True), each config below, each step count and each begin index, the scheduler is
set up as StableDiffusionImg2ImgPipeline does (`set_timesteps(n)`, `set_begin_index(i)` where the
class has it) and `add_noise(x, eps, timesteps[i:i+1])` is recorded in float32, float16 and
bfloat16 (x and eps cast to that dtype first; CPU tensors: the coefficients are tensors of the
sample's dtype, which torch multiplies alike on CPU and CUDA).

Writes testdata/reference/add_noise.safetensors: `x`, `eps` ([1, 4, 2, 4] f32) and
`{cfg}.{kind}.{n}.{i}.{dtype}` (the noised sample, as f32); the safetensors metadata "configs"
holds the configs as JSON.

  python tools/reference/make_add_noise.py
"""
import json
from pathlib import Path

import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler)
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
KINDS = {
    "pndm": (PNDMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {}),
    "dpm++2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
}
SD15 = json.loads((ROOT / "testdata/tiny-sd15/scheduler/scheduler_config.json").read_text())
CONFIGS = {
    "sd15": SD15,
    # Zero terminal SNR: DDIM's last alpha product is 0, Euler's first sigma 4096.
    "trailing_zsnr": dict(SD15, timestep_spacing="trailing", rescale_betas_zero_snr=True),
}
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, 4, 2, 4), generator=gen) * 0.9
    eps = torch.randn((1, 4, 2, 4), generator=gen)
    tensors = {"x": x, "eps": eps}
    for cfg_name, cfg in CONFIGS.items():
        for kind, (cls, extra) in KINDS.items():
            for n in (7, 25):
                s = cls.from_config(cfg, **extra)
                s.set_timesteps(n)
                count = len(s.timesteps)
                for i in sorted({0, 1, 2, count // 2, count - 1}):
                    s = cls.from_config(cfg, **extra)
                    s.set_timesteps(n)
                    if hasattr(s, "set_begin_index"):
                        s.set_begin_index(i)
                    t = s.timesteps[i:i + 1]
                    for dname, dtype in DTYPES.items():
                        out = s.add_noise(x.to(dtype), eps.to(dtype), t)
                        tensors[f"{cfg_name}.{kind}.{n}.{i}.{dname}"] = out.float().contiguous()
    out = ROOT / "testdata/reference/add_noise.safetensors"
    save_file(tensors, str(out), metadata={"configs": json.dumps(CONFIGS)})
    print(f"{len(tensors)} tensors -> {out}")


if __name__ == "__main__":
    main()
