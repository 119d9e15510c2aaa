"""Where a search's trials live, shared by workers on any machine: the stores, the claim lock,
worker tokens and liveness. hyperparam_tuning.py decides what to run; this says who runs it.

How workers share a study (for maintainers)
- Storage: a journal file or PostgreSQL only; other databases hand out queued trials
  non-atomically. The journal's write lock moves a torn last line to <journal>.torn.
- The claim lock (an flock on <journal>.claim, or an advisory lock on the study name) is
  held while a worker retires dead trials, queues missing grid points, checks the budget,
  asks for a trial and records itself in it: no grid point or budget slot is taken twice.
- Liveness: each worker holds a token for life (an flock on <journal>.workers/<uuid>, or
  an advisory lock), dropped by the kernel or server when it dies, on any host or PID
  namespace. A RUNNING trial whose token can be taken (or has none) is failed as
  interrupted and rerun in its own folder from its last epoch. A trial retired while its
  worker still runs (a dropped database session) is reported at tell, not a crash.
- Failures of the configuration (divergence, a bad value) are final; those of the machine
  (an OSError while writing) or a signal leave the trial to rerun and stop the worker.
- Seeds derive from (--sampler-seed, worker, trials in the study): resumes draw new points.
- Signals (cli.stop_on_signals): the first SIGINT, SIGTERM or SIGHUP raises cli.Stopped
  in the main thread, relayed there by a thread if it landed elsewhere; train.train checks
  the flag every epoch in case CPython dropped the exception. The parent passes the signal
  on to its workers, which also stop when the parent is gone.
- Folders: the parent holds --out-dir; its trials.json names the one study it holds.
"""
import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import sys
import uuid
import zlib

import optuna
from optuna.trial import TrialState

import cli
import files

TOKEN = re.compile(r"[0-9a-f]{32}")  # a worker's token; CLAIM names the claim lock
CLAIM = "claim"
STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed",
          TrialState.RUNNING: "running", TrialState.WAITING: "queued"}


def where(storage):
    """The storage for messages and for telling studies apart, without a password."""
    if "://" not in storage:
        return os.path.abspath(storage)
    return re.sub(r"(://[^/:@]*):[^@]*@", r"\1:***@", storage)  # as SQLAlchemy reads it



class JournalStore:
    """A study in a journal file. Its locks are flocks on <journal>.claim and on one file per
    worker token in <journal>.workers/. It is also the journal's write lock for Optuna, which
    first moves an unfinished last line (left by a full disk or a power cut) to <journal>.torn."""

    def __init__(self, path):
        path = os.path.realpath(path)  # through a link, the same .claim and .workers/
        os.makedirs(path + ".workers", exist_ok=True)
        # One open file for every append's flock: a lock that a signal left held (between
        # acquire and release) is taken again at once, not waited for by its own process.
        self.path, self._journal = path, files.open_regular(path, mode="ab")
        with self.lock(CLAIM):  # under which tokens are also made: none is swept half-made
            for token in filter(TOKEN.fullmatch, os.listdir(path + ".workers")):
                with self.lock(token, wait=False):  # a dead process's token file goes
                    pass
            backend = optuna.storages.journal.JournalFileBackend(path, lock_obj=self)
            self.storage = optuna.storages.JournalStorage(backend)

    @contextlib.contextmanager
    def lock(self, name, wait=True):
        """Hold the lock `name`; yields whether it was free (always so when `wait`ing). A
        token's file goes with its lock (removed while still held): none is left behind."""
        path = self.path + ".claim" if name == CLAIM else os.path.join(self.path + ".workers", name)
        held = files.flocked(path, wait)
        try:
            yield held is not None
        finally:
            if held and name != CLAIM:
                with contextlib.suppress(OSError):
                    os.remove(path)
            if held:
                held.close()

    def acquire(self):
        fcntl.flock(self._journal, fcntl.LOCK_EX)  # Optuna's own lock is a symlink: no clash
        try:  # Optuna appends by path: it must still name the journal this store opened
            same = os.path.samestat(os.fstat(self._journal.fileno()), os.stat(self.path))
        except OSError:
            same = False
        if not same:
            self.release()
            raise cli.Error(f"{self.path} was moved or replaced while this search used it: "
                            f"stopped") from OSError(errno.ESTALE, "journal moved")
        with files.open_regular(self.path, mode="r+b") as f:
            size = f.seek(0, os.SEEK_END)
            start = _last_line_start(f, size)
            if start == size:
                return True
            with files.open_regular(self.path + ".torn", mode="ab") as aside:
                f.seek(start)
                shutil.copyfileobj(f, aside)  # a piece at a time: the line may be long
                aside.write(b"\n")
                aside.flush()
                os.fsync(aside.fileno())
            f.truncate(start)
            os.fsync(f.fileno())
        print(f"note: {self.path} ended in an unfinished line ({size - start} bytes, left by a "
              f"full disk or a power cut); moved it to {self.path}.torn", file=sys.stderr,
              flush=True)
        return True

    def release(self):
        fcntl.flock(self._journal, fcntl.LOCK_UN)


