"""The service's settings, read from CFG_* environment variables when create_app() builds them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_PATH = Path(__file__).resolve().parent.parent / "model_store" / "fashion-mnist-cfg"


class Settings(BaseSettings):
    # hide_input_in_errors: an error never echoes a setting's value (CFG_CLIENT_WEIGHTS holds API keys).
    model_config = SettingsConfigDict(env_prefix="CFG_", protected_namespaces=(), hide_input_in_errors=True)

    model_store: Path = Field(DEFAULT_MODEL_PATH.parent, description="the folder of the checkpoints CFG_MODELS names")
    models: str = Field(
        DEFAULT_MODEL_PATH.name,
        description="comma-separated checkpoint folders in CFG_MODEL_STORE to serve; the first is the default",
    )
    model_path: Path = Field(
        DEFAULT_MODEL_PATH, description="one checkpoint folder to serve alone; when set, CFG_MODELS is not read"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, else CPU")
    max_batch_rows: int = Field(32, ge=1, description="most rows (images x cond/uncond) in one forward")
    max_queue: int = Field(64, ge=0, description="requests waiting beyond the running ones; more get 503")
    max_preempted_mb: float = Field(
        256, ge=0, description="memory that batch requests preempted for interactive ones may hold (docs/engine.md)"
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="a request still unfinished after this gets 504; the most a body's timeout_s may ask"
    )
    client_weights: str = Field(
        "",
        description="NAME=WEIGHT pairs, comma-separated (keyA=2,team-b=0.5): a client's share of its priority "
        "class's rows relative to others' (1 where unlisted); NAME is an API key (X-API-Key) or an X-Client-Id "
        "(docs/engine.md)",
    )
    metrics_top_clients: int = Field(
        8, ge=0, description="clients named in cfg_client_row_share (the most rows first); the rest are 'other'"
    )
    max_images: int = Field(16, ge=1, description="most images per request")
    max_steps: int = Field(200, ge=1, description="most sampling steps per request")
    default_steps: int = Field(20, ge=1)
    max_guidance_scale: float = Field(30.0, gt=0)
    max_noise_level: float = Field(5.0, ge=0)
    warmup: bool = Field(
        True,
        description="before reporting ready, run a short request and a forward at every row count to max_batch_rows",
    )
    precision: Literal["fp32", "bf16", "fp16", "int8", "auto"] = Field(
        "fp32",
        description="the model's forward: fp32, or bf16 or fp16 (CUDA only) under autocast, the latents and the "
        "sampler staying fp32; int8 (a CPU with VNNI or AMX int8 dot products, UNet checkpoints, needs torchao): "
        "convolutions and linear layers "
        "quantized to int8, calibrated on the model's own sampling and compiled at startup (implies compile); "
        "auto: fp16 on a CUDA GPU (bf16 moved FID by 6% on an H200, fp16 by 0.2%: docs/benchmarks.md), bf16 on a "
        "CPU with AMX-BF16 (1.4x fp32's images/s, the same quality under the project's two judges), else fp32",
    )
    channels_last: bool = Field(
        True,
        description="a convolutional (UNet) model's weights and inputs in channels_last (NHWC) memory format: 1.15x "
        "the fp32 forward on this project's CPU, the same images to one grey level (docs/benchmarks.md)",
    )
    compile: bool = Field(
        False,
        description="torch.compile the forward, one graph per row bucket (1, 2, 4, ... max_batch_rows; rows padded "
        "up to the next), all compiled by the warmup: faster forwards for minutes of compiling at startup",
    )
    cuda_graphs: bool = Field(
        True,
        description="on a CUDA device, capture the forward as a CUDA graph per row bucket (1, 2, 4, ... "
        "max_batch_rows; rows padded up to the next), all captured by the warmup, and replay it: a small model's "
        "eager forward is bound by kernel launches (6.4x faster replayed at 2 rows on an H200, docs/benchmarks.md); "
        "UNet checkpoints only (a DiT's capture has not been verified on a card yet); ignored on the CPU",
    )
    engine_process: bool = Field(
        False,
        description="run the engines (the models, their batching loop and the compute thread) in a process of their "
        "own, the API process doing HTTP, validation, PNG and JSON; they talk over pipes in msgpack "
        "(docs/engine.md, The engine in its own process)",
    )
    max_jobs: int = Field(
        1000,
        ge=1,
        description="most jobs held (in memory, or in the Redis store); the first finished go first, and when all "
        "are unfinished POST /v1/jobs gets 503",
    )
    job_store: str = Field(
        "memory",
        pattern=r"^(memory|rediss?://.+)$",
        description="where the /v1/jobs jobs are kept: memory (this process: a restart loses them, other replicas "
        "don't see them) or a Redis URL (redis://host:6379/0): every replica reads, follows and cancels every job, "
        "and finished jobs outlive restarts (docs/deployment.md, A fleet)",
    )
    job_ttl_s: float = Field(3600.0, gt=0, description="a finished job is kept this long for GET /v1/jobs/{id}")
    job_visibility_s: float = Field(
        30.0,
        gt=0,
        description="with a Redis job store: a job taken from the shared backlog whose replica has not renewed it for "
        "this long (it renews every third of it while the job runs) is taken over by another replica and run again "
        "from its seeds (docs/deployment.md, A fleet)",
    )
    retry_after_s: int = Field(
        5, ge=1, description="Retry-After header on a 503: queue full, or the service starting or draining"
    )
    drain_timeout_s: float = Field(
        300.0,
        ge=0,
        description="on SIGTERM, how long the requests and jobs in flight may take to finish (new ones get 503 "
        "meanwhile); those still unfinished then fail with 503. Keep the orchestrator's grace period longer",
    )
    max_body_bytes: int = Field(
        65536,
        ge=1024,
        description="a request body larger than this gets 413 before it is read whole (the largest valid "
        "request body is a few KiB), on every route, with or without the gateway in front",
    )

    def client_weight_table(self) -> dict[str, float]:
        """CFG_CLIENT_WEIGHTS as name -> weight (validated when the settings are built)."""
        return parse_client_weights(self.client_weights)

    @field_validator("client_weights")
    @classmethod
    def _weights_parse(cls, text: str) -> str:
        parse_client_weights(text)
        return text

    def model_paths(self) -> list[Path]:
        """The checkpoint folders to serve: CFG_MODEL_PATH alone where it is set, else CFG_MODELS in CFG_MODEL_STORE."""
        if "model_path" in self.model_fields_set:
            return [self.model_path]
        return [self.model_store / name.strip() for name in self.models.split(",")]

    @model_validator(mode="after")
    def _models_named(self) -> Settings:
        names = [name.strip() for name in self.models.split(",")]
        if not all(names) or len(set(names)) != len(names):
            raise ValueError(f"CFG_MODELS must name distinct checkpoint folders, comma-separated; got {self.models!r}")
        return self

    @model_validator(mode="after")
    def _rows_fit_a_request(self) -> Settings:
        if self.max_batch_rows < 2 * self.max_images:
            raise ValueError(
                f"CFG_MAX_BATCH_ROWS ({self.max_batch_rows}) must be at least 2 x CFG_MAX_IMAGES "
                f"({2 * self.max_images}): a guided request needs two rows per image"
            )
        if self.default_steps > self.max_steps:
            raise ValueError("CFG_DEFAULT_STEPS must not exceed CFG_MAX_STEPS")
        return self


def parse_client_weights(text: str) -> dict[str, float]:
    """ "keyA=2,keyB=1" as {"keyA": 2.0, "keyB": 1.0}; ValueError naming the entry by its place (never its name: a
    name may be an API key) where one is not NAME=WEIGHT with a positive, finite weight, or a name repeats."""
    weights: dict[str, float] = {}
    for place, entry in enumerate((e for e in text.split(",") if e.strip()), start=1):
        name, sep, value = entry.strip().rpartition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not sep or not name.strip() or not (0 < weight < math.inf):
            raise ValueError(
                f"CFG_CLIENT_WEIGHTS entry {place} is not NAME=WEIGHT with a positive number as WEIGHT "
                "(comma-separated pairs, e.g. keyA=2,team-b=0.5)"
            )
        if name.strip() in weights:
            raise ValueError(f"CFG_CLIENT_WEIGHTS entry {place} names a client an earlier entry names")
        weights[name.strip()] = weight
    return weights
