//! The fast CUDA paths of the kernel seam (`sdgen_models::ops`) against the stock path on the
//! same GPU and against an f32 CPU reference, at the real models' shapes (SD 1.5's and SDXL's
//! channel counts, resolutions and head dims 40/64/80/128/512; the tiny test models never reach
//! them; SD 3.5's MMDiT widths 2432/1536 over 4096 + 333 tokens for its adaptive norms and packed
//! QK-norm heads). A CUDA build only: run on the GPU machine with one test thread (the tests flip the
//! process-wide fast-kernel switch):
//!
//! `cargo test -p sdgen-models --features cudnn --release --test gpu_ops -- --test-threads=1`
//! (and again with `SDGEN_ATTENTION=cublas` for the half-precision attention's cuBLAS path).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use sdgen_models::ops::attention::{attention_with, pack_heads, AttentionOptions};
use sdgen_models::ops::conv::Conv2d;
use sdgen_models::ops::linear::Linear;
use sdgen_models::ops::norm::{gated_add, GroupNorm, LayerNorm, RmsNorm};
use sdgen_models::ops::{geglu, gelu_in_place, set_fast_kernels};

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

/// `‖a − b‖ / ‖b‖`, in f32 on `b`'s device.
fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(b.device())?.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    let num = (a - &b)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let den = b.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok((num / den.max(1e-30)).sqrt())
}

/// Normal values rounded to `dtype`, on the GPU.
fn randn(shape: &[usize], dtype: DType, dev: &Device) -> Result<Tensor> {
    Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(dtype)
}

/// The same values in f32 on the CPU (the reference's inputs).
fn cpu32(t: &Tensor) -> Result<Tensor> {
    t.to_device(&Device::Cpu)?.to_dtype(DType::F32)
}

/// Runs `f` with the fast kernels on and off: `(fast, stock)`.
fn both<T>(mut f: impl FnMut() -> Result<T>) -> Result<(T, T)> {
    set_fast_kernels(true);
    let fast = f()?;
    set_fast_kernels(false);
    let stock = f();
    set_fast_kernels(true);
    Ok((fast, stock?))
}

/// The largest error the fast path may have against the f32 reference: as small as the stock
/// path's (plus a margin for a different but equally valid summation order), and within what the
/// dtype's rounding allows.
fn check(what: &str, dtype: DType, fast_err: f64, stock_err: f64) {
    let bound = match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 4e-3,
        _ => 2e-2,
    };
    println!("{what} {dtype:?}: fast {fast_err:.3e}, stock {stock_err:.3e}");
    assert!(fast_err.is_finite() && fast_err <= bound, "{what} {dtype:?}: fast path error {fast_err:e} > {bound:e}");
    assert!(
        fast_err <= 1.5 * stock_err + bound / 20.0,
        "{what} {dtype:?}: fast path error {fast_err:e} well above the stock path's {stock_err:e}"
    );
}

fn vb(tensors: Vec<(&str, Tensor)>, dtype: DType, dev: &Device) -> VarBuilder<'static> {
    VarBuilder::from_tensors(tensors.into_iter().map(|(k, v)| (k.to_string(), v)).collect(), dtype, dev)
}

const DTYPES: [DType; 3] = [DType::BF16, DType::F16, DType::F32];

