"""diffusers on this machine's CPU, on the same folder sdgen-bench wrote (SD 1.5 at its real size,
random weights): one UNet evaluation of the CFG batch at 512² and one VAE decode at 512² (f32 and
bf16), loads excluded, on the same thread count as ours. Prints one JSON document.
Usage: python3 peer_cpu.py MODEL_DIR [THREADS] [PARTS]   (torch + diffusers installed; PARTS: a
comma-separated choice of unet, vae, f32, bf16 — all by default)"""
import json, os, sys, time
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

model_dir = sys.argv[1]
threads = int(sys.argv[2]) if len(sys.argv) > 2 else os.cpu_count()
parts = set((sys.argv[3] if len(sys.argv) > 3 else "unet,vae,f32,bf16").split(","))
if not parts & {"unet", "vae"}:
    parts |= {"unet", "vae"}
if not parts & {"f32", "bf16"}:
    parts |= {"f32", "bf16"}
dtypes = [(d, n) for d, n in [(torch.float32, "f32"), (torch.bfloat16, "bf16")] if n in parts]
torch.set_num_threads(threads)
result = {"torch": torch.__version__, "threads": threads}


def timed(fn, warm=1, iters=2):
    for _ in range(warm):
        fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append(round((time.perf_counter() - t) * 1000, 1))
    return out


@torch.no_grad()
def main():
    g = torch.Generator().manual_seed(0)
    for dtype, name in dtypes if "unet" in parts else []:
        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=dtype).eval()
        x = torch.randn(2, 4, 64, 64, generator=g).to(dtype)
        ctx = torch.randn(2, 77, 768, generator=g).to(dtype)
        result[f"unet_eval_512_b2_{name}_ms"] = timed(lambda: unet(x, 500, encoder_hidden_states=ctx).sample)
        del unet
    for dtype, name in dtypes if "vae" in parts else []:
        vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", torch_dtype=dtype).eval()
        z = torch.randn(1, 4, 64, 64, generator=g).to(dtype)
        result[f"vae_decode_512_{name}_ms"] = timed(lambda: vae.decode(z).sample, warm=1, iters=2)
        del vae
    print(json.dumps(result))


main()
