"""The run's lock: one live run per run directory.

A local run directory is locked with ``flock`` on ``run.lock`` (:class:`RunLock`); one on
an object store holds a lease object ``run.lock`` that it renews and that a later run may
take over once its holder is gone (:class:`RunLease`). Entering either claims the run
directory: it must be new, empty or a speechmill run directory, and gets the marker
:data:`~speechmill.pipeline.store.layout.RUN_MARKER`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

from speechmill.pipeline.errors import ConfigError, LeaseLostError, RunLockedError
from speechmill.pipeline.store.checks import (
    HOW_TO_PICK,
    check_run_dir_contents,
    is_run_dir_listing,
    json_object,
    not_a_run_dir,
)
from speechmill.pipeline.store.layout import RUN_MARKER, RunLayout
from speechmill.pipeline.store.parts import atomic_write_bytes

LOCK_TTL_S = 120.0  # a lease not renewed for this long may be taken over


def lease_ttl_s() -> float:
    """The run lease's TTL: ``SPEECHMILL_LEASE_TTL_S`` (seconds), else :data:`LOCK_TTL_S`.
    A rerun after a crash waits up to this long for the dead run's lease to expire."""
    v = os.environ.get("SPEECHMILL_LEASE_TTL_S", "").strip()
    try:
        return max(3.0, float(v)) if v else LOCK_TTL_S
    except ValueError:
        raise ConfigError(f"SPEECHMILL_LEASE_TTL_S={v!r} is not a number of seconds"
                          ) from None