#[test]
fn group_norm_at_real_shapes() -> Result<()> {
    let dev = gpu();
    // (shape, groups, eps, with the per-channel add, silu)
    let cases: [(&[usize], usize, f64, bool, bool); 6] = [
        (&[2, 320, 128, 128], 32, 1e-5, false, true),   // SDXL level 1 ResNet norm1
        (&[2, 640, 64, 64], 32, 1e-5, true, true),      // norm2 with the time embedding folded in
        (&[2, 1280, 32, 32], 32, 1e-6, false, false),   // transformer norm
        (&[2, 320, 64, 64], 32, 1e-5, true, true),      // SD 1.5 at 512²
        (&[1, 512, 128, 128], 32, 1e-6, false, true),   // VAE decoder, 1024² image
        (&[1, 128, 1024, 1024], 32, 1e-6, false, true), // VAE decoder's last level
    ];
    for (shape, groups, eps, with_add, silu) in cases {
        let c = shape[1];
        for dtype in DTYPES {
            let w = (randn(&[c], dtype, &dev)? * 0.5)?.affine(1.0, 1.0)?.to_dtype(dtype)?;
            let b = (randn(&[c], dtype, &dev)? * 0.1)?.to_dtype(dtype)?;
            // An offset mean, so the statistics must be computed stably.
            let x = randn(shape, DType::F32, &dev)?.affine(2.0, 3.0)?.to_dtype(dtype)?;
            let add = if with_add { Some(randn(&[shape[0], c], dtype, &dev)?) } else { None };
            let norm =
                GroupNorm::new(groups, c, eps, vb(vec![("weight", w.clone()), ("bias", b.clone())], dtype, &dev))?;
            let (fast, stock) = both(|| norm.forward_with(&x, add.as_ref(), silu))?;
            assert_eq!(fast.dims(), shape);
            let cpu = Device::Cpu;
            let rnorm = GroupNorm::new(
                groups,
                c,
                eps,
                vb(vec![("weight", cpu32(&w)?), ("bias", cpu32(&b)?)], DType::F32, &cpu),
            )?;
            let xa = match &add {
                Some(a) => cpu32(&x.broadcast_add(&a.reshape((shape[0], c, 1, 1))?)?)?,
                None => cpu32(&x)?,
            };
            let reference = rnorm.forward_with(&xa, None, silu)?;
            let what = format!("group norm {shape:?} add {with_add} silu {silu}");
            check(&what, dtype, rel_l2(&fast, &reference)?, rel_l2(&stock, &reference)?);
        }
    }
    Ok(())
}

#[test]
fn convolutions_at_real_shapes() -> Result<()> {
    let dev = gpu();
    // (input shape, cout, kernel, padding, stride, pad right/bottom)
    type Case<'a> = (&'a [usize], usize, usize, usize, usize, bool);
    let cases: [Case; 7] = [
        (&[2, 4, 128, 128], 320, 3, 1, 1, false),   // SDXL conv_in
        (&[2, 320, 128, 128], 320, 3, 1, 1, false), // SDXL level-1 ResNet conv
        (&[2, 320, 128, 128], 320, 3, 1, 2, false), // UNet downsampler
        (&[2, 640, 64, 64], 1280, 1, 0, 1, false),  // 1×1 shortcut
        (&[2, 1280, 32, 32], 1280, 3, 1, 1, false), // SDXL level-3 ResNet conv
        (&[1, 256, 512, 512], 256, 3, 1, 1, false), // VAE decoder at 1024²
        (&[1, 128, 256, 256], 128, 3, 0, 2, true),  // VAE encoder downsampler
    ];
    for (shape, cout, k, padding, stride, pad_rb) in cases {
        let cin = shape[1];
        for dtype in DTYPES {
            let scale = 1.0 / ((cin * k * k) as f64).sqrt();
            let w = (randn(&[cout, cin, k, k], DType::F32, &dev)? * scale)?.to_dtype(dtype)?;
            let b = randn(&[cout], dtype, &dev)?;
            let x = randn(shape, dtype, &dev)?;
            let conv = Conv2d::load(
                cin,
                cout,
                k,
                padding,
                stride,
                pad_rb,
                vb(vec![("weight", w.clone()), ("bias", b.clone())], dtype, &dev),
            )?;
            let (fast, stock) = both(|| conv.forward(&x))?;
            assert_eq!(fast.dims(), stock.dims());
            let cpu = Device::Cpu;
            let rconv = Conv2d::load(
                cin,
                cout,
                k,
                padding,
                stride,
                pad_rb,
                vb(vec![("weight", cpu32(&w)?), ("bias", cpu32(&b)?)], DType::F32, &cpu),
            )?;
            let reference = rconv.forward(&cpu32(&x)?)?;
            let what = format!("conv {shape:?} → {cout}, {k}×{k} pad {padding} stride {stride}");
            check(&what, dtype, rel_l2(&fast, &reference)?, rel_l2(&stock, &reference)?);
        }
    }
    Ok(())
}

