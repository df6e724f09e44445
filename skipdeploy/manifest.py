"""``manifest.json``: the only coupling between the exporter and the runtime.

Reading it checks the format version, that every listed file is present with its size and
sha256, and that the model description is complete. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import ManifestError
from .schedule import LayerSchedule, Schedule

# 2: a model family per export (``model_type`` opt, llama, mistral, qwen2), layer graphs that may
# take ``position_ids`` (RoPE) and caches of ``num_kv_heads`` heads. Version 1 exports (OPT) are
# version 2 exports whose graphs take the version-1 I/O, so both are read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
# KV contract of the layer graphs: the graph reads the past prefix and returns only the new
# entries, which the runtime binds straight into the cache slot (DESIGN.md section 4).
KV_CONTRACT = "new-entries-out"
KV_LAYOUT = "SBHD"  # [sequence, batch, heads, head_dim]

# Graph I/O names. A family whose layers rotate queries and keys by position (RoPE) gives its
# layer graphs ``position_ids`` too, and its embedding needs none; the manifest lists each graph's
# own inputs, and engines bind what it lists.
EMBED_IO = {"inputs": ["input_ids", "position_ids"], "outputs": ["hidden"]}
LAYER_IO = {"inputs": ["hidden", "past_key", "past_value", "attention_bias"],
            "outputs": ["hidden_out", "key", "value"]}
HEAD_IO = {"inputs": ["hidden"], "outputs": ["logits"]}
ROPE_EMBED_IO = {"inputs": ["input_ids"], "outputs": ["hidden"]}
ROPE_LAYER_IO = {"inputs": ["hidden", "position_ids", "past_key", "past_value", "attention_bias"],
                 "outputs": ["hidden_out", "key", "value"]}


@dataclass(frozen=True)
class ModelSpec:
    """The config values the runtime needs; the exporter fills it from the checkpoint."""

    num_layers: int
    hidden_size: int
    num_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    max_positions: int
    word_embed_proj_dim: int
    layer_norm: str  # "pre" (every family but OPT-350m) or "post" (OPT-350m)
    activation: str
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    model_type: str = "opt"  # the family (skipdeploy.families): opt, llama, mistral, qwen2
    num_kv_heads: int | None = None  # grouped-query attention: heads of the cache (None: num_heads)
    norm_eps: float = 1e-5
    rope: dict[str, Any] | None = None  # RoPE settings as read from the config (for people; the
    # layer graphs hold the inverse frequencies themselves)
    sliding_window: int | None = None  # Mistral: each position attends to this many; exports that
    # long at most, since the layers attend over every cached position

    @property
    def kv_heads(self) -> int:
        """Heads of keys and values: what the cache holds per position and layer."""
        return self.num_kv_heads or self.num_heads

    @property
    def attention_dim(self) -> int:
        """Width of the attention's queries and context (heads x head_dim; may differ from hidden)."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def pad_id(self) -> int:
        """The id fed for padding positions (they are masked, so any valid id works): the pad
        token, else EOS, else 0."""
        for value in (self.pad_token_id, self.eos_token_id, 0):
            if value is not None and 0 <= value < self.vocab_size:
                return value
        return 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        try:
            return cls(**data)
        except TypeError as exc:
            raise ManifestError(f"manifest model description is incomplete: {exc}") from None


