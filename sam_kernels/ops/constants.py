"""Numeric constants every backend shares; csrc/common.h and csrc/guard_math.h hold the C++ twins
(kNormEps, kClipEps), and the kernel tests compare the backends against ops/reference.py, so a drift fails."""

NORM_EPS = 1e-12  # ../shared/ALGORITHMS.md: the eps guarding every division by a norm
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s guard of max_norm / (norm + eps)