#[test]
fn attention_at_real_head_dims() -> Result<()> {
    let dev = gpu();
    // (batch, heads, q_len, kv_len, head dim, query rows per chunk)
    let cases: [(usize, usize, usize, usize, usize, Option<usize>); 9] = [
        (2, 10, 1000, 333, 64, None),        // partial query and key tiles
        (2, 8, 4096, 4096, 40, None),        // SD 1.5 self-attention at 512²
        (2, 8, 4096, 77, 40, None),          // SD 1.5 cross-attention
        (2, 10, 4096, 4096, 64, None),       // SDXL level 2
        (2, 20, 1024, 77, 64, None),         // SDXL level 3 cross-attention
        (2, 10, 4096, 4096, 64, Some(1000)), // sliced, with a shorter last chunk
        (2, 16, 1024, 1024, 80, None),
        (2, 8, 1024, 1024, 128, None),
        (1, 1, 4096, 4096, 512, None), // the VAE's single-head mid-block attention
    ];
    for (b, heads, q_len, kv_len, d, slice) in cases {
        for dtype in DTYPES {
            // Projections' outputs `[b, seq, heads·d]` split into heads as the models do (views).
            let q = sdgen_models::attention::split_heads(&randn(&[b, q_len, heads * d], dtype, &dev)?, heads)?;
            let k = sdgen_models::attention::split_heads(&randn(&[b, kv_len, heads * d], dtype, &dev)?, heads)?;
            let v = sdgen_models::attention::split_heads(&randn(&[b, kv_len, heads * d], dtype, &dev)?, heads)?;
            let scale = (d as f64).powf(-0.5);
            let opts = slice.map_or(AttentionOptions::FULL, AttentionOptions::sliced);
            let (fast, stock) = both(|| attention_with(&q, &k, &v, scale, None, opts))?;
            assert_eq!(fast.dims(), &[b, heads, q_len, d]);
            let merged = sdgen_models::attention::merge_heads(&fast)?;
            assert_eq!(merged.dims(), &[b, q_len, heads * d]);
            let reference = attention_with(&cpu32(&q)?, &cpu32(&k)?, &cpu32(&v)?, scale, None, AttentionOptions::FULL)?;
            let what = format!("attention b{b} h{heads} {q_len}×{kv_len} d{d} slice {slice:?}");
            check(&what, dtype, rel_l2(&fast, &reference)?, rel_l2(&stock, &reference)?);
        }
    }
    Ok(())
}

#[test]
fn geglu_at_real_shapes() -> Result<()> {
    let dev = gpu();
    for shape in [[2usize, 4096, 2 * 2560], [2, 1024, 2 * 5120], [2, 4096, 2 * 1280]] {
        for dtype in DTYPES {
            let x = randn(&shape, dtype, &dev)?;
            let (fast, stock) = both(|| geglu(&x))?;
            let reference = geglu(&cpu32(&x)?)?;
            check(&format!("geglu {shape:?}"), dtype, rel_l2(&fast, &reference)?, rel_l2(&stock, &reference)?);
        }
    }
    Ok(())
}

#[test]
fn linear_layers_at_real_shapes() -> Result<()> {
    let dev = gpu();
    // (input shape, outputs, bias)
    let cases: [(&[usize], usize, bool); 5] = [
        (&[2, 4096, 640], 640, true),   // SDXL level-2 attention output projection
        (&[2, 4096, 640], 5120, true),  // its GEGLU input projection
        (&[2, 77, 2048], 640, false),   // cross-attention key projection
        (&[2, 1024, 5120], 1280, true), // level-3 feed-forward output
        (&[2, 4096, 320], 320, true),   // SD 1.5 level 1
    ];
    for (shape, n, with_bias) in cases {
        let k = *shape.last().expect("a shape");
        for dtype in DTYPES {
            let w = (randn(&[n, k], DType::F32, &dev)? / (k as f64).sqrt())?.to_dtype(dtype)?;
            let b = if with_bias { Some(randn(&[n], dtype, &dev)?) } else { None };
            let x = randn(shape, dtype, &dev)?;
            let layer = Linear::new(w.clone(), b.clone());
            let (fast, stock) = both(|| layer.forward(&x))?;
            let reference = Linear::new(cpu32(&w)?, b.as_ref().map(cpu32).transpose()?).forward(&cpu32(&x)?)?;
            let what = format!("linear {shape:?} → {n} bias {with_bias}");
            check(&what, dtype, rel_l2(&fast, &reference)?, rel_l2(&stock, &reference)?);
        }
    }
    Ok(())
}

