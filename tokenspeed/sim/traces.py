"""Trace loaders: agentic coding sessions and the Mooncake conversation trace.

Traces carry token counts and per-block hash ids, not text. We synthesise token ids so that equal
hash ids give equal tokens (prefix reuse replays exactly) and, for agent sessions, so that turn
n's reply is the text turn n+1's prompt carries at those positions (the simulator samples it).
Loaders are tolerant of extra fields.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass, field

import numpy as np

VOCAB = 128_000


def _block_tokens(namespace: int, hash_ids: np.ndarray, block_size: int) -> np.ndarray:
    """Deterministic pseudo-random tokens for each (namespace, hash id, offset): splitmix64."""
    h = hash_ids.astype(np.uint64)[:, None] * np.uint64(block_size) + np.arange(block_size, dtype=np.uint64)[None, :]
    x = h + np.uint64((namespace * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x % np.uint64(VOCAB)).astype(np.int32).reshape(-1)


@dataclass
class Turn:
    prompt_len: int
    output_len: int
    hash_ids: np.ndarray
    think_time: float


@dataclass
class Session:
    name: str
    namespace: int
    block_size: int
    turns: list[Turn] = field(default_factory=list)
    _cache: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def prompt_tokens(self, i: int) -> np.ndarray:
        """Turn i's prompt; positions past its hash ids borrow from the first later turn that
        covers them (that is the conversation continuing), else fresh tokens."""
        if i in self._cache:
            return self._cache[i]
        turn, bs = self.turns[i], self.block_size
        ids = turn.hash_ids
        need_blocks = -(-turn.prompt_len // bs)
        if len(ids) < need_blocks:
            extra = None
            for later in self.turns[i + 1:]:
                if len(later.hash_ids) >= need_blocks:
                    extra = later.hash_ids[len(ids):need_blocks]
                    break
            if extra is None:  # unique filler ids, never shared
                extra = np.arange(need_blocks - len(ids), dtype=np.int64) + (1 << 40) + (i << 24)
            ids = np.concatenate([ids.astype(np.int64), np.asarray(extra, dtype=np.int64)])
        tokens = _block_tokens(self.namespace, np.asarray(ids[:need_blocks]), bs)[: turn.prompt_len]
        self._cache = {k: v for k, v in self._cache.items() if k >= i - 1}  # keep memory bounded
        self._cache[i] = tokens
        return tokens


@dataclass
class OpenLoopRequest:
    arrival_s: float
    prompt_len: int
    output_len: int
    block_ids: np.ndarray
    block_size: int

    def prompt(self) -> np.ndarray:
        """Generated on demand: the whole trace's tokens would not fit comfortably in memory."""
        return _block_tokens(0, self.block_ids, self.block_size)[: self.prompt_len]


def _open(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def load_agentic(path: str, limit: int | None = None) -> list[Session]:
    """One session per trace_*.json(.gz) file (a directory, or a single file)."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if f.endswith((".json", ".json.gz")))
    sessions = []
    for n, f in enumerate(files[:limit] if limit else files):
        with _open(f) as fh:
            data = json.load(fh)
        turns = [Turn(int(r["in"]), max(int(r.get("out", 1)), 1), np.asarray(r.get("hash_ids", []), dtype=np.int64),
                      float(r.get("think_time", 0.0) or 0.0)) for r in data.get("requests", []) if int(r.get("in", 0)) > 0]
        if turns:
            sessions.append(Session(str(data.get("id", os.path.basename(f))), n + 1, int(data.get("block_size", 64)), turns))
    return sessions


def load_mooncake(path: str, limit: int | None = None, block_size: int = 512) -> list[OpenLoopRequest]:
    out = []
    with _open(path) as fh:
        for line in fh:
            if not line.strip():
                continue
            r = json.loads(line)
            n_in = int(r["input_length"])
            ids = np.asarray(r.get("hash_ids", []), dtype=np.int64)
            need = -(-n_in // block_size)
            if len(ids) < need:  # unshared filler for uncovered tail blocks
                ids = np.concatenate([ids, (1 << 40) + len(out) * 4096 + np.arange(need - len(ids))])
            out.append(OpenLoopRequest(float(r.get("timestamp", 0)) / 1000.0, n_in,
                                       max(int(r.get("output_length", 1)), 1), ids[:need], block_size))
            if limit and len(out) >= limit:
                break
    return out


def detect_kind(path: str) -> str:
    name = os.path.basename(path.rstrip("/"))
    if os.path.isdir(path):
        if any(f.endswith((".json", ".json.gz")) for f in os.listdir(path)):
            return "agentic"
        raise ValueError(f"{path}: no trace_*.json(.gz) files (pass the agentic/ folder or a file)")
    return "mooncake" if name.endswith((".jsonl", ".jsonl.gz")) else "agentic"
