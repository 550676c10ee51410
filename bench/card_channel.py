"""Card channel benchmark: APDU round trip through pcscd + vpcd.

Prints one JSON object. ``apdu_round_trip_ms`` is measured from pyscard
through a private pcscd (its own mount namespace, as the tests run it) and
Debian's vsmartcard vpcd reader to a ``cms card virtual`` card process:
p50/p99/mean over ``--apdus`` GET DATA (CPLC) commands, after a warm-up. An
APDU the card answers in microseconds costs what the PC/SC stack costs, which
is the floor under every step of a card session.

Usage: .venv/bin/python bench/card_channel.py [--apdus 500]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cardcore import gp  # noqa: E402

GET_CPLC = gp.get_data_command(0x9F7F)
WARM_UP = 20


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def apdu_round_trip(apdus: int) -> dict[str, float]:
    from tests.support.pcsc import PrivatePcscd, transmit_fn

    workdir = Path(tempfile.mkdtemp(prefix="cms-bench-card-"))
    state = workdir / "card.json"
    cms = [sys.executable, "-m", "cms.cli"]
    subprocess.run([*cms, "card", "init", "--state", str(state), "--transport-keys", "default"],
                   check=True, capture_output=True, timeout=60)
    with PrivatePcscd() as daemon:
        daemon.use_in_this_process()
        card = subprocess.Popen([*cms, "card", "virtual", "--state", str(state),
                                 "--vpcd", daemon.vpcd_endpoint(0)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            conn = daemon.connect(timeout=15)
            transmit = transmit_fn(conn)
            transmit(gp.select_command())
            for _ in range(WARM_UP):
                transmit(GET_CPLC)
            samples = []
            for _ in range(apdus):
                start = time.perf_counter()
                response = transmit(GET_CPLC)
                samples.append((time.perf_counter() - start) * 1000)
                if response[-2:] != b"\x90\x00":
                    raise RuntimeError(f"card answered {response[-2:].hex()}")
            conn.disconnect()
            conn.release()          # before the daemon goes, not in a finalizer after it
        finally:
            card.terminate()
            card.wait(timeout=10)
    return {"p50": round(_percentile(samples, 0.50), 3),
            "p99": round(_percentile(samples, 0.99), 3),
            "mean": round(statistics.fmean(samples), 3),
            "count": apdus}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apdus", type=int, default=500)
    args = parser.parse_args(argv)
    if args.apdus < 1:
        parser.error("--apdus must be at least 1")
    result = {
        "apdu_round_trip_ms": apdu_round_trip(args.apdus),
        "path": "pyscard -> private pcscd -> vpcd -> cms card virtual (loopback TCP)",
        "cores": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
