"""Full-size SD 3.5 Large checks on the GPU machine (issue #10, "Must show"): diffusers builds SD 3.5
Large at its real sizes with seeded random weights from the real configs the binary bundles
(crates/sdgen/src/loading/single_file/sd35/: the shared encoder, VAE and scheduler configs,
large/ the transformer's and model_index.json), saves the folder in bf16 in the hub's layout
(transformer in 10 GB shards, T5 in 5 GB shards, as stabilityai/stable-diffusion-3.5-large has
them), and generates with a CPU generator; the rest reads our runs' sidecars.

  python3 sd35_fullsize.py make DIR        # writes the model folder (and DIR/.made when done)
  python3 sd35_fullsize.py diffusers DIR   # diffusers' images (DTYPES) into $OUT, one dtype loaded at a time
  python3 sd35_fullsize.py compare         # ours ($OUT/ours-<dtype>/*.png) against diffusers'
  python3 sd35_fullsize.py whole DIR       # per-stage time, measured peak and the planner's, from a run's sidecar
  python3 sd35_fullsize.py budget DIR BUDGET RC  # one --max-memory run: plan, peak against budget
  python3 sd35_fullsize.py summary         # $OUT/sd35_fullsize.json and a compact summary

Tokenizers: the real T5 tokenizer is not available offline, so tokenizer_3 is the stand-in
testdata/tiny-t5/tokenizer_3 (a real-format sentencepiece tokenizer.json, 263 ids, all below the
real T5's 32128): both diffusers and our binary read the folder's same files. The CLIP ones are the
real ones (testdata/clip-tokenizer's vocab.json and merges.txt with the SDXL bundle's configs; SD
3.5's are the same files, see loading/single_file/defaults.rs). A CONFIGS folder that has its own
tokenizer folders (a tiny model's, for a smoke test) gives those instead.

Environment: OUT (default /tmp/out); DTYPES ("f32 bf16"); DEVICE (cuda); SIDE (1024);
STEPS_PARITY (4); CONFIGS (the bundled configs; a tiny diffusers folder such as
testdata/tiny-sd35-large for a smoke test on the CPU); T5_SHARD (5GB) and TRANSFORMER_SHARD (10GB).
"""
import gc
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time

import numpy as np

OUT = os.environ.get("OUT", "/tmp/out")
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "../.."))
CONFIGS = os.path.abspath(os.environ.get("CONFIGS") or os.path.join(REPO, "crates/sdgen/src/loading/single_file/sd35"))
CLIP_TOKENIZER = os.path.join(REPO, "testdata/clip-tokenizer")
SDXL_BUNDLE = os.path.join(REPO, "crates/sdgen/src/loading/single_file/sdxl")
T5_TOKENIZER = os.path.join(REPO, "testdata/tiny-t5/tokenizer_3")
DEVICE = os.environ.get("DEVICE", "cuda")
DTYPES = os.environ.get("DTYPES", "f32 bf16").split()
PROMPT, SEED, GUIDANCE = "a lighthouse at dusk", 42, 3.5  # 3.5: diffusers' documented SD 3.5 Large guidance
SIDE = int(os.environ.get("SIDE", "1024"))
STEPS = int(os.environ.get("STEPS_PARITY") or os.environ.get("STEPS") or "4")
COMPONENT_CONFIGS = (("scheduler", "scheduler_config.json"), ("text_encoder", "config.json"),
                     ("text_encoder_2", "config.json"), ("text_encoder_3", "config.json"),
                     ("transformer", "config.json"), ("vae", "config.json"))
# The sidecar's memory labels against the plan's stage names.
STAGE_OF_LABEL = {"transformer": "denoise", "unet": "denoise", "vae": "decode", "vae_encoder": "encode_image"}
GIB = 2 ** 30
# --max-memory's units are binary (sdgen-memory's plan/size.rs: GB = GiB).
UNITS = {"B": 1, "KB": 2 ** 10, "KIB": 2 ** 10, "MB": 2 ** 20, "MIB": 2 ** 20, "GB": GIB, "GIB": GIB}


def config_path(*parts):
    """The size's own file (large/...) where there is one, else the shared one; a flat diffusers
    folder (CONFIGS=testdata/tiny-sd35-large) has only the latter."""
    for base in (os.path.join(CONFIGS, "large"), CONFIGS):
        path = os.path.join(base, *parts)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{os.path.join(*parts)} is neither in {CONFIGS}/large nor in {CONFIGS}")


