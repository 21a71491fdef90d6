"""Benchmark step caching: sweep methods and thresholds against the uncached pipeline, on one pipeline and seed set.

The library behind ``cached-diffusers bench``::

    from cached_diffusers.tools.bench import default_sweep, plot_pareto, run_benchmark, write_json, write_markdown

    configs = default_sweep(pipe, num_steps=20)           # a few thresholds per method, conservative to aggressive
    result = run_benchmark(pipe, configs, prompts, {"num_inference_steps": 20, "negative_prompt": " "}, seed=0)
    write_json(result, "bench/results.json")
    print(write_markdown(result, "bench/results.md"))
    plot_pareto(result, "bench/pareto.png")

What is measured, per configuration (see :func:`run_benchmark`):

* wall time of the whole prompt set, median over ``repeats`` rounds; the uncached baseline runs in the same rounds
  (round-robin: baseline, then every config, then the next round), after one uncached warm-up call;
* the transformer work done: blocks run over blocks an uncached run would run (``CacheStats.block_fraction``; its
  inverse is the speedup the transformer alone would give), blocks and forward calls per step, and the reused steps
  per guidance branch;
* fidelity of each image against the uncached image of the same prompt and seed: PSNR (peak 255) and SSIM
  (scikit-image), mean and worst over prompts; LPIPS only when its weights are already on the machine (never
  downloaded), else ``None`` with a note.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import math
import os
import platform
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..configs import CacheConfig, resolve_cache_config
from ..policies import unsupported_reason
from ..registry import cache_methods
from . import files
from .imaging import psnr, require_extra, ssim, to_uint8
from .timing import make_generator, timed_call

__all__ = [
    "LPIPS_UNAVAILABLE_NOTE",
    "PSNR_THRESHOLD",
    "SSIM_THRESHOLD",
    "sweep_methods",
    "BenchEntry",
    "BenchResult",
    "config_params",
    "default_sweep",
    "environment",
    "format_markdown",
    "lpips_metric",
    "plot_pareto",
    "run_benchmark",
    "ssim",
    "sweep_label",
    "write_json",
    "write_markdown",
]

PSNR_THRESHOLD = 30.0
"""dB: the fidelity bar of the "best speedup" summary (mean PSNR over prompts against uncached)."""

SSIM_THRESHOLD = 0.9
"""The SSIM bar of the "best speedup" summary (mean SSIM over prompts against uncached)."""

LPIPS_UNAVAILABLE_NOTE = "LPIPS weights are not available offline on this machine"

SCHEMA = "cached-diffusers-bench/1"

# The sweep of each method (its knob, default values conservative to aggressive, published setting) is its module's
# `sweep` (cached_diffusers/methods/<method>.py); the curves are the registry's.


# -- the sweep -------------------------------------------------------------------------------------------------------
def sweep_label(config: CacheConfig) -> str:
    """The curve a config belongs to: its method, plus ``+scm`` with a step mask and ``+taylorseer`` with the
    TaylorSeer calibrator (``"dbcache+scm"``, ``"fbcache+taylorseer"``)."""
    label = config.method
    if getattr(config, "enable_taylorseer", False):
        label += "+taylorseer"
    if getattr(config, "scm_steps_mask", None) is not None:
        label += "+scm"
    return label


def _sweep_classes() -> list[type]:
    """The registered config classes with a default benchmark sweep, in listing order."""
    return [m.config_class for m in cache_methods(enabled=True) if m.sweep is not None and m.sweep.values]


def sweep_methods() -> tuple[str, ...]:
    """Labels :func:`default_sweep` knows, from the registry (each method's ``sweep_curves``); each is one curve of
    the Pareto plot."""
    return tuple(label for cls in _sweep_classes() for label in cls.sweep_curves())


def __getattr__(name: str) -> Any:
    if name == "SWEEP_METHODS":  # the registry's labels at the time of the lookup
        return sweep_methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _knob_name(config: CacheConfig) -> str | None:
    """The field a sweep varies for ``config``'s method (``None``: no sweep, or a planned schedule's budget)."""
    sweep = getattr(type(config), "sweep", None)
    return sweep.knob if sweep is not None and sweep.kind != "budget" else None


def check_methods(methods: Sequence[str] | None) -> tuple[str, ...]:
    known = sweep_methods()
    if methods is None:
        return known
    if isinstance(methods, str):
        methods = [methods]
    chosen = []
    for name in methods:
        for part in str(name).split(","):
            part = part.strip().lower()
            if not part:
                continue
            if part not in known:
                raise ValueError(f"unknown benchmark method {part!r}; valid: {', '.join(known)}")
            if part not in chosen:
                chosen.append(part)
    if not chosen:
        raise ValueError(f"no benchmark method chosen; valid: {', '.join(known)}")
    return tuple(chosen)


def default_sweep(
    pipe: Any = None,
    methods: Sequence[str] | None = None,
    num_steps: int | None = None,
    calibrated: Sequence[CacheConfig] = (),
) -> list[CacheConfig]:
    """A few configs per method, from conservative to aggressive: each registered method's ``sweep_curves`` (its
    knob over ``sweep.values``, see ``cached_diffusers/methods/<method>.py``), e.g. TeaCache's ``rel_l1_thresh``,
    DBCache ``F{n}B0`` with ``n = clamp(blocks // 6, 1, 8)`` and a warm-up of ``clamp(num_steps // 4, 1, 8)`` steps,
    and ``dbcache+scm``: that DBCache with each SCM preset, ``scm_steps_policy="static"`` and no warm-up.

    TeaCache and MagCache take the model's published coefficients / ratios; when ``pipe``'s current cache config
    carries its own (e.g. a calibrated ``cache_config.json`` loaded with the model), or one of ``calibrated`` does
    (the output of ``cached-diffusers calibrate``; the first of each method wins), those are used instead. A model
    with neither still gets the configs: :func:`run_benchmark` records them as skipped, with the reason.

    Args:
        pipe: a cached pipeline (optional): gives the block count and calibrated coefficients / ratios.
        methods: labels from :func:`sweep_methods` (a comma-separated string per item works too); default all.
        num_steps: the step count the sweep will run at (scales DBCache's warm-up); ``None``: cache-dit's 8.

    Raises:
        ValueError: for an unknown method label.
    """
    chosen = check_methods(methods)
    transformer = getattr(pipe, "transformer", None)
    num_blocks = getattr(transformer, "num_cache_blocks", None) if transformer is not None else None
    current = getattr(pipe, "cache_config", None) if pipe is not None else None
    sources = [c for c in (current, *calibrated) if c is not None and not getattr(c, "calibrate", False)]
    context: dict[str, Any] = {"num_blocks": num_blocks, "num_steps": num_steps}
    for source in sources:  # the first calibrated value of each kind wins
        for name, value in source.calibrated_data().items() if hasattr(source, "calibrated_data") else ():
            context.setdefault(name, value)
    sweeps: dict[str, list[CacheConfig]] = {}
    for cls in _sweep_classes():
        sweeps.update(cls.sweep_curves(**context))
    return [config for label in chosen for config in sweeps[label]]


def _format_value(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return f"[{len(value)} values]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def config_params(config: CacheConfig) -> str:
    """``"rel_l1_thresh=0.2"``: the swept parameter and every field that differs from the class defaults."""
    defaults = type(config)().to_dict() if _constructible(type(config)) else {}
    values = config.to_dict()
    knob = _knob_name(config) if getattr(config, "scm_steps_mask", None) is None else "scm_steps_mask"
    names = [knob] if knob in values else []
    names += [n for n in values if n not in ("method", knob) and values[n] != defaults.get(n, object())]
    return ", ".join(f"{n}={_format_value(values[n])}" for n in names)


def _constructible(cls: type) -> bool:
    try:
        cls()
    except (TypeError, ValueError):
        return False
    return True


def _knob(config: CacheConfig) -> str:
    """A short label of the swept value, for the plot."""
    mask = getattr(config, "scm_steps_mask", None)
    if isinstance(mask, str):
        return mask
    if mask is not None:
        return "mask"
    name = _knob_name(config)
    if name is None:
        return ""
    value = getattr(config, name)
    return f"i={value}" if name == "interval" else f"{value:g}"


# -- metrics ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _downloads_refused() -> Iterator[None]:
    """Make ``torch.hub`` raise instead of downloading (LPIPS's backbones load through it)."""
    import torch.hub

    def refuse(url: str, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"cached-diffusers bench never downloads LPIPS weights (refused {url})")

    original = torch.hub.download_url_to_file
    torch.hub.download_url_to_file = refuse
    try:
        yield
    finally:
        torch.hub.download_url_to_file = original


def _alexnet_checkpoint() -> str | None:
    """Path of torchvision's AlexNet ImageNet checkpoint in the torch hub cache, if it is there."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    import torch.hub
    from torchvision.models import AlexNet_Weights

    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(AlexNet_Weights.IMAGENET1K_V1.url))
    return path if os.path.isfile(path) else None


def lpips_metric() -> tuple[Callable[[np.ndarray, np.ndarray], float] | None, str]:
    """An LPIPS function ``(reference_uint8, test_uint8) -> distance`` if its weights are on this machine.

    LPIPS (Zhang et al., CVPR 2018) with the AlexNet backbone needs two sets of weights: the linear heads (shipped
    inside the ``lpips`` package, and inside ``torchmetrics``) and torchvision's ImageNet AlexNet, which both
    download on first use. This looks for the backbone in the torch hub cache and builds the metric only if it is
    there (downloads are refused while building); nothing is ever fetched.

    Returns:
        ``(fn, description)`` when available, else ``(None, why)``; ``why`` starts with
        :data:`LPIPS_UNAVAILABLE_NOTE`.
    """
    have_lpips = importlib.util.find_spec("lpips") is not None
    have_torchmetrics = importlib.util.find_spec("torchmetrics") is not None
    if not (have_lpips or have_torchmetrics):
        return None, f"{LPIPS_UNAVAILABLE_NOTE} (neither the lpips package nor torchmetrics is installed)"
    backbone = _alexnet_checkpoint()
    if backbone is None:
        return None, f"{LPIPS_UNAVAILABLE_NOTE} (torchvision's AlexNet checkpoint is not in the torch hub cache)"
    import torch

    def as_tensor(image: np.ndarray) -> torch.Tensor:  # uint8 HWC -> float NCHW in [-1, 1]
        return torch.from_numpy(to_uint8(image).astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]

    try:
        with _downloads_refused():
            if have_lpips:
                import lpips

                model = lpips.LPIPS(net="alex", verbose=False).eval()
                name = "lpips package, AlexNet"

                def fn(reference: np.ndarray, test: np.ndarray) -> float:
                    with torch.no_grad():
                        return float(model(as_tensor(reference), as_tensor(test)).mean())

            else:
                from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

                model = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=False).eval()
                name = "torchmetrics, AlexNet"

                def fn(reference: np.ndarray, test: np.ndarray) -> float:
                    with torch.no_grad():
                        return float(model(as_tensor(reference), as_tensor(test)))

    except Exception as error:  # a missing head, a refused download, an incompatible version
        return None, f"{LPIPS_UNAVAILABLE_NOTE} ({type(error).__name__}: {error})"
    return fn, f"LPIPS ({name}; backbone {backbone})"


# -- results ---------------------------------------------------------------------------------------------------------
def finite_mean(values: Sequence[float]) -> float:
    """The mean of the finite values (a PSNR of identical images is ``inf``); ``inf`` when none is finite."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("inf")


@dataclass
class BenchEntry:
    """One configuration's measurements over the prompt set.

    Attributes:
        label: the curve (:func:`sweep_label`); config: the config; params: :func:`config_params`.
        times_s: wall time of the whole prompt set, one per repeat; seconds: their median.
        speedup: the baseline's median over this config's median.
        block_fraction: transformer blocks run over the blocks an uncached run would run (all prompts).
        blocks_computed / uncached_blocks: those two block counts; num_steps: steps per generation.
        forward_calls: transformer forward calls over all prompts (guidance branches x steps x prompts).
        reused_steps: ``{branch: [reused steps, one per prompt]}``; computed_steps likewise.
        reuse_schedules: ``{branch: [[indices of the reused steps], one list per prompt]}``, the schedules that
            ``scripts/gpu_benchmark_qwenimage.py`` replays at full size.
        psnr / ssim / lpips: one value per prompt against the uncached image (LPIPS: ``None`` when unavailable).
    """

    label: str
    config: CacheConfig
    params: str
    times_s: list[float] = field(default_factory=list)
    seconds: float = float("nan")
    speedup: float = float("nan")
    block_fraction: float | None = None
    blocks_computed: int = 0
    uncached_blocks: int = 0
    num_steps: int | None = None
    forward_calls: int = 0
    reused_steps: dict[str, list[int]] = field(default_factory=dict)
    computed_steps: dict[str, list[int]] = field(default_factory=dict)
    reuse_schedules: dict[str, list[list[int]]] = field(default_factory=dict)
    psnr: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)
    lpips: list[float] | None = None

    @property
    def ideal_speedup(self) -> float | None:
        """``1 / block_fraction``: the speedup if the transformer blocks were all the time spent."""
        return 1.0 / self.block_fraction if self.block_fraction else None

    @property
    def timing_noise(self) -> bool:
        """Whether the measured speedup exceeds :attr:`ideal_speedup`: skipping blocks cannot save more than their
        time, so the excess is timing noise (a slow baseline round, another process on the cores)."""
        ideal = self.ideal_speedup
        return ideal is not None and math.isfinite(self.speedup) and self.speedup > ideal

    @property
    def psnr_mean(self) -> float:
        """Mean PSNR over the prompts whose image differs from uncached (``inf`` when none differs)."""
        return finite_mean(self.psnr)

    @property
    def psnr_min(self) -> float:
        return min(self.psnr) if self.psnr else float("nan")

    @property
    def ssim_mean(self) -> float:
        return float(np.mean(self.ssim)) if self.ssim else float("nan")

    @property
    def ssim_min(self) -> float:
        return min(self.ssim) if self.ssim else float("nan")

    def reused_mean(self) -> dict[str, float]:
        return {b: float(np.mean(v)) for b, v in self.reused_steps.items()}

    def to_dict(self) -> dict[str, Any]:
        prompts = max(len(self.psnr), 1)
        steps = self.num_steps or 0
        return {
            "label": self.label,
            "method": self.config.method,
            "params": self.params,
            "config": self.config.to_dict(),
            "times_s": self.times_s,
            "seconds": self.seconds,
            "speedup": self.speedup,
            "ideal_speedup": self.ideal_speedup,
            "timing_noise": self.timing_noise,
            "block_fraction": self.block_fraction,
            "blocks_computed": self.blocks_computed,
            "uncached_blocks": self.uncached_blocks,
            "blocks_per_step": self.blocks_computed / (prompts * steps) if steps else None,
            "uncached_blocks_per_step": self.uncached_blocks / (prompts * steps) if steps else None,
            "forward_calls_per_step": self.forward_calls / (prompts * steps) if steps else None,
            "num_steps": self.num_steps,
            "reused_steps": {
                b: {"mean": float(np.mean(v)), "per_prompt": v, "of": self.num_steps}
                for b, v in self.reused_steps.items()
            },
            "computed_steps": {b: {"mean": float(np.mean(v)), "per_prompt": v} for b, v in self.computed_steps.items()},
            "reuse_schedules": self.reuse_schedules,
            "psnr": {"mean": self.psnr_mean, "min": self.psnr_min, "per_prompt": self.psnr},
            "ssim": {"mean": self.ssim_mean, "min": self.ssim_min, "per_prompt": self.ssim},
            "lpips": None
            if self.lpips is None
            else {"mean": float(np.mean(self.lpips)), "max": max(self.lpips), "per_prompt": self.lpips},
        }


@dataclass
class BenchResult:
    """A whole benchmark: the run's description, the uncached baseline, the entries and the skipped configs.

    Attributes:
        info: what was run and where (model, steps, size, prompts, seeds, environment, ...), see :func:`run_benchmark`.
        baseline_times_s: the uncached prompt set's wall time per repeat; baseline_seconds: their median.
        baseline_repeatable: whether every uncached repeat gave the same pixels (``None`` with one repeat).
        entries: one :class:`BenchEntry` per config that ran, in sweep order.
        skipped: ``{"label", "method", "params", "config", "reason"}`` per config that could not run on this model.
        lpips_note: why LPIPS is missing (``None`` when it was computed); lpips_source: what computed it.
    """

    info: dict[str, Any]
    baseline_times_s: list[float]
    baseline_seconds: float
    baseline_repeatable: bool | None
    entries: list[BenchEntry]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    lpips_note: str | None = LPIPS_UNAVAILABLE_NOTE
    lpips_detail: str | None = None
    psnr_threshold: float = PSNR_THRESHOLD
    ssim_threshold: float = SSIM_THRESHOLD
    order: list[str] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        """The curves, in sweep order (skipped ones included)."""
        found = [e.label for e in self.entries] + [s["label"] for s in self.skipped]
        return list(dict.fromkeys([label for label in self.order if label in found] + found))

    def best(self) -> dict[str, dict[str, BenchEntry | None]]:
        """Per label, the entry with the highest measured speedup whose mean PSNR >= ``psnr_threshold`` (key
        ``"psnr"``) and whose mean SSIM >= ``ssim_threshold`` (key ``"ssim"``); ``None`` when no entry qualifies.

        Only entries that reused some transformer work (block fraction < 1) qualify: one that ran every block has
        nothing to gain, and its measured speedup is timing noise."""
        out: dict[str, dict[str, BenchEntry | None]] = {}
        for label in self.labels:
            entries = [
                e for e in self.entries if e.label == label and e.block_fraction is not None and e.block_fraction < 1
            ]
            by_psnr = [e for e in entries if e.psnr_mean >= self.psnr_threshold]
            by_ssim = [e for e in entries if e.ssim_mean >= self.ssim_threshold]
            out[label] = {
                "psnr": max(by_psnr, key=lambda e: e.speedup, default=None),
                "ssim": max(by_ssim, key=lambda e: e.speedup, default=None),
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        def brief(entry: BenchEntry | None, metric: str) -> dict[str, Any] | None:
            if entry is None:
                return None
            value = entry.psnr_mean if metric == "psnr" else entry.ssim_mean
            return {"speedup": entry.speedup, "params": entry.params, "index": self.entries.index(entry), metric: value}

        return {
            "schema": SCHEMA,
            **self.info,
            "baseline": {
                "times_s": self.baseline_times_s,
                "seconds": self.baseline_seconds,
                "repeatable": self.baseline_repeatable,
            },
            "results": [e.to_dict() for e in self.entries],
            "skipped": self.skipped,
            "lpips_note": self.lpips_note,
            "lpips_detail": self.lpips_detail,
            "thresholds": {"psnr_db": self.psnr_threshold, "ssim": self.ssim_threshold},
            "best": {
                label: {
                    f"psnr>={self.psnr_threshold:g}": brief(best["psnr"], "psnr"),
                    f"ssim>={self.ssim_threshold:g}": brief(best["ssim"], "ssim"),
                }
                for label, best in self.best().items()
            },
        }


# -- environment -----------------------------------------------------------------------------------------------------
def _cpu_name(cpu_info: str) -> str:
    """The CPU's model name from ``torch.utils.collect_env.get_cpu_info`` (``lscpu``'s "Model name", macOS's brand
    string), else ``platform.processor()`` / ``platform.machine()``."""
    for line in cpu_info.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("model name", "name") and value.strip():
            return value.strip()
    if cpu_info.strip() and ":" not in cpu_info and "\n" not in cpu_info.strip():  # macOS: the brand string alone
        return cpu_info.strip()
    return platform.processor() or platform.machine()


def environment(device: Any = None) -> dict[str, Any]:
    """Date, device, and the versions that matter: ``{"date", "device", "device_name", "cpu", "cpu_count",
    "torch_threads", "load_average", "platform", "os", "python", "torch", "cuda", "nvidia_driver", "diffusers",
    "transformers", "cached_diffusers"}`` (``load_average``: the 1, 5 and 15 minute averages when the run ended; on a
    shared machine a load above the core count makes wall times noisy; ``cuda`` and ``nvidia_driver``: ``None``
    without CUDA).

    The system part (CPU model, OS, platform, driver) comes from PyTorch's own report,
    ``torch.utils.collect_env`` (what ``python -m torch.utils.collect_env`` prints), the few probes of it that cost
    milliseconds (not ``get_env_info``, which lists pip packages).
    """
    import diffusers
    import torch
    import transformers
    from torch.utils import collect_env

    from .. import __version__

    device = torch.device(device) if device is not None else torch.device("cpu")
    cpu = _cpu_name(collect_env.get_cpu_info(collect_env.run) or "")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    cuda = torch.cuda.is_available()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": collect_env.get_python_platform(),
        "os": collect_env.get_os(collect_env.run),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "nvidia_driver": collect_env.get_nvidia_driver_version(collect_env.run) if cuda else None,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cached_diffusers": __version__,
    }


def _jsonable(value: Any) -> Any:
    """Call kwargs as JSON: numbers, strings, lists; anything else as its repr."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


# -- running ---------------------------------------------------------------------------------------------------------
def run_prompts(pipe, prompts: Sequence[str], call_kwargs: Mapping[str, Any], seed: int, collect: bool):
    """Generate every prompt (seed ``seed + i``); return the total wall time, uint8 images and stats per prompt."""

    total, images, stats = 0.0, [], []
    for i, prompt in enumerate(prompts):
        generator = make_generator(pipe.device.type, seed + i)
        output, seconds = timed_call(pipe, prompt=prompt, generator=generator, output_type="np", **call_kwargs)
        total += seconds
        if collect:
            images.append(to_uint8(output.images[0]))
            stats.append(pipe.cache_stats)
    return total, images, stats


def _unsupported(pipe, config: CacheConfig) -> str | None:
    """Why the pipeline's transformer cannot run ``config`` (:func:`cached_diffusers.policies.unsupported_reason`:
    missing TeaCache coefficients or MagCache ratios, the model's own checks); ``None`` when it can."""
    transformer = getattr(pipe, "transformer", None)
    spec = getattr(getattr(transformer, "cache_engine", None), "spec", None)
    return unsupported_reason(config, spec, spec.model_name if spec is not None else type(transformer).__name__)


def run_benchmark(
    pipe,
    configs: Sequence[CacheConfig | Mapping[str, Any] | str],
    prompts: Sequence[str],
    call_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    repeats: int = 3,
    *,
    model: str | None = None,
    progress: Callable[[str], None] | None = None,
    psnr_threshold: float = PSNR_THRESHOLD,
    ssim_threshold: float = SSIM_THRESHOLD,
) -> BenchResult:
    """Run the uncached baseline and every config on every prompt with the same seeds, and measure them.

    Protocol: one uncached warm-up call (first prompt, not timed); then ``repeats`` rounds, each running the
    uncached baseline and then every config over the whole prompt set (prompt ``i`` with a generator seeded
    ``seed + i``, ``output_type="np"``, one pipeline call per prompt). A config's time is the median over rounds of
    its prompt set's wall time, its speedup the baseline's median over it. Images and cache statistics come from the
    first round (generation is deterministic for a fixed seed; ``baseline_repeatable`` checks that on the baseline).
    The config is switched with ``pipe.cache_config = config`` between runs; the pipeline's own config is restored
    at the end.

    Args:
        pipe: a cached pipeline (``CachedQwenImagePipeline``, ``CachedFlux2KleinPipeline``, ...).
        configs: cache configs (objects, dicts or method names); ``None`` / ``"none"`` entries are ignored.
        prompts: the prompt set.
        call_kwargs: further pipeline arguments (``num_inference_steps``, ``height``, ``negative_prompt``, ...);
            ``prompt``, ``generator`` and ``output_type`` are set here and must not be given.
        seed: seed of the first prompt.
        repeats: timed rounds (>= 1).
        model: the model's name for the record (default: the pipeline class).
        progress: called with one line per run (e.g. ``print``).
        psnr_threshold, ssim_threshold: the bars of :meth:`BenchResult.best`.

    Returns:
        A :class:`BenchResult`. Configs the model cannot run (TeaCache / MagCache without coefficients or ratios,
        DBCache with too many ``Fn + Bn`` blocks, ...) are in ``skipped`` with the reason, not raised.

    Raises:
        ValueError: no prompts, ``repeats < 1``, or ``call_kwargs`` holding ``prompt`` / ``generator`` /
            ``output_type``.
    """
    if not prompts:
        raise ValueError("run_benchmark needs at least one prompt")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    call_kwargs = dict(call_kwargs or {})
    reserved = sorted({"prompt", "generator", "output_type"} & set(call_kwargs))
    if reserved:
        raise ValueError(f"call_kwargs must not contain {', '.join(reserved)}: run_benchmark sets them")
    say = progress or (lambda line: None)
    prompts = list(prompts)

    entries: list[BenchEntry] = []
    skipped: list[dict[str, Any]] = []
    order: list[str] = []
    for item in configs:
        config = resolve_cache_config(item)
        if config is None:
            continue
        label, params = sweep_label(config), config_params(config)
        order.append(label)
        reason = _unsupported(pipe, config)  # the model's data and checks (DBCache's Fn + Bn, ...)
        if reason is not None:
            config_dict = config.to_dict()
            skipped.append(
                {"label": label, "method": config.method, "params": params, "config": config_dict, "reason": reason}
            )
            say(f"skipped {label} {params}: {reason}")
            continue
        entries.append(BenchEntry(label, config, params))

    lpips_fn, lpips_text = lpips_metric()
    original = pipe.cache_config
    baseline_times: list[float] = []
    reference: list[np.ndarray] = []
    repeatable: bool | None = None
    try:
        pipe.cache_config = None
        say(f"warm-up: uncached, {prompts[0]!r}")
        run_prompts(pipe, prompts[:1], call_kwargs, seed, collect=False)
        for r in range(repeats):
            seconds, images, _ = run_prompts(pipe, prompts, call_kwargs, seed, collect=True)
            baseline_times.append(seconds)
            if r == 0:
                reference = images
            else:
                same = all(np.array_equal(a, b) for a, b in zip(reference, images))
                repeatable = same if repeatable is None else (repeatable and same)
            say(f"[{r + 1}/{repeats}] uncached: {seconds:.2f} s")
            for entry in entries:
                pipe.cache_config = entry.config
                seconds, images, stats = run_prompts(pipe, prompts, call_kwargs, seed, collect=r == 0)
                entry.times_s.append(seconds)
                if r == 0:
                    _measure(entry, stats, reference, images, lpips_fn)
                say(f"[{r + 1}/{repeats}] {entry.label} {entry.params}: {seconds:.2f} s")
            pipe.cache_config = None
    finally:
        pipe.cache_config = original

    baseline = statistics.median(baseline_times)
    for entry in entries:
        entry.seconds = statistics.median(entry.times_s)
        entry.speedup = baseline / entry.seconds if entry.seconds > 0 else float("nan")

    first = reference[0]
    transformer = pipe.transformer
    env = environment(pipe.device)
    info = {
        "date": env["date"],
        "model": model or type(pipe).__name__,
        "pipeline": type(pipe).__name__,
        "transformer": type(transformer).__name__,
        "transformer_blocks": getattr(transformer, "num_cache_blocks", None),
        "num_inference_steps": call_kwargs.get("num_inference_steps"),
        "height": int(first.shape[0]),
        "width": int(first.shape[1]),
        "prompts": prompts,
        "seed": seed,
        "seeds": [seed + i for i in range(len(prompts))],
        "call_kwargs": _jsonable(call_kwargs),
        "pipeline_cache_config": original.to_dict() if original is not None else None,
        "repeats": repeats,
        "timing": (
            "wall time of the whole prompt set (one pipeline call per prompt), median over repeats; one uncached "
            "warm-up call first; the baseline and every config run round-robin in each repeat"
        ),
        "fidelity": (
            "each image against the uncached image of the same prompt and seed, on uint8 RGB pixels: PSNR (peak "
            "255, scikit-image peak_signal_noise_ratio; inf for identical images; mean over the prompts whose image "
            "differs), SSIM (scikit-image structural_similarity, channel_axis=-1, data_range=255)"
        ),
        "environment": env,
    }
    return BenchResult(
        info=info,
        baseline_times_s=baseline_times,
        baseline_seconds=baseline,
        baseline_repeatable=repeatable,
        entries=entries,
        skipped=skipped,
        lpips_note=None if lpips_fn is not None else LPIPS_UNAVAILABLE_NOTE,
        lpips_detail=lpips_text,
        psnr_threshold=psnr_threshold,
        ssim_threshold=ssim_threshold,
        order=list(dict.fromkeys(order)),
    )


def _measure(entry: BenchEntry, stats: list, reference: list[np.ndarray], images: list[np.ndarray], lpips_fn) -> None:
    for s in stats:
        entry.num_steps = s.num_steps
        entry.forward_calls += s.num_calls
        entry.blocks_computed += s.blocks_computed
        entry.uncached_blocks += s.uncached_blocks
        for name, branch in s.branches.items():
            entry.reused_steps.setdefault(name, []).append(branch.num_reused)
            entry.computed_steps.setdefault(name, []).append(branch.num_computed)
            entry.reuse_schedules.setdefault(name, []).append(list(branch.reused_steps))
    entry.block_fraction = entry.blocks_computed / entry.uncached_blocks if entry.uncached_blocks else None
    entry.psnr = [psnr(a, b) for a, b in zip(reference, images)]
    entry.ssim = [ssim(a, b) for a, b in zip(reference, images)]
    entry.lpips = [lpips_fn(a, b) for a, b in zip(reference, images)] if lpips_fn is not None else None


# -- writers ---------------------------------------------------------------------------------------------------------
def write_json(result: BenchResult, path: str | os.PathLike) -> str:
    """Write ``result.to_dict()`` as standard JSON (infinite PSNR as ``"inf"``, see
    :func:`~cached_diffusers.tools.files.write_json`); return the path."""
    return files.write_json(result.to_dict(), path, indent=2)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:{spec}}{suffix}"


def _reused_text(entry: BenchEntry) -> str:
    parts = []
    for branch, mean in entry.reused_mean().items():
        count = f"{mean:.0f}" if float(mean).is_integer() else f"{mean:.1f}"
        parts.append(f"{branch} {count}/{entry.num_steps}")
    return ", ".join(parts) or "-"


def format_markdown(result: BenchResult) -> str:
    """The results as markdown: a header, the table (one row per config after the uncached one), the best speedup
    per method at the PSNR and SSIM bars, the skipped configs and the LPIPS note."""
    info, env = result.info, result.info["environment"]
    steps, prompts = info["num_inference_steps"], info["prompts"]
    lines = [
        f"Model: {info['model']} ({info['pipeline']}, {info['transformer_blocks']} transformer blocks)",
        "",
        f"{steps} steps, {info['height']}x{info['width']}, {len(prompts)} prompt(s), seeds {info['seeds']}, "
        f"median of {info['repeats']} repeat(s); {env['device_name']} ({env['device']}, torch threads: "
        f"{env['torch_threads']}), torch {env['torch']}, diffusers {env['diffusers']}, {info['date']}",
        "",
    ]
    rows = [["uncached", "", f"{result.baseline_seconds:.2f}", "1.00x", "1.00x", "1.000", "-", "inf", "1.0000"]]
    for e in result.entries:
        noise = " (noise)" if e.timing_noise else ""
        rows.append([
            e.label, e.params, f"{e.seconds:.2f}", f"{_fmt(e.speedup, '.2f', 'x')}{noise}",
            _fmt(e.ideal_speedup, '.2f', 'x'), _fmt(e.block_fraction, '.3f'), _reused_text(e),
            f"{_fmt(e.psnr_mean, '.2f')} / {_fmt(e.psnr_min, '.2f')}",
            f"{_fmt(e.ssim_mean, '.4f')} / {_fmt(e.ssim_min, '.4f')}",
        ])
    lines += files.markdown_table(
        ["method", "parameters", "time (s)", "speedup", "ideal speedup", "block fraction", "reused steps per branch",
         "PSNR mean / min (dB)", "SSIM mean / min"], rows)
    noisy = [e for e in result.entries if e.timing_noise]
    if noisy:
        lines += ["", (
            f"(noise): {len(noisy)} row(s) measured a speedup above the ideal one, which skipping blocks cannot give: "
            f"timing noise of the median of {info['repeats']} repeat(s). Rerun with more --repeats, or --threads 1 "
            "on a CPU shared with other processes."
        )]
    if any(e.lpips is not None for e in result.entries):
        lines += ["", "LPIPS mean / max: " + "; ".join(
            f"{e.label} {e.params}: {np.mean(e.lpips):.4f} / {max(e.lpips):.4f}" for e in result.entries if e.lpips
        )]
    psnr_bar, ssim_bar = f"PSNR >= {result.psnr_threshold:g} dB", f"SSIM >= {result.ssim_threshold:g}"
    lines += [
        "",
        f"Best measured speedup per method with mean {psnr_bar} and with mean {ssim_bar} against uncached "
        f"(configs that reused some transformer work):",
        "",
    ]
    best_rows = []
    for label, best in result.best().items():
        cells = []
        for key in ("psnr", "ssim"):
            entry = best[key]
            if entry is None:
                ran = [e for e in result.entries if e.label == label]
                if not ran:
                    cells.append("skipped")
                elif all(e.block_fraction is None or e.block_fraction >= 1 for e in ran):
                    cells.append("none (no config skipped work)")
                else:
                    cells.append("none")
            else:
                cells.append(f"{entry.speedup:.2f}x ({entry.params})")
        best_rows.append([label, *cells])
    lines += files.markdown_table(["method", f"best speedup at {psnr_bar}", f"best speedup at {ssim_bar}"], best_rows)
    if result.skipped:
        lines += ["", "Skipped:"]
        for label, reason in dict.fromkeys((s["label"], s["reason"]) for s in result.skipped):
            count = sum(1 for s in result.skipped if s["label"] == label and s["reason"] == reason)
            lines.append(f"- {label} ({count} config(s)): {reason}")
    lines.append("")
    if result.lpips_note:
        lines.append(f"LPIPS: not computed; {result.lpips_note}.")
    if result.baseline_repeatable is False:
        lines.append("Warning: the uncached baseline's repeats gave different pixels; fidelity has a noise floor.")
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(result: BenchResult, path: str | os.PathLike) -> str:
    """Write :func:`format_markdown` to ``path``; return the markdown."""
    text = format_markdown(result)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return text


def plot_pareto(result: BenchResult, path: str | os.PathLike) -> str:
    """Speedup versus fidelity, as a PNG: two panels (mean PSNR, mean SSIM against uncached), one curve per method
    (points sorted by fidelity, labelled with the swept value), the uncached point at 1.0x and the PSNR / SSIM bars
    dashed. Identical images (infinite PSNR) are drawn at the panel's right edge, marked "inf". Returns the path.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).

    Raises:
        MissingExtraError: without matplotlib (the ``bench`` extra).
    """
    FigureCanvasAgg = require_extra("matplotlib.backends.backend_agg", "matplotlib").FigureCanvasAgg
    from matplotlib.figure import Figure

    finite = [e.psnr_mean for e in result.entries if math.isfinite(e.psnr_mean)]
    psnr_inf = max(finite + [result.psnr_threshold + 10.0]) + 5.0
    figure = Figure(figsize=(12, 5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    panels = (
        (axes[0], "PSNR", lambda e: e.psnr_mean if math.isfinite(e.psnr_mean) else psnr_inf, psnr_inf,
         result.psnr_threshold, "mean PSNR against uncached (dB; inf: identical images)"),
        (axes[1], "SSIM", lambda e: e.ssim_mean, 1.0, result.ssim_threshold, "mean SSIM against uncached"),
    )
    for (ax, name, value, uncached_x, bar, xlabel), min_span, unit in zip(panels, (2.0, 0.01), (" dB", "")):
        shown = [uncached_x]
        for label in dict.fromkeys(e.label for e in result.entries):
            points = sorted(((value(e), e.speedup, _knob(e.config)) for e in result.entries if e.label == label
                             and math.isfinite(e.speedup) and math.isfinite(value(e))), key=lambda p: p[0])
            if not points:
                continue
            xs, ys, knobs = zip(*points)
            shown += xs
            (line,) = ax.plot(xs, ys, marker="o", label=label)
            for x, y, knob in zip(xs, ys, knobs):
                ax.annotate(knob, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=line.get_color())
        ax.plot([uncached_x], [1.0], marker="*", markersize=14, color="black", linestyle="none", label="uncached")
        ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)
        low, high = min(shown), max(shown)
        span = max(high - low, min_span)
        title = f"speedup vs {name}"
        if bar >= low - span:  # the bar is near the points: show it
            ax.axvline(bar, color="gray", linestyle="--", linewidth=1)
            low = min(low, bar)
        else:
            title += f" (every config above the {bar:g}{unit} bar)"
        pad = 0.08 * max(high - low, min_span)
        ax.set_xlim(low - pad, high + pad)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("speedup (uncached wall time / cached wall time)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    if math.isfinite(psnr_inf):
        ax = axes[0]
        ticks = [t for t in ax.get_xticks() if t < psnr_inf - 2.5 and t >= ax.get_xlim()[0]]
        ax.set_xticks(ticks + [psnr_inf])
        ax.set_xticklabels([f"{t:g}" for t in ticks] + ["inf"])
    axes[1].legend(loc="best", fontsize=8)
    info = result.info
    figure.suptitle(
        f"{info['model']}: {info['num_inference_steps']} steps, {info['height']}x{info['width']}, "
        f"{len(info['prompts'])} prompt(s), {info['environment']['device_name']}",
        fontsize=10,
    )
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, format="png")
    return str(path)
