"""Other CPU engines as benchmark contenders: CTranslate2, onnxruntime-genai and llama.cpp.

Each runner converts (or builds) the Hugging Face checkpoint once into its own work directory,
loads it, and then decodes batches of equal-length token-id prompts greedily, EOS suppressed so
that every row makes exactly ``max_new_tokens`` tokens, time-stamping every generated token the
way :func:`~skipdeploy.bench.runners.skipdeploy_runner` does: the clock starts before the call
that takes the prompts, ``ttft`` ends when the first new token is known, and ``token_times`` are
the gaps between the next ones. ``run`` returns a :class:`~skipdeploy.bench.runners.Run`.

These are benchmark-only dependencies (``pip install 'skipdeploy[bench]'``): only ``bench``
imports this module (``run_bench(peers=...)`` runs each peer in a worker process:
``peer_workers``), and the peer libraries are imported inside functions only; a missing one
raises :class:`~skipdeploy.errors.BackendError` with the install command.

- CTranslate2 (``ctranslate2``): ``TransformersConverter`` (OPT, Llama and many more) with a
  vocabulary of exactly the model's size, one string per id (``<id17>``), so that a random
  checkpoint's small tokenizer, or none, does not matter; prompts are mapped to those strings.
  Quantization ``float32``, ``int8_float32`` (int8 weights, float32 elsewhere) or ``int8``.
- onnxruntime-genai (``onnxruntime_genai``, whose model builder also needs ``onnx_ir``, torch
  and transformers): the model builder, run in a subprocess (``python -m
  onnxruntime_genai.models.builder -i CKPT -o OUT -p fp32|int4 -e cpu``), on Llama-family
  checkpoints (no OPT). The builder insists on a tokenizer in the checkpoint; when there is none,
  it builds from a directory of links to the checkpoint's files plus a small stand-in tokenizer
  (token ids are all the benchmark uses). It runs on the onnxruntime that skipdeploy uses (it
  loads that package's shared library).
- llama.cpp (``llama_cpp``; ``llamacpp.py``): the GGUF file the checkpoint was converted from.

The shared base (``PeerRunner``: convert once, stamped; load; run) is ``peer_base``; its names
are importable from here too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import BackendError, InputError
from .llamacpp import LlamaCppRunner
from .peer_base import STAMP, TOKENIZER_FILES, PeerRunner, checkpoint_config, equal_lengths, fingerprint, require
from .runners import Run

__all__ = ["GROUPS", "PEERS", "STAMP", "TOKENIZER_FILES", "CTranslate2Runner", "LlamaCppRunner", "OrtGenAIRunner",
           "PeerRunner", "checkpoint_config", "equal_lengths", "fingerprint", "peer", "peer_names", "peer_versions",
           "require"]


# -- CTranslate2 -----------------------------------------------------------------------------------
class CTranslate2Runner(PeerRunner):
    """CTranslate2's ``Generator`` on a ``TransformersConverter`` conversion. ``quantization``:
    ``float32``, ``int8_float32`` or ``int8`` (weights; the model is loaded with the compute type
    it was converted to)."""

    module = "ctranslate2"
    install = "pip install ctranslate2"
    title = "CTranslate2"
    QUANTIZATIONS = ("float32", "int8_float32", "int8")

    def __init__(self, checkpoint, work_dir, *, quantization: str = "float32", threads: int | None = None,
                 log=None) -> None:
        if quantization not in self.QUANTIZATIONS:
            raise InputError(f"CTranslate2 quantization must be one of {', '.join(self.QUANTIZATIONS)} "
                             f"(got {quantization!r})")
        super().__init__(checkpoint, work_dir, threads=threads, log=log)
        self.quantization = quantization
        self.generator = None
        self.tokens: list[str] = []

    def options(self) -> dict[str, Any]:
        return {"quantization": self.quantization}

    def vocabulary(self) -> list[str]:
        """One token string per id, as many as the model's embedding rows."""
        return [f"<id{i}>" for i in range(self.vocab_size)]

    def convert(self, out: Path) -> None:
        require("transformers", "pip install transformers torch")
        from ctranslate2.converters import TransformersConverter

        tokens = self.vocabulary()
        config = self.config

        def special(name: str, default: int) -> str:
            value = config.get(name)
            if isinstance(value, list):
                value = value[0] if value else None
            return tokens[value if isinstance(value, int) and 0 <= value < len(tokens) else default]

        class Vocabulary:
            """What the converter's loaders ask of a tokenizer: the vocabulary and the specials."""
            bos_token = special("bos_token_id", 0)
            eos_token = special("eos_token_id", 0)
            unk_token = special("unk_token_id", 0)
            pad_token = special("pad_token_id", 0)

            def get_vocab(self) -> dict[str, int]:
                return {t: i for i, t in enumerate(tokens)}

        class Converter(TransformersConverter):
            def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
                return Vocabulary()

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            Converter(str(self.checkpoint)).convert(str(out), quantization=self.quantization, force=True)
        except (ValueError, KeyError, NotImplementedError) as exc:
            raise BackendError(f"CTranslate2 cannot convert {self.checkpoint}: {str(exc).splitlines()[0]}") from None

    def load(self, out: Path) -> None:
        tokens_file = out / "vocabulary.json"
        if tokens_file.is_file():
            self.tokens = json.loads(tokens_file.read_text())
        else:  # older layouts: one token a line
            self.tokens = (out / "vocabulary.txt").read_text(encoding="utf-8").split("\n")[:self.vocab_size]
        self.generator = self.lib.Generator(str(out), device="cpu", intra_threads=self.threads, inter_threads=1)

    def run(self, prompts: list[list[int]], max_new_tokens: int) -> Run:
        equal_lengths(prompts)
        tokens = self.tokens
        marks: dict[int, float] = {}

        def stamp(step) -> bool:  # once per row and step: the first row's call times the step
            marks.setdefault(step.step, time.perf_counter())
            return False

        start = time.perf_counter()
        batch = [[tokens[i] for i in p] for p in prompts]
        results = self.generator.generate_batch(
            batch, max_length=max_new_tokens, min_length=max_new_tokens, sampling_topk=1, beam_size=1,
            include_prompt_in_result=False, callback=stamp)
        times = [marks[s] for s in sorted(marks)]
        return Run(times[0] - start, list(np.diff(times)), [list(r.sequences_ids[0]) for r in results])


