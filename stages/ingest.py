"""Stage ``ingest``: find input files, hash them, probe them.

Inputs are local paths, directories (walked for media extensions), globs, fsspec URLs
(``s3://``, ``gs://``, ``https://``, ``file://``) and file lists (txt: one path per line;
csv/jsonl: a ``path``/``url``/``audio_path``/``audio_filepath`` column, other columns kept
as metadata). Each file's record id is its content hash, so the same content under two
names is one record; the other copy is rejected as ``duplicate``.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import Field, field_validator

from speechmill.pipeline.audio import (
    MEDIA_EXTENSIONS,
    AudioError,
    decoded_duration,
    is_url,
    local_path,
    probe,
)
from speechmill.pipeline.records import content_id, key_id
from speechmill.pipeline.stage import Reject, Resources, Stage, StageConfig

_LIST_KEYS = ("path", "url", "audio_path", "audio_filepath", "source_url")
_CORE_META = ("speaker", "language", "text")


class IngestConfig(StageConfig):
    inputs: list[str] = Field(
        default_factory=list,
        description="paths, directories, globs or fsspec URLs",
    )
    file_list: str | None = Field(None, description="txt/csv/jsonl file naming the inputs")
    extensions: list[str] = Field(
        default_factory=lambda: list(MEDIA_EXTENSIONS),
        description="file extensions taken when walking directories and globs",
    )
    recursive: bool = Field(True, description="walk directories recursively")
    max_bytes: int = Field(20 * 1024**3, gt=0, description="larger files are rejected")
    count_samples_below_bytes: int = Field(
        64 * 1024**2, ge=0,
        description="files whose header has no duration are decoded to count samples "
        "when smaller than this",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for remote inputs"
    )

    @field_validator("inputs", mode="before")
    @classmethod
    def _one_input(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("extensions")
    @classmethod
    def _norm_ext(cls, v: list[str]) -> list[str]:
        return [e.lower() if e.startswith(".") else "." + e.lower() for e in v]


class Ingest(Stage):
    name = "ingest"
    description = "list input files, hash their content, probe container/codec/duration"
    Config = IngestConfig
    resources = Resources(cpus=1)
    is_source = True
    unique_output_ids = True
    default_batch_size = 16

    config: IngestConfig

    @classmethod
    def validate_config(cls, config: StageConfig) -> None:
        assert isinstance(config, IngestConfig)
        if not config.inputs and not config.file_list:
            raise ValueError("key 'with.inputs': give inputs and/or file_list")

    # -- plan ----------------------------------------------------------------------------
    def plan(self) -> pa.Table:
        rows: list[dict[str, Any]] = []
        for spec in self.config.inputs:
            for url in self._expand(spec):
                rows.append({"source_url": url})
        if self.config.file_list:
            rows.extend(self._read_list(self.config.file_list))
        out = []
        seen: set[str] = set()
        for r in rows:
            url = r["source_url"]
            if url in seen:
                continue
            seen.add(url)
            out.append({
                "id": key_id("ingest", url),
                "source_url": url,
                "audio_path": url,
                "speaker": r.get("speaker"),
                "language": r.get("language"),
                "text": r.get("text"),
                "meta": r.get("meta"),
            })
        schema = pa.schema([(k, pa.string()) for k in
                            ("id", "source_url", "audio_path", "speaker", "language", "text",
                             "meta")])
        return pa.Table.from_pylist(out, schema=schema)

    def _wanted(self, name: str) -> bool:
        return os.path.splitext(name)[1].lower() in self.config.extensions

    def _expand(self, spec: str) -> list[str]:
        has_glob = any(c in spec for c in "*?[")
        if is_url(spec):
            import fsspec

            fs, _, paths = fsspec.get_fs_token_paths(
                spec, storage_options=self.config.storage_options
            )
            proto = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
            if not has_glob:
                try:
                    is_dir = fs.isdir(paths[0])
                except Exception:  # unreachable: planned as is, rejected when read
                    is_dir = False
                if not is_dir:
                    return [spec]
                paths = fs.find(paths[0]) if self.config.recursive else fs.ls(
                    paths[0], detail=False)
            return sorted(
                p if "://" in p else f"{proto}://{p}" for p in paths if self._wanted(p)
            )
        spec = os.path.expanduser(local_path(spec))
        if has_glob:
            hits = glob.glob(spec, recursive=True)
            return sorted(os.path.abspath(h) for h in hits
                          if (os.path.isfile(h) or os.path.islink(h)) and self._wanted(h))
        if os.path.isdir(spec):
            found = []
            if self.config.recursive:
                for root, dirs, files in os.walk(spec):
                    dirs.sort()
                    found.extend(os.path.join(root, f) for f in files if self._wanted(f))
            else:
                found = [os.path.join(spec, f) for f in os.listdir(spec)
                         if self._wanted(f) and not os.path.isdir(os.path.join(spec, f))]
            return sorted(os.path.abspath(f) for f in found)
        return [os.path.abspath(spec)]  # a named file: taken even if missing (-> reject)

    def _read_list(self, path: str) -> list[dict[str, Any]]:
        import fsspec

        base = os.path.dirname(os.path.abspath(path)) if not is_url(path) else None
        with fsspec.open(path, "rt", encoding="utf-8-sig") as f:
            text = f.read()
        ext = Path(path.split("?")[0]).suffix.lower()
        records: list[dict[str, Any]]
        if ext == ".jsonl" or ext == ".json":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        elif ext in (".csv", ".tsv"):
            records = list(csv.DictReader(io.StringIO(text),
                                          delimiter="\t" if ext == ".tsv" else ","))
        else:
            records = [{"path": line.strip()} for line in text.splitlines()
                       if line.strip() and not line.lstrip().startswith("#")]
        out = []
        for i, rec in enumerate(records):
            key = next((k for k in _LIST_KEYS if rec.get(k)), None)
            if key is None:
                raise ValueError(
                    f"key 'with.file_list': entry {i + 1} of {path!r} has none of "
                    f"{', '.join(_LIST_KEYS)}"
                )
            url = str(rec[key])
            if not is_url(url):
                url = local_path(os.path.expanduser(url))
                if base and not os.path.isabs(url):
                    url = os.path.join(base, url)
                url = os.path.abspath(url)
            meta = {k: v for k, v in rec.items() if k != key and k not in _CORE_META}
            out.append({
                "source_url": url,
                **{k: (str(rec[k]) if rec.get(k) not in (None, "") else None)
                   for k in _CORE_META},
                "meta": json.dumps(meta, sort_keys=True, default=str) if meta else None,
            })
        return out

    # -- process ---------------------------------------------------------------------------
    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        url = row["audio_path"]
        size, sha = self._hash(url)
        if size == 0:
            raise Reject("empty_file", "0 bytes")
        try:
            info = probe(url, self.config.storage_options)
        except AudioError as e:
            raise Reject(e.reason, e.detail) from None
        if info.duration is None and size <= self.config.count_samples_below_bytes:
            try:  # header without a duration (e.g. streamed WAV): count the samples
                info.duration = decoded_duration(url, self.config.storage_options)
            except AudioError as e:
                raise Reject(e.reason, e.detail) from None
        if info.duration is not None and info.duration <= 0:
            raise Reject("zero_length", f"{info.container}/{info.codec} declares 0 s of audio")
        return {
            "id": content_id(sha),
            "parent_id": row["id"],
            "source_url": row["source_url"],
            "audio_path": url,
            "offset": 0.0,
            "duration": info.duration,
            "sample_rate": info.sample_rate,
            "channels": info.channels,
            "speaker": row.get("speaker"),
            "language": row.get("language"),
            "text": row.get("text"),
            "container": info.container,
            "codec": info.codec,
            "bit_rate": info.bit_rate,
            "has_video": info.has_video,
            "size_bytes": size,
            "sha256": sha,
            "meta": row.get("meta"),
        }

    def _hash(self, url: str) -> tuple[int, str]:
        h = hashlib.sha256()
        size = 0
        try:
            if is_url(url):
                import fsspec

                f = fsspec.open(url, "rb", **self.config.storage_options).open()
            else:
                p = local_path(url)
                if os.path.exists(p) and not os.path.isfile(p):  # FIFO, socket, device, dir
                    raise Reject("unreadable", f"not a regular file: {p}")
                f = open(p, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise Reject("unreadable", f"no such file: {url}") from None
        except OSError as e:
            raise Reject("unreadable", f"{type(e).__name__}: {e}") from None
        with f:
            while True:
                try:
                    block = f.read(1 << 20)
                except OSError as e:
                    raise Reject("unreadable", f"read failed: {e}") from None
                if not block:
                    break
                size += len(block)
                if size > self.config.max_bytes:
                    raise Reject("too_large", f"> max_bytes={self.config.max_bytes}")
                h.update(block)
        return size, h.hexdigest()
