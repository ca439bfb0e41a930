"""Stage ``tokenize``: audio codes and text token ids per utterance.

A model stage (an actor pool; GPU when ``device: auto`` finds one): each row's clip is read
at the tokenizer's sample rate and encoded to ``codes`` (one list of ints per codebook,
``[n_codebooks][frames]``; multi-rate codecs such as SNAC have codebooks of different
lengths), its text to ``text_ids``. Each row carries the identity of both tokenizers as
JSON (``audio_tokenizer``, ``text_tokenizer``) so shards are self-describing.

k-means tokenizers (``kmeans-mel``, ``hubert-kmeans``) need a codebook: give one
(``audio.codebook``) or let the driver-side ``prepare`` pass fit it on this stage's
input (utterances in a seeded hash order until ``fit_max_frames`` frames are sampled).
The fitted codebook is saved as ``RUN_DIR/models/<stage id>/codebook.npy`` (reuse it for
other corpora with ``audio.codebook``) and reused on resume; on a run directory on object
storage it is an object there, which every worker reads through fsspec.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from speechmill.manifests.tokenizers.base import (
    AudioTokenizerConfig,
    TextTokenizerConfig,
    as_code_list,
)
from speechmill.pipeline.audio import AudioError
from speechmill.pipeline.stage import Reject, Resources, Stage, StageConfig, StageContext
from speechmill.pipeline.store import open_store
from speechmill.pipeline.store.layout import is_url

FITTED = ("kmeans-mel", "hubert-kmeans")


class TokenizeConfig(StageConfig):
    audio: AudioTokenizerConfig | None = Field(
        default_factory=AudioTokenizerConfig,
        description="audio tokenizer (null: text only); default k-means units over log-mel")
    text: TextTokenizerConfig | None = Field(
        default_factory=TextTokenizerConfig,
        description="text tokenizer (null: audio only); default openai-whisper's")
    fit_max_utterances: int = Field(5000, ge=1, description="utterances read to fit a "
                                    "k-means codebook")


def _clip(row: dict[str, Any], sr: int) -> np.ndarray:
    from speechmill.pipeline.clips import read_clip

    x, _ = read_clip(row, sample_rate=sr)
    return x


def _fit_order(ids: pa.ChunkedArray | pa.Array, seed: int, k: int) -> list[int]:
    """Indices of the ``k`` rows whose seeded id hash is smallest, in that order: a
    deterministic sample that does not depend on the input's order. Ids are read a slice
    at a time (memory ~ k, not the number of rows)."""
    import heapq

    def keyed():
        for a in range(0, len(ids), 65536):
            for j, x in enumerate(ids.slice(a, 65536).to_pylist()):
                yield hashlib.sha256(f"{seed}\x1f{x}".encode()).hexdigest(), a + j

    return [i for _, i in heapq.nsmallest(k, keyed())]


def _inputs_key(cfg: dict[str, Any], ids: pa.ChunkedArray | pa.Array) -> str:
    """Hash of the tokenizer config and the sorted input ids, computed in slices."""
    import pyarrow.compute as pc

    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    ordered = ids.take(pc.sort_indices(ids))
    for a in range(0, len(ordered), 65536):
        h.update("\x1f".join(map(str, ordered.slice(a, 65536).to_pylist())).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:16]


def _root_path(store: Any, rel: str) -> str:
    """``RUN_DIR/<rel>``: a local path, or the object's URL on object storage."""
    if is_url(store.root):
        return f"{store.url}/{rel}"
    return str(Path(store.root) / rel)


