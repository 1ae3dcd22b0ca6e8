"""The benchmark loop: every model at every resolution, timed in interleaved rounds in one process.

Interleaving (round r times model A, then B, then C, then round r + 1 ...) exposes all models to the same
machine conditions, so their ratios stay meaningful on a busy or thermally throttled machine even when the
absolute numbers move.
"""
import dataclasses
import math
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import HatNetError
from ..models.runtime import flush_denormals, keep_compiled_kernels
from .measure import page_faults, peak_memory_mb, timed
from .runtimes import RunSettings, make_runner

# the ablation: the same backbone with every stage's H-MHSA replaced by plain global self-attention
GLOBAL_SUFFIX = '-global'
DEFAULT_MODELS = ('hat_net_tiny', 'hat_net_small', 'pvt_v2_b1', 'pvt_v2_b2', 'swin_tiny_patch4_window7_224',
                  'convnext_tiny', 'resnet50', 'hat_net_tiny' + GLOBAL_SUFFIX)
DEFAULT_RESOLUTIONS = ((224, 224), (320, 320), (448, 448), (480, 640), (640, 640), (800, 800), (1024, 1024))
BATCH_REFERENCE_PIXELS = 224 * 224
# untimed interleaved rounds before the timed ones, until one adds fewer new pages than this per call
SETTLE_MAX_ROUNDS = 4
SETTLED_FAULTS_PER_CALL = 2048  # 8 MiB of 4 KiB pages


@dataclass
class BenchConfig:
    models: Sequence[str] = DEFAULT_MODELS
    resolutions: Sequence[Tuple[int, int]] = DEFAULT_RESOLUTIONS
    runtimes: Sequence[str] = ('eager',)
    settings: RunSettings = field(default_factory=lambda: RunSettings(torch.device('cpu')))
    # every model runs in each dtype x mode (default: settings.dtype, settings.mode); onnxruntime: fp32 inference
    dtypes: Sequence[str] = ()
    modes: Sequence[str] = ()
    features: bool = False  # time the backbones as dense-task feature extractors (features_only, strides 4-32)
    batch_size: int = 16
    scale_batch: bool = True  # keep batch x pixels constant: batch_size at 224 x 224, fewer images when larger
    rounds: int = 5
    warmup: int = 1
    latency: bool = True
    max_forward_seconds: float = 60.  # a model slower than this per batch is not run at larger sizes
    # the model the ratios refer to, in the same runtime, dtype and mode (or one row's full label, e.g.
    # "pvt_v2_b1 (onnxruntime)", for ratios across settings); the first model by default
    baseline: Optional[str] = None


@dataclass
class BenchRow:
    model: str
    runtime: str
    height: int
    width: int
    batch: int
    dtype: str = 'fp32'
    mode: str = 'infer'
    status: str = 'ok'
    img_per_s: float = math.nan
    latency_ms: float = math.nan
    peak_memory_mb: float = math.nan
    gmacs: float = math.nan
    params_m: float = math.nan
    max_abs_diff: float = math.nan  # of the output against eager fp32 (bf16, compile, onnxruntime, channels_last)
    compile_s: float = math.nan  # torch.compile: seconds of the first call, which compiles (not part of img/s)
    page_faults: float = math.nan  # minor page faults per timed batch call (median): the heap still growing
    ratio: float = math.nan  # img/s relative to the baseline at the same size

    @property
    def label(self) -> str:
        return row_label(self.model, self.runtime, self.dtype, self.mode)

    @property
    def setting(self) -> Tuple[str, str, str]:
        return self.runtime, self.dtype, self.mode

    @property
    def pixels(self) -> int:
        return self.height * self.width


def row_label(model: str, runtime: str, dtype: str = 'fp32', mode: str = 'infer') -> str:
    """'hat_net_tiny', 'hat_net_tiny (onnxruntime)', 'hat_net_tiny (bf16, train)': what differs from eager fp32
    inference."""
    tags = [tag for tag, default in ((runtime, 'eager'), (dtype, 'fp32'), (mode, 'infer')) if tag != default]
    return f'{model} ({", ".join(tags)})' if tags else model


