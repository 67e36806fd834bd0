"""How long an S3 outage a checkpoint-sized write survives: the store as the driver holds
it and as Ray ships it to workers (pickled), against a moto server that answers every
request with 503 SlowDown for the given seconds. Prints seconds until the write landed.

Usage: python benchmarks/bench_s3_outage.py [--outages 4 10 20 30] [--mib 1]"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fusion.s3 import s3_filesystem  # noqa: E402
from tests.s3_server import MotoS3  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--outages", type=float, nargs="+", default=[4, 10, 20, 30])
    parser.add_argument("--mib", type=float, default=1.0)
    args = parser.parse_args()
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import logging

    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = MotoS3()
    boto3.client("s3", endpoint_url=server.url).create_bucket(Bucket="outage")
    driver = s3_filesystem(server.url)
    stores = {"driver": driver, "shipped (pickled)": pickle.loads(pickle.dumps(driver))}
    payload = os.urandom(int(args.mib * 2**20))
    print("| store | outage s | result | s until landed | requests refused |")
    print("|---|---:|---|---:|---:|")
    for outage in args.outages:
        for name, fs in stores.items():
            key = f"outage/{name[:7]}-{outage:g}.bin"
            server.outage(f"/{key}", outage)
            start = time.perf_counter()
            try:
                with fs.open_output_stream(key) as out:
                    out.write(payload)
                result = "landed" if fs.open_input_stream(key).read() == payload else "CORRUPT"
            except OSError as exc:
                result = f"failed: {str(exc).splitlines()[0][-60:]}"
            print(f"| {name} | {outage:g} | {result} | {time.perf_counter() - start:.1f} | "
                  f"{len(server.failed)} |", flush=True)
    server.stop()


if __name__ == "__main__":
    main()
