"""A skipdeploy export as a Triton Inference Server model (Python backend, decoupled).

``skipdeploy triton`` copies this file verbatim to ``REPO/NAME/1/model.py``, beside
``skipdeploy.json`` (the export's path and the engine's options). The Python backend runs it in
its stub process, which must import skipdeploy (NVIDIA's image with ``pip install skipdeploy``, or
``python -m skipdeploy.triton.server``; docs/triton.md).

Interface: that of Triton's vLLM backend, so that its clients and Triton's LLM tools (the
generate endpoints, genai-perf, tritonclient streaming) work unchanged:

* inputs: ``text_input`` (BYTES [1]) or ``input_ids`` (INT64 [-1], token ids); optional
  ``stream`` (BOOL), ``sampling_parameters`` (BYTES: a JSON object; without it the request's
  parameters are read, as the generate endpoint passes them), ``exclude_input_in_output``
  (BOOL), and ``return_finish_reason``, ``return_num_input_tokens``,
  ``return_num_output_tokens`` (BOOL);
* outputs: ``text_output`` (BYTES) for ``text_input``, ``output_ids`` (INT64) for
  ``input_ids``; ``finish_reason``, ``num_input_tokens``, ``num_output_tokens`` when asked.

As in the vLLM backend, a non-streamed output starts with the input unless
``exclude_input_in_output`` is true; a streamed one never does, and each response carries only
what is new: one response per generated token (its id, or the text it completed; a token that
completes no printable text, half a UTF-8 character or a possible stop-string prefix, goes with
the next one), the last one final. The responses joined equal the non-streamed output. The text
ends before the first stop string (vLLM's and OpenAI's rule); ``output_ids`` are every generated
token, as ``Runtime.generate`` returns them.

``sampling_parameters`` keys: max_tokens (16), temperature (1.0; 0 is greedy), top_p, top_k
(0 or -1: off), seed, repetition_penalty, stop (a string or a list), stop_token_ids, ignore_eos,
and skipdecode (an object of schedule fields, as the CLI's schedule flags and the OpenAI
server's ``skipdecode``: target_speedup, max_layers, min_layers, warmup_layers, decay_tokens,
prompt_layers, table, full). Numbers may be given as strings, as vLLM clients often do. Unknown
keys and bad values are refused with one line (INVALID_ARG, HTTP 400); a full queue with
UNAVAILABLE; the model stays loaded.

Threads: ``execute`` (Triton's thread) parses, tokenizes and submits each request to the
engine and returns at once; the engine's thread runs the batch; one dispatcher thread, woken by
the engine after every iteration, sends each request's new tokens through its response sender,
checks ``request.is_cancelled()`` (a cancelled request leaves the batch at the next iteration)
and finishes requests. Outcomes go to Triton's log; the engine's state to Triton's metrics
endpoint (``skipdeploy_*`` gauges and counters, labelled with the model).
"""

from __future__ import annotations

import json
import os
import threading
import time
import traceback

import numpy as np

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (documentation, linters): the model cannot run
    pb_utils = None

from skipdeploy.runtime.text import CompletionText
from skipdeploy.triton.parameters import (CONFIG_FILE, FINISH_REASONS, RequestError, parse_sampling_parameters,
                                          read_config)

CANCEL_CHECK_SECONDS = 0.05      # how often each running request's cancellation is asked for
METRICS_SECONDS = 0.1            # how often the gauges are refreshed (and once when the engine idles)


class _InFlight:
    __slots__ = ("triton", "sender", "request", "stream", "prepend", "text", "prompt_text", "prompt_ids",
                 "ids_sent", "tokens_sent", "returns", "next_cancel_check", "started", "label")

    def __init__(self, triton_request, sender, request, stream, prepend, text, prompt_text, prompt_ids, returns,
                 label) -> None:
        self.triton, self.sender, self.request = triton_request, sender, request
        self.stream, self.prepend, self.text = stream, prepend, text
        self.prompt_text, self.prompt_ids, self.returns, self.label = prompt_text, prompt_ids, returns, label
        self.ids_sent = 0            # generated ids already sent (streaming)
        self.tokens_sent = 0         # generated tokens accounted for in sent responses
        self.next_cancel_check = 0.0
        self.started = time.perf_counter()