def parse_resolution(text: str) -> Tuple[int, int]:
    """'512' -> (512, 512); '480x640' -> (480, 640) (height x width)."""
    parts = text.lower().replace('×', 'x').split('x')
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 32:
        raise HatNetError(f'bad resolution {text!r}: use SIDE or HEIGHTxWIDTH, at least 32 pixels, e.g. 224 or 480x640')
    return size


def parse_pair(text: str, models: Sequence[str]) -> Tuple[str, str]:
    """'hat_net_tiny/pvt_v2_b1' -> ('hat_net_tiny', 'pvt_v2_b1'), both among the benchmarked ``models``."""
    pair = tuple(part.strip() for part in text.split('/'))
    if len(pair) != 2 or not all(part in models for part in pair):
        raise HatNetError(f'bad pair {text!r}: use MODEL/PEER with two of the benchmarked models '
                          f'({", ".join(models)})')
    return pair


def batch_for(config: BenchConfig, height: int, width: int) -> int:
    if not config.scale_batch:
        return config.batch_size
    return max(1, round(config.batch_size * BATCH_REFERENCE_PIXELS / (height * width)))


def timm_name(spec: str) -> str:
    """The timm model of a benchmark name (a timm name, or a hat_net name + '-global'); one HatNetError for a
    name timm does not know."""
    import timm

    name = spec[:-len(GLOBAL_SUFFIX)] if spec.endswith(GLOBAL_SUFFIX) else spec
    if name != spec and not name.startswith('hat_net'):
        raise HatNetError(f'{spec}: the {GLOBAL_SUFFIX} ablation exists for hat_net models only')
    if not timm.is_model(name):
        raise HatNetError(f'unknown model {name!r}: use hat_net_tiny, hat_net_small, ... or any timm model name')
    return name


def build_model(spec: str, img_size: Optional[Tuple[int, int]] = None, features: bool = False) -> torch.nn.Module:
    """A timm model in eval mode from a benchmark name: a timm name, or a hat_net name + '-global';
    ``features``: the backbone of a dense task (``features_only``, strides 4-32)."""
    from ..models.factory import create

    name, kwargs = timm_name(spec), {}
    if name != spec:
        kwargs['grid_sizes'] = (1, 1, 1, 1)  # grid size 1 = plain multi-head self-attention over the whole map
    if img_size is not None:
        kwargs['img_size'] = img_size
    if features:
        kwargs['features_only'] = True
    return create(name, **kwargs).eval()


def _is_fixed_size(spec: str) -> bool:
    import timm
    pretrained_cfg = timm.get_pretrained_cfg(timm_name(spec))
    return bool(pretrained_cfg is not None and pretrained_cfg.to_dict().get('fixed_input_size', False))


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or 'out of memory' in str(error).lower() \
        or 'failed to allocate' in str(error).lower()


def _max_abs_diff(output, reference) -> float:
    """Largest difference of an output (a tensor, or a backbone's list of feature maps) to its reference."""
    if isinstance(output, torch.Tensor):
        output, reference = [output], [reference]
    return max((o.float().cpu() - r.float().cpu()).abs().max().item() for o, r in zip(output, reference))


class _Candidate:
    """One model under one runtime, dtype and mode; builds its runner lazily (per size for fixed-size models like
    swin)."""

    def __init__(self, spec: str, runtime: str, settings: RunSettings, config: BenchConfig, workdir: Path):
        self.spec, self.runtime, self.settings, self.config, self.workdir = spec, runtime, settings, config, workdir
        self.label = row_label(spec, runtime, settings.dtype, settings.mode)
        self.fixed_size = _is_fixed_size(spec)
        self.stopped: Optional[str] = None  # status for this size and every larger one
        self._model: Optional[torch.nn.Module] = None
        self._runner: Optional[Callable] = None
        self._size: Optional[Tuple[int, int]] = None

    def prepare(self, size: Tuple[int, int]) -> Tuple[torch.nn.Module, Callable]:
        if self._runner is None or (self.fixed_size and size != self._size):
            self._model = build_model(self.spec, size if self.fixed_size else None, self.config.features)
            self._runner = make_runner(self._model, self.runtime, self.settings, self.workdir)
            self._size = size
        return self._model, self._runner