@dataclass
class Manifest:
    directory: Path
    model: ModelSpec
    dtype: str
    opset: int
    schedule: LayerSchedule
    graphs: dict[str, Any]
    files: dict[str, dict[str, Any]]
    limits: dict[str, int] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    source: str = ""
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def max_length(self) -> int:
        """Positions a prompt plus its fed-back generated tokens may take: the export's limit,
        within the model's positions."""
        return min(self.limits.get("max_length", self.model.max_positions), self.model.max_positions)

    @cached_property  # asked at every layer call
    def layers_take_positions(self) -> bool:
        """Whether the layer graphs take ``position_ids`` (RoPE families)."""
        return "position_ids" in self.graphs["layers"][0].get("inputs", []) if self.graphs.get("layers") else False

    @cached_property
    def embed_takes_positions(self) -> bool:
        return "position_ids" in self.graphs["embed"].get("inputs", EMBED_IO["inputs"])

    def path(self, graph: str) -> Path:
        return self.directory / self.graphs[graph]["file"]

    def layer_path(self, index: int) -> Path:
        return self.directory / self.graphs["layers"][index]["file"]

    def graph_files(self, path: Path) -> list[str]:
        """The graph file at ``path`` and the external data files its weights live in."""
        entries = [self.graphs["embed"], self.graphs["head"], *self.graphs["layers"]]
        entry = next((e for e in entries if e["file"] == path.name), {})
        return [path.name, *entry.get("data", [])]

    @property
    def tokenizer_path(self) -> Path | None:
        name = self.raw.get("tokenizer")
        return self.directory / name if name else None

    @property
    def quantization(self) -> dict[str, Any] | None:
        """What was quantized (``"weights": "int8"``, the graphs, the method), or None for float weights."""
        return self.raw.get("quantization") or None

    @property
    def total_bytes(self) -> int:
        return sum(f["size"] for f in self.files.values())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_file(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def write_manifest(directory: Path, data: dict[str, Any]) -> None:
    """Write the manifest through a temporary file and a rename, so it is whole or absent."""
    tmp = directory / (MANIFEST + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, directory / MANIFEST)


def read_manifest(directory: str | os.PathLike, verify: bool = True) -> Manifest:
    """Load and validate an export directory; ``verify`` also checks every file's sha256."""
    directory = Path(directory)
    if not directory.exists():
        raise ManifestError(f"export directory {directory} does not exist")
    if not directory.is_dir():
        raise ManifestError(f"{directory} is not a directory")
    path = directory / MANIFEST
    if not path.is_file() and (directory / "config.json").is_file():
        raise ManifestError(f"{directory} is a model checkpoint, not an export: export it first "
                            f"(skipdeploy export {directory} --out DIR, or skipdeploy.export()) and use DIR")
    if not path.is_file():
        raise ManifestError(
            f"{directory} has no {MANIFEST}: not a skipdeploy export, or an export that did not finish "
            "(run `skipdeploy export` again)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path} does not hold a JSON object")
    version = data.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ManifestError(
            f"{path} has format_version {version!r}; this skipdeploy reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (re-export the model with this skipdeploy, or install the "
            "version that wrote it)")
    try:
        model = ModelSpec.from_dict(data["model"])
        schedule = LayerSchedule.from_dict(data["schedule"])
        manifest = Manifest(directory=directory, model=model, dtype=data["dtype"], opset=data["opset"],
                            schedule=schedule, graphs=data["graphs"], files=data["files"],
                            limits=data.get("limits", {}), tools=data.get("tools", {}),
                            source=data.get("source", ""), raw=data)
    except KeyError as exc:
        raise ManifestError(f"{path} lacks the required key {exc}") from None
    if data.get("kv_contract") != KV_CONTRACT:
        raise ManifestError(f"{path} uses KV contract {data.get('kv_contract')!r}; "
                            f"this runtime implements {KV_CONTRACT!r}")
    if len(manifest.graphs.get("layers", [])) != model.num_layers:
        raise ManifestError(f"{path} lists {len(manifest.graphs.get('layers', []))} layer graphs "
                            f"for a {model.num_layers}-layer model")
    if schedule.num_layers != model.num_layers:
        raise ManifestError(f"{path}: default schedule is for {schedule.num_layers} layers, "
                            f"the model has {model.num_layers}")
    check_files(manifest, verify=verify)
    return manifest


def check_files(manifest: Manifest, verify: bool = True) -> None:
    for name, info in manifest.files.items():
        file = manifest.directory / name
        if not file.is_file():
            raise ManifestError(f"{file} is missing (listed in {MANIFEST}); re-export the model")
        size = file.stat().st_size
        if size != info["size"]:
            raise ManifestError(f"{file} has {size} bytes, {MANIFEST} says {info['size']}: "
                                "the file is truncated or was replaced; re-export the model")
        if verify and sha256_file(file) != info["sha256"]:
            raise ManifestError(f"{file} does not match its sha256 in {MANIFEST}: the file is corrupted "
                                "or was modified; re-export the model")


def model_spec_dict(spec: ModelSpec) -> dict[str, Any]:
    return asdict(spec)


def default_schedule(num_layers: int) -> Schedule:
    return Schedule.full(num_layers)
