#!/usr/bin/env python3
"""Reference values for sdgen's schedulers (PNDM, DDIM, Euler), straight from diffusers.

For every scheduler config below and every scheduler class, built as diffusers does with
`Cls.from_config(cfg)` (fields the class doesn't take are ignored, missing ones take the class's
default), this records:

* `{cfg}.{kind}.timesteps.{n}` (f64) for n in STEP_COUNTS, and for Euler `{cfg}.euler.sigmas.{n}`;
* `{cfg}.{kind}.init_noise_sigma` (f64, shape [1]) after `set_timesteps(RUN_STEPS)`;
* a denoising run of RUN_STEPS steps written out like the pipeline's loop, with a fake model
  `model_output_i = noise * (1 + 0.1 i) - 0.05 * scaled_i`:
  `{cfg}.euler.{dtype}.scaled.{i}` (scale_model_input's output; PNDM's and DDIM's is the identity) and `{cfg}.{kind}.{dtype}.prev.{i}`
  (step's prev_sample), starting from `sample0 * init_noise_sigma`.

Cases diffusers refuses (e.g. PNDM with prediction_type "sample") are listed under "errors" in the
JSON file instead. Output: testdata/reference/schedulers.{safetensors,json} (or --out DIR).

The float16 runs use CUDA when torch sees a GPU, because that is where half precision is used and
torch's CPU and CUDA kernels round differently: on CPU a half tensor times a 0-d float32 tensor
first rounds the scalar to half, on CUDA it multiplies in float32 ("opmath") and rounds once.
sdgen follows the CUDA behaviour; the JSON records which device made the f16 runs
("f16_device"), and the Rust tests loosen their f16 tolerance when it was the CPU.

Run: /opt/refvenv/bin/python tools/reference/make_schedulers.py
(the committed file was made on a GPU machine with a copy of this diffusers on PYTHONPATH)
"""

import argparse

import json
import os

import diffusers
import numpy as np
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler
from safetensors.torch import save_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT_DIR = os.path.join(ROOT, "testdata", "reference")

STEP_COUNTS = [1, 4, 10, 25, 50]
RUN_STEPS = 10
SAMPLE_SHAPE = (1, 4, 4, 4)
CLASSES = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}
# Half-precision runs (on CPU) check the dtype handling: Euler upcasts inside step, PNDM/DDIM don't.
F16_CONFIGS = ["sd15", "sdxl"]

# A small trained_betas list (200 training steps) so that path is covered without a 1000-entry file.
TRAINED_BETAS = [round(1e-4 + (0.03 - 1e-4) * i / 199, 8) for i in range(200)]

CONFIGS = {
    # SD 1.5's scheduler/scheduler_config.json, verbatim.
    "sd15": {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
    },
    # SDXL base 1.0's scheduler/scheduler_config.json, verbatim.
    "sdxl": {
        "_class_name": "EulerDiscreteScheduler",
        "_diffusers_version": "0.19.0.dev0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
        "use_karras_sigmas": False,
    },
    # SD 2.x-style v-prediction with "Common Diffusion Noise Schedules" fixes (trailing, zero SNR).
    "vpred_trailing": {
        "_class_name": "DDIMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": True,
        "trained_betas": None,
    },
    # PNDM's Runge-Kutta warm-up, the cosine schedule, DDIM clipping, Karras sigmas.
    "prk_cosine_karras": {
        "beta_schedule": "squaredcos_cap_v2",
        "skip_prk_steps": False,
        "timestep_spacing": "linspace",
        "clip_sample": True,
        "clip_sample_range": 1.5,
        "set_alpha_to_one": True,
        "use_karras_sigmas": True,
        "final_sigmas_type": "sigma_min",
    },
    # Class defaults everywhere except a "sample" prediction and trained betas (PNDM refuses "sample").
    "sample_trained": {
        "num_train_timesteps": 200,
        "trained_betas": TRAINED_BETAS,
        "prediction_type": "sample",
        "timestep_spacing": "trailing",
        "use_exponential_sigmas": True,
    },
    # Euler's continuous timesteps (0.25 log sigma) for v-prediction; linear betas, leading spacing.
    "vpred_continuous": {
        "beta_schedule": "linear",
        "prediction_type": "v_prediction",
        "timestep_type": "continuous",
        "timestep_spacing": "leading",
        "steps_offset": 1,
    },
}