# -- onnxruntime-genai -----------------------------------------------------------------------------
class OrtGenAIRunner(PeerRunner):
    """onnxruntime-genai's ``Generator`` on a model-builder build (``precision`` fp32, int8 or
    int4, for the CPU). Its session threads are set with a config overlay."""

    module = "onnxruntime_genai"
    install = "pip install onnxruntime-genai onnx-ir"
    title = "onnxruntime-genai"
    PRECISIONS = ("fp32", "int8", "int4")
    UNSUPPORTED = {"opt": "onnxruntime-genai's model builder has no OPT support (Llama, Mistral, Qwen, Phi, "
                          "Gemma, ... only)",
                   "gpt2": "onnxruntime-genai's model builder has no GPT-2 support"}

    def __init__(self, checkpoint, work_dir, *, precision: str = "fp32", threads: int | None = None,
                 log=None, builder_options: dict[str, str] | None = None) -> None:
        if precision not in self.PRECISIONS:
            raise InputError(f"onnxruntime-genai precision must be one of {', '.join(self.PRECISIONS)} "
                             f"(got {precision!r})")
        super().__init__(checkpoint, work_dir, threads=threads, log=log)
        self.precision = precision
        self.builder_options = dict(builder_options or {})
        self.model = None

    def options(self) -> dict[str, Any]:
        return {"precision": self.precision, "extra_options": self.builder_options}

    def unsupported(self) -> str | None:
        return self.UNSUPPORTED.get(str(self.config.get("model_type", "")).lower())

    def source(self, out: Path) -> Path:
        """The checkpoint, or (no tokenizer in it) a directory of links to its files plus a stand-in
        tokenizer, which the builder only copies."""
        if any((self.checkpoint / name).is_file() for name in TOKENIZER_FILES):
            return self.checkpoint
        staged = out.parent / (out.name + ".source")
        if staged.exists():
            shutil.rmtree(staged)
        staged.mkdir(parents=True)
        for path in self.checkpoint.iterdir():
            if path.is_file():
                (staged / path.name).symlink_to(path)
        from ..random_checkpoint import make_tokenizer

        make_tokenizer(min(self.vocab_size, 512)).save_pretrained(staged)
        self.log(f"{self.title}: {self.checkpoint} has no tokenizer; building from {staged} with a stand-in one")
        return staged

    def convert(self, out: Path) -> None:
        require("onnx_ir", "pip install onnx-ir")
        require("transformers", "pip install transformers torch")
        cache = out.parent / (out.name + ".cache")
        source = self.source(out)
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(out),
                   "-p", self.precision, "-e", "cpu", "-c", str(cache)]
        if self.builder_options:
            command += ["--extra_options", *(f"{k}={v}" for k, v in self.builder_options.items())]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        shutil.rmtree(cache, ignore_errors=True)
        if source != self.checkpoint:
            shutil.rmtree(source, ignore_errors=True)
        if proc.returncode != 0 or not (out / "genai_config.json").is_file():
            lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
            raise BackendError(f"onnxruntime-genai's model builder failed on {self.checkpoint}: {lines[-1]}")

    def load(self, out: Path) -> None:
        og = self.lib
        config = og.Config(str(out))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": self.threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)

    def run(self, prompts: list[list[int]], max_new_tokens: int) -> Run:
        og = self.lib
        length = equal_lengths(prompts)
        batch = len(prompts)
        total = length + max_new_tokens
        marks: list[float] = []
        start = time.perf_counter()
        params = og.GeneratorParams(self.model)
        # batch_size is required: without it a [B, T] input is read as one row of B*T tokens.
        params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=batch)
        generator = og.Generator(self.model, params)
        generator.append_tokens(np.asarray(prompts, dtype=np.int32))  # runs the prefill
        while not generator.is_done():
            generator.generate_next_token()  # the first call only picks from the prefill's logits
            marks.append(time.perf_counter())
        tokens = [generator.get_sequence(i)[length:].tolist() for i in range(batch)]
        del generator
        return Run(marks[0] - start, list(np.diff(marks)), tokens)