def config(component, file="config.json"):
    with open(config_path(component, file)) as f:
        return json.load(f)


def write_tokenizers(model_dir):
    """tokenizer/, tokenizer_2/ (pads with "!") and tokenizer_3/ as the hub has them: the CLIP ones
    as four files without tokenizer.json; see the module doc for the T5 stand-in."""
    for component in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        dst = os.path.join(model_dir, component)
        shutil.rmtree(dst, ignore_errors=True)
        own = os.path.join(CONFIGS, component)
        if os.path.isdir(own):
            shutil.copytree(own, dst)
        elif component == "tokenizer_3":
            shutil.copytree(T5_TOKENIZER, dst)
        else:
            os.makedirs(dst)
            for f in ("vocab.json", "merges.txt"):
                shutil.copy(os.path.join(CLIP_TOKENIZER, f), dst)
            for f in ("tokenizer_config.json", "special_tokens_map.json"):
                shutil.copy(os.path.join(SDXL_BUNDLE, component, f), dst)


def check_saved(model_dir):
    """Fails loudly where a save differs from the hub's names (what our loader reads)."""
    from safetensors import safe_open

    def names(component):
        return {k for f in glob.glob(os.path.join(model_dir, component, "*.safetensors"))
                for k in safe_open(f, "pt").keys()}
    for component in ("text_encoder", "text_encoder_2"):
        keys = names(component)
        assert "text_projection.weight" in keys, component
        assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in keys), \
            f"{component}: names without the hub's text_model. prefix"
    keys = names("text_encoder_3")
    assert "shared.weight" in keys or "encoder.embed_tokens.weight" in keys, "text_encoder_3: no token embedding"
    for component in ("transformer", "text_encoder_3"):
        n = len(glob.glob(os.path.join(model_dir, component, "*.safetensors")))
        index = glob.glob(os.path.join(model_dir, component, "*.safetensors.index.json"))
        assert n >= 1 and (n == 1 or index), f"{component}: {n} shards, index {index}"


def make(model_dir):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel
    t0 = time.time()
    shutil.rmtree(model_dir, ignore_errors=True)
    torch.manual_seed(0)
    bf16 = torch.bfloat16
    # Built on the GPU (drawing 8B parameters on the host takes minutes), each converted to bf16
    # as soon as it is drawn, so that f32 copies never add up (the transformer alone is 32 GB).
    with torch.device(DEVICE):
        transformer = SD3Transformer2DModel.from_config(config("transformer")).to(bf16)
        t5 = T5EncoderModel(T5Config.from_json_file(config_path("text_encoder_3", "config.json"))).to(bf16)
        text = CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(config_path("text_encoder", "config.json")))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_json_file(config_path("text_encoder_2", "config.json")))
        text, text_2 = text.to(bf16), text_2.to(bf16)
        vae = AutoencoderKL.from_config(config("vae")).to(bf16)
    print(f"built in {time.time() - t0:.1f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizers(tmp)
        tok = CLIPTokenizer.from_pretrained(os.path.join(tmp, "tokenizer"))
        tok_2 = CLIPTokenizer.from_pretrained(os.path.join(tmp, "tokenizer_2"))
    assert tok.pad_token == "<|endoftext|>" and tok_2.pad_token == "!", (tok.pad_token, tok_2.pad_token)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config("scheduler", "scheduler_config.json"))
    # T5 is saved on its own in the hub's 5 GB shards (the pipeline's save would write it whole);
    # model_index.json is replaced by the bundled one below, which names it.
    pipe = StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text,
                                    text_encoder_2=text_2, text_encoder_3=None, tokenizer=tok, tokenizer_2=tok_2,
                                    tokenizer_3=None)
    pipe.save_pretrained(model_dir, safe_serialization=True,
                         max_shard_size=os.environ.get("TRANSFORMER_SHARD", "10GB"))
    print(f"pipeline saved at {time.time() - t0:.1f} s", flush=True)
    t5.save_pretrained(os.path.join(model_dir, "text_encoder_3"), safe_serialization=True,
                       max_shard_size=os.environ.get("T5_SHARD", "5GB"))
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in
              (("transformer", transformer), ("text_encoder_3", t5), ("text_encoder", text),
               ("text_encoder_2", text_2), ("vae", vae))}
    del pipe, transformer, t5, text, text_2, vae
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    # What a current save_pretrained writes differently from stabilityai's folder: transformers 5
    # saves a tokenizer.json only (the CLIP tokenizers are written as the hub's four files) and its
    # own configs (the bundled ones verbatim instead: the same bytes our binary bundles).
    write_tokenizers(model_dir)
    shutil.copy(config_path("model_index.json"), model_dir)
    for component, file in COMPONENT_CONFIGS:
        shutil.copy(config_path(component, file), os.path.join(model_dir, component, file))
    check_saved(model_dir)
    size = sum(os.path.getsize(f) for f in glob.glob(os.path.join(model_dir, "**", "*"), recursive=True)
               if os.path.isfile(f))
    info = {"params_B": {k: round(v / 1e9, 4) for k, v in params.items()}, "folder_GB": round(size / 1e9, 2),
            "seconds": round(time.time() - t0, 1), "configs": os.path.relpath(CONFIGS, REPO),
            "files": sorted(os.path.relpath(f, model_dir) for f in glob.glob(os.path.join(model_dir, "*", "*")))}
    with open(os.path.join(model_dir, "made.json"), "w") as f:
        json.dump(info, f, indent=1)
    # Marks a finished folder, so a rerun on the same machine can skip this step.
    open(os.path.join(model_dir, ".made"), "w").close()
    print("saved", model_dir, json.dumps({k: v for k, v in info.items() if k != "files"}))


