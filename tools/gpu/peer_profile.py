"""Per-kernel breakdown of one diffusers evaluation on the GPU (torch.profiler): the SDXL UNet at
1024² with the CFG batch, the SDXL VAE decode at 1024² and the SD 3.5 Large MMDiT at 1024² with the
CFG batch (77 + 256 text tokens), bf16, random weights at the real sizes
(the same modules peer_diffusers.py times). Prints the top kernels by GPU time, the kernel count,
and the total GPU time of one evaluation; writes peer_profile.json into $OUT when set.
Usage: python3 peer_profile.py [unet] [vae] [sd35]   (needs diffusers on PYTHONPATH)"""
import json, os, sys
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", ".carry"))
import peer_diffusers as peer  # noqa: E402

dev, dt = "cuda", torch.bfloat16
RESULT = {}


def profile(name, fn, top=25):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name, [0, 0.0])
            k[0] += 1
            k[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    total_us = sum(v[1] for v in kernels.values())
    launches = sum(v[0] for v in kernels.values())
    rows = sorted(kernels.items(), key=lambda kv: -kv[1][1])
    print(f"== {name}: {launches} kernel launches, {total_us / 1e3:.1f} ms GPU time")
    for kname, (count, us) in rows[:top]:
        print(f"  {us / 1e3:8.2f} ms {100 * us / total_us:5.1f}%  x{count:<5} {kname[:110]}")
    RESULT[name] = {"launches": launches, "gpu_ms": total_us / 1e3,
                    "top": [{"kernel": k, "count": c, "ms": us / 1e3} for k, (c, us) in rows[:top]]}


@torch.no_grad()
def main(parts):
    if "unet" in parts:
        u = peer.sdxl_unet()
        x = torch.randn(2, 4, 128, 128, device=dev, dtype=dt)
        ctx = torch.randn(2, 77, 2048, device=dev, dtype=dt)
        add = dict(text_embeds=torch.randn(2, 1280, device=dev, dtype=dt), time_ids=torch.randn(2, 6, device=dev, dtype=dt))
        profile("sdxl_unet_1024_b2", lambda: u(x, 500, encoder_hidden_states=ctx, added_cond_kwargs=add).sample)
        del u
        torch.cuda.empty_cache()
    if "vae" in parts:
        v = peer.sdxl_vae()
        z = torch.randn(1, 4, 128, 128, device=dev, dtype=dt)
        profile("sdxl_vae_decode_1024", lambda: v.decode(z).sample)
    if "sd35" in parts:
        m = peer.sd35_transformer()
        x = torch.randn(2, 16, 128, 128, device=dev, dtype=dt)
        ctx = torch.randn(2, 333, 4096, device=dev, dtype=dt)
        pooled = torch.randn(2, 2048, device=dev, dtype=dt)
        t = torch.tensor([500.0, 500.0], device=dev)
        profile("sd35_large_1024_b2",
                lambda: m(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample)
        del m
        torch.cuda.empty_cache()
    if os.environ.get("OUT"):
        json.dump(RESULT, open(os.path.join(os.environ["OUT"], "peer_profile.json"), "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1:] or ["unet", "vae"])
