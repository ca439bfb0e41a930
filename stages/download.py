"""Stage ``download``: a polite, resumable crawler for URL lists, podcast feeds, video/audio
sites (yt-dlp) and object stores (fsspec).

Planning (in the driver) expands the sources into one row per thing to fetch: every
URL of the lists, every audio enclosure of every feed (with its episode metadata), one
row per yt-dlp page or playlist, one row per object matched by an fsspec URL or glob.
URLs are deduplicated by their normalised form. Workers then fetch rows concurrently on a
thread pool with per-host concurrency and rate limits, retries with backoff, HTTP Range
resume of interrupted files, an SSRF guard and content sniffing (see ``fetch.py``), probe
what arrived and emit one record per file, keyed by content hash (so the same episode
under two URLs is one record; the other is a ``duplicate`` reject).

Files land in ``media/<stage>/<host>/<url-hash><ext>``: names never come from untrusted
text except a sanitised host and extension.

Transient and data rejects: a fetch that failed because the service failed after the
fetcher's retries -- ``timeout``, ``connection_error`` (refused, reset, a temporary DNS
failure), ``rate_limited`` (429 beyond the retries), ``http_server_error`` (5xx),
``truncated`` (the body kept breaking off): :attr:`FetchError.transient
<speechmill.stages.download_policy.FetchError.transient>` -- is rejected with ``kind``
"transient" (counted toward the error budget; a rerun retries the row, resuming the
part file kept for it). So is an object store that cannot be reached (connection
errors, timeouts, 408/429/5xx from fsspec) and a yt-dlp page whose every failure was of
that kind. Everything else is a data reject: ``not_found``, other 4xx
(``http_client_error``), ``not_audio``, ``too_large``, policy refusals, redirect
problems, ``duplicate``, plan errors (the plan is kept, so they stay what they were).
Reject details, stored URLs and reject rows' ``source_url`` are redacted
(:mod:`speechmill.pipeline.redact`; ``storage_options`` secrets and URL credentials
are registered at setup).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from speechmill.pipeline.audio import MEDIA_EXTENSIONS, AudioError, is_url, probe
from speechmill.pipeline.errors import is_fatal
from speechmill.pipeline.records import content_id, key_id, reject, rejects_table
from speechmill.pipeline.redact import redact_text, redact_url, register_secrets
from speechmill.pipeline.stage import (
    Reject,
    Resources,
    RowOutcome,
    Stage,
    StageConfig,
    StageResult,
)
from speechmill.stages.download_fetch import sha256_file

PLAN_COLUMNS = [
    "id", "source_url", "kind", "plan_error", "title", "published", "feed_title",
    "feed_url", "author", "rights", "declared_duration", "guid", "episode_link", "meta",
]


class YtdlpOptions(BaseModel):
    """The yt-dlp options speechmill passes on; anything else is a config error."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = Field("bestaudio/best", description="yt-dlp format selector")
    playlist_items: str | None = Field(None, description="e.g. '1-50'")
    max_downloads: int | None = Field(None, ge=1)
    ratelimit: int | None = Field(None, ge=1, description="bytes/s per download")
    sleep_interval: float | None = Field(None, ge=0, description="seconds between downloads")
    retries: int = Field(3, ge=0)
    socket_timeout: float = Field(30.0, gt=0)
    match_filter: str | None = Field(None, description="yt-dlp --match-filter expression")
    archive: str | None = Field(
        None, description="download archive shared across runs (default: in the run dir)"
    )


