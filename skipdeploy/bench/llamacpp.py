"""llama.cpp as a benchmark contender (``bench --peers llamacpp``), through llama-cpp-python.

llama.cpp runs GGUF files, so this peer runs the file a checkpoint was converted from
(``--checkpoint gguf:FILE`` or ``gguf:smollm2``; ``skipdeploy.gguf`` records the file in the
conversion): ``llamacpp-file`` is that file as it is (SmolLM2's: Q4_1 layers, a Q8_0 embedding),
``llamacpp-f32`` the same tensors dequantized to float32 and written once into the work
directory, so that llama.cpp's float path is measured on exactly the weights skipdeploy exports.

llama-cpp-python's ``Llama`` decodes one sequence at a time, so a batch of B prompts runs as B
requests one after another (what a user of that API gets without a server): the Run's first-token
time and its step times are the sums over the rows, a step making B tokens as a batched step does.
Greedy: ``top_k`` 1, temperature 0, no repeat penalty; EOS cannot end a row (``generate`` yields
until it is stopped).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .peer_base import PeerRunner, equal_lengths, require
from .runners import Run

WEIGHTS = ("file", "f32")
MODEL_FILE = "model.gguf"


class LlamaCppRunner(PeerRunner):
    """llama.cpp (``llama_cpp.Llama``) on the checkpoint's source GGUF file (``weights`` "file") or
    a float32 copy of it ("f32")."""

    module = "llama_cpp"
    install = "pip install llama-cpp-python (it builds llama.cpp from source: minutes)"
    title = "llama.cpp"

    def __init__(self, checkpoint, work_dir, *, weights: str = "file", threads: int | None = None, log=None) -> None:
        super().__init__(checkpoint, work_dir, threads=threads, log=log)
        self.weights = weights
        from ..gguf import gguf_source

        self.gguf = gguf_source(self.checkpoint)
        self.llm = None

    def options(self) -> dict[str, Any]:
        stat = self.gguf.stat() if self.gguf else None
        return {"weights": self.weights, "gguf": str(self.gguf),
                "gguf_file": [stat.st_size, int(stat.st_mtime)] if stat else None}

    def unsupported(self) -> str | None:
        if self.gguf is None:
            return ("llama.cpp runs GGUF files and this checkpoint was not converted from one: pass --checkpoint "
                    "gguf:FILE (or gguf:smollm2)")
        return None

    def convert(self, out: Path) -> None:
        out.mkdir(parents=True)
        if self.weights == "file":
            (out / MODEL_FILE).symlink_to(self.gguf)
        else:
            write_f32_gguf(self.gguf, out / MODEL_FILE)

    def load(self, out: Path) -> None:
        self.llm = self.lib.Llama(model_path=str(out / MODEL_FILE), n_ctx=2048, n_batch=512, n_threads=self.threads,
                                  n_threads_batch=self.threads, verbose=False)

    def run(self, prompts: list[list[int]], max_new_tokens: int) -> Run:
        equal_lengths(prompts)
        ttft, steps, tokens = 0.0, np.zeros(max_new_tokens - 1), []
        for prompt in prompts:
            marks: list[float] = []
            row: list[int] = []
            start = time.perf_counter()
            self.llm.reset()  # generate(reset=True) still reuses a cached prefix: every row prefills whole
            for token in self.llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                           reset=True):
                marks.append(time.perf_counter())
                row.append(int(token))
                if len(row) == max_new_tokens:
                    break
            ttft += marks[0] - start
            steps += np.diff(marks)
            tokens.append(row)
        return Run(ttft, steps.tolist(), tokens)


def write_f32_gguf(source: Path, out: Path) -> None:
    """``source`` with every tensor dequantized to float32 (metadata copied, file type ALL_F32)."""
    gguf = require("gguf", "pip install gguf")
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment"):
            continue  # the writer writes its own header, architecture and (default) alignment
        if key == "general.file_type":
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            continue
        kind = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[1]) if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)
    for tensor in reader.tensors:
        data = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, data.reshape([int(n) for n in reversed(tensor.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, out)
