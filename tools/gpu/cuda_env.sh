# Sourced by the GPU scripts: the library path our CUDA binaries need on the GPU machine — CUDA
# 13.0's runtime libraries (cuBLAS, NVRTC, cuRAND) and cuDNN 9, which the machine has as torch's
# `nvidia-cudnn-cu13` wheel.
CUDNN_LIB=$(python3 -c 'import nvidia.cudnn, os; print(os.path.join(list(nvidia.cudnn.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib${CUDNN_LIB:+:$CUDNN_LIB}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
