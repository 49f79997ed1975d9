#!/usr/bin/env python3
"""Reference values for sdgen's schedulers (PNDM, DDIM, Euler, Euler ancestral, DPM++ 2M and
DPM++ 2M Karras), straight from diffusers.

For every scheduler config below and every scheduler kind, built as diffusers does with
`Cls.from_config(cfg)` (fields the class doesn't take are ignored, missing ones take the class's
default; "dpm++2m-karras" is `DPMSolverMultistepScheduler.from_config(cfg, use_karras_sigmas=True)`),
this records, with `{kind}` the kind's sdgen CLI name:

* `{cfg}.{kind}.timesteps.{n}` (f64) for n in STEP_COUNTS, and for the sigma-based kinds (Euler,
  Euler ancestral, DPM++) `{cfg}.{kind}.sigmas.{n}` (f32);
* `errors["{cfg}.{kind}.run.{n}"]` where diffusers can set n timesteps but fails to step through
  them (DPM-Solver when the first timestep repeats: it starts at the repeat and runs past the
  last sigma), found by a dry run on a [1, 1, 1, 1] sample;
* `{cfg}.{kind}.init_noise_sigma` (f64, shape [1]) after `set_timesteps(RUN_STEPS)`;
* a denoising run of RUN_STEPS steps written out like the pipeline's loop, with a fake model
  `model_output_i = noise * (1 + 0.1 i) - 0.05 * scaled_i`:
  `{cfg}.{kind}.{dtype}.scaled.{i}` (scale_model_input's output, for the Euler kinds only: PNDM's,
  DDIM's and DPM's is the identity) and `{cfg}.{kind}.{dtype}.prev.{i}` (step's prev_sample),
  starting from `sample0 * init_noise_sigma`. As in the pipeline, `step` gets
  `generator=[torch.Generator("cpu").manual_seed(s) for s in RUN_SEEDS]` when it takes one, so
  Euler ancestral draws its per-step noise from those (fresh) generators;
* for the sd15 config, a batch run `{cfg}.{kind}.f32_batch.*` of the same loop from
  `sample0_batch` / `noise_batch` ([2, 4, 4, 4]) with one generator per image (BATCH_SEEDS):
  diffusers' randn_tensor draws image i's noise from generator i.

Cases diffusers refuses (e.g. PNDM with prediction_type "sample") are listed under "errors" in the
JSON file instead. Output: testdata/reference/schedulers.{safetensors,json} (or --out DIR).

The float16 runs use CUDA when torch sees a GPU, because that is where half precision is used and
torch's CPU and CUDA kernels round differently: on CPU a half tensor times a 0-d float32 tensor
first rounds the scalar to half, on CUDA it multiplies in float32 ("opmath") and rounds once.
sdgen follows the CUDA behaviour; the JSON records which device made the f16 runs
("f16_device"), and the Rust tests loosen their f16 tolerance when it was the CPU.

Euler ancestral's f16 runs draw float16 noise from CPU generators. sdgen's generator reproduces
torch 2.15, which computes half-precision normals in float and rounds them (so a draw of 64 equals
the float32 draw rounded); older torch builds (e.g. the 2.11 of the GPU machine) draw them in half
and give other values. Where this torch does the latter, those runs are left out and listed under
"skipped" with the reason; the Rust tests skip them too.

Run: /opt/refvenv/bin/python tools/reference/make_schedulers.py
(the committed file was made on a GPU machine, torch 2.11.0+cu130, with a copy of this diffusers
0.42.1 first on PYTHONPATH and its pure-Python dependencies appended to sys.path; the f32 runs
agree with torch 2.15 on the CPU to ~1e-6 relative)
"""

import argparse
import inspect
import json
import os

import diffusers
import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from safetensors.torch import save_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT_DIR = os.path.join(ROOT, "testdata", "reference")

STEP_COUNTS = [1, 4, 10, 25, 50]
RUN_STEPS = 10
SAMPLE_SHAPE = (1, 4, 4, 4)
BATCH_SHAPE = (2, 4, 4, 4)
# Seeds of the CPU generators handed to `step` (one per image), for the single and batch runs.
RUN_SEEDS = [1234]
BATCH_SEEDS = [5, 6]
# kind (sdgen's CLI name) -> (diffusers class, extra from_config arguments)
CLASSES = {
    "pndm": (PNDMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {}),
    "dpm++2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
}
SIGMA_KINDS = ["euler", "euler-a", "dpm++2m", "dpm++2m-karras"]
# Kinds whose steps draw noise from the generators.
STOCHASTIC_KINDS = ["euler-a"]
# Kinds whose scale_model_input is not the identity.
SCALED_KINDS = ["euler", "euler-a"]
# Half-precision runs check the dtype handling: the Euler kinds and DPM upcast inside step,
# PNDM/DDIM don't.
F16_CONFIGS = ["sd15", "sdxl"]
BATCH_CONFIGS = ["sd15"]

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
    # DPM-Solver++ 3rd order with the cosine schedule and lambda clipping (the top ~30 training
    # timesteps are cut off, which changes the leading step ratio), no lower-order final steps,
    # v-prediction. Leading spacing keeps the other kinds away from the cosine schedule's last
    # timesteps, whose huge sigmas (up to 2e4) leave float32 runs only ~1e-3 accurate.
    "dpm3_clipped": {
        "beta_schedule": "squaredcos_cap_v2",
        "solver_order": 3,
        "lambda_min_clipped": -3.0,
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "lower_order_final": False,
        "prediction_type": "v_prediction",
    },
    # DPM-Solver++ 2nd order Heun, uniform-lambda steps (Karras wins for the Karras kind, with
    # the config's sigma_min/sigma_max), a first-order last step, ending at the smallest sigma.
    "dpm_heun_lu": {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "solver_type": "heun",
        "use_lu_lambdas": True,
        "euler_at_final": True,
        "final_sigmas_type": "sigma_min",
        "sigma_min": 0.05,
        "sigma_max": 10.0,
        "timestep_spacing": "leading",
        "steps_offset": 1,
    },
}