/// Linear layers with quantised weights (GGUF blocks, `--weights`) through candle's CUDA kernels
/// (MMQ/MMVQ: the activations quantised to 8-bit blocks) at SD 3.5's widths, against the f32 CPU
/// layer of the dequantised weight: within the activations' 8-bit blocks' error (measured on the
/// CPU kernels: 6–7e-3), in every activation dtype; and the dequantising path (the CPU's) within
/// the dtype's rounding.
#[test]
fn quantised_linears_at_real_shapes() -> Result<()> {
    use candle_core::quantized::{GgmlDType, QTensor};
    use sdgen_models::ops::linear::QuantisedPath;
    let dev = gpu();
    // (input shape, outputs, block types whose blocks fit the rows)
    let cases: [(&[usize], usize, &[GgmlDType]); 4] = [
        (&[2, 4096, 1536], 4608, &[GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4K, GgmlDType::Q5K]), // Medium q/k/v
        (&[2, 4096, 1536], 6144, &[GgmlDType::Q8_0, GgmlDType::Q4K]),                                  // Medium MLP up
        (&[2, 4096, 2432], 2432, &[GgmlDType::Q8_0, GgmlDType::Q4_0]), // Large attention out (rows of 2432)
        (&[2, 1, 2432], 14592, &[GgmlDType::Q8_0]),                    // Large adaLN (one row per image)
    ];
    for (shape, n, types) in cases {
        let k = *shape.last().expect("a shape");
        let w = (Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)? / (k as f64).sqrt())?;
        let b = Tensor::randn(0f32, 1.0, n, &Device::Cpu)?;
        for &ty in types {
            let q = QTensor::quantize(&w, ty)?;
            let dense = q.dequantize(&Device::Cpu)?;
            let on_gpu = QTensor::quantize_onto(&w, ty, &dev)?;
            for dtype in DTYPES {
                let layer = Linear::quantised(on_gpu_clone(&on_gpu, &dev)?, Some(b.to_device(&dev)?.to_dtype(dtype)?));
                let x = randn(shape, dtype, &dev)?;
                let reference = Linear::new(dense.clone(), Some(b.clone())).forward(&cpu32(&x)?)?;
                let what = format!("{ty:?} linear {shape:?} → {n} {dtype:?}");
                let kernel = rel_l2(&layer.forward_via(&x, QuantisedPath::Kernel)?, &reference)?;
                assert!(kernel < 1.5e-2, "{what} kernel: {kernel:e}");
                let dequantised = rel_l2(&layer.forward_via(&x, QuantisedPath::Dequantise)?, &reference)?;
                check(&format!("{what} dequantised"), dtype, dequantised, dequantised);
                // Each path's time (mean of 5 after one), for `ops::linear::quantised_path`.
                let time = |path| -> Result<f64> {
                    layer.forward_via(&x, path)?;
                    dev.synchronize()?;
                    let start = std::time::Instant::now();
                    for _ in 0..5 {
                        layer.forward_via(&x, path)?;
                    }
                    dev.synchronize()?;
                    Ok(start.elapsed().as_secs_f64() * 1e3 / 5.0)
                };
                let (tk, td) = (time(QuantisedPath::Kernel)?, time(QuantisedPath::Dequantise)?);
                println!("{what}: kernel {kernel:.2e} {tk:.2} ms, dequantised {dequantised:.2e} {td:.2} ms");
            }
        }
    }
    Ok(())
}

