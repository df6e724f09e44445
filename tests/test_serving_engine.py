"""The in-flight engine against ``Runtime.generate`` of each request alone.

Exactness: every request's tokens equal its solo generation with the same schedule and knobs,
whatever shares the batch and whenever it arrived. A different batch shape changes float
rounding, which can only flip a near-tie; any mismatch is checked against the solo top-2 margin
and reported, and the seeds here show none.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import skipdeploy
from skipdeploy import Schedule, TableSchedule
from skipdeploy.errors import CapacityError, InputError, ScheduleError
from skipdeploy.serving import QueueFullError, ServingEngine

from .conftest import Lazy, skip_without

NEAR_TIE = 1e-4  # relative top-2 margin under which a flip is float rounding, not a bug

SCHEDULES = {
    "full": Schedule.full(4),
    "2x": Schedule(4, max_layers=3, min_layers=1, decay_tokens=5),
    "3x": Schedule(4, max_layers=2, min_layers=1, decay_tokens=3, warmup_layers=0),
    "prompt-schedule": Schedule(4, max_layers=3, min_layers=2, decay_tokens=4, prompt="schedule"),
    "table": TableSchedule(4, [4, 3, 3, 1], warmup_layers=0),
}


def _requests(n: int, seed: int = 0):
    """Mixed prompt lengths, max tokens, schedules and knobs (half of them seeded sampling)."""
    rng = np.random.default_rng(seed)
    names = list(SCHEDULES)
    jobs = []
    for i in range(n):
        prompt = [2, *rng.integers(4, 500, int(rng.integers(1, 14))).tolist()]
        knobs = dict(temperature=0.9, top_p=0.95, seed=100 + i) if i % 2 else {}
        jobs.append((prompt, int(rng.integers(2, 17)), names[i % len(names)], knobs))
    return jobs


def _check_against_solo(runtime, jobs, results, near_tie=NEAR_TIE):
    report = []
    for (prompt, max_new, name, knobs), got in zip(jobs, results):
        want = runtime.generate([prompt], max_new, SCHEDULES[name], output_logits=True, **knobs)
        if got.tokens == want.tokens:
            assert got.layers_per_step == want.layers_per_step and got.finish_reasons == want.finish_reasons
            continue
        step = next(i for i, (a, b) in enumerate(zip(got.tokens[0], want.tokens[0])) if a != b)
        top2 = np.sort(want.logits[step][0])[-2:]
        margin = (top2[1] - top2[0]) / max(1.0, abs(float(top2[1])))
        report.append(f"{name} {prompt} step {step}: solo top-2 margin {margin:.1e}")
        assert not knobs and margin < near_tie, report[-1]
    if report:  # allowed, but said
        print("near-tie flips:", *report, sep="\n  ")


@pytest.fixture(scope="module")
def engines(exports):
    made = Lazy(lambda backend: skip_without(backend) or
                ServingEngine(exports["tiny"], backend=backend, max_batch=6, prefill_chunk=6))
    yield made
    for engine in made.values():
        engine.shutdown()


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_requests_arriving_in_waves_get_their_solo_tokens(engines, runtimes, backend):
    engine, jobs = engines[backend], _requests(28)
    submitted = []
    for wave in range(4):  # each wave arrives while the previous ones are decoding
        for prompt, max_new, name, knobs in jobs[wave * 7:(wave + 1) * 7]:
            submitted.append(engine.submit(prompt, max_new, SCHEDULES[name], **knobs))
        next(submitted[-7].stream(timeout=60))
    results = [r.result(timeout=120) for r in submitted]
    _check_against_solo(runtimes["tiny", backend], jobs, results)


def test_concurrent_clients_and_asyncio(engines, runtimes):
    import asyncio

    engine, jobs = engines["onnxruntime"], _requests(12, seed=1)
    results: dict[int, object] = {}

    def client(i):
        prompt, max_new, name, knobs = jobs[i]
        results[i] = engine.generate(prompt, max_new, SCHEDULES[name], **knobs)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()

    async def streamed(i):
        prompt, max_new, name, knobs = jobs[i]
        request = engine.submit(prompt, max_new, SCHEDULES[name], **knobs)
        tokens = [t async for t in request.astream()]
        assert tokens == request.tokens
        results[i] = request.to_result()

    async def main():
        await asyncio.gather(*(streamed(i) for i in range(6, 12)))

    asyncio.run(main())
    for t in threads:
        t.join(timeout=120)
    _check_against_solo(runtimes["tiny", "onnxruntime"], jobs, [results[i] for i in range(12)])


def test_eos_and_stops_end_a_request_and_free_its_slot(engines, runtimes):
    engine, runtime = engines["onnxruntime"], runtimes["tiny", "onnxruntime"]
    prompt = [2, 45, 67]
    solo = runtime.generate([prompt], 12, Schedule.full(4), eos_token_id=None).tokens[0]
    stop_at = solo[3]
    got = engine.generate(prompt, 12, Schedule.full(4), eos_token_id=None, stop_token_ids=[stop_at]).tokens[0]
    assert got == solo[:solo.index(stop_at) + 1]
    assert engine.generate(prompt, 12, Schedule.full(4), eos_token_id=solo[0]).finish_reasons == ["eos"]
    time.sleep(0.05)
    assert engine.running == 0 and engine.cache_bytes_in_use == 0


def test_cancel_frees_the_slot_and_keeps_the_others(engines):
    engine = engines["onnxruntime"]
    long = engine.submit([2, 5, 6], 120, eos_token_id=None)
    other = engine.submit([2, 7], 6, eos_token_id=None)
    next(long.stream(timeout=60))
    long.cancel()
    assert other.result(timeout=60).tokens[0] and other.finish_reason == "length"
    long.result(timeout=60)
    assert long.finish_reason == "cancelled" and len(long.tokens) < 120


def test_bad_requests_are_refused_at_submit(engines):
    engine = engines["onnxruntime"]
    with pytest.raises(InputError, match="outside the vocabulary"):
        engine.submit([2, 10**6], 4)
    with pytest.raises(InputError, match="temperature"):
        engine.submit([2, 5], 4, temperature=-1)
    with pytest.raises(InputError, match="unknown generation argument"):
        engine.submit([2, 5], 4, temprature=1)
    with pytest.raises(CapacityError, match="positions"):
        engine.submit([2] * 10, engine.max_length)
    with pytest.raises(ScheduleError):
        Schedule(4, 5, 1)


def test_a_full_queue_is_refused_and_waiting_requests_run_later(exports, runtimes):
    engine = ServingEngine(exports["tiny"], max_batch=1, max_queue=1)
    try:
        first = engine.submit([2, 5, 6], 120, eos_token_id=None)
        next(first.stream(timeout=60))  # admitted: the slot is taken
        waiting = engine.submit([2, 7], 4, eos_token_id=None)
        with pytest.raises(QueueFullError, match="try again later"):
            engine.submit([2, 8], 4)
        first.cancel()
        want = runtimes["tiny", "onnxruntime"].generate([[2, 7]], 4, eos_token_id=None).tokens
        assert waiting.result(timeout=60).tokens == want
        assert first.finish_reason == "cancelled"
    finally:
        engine.shutdown()


def test_drain_policy_admits_only_into_an_empty_batch(exports, runtimes):
    engine = ServingEngine(exports["tiny"], max_batch=4, policy="drain")
    try:
        jobs = _requests(6, seed=3)
        requests = [engine.submit(p, n, SCHEDULES[s], **k) for p, n, s, k in jobs]
        results = [r.result(timeout=60) for r in requests]
        _check_against_solo(runtimes["tiny", "onnxruntime"], jobs, results)
        # The fifth request was admitted only after the first batch of four had finished.
        assert requests[4].admitted >= max(r.token_times[-1] for r in requests[:4])
    finally:
        engine.shutdown()


def test_shutdown_finishes_running_requests_and_refuses_new_ones(exports):
    engine = ServingEngine(exports["tiny"], max_batch=2)
    request = engine.submit([2, 5, 6], 8, eos_token_id=None)
    engine.shutdown(drain_timeout=60)
    assert request.finish_reason == "length" and len(request.tokens) == 8
    with pytest.raises(skipdeploy.SkipDeployError, match="shutting down"):
        engine.submit([2, 5], 2)


def test_engine_options_are_checked(exports):
    with pytest.raises(InputError, match="max_batch"):
        ServingEngine(exports["tiny"], max_batch=0)
    with pytest.raises(InputError, match="admission policy"):
        ServingEngine(exports["tiny"], policy="random")
    with pytest.raises(CapacityError, match="lower max_batch or max_length"):
        ServingEngine(exports["tiny"], max_batch=4, memory_limit=1000)
    with pytest.raises(skipdeploy.BackendError, match="in-flight batching"):
        ServingEngine(exports["tiny"], backend="tensorrt")
    with pytest.raises(InputError, match="memory_limit must be a number of bytes"):
        ServingEngine(exports["tiny"], memory_limit=-1)


def test_max_length_beyond_the_export_is_refused_not_cut(exports):
    """A slot longer than the export was sized for used to be cut silently to the export's limit."""
    from skipdeploy.manifest import read_manifest

    limit = read_manifest(exports["tiny"], verify=False).max_length
    with pytest.raises(InputError, match=rf"max_length must be an integer in \[2, {limit}\].*got {limit + 1}"):
        ServingEngine(exports["tiny"], max_length=limit + 1, max_batch=1)
    with pytest.raises(InputError, match="max_length must be an integer >= 2"):
        ServingEngine(exports["tiny"], max_length=1, max_batch=1)