def _last_line_start(f, size, chunk=1 << 20):
    """Where the unfinished last line of the open file `f` of `size` bytes starts; `size` if
    it ends in a newline. Read back a megabyte at a time, however long the line is."""
    end = size
    while end > 0:
        f.seek(max(0, end - chunk))
        block = f.read(end - max(0, end - chunk))
        if end == size and block.endswith(b"\n"):
            return size
        if b"\n" in block:
            return end - len(block) + block.rindex(b"\n") + 1
        end -= len(block)
    return 0


class PostgresStore:
    """A study in PostgreSQL; its locks are advisory locks, each in a session of its own,
    which the server drops when the session ends (it probes an idle peer's TCP link)."""

    def __init__(self, url, study_name):
        import sqlalchemy
        self._engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        self._sql, self._study = sqlalchemy.text, study_name
        with self.lock(CLAIM):  # machines starting together must not all create the tables
            self.storage = optuna.storages.RDBStorage(url)

    @contextlib.contextmanager
    def lock(self, name, wait=True):
        """Hold the lock `name`; yields whether it was free (always so when `wait`ing)."""
        key = (zlib.crc32(f"hyperparam_tuning:{self._study}".encode()) if name == CLAIM
               else int(name[:16], 16) - (1 << 63))  # a token: a signed 64-bit key
        with self._engine.connect() as session:  # closing the session drops the lock
            session.execute(self._sql("SET tcp_keepalives_idle = 30; SET "
                                      "tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3"))
            take = "pg_advisory_lock" if wait else "pg_try_advisory_lock"
            free = session.execute(self._sql(f"SELECT {take}(:k)"), {"k": key}).scalar()
            session.commit()  # the lock is the session's: no transaction stays open
            yield wait or free



# --- trials as the store holds them ---------------------------------------------------------


def trial_params(trial):
    """A trial's parameters, also for a queued trial that has not suggested them yet."""
    return trial.system_attrs.get("fixed_params") or trial.params


def failure(trial):
    """Why a failed trial failed; one with no reason was cut short (its process died)."""
    if trial.state != TrialState.FAIL:
        return ""
    return trial.user_attrs.get("failure") or "interrupted: its worker stopped mid-trial"


def interrupted(trial):
    return failure(trial).startswith("interrupted")


def counted(trials):
    """Trials that use the budget: run or running, not queued, not cut short."""
    return sum(t.state != TrialState.WAITING and not interrupted(t) for t in trials)


# --- this worker's seat -----------------------------------------------------------------------


class SharedStudy:
    """This worker's seat in a shared study: the store, the study, and a token held for the
    worker's life, by which other workers tell it is alive."""

    def __init__(self, storage, study_name, open_study):
        """Open the store and the study (`open_study(optuna_storage)`, under the claim lock)."""
        self.token, self._held = uuid.uuid4().hex, contextlib.ExitStack()  # its lock
        try:
            self.store = (PostgresStore(storage, study_name) if "://" in storage
                          else JournalStore(storage))
            with self.store.lock(CLAIM):
                self._held.enter_context(self.store.lock(self.token))
                self.study = open_study(self.store.storage)
        except cli.Error:
            raise
        except Exception as exc:  # a bad URL, no driver, no server
            raise cli.Error(f"cannot open --storage {where(storage)}: "
                            f"{cli.one_line(exc) or type(exc).__name__}") from None

    def close(self):
        self._held.close()

    def is_dead(self, trial):
        """Whether a running trial's worker is gone: its token is free, or it has none (it
        died between taking the trial and recording itself in it, both under the claim lock)."""
        token = str(trial.user_attrs.get("worker", {}).get("token"))
        if not TOKEN.fullmatch(token):  # also never a path out of <journal>.workers/
            return True
        with self.store.lock(token, wait=False) as free:
            return free

    @contextlib.contextmanager
    def claim_lock(self):
        """Hold the claim lock, the trials of dead workers failed first (to run again)."""
        with self.store.lock(CLAIM):
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if self.is_dead(t):
                    self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            yield

    def sign(self, trial):
        """Record this worker in `trial` (under the claim lock): a trial without it is dead."""
        trial.set_user_attr("worker", {"token": self.token, "host": socket.gethostname(),
                                       "pid": os.getpid()})