/// fp8 weights (E4M3 with a per-tensor scale, `ops::fp8`) at SD 3.5 Large's shapes: on CUDA
/// (candle's fp8 cast, then the scale in the compute dtype) the dequantised weight equals the
/// CPU's table bit for bit in every dtype, and the layer multiplies as a dense layer of it (each
/// dtype's own rounding, against the f32 CPU product).
#[test]
fn fp8_linears_at_real_shapes() -> Result<()> {
    use sdgen_models::ops::fp8::{self, Fp8Weight};
    let dev = gpu();
    let cases: [(&[usize], usize); 3] = [
        (&[2, 4096, 2432], 7296), // Large q/k/v (fused in the file: one scale)
        (&[2, 4096, 2432], 9728), // Large MLP up
        (&[2, 1, 2432], 14592),   // Large adaLN (one row per image)
    ];
    for (shape, n) in cases {
        let k = *shape.last().expect("a shape");
        let w = (Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)? / (k as f64).sqrt())?;
        let b = Tensor::randn(0f32, 1.0, n, &Device::Cpu)?;
        let (bytes, scale) = fp8::quantise(&w)?;
        let on_cpu = Fp8Weight::new(fp8::bytes_tensor(&bytes, &[n, k], &Device::Cpu)?, scale)?;
        let on_gpu = Fp8Weight::new(fp8::bytes_tensor(&bytes, &[n, k], &dev)?, scale)?;
        for dtype in DTYPES {
            let what = format!("fp8 linear {shape:?} → {n} {dtype:?}");
            let (g, c) =
                (on_gpu.dequantise(dtype)?.to_dtype(DType::F32)?, on_cpu.dequantise(dtype)?.to_dtype(DType::F32)?);
            let (g, c): (Vec<f32>, Vec<f32>) = (g.flatten_all()?.to_vec1()?, c.flatten_all()?.to_vec1()?);
            assert!(g.iter().zip(&c).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: dequantised weights differ");
            let layer = Linear::fp8(on_gpu.clone(), Some(b.to_device(&dev)?.to_dtype(dtype)?));
            let x = randn(shape, dtype, &dev)?;
            let reference = Linear::new(on_cpu.dequantise(DType::F32)?, Some(b.clone())).forward(&cpu32(&x)?)?;
            let err = rel_l2(&layer.forward(&x)?, &reference)?;
            check(&what, dtype, err, err);
        }
    }
    Ok(())
}

/// A second `QTensor` with the same blocks on `dev` (a layer owns its weight).
fn on_gpu_clone(q: &candle_core::quantized::QTensor, dev: &Device) -> Result<candle_core::quantized::QTensor> {
    let (rows, cols) = q.shape().dims2()?;
    sdgen_models::ops::quantised::qtensor(&q.data()?, q.dtype(), (rows, cols), dev)
}

/// The largest difference between `a` and `b` relative to the larger's magnitude, or to 1 where
/// both are smaller (a sum that cancels to near zero differs from its twin by the rounding of its
/// unit-sized operands, not of its own size), and the fraction of elements that differ.
fn ulp_diff(a: &Tensor, b: &Tensor) -> Result<(f64, f64)> {
    let a = a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let b = b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (mut worst, mut differing) = (0f64, 0usize);
    for (x, y) in a.iter().zip(&b) {
        if x != y {
            differing += 1;
            worst = worst.max(((x - y).abs() / x.abs().max(y.abs()).max(1.0)) as f64);
        }
    }
    Ok((worst, differing as f64 / a.len().max(1) as f64))
}

/// The fast path against the stock path on the same GPU: at most two rounding steps apart on a
/// few elements (the statistics' summation order differs, moving the normalised value by one
/// step, which the product and the sum after it may each round once more), none further.
fn check_close(what: &str, dtype: DType, fast: &Tensor, stock: &Tensor) -> Result<()> {
    let (worst, share) = ulp_diff(fast, stock)?;
    let step = match dtype {
        DType::BF16 => 1.0 / 128.0,
        DType::F16 => 1.0 / 1024.0,
        _ => 1e-5,
    };
    println!("{what} {dtype:?}: fast vs stock worst {worst:.2e} relative, {:.4}% of elements differ", 100.0 * share);
    assert!(worst <= 2.0 * step * 1.01, "{what} {dtype:?}: {worst:e} > two rounding steps of {step:e}");
    assert!(share <= 0.01, "{what} {dtype:?}: {share} of the elements differ");
    Ok(())
}