def load_pipeline(model_dir, dtype):
    """The folder straight onto the device where diffusers can (device_map, no host copy: f32 is
    56 GB), else loaded on the host and moved."""
    from diffusers import StableDiffusion3Pipeline
    if DEVICE == "cuda":
        try:
            return StableDiffusion3Pipeline.from_pretrained(model_dir, dtype=dtype, device_map=DEVICE), "device_map"
        except Exception as e:  # an older diffusers without device strings in device_map
            print(f"device_map={DEVICE} failed ({type(e).__name__}: {e}); loading on the host", flush=True)
    return StableDiffusion3Pipeline.from_pretrained(model_dir, dtype=dtype).to(DEVICE), "to"


def diffusers_images(model_dir):
    import torch
    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
    # Ours never runs f32 on TF32 (ops/cudnn.rs); nor does the reference. (Matmuls: off by default.)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    res = {"torch": torch.__version__}
    for name in DTYPES:
        try:
            t0 = time.time()
            pipe, how = load_pipeline(model_dir, dtypes[name])
            pipe.set_progress_bar_config(disable=True)
            load_s = time.time() - t0
            kw = dict(guidance_scale=GUIDANCE, output_type="np", height=SIDE, width=SIDE)
            gen = lambda: torch.Generator("cpu").manual_seed(SEED)
            # One warm-up step for the timed half-precision run; f32's time is a cold start's
            # (it is here for parity, and a warm-up costs seconds of f32).
            warm = name != "f32"
            if warm:
                pipe(PROMPT, generator=gen(), num_inference_steps=1, **kw)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.time()
            img = pipe(PROMPT, generator=gen(), num_inference_steps=STEPS, **kw).images[0]
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            res[name] = {"seconds": round(time.time() - t0, 3), "warmed_up": warm, "load_seconds": round(load_s, 2),
                         "loaded_by": how, "steps": STEPS, "scheduler": type(pipe.scheduler).__name__,
                         "peak_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2) if DEVICE == "cuda" else None,
                         "mean": float(np.nanmean(img)), "std": float(np.nanstd(img)),
                         "nan_pct": round(float(np.isnan(img).mean() * 100), 3)}
            np.save(os.path.join(OUT, f"diffusers-{name}.npy"), img.astype(np.float32))
            print(name, json.dumps(res[name]), flush=True)
        except Exception as e:  # the next dtype still runs
            res[name] = f"failed: {type(e).__name__}: {str(e)[:500]}"
            print(name, res[name], flush=True)
        # Freed before the next dtype loads: f32 and bf16 together would not fit.
        pipe = img = None
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    with open(os.path.join(OUT, "diffusers.json"), "w") as f:
        json.dump(res, f, indent=1)


