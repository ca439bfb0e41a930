"""Near-duplicate dialogues within a run: MinHash over word n-grams, no embeddings.

A dialogue's signature is the MinHash (64 permutations, blake2b-hashed word n-grams of
all its turns, case and punctuation ignored) of its text; the Jaccard similarity of two
dialogues' n-gram sets is estimated as the share of equal signature entries, and
candidates are found with LSH banding (bands chosen so that pairs at the threshold are
almost surely candidates).

**Which one is kept.** Every worker of the stage checks its dialogues against a shared
*claims* file, ``RUN_DIR/stages/<stage id>/_dedup/claims.jsonl``, under an exclusive
``flock``: a dialogue similar to one already claimed (at ``threshold`` or above) is
rejected as ``near_duplicate``; otherwise it is claimed (appended) and kept. Check and
claim are one atomic step, so of two near-duplicates exactly one is kept even when two
workers produce them at the same moment. Claims are made in plan order within a batch
and batches are claimed as they finish: with the local executor (batches in plan order)
the earliest dialogue of the plan wins, exactly as in an uninterrupted run; on Ray it is
the first to finish. A claim is never revised: a batch killed after claiming is redone
on resume from the LLM cache with the same dialogue id and text, finds its own claims
and keeps the same dialogues, and a dialogue rejected against a claim is rejected again,
so a resume never changes a decision and never lets a near-duplicate pair through. The
file lives in the stage's directory, so ``--restart-from`` (which clears it) starts the
claims afresh with the outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from speechmill.synth.llm.cache import file_lock

NUM_PERM = 64
_P = (1 << 31) - 1  # Mersenne prime: (a * x + b) mod p stays below 2**62 in uint64
_rng = np.random.default_rng(20240611)
_A = _rng.integers(1, _P, NUM_PERM, dtype=np.uint64)
_B = _rng.integers(0, _P, NUM_PERM, dtype=np.uint64)
_WORD = re.compile(r"\w+", re.UNICODE)


def shingles(text: str, n: int = 3) -> set[str]:
    """Word n-grams of ``text`` (case-folded; the whole text when shorter than n)."""
    words = _WORD.findall(text.casefold())
    if len(words) < n:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def signature(text: str, n: int = 3) -> np.ndarray:
    """MinHash signature (``NUM_PERM`` uint32) of ``text``'s word n-grams."""
    sh = shingles(text, n)
    if not sh:
        return np.full(NUM_PERM, _P, dtype=np.uint32)
    x = np.array([int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8)
                                 .digest(), "little") % _P for s in sorted(sh)],
                 dtype=np.uint64)
    v = (x[:, None] * _A[None, :] + _B[None, :]) % np.uint64(_P)
    return v.min(axis=0).astype(np.uint32)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two signatures."""
    return float(np.mean(a == b))


def bands_for(threshold: float) -> tuple[int, int]:
    """(bands, rows) for LSH: pairs at ``threshold`` become candidates with probability
    above 99 % (the S-curve's midpoint well below the threshold)."""
    for rows in (8, 4, 2, 1):
        bands = NUM_PERM // rows
        if 1 - (1 - threshold ** rows) ** bands >= 0.99:
            return bands, rows
    return NUM_PERM, 1


class ClaimIndex:
    """The claims file of a stage and this process's view of it."""

    def __init__(self, directory: str | os.PathLike[str], threshold: float) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "claims.jsonl"
        self.lock_path = self.dir / "claims.lock"
        self.threshold = threshold
        self.bands, self.rows = bands_for(threshold)
        self.sigs: dict[str, np.ndarray] = {}
        self.buckets: list[dict[bytes, list[str]]] = [{} for _ in range(self.bands)]
        self.offset = 0

    def _add(self, did: str, sig: np.ndarray) -> None:
        self.sigs[did] = sig
        for b in range(self.bands):
            key = sig[b * self.rows:(b + 1) * self.rows].tobytes()
            self.buckets[b].setdefault(key, []).append(did)

    def _refresh(self) -> None:
        """Read the claims other processes appended since the last look."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n")
        if end < 0:
            return
        for line in data[:end].split(b"\n"):
            try:
                rec = json.loads(line)
                sig = np.frombuffer(bytes.fromhex(rec["s"]), dtype=np.uint32).copy()
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a killed writer
            if sig.shape == (NUM_PERM,) and rec["d"] not in self.sigs:
                self._add(str(rec["d"]), sig)
        self.offset += end + 1

    def nearest(self, sig: np.ndarray, exclude: str = "") -> tuple[str | None, float]:
        """The most similar claimed dialogue among the LSH candidates."""
        best: tuple[str | None, float] = (None, 0.0)
        seen: set[str] = set()
        for b in range(self.bands):
            key = sig[b * self.rows:(b + 1) * self.rows].tobytes()
            for did in self.buckets[b].get(key, ()):
                if did in seen or did == exclude:
                    continue
                seen.add(did)
                s = similarity(sig, self.sigs[did])
                if s > best[1]:
                    best = (did, s)
        return best

    def claim(self, items: list[tuple[str, np.ndarray]]
              ) -> dict[str, tuple[str, float] | None]:
        """Check and claim ``items`` (dialogue id, signature) in order, atomically across
        processes: ``None`` for a kept dialogue, else (the claimed dialogue it
        duplicates, similarity)."""
        out: dict[str, tuple[str, float] | None] = {}
        with file_lock(self.lock_path):
            self._refresh()
            lines = []
            for did, sig in items:
                if did in self.sigs:  # claimed by an earlier attempt of this very row
                    out[did] = None
                    continue
                other, sim = self.nearest(sig, exclude=did)
                if other is not None and sim >= self.threshold:
                    out[did] = (other, sim)
                    continue
                self._add(did, sig)
                lines.append(json.dumps({"d": did, "s": sig.astype(np.uint32).tobytes()
                                         .hex()}) + "\n")
                out[did] = None
            if lines:
                with open(self.path, "ab") as f:
                    if f.tell() > 0:
                        with open(self.path, "rb") as r:
                            r.seek(-1, os.SEEK_END)
                            if r.read(1) != b"\n":
                                f.write(b"\n")  # a killed writer's partial line ends here
                    f.write("".join(lines).encode())
                    f.flush()
                self.offset = self.path.stat().st_size
        return out