/// SD 3.5's adaptive layer norm (`LN(x)·(1 + scale) + shift`, the scale and shift chunks of one
/// modulation vector) and gated residual at Large's and Medium's widths over 4096 image tokens.
#[test]
fn adaptive_norms_at_real_shapes() -> Result<()> {
    let dev = gpu();
    for (tokens, width) in [(4096usize, 2432usize), (4096, 1536), (333, 2432)] {
        for dtype in DTYPES {
            let x = randn(&[2, tokens, width], dtype, &dev)?;
            let emb = (randn(&[2, 6 * width], dtype, &dev)? * 0.5)?;
            let c = emb.chunk(6, 1)?;
            let norm = LayerNorm::no_affine(width, 1e-6);
            let (fast, stock) = both(|| norm.forward_modulated(&x, &c[0], &c[1]))?;
            check_close(&format!("ln_modulate [2, {tokens}, {width}]"), dtype, &fast, &stock)?;
            let y = randn(&[2, tokens, width], dtype, &dev)?;
            let (fast, stock) = both(|| gated_add(&x, &c[2], &y))?;
            let (worst, _) = ulp_diff(&fast, &stock)?;
            assert_eq!(worst, 0.0, "gated_add [2, {tokens}, {width}] {dtype:?}: the same two roundings, bit for bit");
        }
    }
    Ok(())
}

/// Joint attention's heads packed with their QK RMS-norms: 4096 image and 333 context tokens,
/// 38 (Large) and 24 (Medium) heads of 64, straight from the projections.
#[test]
fn packed_heads_at_real_shapes() -> Result<()> {
    let dev = gpu();
    for heads in [38usize, 24] {
        let inner = heads * 64;
        for dtype in DTYPES {
            let image = randn(&[2, 4096, inner], dtype, &dev)?;
            let context = randn(&[2, 333, inner], dtype, &dev)?;
            let weight = |seed: f64| -> Result<RmsNorm> {
                let w = ((randn(&[64], DType::F32, &dev)? * 0.1)? + seed)?.to_dtype(dtype)?;
                RmsNorm::new(64, 1e-6, vb(vec![("weight", w)], dtype, &dev))
            };
            let (nq, nc) = (weight(1.0)?, weight(0.9)?);
            let (fast, stock) = both(|| pack_heads(&[(&image, Some(&nq)), (&context, Some(&nc))], heads))?;
            assert_eq!(fast.dims(), [2, 4096 + 333, heads, 64]);
            check_close(&format!("pack_heads QK-norm {heads} heads"), dtype, &fast, &stock)?;
            let (fast, stock) = both(|| pack_heads(&[(&image, None), (&context, None)], heads))?;
            let (worst, _) = ulp_diff(&fast, &stock)?;
            assert_eq!(worst, 0.0, "pack_heads without norms is a copy ({dtype:?})");
        }
    }
    Ok(())
}

/// `x: [b, c, h, w]` → channels-last `[b, h, w, c]`, and back.
fn to_last(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 2, 3, 1))?.contiguous()
}
fn to_first(x: &Tensor) -> Result<Tensor> {
    x.permute((0, 3, 1, 2))?.contiguous()
}