def compare():
    """Per dtype: the fraction of channel values within 1/255 of diffusers' (rounded as PIL would),
    the mean and max difference in 1/255 units, and how much of diffusers' image is saturated (0 or
    255: a random-weight image that is mostly saturated compares too easily). f32 passes at
    ≥ 99.5% within 1/255; bf16 is reported. Writes $OUT/compare.json and diffusers' PNGs."""
    from PIL import Image
    res = {}
    for name in DTYPES:
        path = os.path.join(OUT, f"diffusers-{name}.npy")
        if not os.path.exists(path):
            res[name] = "no diffusers image"
            continue
        want = np.round(np.nan_to_num(np.load(path), nan=0.0).clip(0, 1) * 255)
        Image.fromarray(want.astype(np.uint8)).save(os.path.join(OUT, f"diffusers-{name}.png"))
        pngs = sorted(glob.glob(os.path.join(OUT, f"ours-{name}", "*.png")))
        if not pngs:
            res[name] = "no image of ours"
            continue
        ours = np.asarray(Image.open(pngs[0]).convert("RGB")).astype(np.float32)
        if ours.shape != want.shape:
            res[name] = f"ours is {ours.shape}, diffusers' {want.shape}"
            continue
        diff = np.abs(ours - want)
        within = float((diff <= 1).mean() * 100)
        res[name] = {"within_1_of_255_pct": round(within, 3), "mean_abs_of_255": round(float(diff.mean()), 3),
                     "max_abs_of_255": float(diff.max()), "ours_mean": round(float(ours.mean() / 255), 4),
                     "ref_mean": round(float(want.mean() / 255), 4),
                     "ref_saturated_pct": round(float(((want == 0) | (want == 255)).mean() * 100), 3),
                     "pass": within >= 99.5 if name == "f32" else None}
    print(json.dumps(res))
    with open(os.path.join(OUT, "compare.json"), "w") as f:
        json.dump(res, f, indent=1)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # a failed run leaves an empty or no file
        return f"no result: {e}"


def sidecar(run_dir):
    side = sorted(glob.glob(os.path.join(run_dir, "*.json")))
    return read_json(side[0]) if side else None


def gpu_figures(stages):
    """Per memory entry: (label, peak, floor) in bytes, and what they measure. The run's floor is
    the least in use at any stage boundary (the CUDA context and other processes, which
    --max-memory does not count), as budget_ladder.sh computes it. Without GPU figures (a CPU smoke
    test) the process's resident memory stands in."""
    if all(s.get("peak_gpu_bytes") is not None for s in stages):
        floor = min(min(s["before"]["gpu"]["used_bytes"], s["after"]["gpu"]["used_bytes"]) for s in stages)
        return [(s["label"], s["peak_gpu_bytes"]) for s in stages], floor, "gpu (device-wide used)"
    floor = min(min(s["before"]["process_rss_bytes"], s["after"]["process_rss_bytes"]) for s in stages)
    return [(s["label"], s.get("peak_rss_bytes") or 0) for s in stages], floor, "process_rss (no GPU figures)"