class TritonPythonModel:
    """The Python backend's model: one ServingEngine per model instance."""

    # -- life --------------------------------------------------------------------------------------
    def initialize(self, args) -> None:
        from skipdeploy import LayerSchedule, ServingEngine, __version__
        from skipdeploy.runtime.kv import format_bytes

        self.logger = pb_utils.Logger
        self.model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(self.model_config):
            raise pb_utils.TritonModelException("the skipdeploy model needs model_transaction_policy "
                                                "{ decoupled: true } in config.pbtxt")
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        if not os.path.isfile(os.path.join(version_dir, CONFIG_FILE)):
            version_dir = os.path.dirname(os.path.abspath(__file__))
        self.config = read_config(version_dir)
        options = dict(self.config.get("engine", {}))
        schedule = self.config.get("schedule")
        self.name = f"{args['model_name']}/{args['model_version']} ({args.get('model_instance_name', '')})"
        self.serving = ServingEngine(self.config["export"], schedule=LayerSchedule.from_dict(schedule) if schedule
                                     else None, observer=self, **options)
        self.has_tokenizer = self.serving.manifest.tokenizer_path is not None
        self._lock = threading.Lock()          # guards _incoming
        self._incoming: list = []
        self._active: list = []                # the dispatcher's alone
        self._wake = threading.Event()
        self._stopping = False
        self.peak_rows = 0                     # the most requests one engine iteration advanced
        self.iterations = 0
        self.sends, self.send_seconds = 0, 0.0  # responses sent by the dispatcher, and the time it took
        self._published: dict = {}
        self._next_metrics = 0.0
        self._setup_metrics(args)
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="skipdeploy-triton-dispatch",
                                            daemon=True)
        self._dispatcher.start()
        serving = self.serving
        self.logger.log_info(
            f"[skipdeploy] {self.name}: skipdeploy {__version__}, export {self.config['export']} "
            f"({serving.spec.num_layers} layers), {serving.max_batch} slots x {serving.max_length} positions "
            f"({format_bytes(serving.slot_bytes * serving.max_batch)} of KV cache), "
            f"queue {serving.max_queue}, prefill chunk {serving.prefill_chunk}, default schedule "
            f"{serving.schedule.describe()}")

    def finalize(self) -> None:
        """Triton unloads the model once in-flight requests finished (or its exit timeout passed):
        cancel what is left, answer it UNAVAILABLE, and stop the threads."""
        self._stopping = True
        self._wake.set()
        self._dispatcher.join(10)
        with self._lock:
            left = self._active + self._incoming
            self._active, self._incoming = [], []
        for job in left:
            job.request.cancel()
            self._send_error(job, "the model is being unloaded", "UNAVAILABLE")
        self.serving.shutdown(drain_timeout=5)
        per_send = f", {1e6 * self.send_seconds / self.sends:.0f} us per send" if self.sends else ""
        self.logger.log_info(f"[skipdeploy] {self.name}: stopped; {self.iterations} iterations, at most "
                             f"{self.peak_rows} requests in one; {self.sends} responses{per_send}")

    # -- the engine's observer (its thread) ---------------------------------------------------------
    def on_iteration(self, stats, seconds) -> None:
        self.iterations += 1
        if stats.rows > self.peak_rows:
            self.peak_rows = stats.rows
        self._wake.set()

    def on_finish(self, request) -> None:
        self._wake.set()

    # -- requests (Triton's thread) -----------------------------------------------------------------
    def execute(self, requests):
        for triton_request in requests:
            sender = triton_request.get_response_sender()
            label = triton_request.request_id() or "-"
            try:
                job = self._submit(triton_request, sender, label)
            except RequestError as exc:
                self._refuse(sender, label, str(exc), exc.code)
                continue
            except Exception as exc:  # noqa: BLE001 - the engine's own errors: one line each
                from skipdeploy import QueueFullError, SkipDeployError

                if isinstance(exc, QueueFullError):
                    self._refuse(sender, label, str(exc), "UNAVAILABLE")
                elif isinstance(exc, (SkipDeployError, ValueError, TypeError)):
                    self._refuse(sender, label, str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                                 "INVALID_ARG")
                else:
                    self.logger.log_error(f"[skipdeploy] request {label}: {traceback.format_exc()}")
                    self._refuse(sender, label, f"internal error: {exc}", "INTERNAL")
                continue
            with self._lock:
                self._incoming.append(job)
            self._wake.set()
        return None

    def _submit(self, triton_request, sender, label) -> _InFlight:
        if not self.serving.ready:
            raise RequestError("the engine is not running (see the server's log)", "UNAVAILABLE")
        text_input = pb_utils.get_input_tensor_by_name(triton_request, "text_input")
        input_ids = pb_utils.get_input_tensor_by_name(triton_request, "input_ids")
        if (text_input is None) == (input_ids is None):
            raise RequestError("give exactly one of text_input (BYTES) and input_ids (INT64)")
        stream = self._bool_input(triton_request, "stream", False)
        exclude = self._bool_input(triton_request, "exclude_input_in_output", None)
        prepend = (not exclude) if exclude is not None else not stream
        if prepend and stream:
            raise RequestError("when streaming, exclude_input_in_output = false is not allowed")
        sampling = pb_utils.get_input_tensor_by_name(triton_request, "sampling_parameters")
        raw = sampling.as_numpy().reshape(-1)[0] if sampling is not None else triton_request.parameters()
        params = parse_sampling_parameters(raw)
        prompt_text = None
        if text_input is not None:
            value = text_input.as_numpy().reshape(-1)
            if value.size != 1:
                raise RequestError(f"text_input must hold one string (got {value.size})")
            prompt_text = value[0].decode("utf-8", errors="strict") if isinstance(value[0], bytes) else str(value[0])
            if not self.has_tokenizer:
                raise RequestError("this export has no tokenizer: send input_ids (INT64 token ids)")
            prompt_ids = self.serving.tokenizer.encode(prompt_text)
        else:
            prompt_ids = [int(t) for t in input_ids.as_numpy().reshape(-1)]
        try:
            schedule = params.schedule_for(self.serving.spec.num_layers, self.serving.schedule)
        except ValueError as exc:  # request_params.RequestError naming sampling_parameters.skipdecode
            raise RequestError(str(exc)) from None
        returns = {name: bool(self._bool_input(triton_request, f"return_{name}", False))
                   for name in ("finish_reason", "num_input_tokens", "num_output_tokens")}
        request = self.serving.submit(prompt_ids, params.max_new_tokens, schedule,
                                     request_id=None if label == "-" else label, **params.knobs())
        text = None
        if prompt_text is not None:
            text = CompletionText(self.serving.tokenizer.decode, params.stop)
        return _InFlight(triton_request, sender, request, stream, prepend, text, prompt_text, prompt_ids,
                         returns, request.id)

    @staticmethod
    def _bool_input(triton_request, name, default):
        tensor = pb_utils.get_input_tensor_by_name(triton_request, name)
        if tensor is None:
            return default
        value = tensor.as_numpy().reshape(-1)
        if value.size != 1:
            raise RequestError(f"{name} must hold one boolean (got {value.size} values)")
        return bool(value[0])

    # -- responses (the dispatcher's thread) --------------------------------------------------------
    def _dispatch_loop(self) -> None:
        while not self._stopping:
            woke = self._wake.wait(0.1)
            self._wake.clear()
            if self._stopping:
                break
            with self._lock:
                if self._incoming:
                    self._active.extend(self._incoming)
                    self._incoming = []
            now = time.perf_counter()
            if not self.serving.ready and self._active:  # its thread died: nothing will come
                self.logger.log_error(f"[skipdeploy] {self.name}: the engine stopped; failing "
                                      f"{len(self._active)} request(s)")
                for job in self._active:
                    self._send_error(job, "the engine stopped", "UNAVAILABLE")
                self._active = []
            still = []
            for job in self._active:
                try:
                    done = self._advance(job, now)
                except Exception:  # noqa: BLE001 - one request's failure must not stop the others
                    self.logger.log_error(f"[skipdeploy] request {job.label}: {traceback.format_exc()}")
                    job.request.cancel()
                    self._send_error(job, "internal error while sending the response", "INTERNAL")
                    done = True
                if not done:
                    still.append(job)
            self._active = still
            self._publish_metrics(now, force=not woke)

    def _advance(self, job: _InFlight, now: float) -> bool:
        """Send what is new for ``job``; True once its last response went out."""
        request = job.request
        done = request.done                     # read first: once done, tokens are complete
        if not done:
            if now >= job.next_cancel_check:
                job.next_cancel_check = now + CANCEL_CHECK_SECONDS
                if job.triton.is_cancelled():
                    request.cancel()            # the engine drops it at its next iteration
            if job.stream and len(request.tokens) > job.tokens_sent:
                self._send_deltas(job, request.tokens[:], final=False)
            return False
        tokens = request.tokens[:]
        reason = request.finish_reason
        if reason == "cancelled":
            self._send_error(job, "the request was cancelled", "CANCELLED")
        elif reason == "error":
            self._send_error(job, f"generation failed: {request.error}", "INTERNAL")
        elif job.stream:
            self._send_deltas(job, tokens, final=True)
        else:
            self._send_whole(job, tokens)
        self._log_finish(job, tokens, reason)
        return True

    def _send_deltas(self, job: _InFlight, tokens: list, final: bool) -> None:
        """A response per new token, however many the engine made since the last look (the
        dispatcher may lag behind a fast engine): clients count tokens by responses, as with the
        vLLM backend. With ``final``, the last one ends the stream (an empty one if every token
        went out already)."""
        ends = list(range(job.tokens_sent + 1, len(tokens) + 1))
        if final and not ends:
            ends = [len(tokens)]
        for end in ends:
            self._send_delta(job, tokens[:end], final=final and end == ends[-1])

    def _send_delta(self, job: _InFlight, tokens: list, final: bool) -> None:
        outputs = []
        if job.text is not None:
            piece = job.text.extend(tokens[len(job.text.tokens):])
            if final:
                piece += job.text.rest()
            if not piece and not final:
                return                          # nothing printable yet (half a character, a stop prefix)
            outputs.append(pb_utils.Tensor("text_output", np.array([piece.encode("utf-8")], dtype=np.object_)))
        else:
            outputs.append(pb_utils.Tensor("output_ids", np.array(tokens[job.ids_sent:], dtype=np.int64)))
            job.ids_sent = len(tokens)
        new = len(tokens) - job.tokens_sent
        job.tokens_sent = len(tokens)
        outputs += self._extras(job, new, final)
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        self._send(job, pb_utils.InferenceResponse(output_tensors=outputs), flags)

    def _send_whole(self, job: _InFlight, tokens: list) -> None:
        if job.text is not None:
            job.text.tokens = list(tokens)
            text = job.text.text()
            if job.prepend:
                text = job.prompt_text + text
            outputs = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
        else:
            ids = (list(job.prompt_ids) if job.prepend else []) + list(tokens)
            outputs = [pb_utils.Tensor("output_ids", np.array(ids, dtype=np.int64))]
        outputs += self._extras(job, len(tokens), True)
        self._send(job, pb_utils.InferenceResponse(output_tensors=outputs), pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _send(self, job: _InFlight, response, flags) -> None:
        start = time.perf_counter()
        job.sender.send(response, flags=flags)
        self.sends += 1
        self.send_seconds += time.perf_counter() - start

    def _extras(self, job: _InFlight, new_tokens: int, final: bool) -> list:
        out = []
        if job.returns["finish_reason"]:
            reason = FINISH_REASONS.get(job.request.finish_reason, "length") if final else "None"
            out.append(pb_utils.Tensor("finish_reason", np.array([reason.encode()], dtype=np.object_)))
        if job.returns["num_input_tokens"]:
            out.append(pb_utils.Tensor("num_input_tokens", np.array([len(job.prompt_ids)], dtype=np.uint32)))
        if job.returns["num_output_tokens"]:
            out.append(pb_utils.Tensor("num_output_tokens", np.array([new_tokens], dtype=np.uint32)))
        return out

    def _send_error(self, job: _InFlight, message: str, code: str) -> None:
        try:
            job.sender.send(pb_utils.InferenceResponse(error=self._error(message, code)),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:  # noqa: BLE001 - the client may be gone
            self.logger.log_warn(f"[skipdeploy] request {job.label}: could not send its last response: {exc}")
        self.logger.log_info(f"[skipdeploy] request {job.label}: {code.lower()}: {message}")

    def _refuse(self, sender, label: str, message: str, code: str) -> None:
        message = " ".join(message.split())  # one line
        self.logger.log_warn(f"[skipdeploy] refused request {label}: {message}")
        self._count("refused", code.lower())
        sender.send(pb_utils.InferenceResponse(error=self._error(message, code)),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    @staticmethod
    def _error(message: str, code: str):
        return pb_utils.TritonError(message, getattr(pb_utils.TritonError, code, pb_utils.TritonError.INTERNAL))

    def _log_finish(self, job: _InFlight, tokens: list, reason: str) -> None:
        seconds = time.perf_counter() - job.started
        steps = job.request.layers_per_step
        mean = f", {sum(steps) / len(steps):.2f} layers per decode step" if steps else ""
        self.logger.log_info(
            f"[skipdeploy] request {job.label}: {reason}, {len(tokens)} tokens from a {len(job.prompt_ids)}-token "
            f"prompt in {seconds * 1e3:.0f} ms{mean}; batch rows peak {self.peak_rows}")
        self._count("finished", reason)
        self._count("tokens", None, len(tokens))

    # -- metrics -----------------------------------------------------------------------------------
    def _setup_metrics(self, args) -> None:
        self._metrics = {}
        labels = {"model": args["model_name"], "version": args["model_version"],
                  "instance": args.get("model_instance_name", "")}
        try:
            gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
            families = {
                "running": ("skipdeploy_requests_running", "Requests in the engine's batch", gauge),
                "waiting": ("skipdeploy_requests_waiting", "Requests waiting for a slot", gauge),
                "slots": ("skipdeploy_slots", "Slots (the most requests batched at once)", gauge),
                "peak": ("skipdeploy_batch_rows_peak", "The most requests one engine iteration advanced", gauge),
                "finished": ("skipdeploy_requests_finished_total", "Requests finished, by reason", counter),
                "refused": ("skipdeploy_requests_refused_total", "Requests refused, by error code", counter),
                "tokens": ("skipdeploy_generated_tokens_total", "Tokens generated", counter),
            }
            self._families = {key: pb_utils.MetricFamily(name=name, description=text, kind=kind)
                              for key, (name, text, kind) in families.items()}
        except Exception as exc:  # noqa: BLE001 - metrics disabled on the server
            self.logger.log_info(f"[skipdeploy] no custom metrics: {exc}")
            self._families = {}
        self._labels = labels
        for key in ("running", "waiting", "slots", "peak", "tokens"):
            self._metric(key)
        if "slots" in self._metrics:
            self._metrics["slots"].set(self.serving.max_batch)

    def _metric(self, key: str, label: tuple | None = None):
        """The metric ``key`` (with one extra label (name, value)), created on first use."""
        family = self._families.get(key)
        if family is None:
            return None
        name = key if label is None else f"{key}:{label[1]}"
        if name not in self._metrics:
            self._metrics[name] = family.Metric(labels={**self._labels, **dict([label] if label else [])})
        return self._metrics[name]

    def _count(self, key: str, label: str | None, amount: float = 1) -> None:
        try:
            metric = self._metric(key, ("reason" if key == "finished" else "code", label) if label else None)
            if metric is not None:
                metric.increment(amount)
        except Exception:  # noqa: BLE001 - metrics never fail a request
            pass

    def _publish_metrics(self, now: float, force: bool = False) -> None:
        values = {"peak": self.peak_rows}
        if force or now >= self._next_metrics:
            self._next_metrics = now + METRICS_SECONDS
            values.update(running=self.serving.running, waiting=self.serving.queue_depth)
        for key, value in values.items():
            if self._published.get(key) != value and self._metric(key) is not None:
                try:
                    self._metrics[key].set(value)
                    self._published[key] = value
                except Exception:  # noqa: BLE001
                    pass
