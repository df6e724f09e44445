"""``skipdeploy bench``: decode speed of an export, per batch size and schedule, against Hugging Face
and (``peers``) the CPU engines a user would pick instead.

For every batch size the contenders are: the full schedule, one SkipDecode schedule per target
speedup (``Schedule.target_speedup``), optionally the same on the export's int8 and int4 weight
versions (``--quantize int8,int4``) and, when transformers is installed and the checkpoint is at hand, Hugging Face
``generate`` on the same checkpoint with the same number of threads, and the peers asked for
(``--peers``: CTranslate2, onnxruntime-genai; converted from the checkpoint once, each run in a
process of its own, rows with the same fields and token agreement with the full schedule; one
whose package is missing is skipped with one line). Every contender runs once to warm up, then
the contenders take turns, run by run, in an order that rotates every round, so that drift of a
shared machine hits all of them alike. Ratios (speedup against the full schedule,
against Hugging Face) are medians of the per-round ratios.

Reported per row: time to first token; time per output token (median, P90, P99 over every token
of every run); output tokens/s after warm-up (batch x decode steps / decode time, median over
runs); decoder layers run per token; the measured speedup against the full schedule in the same
runtime; the speedup the multiply-add cost model predicts (``cost.py``) and the layer speedup;
the weight bytes a token reads and the memory-bandwidth floor they imply (a probe measures the
bandwidth after every round, and each round is compared with its own sample); and, per export
and batch size, the peak resident memory of a ``generate`` in a fresh process against weights +
KV cache.

Modules: ``cost`` (cost model, bytes per token), ``probes`` (bandwidth, peak memory, machine),
``runners`` (the contenders), ``peers`` (CTranslate2 and onnxruntime-genai runners),
``peer_workers`` (a process per peer), ``rows`` (result rows, token agreement), ``run``
(``run_bench``), ``report`` (table, plot); the command is ``skipdeploy.cli.bench``. Importing
needs numpy and skipdeploy; torch and transformers (the baseline), onnx (the bandwidth probe, the
int8 export), matplotlib (``plot``) and the peers' libraries (in their workers) are imported
when used.
"""

from .cost import bytes_per_token, cost_model, cost_model_speedup, graph_bytes, step_macs, weight_bytes
from .probes import (MEMORY_HEADROOM, PROBE_BYTES, BandwidthProbe, bandwidth_probe, bytes_per_second, memory_probe,
                     probe_shape, probe_weight)
from .report import format_table, plot
from .rows import agreement
from .run import BenchError, run_bench
from .runners import Contender, Run, prompts_for

__all__ = ["BandwidthProbe", "BenchError", "Contender", "MEMORY_HEADROOM", "PROBE_BYTES", "Run", "agreement",
           "bandwidth_probe", "bytes_per_second", "bytes_per_token", "cost_model", "cost_model_speedup",
           "format_table", "graph_bytes", "memory_probe", "plot", "probe_shape", "probe_weight", "prompts_for",
           "run_bench", "step_macs", "weight_bytes"]
