"""What validate compares: a predictor turns (image, expression, decode settings) into a GroundingResult.

Contract: `open_predictor(spec)` accepts a bundle directory (manifest stage
"build", run by the torch-free `Grounder`), a checkpoint directory (config.json
and no build manifest, run by the PyTorch `ReferenceRunner`; ModelOpt checkpoints
go through its dequantizing loader), an http(s) URL of any OpenAI-compatible
server (`egm_edge.validate.endpoint`), or an object that already is a predictor.
Every predictor says what it is (`describe()`), fingerprints itself cheaply for
resumption (`fingerprint()`), names its tokenizer by sha256 (None for endpoints,
whose tokenizer cannot be seen) and whether requests may run concurrently.
Local models load lazily on the first prediction, so bad input is refused first.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

from egm_edge.errors import CheckpointError, InputError
from egm_edge.runtime.settings import BUILTIN, DecodeSettings  # the one decode-settings type, re-exported here

DEFAULT_MAX_ANSWER_TOKENS = BUILTIN.max_answer_tokens
DEFAULT_MAX_NEW_TOKENS = BUILTIN.max_new_tokens  # EGM's evaluation cap
SMALL_MODEL_BYTES = 256 * 1024 * 1024


class Predictor(Protocol):
    kind: str  # "bundle" | "checkpoint" | "endpoint" | anything a test invents
    concurrent: bool  # may several predictions run at once (endpoints), or one at a time (local models)

    def describe(self) -> dict[str, Any]: ...

    def fingerprint(self) -> dict[str, Any]: ...

    def tokenizer_sha256(self) -> str | None: ...

    def defaults(self) -> dict[str, Any]: ...  # decode defaults in DecodeSettings' JSON form ({} for none)

    def predict(self, image, expression: str, task: str, settings: DecodeSettings): ...


def _sha256(path: Path) -> str:
    from egm_edge.artifacts import sha256_file

    return sha256_file(path)


def weights_fingerprint(model_dir: Path) -> dict[str, str]:
    """A cheap identity of a checkpoint's weights: size and sha256 of the first and last MiB of each file.

    Hashing whole 16 GB checkpoints on every run would dominate a resumed validation;
    the safetensors header (names, shapes, offsets) plus the head and tail of the
    data change whenever the weights do in practice (a retrain, another seed, a quantization).
    """
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        h = hashlib.sha256()
        size = f.stat().st_size
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read())
        out[f.name] = f"{size}:{h.hexdigest()}"
    return out


class BundlePredictor:
    """A CPU (or other) bundle through the torch-free runtime.

    Predictions go through the runtime's in-flight batch (egm_edge.runtime.scheduler, up to `max_batch` rows per
    decoder call), so callers that predict concurrently (validate's --concurrency) share decode steps; greedy
    tokens are those of each request alone. A caller predicting one at a time (sweep, which measures latency as
    one request sees it) gets batch 1."""

    kind = "bundle"
    concurrent = True

    def __init__(self, path: Path, max_batch: int = 8, executor: str = "auto"):
        import threading

        from egm_edge.runtime.bundle import open_bundle

        self.path = Path(path)
        self.executor = executor  # runtime.executors: auto, onnxruntime or tensorrt
        self.bundle = open_bundle(self.path)  # checks the manifest and files now, before any data work
        self.max_batch = max_batch
        self._grounder = None
        self._scheduler = None
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        m = self.bundle.manifest
        return {"kind": self.kind, "path": str(self.path.resolve()), "name": self.bundle.name, "target": self.bundle.target,
                "precision": self.bundle.precision, "checkpoint": (m.get("inputs") or {}).get("checkpoint")}

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": self.kind, "manifest_sha256": _sha256(self.path / "manifest.json")}

    def tokenizer_sha256(self) -> str | None:
        return _sha256(self.path / "tokenizer.json")

    def defaults(self) -> dict[str, Any]:
        g = self.bundle.generation
        return {"think_budget": g.think_budget, "budget_mode": g.budget_mode, "max_answer_tokens": g.max_answer_tokens}

    def _open(self):
        with self._lock:  # concurrent first predictions open the bundle once
            if self._grounder is None:
                from egm_edge.runtime.grounder import Grounder
                from egm_edge.runtime.scheduler import Scheduler

                # No image-encoding cache: every sample pays for its vision pass, so latencies are per request.
                # Grounder.open also checks the files against the manifest's sha256, so a swapped graph is not scored.
                g = Grounder.open(self.path, executor=self.executor, image_cache_size=0)
                self._scheduler = Scheduler(g, max_batch=self.max_batch).start()
                self._grounder = g
        return self._grounder

    def predict(self, image, expression: str, task: str, settings: DecodeSettings):
        from egm_edge.grounding import user_text

        g = self._open()
        seq = g.start(image, user_text(expression, task=task, family=g.family), settings=settings, exif_transpose=False)
        return self._scheduler.submit(seq).wait()

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()


class CheckpointPredictor:
    """A Hugging Face Qwen3-VL checkpoint (full precision or ModelOpt-quantized) through the PyTorch reference."""

    kind = "checkpoint"
    concurrent = False

    def __init__(self, path: Path, dtype: str = "float32", device: str = "cpu"):
        from egm_edge.reference.runner import read_model_config

        self.path = Path(path)
        self.config = read_model_config(self.path)  # one sentence for an unsupported checkpoint
        if not (self.path / "tokenizer.json").is_file():
            raise CheckpointError(f"Model directory {self.path} has no tokenizer.json; copy the model's tokenizer files there.")
        self.dtype, self.device = dtype, device
        self._runner = None

    def describe(self) -> dict[str, Any]:
        quant = self.path / "hf_quant_config.json"
        precision = "full"
        if quant.is_file():
            try:
                precision = str(json.loads(quant.read_text()).get("quantization", {}).get("quant_algo", "quantized")).lower()
            except (OSError, ValueError):
                precision = "quantized"
        return {"kind": self.kind, "path": str(self.path.resolve()), "name": self.path.name, "precision": precision,
                "dtype": self.dtype, "device": self.device}

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": self.kind, "config_sha256": _sha256(self.path / "config.json"), "weights": weights_fingerprint(self.path),
                "dtype": self.dtype}

    def tokenizer_sha256(self) -> str | None:
        return _sha256(self.path / "tokenizer.json")

    def defaults(self) -> dict[str, Any]:
        return {}

    def predict(self, image, expression: str, task: str, settings: DecodeSettings):
        import torch

        if self._runner is None:
            from egm_edge.reference import ReferenceRunner

            self._runner = ReferenceRunner.open(self.path, dtype=self.dtype, device=self.device)
        before = torch.get_num_threads()
        if self.small:
            torch.set_num_threads(1)
        try:
            return self._runner.ground(image, expression, task=task, settings=settings, exif_transpose=False)
        finally:
            torch.set_num_threads(before)

    @functools.cached_property
    def small(self) -> bool:
        """A model this small decodes faster on one CPU thread: per-op overhead, not arithmetic, dominates
        (the tiny grounder: 0.3 s per grounding on one thread, 0.7-1.7 s on two of a busy 2-core machine)."""
        return self.device == "cpu" and sum(f.stat().st_size for f in self.path.glob("*.safetensors")) < SMALL_MODEL_BYTES


def open_predictor(spec, *, model_name: str | None = None, api_key: str | None = None, timeout_s: float = 120.0,
                   retries: int = 3, backoff_s: float = 0.5, dtype: str = "float32", device: str = "cpu",
                   family: str | None = None):
    """A predictor for `spec` (see the module docstring); InputError/CheckpointError with one sentence otherwise.
    `family` is for endpoints only (nothing else says which prompts they expect); bundles and checkpoints say it."""
    if not isinstance(spec, (str, Path)):
        if callable(getattr(spec, "predict", None)):
            return spec
        raise InputError(f"Cannot validate {spec!r}: give a bundle directory, a checkpoint directory or an http(s) URL.")
    text = str(spec)
    if text.startswith(("http://", "https://")):
        from egm_edge.validate.endpoint import EndpointPredictor

        return EndpointPredictor(text, model_name=model_name, api_key=api_key, timeout_s=timeout_s, retries=retries,
                                 backoff_s=backoff_s, **({"family": family} if family else {}))
    if "://" in text:
        raise InputError(f"{text!r} is a URL of a scheme other than http(s); give an OpenAI-compatible http(s) endpoint.")
    path = Path(text)
    if not path.exists():
        raise InputError(f"{path} does not exist; give a bundle directory, a checkpoint directory or an http(s) URL.")
    if not path.is_dir():
        raise InputError(f"{path} is a file; give a bundle directory, a checkpoint directory or an http(s) URL.")
    from egm_edge.artifacts import read_manifest

    stage = (read_manifest(path) or {}).get("stage")
    if stage == "build":
        return BundlePredictor(path)
    if (path / "config.json").is_file() and stage in (None, "quantize", "convert"):
        return CheckpointPredictor(path, dtype=dtype, device=device)
    if stage == "export":
        raise CheckpointError(f"{path} is an export (ONNX IR), not a bundle; build it with `egm-edge build --target cpu` and validate the bundle.")
    raise CheckpointError(
        f"{path} is neither a bundle (manifest stage 'build') nor a checkpoint (config.json)"
        + (f"; its manifest says stage {stage!r}" if stage else "") + "."
    )
