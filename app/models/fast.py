"""Faster forwards for any denoiser: reduced-precision autocast, channels_last inputs, and torch.compile
over a few padded row buckets.

fast_denoiser() wraps a Denoiser callable, (x, timesteps, class_labels[, embed_delta]) -> eps, and returns
one with the same signature, so the sampler, the engine and the latents never see the difference:

  precision      bf16 or fp16: the forward runs under torch.autocast and its output is cast back to fp32
                 (perturbed forwards too: the hooks select rows in the autocast dtype).
                 Latents and every scheduler and guidance operation stay fp32.
                 int8 (CPU, UNet): the convolutions and linear layers quantized to int8, calibrated on the
                 model's own sampling at the first forward (app/models/quantize.py); implies compile, whose
                 freezing lowers them to oneDNN's int8 kernels. Buckets run 2..INT8_MAX_ROWS rows (one row is
                 padded to two), bigger forwards in chunks of INT8_MAX_ROWS. A forward with
                 perturb (attention guidance, app/models/attention.py) is refused: PerturbationError.
  channels_last  the input is made NHWC before the forward (convert the network's weights with
                 to_channels_last(); the wrapper holds no module of its own).
  compile        torch.compile with inductor's freezing (weights folded as constants, oneDNN's weights
                 prepacked): the forward at each row count is a static graph. The batch's row count changes
                 from tick to tick, so rows are padded up to the next bucket (1, 2, 4, ... max_rows) and the
                 output sliced: at most log2(max_rows) + 2 graphs are compiled, all during the engine's
                 warmup, which calls every row count 1..max_rows before the service is ready.
                 A call with embed_delta (CADS) or perturb (app/models/attention.py) runs the eager forward:
                 their hooks would change the graph.
  cuda_graphs    (CUDA) the forward, compiled or not, captured as a CUDA graph per row bucket (the same buckets)
                 at the first call of each (the warmup's) and replayed: inputs copied into the graph's own,
                 padding rows repeating the last, the output cloned out. A small model's eager forward is bound
                 by kernel launches (~5-10 ms on an H200 at 2 to 128 rows), its replay is not (docs/benchmarks.md).
                 The graphs share one memory pool: replays never overlap and each output is cloned at once.
                 Rows beyond the last bucket, CADS's embed_delta and perturb run uncaptured.

All of a model's compute runs in the engine's one worker thread, compiling included.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
import torch._inductor.config

from app.models.attention import INT8_REASON, PerturbationError, RowPerturbations
from app.models.deepcache import DeepCacheError, RowsOut
from app.models.precision import (
    INT8_DOT_FLAGS,
    INT8_MAX_ROWS,
    INT8_MIN_ROWS,
    Calibrator,
    PrecisionError,
    cpu_has_amx_bf16,
    cpu_has_int8_dot,
)

__all__ = ["INT8_MAX_ROWS", "INT8_MIN_ROWS", "FastDenoiser", "PrecisionError", "fast_denoiser", "resolve_precision"]

Precision = Literal["fp32", "bf16", "fp16", "int8"]
CACHE_INT8_REASON = "precision int8 runs a quantized graph that a step cache cannot split: use fp32 or bf16"
PRECISION_SETTINGS = ("fp32", "bf16", "fp16", "int8", "auto")
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}

# (x, timesteps, class_labels[, embed_delta]) -> eps: app.sampling.Denoiser, or any callable of that signature.
Denoiser = Callable[..., torch.Tensor]


def resolve_precision(setting: str, device: torch.device) -> Precision:
    """A precision setting (CFG_PRECISION) for a device. auto: fp16 on a CUDA GPU, where it kept the default
    request's FID to 0.2% and bf16 moved it by 6% (an H200, docs/benchmarks.md); on a CPU with AMX-BF16, bf16,
    which served 1.4x fp32's images/s there and kept the default request's quality under both judges (accuracy
    within 0.001, FID within 1.01x at n = 640: docs/caching-skip-bf16.md); fp32 on other CPUs, where bf16
    autocast was slower (0.87x on an AVX512-BF16 CPU without AMX) and there is no fp16 path. Never int8, which
    takes minutes to calibrate and compile at startup and is asked for by name."""
    if setting not in PRECISION_SETTINGS:
        raise ValueError(f"unknown precision {setting!r}; choose from {', '.join(PRECISION_SETTINGS)}")
    cuda = device.type == "cuda"
    if setting == "auto":
        return "fp16" if cuda else "bf16" if device.type == "cpu" and cpu_has_amx_bf16() else "fp32"
    if setting == "int8" and device.type != "cpu":
        raise PrecisionError(f"precision int8 runs on the CPU (oneDNN's int8 kernels), and the model runs on {device}")
    if setting == "int8" and not cpu_has_int8_dot():
        raise PrecisionError(
            f"precision int8 needs a CPU with int8 dot products ({', '.join(INT8_DOT_FLAGS)}), and this one has "
            "none: its int8 convolutions lose precision (17.7 grey levels from fp32 per image, measured): use fp32"
        )
    if setting == "fp16" and not cuda:
        raise PrecisionError(f"precision fp16 needs a CUDA device, and the model runs on {device}: use bf16 or fp32")
    if setting == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise PrecisionError(f"precision bf16: {torch.cuda.get_device_name(device)} has no bf16; use fp16 or fp32")
    return setting  # type: ignore[return-value]


def row_buckets(max_rows: int) -> tuple[int, ...]:
    """The row counts a compiled forward runs at: powers of two below max_rows, and max_rows."""
    buckets = [1 << k for k in range(max_rows.bit_length()) if 1 << k < max_rows]
    return (*buckets, max_rows)


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """The module's 4-d weights in channels_last (NHWC) memory format, in place."""
    return module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs lack it