def whole(run_dir):
    """Per stage of one run: its time, its measured peak above the run's floor, the planner's
    estimate of it (the stage's peak_bytes: the 512 MiB CUDA runtime baseline + weights +
    activations) and their ratio; and the activations alone (measured peak − floor − the plan's
    weights, against the plan's activation_bytes), which is what the planner's coefficients are
    fitted to. Writes $OUT/sd35_whole_stages.json."""
    meta = sidecar(run_dir)
    if not isinstance(meta, dict):
        res = {"error": f"no sidecar in {run_dir}: {meta}"}
    else:
        plan = meta["extra"]["plan"]
        est = {s["stage"]: s for s in plan["stages"]}
        peaks, floor, source = gpu_figures(meta["extra"]["memory"])
        elapsed = {s["label"]: s.get("elapsed_ms") for s in meta["extra"]["memory"]}
        rows = []
        for label, peak in peaks:
            stage = STAGE_OF_LABEL.get(label, label)
            e = est.get(stage)
            row = {"label": label, "stage": stage, "elapsed_ms": round(elapsed[label] or 0, 1),
                   "measured_peak_bytes": peak - floor}
            if e is not None:
                act = peak - floor - e["weight_bytes"]
                row.update(placement=e["placement"], items_per_forward=e["items_per_forward"],
                           weight_bytes=e["weight_bytes"], planned_peak_bytes=e["peak_bytes"],
                           planned_activation_bytes=e["activation_bytes"], measured_activation_bytes=act,
                           peak_ratio=round((peak - floor) / e["peak_bytes"], 3) if e["peak_bytes"] else None,
                           activation_ratio=round(act / e["activation_bytes"], 3) if e["activation_bytes"] else None)
                row["within_15pct"] = row["peak_ratio"] is not None and abs(row["peak_ratio"] - 1) <= 0.15
            rows.append(row)
        res = {"family": plan["family"], "width": meta["width"], "height": meta["height"], "steps": meta["steps"],
               "dtype": meta["dtype"], "device": meta["device"], "guidance": meta["guidance"],
               "memory_source": source, "floor_bytes": floor, "baseline_bytes": plan["baseline_bytes"],
               "plan_peak_bytes": plan["peak_bytes"], "verdict": plan["verdict"],
               "memory_optimizations": meta.get("memory_optimizations"), "timings_ms": meta.get("timings_ms"),
               "skipped_encoders": meta["extra"].get("skipped_encoders"), "stages": rows}
        gb = lambda b: f"{b / 1e9:7.2f}" if b is not None else "      -"
        print(f"whole run: {res['family']} {res['width']}x{res['height']} {res['steps']} steps {res['dtype']}, "
              f"floor {floor / 1e9:.2f} GB ({source})")
        print(f"{'stage':15} {'time s':>7} {'meas GB':>7} {'plan GB':>7} {'ratio':>6}  {'act GB':>7} {'plan act':>8} "
              f"{'ratio':>6}")
        for r in rows:
            print(f"{r['stage']:15} {r['elapsed_ms'] / 1e3:7.2f} {gb(r['measured_peak_bytes'])} "
                  f"{gb(r.get('planned_peak_bytes'))} {r.get('peak_ratio') or '-':>6}  "
                  f"{gb(r.get('measured_activation_bytes'))} {gb(r.get('planned_activation_bytes'))} "
                  f" {r.get('activation_ratio') or '-':>6}")
    with open(os.path.join(OUT, "sd35_whole_stages.json"), "w") as f:
        json.dump(res, f, indent=1)


def budget_bytes(budget):
    m = re.fullmatch(r"([\d.]+)\s*([A-Za-z]*)", budget.strip())
    return float(m.group(1)) * UNITS[(m.group(2) or "GB").upper()]