class Tokenize(Stage):
    name = "tokenize"
    description = "audio codes (k-means units, SNAC, Mimi, EnCodec, HuBERT units) + text ids"
    Config = TokenizeConfig
    resources = Resources(cpus=1)
    uses_model = True

    @classmethod
    def gpu_share(cls, config: StageConfig) -> float:
        """Neural codecs run on CUDA when there is one; k-means log-mel units are numpy."""
        a = getattr(config, "audio", None)
        if a is None or a.backend == "kmeans-mel" or a.device == "cpu":
            return 0.0
        return 1.0
    default_batch_size = 16
    default_batch_seconds = 300.0

    config: TokenizeConfig

    @classmethod
    def validate_config(cls, config: StageConfig) -> None:
        assert isinstance(config, TokenizeConfig)
        if config.audio is None and config.text is None:
            raise ValueError("key 'audio': give an audio or a text tokenizer (both are null)")
        a = config.audio
        if a is not None and a.codebook and not Path(a.codebook).expanduser().exists():
            raise ValueError(f"key 'audio.codebook': {a.codebook!r} does not exist")
        if a is not None and a.path and not Path(a.path).expanduser().exists():
            raise ValueError(f"key 'audio.path': {a.path!r} does not exist (a local "
                             f"{a.backend} model directory)")

    prepare_columns = ("id", "audio_path", "offset", "duration")

    @classmethod
    def prepare(cls, config: StageConfig, inputs: pa.Table,
                ctx: StageContext | None = None) -> Any:
        assert isinstance(config, TokenizeConfig)
        a = config.audio
        if a is None or a.backend not in FITTED or a.codebook or inputs.num_rows == 0:
            return None
        from speechmill.manifests.tokenizers.base import load_audio_tokenizer
        from speechmill.manifests.tokenizers.kmeans import fit_codebook, save_codebook

        order = _fit_order(inputs.column("id"), a.seed, config.fit_max_utterances)
        key = _inputs_key({"audio": a.model_dump(mode="json"),
                           "fit_max_utterances": config.fit_max_utterances},
                          inputs.column("id"))
        store = open_store(ctx.run_dir) if ctx is not None and ctx.run_dir else None
        rel = f"models/{ctx.stage_id}" if ctx is not None else ""
        # fit_key is written after the codebook: the key names a complete codebook
        if store is not None and store.read_root_file(f"{rel}/fit_key") == key.encode() \
                and store.read_root_file(f"{rel}/codebook.npy") is not None:
            return {"codebook": _root_path(store, f"{rel}/codebook.npy")}
        tok = load_audio_tokenizer(a, offline=bool(ctx and ctx.offline))
        sr = tok.info.sample_rate
        rows = inputs.select([c for c in ("id", "audio_path", "offset", "duration")
                              if c in inputs.column_names]).take(order).to_pylist()

        def clips():
            for row in rows:
                try:
                    x = _clip(row, sr)
                except AudioError:
                    continue  # unreadable rows become rejects later, in process_row
                if x.size and np.isfinite(x).all():
                    yield x, sr

        centroids = fit_codebook(tok, clips(), a)
        tok.close()
        meta = {"backend": a.backend, "fit_key": key, "n_units": a.n_units, "seed": a.seed}
        if store is None:  # unit tests without a run directory
            import tempfile

            path = str(Path(tempfile.mkdtemp(prefix="speechmill-codebook-")) / "codebook.npy")
            save_codebook(path, centroids, meta)
            return {"codebook": path}
        path = _root_path(store, f"{rel}/codebook.npy")
        save_codebook(path, centroids, meta)  # a local file, or an object (fsspec)
        store.write_root_file(f"{rel}/fit_key", key.encode())
        return {"codebook": path}

    def setup(self) -> None:
        from speechmill.manifests.tokenizers.base import (
            load_audio_tokenizer,
            load_text_tokenizer,
        )

        self.audio_tok = None
        self.text_tok = None
        a = self.config.audio
        if a is not None:
            fitted = (self.ctx.prepared or {}).get("codebook")
            if fitted:
                a = a.model_copy(update={"codebook": fitted})
            self.audio_tok = load_audio_tokenizer(a, offline=self.ctx.offline)
            self.codec_json = json.dumps(self.audio_tok.info.to_dict(), sort_keys=True)
        if self.config.text is not None:
            self.text_tok = load_text_tokenizer(self.config.text, offline=self.ctx.offline)
            self.text_json = json.dumps(self.text_tok.info.to_dict(), sort_keys=True)

    def teardown(self) -> None:
        if self.audio_tok is not None:
            self.audio_tok.close()

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        out = {**row, "parent_id": row.get("id")}
        if self.audio_tok is not None:
            sr = self.audio_tok.info.sample_rate
            try:
                x = _clip(row, sr)
            except AudioError as e:
                raise Reject(e.reason, e.detail) from None
            if x.size == 0:
                raise Reject("empty_audio", "the clip has no samples")
            if not np.isfinite(x).all():
                raise Reject("nonfinite_samples", "NaN or inf samples in the clip")
            codes = as_code_list(self.audio_tok.encode(x, sr))
            if not codes or not codes[0]:
                raise Reject("too_short", f"no code frames for {x.size / sr:.3f} s")
            out["codes"] = codes
            out["n_frames"] = len(codes[0])
            out["n_codes"] = sum(len(c) for c in codes)
            out["audio_tokenizer"] = self.codec_json
        if self.text_tok is not None:
            text = row.get("text") or ""
            out["text_ids"] = [int(t) for t in self.text_tok.encode(text)] if text else []
            out["n_text_tokens"] = len(out["text_ids"])
            out["text_tokenizer"] = self.text_json
        return out

    def outputs_table(self, rows: list[dict[str, Any]]) -> pa.Table:
        t = super().outputs_table(rows)
        for name, typ in (("codes", pa.list_(pa.list_(pa.int32()))),
                          ("text_ids", pa.list_(pa.int32()))):
            i = t.schema.get_field_index(name)
            if i >= 0 and t.column(i).type != typ:
                t = t.set_column(i, pa.field(name, typ), t.column(i).cast(typ))
        return t

    summary_columns = ("n_codes", "audio_tokenizer", "n_text_tokens")

    @classmethod
    def summarize(cls, outputs: pa.Table, rejects: pa.Table) -> dict[str, Any] | None:
        if outputs.num_rows == 0:
            return None
        import pyarrow.compute as pc

        s: dict[str, Any] = {"utterances": outputs.num_rows}
        if "n_codes" in outputs.column_names:
            s["audio_tokens"] = int(pc.sum(outputs.column("n_codes")).as_py() or 0)
            s["codec"] = json.loads(outputs.column("audio_tokenizer")[0].as_py())["name"]
        if "n_text_tokens" in outputs.column_names:
            s["text_tokens"] = int(pc.sum(outputs.column("n_text_tokens")).as_py() or 0)
        return s

    @classmethod
    def summary_lines(cls, summary: dict[str, Any]) -> list[str]:
        parts = [f"{summary['utterances']} utterances"]
        if "audio_tokens" in summary:
            parts.append(f"{summary['audio_tokens']} audio tokens ({summary['codec']})")
        if "text_tokens" in summary:
            parts.append(f"{summary['text_tokens']} text tokens")
        return [", ".join(parts)]
