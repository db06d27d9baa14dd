"""The in-place KV cache: GroupQueryAttention graphs decode with one buffer per layer as past and present."""

import numpy as np
import pytest

pytest.importorskip("onnxruntime")


def _steps(executor, bundle, cache, n_prompt: int = 9, n_steps: int = 4, seed: int = 0):
    """Prefill a random text prompt, then decode n_steps tokens; -> (logits per call, final cache)."""
    d = bundle.decoder
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 200, (1, n_prompt))
    feats = np.zeros((0, d.hidden_size), np.float32)
    deep = np.zeros((d.num_deepstack, 0, d.hidden_size), np.float32)
    out = []
    total = 0
    for k in range(n_steps + 1):
        step = ids if k == 0 else rng.integers(0, 200, (1, 1))
        s = step.shape[1]
        pos = np.broadcast_to(np.arange(total, total + s)[None, None], (3, 1, s)).astype(np.int64)
        logits, cache = executor.decode(
            {"input_ids": step.astype(np.int64), "image_features": feats, "deepstack_features": deep, "position_ids": pos,
             "attention_mask": np.ones((1, total + s), np.int64), "logits_index": np.asarray([[s - 1]], np.int64)}, cache)
        out.append(logits.copy())
        total += s
    return out, cache, total


def test_in_place_cache_matches_the_growing_cache_and_copies_nothing(tiny_bundle, monkeypatch):
    from egm_edge.runtime.bundle import open_bundle
    from egm_edge.runtime.executors import KVBuffers, OrtExecutor

    bundle = open_bundle(tiny_bundle)
    assert bundle.decoder.kv_cache == "in_place"
    ex = OrtExecutor(bundle, threads=1)
    assert ex.in_place
    cache = ex.new_cache(64)
    arrays = list(cache.arrays)
    got, cache, total = _steps(ex, bundle, cache)
    assert isinstance(cache, KVBuffers) and cache.length == total
    assert all(a is b for a, b in zip(cache.arrays, arrays))  # the same buffers from the prompt to the last step

    monkeypatch.setenv("EGM_EDGE_KV_IN_PLACE", "0")
    plain = OrtExecutor(bundle, threads=1)
    assert not plain.in_place and isinstance(plain.new_cache(64), list)
    ref, present, _ = _steps(plain, bundle, plain.new_cache(64))
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for buf, p in zip(cache.arrays, present):  # rows 0..total-1 hold what the growing cache holds; the rest untouched
        np.testing.assert_allclose(buf[:, :, :total], p, rtol=1e-6, atol=1e-6)
        assert not buf[:, :, total:].any()


def test_in_place_cache_grows_when_a_sequence_outgrows_it(tiny_bundle):
    from egm_edge.runtime.bundle import open_bundle
    from egm_edge.runtime.executors import OrtExecutor

    bundle = open_bundle(tiny_bundle)
    ex = OrtExecutor(bundle, threads=1)
    small, cache_small, total = _steps(ex, bundle, ex.new_cache(10), n_prompt=9, n_steps=5)  # 14 tokens in a 10-row cache
    big, cache_big, _ = _steps(ex, bundle, ex.new_cache(64), n_prompt=9, n_steps=5)
    assert cache_small.capacity >= total and cache_small.length == total
    for a, b in zip(small, big):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_grounding_is_the_same_with_either_cache(tiny_bundle, scene, monkeypatch):
    from egm_edge.runtime.grounder import Grounder

    a = Grounder.open(tiny_bundle).ground(str(scene), "the red square", think_budget=12, max_answer_tokens=16)
    monkeypatch.setenv("EGM_EDGE_KV_IN_PLACE", "0")
    b = Grounder.open(tiny_bundle).ground(str(scene), "the red square", think_budget=12, max_answer_tokens=16)
    assert a.text == b.text and a.think_tokens == b.think_tokens and a.timings["output_tokens"] > 12


def test_positions_past_the_rotary_tables_are_refused(tiny_bundle, scene):
    import dataclasses

    from egm_edge.errors import InputError
    from egm_edge.runtime.bundle import open_bundle
    from egm_edge.runtime.grounder import Grounder

    assert open_bundle(tiny_bundle).decoder.rope_positions > 1000  # the export's M-RoPE tables
    g = Grounder.open(tiny_bundle)
    g.bundle = dataclasses.replace(g.bundle, decoder=dataclasses.replace(g.bundle.decoder, rope_positions=64))
    with pytest.raises(InputError, match="rotary position .* past the 64 positions"):
        g.ground(str(scene), "the red square", think_budget=4, max_answer_tokens=8)
