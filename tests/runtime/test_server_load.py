"""EGM's evaluation client against `egm-edge serve` at its default concurrency (issue 19's done-when).

The client is EGM's verl/scripts/sglang_infer.py re-typed (openai AsyncOpenAI, a semaphore of 64, temperature 0,
top_p 1, presence_penalty 0, max_tokens, extra_body top_k 20 / repetition_penalty 1.0; it reads
`message.content`, parses the box in EGM's order and scales it from 0..1000 to pixels). It grounds 64 synthetic
samples on the embedded (trained) tiny grounder over loopback: every request must succeed, and every sample's IoU
must equal what the same request gets when the samples go one at a time.
"""

import asyncio
import base64
import io
import json
import re
import resource

import pytest

pytest.importorskip("onnxruntime")
openai = pytest.importorskip("openai")

from egm_edge.assets import default_model_dir  # noqa: E402

N = 64
CONCURRENCY = 64  # EGM's default
PROMPT = "Locate {sent}, output its bbox coordinates using JSON format"  # its "qwen3" template
NUM = r"([+-]?(?:\d*\.\d+|\d+)(?:[eE][+-]?\d+)?)"


@pytest.fixture(scope="module")
def grounder_bundle(tmp_path_factory):
    if not (default_model_dir() / "config.json").is_file():
        pytest.skip("the embedded model is not committed")
    pytest.importorskip("torch")
    from egm_edge.builder import build_cpu
    from egm_edge.export.pipeline import export

    root = tmp_path_factory.mktemp("load")
    return build_cpu(export(default_model_dir(), root / "export", decode_steps=2), root / "bundle", max_seq_len=1024)


@pytest.fixture(scope="module")
def samples():
    from egm_edge.synth import draw, render

    out = []
    for i in range(N):
        s = draw(2026, i, amodal_fraction=0.0)
        image, buf = render(s.scene), io.BytesIO()
        image.save(buf, format="PNG")
        out.append({"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), "sent": s.expr.sent,
                    "bbox": list(s.box), "width": image.size[0], "height": image.size[1]})
    return out


def _scale(b, w, h):
    b = [min(max(float(v), 0.0), 1000.0) for v in b]
    x1, x2 = (max(0, min(round(v * w / 1000.0), w - 1)) for v in (b[0], b[2]))
    y1, y2 = (max(0, min(round(v * h / 1000.0), h - 1)) for v in (b[1], b[3]))
    return [x1, y1, x2 if x2 != x1 else min(x1 + 1, w - 1), y2 if y2 != y1 else min(y1 + 1, h - 1)]


def _iou(a, b):
    if a is None:
        return 0.0
    w, h = max(0, min(a[2], b[2]) - max(a[0], b[0])), max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    denom = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / denom if denom else 0.0


async def _call(client, rec, sem):
    async with sem:
        resp = await client.chat.completions.create(
            model="egm", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": rec["url"], "detail": "high"}},
                {"type": "text", "text": PROMPT.format(sent=rec["sent"])}]}],
            temperature=0.0, top_p=1.0, presence_penalty=0.0, max_tokens=256,
            extra_body={"top_k": 20, "repetition_penalty": 1.0})
    txt = resp.choices[0].message.content
    m = re.search(r'"bbox_2d"\s*:\s*\[\s*' + r"\s*,\s*".join([NUM] * 4) + r"\s*\]", txt, flags=re.S)
    m2 = re.search(r"\[\s*" + r"\s*,\s*".join([NUM] * 4) + r"\s*\]", txt, flags=re.S)
    nums = re.findall(NUM, txt)
    box = [float(g) for g in (m or m2).groups()] if (m or m2) else ([float(v) for v in nums[-4:]] if len(nums) >= 4 else None)
    return _iou(_scale(box, rec["width"], rec["height"]) if box else None, rec["bbox"]), resp.usage.completion_tokens


async def _run(url, samples, concurrency):
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(concurrency)
    try:
        return await asyncio.gather(*[_call(client, r, sem) for r in samples], return_exceptions=True)
    finally:
        await client.close()


def test_egm_client_at_concurrency_64_gets_every_answer_and_the_same_ious(grounder_bundle, samples):
    from egm_edge.runtime.grounder import Grounder
    from egm_edge.runtime.server import ServerConfig, serve
    import threading

    g = Grounder.open(grounder_bundle, threads=2)
    srv = serve(g, ServerConfig(port=0, max_batch=8, kv_budget_bytes=64 * 2**20, request_timeout_s=600))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        alone = asyncio.run(_run(url, samples, 1))
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        loaded = asyncio.run(_run(url, samples, CONCURRENCY))
        rss_growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        stats = dict(srv.engine.stats)
    finally:
        srv.shutdown()
        srv.server_close()
    errors = [r for r in loaded + alone if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert [r[0] for r in loaded] == [r[0] for r in alone]  # every sample's IoU, so Acc@0.5 too
    acc = sum(r[0] > 0.5 for r in loaded) / N
    assert acc > 0.5, json.dumps({"acc": acc})  # a trained grounder, not noise: the comparison means something
    assert stats["peak_batch"] == 8 and stats["peak_kv_bytes"] <= 64 * 2**20
    assert rss_growth_mb < 400, rss_growth_mb
