"""study_storage.py: the journal store's claim lock, worker tokens and write lock."""
import threading
import uuid

import study_storage


def test_a_journal_named_through_a_symlink_shares_its_claim_lock_and_tokens(tmp_path):
    """Two searches naming one journal, one through a symbolic link, must exclude each other
    and see each other's workers alive: else each takes every grid point and fails the
    other's running trials as dead, over and over."""
    journal, link = tmp_path / "study.journal", tmp_path / "link.journal"
    real = study_storage.JournalStore(str(journal))
    link.symlink_to(journal)
    linked, token = study_storage.JournalStore(str(link)), uuid.uuid4().hex
    with real.lock(study_storage.CLAIM), linked.lock(study_storage.CLAIM, wait=False) as free:
        assert not free, "the claim lock taken twice at once"
    with real.lock(token), linked.lock(token, wait=False) as free:
        assert not free, "a live worker taken for dead"


def test_a_journal_lock_left_held_by_a_signal_does_not_hang_its_own_process(tmp_path):
    """A signal between Optuna's acquire and release leaves the journal's write lock held;
    the same process's next write (recording its trial as interrupted) must still go on."""
    store = study_storage.JournalStore(str(tmp_path / "study.journal"))
    assert store.acquire()  # and never released, as after a signal at the wrong moment
    done = []
    writer = threading.Thread(target=lambda: done.append(store.acquire()), daemon=True)
    writer.start()
    writer.join(timeout=10)
    assert done == [True], "the process waited on its own journal lock"
    store.release()


def test_token_files_of_dead_workers_are_swept_and_live_ones_kept(tmp_path):
    """A kill -9 leaves a worker's (empty, unlocked) token file behind; the next store opened
    on the journal removes it, and never the token of a worker still alive."""
    journal, workers = str(tmp_path / "study.journal"), tmp_path / "study.journal.workers"
    store = study_storage.JournalStore(journal)
    live, dead = uuid.uuid4().hex, uuid.uuid4().hex
    with store.lock(live):
        (workers / dead).touch()  # what a killed worker leaves
        study_storage.JournalStore(journal)
        assert sorted(p.name for p in workers.iterdir()) == [live]
    assert not any(workers.iterdir())
