"""All-or-nothing writes of the files of one adapter folder (weights, adapter_config.json, README.md).

A save that fails or is killed part-way must leave the folder's old adapter or the new one, whole: never new
weights beside an old config. Two cases:

* the folder does not exist yet (a fresh save, a Trainer checkpoint-N folder): every file is written into a
  hidden sibling folder, fsynced, and the folder is renamed into place, so it appears complete or not at all;
* it exists (other files or adapters may live in it): every file is written beside its target under a temporary
  name and fsynced; the files it replaces are kept as hard-linked backups; a journal naming the files is fsynced;
  then each file is renamed into place, and the journal and backups are removed. An exception on the way puts the
  backups back. A process killed on the way leaves the journal, and `recover_interrupted_save` (run before every
  save and load of the folder) puts the old files back; a process killed before the journal was written or after
  it was removed leaves only temporary files, which it deletes.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Mapping

TMP_SUFFIX = ".peft_fast-tmp"
OLD_SUFFIX = ".peft_fast-old"
JOURNAL = ".peft_fast-save-journal.json"
STAGING_PREFIX = ".peft_fast-staging-"

Writer = Callable[[str], None]  # writes one file's whole content to the path it is given


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # platforms that cannot open a directory (Windows): rename is as durable as it gets there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _hidden(folder: str, name: str, suffix: str) -> str:
    return os.path.join(folder, f".{name}{suffix}")


def write_files_atomically(folder: str, writers: Mapping[str, Writer]) -> None:
    """Write `folder/<name>` for every name in `writers`, all of them or none (see the module docstring)."""
    for name in writers:
        if os.sep in name or (os.altsep and os.altsep in name) or name in ("", ".", ".."):
            raise ValueError(f"not a plain file name: {name!r}")
    folder = os.path.abspath(folder)
    if not os.path.exists(folder):
        _write_new_folder(folder, writers)
    else:
        recover_interrupted_save(folder)
        _replace_in_folder(folder, writers)


def _write_new_folder(folder: str, writers: Mapping[str, Writer]) -> None:
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f"{STAGING_PREFIX}{os.path.basename(folder)}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.mkdir(staging)
    try:
        for name, write in writers.items():
            path = os.path.join(staging, name)
            write(path)
            _fsync_file(path)
        _fsync_dir(staging)
        os.rename(staging, folder)  # fails (and we clean up) if someone else created the folder meanwhile
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(parent)


def _replace_in_folder(folder: str, writers: Mapping[str, Writer]) -> None:
    names = list(writers)
    tmp = {n: _hidden(folder, n, TMP_SUFFIX) for n in names}
    old = {n: _hidden(folder, n, OLD_SUFFIX) for n in names}
    journal = os.path.join(folder, JOURNAL)
    replaced: list[str] = []
    try:
        for name in names:
            writers[name](tmp[name])
            _fsync_file(tmp[name])
        for name in names:
            if os.path.isfile(os.path.join(folder, name)):
                _backup(os.path.join(folder, name), old[name])
        with open(journal, "w") as f:
            json.dump({"files": names}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(folder)
        for name in names:
            os.replace(tmp[name], os.path.join(folder, name))
            replaced.append(name)
        _fsync_dir(folder)
    except BaseException:
        _roll_back(folder, replaced, tmp, old)
        _remove(journal)
        raise
    _remove(journal)
    for name in names:
        _remove(old[name])
    _fsync_dir(folder)


def _backup(path: str, backup: str) -> None:
    try:
        os.link(path, backup)  # no copy: the rename that follows only moves the name
    except OSError:  # filesystems without hard links
        shutil.copy2(path, backup)
        _fsync_file(backup)


def write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _roll_back(folder: str, names, tmp: Mapping[str, str], old: Mapping[str, str]) -> None:
    for name in names:
        target = os.path.join(folder, name)
        if os.path.exists(old[name]):
            os.replace(old[name], target)
        else:  # it did not exist before this save
            _remove(target)
    for path in list(tmp.values()) + list(old.values()):
        _remove(path)
    _fsync_dir(folder)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def recover_interrupted_save(folder: str) -> None:
    """Undo what a killed save left in `folder`: with its journal, put the old files back; always delete its
    temporary files, backups and staging folders. A folder no save touched is left as it is (and not written)."""
    if not os.path.isdir(folder):
        return
    journal = os.path.join(folder, JOURNAL)
    entries = os.listdir(folder)
    if JOURNAL in entries:
        try:
            _undo_journal(folder, journal)
        except OSError as exc:
            raise OSError(f"{folder} holds an interrupted adapter save ({JOURNAL}) that could not be undone: {exc}; "
                          "its files may mix two saves") from exc
        entries = os.listdir(folder)
    for entry in entries:
        if entry.startswith(".") and (entry.endswith(TMP_SUFFIX) or entry.endswith(OLD_SUFFIX)):
            try:
                os.remove(os.path.join(folder, entry))
            except OSError:  # leftovers only: a read-only folder still loads
                pass
    parent = os.path.dirname(os.path.abspath(folder))
    prefix = f"{STAGING_PREFIX}{os.path.basename(os.path.abspath(folder))}-"
    for entry in os.listdir(parent) if os.path.isdir(parent) else []:
        if entry.startswith(prefix):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _undo_journal(folder: str, journal: str) -> None:
    try:
        with open(journal) as f:
            names = [n for n in json.load(f)["files"] if isinstance(n, str) and os.sep not in n]
    except (OSError, ValueError, KeyError, TypeError):
        # the journal is fsynced before the first rename: one that cannot be read was cut off while being
        # written, so no file was replaced yet and the files in place are the old ones
        names = []
    _roll_back(folder, sorted(set(names)), {n: _hidden(folder, n, TMP_SUFFIX) for n in names},
               {n: _hidden(folder, n, OLD_SUFFIX) for n in names})
    _remove(journal)
