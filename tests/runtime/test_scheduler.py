"""In-flight batching (egm_edge.runtime.scheduler): batched rows emit what they emit alone, each row keeps its
own budget, rows join and leave mid-flight, cancelled rows free their place, memory admission holds."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

pytest.importorskip("onnxruntime")

from egm_edge.runtime.batch_cache import BatchCache  # noqa: E402


def _image(seed: int, size=(200, 160)):
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(100, 255, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, size[0] - 40)), int(rng.integers(0, size[1] - 40))
        d.rectangle((x0, y0, x0 + 30, y0 + 30), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img


# Different images (so different prompt lengths), expressions and budgets: rows join and finish at different steps.
REQUESTS = [
    dict(image=0, text="Locate the red square", think_budget=None, max_new_tokens=24),
    dict(image=1, text="Locate the blue circle on the left", think_budget=0, max_new_tokens=24),
    dict(image=2, text="Locate it", think_budget=3, max_new_tokens=24),
    dict(image=0, text="Locate the thing at the top right of the picture", think_budget=8, max_new_tokens=24),
    dict(image=3, text="Locate the green one", think_budget=5, budget_mode="qwen", max_new_tokens=30),
    dict(image=1, text="Locate x", think_budget=2, max_new_tokens=16),
    dict(image=4, text="Locate the second square", think_budget=None, max_new_tokens=14),
]
SIZES = [(200, 160), (120, 220), (320, 240), (160, 160), (96, 64)]


def _requests():
    return [{**r, "image": _image(r["image"], SIZES[r["image"]]), "max_answer_tokens": 8} for r in REQUESTS]


def _alone(g):
    out = []
    for r in _requests():
        events = list(g.stream_text(r.pop("image"), r.pop("text"), **r))
        out.append(([e.token_id for e in events[:-1]], events[-1].result))
    return out


@pytest.fixture(scope="module")
def grounder(tiny_bundle):
    from egm_edge.runtime.grounder import Grounder

    return Grounder.open(tiny_bundle, threads=1, image_cache_size=0)


def _batched(g, max_batch, **kw):
    from egm_edge.runtime.scheduler import Scheduler

    sched = Scheduler(g, max_batch=max_batch, **kw)
    jobs = [sched.submit(g.start(**r)) for r in _requests()]
    sched.run_until_idle()
    out = []
    for job in jobs:
        events = list(job.events(deadline=0))
        out.append(([e.token_id for e in events[:-1]], events[-1].result))
    return out, sched


def _same(alone, batched):
    for k, ((ta, ra), (tb, rb)) in enumerate(zip(alone, batched)):
        assert ta == tb, (k, ta, tb)
        assert (ra.text, ra.think_tokens, ra.answer_tokens, ra.budget_forced, ra.box, ra.truncated) == \
               (rb.text, rb.think_tokens, rb.answer_tokens, rb.budget_forced, rb.box, rb.truncated), k


@pytest.mark.parametrize("max_batch", [3, 8])
def test_batched_greedy_tokens_equal_each_request_alone(grounder, max_batch):
    alone = _alone(grounder)
    batched, sched = _batched(grounder, max_batch)
    _same(alone, batched)
    assert sched.stats["peak_batch"] == min(max_batch, len(REQUESTS)) and sched.cache.rows == 0
    assert sched.stats["rows_decoded"] > sched.stats["steps"]  # rows really shared decoder calls
    for (tokens, r), req in zip(batched, REQUESTS):  # each row kept its own budget and caps
        budget = req["think_budget"]
        if budget is not None:
            assert r.think_tokens <= budget
        assert len(tokens) <= req["max_new_tokens"] and r.answer_tokens <= 8
        assert r.timings["mean_batch"] >= 1 and r.timings["queued"] >= 0


def test_growing_cache_graphs_batch_too(tiny_bundle, monkeypatch):
    from egm_edge.runtime.grounder import Grounder

    monkeypatch.setenv("EGM_EDGE_KV_IN_PLACE", "0")
    g = Grounder.open(tiny_bundle, threads=1, image_cache_size=0)
    assert not g.executor.in_place
    _same(_alone(g), _batched(g, 4)[0])


class _OneRowExecutor:
    """The ONNX Runtime executor without decode_batch, as the TensorRT engines (built for batch 1) are."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name

    def encode_image(self, *a):
        return self.inner.encode_image(*a)

    def new_cache(self, capacity):
        return self.inner.new_cache(capacity)

    def decode(self, feeds, past):
        return self.inner.decode(feeds, past)