def _candidates(config: BenchConfig, workdir: Path) -> List[_Candidate]:
    """Every model under every runtime x dtype x mode it supports, models innermost (so a table lists the
    models of one setting together); onnxruntime runs fp32 inference only."""
    settings = config.settings
    candidates = []
    for mode in config.modes or (settings.mode,):
        for dtype in config.dtypes or (settings.dtype,):
            for runtime in config.runtimes:
                if runtime == 'onnxruntime' and (dtype != 'fp32' or mode != 'infer'):
                    continue
                run_settings = dataclasses.replace(settings, dtype=dtype, mode=mode)
                candidates += [_Candidate(spec, runtime, run_settings, config, workdir) for spec in config.models]
    return candidates


def _baseline_of(row: BenchRow, rows: Sequence[BenchRow], baseline: str) -> Optional[BenchRow]:
    """The row ``row``'s ratio refers to: ``baseline`` as a full label, else that model in the same setting."""
    same_size = [other for other in rows if (other.height, other.width) == (row.height, row.width)]
    for other in same_size:
        if other.model == baseline and other.setting == row.setting:
            return other
    return next((other for other in same_size if other.label == baseline), None)


def settle_heap(calls: Sequence[Callable[[], object]]) -> int:
    """Untimed rounds of ``calls``, interleaved as the timed ones, until a round adds fewer new pages than
    SETTLED_FAULTS_PER_CALL per call (at most SETTLE_MAX_ROUNDS); returns the rounds run.

    Each row's own warm-up leaves the heap fitted to that row alone; once the others have run, the persistent
    blocks they allocated in between (weights, optimizer state) split the free memory, and a row with a large
    working set grows the heap again, page-faulting new memory in, for several rounds (hat_net_small's fp32
    training step beside three other training rows: 386 000 faults and 8.9 s instead of 2.9 s in the first
    round, on a virtual machine where a fault cost 22-25 us). A row run alone, as in a user's training, never
    sees that state.
    """
    for rounds in range(1, SETTLE_MAX_ROUNDS + 1):
        before = page_faults()
        for call in calls:
            call()
        if page_faults() - before < SETTLED_FAULTS_PER_CALL * len(calls):
            break
    return rounds


