"""How fast host memory can be page-locked for block streaming on this machine (issue #15: a streamed
SD 3.5 Large load spends most of its 30 s pinning 15 GB). Through the driver API directly (ctypes on
libcuda), so nothing but the calls themselves is timed:

  - `alloc`: cuMemHostAlloc in pieces of several sizes (one per tensor, as today; one per block;
    1 GB arenas), each then written once (as a load fills it), and freed;
  - `register`: ordinary memory (mmap'd, written first), then cuMemHostRegister over it;
  - `threads`: the per-block allocation and fill from several threads at once;
  - `copy`: the host-to-device rate from registered memory in pieces of several sizes (a small
    tensor, a large one, a block), every piece followed by an event record as block streaming
    records one per upload: what one copy per tensor costs against one per block (the smallest
    pieces may be bound by this script's own enqueueing, a few µs a copy, rather than the link).

PIN_CASES (default "alloc,register,threads,copy") picks the cases.

  python3 pin_rate.py [TOTAL_GB]   # one JSON line per case: GB/s of allocate+fill, and of each
"""
import ctypes
import json
import mmap
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

cu = ctypes.CDLL("libcuda.so.1")
TOTAL = int(float(sys.argv[1] if len(sys.argv) > 1 else 4) * (1 << 30))


def check(rc, what):
    if rc != 0:
        raise RuntimeError(f"{what}: CUDA error {rc}")


check(cu.cuInit(0), "cuInit")
dev = ctypes.c_int()
check(cu.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
ctx = ctypes.c_void_p()
check(cu.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "retain")
check(cu.cuCtxSetCurrent(ctx), "set current")
memset = ctypes.memset


def alloc_fill(size):
    """One pinned piece allocated and written: (pointer, alloc s, fill s)."""
    cu.cuCtxSetCurrent(ctx)
    p = ctypes.c_void_p()
    t = time.perf_counter()
    check(cu.cuMemHostAlloc(ctypes.byref(p), ctypes.c_size_t(size), 0), "cuMemHostAlloc")
    a = time.perf_counter()
    memset(p, 1, size)
    return p, a - t, time.perf_counter() - a


def free_all(ptrs):
    t = time.perf_counter()
    for p in ptrs:
        cu.cuMemFreeHost(p)
    return time.perf_counter() - t


def report(case, piece, n, alloc_s, fill_s, free_s, wall_s):
    gb = piece * n / 1e9
    print(json.dumps({"case": case, "piece_mb": round(piece / 1e6, 2), "pieces": n, "gb": round(gb, 2),
                      "alloc_gb_s": round(gb / alloc_s, 2) if alloc_s else None,
                      "fill_gb_s": round(gb / fill_s, 2) if fill_s else None,
                      "free_s": round(free_s, 2), "wall_gb_s": round(gb / wall_s, 2)}), flush=True)


def serial(piece):
    n = max(1, TOTAL // piece)
    t = time.perf_counter()
    got = [alloc_fill(piece) for _ in range(n)]
    wall = time.perf_counter() - t
    report("alloc", piece, n, sum(g[1] for g in got), sum(g[2] for g in got), free_all([g[0] for g in got]), wall)


def threaded(piece, workers):
    n = max(1, TOTAL // piece)
    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        got = list(pool.map(lambda _: alloc_fill(piece), range(n)))
    wall = time.perf_counter() - t
    report(f"threads{workers}", piece, n, None, None, free_all([g[0] for g in got]), wall)


def registered(size):
    """An anonymous mapping of `size` bytes, written once, then registered: (mapping, buffer,
    seconds the registering took)."""
    m = mmap.mmap(-1, size)
    buf = (ctypes.c_char * size).from_buffer(m)
    memset(buf, 1, size)
    r = time.perf_counter()
    check(cu.cuMemHostRegister_v2(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), 0), "register")
    return m, buf, time.perf_counter() - r


def register(piece):
    n = max(1, TOTAL // piece)
    maps, reg = [], 0.0
    t = time.perf_counter()
    for _ in range(n):
        m, buf, took = registered(piece)
        reg += took
        maps.append((m, buf))
    wall = time.perf_counter() - t
    f = time.perf_counter()
    for m, buf in maps:
        cu.cuMemHostUnregister(ctypes.c_void_p(ctypes.addressof(buf)))
    free_s = time.perf_counter() - f
    report("register", piece, n, reg, None, free_s, wall)  # the mappings go with the process


def copy_rate(total=2 << 30):
    """Host-to-device copies of `total` bytes from one registered mapping, in pieces of each size
    (each followed by an event record), on one stream: GB/s per piece size, the second pass."""
    m, buf, _ = registered(total)
    host = ctypes.addressof(buf)
    dev, stream, event = ctypes.c_uint64(), ctypes.c_void_p(), ctypes.c_void_p()
    check(cu.cuMemAlloc_v2(ctypes.byref(dev), ctypes.c_size_t(total)), "cuMemAlloc")
    check(cu.cuStreamCreate(ctypes.byref(stream), 1), "cuStreamCreate")
    check(cu.cuEventCreate(ctypes.byref(event), 2), "cuEventCreate")  # CU_EVENT_DISABLE_TIMING
    for piece in (256 << 10, 1 << 20, 3 << 20, 8 << 20, 60 << 20, 400 << 20):
        n = total // piece
        for _ in range(2):
            t = time.perf_counter()
            for i in range(n):
                check(cu.cuMemcpyHtoDAsync_v2(ctypes.c_uint64(dev.value + i * piece), ctypes.c_void_p(host + i * piece),
                                              ctypes.c_size_t(piece), stream), "copy")
                cu.cuEventRecord(event, stream)
            check(cu.cuStreamSynchronize(stream), "sync")
            wall = time.perf_counter() - t
        print(json.dumps({"case": "copy", "piece_mb": round(piece / 1e6, 2), "pieces": n,
                          "gb_s": round(n * piece / 1e9 / wall, 2)}), flush=True)
    cu.cuMemFree_v2(dev)
    cu.cuMemHostUnregister(ctypes.c_void_p(host))


CASES = os.environ.get("PIN_CASES", "alloc,register,threads,copy").split(",")
if "copy" in CASES:
    copy_rate()
if "alloc" in CASES:
    for piece in (8 << 20, 400 << 20, 1 << 30):  # a tensor, a block, an arena
        serial(piece)
if "register" in CASES:
    register(400 << 20)
if "threads" in CASES:
    for w in (4, 16):
        threaded(400 << 20, w)