def budget(run_dir, budget_text, rc):
    """One --max-memory run: the exit code; for a run that ran, the plan (options and placement of
    each stage, what the console calls memory_optimizations) and its measured peak above the floor
    against the budget; for one that did not, the error line. Appends to $OUT/budgets.jsonl."""
    rc, limit = int(rc), budget_bytes(budget_text)
    row = {"budget": budget_text, "budget_bytes": int(limit), "rc": rc}
    meta = sidecar(run_dir) if rc == 0 else None
    if isinstance(meta, dict):
        plan = meta["extra"]["plan"]
        peaks, floor, source = gpu_figures(meta["extra"]["memory"])
        worst = max(p for _, p in peaks) - floor
        row.update(result="within" if worst <= limit else "OVER", run_peak_bytes=worst, floor_bytes=floor,
                   memory_source=source, steps=meta["steps"], verdict=plan["verdict"],
                   usable_bytes=plan["usable_bytes"], plan_peak_bytes=plan["peak_bytes"],
                   memory_optimizations=meta.get("memory_optimizations"),
                   failures=meta.get("failures") or [], total_ms=round(sum((meta.get("timings_ms") or {}).values())),
                   stages=[{"stage": s["stage"], "placement": s["placement"], "precision": s["precision"],
                            "items": s["items_per_forward"], "peak_bytes": s["peak_bytes"],
                            "options": {k: v for k, v in s["options"].items() if v}} for s in plan["stages"]])
        print(f"{budget_text:>7}: exit 0, run peak {worst / GIB:.2f} GiB ({row['result']} the budget), "
              f"plan peak {plan['peak_bytes'] / GIB:.2f} GiB, options {row['memory_optimizations'] or '-'}, "
              + ", ".join(f"{s['stage']} {'host' if s['placement'] == 'host' else 'dev'}"
                          + (f" {s['options']}" if s["options"] else "") for s in row["stages"]))
    else:
        try:
            log = open(run_dir + ".log", errors="replace").read()
        except OSError:
            log = ""
        errors = [line.strip() for line in log.splitlines() if line.lower().startswith("error")]
        row["error"] = errors[-1][:600] if errors else log.strip()[-600:]
        row["result"] = ("OUT OF MEMORY mid-run" if "out of memory" in log.lower() and rc != 2 else
                         "refused before loading" if rc == 2 else "failed" if rc != 0 else "no sidecar")
        print(f"{budget_text:>7}: exit {rc}, {row['result']}: {row['error'][:300]}")
    with open(os.path.join(OUT, "budgets.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def summary():
    """$OUT/sd35_fullsize.json: every step's exit code and time, the folder, diffusers' and our
    parity runs, the comparison, the whole run's stage table and the budget ladder; then a compact
    print of it."""
    steps = []
    if os.path.exists(os.path.join(OUT, "steps.jsonl")):
        steps = [json.loads(line) for line in open(os.path.join(OUT, "steps.jsonl")) if line.strip()]
    budgets = []
    if os.path.exists(os.path.join(OUT, "budgets.jsonl")):
        budgets = [json.loads(line) for line in open(os.path.join(OUT, "budgets.jsonl")) if line.strip()]
    ours = {}
    for name in DTYPES:
        r = read_json(os.path.join(OUT, f"ours-{name}.json"))
        ours[name] = {k: r.get(k) for k in ("timings_ms", "warnings", "scheduler", "steps")} if isinstance(r, dict) else r
    accepted = [b for b in budgets if b["rc"] == 0]
    res = {"prompt": PROMPT, "seed": SEED, "guidance": GUIDANCE, "side": SIDE, "steps_parity": STEPS,
           "steps": steps, "model": read_json(os.path.join(OUT, "made.json")),
           "diffusers": read_json(os.path.join(OUT, "diffusers.json")), "ours": ours,
           "compare": read_json(os.path.join(OUT, "compare.json")),
           "whole": read_json(os.path.join(OUT, "sd35_whole_stages.json")), "budgets": budgets,
           "smallest_accepted_budget": min(accepted, key=lambda b: b["budget_bytes"])["budget"] if accepted else None,
           "all_accepted_within_budget": all(b.get("result") == "within" for b in accepted) if accepted else None}
    with open(os.path.join(OUT, "sd35_fullsize.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("== summary ==")
    print("steps:", ", ".join(f"{s['step']} rc {s['rc']} {s['seconds']}s" for s in steps))
    if isinstance(res["model"], dict):
        print("model:", res["model"]["folder_GB"], "GB,", res["model"]["params_B"], "B params")
    for name in DTYPES:
        d = res["diffusers"].get(name) if isinstance(res["diffusers"], dict) else None
        c = res["compare"].get(name) if isinstance(res["compare"], dict) else None
        o = ours.get(name)
        print(f"{name}: diffusers {json.dumps(d)}")
        print(f"{name}: ours timings_ms {json.dumps(o.get('timings_ms') if isinstance(o, dict) else o)}")
        print(f"{name}: compare {json.dumps(c)}")
    w = res["whole"]
    if isinstance(w, dict) and "stages" in w:
        print(f"whole: {w['steps']} steps, total {sum((w['timings_ms'] or {}).values()) / 1e3:.1f} s; "
              + "; ".join(f"{r['stage']} {r['elapsed_ms'] / 1e3:.1f}s {r['measured_peak_bytes'] / 1e9:.2f}/"
                          f"{(r.get('planned_peak_bytes') or 0) / 1e9:.2f} GB x{r.get('peak_ratio')}"
                          for r in w["stages"]))
    else:
        print("whole:", w)
    print("budgets:", "; ".join(f"{b['budget']} rc {b['rc']} {b.get('result')}"
                                + (f" {b['run_peak_bytes'] / GIB:.2f} GiB" if "run_peak_bytes" in b else "")
                                for b in budgets))
    print("smallest accepted budget:", res["smallest_accepted_budget"],
          "| all accepted within budget:", res["all_accepted_within_budget"])


if __name__ == "__main__":
    commands = {"make": lambda: make(sys.argv[2]), "diffusers": lambda: diffusers_images(sys.argv[2]),
                "compare": compare, "whole": lambda: whole(sys.argv[2]),
                "budget": lambda: budget(sys.argv[2], sys.argv[3], sys.argv[4]), "summary": summary}
    commands[sys.argv[1]]()