def run_bench(config: BenchConfig, progress: Callable[[str], None] = lambda message: None) -> List[BenchRow]:
    """Measure every model x runtime x dtype x mode at every resolution (smallest first); return one row each."""
    from ..complexity import count_macs

    for spec in config.models:  # every name, before anything is measured
        timm_name(spec)
    # the rows' kernels together outgrow oneDNN's default cache: without this, every round would recompile them
    keep_compiled_kernels()
    flush_denormals()  # as the trainer does: training rows must not time microcode assists on subnormal values
    settings = config.settings
    if settings.threads:
        torch.set_num_threads(settings.threads)
    workdir = Path(tempfile.mkdtemp(prefix='hatnet-bench-'))
    candidates = _candidates(config, workdir)
    baseline = config.baseline or config.models[0]
    if baseline not in set(config.models) | {c.label for c in candidates}:
        shutil.rmtree(workdir, ignore_errors=True)
        raise HatNetError(f'baseline {baseline!r} is not one of the benchmarked models '
                          f'(or a row label such as "hat_net_tiny (onnxruntime)")')
    macs_cache: Dict[Tuple[str, Tuple[int, int]], float] = {}
    rows: List[BenchRow] = []
    generator = torch.Generator().manual_seed(0)

    try:
        for size in sorted(config.resolutions, key=lambda s: s[0] * s[1]):
            batch = batch_for(config, *size)
            images = torch.randn(batch, 3, *size, generator=generator).to(settings.device)
            single = images[:1].clone()
            measured = []
            for cand in candidates:
                mode = cand.settings.mode
                row = BenchRow(cand.spec, cand.runtime, *size, batch, cand.settings.dtype, mode)
                rows.append(row)
                if cand.stopped:
                    row.status = cand.stopped
                    continue
                progress(f'{row.label} at {size[0]}x{size[1]}: warm-up')
                try:
                    model, run = cand.prepare(size)
                    # peak memory of the first call: onnxruntime's arena keeps its blocks afterwards (torch.compile
                    # compiles in its first call, so it is measured after the warm-up)
                    if cand.runtime == 'compile':
                        # the first call compiles: its minutes are reported, not judged as the model's speed
                        row.compile_s = timed(lambda: run(images), settings.device)
                    else:
                        row.peak_memory_mb = peak_memory_mb(lambda: run(images), settings.device)
                    for _ in range(config.warmup):
                        seconds = timed(lambda: run(images), settings.device)
                    if seconds > config.max_forward_seconds:
                        row.status = cand.stopped = f'too slow (> {config.max_forward_seconds:g} s per batch)'
                        continue
                    if cand.runtime == 'compile':
                        row.peak_memory_mb = peak_memory_mb(lambda: run(images), settings.device)
                    if mode == 'infer':
                        output = run(single)  # also the warm-up of batch-1 calls
                        if cand.runtime != 'eager' or cand.settings.dtype != 'fp32' or settings.channels_last:
                            with torch.inference_mode():
                                reference = model.float()(single.float().contiguous())
                            row.max_abs_diff = _max_abs_diff(output, reference)
                    row.params_m = sum(p.numel() for p in model.parameters()) / 1e6
                except (RuntimeError, MemoryError, HatNetError) as e:
                    if _is_out_of_memory(e):
                        row.status = cand.stopped = 'out of memory'
                    elif cand.fixed_size:
                        row.status = f'unsupported size ({type(e).__name__})'
                    else:
                        row.status = cand.stopped = f'failed: {str(e).splitlines()[0][:120]}'
                    continue
                key = (cand.spec, size)
                if key not in macs_cache:
                    try:
                        macs_cache[key] = count_macs(model, (3, *size))['total'] / 1e9
                    except Exception:  # a forward that cannot run on meta tensors: the column stays empty
                        macs_cache[key] = math.nan
                row.gmacs = macs_cache[key]
                measured.append((cand, run, row, [], [], []))

            progress(f'{size[0]}x{size[1]}: untimed rounds until the heap stops growing')
            settled_after = settle_heap([partial(run, images) for _, run, *_ in measured])
            progress(f'{size[0]}x{size[1]}: {settled_after} untimed round(s)')
            for r in range(config.rounds):
                progress(f'{size[0]}x{size[1]}: round {r + 1}/{config.rounds}')
                for cand, run, row, batch_times, single_times, faults in measured:
                    faults_before = page_faults()
                    batch_times.append(timed(lambda: run(images), settings.device))
                    faults.append(page_faults() - faults_before)
                    if config.latency and cand.settings.mode == 'infer':
                        single_times.append(timed(lambda: run(single), settings.device))
            for cand, run, row, batch_times, single_times, faults in measured:
                row.img_per_s = batch / statistics.median(batch_times)
                row.page_faults = statistics.median(faults)
                if single_times:
                    row.latency_ms = 1000 * statistics.median(single_times)

    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # exported ONNX files

    for r in rows:
        base = _baseline_of(r, rows, baseline)
        r.ratio = r.img_per_s / base.img_per_s if base is not None else math.nan
    return rows