class FastDenoiser:
    """A Denoiser with the options of the module docstring applied; eps comes back fp32, one row per input row."""

    def __init__(
        self,
        denoiser: Denoiser,
        device: torch.device,
        precision: Precision = "fp32",
        channels_last: bool = False,
        compile: bool = False,
        max_rows: int = 32,
        dynamic: bool = False,
        calibrate: Calibrator | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        """dynamic (with compile): one graph whose row count is symbolic instead of a graph per bucket, and
        no padding; compiled at the first call (row counts 0 and 1 get a graph of their own).
        calibrate (int8 only): returns the calibration inputs; called once, at the first forward."""
        self.denoiser = denoiser
        self.precision = precision
        self.channels_last = channels_last
        self.chunk: int | None = None
        self._int8: torch.nn.Module | None = None
        self._calibrate = calibrate
        if precision == "int8":
            if calibrate is None:
                raise ValueError("precision int8 needs calibrate, the source of its calibration inputs")
            compile, dynamic = True, False
            max_rows = min(max_rows, INT8_MAX_ROWS)
        if cuda_graphs and torch.device(device).type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, and the model runs on {device}")
        buckets = row_buckets(max_rows) if (compile and not dynamic) or cuda_graphs else ()
        if precision == "int8":
            buckets = tuple(b for b in buckets if b >= INT8_MIN_ROWS) or (INT8_MIN_ROWS,)
            self.chunk = buckets[-1]  # a bigger forward runs in chunks of the largest bucket
        self.buckets: tuple[int, ...] = buckets
        self._device_type = torch.device(device).type
        self._compiled: Callable[..., torch.Tensor] | None = None
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[int, CapturedForward] = {}
        self._pool: Any = None  # torch.cuda's graph pool handle, made at the first capture
        if compile:
            # Every instance's graphs (one per bucket, or two when dynamic) are cached on the one code object
            # of _forward, whose recompile limit (8) would otherwise send a second model, or a seventh
            # bucket, back to eager: room for this instance's graphs on top of the others'.
            torch._dynamo.config.recompile_limit += len(self.buckets) + 2
            self._compiled = torch.compile(self._forward, dynamic=dynamic)

    def bucket(self, rows: int) -> int:
        """The row count the compiled forward runs at for `rows` rows (rows itself beyond the last bucket)."""
        i = bisect.bisect_left(self.buckets, rows)
        return self.buckets[i] if i < len(self.buckets) else rows

    def _forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor, *extra, **perturb
    ) -> torch.Tensor:
        """perturb: empty, or {"perturb": RowPerturbations} for an eager perturbed forward."""
        if self._int8 is not None and not extra:
            return self._int8(x, timesteps, class_labels)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision in ("fp32", "int8"):  # int8 with embed_delta (CADS): the fp32 eager forward
            return self.denoiser(x, timesteps, class_labels, *extra, **perturb)
        with torch.autocast(self._device_type, dtype=DTYPES[self.precision]):
            eps = self.denoiser(x, timesteps, class_labels, *extra, **perturb)
        return eps.float()

    def _run(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The forward at a bucket's row count: compiled where asked, else eager."""
        if self._compiled is None:
            return self._forward(*inputs)
        # Freezing is read while a graph compiles, i.e. inside a call: set around every call (setting it in
        # torch.compile's options did not reach the graph: its convolutions stayed unpacked).
        with torch._inductor.config.patch(freezing=True):
            return self._compiled(*inputs)

    def _replay(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The captured graph of the inputs' bucket, replayed (captured first at a bucket's first call)."""
        rows = inputs[0].shape[0]
        bucket = self.bucket(rows)
        graph = self._graphs.get(bucket)
        if graph is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = self._graphs[bucket] = CapturedForward(self._run, pad_rows(inputs, bucket), self._pool)
        return graph(inputs)

    @torch.inference_mode()
    def __call__(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor,
        *extra: torch.Tensor,
        perturb: RowPerturbations | None = None,
    ) -> torch.Tensor:
        if perturb is not None:
            return self._perturbed(x, timesteps, class_labels, *extra, perturb=perturb)
        if self.cuda_graphs and not extra and x.shape[0] <= self.buckets[-1]:
            return self._replay((x, timesteps, class_labels))
        if self._compiled is None or extra:
            return self._forward(x, timesteps, class_labels, *extra).contiguous()
        if self.precision == "int8" and self._int8 is None and self._calibrate is not None:  # set for int8
            from app.models.quantize import quantize_int8  # imports torchao's quantization: only for int8

            self._int8 = quantize_int8(self.denoiser, self._calibrate())
        rows = x.shape[0]
        if self.chunk is not None and rows > self.chunk:
            parts = [
                self(x[i : i + self.chunk], timesteps[i : i + self.chunk], class_labels[i : i + self.chunk])
                for i in range(0, rows, self.chunk)
            ]
            return torch.cat(parts)
        padded = pad_rows((x, timesteps, class_labels), self.bucket(rows) if self.buckets else rows)
        return self._run(*padded)[:rows].contiguous()

    @torch.inference_mode()
    def forward_cached(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        class_labels: torch.Tensor,
        *extra: torch.Tensor,
        perturb: RowPerturbations | None = None,
        kind: str,
        settings: Sequence[int | float | None],
        cached: Sequence[torch.Tensor | None],
    ) -> RowsOut:
        """A forward whose rows take their full or shallow path (app/models/deepcache.py, first_block.py) runs
        eager, as CADS's does: which rows run the deep part changes from tick to tick, and no compiled graph or
        CUDA graph is made for it. int8 is refused: the quantized graph is not the modules the split runs."""
        if self.precision == "int8":
            raise DeepCacheError(CACHE_INT8_REASON)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        forward = self.denoiser.forward_cached  # type: ignore[attr-defined]
        kwargs = {"perturb": perturb, "kind": kind, "settings": settings, "cached": cached}
        if self.precision == "fp32":
            out = forward(x, timesteps, class_labels, *extra, **kwargs)
        else:
            with torch.autocast(self._device_type, dtype=DTYPES[self.precision]):
                out = forward(x, timesteps, class_labels, *extra, **kwargs)
        return replace(out, eps=out.eps.float().contiguous())

    def cache_support(self) -> dict[str, str | None]:
        """The wrapped model's step cache kinds (app/sampling/cache.py), none at int8."""
        support: dict[str, str | None] = getattr(self.denoiser, "cache_support", dict)()
        int8 = CACHE_INT8_REASON if self.precision == "int8" else None
        return {kind: reason or int8 for kind, reason in support.items()}

    def deepcache_branches(self) -> int:
        return self.denoiser.deepcache_branches()  # type: ignore[attr-defined]

    def _perturbed(
        self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor, *extra, perturb: RowPerturbations
    ) -> torch.Tensor:
        """A forward with perturbed rows (app/models/attention.py) runs eager, as CADS's does: its hooks would
        change a compiled graph (dynamo does not guard on hooks: one traced with them would keep them) and are
        not in a captured one. int8 is refused: the quantized graph is not the modules the hooks are on, and an
        fp32 forward instead would change the other rows' precision, so their images, with their batch."""
        if self.precision == "int8":
            raise PerturbationError(INT8_REASON)
        return self._forward(x, timesteps, class_labels, *extra, perturb=perturb).contiguous()


class CapturedForward:
    """One row bucket's forward as a CUDA graph: static inputs, captured once, replayed per call."""

    def __init__(self, forward: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], pool) -> None:
        self.inputs = [t.clone() for t in inputs]
        # Warm on a side stream (lazy initialisation, cuDNN's algorithm choice) before capturing, as
        # torch.cuda.graphs' documentation does.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                forward(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the engine's thread captures while the event loop's thread may touch CUDA too.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.output = forward(*self.inputs)

    def __call__(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        rows = inputs[0].shape[0]
        for static, t in zip(self.inputs, inputs, strict=True):
            static[:rows].copy_(t)
            if rows < static.shape[0]:  # padding rows: the last row repeated, outputs dropped
                static[rows:].copy_(t[-1:].expand(static.shape[0] - rows, *t.shape[1:]))
        self.graph.replay()
        return self.output[:rows].clone()


def pad_rows(tensors: Sequence[torch.Tensor], rows: int) -> list[torch.Tensor]:
    """Each tensor with its last row repeated up to `rows` rows: the padding rows are valid inputs whose
    outputs are dropped (a row's output does not depend on the other rows).

    Always new tensors, even with no row to add: made under inference_mode, they are inference tensors
    whether the caller's were or not, and dynamo guards on that, so one kind of input keeps it to one graph
    per bucket (mixed, the warmup compiled every bucket twice)."""
    have = tensors[0].shape[0]
    return [torch.cat([t, t[-1:].expand(rows - have, *t.shape[1:])]) for t in tensors]


def fast_denoiser(
    denoiser: Denoiser,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
    max_rows: int = 32,
    calibrate: Calibrator | None = None,
    cuda_graphs: bool = False,
) -> FastDenoiser:
    """Wrap a denoiser; precision may be 'auto' (see resolve_precision); int8 needs calibrate; cuda_graphs
    applies on a CUDA device only (elsewhere it is ignored)."""
    resolved = resolve_precision(precision, torch.device(device))
    graphs = cuda_graphs and torch.device(device).type == "cuda"
    return FastDenoiser(
        denoiser, device, resolved, channels_last, compile, max_rows, calibrate=calibrate, cuda_graphs=graphs
    )
