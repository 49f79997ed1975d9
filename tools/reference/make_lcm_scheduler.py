#!/usr/bin/env python3
"""Reference values for sdgen's LCM scheduler, straight from diffusers' `LCMScheduler`.

The same records as make_schedulers.py (whose loop this reuses: timesteps for each step count or
diffusers' refusal, init_noise_sigma, and a 10-step run of the pipeline's loop with the fake model
`model_output_i = noise * (1 + 0.1 i) - 0.05 * sample_i`, in f32, f16 and a batch of 2 with one CPU
generator per image handed to `step`, from which LCM draws the noise it adds between steps), for
LCM's configs below, into testdata/reference/lcm/schedulers.{safetensors,json}.

The f16 runs are made on this machine's CPU unless torch sees a GPU (the JSON says which); the
Rust test loosens its f16 tolerance for CPU runs, as for the other schedulers.

Run: /tmp/torchenv/bin/python tools/reference/make_lcm_scheduler.py
(torch 2.15, diffusers 0.42.1)
"""

import os
import sys

from diffusers import LCMScheduler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_schedulers as base  # noqa: E402

# SimianLuo/LCM_Dreamshaper_v7's scheduler/scheduler_config.json as published (diffusers 0.22
# wrote it; recalled from the hub, no download here: the values are LCMScheduler's defaults with
# SD's steps_offset 1 and set_alpha_to_one true).
LCM_DREAMSHAPER = {
    "_class_name": "LCMScheduler",
    "_diffusers_version": "0.22.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "thresholding": False,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
    "trained_betas": None,
}

CONFIGS = {
    "lcm_dreamshaper": LCM_DREAMSHAPER,
    # SDXL base's Euler config, as LCM-LoRA users swap the scheduler in:
    # `LCMScheduler.from_config(pipe.scheduler.config)` (LCM's own defaults for the rest).
    "sdxl": base.CONFIGS["sdxl"],
    # v-prediction with clipping, zero terminal SNR, linear betas, a shorter distillation
    # schedule and another boundary scaling.
    "vpred_clip": {
        "beta_schedule": "linear",
        "prediction_type": "v_prediction",
        "clip_sample": True,
        "clip_sample_range": 1.5,
        "rescale_betas_zero_snr": True,
        "original_inference_steps": 25,
        "timestep_scaling": 5.0,
    },
    # x0-prediction on trained betas (200 training steps, 20 distilled).
    "sample_trained": {
        "num_train_timesteps": 200,
        "trained_betas": base.TRAINED_BETAS,
        "prediction_type": "sample",
        "original_inference_steps": 20,
    },
}


def main():
    base.CLASSES = {"lcm": (LCMScheduler, {})}
    base.SIGMA_KINDS = []
    base.STOCHASTIC_KINDS = ["lcm"]
    base.SCALED_KINDS = []
    base.CONFIGS = CONFIGS
    base.F16_CONFIGS = ["lcm_dreamshaper"]
    base.BATCH_CONFIGS = ["lcm_dreamshaper"]
    if "--out" not in sys.argv:
        sys.argv += ["--out", os.path.join(base.OUT_DIR, "lcm")]
    base.main()


if __name__ == "__main__":
    main()
