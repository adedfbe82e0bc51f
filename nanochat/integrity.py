"""
Damaged files: how the project notices them and what it tells the user.

A file can be cut short (a full disk, a copy or sync that stopped) or have flipped bits (a bad disk
or transfer). Whatever reads a file back either checks it against a recorded size and checksum, or
turns the reader's own failure into one DamagedFileError that names the file and the command that
rebuilds it. DamagedFileError is a SystemExit: a script that meets one stops with that message and
exit code 1, without a traceback (a traceback is still what a bug gets), under torchrun too.
Code that can recover (e.g. try an earlier checkpoint) catches DamagedFileError by name.

The checksum is CRC-32 (zlib): it is in the standard library, catches every burst of up to 32
flipped bits, and runs at ~2.5 GB/s here (blake2b 0.4, sha256 0.6; xxh3 15 GB/s but not in the
standard library), so it adds about a second per GB saved or loaded.
"""

import json
import os
import zlib

from nanochat.common import atomic_write

CHUNK = 1 << 22  # 4 MiB reads while checksumming


class DamagedFileError(SystemExit):
    def __init__(self, path, problem, fix):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"error: {path} is damaged: {problem}.\n{fix}")


class _ChecksumWriter:
    """A write-only file wrapper that counts bytes and checksums them on their way to disk."""

    def __init__(self, f):
        self.f, self.size, self.crc32 = f, 0, 0

    def write(self, data):
        self.size += len(data)
        self.crc32 = zlib.crc32(data, self.crc32)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def write_recorded(path, write_fn):
    """
    atomic_write of a binary file that also returns its record {"size": bytes, "crc32": hex}, computed
    from the bytes as they are written (no second read). write_fn(f) may only call f.write/f.flush,
    which is all torch.save and pickle.dump need.
    """
    record = {}

    def write(f):
        writer = _ChecksumWriter(f)
        write_fn(writer)
        record.update(size=writer.size, crc32=f"{writer.crc32:08x}")

    atomic_write(path, write)
    return record


def file_record(path):
    """{"size", "crc32"} of a file on disk (reads it once)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"size": size, "crc32": f"{crc:08x}"}


def record_problem(path, record, full=True):
    """What is wrong with path against its record, or None if it matches. full=False compares sizes only (no read)."""
    if not os.path.exists(path):
        return "the file is missing"
    size = os.path.getsize(path)
    if size != record["size"]:
        return f"it has {size:,} bytes where {record['size']:,} were written"
    if full:
        actual = file_record(path)["crc32"]
        if actual != record["crc32"]:
            return f"its CRC-32 is {actual} where {record['crc32']} was written (the content changed)"
    return None


def verify_file(path, record, fix):
    """Raise DamagedFileError (naming path and `fix`) unless the file matches its record."""
    problem = record_problem(path, record)
    if problem is not None:
        raise DamagedFileError(path, problem, fix)


# ---------------------------------------------------------------------------------------------------
# Manifests: {file name: record} in <folder>/manifest.json, for folders whose files arrive one by one
# (downloaded shards, task data) or together (a tokenizer). Files without an entry are not checked.

MANIFEST = "manifest.json"


def read_manifest(folder, fix=None):
    """The records of folder/manifest.json ({} if there is none); DamagedFileError if it is unreadable."""
    path = os.path.join(folder, MANIFEST)
    fix = fix or (f"Delete it (rm {path}): the files it lists are then used unchecked, and files downloaded "
                  "from then on are recorded again.")
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
        if isinstance(records, dict) and all(isinstance(r, dict) and {"size", "crc32"} <= r.keys()
                                             for r in records.values()):
            return records
        problem = "it does not hold a record (size, crc32) per file"
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = f"it is not valid JSON ({e})"
    raise DamagedFileError(path, problem, fix)


def add_to_manifest(folder, records):
    """Add or replace entries of folder/manifest.json (under a file lock: downloads may run in parallel)."""
    from filelock import FileLock
    path = os.path.join(folder, MANIFEST)
    with FileLock(path + ".lock"):
        try:
            current = read_manifest(folder)
        except DamagedFileError:
            current = {}  # a damaged manifest is rebuilt from what is recorded from now on
        current.update(records)
        atomic_write(path, lambda f: json.dump(current, f, indent=1, sort_keys=True), mode="w")


def verify_in_manifest(path, fix, full=True, manifest_fix=None):
    """
    Check path against its folder's manifest entry, if it has one (DamagedFileError naming `fix` on a
    mismatch; a damaged manifest itself is named with manifest_fix, by default: delete it).
    """
    record = read_manifest(os.path.dirname(os.path.abspath(path)), manifest_fix).get(os.path.basename(path))
    if record is not None:
        problem = record_problem(path, record, full=full)
        if problem is not None:
            raise DamagedFileError(path, problem, fix)