def run(cls, cfg, sample0, noise, dtype, device):
    """The pipeline's denoising loop with a fake model; returns (scaled inputs, prev samples)."""
    sched = cls.from_config(cfg)
    sched.set_timesteps(RUN_STEPS)
    sample0, noise = sample0.to(device), noise.to(device)
    sample = sample0.to(dtype) * sched.init_noise_sigma
    scaled_all, prev_all = [], []
    for i, t in enumerate(sched.timesteps):
        scaled = sched.scale_model_input(sample, t)
        model_output = noise.to(dtype) * (1 + 0.1 * i) - 0.05 * scaled
        sample = sched.step(model_output, t, sample).prev_sample
        assert sample.dtype == dtype, (cls, sample.dtype)
        scaled_all.append(scaled.cpu())
        prev_all.append(sample.cpu())
    return scaled_all, prev_all


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT_DIR, help="output folder (default: testdata/reference)")
    args = parser.parse_args()
    f16_device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"f16 runs on {f16_device}")
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}, numpy {np.__version__}")
    torch.manual_seed(0)
    sample0 = torch.randn(SAMPLE_SHAPE, dtype=torch.float32)
    noise = torch.randn(SAMPLE_SHAPE, dtype=torch.float32)
    tensors = {"sample0": sample0, "noise": noise}
    errors = {}
    for cfg_name, cfg in CONFIGS.items():
        for kind, cls in CLASSES.items():
            prefix = f"{cfg_name}.{kind}"
            for n in STEP_COUNTS:
                sched = cls.from_config(cfg)
                try:
                    sched.set_timesteps(n)
                except Exception as e:  # noqa: BLE001 - recorded so the Rust side checks it refuses too
                    errors[f"{prefix}.timesteps.{n}"] = str(e)
                    continue
                tensors[f"{prefix}.timesteps.{n}"] = sched.timesteps.to(torch.float64)
                if kind == "euler":
                    tensors[f"{prefix}.sigmas.{n}"] = sched.sigmas.to(torch.float32)
            sched = cls.from_config(cfg)
            sched.set_timesteps(RUN_STEPS)
            tensors[f"{prefix}.init_noise_sigma"] = torch.tensor([float(sched.init_noise_sigma)], dtype=torch.float64)
            dtypes = [("f32", torch.float32, "cpu")]
            if cfg_name in F16_CONFIGS:
                dtypes.append(("f16", torch.float16, f16_device))
            for dname, dtype, device in dtypes:
                try:
                    scaled, prev = run(cls, cfg, sample0, noise, dtype, device)
                except Exception as e:  # noqa: BLE001
                    errors[f"{prefix}.{dname}.run"] = str(e)
                    continue
                for i, (s, p) in enumerate(zip(scaled, prev)):
                    # PNDM's and DDIM's scale_model_input is the identity (the same tensor object).
                    if kind == "euler":
                        tensors[f"{prefix}.{dname}.scaled.{i}"] = s.clone()
                    tensors[f"{prefix}.{dname}.prev.{i}"] = p.clone()
            print(f"{prefix}: ok")
    os.makedirs(args.out, exist_ok=True)
    save_file(tensors, os.path.join(args.out, "schedulers.safetensors"))
    meta = {
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "step_counts": STEP_COUNTS,
        "run_steps": RUN_STEPS,
        "sample_shape": list(SAMPLE_SHAPE),
        "f16_configs": F16_CONFIGS,
        "f16_device": f16_device,
        "model_output": "noise * (1 + 0.1 * i) - 0.05 * scale_model_input(sample, t), seed 0",
        "configs": CONFIGS,
        "errors": errors,
    }
    with open(os.path.join(args.out, "schedulers.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    for k, v in errors.items():
        print(f"diffusers refused {k}: {v}")
    print(f"wrote {len(tensors)} tensors")


if __name__ == "__main__":
    main()