def test_an_executor_without_batched_decode_takes_rows_in_turn(tiny_bundle):
    from egm_edge.runtime.grounder import Grounder

    g = Grounder.open(tiny_bundle, threads=1, image_cache_size=0)
    alone = _alone(g)
    g.executor = _OneRowExecutor(g.executor)
    batched, sched = _batched(g, 4)
    assert not sched.batched and sched.stats["peak_batch"] == 1
    _same(alone, batched)


def test_cancelled_rows_leave_and_the_rest_finish(grounder):
    from egm_edge.runtime.scheduler import Scheduler

    sched = Scheduler(grounder, max_batch=4)
    jobs = [sched.submit(grounder.start(**r)) for r in _requests()[:4]]
    sched.step()  # admits all four, one decode step
    assert sched.load == (4, 0) and sched.cache.rows == 4
    jobs[1].cancel()
    jobs[2].cancel()
    sched.step()
    assert sched.load[0] == 2 and sched.cache.rows == 2  # freed at the next step boundary
    sched.run_until_idle()
    assert sched.cache.rows == 0
    alone = _alone(grounder)
    assert [jobs[i].wait(deadline=0).text for i in (0, 3)] == [alone[i][1].text for i in (0, 3)]


def test_the_kv_budget_admits_what_fits_and_a_lone_request_always_runs(grounder):
    from egm_edge.runtime.scheduler import Scheduler

    per = grounder.bundle.decoder
    col = 2 * per.num_layers * per.num_kv_heads * per.head_dim * 4
    sched = Scheduler(grounder, max_batch=8, kv_budget_bytes=col)  # less than one sequence needs
    jobs = [sched.submit(grounder.start(**r)) for r in _requests()[:3]]
    sched.run_until_idle()
    assert sched.stats["peak_batch"] == 1 and all(j.wait(deadline=0) is not None for j in jobs)


def test_ground_many_yields_every_result_and_input_errors_in_place(grounder):
    from egm_edge.errors import InputError
    from egm_edge.runtime.scheduler import ground_many

    reqs = _requests()[:3]
    reqs.insert(1, {"image": b"not an image", "text": "Locate it"})
    got = dict(ground_many(grounder, reqs, max_batch=2))
    assert sorted(got) == [0, 1, 2, 3] and isinstance(got[1], InputError)
    alone = _alone(grounder)
    assert [got[i].text for i in (0, 2, 3)] == [alone[i][1].text for i in (0, 1, 2)]


# -- the batch cache alone ------------------------------------------------------------------------------

def test_batch_cache_keeps_every_row_right_aligned_through_joins_steps_and_leaves():
    rng = np.random.default_rng(0)
    c = BatchCache(n_tensors=2, kv_heads=2, head_dim=3)
    truth: list[list[np.ndarray]] = []  # per live row, per tensor: [kv, n, hd]

    def join(n):
        rows = [rng.normal(size=(2, n, 3)).astype(np.float32) for _ in range(2)]
        assert c.add(rows) == len(truth)
        truth.append(rows)

    def step():
        mask = c.prepare_step()
        assert mask.shape == (c.rows, c.P + 1)
        for b, rows in enumerate(truth):
            n = rows[0].shape[1]
            assert mask[b].sum() == n + 1 and mask[b, -1] == 1 and mask[b, : c.P - n].sum() == 0
            for t in range(2):  # what the decoder writes at column P
                new = rng.normal(size=(2, 1, 3)).astype(np.float32)
                c.arrays[t][b, :, c.P: c.P + 1] = new
                rows[t] = np.concatenate([rows[t], new], axis=1)
        c.advance()

    def check():
        assert c.lengths == [r[0].shape[1] for r in truth] and c.P == max(c.lengths, default=0)
        for b, rows in enumerate(truth):
            for t in range(2):
                np.testing.assert_array_equal(c.arrays[t][b, :, c.P - rows[t].shape[1]: c.P], rows[t])

    join(5); check(); step(); step(); check()
    join(12); check()  # longer than P: the first row shifts right
    step(); join(3); step(); check()
    for _ in range(40):  # grows capacity by doubling
        step()
    check()
    c.remove(1); truth[1] = truth.pop(); check()  # the last row took row 1; no common left padding remains
    c.remove(0); truth.pop(0); check()
    assert c.P == truth[0][0].shape[1]
    c.remove(0); truth.pop(); assert c.rows == 0 and c.P == 0
