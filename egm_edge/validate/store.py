"""Per-side prediction files that make a validation resumable.

Contract: `predictions-<side>.jsonl` holds one JSON line per finished sample,
appended and flushed as soon as the sample is done, keyed by sample id + side +
config hash (the predictor's fingerprint and the decode settings). Reading keeps
the last line per sample for the current config and ignores other configs and a
torn last line (an interrupted write), and rows whose sample changed (same id,
other image, expression, box or task). Rows with an `error` are kept for the
record but are not "done": a rerun retries them.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

SIDES = ("candidate", "reference")


def config_hash(fingerprint: dict[str, Any], settings: dict[str, Any]) -> str:
    blob = json.dumps({"predictor": fingerprint, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sample_ids(samples) -> list[str]:
    """A stable id per sample: its own id when the data has one, else a hash of what it asks; repeats get #2, #3."""
    ids, seen = [], {}
    for s in samples:
        if s.sample_id:
            base = str(s.sample_id)
        else:
            what = json.dumps([str(s.image), s.expression, list(s.bbox), s.task, s.split], default=str)
            base = hashlib.sha1(what.encode()).hexdigest()[:12]
        seen[base] = seen.get(base, 0) + 1
        ids.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    return ids


def gt_box(sample) -> list[float]:
    """The sample's box as stored in prediction rows (floats, so that a rerun compares equal)."""
    return [float(v) for v in sample.bbox]


def same_sample(row: dict, sample) -> bool:
    return (row.get("image") == str(sample.image) and row.get("expression") == sample.expression
            and row.get("gt") == gt_box(sample) and row.get("task", "vanilla") == sample.task)


def samples_digest(samples: dict) -> str:
    """A digest of what the samples ask (id, image, expression, box, task), for keys that must change with the data."""
    what = [[i, str(s.image), s.expression, gt_box(s), s.task] for i, s in samples.items()]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


class PredictionStore:
    def __init__(self, out_dir: Path, side: str, config: str):
        self.path = Path(out_dir) / f"predictions-{side}.jsonl"
        self.side, self.config = side, config
        self._lock = threading.Lock()

    def load(self, samples: dict | None = None) -> dict[str, dict]:
        """Rows of this side and config by sample id (last one wins), errors included.

        With `samples` (id -> Sample), only rows of those ids whose image, expression, box and task are still
        the sample's: ids such as `file:line` survive an edited data file, the predictions for them must not.
        """
        rows = self._read()
        if samples is None:
            return rows
        return {i: r for i, r in rows.items() if i in samples and same_sample(r, samples[i])}

    def pending(self, samples: dict) -> list[str]:
        """Ids of `samples` (in order) with no row yet, or only a failed one."""
        rows = self.load(samples)
        return [i for i in samples if i not in rows or rows[i].get("error")]

    def _read(self) -> dict[str, dict]:
        rows: dict[str, dict] = {}
        if not self.path.is_file():
            return rows
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by an interruption; that sample is simply redone
                if isinstance(row, dict) and row.get("side") == self.side and row.get("config") == self.config and "id" in row:
                    rows[row["id"]] = row
        return rows

    def append(self, row: dict) -> None:
        line = json.dumps({**row, "side": self.side, "config": self.config, "key": f"{row['id']}|{self.side}|{self.config}"},
                          default=str)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                if f.tell() > 0 and not self._ends_with_newline():
                    f.write("\n")  # never glue a new row onto a torn one
                f.write(line + "\n")

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, 2)
            return f.read(1) == b"\n"
