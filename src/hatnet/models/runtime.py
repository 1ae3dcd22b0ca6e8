"""HAT-Net's CPU inference form: every block's MLP runs on cache-sized slices of the batch.

Each block's MLP (``InvertedResidual``) expands the map 4-8x (hat_net_tiny's first stage: 384 x 56 x 56
floats, 4.6 MiB per image) and passes over that hidden map four times (expand, SiLU, depth-wise, SiLU).
Run on slices of the batch whose hidden map is at most ``SLICE_BYTES``, those passes hit the cache instead
of memory: hat_net_tiny and small at batch 16, 224 x 224 gained about 1.4x in throughput on an AMD Zen 4
(32 MiB L3), and neither gain nor loss on an Intel Ice Lake (48 MiB L3) or an AMD Zen 5 (32 MiB L3). Every
operation of the MLP is per image, so the output is the whole batch's. With grad mode off, in float32 and
under CPU bf16 autocast, the two SiLUs also run inside the convolutions before them (oneDNN's fused
epilogue), which saves two passes over the hidden map; PyTorch's separate bf16 SiLU pass is also
compute-bound (~10 % of hat_net_tiny's bf16 inference).

``optimize_for_cpu(model)`` switches a model to this form in place. It is always safe to apply: the sliced
MLP runs the whole batch in training, on other devices, and under torch.compile and tracing (their graphs
must not depend on the batch size); timm's torch.fx tracer keeps it as one call, other torch.fx tracers
get the whole-batch MLP, and torch.jit.script puts the plain whole-batch MLP back in its place. The ONNX
export writes the same slicing as a loop over the batch with its own budget (``hatnet.export.hat_net_onnx``),
using the same ``images_per_slice`` rule.

The process-wide part: ``keep_freed_memory()`` makes glibc keep the memory of freed large activations for
the next step instead of returning it to the OS (the trainer and ``hatnet bench`` call it on CPU),
``flush_denormals()`` makes the CPU treat subnormal floats as zero (the ``hatnet`` command, the trainer and
``hatnet bench``), and
``keep_compiled_kernels()`` lets oneDNN keep the compiled kernels of many models at once (``hatnet bench``).

Mixed precision, for training and inference alike: ``amp_autocast(amp, device)`` is the autocast context of an
``amp`` setting ('none', 'bf16' or 'fp16'), ``check_amp`` rejects other values.
"""
import copy
import ctypes
import os
import platform
from contextlib import nullcontext
from functools import partial

import torch
from timm.layers import register_notrace_module
from torch import nn

from ..errors import HatNetError
from .hat_net import InvertedResidual, _cpu_autocast_on

__all__ = ['AMP_DTYPES', 'EMULATED_BF16_NOTE', 'IS_X86', 'SLICE_BYTES', 'SlicedInvertedResidual', 'amp_autocast',
           'check_amp', 'cpu_emulates_bf16', 'flush_denormals', 'images_per_slice', 'keep_compiled_kernels',
           'keep_freed_memory', 'optimize_for_cpu']

# best budget on an AMD Zen 4; on an Intel Ice Lake and an AMD Zen 5 any budget is the same (docs/performance.md)
SLICE_BYTES = 16 << 20
IS_X86 = platform.machine().lower() in ('x86_64', 'amd64')