# -- the benchmark's names -------------------------------------------------------------------------
PEERS: dict[str, tuple[type[PeerRunner], dict[str, Any]]] = {
    "ct2-fp32": (CTranslate2Runner, {"quantization": "float32"}),
    "ct2-int8": (CTranslate2Runner, {"quantization": "int8_float32"}),
    "ortgenai-fp32": (OrtGenAIRunner, {"precision": "fp32"}),
    "ortgenai-int8": (OrtGenAIRunner, {"precision": "int8"}),
    "ortgenai-int4": (OrtGenAIRunner, {"precision": "int4"}),
    "llamacpp-file": (LlamaCppRunner, {"weights": "file"}),
    "llamacpp-f32": (LlamaCppRunner, {"weights": "f32"}),
}


# What ``bench --peers`` accepts besides the names above: an engine, for the precisions that its
# users pick on a CPU (issue 18: CTranslate2 float32 and int8; onnxruntime-genai fp32 and int4).
GROUPS: dict[str, tuple[str, ...]] = {
    "ct2": ("ct2-fp32", "ct2-int8"), "ctranslate2": ("ct2-fp32", "ct2-int8"),
    "ortgenai": ("ortgenai-fp32", "ortgenai-int4"), "ort-genai": ("ortgenai-fp32", "ortgenai-int4"),
    "onnxruntime-genai": ("ortgenai-fp32", "ortgenai-int4"),
    "llamacpp": ("llamacpp-f32", "llamacpp-file"), "llama.cpp": ("llamacpp-f32", "llamacpp-file"),
    "all": ("ct2-fp32", "ct2-int8", "ortgenai-fp32", "ortgenai-int4", "llamacpp-f32", "llamacpp-file"),
}


def peer_names(requested: list[str] | tuple[str, ...]) -> list[str]:
    """The peer names of a ``--peers`` list (engines expanded, duplicates dropped, order kept);
    InputError naming the known ones for anything else."""
    out: list[str] = []
    for item in requested:
        key = item.strip().lower()
        names = GROUPS.get(key) or ((key,) if key in PEERS else None)
        if names is None:
            raise InputError(f"unknown peer {item!r}: pass engines ({', '.join(GROUPS)}) or names "
                             f"({', '.join(PEERS)}), comma-separated")
        out += [n for n in names if n not in out]
    return out


def peer(name: str, checkpoint: str | os.PathLike, work_root: str | os.PathLike, *, threads: int | None = None,
         log: Callable[[str], None] | None = None) -> PeerRunner:
    """The prepared runner of a benchmark name (``ct2-fp32``, ``ortgenai-int4``, ...), converted into
    ``work_root/name``. Raises BackendError (library missing, checkpoint unsupported, conversion failed)."""
    if name not in PEERS:
        raise InputError(f"unknown peer {name!r} (known: {', '.join(PEERS)})")
    cls, options = PEERS[name]
    runner = cls(checkpoint, Path(work_root) / name, threads=threads, log=log, **options)
    runner.title = f"{name} ({cls.title})"  # two conversions of one engine: say which one
    return runner.prepare()


def peer_versions(more: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions of the installed peer libraries (and of the distributions ``more``), without importing them."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("ctranslate2", "onnxruntime-genai", "onnx-ir", "llama-cpp-python", *more):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out