def test_layers_per_token_counts_the_prompt_and_layers_per_step_does_not(engines, runtimes):
    """Request.layers_per_token[i]: the forward that produced token i (0: the prompt's);
    Request.layers_per_step: decode steps only, as GenerationResult.layers_per_step."""
    schedule = SCHEDULES["2x"]
    request = engines["onnxruntime"].submit([2, 5, 6], 6, schedule, eos_token_id=None)
    result = request.result(timeout=60)
    want = runtimes["tiny", "onnxruntime"].generate([[2, 5, 6]], 6, schedule, eos_token_id=None)
    assert request.layers_per_token == [len(schedule.prompt_layers()), *want.layers_per_step]
    assert request.layers_per_step == want.layers_per_step == result.layers_per_step
    assert len(request.layers_per_token) == len(request.tokens) == 6


def test_aligned_policy_admits_every_few_iterations_and_stays_exact(exports, runtimes):
    engine = ServingEngine(exports["tiny"], max_batch=4, policy="aligned", align_steps=3)
    admitted_at = {}
    admit = engine._admit

    def recording_admit():  # which iteration each request joined at
        before = set(map(id, engine._running))
        admit()
        for r in engine._running:
            admitted_at.setdefault(id(r), None if not before else engine.iterations)
    engine._admit = recording_admit
    try:
        jobs = _requests(8, seed=4)
        requests = [engine.submit(p, n, SCHEDULES[s], **k) for p, n, s, k in jobs]
        results = [r.result(timeout=60) for r in requests]
        _check_against_solo(runtimes["tiny", "onnxruntime"], jobs, results)
        joined = [admitted_at[id(r)] for r in requests]
        assert all(i is None or i % 3 == 0 for i in joined), joined  # into an empty batch, or every 3rd
    finally:
        engine.shutdown()
