"""diffusers' SDXL UNet on this machine's CPU, on the folder sdgen-bench wrote (SDXL at its real
size, random weights): one evaluation of the CFG batch (2 rows) at SIDE² (default 1024²) in f32,
loads excluded, on the same thread count as ours (the CPU speed issue's "SDXL 1024² UNet step f32
beside diffusers'"). Prints one JSON document.
Usage: python3 peer_sdxl_unet.py MODEL_DIR [THREADS] [SIDE]   (torch + diffusers installed)"""
import json, os, sys, time
import torch
from diffusers import UNet2DConditionModel

model_dir = sys.argv[1]
threads = int(sys.argv[2]) if len(sys.argv) > 2 else os.cpu_count()
side = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
torch.set_num_threads(threads)


@torch.no_grad()
def main():
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    cfg = unet.config
    lat = side // 8
    x = torch.randn(2, cfg.in_channels, lat, lat, generator=g)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, text_dim, generator=g),
             "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * 2, dtype=torch.float32)}
    t = torch.tensor([500.0, 500.0])
    times = []
    for _ in range(2):  # the first evaluation warms up (oneDNN's kernel choice, allocations)
        s = time.perf_counter()
        unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added)
        times.append(round((time.perf_counter() - s) * 1000, 1))
    print(json.dumps({"torch": torch.__version__, "threads": threads, "side": side, "load_s": round(load_s, 1),
                      "unet_f32_ms": times}))


main()