def images_per_slice(x: torch.Tensor, hidden_channels: int, value_bytes: int, slice_bytes: int) -> int:
    """How many images of ``x`` fit ``slice_bytes`` with their (hidden_channels, H, W) hidden map (at least one)."""
    return max(1, slice_bytes // (x.shape[2] * x.shape[3] * hidden_channels * value_bytes))


# oneDNN convolution with a fused element-wise epilogue (what inductor's CPU backend calls)
_HAS_FUSED_CONV = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_convolution_pointwise')
# its bf16 form needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT on x86: an AVX2-only CPU refuses it with an error
_HAS_FUSED_BF16_CONV = _HAS_FUSED_CONV and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _conv_silu(x: torch.Tensor, weight: torch.Tensor, padding: int, groups: int) -> torch.Tensor:
    """SiLU(conv2d(x, weight)) (stride 1, no bias) in one oneDNN call."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, None, [padding, padding], [1, 1], [1, 1], groups, 'swish', [], '')


@register_notrace_module  # the number of slices depends on tensor sizes: timm's fx tracer keeps one call
class SlicedInvertedResidual(InvertedResidual):
    """``InvertedResidual`` that runs eager CPU inference on slices of at most ``slice_bytes`` hidden map."""
    slice_bytes: int = SLICE_BYTES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # training keeps every hidden map for autograd anyway, traced / compiled graphs must not depend on
        # the batch size, and other devices do not share this cache effect
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            # torch.fx tracers other than timm's (e.g. torchvision's create_feature_extractor) trace into the
            # module: they get the whole-batch MLP, whose graph does not depend on sizes
            return super().forward(x)
        if self.training or x.device.type != 'cpu' or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return super().forward(x)
        autocast = _cpu_autocast_on(x)
        dtype = torch.get_autocast_dtype('cpu') if autocast else x.dtype  # what the MLP computes in
        mlp = partial(self._fused_forward, dtype=dtype) if self._can_fuse(dtype, autocast) else super().forward
        n = images_per_slice(x, self.fc1.out_channels, dtype.itemsize, self.slice_bytes)
        if n >= len(x):
            return mlp(x)
        return torch.cat([mlp(part) for part in x.split(n)])

    def _can_fuse(self, dtype: torch.dtype, autocast: bool) -> bool:
        """A fused form oneDNN has on this CPU (float32, or bf16 under autocast where it has bf16 convolutions);
        grad mode off (the fused operator has no backward: autograd would drop the input's gradient silently);
        no hooks on fc1 or conv_dw (their calls are skipped)."""
        dtype_ok = (dtype == torch.bfloat16 and _HAS_FUSED_BF16_CONV) if autocast else dtype == torch.float32
        hooked = any(m._forward_hooks or m._forward_pre_hooks for m in (self.fc1, self.conv_dw))
        return _HAS_FUSED_CONV and dtype_ok and not torch.is_grad_enabled() and not hooked

    def _fused_forward(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The MLP with both SiLUs fused into the convolutions before them (float32, or bf16 under autocast).

        A separate SiLU is one more pass over the 4-8x expanded hidden map, twice per MLP, and PyTorch's bf16
        SiLU is compute-bound (slower than float32's); oneDNN applies it to each output block of the
        convolution while that block is in registers. Eval mode only (the dropouts are identities).
        """
        hidden = _conv_silu(self.norm(x).to(dtype), self.fc1.weight.to(dtype), 0, 1)
        dw = self.conv_dw
        hidden = _conv_silu(hidden, dw.weight.to(dtype), dw.kernel_size[0] // 2, dw.groups)
        return self.norm_out(self.fc2(hidden))

    def __prepare_scriptable__(self) -> nn.Module:
        # TorchScript cannot call a parent's forward: torch.jit.script puts this whole-batch copy (same
        # parameters) in the module's place, in the model too
        plain = copy.copy(self)
        plain.__class__ = InvertedResidual
        return plain


def optimize_for_cpu(model: nn.Module, slice_bytes: int = SLICE_BYTES) -> nn.Module:
    """Switch every HAT-Net MLP of ``model`` to its batch-sliced CPU inference form, in place; returns ``model``.

    Weights and state_dict are unchanged, outputs within float32 rounding (the fused SiLU rounds its exp
    differently, ~1e-6); models without HAT-Net MLPs are left as they are.
    ``slice_bytes``: the largest hidden map (bytes) one slice may hold.
    """
    for module in model.modules():
        if type(module) in (InvertedResidual, SlicedInvertedResidual):
            module.__class__ = SlicedInvertedResidual
            module.slice_bytes = slice_bytes
    return model


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (process-wide, Linux/glibc).

    By default glibc serves every block over 32 MiB with a fresh mmap and unmaps it on free, so each large
    activation (e.g. a 16 x 384 x 56 x 56 float map, 77 MiB) is zero-filled page by page by the kernel on
    every forward pass. This is the effect of LD_PRELOAD-ing jemalloc or tcmalloc, as CPU inference guides
    recommend. Returns False where it is not available.
    """
    try:
        libc = ctypes.CDLL('libc.so.6')
    except OSError:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_mmap_threshold = -1, -3
    # mmap only blocks of 1 GiB and more, and never trim the heap: the value is a C int, and -1 (SIZE_MAX inside
    # glibc) is the way to say "never"; ctypes cuts larger Python ints silently (2**62 would arrive as 0, which
    # trims on every free)
    return bool(libc.mallopt(m_mmap_threshold, 2 ** 30) and libc.mallopt(m_trim_threshold, -1))


def flush_denormals() -> bool:
    """Make the CPU treat subnormal floats (float32 below 1.2e-38) as zero, in inputs and results.

    An Intel core takes a microcode assist of about a hundred cycles for every operation on a subnormal value,
    and a few steps of training can produce them (activations or gradients that underflow): HAT-Net-Tiny's Mask
    R-CNN iteration at 1333 x 800 took 33-143 s instead of 13-14 s at some steps on an Intel Xeon with AMX
    (docs/detection.md). No model depends on values that small. Returns False where the CPU has no such mode.

    The mode belongs to each thread: it applies to the calling thread and to the threads started after it,
    not to PyTorch's worker threads already running (a parallel operator starts them). The ``hatnet`` command
    calls it before anything else; the trainer and the bench call it again for callers from Python, where it
    reaches every thread only if it comes before the first parallel operator.
    """
    return torch.set_flush_denormal(True)


def keep_compiled_kernels(capacity: int = 8192) -> None:
    """Let oneDNN keep up to ``capacity`` compiled kernels (primitives) instead of its default 1 024 (process-wide).

    One model at one input size needs fewer (hat_net_tiny: 427 for fp32 and bf16 training and inference), but
    a process that runs many in turn does not: ``hatnet bench`` times up to 20 model x dtype x mode rows in
    interleaved rounds, and past 1 024 oneDNN evicts the least recently used kernels and compiles them again
    on their next call (885 kernels in every round of the six-setting command of docs/performance.md), which
    the bench would time as the models' speed. oneDNN reads the setting
    (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) when it creates its first kernel, so this works only before any
    convolution has run in the process; a value already in the environment is kept.
    """
    os.environ.setdefault('ONEDNN_PRIMITIVE_CACHE_CAPACITY', str(capacity))


# what the trainer and the bench tell a user who asks for bf16 on such a CPU
EMULATED_BF16_NOTE = ('this CPU has no bf16 instructions (AVX-512-BF16, AMX): bf16 autocast runs in software there, '
                      'slower than float32 for every model (2-3x with AVX-512, 11-24x with AVX2 only; '
                      'docs/performance.md)')


def cpu_emulates_bf16() -> bool:
    """This x86 CPU has no bf16 instructions (AVX-512-BF16, AMX): bf16 autocast converts in software there and
    runs slower than float32 (HAT-Net-Tiny's training step 1.7x slower on an Intel Ice Lake, 12x on an AVX2-only
    AMD Zen 3, where oneDNN has no bf16 kernels at all; docs/performance.md)."""
    if not IS_X86:
        return False  # other architectures: no such check here
    return not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


# the autocast dtype of each ``amp`` setting besides 'none' (float32)
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def check_amp(amp: str) -> None:
    """Refuse an ``amp`` setting other than 'none', 'bf16' and 'fp16' (one HatNetError)."""
    if amp != 'none' and amp not in AMP_DTYPES:
        raise HatNetError(f"amp must be 'none', 'bf16' or 'fp16', got {amp!r}")


def amp_autocast(amp: str, device: torch.device):
    """The autocast context of ``amp`` on ``device``'s type ('none': a context that changes nothing)."""
    return nullcontext() if amp == 'none' else torch.autocast(device.type, dtype=AMP_DTYPES[amp])
