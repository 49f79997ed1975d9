# Sourced by the GPU scripts: the library path our CUDA binaries need on the GPU machine — CUDA
# 13.0's runtime libraries (cuBLAS, NVRTC, cuRAND) and cuDNN 9, which the machine has as torch's
# `nvidia-cudnn-cu13` wheel.
CUDNN_LIB=$(python3 -c 'import nvidia.cudnn, os; print(os.path.join(list(nvidia.cudnn.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib${CUDNN_LIB:+:$CUDNN_LIB}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

# unpack NAME...: the carried build $CARRY/NAME.xz (.carry by default) as /tmp/NAME (executable),
# unless /tmp/NAME is newer (a warm machine keeps it; a build carried since replaces it); a NAME not
# carried is skipped. Written beside and renamed, so an interrupted unpack leaves nothing to keep.
unpack() {
  local b from=${CARRY:-.carry}
  for b in "$@"; do
    [ -f "$from/$b.xz" ] && [ ! "/tmp/$b" -nt "$from/$b.xz" ] || continue
    xz -dc "$from/$b.xz" > "/tmp/$b.part" && chmod +x "/tmp/$b.part" && mv "/tmp/$b.part" "/tmp/$b" || return 1
  done
}
