"""Time a bundle with its own loader.py, in the aarch64 Python under qemu (not imported by graphopt).

    aarch64_bench.py BUNDLE INPUTS.npz REPORT.json REPEAT WARMUP VERIFY(0|1) [DIGEST]

Writes {"load_s", "runs_ms", "median_ms", "min_ms", "max_ms", "machine"} to REPORT.json. Exit code 2
with one line 'loader: error: ...' when the loader refuses the bundle or the inputs, as loader.py does.
"""

import importlib.util
import json
import os
import platform
import statistics
import sys
import time


def main(argv) -> int:
    bundle, inputs, report, repeat, warmup, verify = argv[:6]
    digest = argv[6] if len(argv) > 6 and argv[6] else None
    spec = importlib.util.spec_from_file_location("graphopt_bundle_loader", os.path.join(bundle, "loader.py"))
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    import numpy as np

    t0 = time.perf_counter()
    try:
        runner = loader.load(bundle, verify=verify == "1", digest=digest)
        with np.load(inputs, allow_pickle=False) as data:
            feeds = {k: data[k] for k in data.files}
        load_s = time.perf_counter() - t0
        for _ in range(int(warmup)):
            runner(**feeds)
        runs = []
        for _ in range(int(repeat)):
            t = time.perf_counter()
            runner(**feeds)
            runs.append((time.perf_counter() - t) * 1e3)
    except (loader.BundleError, loader.InputError) as e:
        print(f"loader: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    result = {"load_s": round(load_s, 3), "runs_ms": [round(r, 3) for r in runs], "machine": platform.machine(),
              "median_ms": round(statistics.median(runs), 3), "min_ms": round(min(runs), 3),
              "max_ms": round(max(runs), 3)}
    with open(report, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
