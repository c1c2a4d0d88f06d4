"""bench/gpu_compare.py (issue 18's GPU benchmark) runs end to end at a small size on the
CPU: every optimizer of every shape set and end-to-end model reports a positive step time,
the JSON and markdown it writes hold the same sets, the peers are configured with lowbit's
intervals, and bad paths or names are refused. (Times are not judged here: docs/BENCHMARKS.md.)"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_compare.py"
LOWBIT_AND_ADAMW = {"torch AdamW", "lowbit fp32", "lowbit 4-bit", "lowbit 4-bit cholesky-qr"}


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tiny_cpu_run_reports_every_optimizer_set_and_model(tmp_path):
    gpu_compare = load_script()
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    results = gpu_compare.main(["--device", "cpu", "--preset", "tiny", "--stat-interval", "2", "--root-interval",
                                "4", "--cycles", "1", "--json", str(out_json), "--markdown", str(out_md)])
    assert set(results["sets"]) == set(gpu_compare.PRESETS["tiny"])
    for by_opt in results["sets"].values():
        assert set(by_opt) == LOWBIT_AND_ADAMW
        for r in by_opt.values():
            assert r["ms_per_step"] > 0 and r["plain_step_ms"] > 0
    assert json.loads(out_json.read_text())["sets"].keys() == results["sets"].keys()
    assert set(results["models"]) == {"tiny_cnn"}  # trained end to end
    assert set(results["models"]["tiny_cnn"]) == LOWBIT_AND_ADAMW
    for r in results["models"]["tiny_cnn"].values():
        assert r["ms_per_step"] > 0 and r["plain_step_ms"] > 0
    table = out_md.read_text()
    for name in [*results["sets"], "tiny_cnn", "end to end"]:
        assert name in table


# Stand-ins with the peers' constructors (the real ones need CUDA or Python >= 3.12): they record
# how gpu_compare configures them and train as AdamW.
AUTHORS_STUB = '''
import torch
CALLS = []
class ShampooAdamW(torch.optim.AdamW):
    def __init__(self, params, lr, betas, eps, weight_decay, start_prec_step, stat_compute_steps,
                 prec_compute_steps, stat_decay, matrix_eps, prec_maxorder, prec_bits, min_lowbit_size,
                 quan_blocksize, rect_t1, rect_t2, inv_root_mode):
        CALLS.append(dict(stat_compute_steps=stat_compute_steps, prec_compute_steps=prec_compute_steps,
                          prec_maxorder=prec_maxorder, prec_bits=prec_bits))
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
'''
META_STUB = '''
import dataclasses, torch
CALLS = []
@dataclasses.dataclass
class AdamPreconditionerConfig:
    beta2: float = 0.999
    epsilon: float = 1e-10
class DistributedShampoo(torch.optim.AdamW):
    def __init__(self, params, lr, betas, epsilon, weight_decay, max_preconditioner_dim, precondition_frequency,
                 grafting_config):
        CALLS.append(dict(max_preconditioner_dim=max_preconditioner_dim,
                          precondition_frequency=precondition_frequency, graft=grafting_config))
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay)
'''


def test_the_peers_run_from_the_given_checkouts_with_the_same_intervals(tmp_path, monkeypatch):
    authors, meta = tmp_path / "authors", tmp_path / "meta"
    (authors / "optimizers").mkdir(parents=True)
    (authors / "optimizers" / "__init__.py").write_text("")
    (authors / "optimizers" / "shampoo2.py").write_text(AUTHORS_STUB)
    (meta / "distributed_shampoo").mkdir(parents=True)
    (meta / "distributed_shampoo" / "__init__.py").write_text(META_STUB)
    monkeypatch.setattr(sys, "path", list(sys.path))
    stubs = ("optimizers", "optimizers.shampoo2", "distributed_shampoo")
    for name in stubs:
        monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        run_with_peers(authors, meta)
    finally:  # the stubs must not answer a later import
        for name in stubs:
            sys.modules.pop(name, None)


def run_with_peers(authors: Path, meta: Path) -> None:
    gpu_compare = load_script()
    results = gpu_compare.main(["--device", "cpu", "--preset", "tiny", "--stat-interval", "2", "--root-interval",
                                "4", "--cycles", "1", "--max-preconditioner-dim", "96", "--models", "",
                                "--authors", str(authors), "--meta-ds", str(meta)])
    peers = {"authors 4-bit", "authors fp32", "Meta DS fp32"}
    for by_opt in results["sets"].values():
        assert peers <= set(by_opt) and all(by_opt[p]["ms_per_step"] > 0 for p in peers)
    calls = sys.modules["optimizers.shampoo2"].CALLS
    assert {c["prec_bits"] for c in calls} == {4, 32}
    assert all(c["stat_compute_steps"] == 2 and c["prec_compute_steps"] == 4 and c["prec_maxorder"] == 96
               for c in calls)
    meta_calls = sys.modules["distributed_shampoo"].CALLS
    assert meta_calls and all(c["precondition_frequency"] == 4 and c["max_preconditioner_dim"] == 96
                              and c["graft"].beta2 == 0.999 for c in meta_calls)
    assert results["models"] == {}


def test_a_bad_peer_path_or_model_is_refused_before_any_timing(tmp_path):
    gpu_compare = load_script()
    tiny = ["--device", "cpu", "--preset", "tiny", "--stat-interval", "2", "--root-interval", "4", "--cycles", "1"]
    with pytest.raises(SystemExit, match="--authors .*no such directory.*Sike-Wang/low-bit-Shampoo"):
        gpu_compare.main(tiny + ["--authors", str(tmp_path / "absent")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="--meta-ds .*cannot import distributed_shampoo"):
        gpu_compare.main(tiny + ["--meta-ds", str(tmp_path / "empty")])
    with pytest.raises(SystemExit):
        gpu_compare.main(tiny + ["--models", "vgg"])


def test_a_model_whose_package_is_missing_is_reported_as_skipped(monkeypatch):
    gpu_compare = load_script()
    spec = gpu_compare.e2e_models.MODELS["tiny_cnn"]
    monkeypatch.setitem(gpu_compare.e2e_models.MODELS, "tiny_cnn",
                        dataclasses.replace(spec, package="lowbit_no_such_package"))
    results = gpu_compare.main(["--device", "cpu", "--preset", "tiny", "--stat-interval", "2", "--root-interval",
                                "4", "--cycles", "1"])
    assert all(r == {"skipped": "lowbit_no_such_package is not installed"}
               for r in results["models"]["tiny_cnn"].values())
    assert "skipped: lowbit_no_such_package is not installed" in gpu_compare.markdown(results)
