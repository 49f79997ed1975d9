"""PyTorch's CPU kernels at the shapes `sdgen-bench --component ops` times (SD 1.5 at 512², CFG
batch): F.linear, F.conv2d and scaled_dot_product_attention, f32 and bf16, on the same thread
count; the median of ITERATIONS runs after WARMUP. Prints one JSON document with the same op
names, so the two compare line by line (tools/cpu/bench_cpu.sh does).
Usage: python3 peer_ops.py [THREADS] [ITERATIONS]   (torch installed)"""
import json, os, sys, time
import torch
import torch.nn.functional as F

threads = int(sys.argv[1]) if len(sys.argv) > 1 else os.cpu_count()
iterations = int(sys.argv[2]) if len(sys.argv) > 2 else 5
WARMUP = 2
torch.set_num_threads(threads)


def ops(dtype):
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape, std=1.0: (torch.randn(*shape, generator=g) * std).to(dtype)
    for tokens, k, n in [(8192, 320, 1280), (8192, 320, 320), (8192, 1280, 320), (8192, 320, 2560)]:
        w, b, x = randn(n, k, std=k ** -0.5), randn(n), randn(2, tokens // 2, k)
        yield f"linear {k}→{n} × {tokens} tokens", tokens * k * n, lambda w=w, b=b, x=x: F.linear(x, w, b)
    for b, c, o, size, k, stride in [(2, 320, 320, 64, 3, 1), (2, 640, 640, 32, 3, 1), (2, 1280, 1280, 16, 3, 1), (1, 512, 512, 64, 3, 1), (2, 320, 320, 64, 3, 2)]:
        w, bias, x = randn(o, c, k, k, std=(c * k * k) ** -0.5), randn(o), randn(b, c, size, size)
        out = (size + 2 * (k // 2) - k) // stride + 1
        yield (f"conv {c}→{o} {k}×{k}/{stride} at {size}² × {b}", b * o * out * out * c * k * k,
               lambda w=w, bias=bias, x=x, stride=stride, p=k // 2: F.conv2d(x, w, bias, stride, p))
    for b, heads, q_len, kv_len, d in [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (1, 1, 4096, 4096, 512)]:
        q, k_, v = randn(b, heads, q_len, d), randn(b, heads, kv_len, d), randn(b, heads, kv_len, d)
        yield (f"attention {b}×{heads} heads × {d}, {q_len}×{kv_len} tokens", 2 * b * heads * q_len * kv_len * d,
               lambda q=q, k_=k_, v=v: F.scaled_dot_product_attention(q, k_, v))


@torch.no_grad()
def main():
    result = {"torch": torch.__version__, "threads": threads}
    for dtype, name in [(torch.float32, "f32"), (torch.bfloat16, "bf16")]:
        rows = []
        for op, macs, fn in ops(dtype):
            times = []
            for i in range(WARMUP + iterations):
                t = time.perf_counter()
                fn()
                if i >= WARMUP:
                    times.append((time.perf_counter() - t) * 1e3)
            times.sort()
            median = times[len(times) // 2]
            rows.append({"op": op, "median_ms": round(median, 2), "gflops": round(2 * macs / median / 1e6, 1)})
        result[name] = rows
    print(json.dumps(result))


main()