/// The channels-last paths (the `gnl_*` GroupNorm kernels, cuDNN's NHWC convolutions) at the VAE
/// decoder's real shapes, against the channels-first f32 result on the same GPU; "stock" here is
/// the channels-first half-precision path they replace (the tests above tie both to the CPU).
#[test]
fn channels_last_at_real_shapes() -> Result<()> {
    let dev = gpu();
    set_fast_kernels(true);
    // (shape [b, c, h, w], groups, with the per-channel add, silu)
    let norms: [(&[usize], usize, bool, bool); 5] = [
        (&[1, 512, 128, 128], 32, false, true),   // VAE mid block, 1024² image
        (&[1, 256, 1024, 1024], 32, false, true), // up_blocks.3's first resnet
        (&[1, 128, 1024, 1024], 32, false, false),
        (&[2, 320, 64, 64], 32, true, true), // a UNet-like norm with the time embedding folded in
        (&[1, 48, 8, 8], 16, false, true),   // 3 channels per group: vectors span groups
    ];
    for (shape, groups, with_add, silu) in norms {
        let c = shape[1];
        for dtype in DTYPES {
            let w = (randn(&[c], DType::F32, &dev)? * 0.5)?.affine(1.0, 1.0)?;
            let b = (randn(&[c], DType::F32, &dev)? * 0.1)?;
            let x = randn(shape, DType::F32, &dev)?.affine(2.0, 3.0)?.to_dtype(dtype)?;
            let add = if with_add { Some(randn(&[shape[0], c], dtype, &dev)?) } else { None };
            let load = |dt: DType| {
                let ws = vec![("weight", w.to_dtype(dt)?), ("bias", b.to_dtype(dt)?)];
                GroupNorm::new(groups, c, 1e-6, vb(ws, dt, &dev))
            };
            let norm = load(dtype)?;
            let last = norm.clone().into_channels_last();
            let fast = to_first(&last.forward_with(&to_last(&x)?, add.as_ref(), silu)?)?;
            let first = norm.forward_with(&x, add.as_ref(), silu)?;
            // The add in the storage dtype first, as the kernels do.
            let xa = match &add {
                Some(a) => x.broadcast_add(&a.reshape((shape[0], c, 1, 1))?)?,
                None => x.clone(),
            };
            let xa = xa.to_dtype(DType::F32)?;
            let reference = load(DType::F32)?.forward_with(&xa, None, silu)?;
            let what = format!("channels-last group norm {shape:?} add {with_add} silu {silu}");
            check(&what, dtype, rel_l2(&fast, &reference)?, rel_l2(&first, &reference)?);
        }
    }
    // (input [b, c, h, w], cout, kernel, padding, stride, pad right/bottom)
    type Case<'a> = (&'a [usize], usize, usize, usize, usize, bool);
    let convs: [Case; 8] = [
        (&[1, 4, 128, 128], 4, 1, 0, 1, false),       // post_quant_conv
        (&[1, 4, 128, 128], 512, 3, 1, 1, false),     // SDXL conv_in
        (&[1, 16, 128, 128], 512, 3, 1, 1, false),    // SD 3's conv_in
        (&[1, 512, 256, 256], 512, 3, 1, 1, false),   // up_blocks.1
        (&[1, 256, 1024, 1024], 256, 3, 1, 1, false), // up_blocks.2's upsampler conv
        (&[1, 256, 1024, 1024], 128, 1, 0, 1, false), // up_blocks.3's shortcut
        (&[1, 128, 1024, 1024], 3, 3, 1, 1, false),   // conv_out
        (&[1, 128, 256, 256], 128, 3, 0, 2, true),    // an encoder downsampler
    ];
    for (shape, cout, k, padding, stride, pad_rb) in convs {
        let cin = shape[1];
        for dtype in DTYPES {
            let scale = 1.0 / ((cin * k * k) as f64).sqrt();
            let w = (randn(&[cout, cin, k, k], DType::F32, &dev)? * scale)?;
            let b = randn(&[cout], DType::F32, &dev)?;
            let x = randn(shape, dtype, &dev)?;
            let load = |dt: DType| {
                let ws = vec![("weight", w.to_dtype(dt)?), ("bias", b.to_dtype(dt)?)];
                Conv2d::load(cin, cout, k, padding, stride, pad_rb, vb(ws, dt, &dev))
            };
            let conv = load(dtype)?;
            let first = conv.forward(&x)?;
            let fast = to_first(&conv.into_channels_last()?.forward(&to_last(&x)?)?)?;
            assert_eq!(fast.dims(), first.dims());
            let reference = load(DType::F32)?.forward(&x.to_dtype(DType::F32)?)?;
            let what = format!("channels-last conv {shape:?} → {cout}, {k}×{k} pad {padding} stride {stride}");
            check(&what, dtype, rel_l2(&fast, &reference)?, rel_l2(&first, &reference)?);
        }
    }
    Ok(())
}

/// The in-place tanh GELU (the MMDiT's MLP, SD 3.5 Large's hidden width at 1024² with CFG)
/// equals candle's `gelu` bit for bit in every dtype: it is candle's kernel, run over its own output.
#[test]
fn gelu_in_place_equals_gelu_at_real_shapes() -> Result<()> {
    let dev = gpu();
    for dtype in DTYPES {
        let x = (randn(&[2, 4429, 9728], dtype, &dev)? * 3.0)?;
        let want: Vec<f32> = x.gelu()?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let got: Vec<f32> = gelu_in_place(x.copy()?)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let same = want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
        println!("gelu in place {dtype:?}: bit-identical {same}");
        assert!(same, "{dtype:?}: in-place GELU differs from gelu");
    }
    Ok(())
}