def marker_bytes() -> bytes:
    """The content of :data:`RUN_MARKER`: the speechmill version that claimed the run."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("speechmill")
    except PackageNotFoundError:
        v = None
    return (json.dumps({"speechmill_run_dir": 1, "created_at": time.time(),
                        "speechmill_version": v}) + "\n").encode()


class RunLock:
    """Refuses a second live run on the same directory.

    The lock is an ``flock`` on ``run.lock`` (NFS clients emulate it with the server's
    byte-range locks), which the kernel drops when the holder dies, so a crashed run never blocks the
    next one and two runs racing for a stale lock cannot both win. The file names the
    holder (pid, host) for the error message. Where the filesystem has no locks
    (``ENOLCK``), it falls back to creating the file exclusively and taking it over when
    its pid is dead on this host.
    """

    def __init__(self, path: Path, claim: bool = False) -> None:
        self.path = path
        self.fd: int | None = None
        #: check that the folder may be a run directory before locking, then mark it
        self.claim = claim

    def _claimed(self) -> RunLock:
        """Locked: mark the folder as a run directory (first run only)."""
        if self.claim and not (self.path.parent / RUN_MARKER).exists():
            try:
                atomic_write_bytes(self.path.parent / RUN_MARKER, marker_bytes())
            except BaseException:
                self.__exit__()
                raise
        return self

    def _me(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "since": time.time()}).encode()

    def _held_by(self) -> RunLockedError:
        try:
            other = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            other = {}
        return RunLockedError(f"run directory {str(self.path.parent)!r} is in use by pid "
                              f"{other.get('pid')} on {other.get('host')}")

    def __enter__(self) -> RunLock:
        import errno
        import fcntl

        if self.claim:
            check_run_dir_contents(self.path.parent)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno == errno.ENOLCK:
                    return self._enter_exclusive()
                raise self._held_by() from None
            try:  # the holder before us may have unlinked the file: lock the live one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, self._me())
            self.fd = fd
            return self._claimed()
        raise RunLockedError(f"could not lock {str(self.path)!r}")

    def _enter_exclusive(self) -> RunLock:
        me = json.loads(self._me())
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text() or "{}")
                except (OSError, json.JSONDecodeError):
                    other = {}
                same_host = other.get("host") == me["host"]
                if not same_host or alive(int(other.get("pid", -1))):
                    raise RunLockedError(
                        f"run directory {str(self.path.parent)!r} is in use by pid "
                        f"{other.get('pid')} on {other.get('host')}"
                        + ("" if same_host else
                           f" (cannot check another host; delete {str(self.path)!r} if "
                           "that run is gone)")
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: the process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self._claimed()
        raise RunLockedError(f"could not lock {str(self.path)!r}")

    def __exit__(self, *exc: object) -> None:
        # unlink while still holding the lock; a waiter that opened the old file sees
        # that it is gone (inode check) and retries on a new one
        self.path.unlink(missing_ok=True)
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None



def alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

def is_precondition_failed(e: BaseException) -> bool:
    """Whether a conditional write was refused because its condition failed."""
    # s3fs: FileExistsError for If-None-Match, OSError "...pre-conditions..." for If-Match
    return isinstance(e, FileExistsError) or "pre-condition" in str(e).lower() \
        or "PreconditionFailed" in str(e)

class LeasedStore(Protocol):
    """What a :class:`RunLease` needs of the store of its run directory."""

    url: str
    fs: Any
    base: str
    layout: RunLayout[str]

    def to_url(self, path: Any) -> str: ...

    def read_file(self, path: Any) -> bytes | None: ...


class RunLease:
    """A lease object ``RUN_DIR/run.lock`` (owner, host, pid, expiry) for object stores.

    Created with a conditional PUT (S3 ``If-None-Match: *``): of two runs starting on the
    same prefix exactly one creates it, the other is refused. The holder renews it every
    ``ttl_s / 3`` (at most 10 s) from a thread, each renewal a PUT with ``If-Match`` on the
    ETag it last wrote. A run that died without releasing leaves an object whose expiry
    passes after ``ttl_s``; the next run takes it over with ``If-Match`` on that stale
    ETag, so of two runs taking over one wins. It does not wait for the expiry when the
    lease names this machine (host name, boot id, pid namespace) and a pid that is gone
    (or now another process: its start time differs): a run SIGKILLed and rerun at once
    on the same host goes on at once. Another host's lease is taken over before it
    expires only with ``break_lease`` (``speechmill run --break-lease``); a live holder on
    this machine never.

    A lost lease stops the run: when a renewal finds the lease taken over (or deleted),
    or the store refused renewals until the lease expired, ``lost`` holds a
    :class:`LeaseLostError` naming the run directory and the new holder, the renewal
    thread raises it in the main thread (through the run's SIGINT handler), and every
    write of a :class:`RunStore` of this run in this process raises it instead of
    writing (:meth:`check`, the fence; a write when the lease may have expired unnoticed,
    e.g. after the process was paused, renews first). Workers in other processes (Ray)
    are not fenced: they stop with the run's executor.

    Stores: AWS S3 honours both conditions (``If-None-Match`` since Aug 2024, ``If-Match``
    on PUT since Nov 2024), as does moto (tested); where the filesystem cannot send them
    (not s3fs) the lock falls back to check-then-write, which narrows but does not close
    the race between two runs started at the same moment.
    """

    def __init__(self, store: LeasedStore, ttl_s: float = LOCK_TTL_S,
                 break_lease: bool = False, claim: bool = False) -> None:
        import threading

        self.store = store
        #: take over another host's live lease (the user says that run is gone)
        self.break_lease = break_lease
        #: check the prefix may be a run directory before locking, then mark it
        self.claim = claim
        #: what taking the lease did ("" when it was free or expired), for the run's log
        self.took_over = ""
        self.fs = store.fs
        self.path = store.layout.lock
        self.ttl_s = ttl_s
        self.owner = uuid.uuid4().hex
        self.etag: str | None = None
        #: the error this run stops with once the lease is lost (None while it holds it)
        self.lost: LeaseLostError | None = None
        #: until when the lease is surely ours: the last renewal's send time + ttl_s
        self.valid_until = 0.0
        self._mutex = threading.Lock()
        self._stop: Any = None
        self._thread: Any = None
        self._conditional = type(self.fs).__module__.startswith("s3fs")

    def _body(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "pid": os.getpid(),
                           "host": socket.gethostname(), "since": now,
                           "expires": now + self.ttl_s, **machine_ident(os.getpid())
                           }).encode()

    def _put(self, **cond: str) -> str | None:
        if self._conditional:
            out = self.fs.pipe_file(self.path, self._body(), **cond)
            return (out or {}).get("ETag")
        if cond.get("mode") == "create" and self.store.read_file(self.path) is not None:
            raise FileExistsError(self.path)
        self.fs.pipe_file(self.path, self._body())
        return None

    def _refused(self, other: dict[str, Any]) -> RunLockedError:
        left = _num(other.get("expires")) - time.time()
        if same_machine(other):
            what = ("that process is still running on this host: stop it or let it "
                    "finish, then rerun")
        else:
            what = ("if that run is gone, wait for the lease to expire or rerun with "
                    "--break-lease to take it over now")
        return RunLockedError(
            f"run directory {self.store.url!r} is in use by pid {other.get('pid')} on "
            f"{other.get('host')} (lease {self.store.to_url(self.path)!r} expires in "
            f"{max(0.0, left):.0f} s unless renewed); {what}")

    def _takeover(self, other: dict[str, Any]) -> str | None:
        """Whether a lease another run wrote may be taken over now: None (no), "" (it
        expired) or what is said about it (its holder is gone; --break-lease)."""
        who = f"pid {other.get('pid')} on {other.get('host')}"
        if _num(other.get("expires")) <= time.time():
            return ""
        if same_machine(other):
            if holder_alive(other):
                return None  # a live run on this machine: never broken
            return (f"took over the lease of {who}: that process is gone (a run killed "
                    "before it could release it)")
        if self.break_lease:
            return (f"broke the lease of {who} before it expired (--break-lease): that "
                    "run, if it still runs, stops at its next renewal")
        return None

    def _unreachable(self, e: BaseException, doing: str) -> ConfigError:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return ConfigError(f"{self.store.url!r}: cannot {doing} ({type(e).__name__}: "
                           f"{first}); check the URL, the endpoint and the credentials",
                           key="run_dir")

    def _check_contents(self) -> None:
        """Claiming the prefix: the run's first access to the store. The prefix must hold
        nothing or a speechmill run directory (as :func:`check_run_dir_contents`); a store
        that cannot be reached is one :class:`ConfigError` naming ``run_dir``."""
        base = self.store.base
        try:
            self.fs.invalidate_cache(base)
            try:
                entries = [str(x).rstrip("/") for x in self.fs.ls(base, detail=False)]
            except (FileNotFoundError, NotADirectoryError):
                entries = []
            if entries == [base] and self.fs.isfile(base):
                raise ConfigError(f"{self.store.url!r} is an object, not a prefix; " + HOW_TO_PICK,
                                  key="run_dir")
            names = [x.rsplit("/", 1)[-1] for x in entries]

            def read(name: str) -> bytes | None:
                try:
                    return self.store.read_file(f"{base}/{name}")
                except (OSError, ValueError):
                    return None

            ok = is_run_dir_listing(names, read)
        except (ConfigError, RunLockedError):
            raise
        except Exception as e:
            raise self._unreachable(e, "list the run directory") from None
        if not ok:
            raise not_a_run_dir(self.store.url, names)

    def __enter__(self) -> RunLease:
        if self.claim:
            self._check_contents()
        for _ in range(3):
            t0 = time.time()
            try:
                self.etag = self._put(mode="create")
                break
            except Exception as e:
                if not is_precondition_failed(e):
                    raise self._unreachable(e, "create its lease object") from None
            self.fs.invalidate_cache(self.path)
            try:
                info = self.fs.info(self.path)
                raw = self.fs.cat_file(self.path)
            except FileNotFoundError:
                continue  # released meanwhile: try to create again
            other = json_object(raw) or {}
            why = self._takeover(other)
            if why is None:
                raise self._refused(other)
            t0 = time.time()
            try:  # take it over, only if nobody else did first
                self.etag = self._put(IfMatch=info.get("ETag", "")) if self._conditional \
                    else self._put()
                self.took_over = why
                break
            except Exception as e:
                if not is_precondition_failed(e):
                    raise
                continue
        else:
            raise RunLockedError(f"could not lock {self.store.to_url(self.path)!r}")
        self.valid_until = t0 + self.ttl_s
        LEASES[self.store.url] = self
        self._start_renewal()
        if self.took_over:
            import logging

            logging.getLogger("speechmill").warning(
                "run directory %s: %s", self.store.url, self.took_over)
        if self.claim:
            marker = self.store.layout.marker
            try:
                if self.store.read_file(marker) is None:
                    self.fs.pipe_file(marker, marker_bytes())
            except BaseException:
                self.__exit__()
                raise
        return self

    # -- holding it: renewal, and the fence every write of this process goes through ------
    def _holder(self) -> dict[str, Any] | None:
        """Who the lease object names now (None: it is gone)."""
        self.fs.invalidate_cache(self.path)
        try:
            return json.loads(self.fs.cat_file(self.path) or b"{}")
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}

    def _lose(self, why: str) -> LeaseLostError:
        self.lost = LeaseLostError(
            f"run directory {self.store.url!r}: this run lost its lease "
            f"{self.store.to_url(self.path)!r}: {why}. It stops here so that two runs never "
            "write to the same run directory; every batch it committed is kept. Rerun once "
            "the other run has finished (or stop it), and the rerun resumes")
        return self.lost

    def _taken_over(self) -> LeaseLostError:
        other = self._holder()
        late = time.time() - (self.valid_until - self.ttl_s)
        if other is None:
            return self._lose("the lease object was deleted")
        return self._lose(
            f"it was taken over by pid {other.get('pid')} on {other.get('host')} "
            f"(owner {other.get('owner')}) after this run had not renewed it for "
            f"{late:.0f} s (TTL {self.ttl_s:g} s)")

    def _renew(self) -> None:
        """Renew now (under the mutex); raises :class:`LeaseLostError` when the lease is
        gone, or could not be renewed before it expired."""
        with self._mutex:
            if self.lost is not None:
                raise self.lost
            t0 = time.time()
            try:
                if self._conditional:
                    self.etag = self._put(**({"IfMatch": self.etag} if self.etag else {}))
                else:  # check-then-write: notices a takeover, cannot exclude a race
                    other = self._holder()
                    if (other or {}).get("owner") != self.owner:
                        raise self._taken_over()
                    self.etag = self._put()
            except LeaseLostError:
                raise
            except Exception as e:
                if is_precondition_failed(e) or isinstance(e, FileNotFoundError):
                    raise self._taken_over() from None
                if time.time() < self.valid_until:
                    return  # the store is unreachable for now: retried until expiry
                raise self._lose(
                    f"it could not be renewed before it expired ({type(e).__name__}: "
                    f"{e}); another run may have taken it over since") from None
            self.valid_until = t0 + self.ttl_s

    def check(self) -> None:
        """The fence: raises :class:`LeaseLostError` when the lease is lost. A write
        when the lease may have expired (the process was paused, the renewal thread
        starved) first renews it, so nothing is written once another run may hold it."""
        if self.lost is not None:
            raise self.lost
        if time.time() < self.valid_until - self.ttl_s / 6:
            return
        try:
            self._renew()
        except LeaseLostError as e:
            from speechmill.pipeline.signals import discard_pending

            discard_pending(e)  # raised here: the renewal thread's interrupt is moot
            raise

    def _start_renewal(self) -> None:
        import threading

        self._stop = threading.Event()

        def renew() -> None:
            from speechmill.pipeline.signals import raise_in_main

            while not self._stop.wait(min(self.ttl_s / 3, 10.0)
                                      if time.time() < self.valid_until - self.ttl_s / 2
                                      else 1.0):  # retry soon while renewals fail
                try:
                    self._renew()
                except LeaseLostError as e:
                    # stop the run: the main thread raises it (writes of this process
                    # are fenced by check() meanwhile)
                    if not self._stop.is_set():
                        raise_in_main(e)
                    return

        self._thread = threading.Thread(target=renew, name="speechmill-lease", daemon=True)
        self._thread.start()

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=10)
        if LEASES.get(self.store.url) is self:
            del LEASES[self.store.url]
        if self.lost is not None:
            return  # someone else holds it now: leave their lease alone
        try:
            self.fs.invalidate_cache(self.path)
            other = json.loads(self.fs.cat_file(self.path) or b"{}")
            if other.get("owner") == self.owner:
                self.fs.rm_file(self.path)
        except (FileNotFoundError, json.JSONDecodeError):
            pass


def _num(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return 0.0
    return x if x == x else 0.0  # NaN: no expiry


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, Linux); None if unknown."""
    stat = _read_text(f"/proc/{pid}/stat")
    if not stat:
        return None
    try:
        return stat.rsplit(")", 1)[1].split()[19]
    except IndexError:
        return None


def machine_ident(pid: int) -> dict[str, str]:
    """What tells this machine and process apart beyond the host name (Linux): the boot
    id, the pid namespace and the process's start time (a reused pid starts later)."""
    out = {"boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
           "pid_start": _pid_start(pid)}
    with contextlib.suppress(OSError):
        out["pid_ns"] = os.readlink("/proc/self/ns/pid")
    return {k: v for k, v in out.items() if v}


def same_machine(other: dict[str, Any]) -> bool:
    """Whether a lease was written on this machine, in this pid namespace (so its pid
    can be checked here): same host name, and same boot id and pid namespace where the
    lease records them (leases of older versions name only the host)."""
    if other.get("host") != socket.gethostname():
        return False
    mine = machine_ident(os.getpid())
    return all(other[k] == mine.get(k) for k in ("boot_id", "pid_ns") if k in other)


def holder_alive(other: dict[str, Any]) -> bool:
    """Whether the pid a lease of this machine names still runs that process."""
    try:
        pid = int(other.get("pid", -1))
    except (TypeError, ValueError):
        return False
    if not alive(pid):
        return False
    start = other.get("pid_start")
    return not start or _pid_start(pid) in (None, start)


#: the leases this process holds, by run directory URL: every RunStore of that run
#: in this process writes only through their fence (:meth:`RunLease.check`)
LEASES: dict[str, RunLease] = {}


def fence(url: str) -> None:
    """Raise :class:`LeaseLostError` when this process holds the lease of the run at
    ``url`` and lost it (another run may write there now); renews a lease that may have
    expired unnoticed (:meth:`RunLease.check`). Nothing for a run this process holds no
    lease of."""
    lease = LEASES.get(url)
    if lease is not None:
        lease.check()
