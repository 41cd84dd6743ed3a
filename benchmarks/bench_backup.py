"""The backup against plain tools, side by side on the same disk: snapshot vs `cp -a`, a no-change run, and
verification vs `sha256sum`.

    .venv/bin/python benchmarks/bench_backup.py [--mb 1024] [--files 10000]

Prints figures; asserts nothing. A Hub-shaped cache (blobs named by their sha256, snapshot symlinks) of
`--files` random files totalling `--mb` MB is generated in a temp dir next to the targets (one disk) and
deleted afterwards. Goals (issue 14): first snapshot >= 0.9 of cp -a's throughput; a no-change run under
1 s; verification >= 1.5 x sha256sum's throughput. Page caches are warm for every contender alike.

Each contender is timed until its data is on the disk: `cp -a` then `sync`, the snapshot (which flushes its
target while it copies and before its rename) then `sync`. `BENCH_DIR=/dev/shm` runs it in memory, where
no disk counts and the ratio shows the CPU the snapshot's extra walks cost.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_cache(root: Path, total_mb: int, files: int) -> int:
    size = total_mb * 1024 * 1024 // files
    written = 0
    for r in range(10):  # ten repos, each with its blobs and one snapshot of symlinks
        repo = root / f"models--bench--m{r}"
        blobs, snap = repo / "blobs", repo / "snapshots" / ("%040x" % r)
        blobs.mkdir(parents=True)
        snap.mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("%040x" % r)
        for i in range(files // 10):
            data = os.urandom(size)
            digest = hashlib.sha256(data).hexdigest()
            (blobs / digest).write_bytes(data)
            (snap / f"shard-{i:05}.safetensors").symlink_to(f"../../blobs/{digest}")
            written += size
    return written


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cpu_s() -> float:
    """CPU seconds of this process and its finished children: less noisy than wall time on a shared VM."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024, help="cache size in MB (default 1024)")
    parser.add_argument("--files", type=int, default=10_000, help="files in the cache (default 10000)")
    parser.add_argument("--repeat", type=int, default=6,
                        help="pairs of runs of cp -a and the snapshot, alternating which goes first")
    args = parser.parse_args()

    from idp_pipelines.backup import Target
    from idp_pipelines.backup.snapshot import make_snapshot, manifest_of
    from idp_pipelines.backup.verify import verify_snapshot

    with tempfile.TemporaryDirectory(prefix="bench-backup-", dir=os.environ.get("BENCH_DIR")) as tmp_str:
        tmp = Path(tmp_str)
        cache = tmp / "cache"
        t = timed(lambda: make_cache(cache, args.mb, args.files))
        total = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file() and not p.is_symlink())
        mb = total / 1e6
        print(f"cache: {args.files} files, {mb:,.0f} MB, {sum(1 for _ in cache.rglob('*'))} entries "
              f"(made in {t:.1f} s) in {tmp}")
        # each contender's time includes its own `sync` (the writes on disk, not in the page cache). They
        # alternate, and which goes first alternates too: a virtual disk that throttles writes after a burst
        # (this one does: the same cp took 2 s, then 7 s, then 10 s) must not favour whichever runs first.
        cps, snaps, cp_cpu, snap_cpu = [], [], [], []
        target = Target(str(tmp / "nas"))

        def run_cp() -> None:
            shutil.rmtree(tmp / "cp-copy", ignore_errors=True)
            subprocess.run(["sync"], check=True)
            c = cpu_s()
            cps.append(timed(lambda: subprocess.run(["cp", "-a", str(cache), str(tmp / "cp-copy")], check=True)
                             and subprocess.run(["sync"], check=True)))
            cp_cpu.append(cpu_s() - c)

        def run_snap() -> None:
            shutil.rmtree(tmp / "nas", ignore_errors=True)
            subprocess.run(["sync"], check=True)
            c = cpu_s()
            snaps.append(timed(lambda: (make_snapshot(cache, target, lock_path=tmp / "lock"),
                                        subprocess.run(["sync"], check=True))))
            snap_cpu.append(cpu_s() - c)

        for i in range(args.repeat):
            for contender in ((run_cp, run_snap) if i % 2 == 0 else (run_snap, run_cp)):
                contender()
        ratios = sorted(c / s for c, s in zip(cps, snaps, strict=True))
        cp, snap_s = min(cps), min(snaps)
        print(f"cp -a (+ sync):     {cp:7.2f} s  {mb / cp:8.1f} MB/s   runs: {', '.join(f'{x:.2f}' for x in cps)}")
        print(f"first snapshot (+ sync): {snap_s:7.2f} s  {mb / snap_s:8.1f} MB/s   runs: "
              f"{', '.join(f'{x:.2f}' for x in snaps)}")
        print(f"  throughput ratio to cp -a: best against best {cp / snap_s:.2f}, run by run "
              f"{', '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f}; goal >= 0.9)")
        print(f"  CPU seconds (this process and its children), least of the runs: cp -a {min(cp_cpu):.2f}, snapshot "
              f"{min(snap_cpu):.2f} (ratio {min(cp_cpu) / min(snap_cpu):.2f}; steadier than wall time on a shared VM)")
        again = make_snapshot(cache, target, lock_path=tmp / "lock")
        print(f"no-change snapshot: {again.seconds:7.2f} s  ({again.files_sent} files sent; goal < 1 s)")

        manifest = manifest_of(target, again.name)
        blobs = [p for p in (Path(target.path) / again.name / "cache").rglob("blobs/*")]
        sums = timed(lambda: subprocess.run("xargs -0 sha256sum > /dev/null", shell=True, check=True,
                                            input=b"\0".join(str(p).encode() for p in blobs)))
        report = verify_snapshot(target, again.name, manifest, gguf_sha256={}, models_by_repo={}, cursor=None,
                                 period=1, full=True)
        assert not report.findings, report.findings[:3]
        print(f"sha256sum:          {sums:7.2f} s  {mb / sums:8.1f} MB/s")
        print(f"verification:       {report.seconds:7.2f} s  {report.hashed_bytes / 1e6 / report.seconds:8.1f} MB/s  "
              f"({report.hashed} files; ratio to sha256sum {sums / report.seconds:.2f}; goal >= 1.5)")


if __name__ == "__main__":
    main()
