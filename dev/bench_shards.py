"""
Where to check pretraining shards for damage: the cost of each check over 240 shards (the speedrun's count).

    python -m dev.bench_shards [--shards=240] [--dir=/tmp]

Writes 240 copies of a shard shaped like FineWeb-Edu's (53 row groups of 1024 documents, so the footer
has the real size; the documents are short to save disk), then times, with the files evicted from the
page cache first (posix_fadvise) and again warm:
  footer: open each shard and read its footer (what the loader does anyway for the row-group counts)
  crc32:  read and checksum the whole file (what verifying a recorded checksum costs)
  decode: read and decompress every row group (what finding damage without a checksum costs)
crc32 and decode are measured per MB and scaled to 240 real shards of ~94 MB (FineWeb-Edu's mean size).
"""

import argparse
import os
import shutil
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.integrity import file_record

REAL_SHARD_MB = 94  # mean size of karpathy/fineweb-edu-100b-shuffle shards


def evict(paths):
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def timed(fn, paths):
    t0 = time.perf_counter()
    for path in paths:
        fn(path)
    return time.perf_counter() - t0


def read_footer(path):
    return pq.ParquetFile(path).metadata.num_row_groups


def decode(path):
    pf = pq.ParquetFile(path)
    for i in range(pf.num_row_groups):
        pf.read_row_group(i, columns=["text"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, default=240)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--real", default="",
                        help="a real-size shard to time crc32/decode on (default: a generated one)")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(dir=args.dir, prefix="bench_shards.")
    try:
        docs = [f"Document {i}: " + "some words of text " * (i % 7 + 1) for i in range(53 * 1024)]
        first = os.path.join(folder, "shard_00000.parquet")
        pq.write_table(pa.table({"text": docs}), first, row_group_size=1024, compression="zstd")
        paths = [first]
        for i in range(1, args.shards):
            paths.append(os.path.join(folder, f"shard_{i:05d}.parquet"))
            shutil.copyfile(first, paths[-1])
        evict(paths)
        footer_cold = timed(read_footer, paths)
        footer_warm = timed(read_footer, paths)
        big = args.real or first
        size_mb = os.path.getsize(big) / 1e6
        evict([big])
        crc_cold = timed(file_record, [big])
        crc_warm = timed(file_record, [big])
        evict([big])
        decode_cold = timed(decode, [big])
        decode_warm = timed(decode, [big])
        scale = args.shards * REAL_SHARD_MB / size_mb
        print(f"{args.shards} shards, footers of {pq.ParquetFile(first).metadata.num_row_groups} row groups "
              f"({pq.ParquetFile(first).metadata.serialized_size:,} bytes); crc32/decode timed on {size_mb:.1f} MB "
              f"and scaled to {args.shards} x {REAL_SHARD_MB} MB")
        print(f"  footer, all shards:  cold {footer_cold * 1000:.0f} ms | warm {footer_warm * 1000:.0f} ms")
        print(f"  crc32, all shards:   cold {crc_cold * scale:.1f} s | warm {crc_warm * scale:.1f} s "
              f"(per shard: {crc_cold * REAL_SHARD_MB / size_mb * 1000:.0f} / "
              f"{crc_warm * REAL_SHARD_MB / size_mb * 1000:.0f} ms)")
        print(f"  decode, all shards:  cold {decode_cold * scale:.1f} s | warm {decode_warm * scale:.1f} s")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