def make(kind, cfg):
    cls, extra = CLASSES[kind]
    return cls.from_config(cfg, **extra)


def half_randn_matches_sdgen():
    """Whether this torch draws float16 normals as sdgen's generator does (torch 2.15: computed in
    float and rounded, so 64 half values are the 64 float32 ones rounded)."""
    half = torch.randn(64, dtype=torch.float16, generator=torch.Generator().manual_seed(0))
    single = torch.randn(64, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    return torch.equal(half, single.half())


def dry_run(sched):
    """Steps through the timesteps already set, to find the step counts diffusers cannot run."""
    sample = torch.full((1, 1, 1, 1), 0.5)
    for t in sched.timesteps:
        sample = sched.step(0.1 * sched.scale_model_input(sample, t), t, sample).prev_sample


def run(kind, cfg, sample0, noise, seeds, dtype, device):
    """The pipeline's denoising loop with a fake model; returns (scaled inputs, prev samples)."""
    sched = make(kind, cfg)
    sched.set_timesteps(RUN_STEPS)
    sample0, noise = sample0.to(device), noise.to(device)
    sample = sample0.to(dtype) * sched.init_noise_sigma
    # What StableDiffusionPipeline.prepare_extra_step_kwargs passes.
    extra = {}
    if "generator" in inspect.signature(sched.step).parameters:
        extra["generator"] = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    scaled_all, prev_all = [], []
    for i, t in enumerate(sched.timesteps):
        scaled = sched.scale_model_input(sample, t)
        model_output = noise.to(dtype) * (1 + 0.1 * i) - 0.05 * scaled
        sample = sched.step(model_output, t, sample, **extra).prev_sample
        assert sample.dtype == dtype, (kind, sample.dtype)
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
    sample0_batch = torch.randn(BATCH_SHAPE, dtype=torch.float32)
    noise_batch = torch.randn(BATCH_SHAPE, dtype=torch.float32)
    tensors = {"sample0": sample0, "noise": noise, "sample0_batch": sample0_batch, "noise_batch": noise_batch}
    errors = {}
    skipped = {}
    half_noise_ok = half_randn_matches_sdgen()
    print(f"float16 randn as sdgen draws it: {half_noise_ok}")
    for cfg_name, cfg in CONFIGS.items():
        for kind in CLASSES:
            prefix = f"{cfg_name}.{kind}"
            for n in STEP_COUNTS:
                try:
                    sched = make(kind, cfg)
                    sched.set_timesteps(n)
                except Exception as e:  # noqa: BLE001 - recorded so the Rust side checks it refuses too
                    errors[f"{prefix}.timesteps.{n}"] = str(e)
                    continue
                tensors[f"{prefix}.timesteps.{n}"] = sched.timesteps.to(torch.float64)
                if kind in SIGMA_KINDS:
                    tensors[f"{prefix}.sigmas.{n}"] = sched.sigmas.to(torch.float32)
                try:
                    dry_run(sched)
                except Exception as e:  # noqa: BLE001
                    errors[f"{prefix}.run.{n}"] = f"{type(e).__name__}: {e}"
            runs = [("f32", torch.float32, "cpu", sample0, noise, RUN_SEEDS)]
            if cfg_name in F16_CONFIGS:
                if kind in STOCHASTIC_KINDS and not half_noise_ok:
                    skipped[f"{prefix}.f16"] = (
                        f"torch {torch.__version__} draws float16 noise on the CPU in half precision, "
                        "not as sdgen (torch 2.15) does"
                    )
                else:
                    runs.append(("f16", torch.float16, f16_device, sample0, noise, RUN_SEEDS))
            if cfg_name in BATCH_CONFIGS:
                runs.append(("f32_batch", torch.float32, "cpu", sample0_batch, noise_batch, BATCH_SEEDS))
            try:
                sched = make(kind, cfg)
                sched.set_timesteps(RUN_STEPS)
            except Exception as e:  # noqa: BLE001 - e.g. a config the class refuses to be built from
                errors.update({f"{prefix}.{r[0]}.run": str(e) for r in runs})
                continue
            tensors[f"{prefix}.init_noise_sigma"] = torch.tensor([float(sched.init_noise_sigma)], dtype=torch.float64)
            for dname, dtype, device, s0, nz, seeds in runs:
                try:
                    scaled, prev = run(kind, cfg, s0, nz, seeds, dtype, device)
                except Exception as e:  # noqa: BLE001
                    errors[f"{prefix}.{dname}.run"] = str(e)
                    continue
                for i, (s, p) in enumerate(zip(scaled, prev)):
                    # The other kinds' scale_model_input is the identity (the same tensor object).
                    if kind in SCALED_KINDS:
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
        "batch_shape": list(BATCH_SHAPE),
        "run_seeds": RUN_SEEDS,
        "batch_seeds": BATCH_SEEDS,
        "f16_configs": F16_CONFIGS,
        "f16_device": f16_device,
        "model_output": "noise * (1 + 0.1 * i) - 0.05 * scale_model_input(sample, t), seed 0",
        "configs": CONFIGS,
        "errors": errors,
        "skipped": skipped,
    }
    with open(os.path.join(args.out, "schedulers.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    for k, v in errors.items():
        print(f"diffusers refused {k}: {v}")
    print(f"wrote {len(tensors)} tensors")


if __name__ == "__main__":
    main()
