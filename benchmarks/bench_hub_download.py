"""Throughput of download_model from the local Hub server vs a plain `curl -s -o` of the same URL.

    .venv/bin/python benchmarks/bench_hub_download.py [--mb 200] [--repeat 2]

Prints figures; asserts nothing. The file is generated in a temp dir and deleted afterwards.
download_model's time includes resolving the revision, listing files and hashing every byte (sha256),
so the ratio shows the price of verification on top of the transfer itself. The last lines time one
re-hash slice of the cache (model_cache_rehash) at the default 30-day period and for the whole cache: the
daily cost of reading every byte once a period.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the model file in MB (default 200)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each method; the best is kept")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp_str:
        tmp = Path(tmp_str)
        os.environ["HF_HOME"] = str(tmp / "hf-home")  # before huggingface_hub is imported
        os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ.pop("HF_TOKEN", None)

        from idp_pipelines.embedded.hubserver import HubServer

        from idp_pipelines.files import hash_file
        from idp_pipelines.hub import download_model
        from idp_pipelines.hub.rehash import rehash_slice

        src = tmp / "repo"
        src.mkdir()
        size = args.mb * 1_000_000
        with (src / "model.gguf").open("wb") as f:
            left = size
            while left:
                n = min(left, 8 << 20)
                f.write(os.urandom(n))
                left -= n
        (src / "config.json").write_text('{"bench": true}\n')

        with HubServer() as hub:
            sha = hub.create_repo_from_dir("bench/model", src)
            url = f"{hub.url}/bench/model/resolve/{sha}/model.gguf"

            curl_s = []
            for i in range(args.repeat):
                out = tmp / f"curl-{i}.bin"
                t = time.perf_counter()
                subprocess.run(["curl", "-s", "-f", "-o", str(out), url], check=True)
                curl_s.append(time.perf_counter() - t)
                assert out.stat().st_size == size
                out.unlink()

            dl_s, dl_mbs = [], []
            for i in range(args.repeat):
                cache = tmp / f"cache-{i}"
                result = download_model("bench/model", "main", cache_dir=cache, endpoint=hub.url)
                dl_s.append(result.seconds)
                dl_mbs.append(result.mb_per_s)
                shutil.rmtree(cache)

            # Cost of verification alone, for reading the ratio.
            t = time.perf_counter()
            hash_file(src / "model.gguf", "sha256")
            hash_s = time.perf_counter() - t

            cache = tmp / "cache-rerun"
            download_model("bench/model", "main", cache_dir=cache, endpoint=hub.url)
            rerun = download_model("bench/model", "main", cache_dir=cache, endpoint=hub.url)
            whole = rehash_slice(cache, period_days=1, cursor=None)
            daily = rehash_slice(cache, period_days=30, cursor=None)

        mb = size / 1e6
        curl_mbs = mb / min(curl_s)
        best_dl = max(dl_mbs)
        print(f"file: {mb:.0f} MB, best of {args.repeat} runs, local Hub server on 127.0.0.1")
        print(f"curl -s -o            : {min(curl_s):7.2f} s  {curl_mbs:8.1f} MB/s")
        print(f"download_model        : {min(dl_s):7.2f} s  {best_dl:8.1f} MB/s  (incl. resolve, listing, sha256)")
        print(f"ratio download_model/curl: {best_dl / curl_mbs:.2f}")
        print(f"sha256 of the file alone : {hash_s:7.2f} s  {mb / hash_s:8.1f} MB/s")
        print(
            f"rerun, nothing new       : {rerun.seconds:7.3f} s  bytes downloaded {rerun.bytes_downloaded},"
            f" files hashed {rerun.files_hashed}"
        )
        print(f"re-hash, whole cache     : {whole.seconds:7.2f} s  {whole.slice.bytes / 1e6 / whole.seconds:8.1f} MB/s"
              f"  ({len(whole.checked)} blobs, {whole.slice.bytes / 1e6:.0f} MB)")
        print(f"re-hash, 1/30 slice      : {daily.seconds:7.2f} s  ({daily.slice.describe()}; a slice never splits"
              " a file, so a cache of one big file is read whole on one day of the 30)")


if __name__ == "__main__":
    main()