class DownloadConfig(StageConfig):
    urls: list[str] = Field(default_factory=list, description="direct media URLs")
    url_lists: list[str] = Field(
        default_factory=list, description="txt/csv/tsv/jsonl files (paths or URLs) of URLs"
    )
    feeds: list[str] = Field(default_factory=list, description="RSS/Atom podcast feed URLs")
    max_items_per_feed: int | None = Field(None, ge=1, description="newest first")
    ytdlp: list[str] = Field(
        default_factory=list, description="pages/playlists fetched through yt-dlp"
    )
    ytdlp_options: YtdlpOptions = Field(default_factory=YtdlpOptions)
    fsspec: list[str] = Field(
        default_factory=list, description="object-store URLs or globs (s3://, gs://, ...)"
    )
    storage_options: dict[str, Any] = Field(default_factory=dict)
    meta: dict[str, str] = Field(default_factory=dict, description="added to every record")

    threads: int = Field(8, ge=1, le=256, description="concurrent fetches per worker")
    per_host_concurrency: int = Field(2, ge=1)
    per_host_rps: float = Field(2.0, ge=0, description="request starts/s per host; 0: no cap")
    user_agent: str = "speechmill/0.1 (+https://pypi.org/project/speechmill/)"
    connect_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(4, ge=0)
    backoff_base_s: float = Field(0.5, ge=0)
    backoff_max_s: float = Field(30.0, ge=0)
    max_retry_after_s: float = Field(120.0, ge=0)
    max_redirects: int = Field(5, ge=0)
    min_speed_bps: float = Field(512.0, ge=0, description="slower over slow_window_s: timeout")
    slow_window_s: float = Field(30.0, gt=0)
    max_bytes: int = Field(4 * 1024**3, gt=0, description="larger files are rejected")
    max_duration_s: float | None = Field(6 * 3600.0, gt=0, description="longer: rejected")
    allow_hosts: list[str] = Field(default_factory=list, description="fnmatch; empty: all")
    deny_hosts: list[str] = Field(default_factory=list)
    allow_private: list[str] = Field(
        default_factory=list,
        description="hosts/IPs/CIDRs exempt from the SSRF guard (e.g. 127.0.0.1 in tests)",
    )

    @field_validator("urls", "url_lists", "feeds", "ytdlp", "fsspec", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class TransientReject(Reject):
    """A reject because a service or resource failed after its retries (``kind``
    "transient": a rerun retries the row)."""

    transient = True


class Download(Stage):
    name = "download"
    description = "crawl URL lists, RSS/Atom feeds, yt-dlp pages and object stores"
    Config = DownloadConfig
    resources = Resources(cpus=1)
    is_source = True
    unique_output_ids = True
    default_batch_size = 32

    config: DownloadConfig

    @classmethod
    def validate_config(cls, config: StageConfig) -> None:
        assert isinstance(config, DownloadConfig)
        if not (config.urls or config.url_lists or config.feeds or config.ytdlp
                or config.fsspec):
            raise ValueError("key 'with.urls': give urls, url_lists, feeds, ytdlp or fsspec")

    # -- shared ------------------------------------------------------------------------
    def _policy(self) -> Any:
        from speechmill.stages.download_policy import FetchPolicy

        c = self.config
        return FetchPolicy(
            user_agent=c.user_agent, connect_timeout_s=c.connect_timeout_s,
            read_timeout_s=c.read_timeout_s, max_retries=c.max_retries,
            backoff_base_s=c.backoff_base_s, backoff_max_s=c.backoff_max_s,
            max_retry_after_s=c.max_retry_after_s, max_redirects=c.max_redirects,
            min_speed_bps=c.min_speed_bps, slow_window_s=c.slow_window_s,
            max_bytes=c.max_bytes, per_host_concurrency=c.per_host_concurrency,
            per_host_rps=c.per_host_rps, allow_hosts=tuple(c.allow_hosts),
            deny_hosts=tuple(c.deny_hosts), allow_private=tuple(c.allow_private),
        )

    def setup(self) -> None:
        from speechmill.stages.download_fetch import Fetcher

        self.fetcher = Fetcher(self._policy())
        self._ytdlp_lock = threading.Lock()
        c = self.config
        register_secrets(c.storage_options, "storage_options")
        register_secrets([*c.urls, *c.url_lists, *c.feeds, *c.ytdlp, *c.fsspec])

    # -- plan ----------------------------------------------------------------------------
    def plan(self) -> pa.Table:
        from speechmill.stages.download_urls import normalize_url

        rows: list[dict[str, Any]] = []
        seen: dict[str, str] = {}

        def add(url: str, kind: str, **meta: Any) -> None:
            try:
                norm = normalize_url(url) if kind in ("http", "ytdlp") else url
            except Exception:
                norm = url
            if norm in seen:
                rows.append({"id": key_id("download-dup", kind, url, seen[norm]),
                             "source_url": url, "kind": kind,
                             "plan_error": f"duplicate_url\t{seen[norm]}"})
                return
            seen[norm] = url
            m = {**self.config.meta, **{k: v for k, v in meta.pop("meta", {}).items()}}
            rows.append({"id": key_id("download", kind, norm), "source_url": url,
                         "kind": kind, "meta": json.dumps(m, sort_keys=True) if m else None,
                         **meta})

        for u in self.config.urls:
            add(u, "http")
        for lst in self.config.url_lists:
            remote = is_url(lst)
            for rec in self._read_list(lst):
                url = rec.pop("url")
                scheme = urlsplit(url).scheme.lower()
                if scheme in ("http", "https"):
                    add(url, "http", meta=rec)
                elif remote or "::" in url:  # a list from elsewhere names only web URLs
                    rows.append({"id": key_id("download-bad", url), "source_url": url,
                                 "kind": "fsspec", "plan_error": "bad_url\tonly http(s) "
                                 "URLs are taken from remote URL lists"})
                else:
                    add(url, "fsspec", meta=rec)
        for feed in self.config.feeds:
            self._plan_feed(feed, add, rows)
        for page in self.config.ytdlp:
            add(page, "ytdlp")
        for spec in self.config.fsspec:
            for url in self._expand_fsspec(spec):
                scheme = urlsplit(url).scheme.lower()
                add(url, "http" if scheme in ("http", "https") else "fsspec")
        return pa.Table.from_pylist(
            [{c: r.get(c) for c in PLAN_COLUMNS} for r in rows],
            schema=pa.schema([(c, pa.float64() if c == "declared_duration" else pa.string())
                              for c in PLAN_COLUMNS]),
        )

    def _read_list(self, path: str) -> list[dict[str, Any]]:
        from speechmill.stages.download_urls import read_url_list

        kind = Path(urlsplit(path).path).suffix.lower().lstrip(".") or "txt"
        kind = kind if kind in ("txt", "csv", "tsv", "jsonl") else "txt"
        if urlsplit(path).scheme.lower() in ("http", "https"):
            from speechmill.stages.download_fetch import Fetcher
            from speechmill.stages.download_policy import FetchError

            try:
                data, _ = Fetcher(self._policy()).get_bytes(path)
            except FetchError as e:
                raise ValueError(redact_text(f"key 'with.url_lists': {redact_url(path)}: "
                                             f"{e.reason} ({e.detail})")) from None
            text = data.decode("utf-8-sig", errors="replace")
        elif is_url(path):
            import fsspec

            with fsspec.open(path, "rb", **self.config.storage_options) as f:
                text = f.read().decode("utf-8-sig", errors="replace")
        else:
            text = Path(path).read_bytes()  # (read_url_list names a line that is not UTF-8)
        base = None if is_url(path) else os.path.dirname(os.path.abspath(path))
        out = []
        for rec in read_url_list(text, kind, source=f"key 'with.url_lists': {path}"):
            url = str(rec["url"])
            if base and "://" not in url:
                url = os.path.abspath(os.path.join(base, url))
                url = f"file://{url}"
            out.append({**rec, "url": url})
        return out

    def _plan_feed(self, feed: str, add: Any, rows: list[dict[str, Any]]) -> None:
        from speechmill.stages.download_feeds import parse_feed
        from speechmill.stages.download_fetch import Fetcher
        from speechmill.stages.download_policy import FetchError

        try:
            if is_url(feed):
                data, final = Fetcher(self._policy()).get_bytes(feed)
            else:
                data, final = Path(feed).read_bytes(), Path(feed).resolve().as_uri()
            meta, items = parse_feed(data, final)
        except FetchError as e:
            rows.append({"id": key_id("feed", feed), "source_url": feed, "kind": "feed",
                         "plan_error": f"feed_{e.reason}\t{e.detail}"})
            return
        except (ValueError, OSError) as e:
            rows.append({"id": key_id("feed", feed), "source_url": feed, "kind": "feed",
                         "plan_error": f"bad_feed\t{e}"})
            return
        if self.config.max_items_per_feed:
            items = sorted(items, key=lambda it: it.published or "", reverse=True)
            items = items[: self.config.max_items_per_feed]
        for it in items:
            extra = {k: v for k, v in it.to_dict().items()
                     if k in ("mime_type", "length_bytes", "episode", "season", "description")
                     and v is not None}
            add(it.url, "http", title=it.title, published=it.published,
                feed_title=meta.get("feed_title"), feed_url=feed,
                author=it.author, rights=it.rights, declared_duration=it.duration_s,
                guid=it.guid, episode_link=it.link, meta=extra)

    def _expand_fsspec(self, spec: str) -> list[str]:
        import fsspec

        try:
            fs, _, paths = fsspec.get_fs_token_paths(spec,
                                                     storage_options=self.config.storage_options)
        except Exception:
            return [spec]  # rejected when fetched
        proto = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
        if not any(c in spec for c in "*?[") and paths:
            try:
                if fs.isdir(paths[0]):
                    paths = fs.find(paths[0])
            except Exception:
                return [spec]
        if len(paths) == 1 and not any(c in spec for c in "*?["):
            return [spec]  # one named object: taken whatever its extension
        return sorted(p if "://" in p else f"{proto}://{p}" for p in paths
                      if Path(p).suffix.lower() in MEDIA_EXTENSIONS)

    # -- process -----------------------------------------------------------------------
    def process(self, batch: pa.Table) -> StageResult:
        rows = batch.to_pylist()
        ex = ThreadPoolExecutor(max_workers=min(self.config.threads, max(len(rows), 1)))
        try:
            outcomes = list(ex.map(self.run_row, rows))
        except BaseException:  # watchdog/interrupt: don't wait for stuck fetches
            ex.shutdown(wait=False, cancel_futures=True)
            raise
        ex.shutdown(wait=True)
        outputs = [o for oc in outcomes for o in oc.outputs]
        rejects = [oc.reject for oc in outcomes if oc.reject is not None]
        return StageResult(self.outputs_table(outputs), rejects_table(rejects))

    def run_row(self, row: dict[str, Any]) -> RowOutcome:
        """:meth:`Stage.run_row` that keeps a :class:`TransientReject`'s kind and never
        stores credentials in a reject (details redacted, ``source_url`` as in records)."""
        try:
            out = self.process_row(row)
        except Reject as r:
            rej = reject(row, self.ctx.stage_id, r.reason, redact_text(r.detail),
                         transient=bool(getattr(r, "transient", False)))
        except Exception as e:  # one row's failure never kills the run...
            if is_fatal(e):  # ...but a full disk or an engine error is not the row's
                raise
            import traceback

            detail = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
            rej = reject(row, self.ctx.stage_id, "error", redact_text(detail))
        else:
            rows = [out] if isinstance(out, dict) else list(out)
            for r in rows:
                r.setdefault("parent_id", row.get("id"))
            return RowOutcome(outputs=rows)
        if rej.get("source_url"):
            rej["source_url"] = redact_url(rej["source_url"])
        return RowOutcome(reject=rej)

    def process_row(self, row: dict[str, Any]) -> list[dict[str, Any]] | dict[str, Any]:
        if row.get("plan_error"):
            reason, _, detail = row["plan_error"].partition("\t")
            if reason == "duplicate_url":
                raise Reject("duplicate_url", f"same URL as {detail}")
            raise Reject(reason, detail)
        kind = row["kind"]
        if kind == "http":
            return self._http(row)
        if kind == "fsspec":
            return self._fsspec(row)
        if kind == "ytdlp":
            return self._ytdlp(row)
        raise Reject("bad_url", f"unknown kind {kind!r}")

    def _dest(self, url: str, ext_hint: str = "") -> Path:
        from speechmill.pipeline.safe_names import safe_filename
        from speechmill.stages.download_urls import normalize_url

        parts = urlsplit(url)
        with contextlib.suppress(Exception):
            url = normalize_url(url) if parts.scheme in ("http", "https") else url
        host = safe_filename(parts.hostname or parts.scheme or "local", max_bytes=64,
                             default="host")
        ext = Path(parts.path).suffix.lower()
        if ext not in MEDIA_EXTENSIONS:
            ext = ext_hint if ext_hint in MEDIA_EXTENSIONS else ".bin"
        h = hashlib.sha256(url.encode()).hexdigest()[:24]
        return self.ctx.media_dir / host / f"{h}{ext}"

    def _http(self, row: dict[str, Any]) -> dict[str, Any]:
        from speechmill.stages.download_policy import FetchError

        url = row["source_url"]
        dest = self._dest(url)
        sidecar = dest.with_name(dest.name + ".json")
        t0 = time.monotonic()
        prov = _reusable(dest, sidecar)  # fetched by an attempt that did not commit
        if prov is None:
            try:
                res = self.fetcher.fetch(url, dest)
            except FetchError as e:
                detail = redact_text(f"{e.detail} (attempts: {e.attempts})")
                if e.transient:  # the service failed: a rerun retries (and resumes) it
                    raise TransientReject(e.reason, detail) from None
                # a final verdict for this row: no later call will resume the part file
                _discard(dest.with_name(dest.name + ".part"))
                _discard(dest.with_name(dest.name + ".part.json"))
                raise Reject(e.reason, detail) from None
            prov = {
                "final_url": res.final_url, "http_status": res.status, "etag": res.etag,
                "last_modified": res.last_modified, "content_type": res.content_type,
                "fetched_at": res.fetched_at, "size_bytes": res.size, "sha256": res.sha256,
                "attempts": res.attempts, "resumed": res.resumed,
                "redirects": len(res.redirects), "reused": False,
            }
            st = dest.stat()
            _write_json(sidecar, {**prov, "file_size": st.st_size,
                                  "file_mtime_ns": st.st_mtime_ns})
        prov["fetch_seconds"] = time.monotonic() - t0
        return self._record(row, dest, prov)

    def _record(self, row: dict[str, Any], dest: Path, prov: dict[str, Any]) -> dict[str, Any]:
        try:
            info = probe(str(dest))
        except AudioError as e:
            _discard(dest)
            raise Reject(e.reason, e.detail) from None
        if info.duration is not None and info.duration <= 0:
            _discard(dest)
            raise Reject("zero_length", "no audio")
        if (self.config.max_duration_s and info.duration
                and info.duration > self.config.max_duration_s):
            _discard(dest)
            raise Reject("too_long", f"{info.duration:.0f} s > max_duration_s")
        return {
            "id": content_id(prov["sha256"]),
            "parent_id": row["id"],
            "source_url": redact_url(row["source_url"]),
            "audio_path": str(dest),
            "offset": 0.0,
            "duration": info.duration,
            "sample_rate": info.sample_rate,
            "channels": info.channels,
            "container": info.container,
            "codec": info.codec,
            "host": urlsplit(row["source_url"]).hostname,
            **{k: prov.get(k) for k in ("http_status", "etag", "last_modified",
                                         "content_type", "fetched_at", "size_bytes",
                                         "sha256", "attempts", "resumed", "reused",
                                         "fetch_seconds")},
            "final_url": redact_url(prov.get("final_url") or ""),
            **{k: row.get(k) for k in ("title", "published", "feed_title", "feed_url",
                                        "author", "rights", "declared_duration", "guid",
                                        "episode_link", "meta")},
        }

    def _fsspec(self, row: dict[str, Any]) -> dict[str, Any]:
        import fsspec

        url = row["source_url"]
        if url.startswith("file://") or "://" not in url:
            local = url[len("file://"):] if url.startswith("file://") else url
            if not os.path.isfile(local):  # FIFOs, devices, directories
                raise Reject("unreadable", f"not a regular file: {local}")
        dest = self._dest(url)
        t0 = time.monotonic()
        h = hashlib.sha256()
        size = 0
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        try:
            with fsspec.open(url, "rb", **self.config.storage_options) as f, open(tmp, "wb") as out:
                while block := f.read(1 << 20):
                    size += len(block)
                    if size > self.config.max_bytes:
                        raise Reject("too_large", f"> max_bytes={self.config.max_bytes}")
                    h.update(block)
                    out.write(block)
        except Reject:
            _discard(tmp)
            raise
        except FileNotFoundError as e:
            _discard(tmp)
            if transient_error(e):  # fsspec's HTTP store says so of a refused connection
                raise TransientReject("unreadable", redact_text(
                    f"cannot reach the store: {_cause(e)}", limit=1000)) from None
            raise Reject("not_found", redact_text(str(e), limit=1000)) from None
        except Exception as e:
            _discard(tmp)
            detail = redact_text(f"{type(e).__name__}: {e}", limit=1000)
            if transient_error(e):  # the object store cannot be reached
                raise TransientReject("unreadable", detail) from None
            raise Reject("unreadable", detail) from None
        if size == 0:
            _discard(tmp)
            raise Reject("empty_file", "0 bytes")
        os.replace(tmp, dest)
        prov = {"final_url": url, "size_bytes": size, "sha256": h.hexdigest(),
                "fetched_at": _now(), "attempts": 1, "resumed": False,
                "fetch_seconds": time.monotonic() - t0}
        return self._record(row, dest, prov)

    def _ytdlp(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """All media of one page/playlist through yt-dlp, audio only."""
        import yt_dlp

        from speechmill.stages.download_policy import FetchError
        from speechmill.stages.download_safety import check_url

        page = row["source_url"]
        try:
            check_url(page, self._policy())
        except FetchError as e:
            raise Reject(e.reason, e.detail) from None
        o = self.config.ytdlp_options
        outdir = self.ctx.media_dir / "ytdlp"
        archive = Path(o.archive) if o.archive else _run_local_dir(self.ctx.run_dir) / (
            "ytdlp-archive.txt")
        opts: dict[str, Any] = {
            "format": o.format, "outtmpl": str(outdir / "%(extractor_key)s-%(id)s.%(ext)s"),
            "restrictfilenames": True, "windowsfilenames": True, "quiet": True,
            "no_warnings": True, "noprogress": True, "retries": o.retries,
            "socket_timeout": o.socket_timeout, "http_headers": {"User-Agent":
                                                                self.config.user_agent},
            "max_filesize": self.config.max_bytes, "noplaylist": False,
            "ignoreerrors": "only_download", "logger": _QuietLogger(),
        }
        for k in ("playlist_items", "max_downloads", "ratelimit", "sleep_interval"):
            if getattr(o, k) is not None:
                opts[k] = getattr(o, k)
        if o.match_filter:
            opts["match_filter"] = yt_dlp.utils.match_filter_func(o.match_filter)
        done = _read_archive(archive)
        outs: list[dict[str, Any]] = []
        errors: list[str] = []
        transient: list[bool] = []  # per error: did a service fail?
        archived = 0
        with yt_dlp.YoutubeDL(opts) as ydl:
            try:
                info = ydl.extract_info(page, download=False)
            except Exception as e:
                if transient_error(e):
                    raise TransientReject("ytdlp_error", _short(e)) from None
                raise Reject("ytdlp_error", _short(e)) from None
            entries = list(info.get("entries") or []) if info.get("_type") == "playlist" else [info]
            for entry in entries:
                if not entry:
                    continue
                key = f"{str(entry.get('extractor_key', 'generic')).lower()} {entry.get('id')}"
                path = Path(ydl.prepare_filename(entry))
                if key in done and not path.exists():
                    archived += 1  # fetched by an earlier crawl with the same archive
                    continue
                t0 = time.monotonic()
                media_url = entry.get("url")
                if not path.exists() and media_url and entry.get("protocol") in ("http", "https"):
                    # a plain file: our fetcher (SSRF guard on every hop, Range resume,
                    # per-host limits, sniffing) instead of yt-dlp's downloader
                    from speechmill.stages.download_policy import FetchError as _FE

                    try:
                        self.fetcher.fetch(media_url, path)
                    except _FE as e:
                        errors.append(f"{key}: {e.reason}")
                        transient.append(e.transient)
                        continue
                elif not path.exists():
                    if media_url:
                        try:
                            check_url(media_url, self._policy())
                        except FetchError as e:
                            errors.append(f"{key}: {e.reason}")
                            transient.append(False)
                            continue
                    try:
                        with self._ytdlp_lock:
                            res = ydl.process_ie_result(entry, download=True)
                    except Exception as e:
                        errors.append(f"{key}: {_short(e)}")
                        transient.append(transient_error(e))
                        continue
                    reqs = (res or {}).get("requested_downloads") or []
                    if reqs and reqs[0].get("filepath"):
                        path = Path(reqs[0]["filepath"])
                if not path.exists():
                    errors.append(f"{key}: nothing downloaded")
                    transient.append(False)
                    continue
                sha, _ = sha256_file(path)
                prov = {"final_url": media_url or entry.get("webpage_url") or page,
                        "sha256": sha,
                        "size_bytes": path.stat().st_size, "fetched_at": _now(),
                        "attempts": 1, "resumed": False,
                        "fetch_seconds": time.monotonic() - t0}
                meta = {**json.loads(row.get("meta") or "{}"),
                        "ytdlp_id": entry.get("id"), "extractor": entry.get("extractor_key"),
                        "uploader": entry.get("uploader"), "license": entry.get("license")}
                up = entry.get("upload_date")  # YYYYMMDD
                r = {**row, "title": entry.get("title"), "author": entry.get("uploader"),
                     "rights": entry.get("license"),
                     "declared_duration": entry.get("duration"),
                     "published": f"{up[:4]}-{up[4:6]}-{up[6:8]}" if up and len(up) == 8
                     else None,
                     "episode_link": entry.get("webpage_url"),
                     "meta": json.dumps({k: v for k, v in meta.items() if v is not None},
                                        sort_keys=True)}
                try:
                    outs.append(self._record(r, path, prov))
                except Reject as rj:
                    errors.append(f"{key}: {rj.reason}")
                    transient.append(False)
                    continue
                _append_archive(archive, key, done)
        if not outs:
            if archived and not errors:
                raise Reject("archived", f"all {archived} items are in the download archive "
                             f"{archive}")
            detail = redact_text("; ".join(errors), limit=1000) or "no media found"
            if transient and all(transient):  # every item failed for the service's sake
                raise TransientReject("ytdlp_error", detail)
            raise Reject("ytdlp_error", detail)
        return outs

    # -- summary -----------------------------------------------------------------------
    summary_columns = ("host", "size_bytes", "fetch_seconds", "attempts")

    @classmethod
    def summarize(cls, outputs: pa.Table, rejects: pa.Table) -> dict[str, Any] | None:
        hosts: dict[str, dict[str, Any]] = {}
        for r in outputs.select([c for c in ("host", "size_bytes", "fetch_seconds",
                                             "attempts") if c in outputs.column_names]
                                ).to_pylist():
            h = hosts.setdefault(r.get("host") or "?", _host_entry())
            h["files"] += 1
            h["bytes"] += int(r.get("size_bytes") or 0)
            h["busy_seconds"] += float(r.get("fetch_seconds") or 0.0)
            h["retries"] += max(int(r.get("attempts") or 1) - 1, 0)
        for r in rejects.select(["source_url", "reason"]).to_pylist():
            host = urlsplit(r.get("source_url") or "").hostname or "?"
            h = hosts.setdefault(host, _host_entry())
            h["failures"][r["reason"]] = h["failures"].get(r["reason"], 0) + 1
        for h in hosts.values():
            busy = h["busy_seconds"]
            h["files_per_s"] = h["files"] / busy if busy > 0 else None
            h["mb_per_s"] = h["bytes"] / 1e6 / busy if busy > 0 else None
        return {"hosts": dict(sorted(hosts.items()))}

    @classmethod
    def summary_lines(cls, summary: dict[str, Any]) -> list[str]:
        lines = []
        for host, h in summary.get("hosts", {}).items():
            fails = ", ".join(f"{k} {v}" for k, v in sorted(h["failures"].items()))
            rate = (f"{h['files_per_s']:.2f} files/s, {h['mb_per_s']:.2f} MB/s per fetch slot"
                    if h.get("mb_per_s") else "-")
            lines.append(f"{host}: {h['files']} files, {h['bytes'] / 1e6:.1f} MB, {rate}, "
                         f"{h['retries']} retries" + (f"; failed: {fails}" if fails else ""))
        return lines


def _host_entry() -> dict[str, Any]:
    return {"files": 0, "bytes": 0, "busy_seconds": 0.0, "retries": 0, "failures": {}}


class _QuietLogger:
    def debug(self, msg: str) -> None:
        pass

    def info(self, msg: str) -> None:
        pass

    def warning(self, msg: str) -> None:
        pass

    def error(self, msg: str) -> None:
        pass


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {redact_text(str(e), limit=300)}"


#: exception class names (any module) that mean a service could not be reached
_TRANSIENT_NAMES = frozenset({
    "ConnectionError", "ConnectionRefusedError", "ConnectionResetError",
    "ConnectionAbortedError", "BrokenPipeError", "TimeoutError", "ConnectTimeout",
    "ReadTimeout", "Timeout", "ConnectTimeoutError", "ReadTimeoutError",
    "EndpointConnectionError", "ConnectionClosedError", "ClientConnectorError",
    "ClientConnectionError", "ClientOSError", "ServerDisconnectedError",
    "ServerTimeoutError", "ServerConnectionError", "ClientPayloadError",
    "ProtocolError", "IncompleteRead", "RemoteDisconnected", "NewConnectionError",
    "MaxRetryError", "ChunkedEncodingError", "RemoteProtocolError", "ConnectError",
    "ReadError", "TransportError", "ServiceUnavailable", "TooManyRequests",
    "SlowDown", "ThrottlingException", "RequestTimeout",
})


def transient_error(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) says a service failed rather than the input:
    a connection refused/reset, a timeout, or an HTTP status 408/429/5xx (``status``,
    ``status_code``, ``code`` or a botocore ``response``), for the object-store and
    yt-dlp paths (the HTTP fetcher says it itself: :attr:`FetchError.transient`)."""
    seen: set[int] = set()
    stack: list[Any] = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen or len(seen) > 20:
            continue
        seen.add(id(x))
        if isinstance(x, ConnectionError | TimeoutError) or any(
                c.__name__ in _TRANSIENT_NAMES for c in type(x).__mro__):
            return True
        status = None
        for attr in ("status", "status_code", "code"):
            v = getattr(x, attr, None)
            if isinstance(v, int) and 100 <= v < 600:
                status = v
                break
        resp = getattr(x, "response", None)
        if status is None and isinstance(resp, dict):  # botocore ClientError
            v = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            status = v if isinstance(v, int) else None
        if status is not None and (status >= 500 or status in (408, 429)):
            return True
        if isinstance(x, BaseException):
            stack += [x.__cause__, x.__context__, getattr(x, "reason", None)]
            info = getattr(x, "exc_info", None)  # yt-dlp's DownloadError
            if isinstance(info, tuple) and len(info) > 1:
                stack.append(info[1])
    return False


def _cause(e: BaseException) -> str:
    """``e``'s innermost cause, as ``Type: message``."""
    seen = {id(e)}
    while True:
        nxt = e.__cause__ or e.__context__
        if nxt is None or id(nxt) in seen:
            return f"{type(e).__name__}: {e}"
        seen.add(id(nxt))
        e = nxt


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat(timespec="seconds")


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):  # the sidecar first: a file without one is refetched
        path.with_name(path.name + ".json").unlink()
    with contextlib.suppress(OSError):
        path.unlink()


def _reusable(dest: Path, sidecar: Path) -> dict[str, Any] | None:
    """Provenance of a file fetched earlier, if the file is exactly what it describes."""
    try:
        prov = json.loads(sidecar.read_text())
        st = dest.stat()
    except (OSError, ValueError):
        return None
    if prov.get("file_size") != st.st_size or prov.get("file_mtime_ns") != st.st_mtime_ns:
        return None
    prov["reused"] = True
    return prov


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


_ARCHIVE_LOCK = threading.Lock()


def _read_archive(path: Path) -> set[str]:
    try:
        return {line.strip() for line in path.read_text().splitlines() if line.strip()}
    except OSError:
        return set()


def _append_archive(path: Path, key: str, done: set[str]) -> None:
    if key in done:
        return
    with _ARCHIVE_LOCK:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(key + "\n")
        done.add(key)


def _run_local_dir(run_dir: str) -> Path:
    """Where this run keeps local files: the run dir itself, or for a run dir on object
    storage the node's local cache of it (yt-dlp's archive only saves re-downloads)."""
    from speechmill.pipeline.store.layout import is_url, local_cache_dir

    return local_cache_dir(run_dir) if is_url(run_dir) else Path(run_dir)
