"""bench/gpu_compare.py (issue 18's GPU benchmark) runs end to end at a small size on the
CPU: every optimizer of every shape set reports a positive step time, and the JSON and
markdown it writes hold the same sets. (Times are not judged here: docs/BENCHMARKS.md.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_compare.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tiny_cpu_run_reports_every_optimizer_and_set(tmp_path):
    gpu_compare = load_script()
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    results = gpu_compare.main(["--device", "cpu", "--preset", "tiny", "--stat-interval", "2", "--root-interval",
                                "4", "--cycles", "1", "--json", str(out_json), "--markdown", str(out_md)])
    assert set(results["sets"]) == set(gpu_compare.PRESETS["tiny"])
    for by_opt in results["sets"].values():
        assert set(by_opt) == {"torch AdamW", "lowbit fp32", "lowbit 4-bit"}
        for r in by_opt.values():
            assert r["ms_per_step"] > 0 and r["plain_step_ms"] > 0
    assert json.loads(out_json.read_text())["sets"].keys() == results["sets"].keys()
    table = out_md.read_text()
    for set_name in results["sets"]:
        assert set_name in table
