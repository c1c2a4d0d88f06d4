"""bench/step_floor.py (issue 18: the floor of the paper's arithmetic against a `lowbit bench
step` run) prices the factors lowbit actually makes: its partition of a shape gives the
orders of the eigenvalue entries in lowbit.Shampoo's state, and a run on a small step JSON
prints a finite floor for every shape. (Times are not judged here: docs/BENCHMARKS.md.)"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

import lowbit

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "step_floor.py"


def load_script():
    spec = importlib.util.spec_from_file_location("step_floor", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shape,max_dim", [((256, 2304), 1200), ((4096, 1024), 1200), ((96, 80), 64),
                                           ((130, 7), 50)])
def test_the_factor_orders_are_those_of_lowbits_state(shape, max_dim):
    step_floor = load_script()
    p = torch.nn.Parameter(torch.randn(*shape))
    opt = lowbit.Shampoo([p], stat_interval=1, root_interval=1, max_preconditioner_dim=max_dim, min_quant_numel=0)
    p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state_dict()["state"][0]
    orders = Counter(v.shape[0] for k, v in state.items() if k.endswith("eigenvalues"))
    assert orders == Counter(step_floor.factor_orders(list(shape), max_dim))


def test_a_run_prints_a_finite_floor_for_every_shape(tmp_path, capsys):
    step_floor = load_script()

    def result(variant, shape, ms):
        return {"variant": variant, "shape": shape, "matrix": [int(d) for d in shape.split("x")], "timed": True,
                "plain_step_ms": ms, "stat_step_ms": 2 * ms, "root_step_ms": 3 * ms, "ms_per_step": 1.2 * ms,
                "time_ratio_vs_fp32": 1.0 if variant == "fp32" else 1.5}

    run = {"threads": 1, "stat_interval": 2, "root_interval": 6, "max_preconditioner_dim": 40,
           "results": [result(v, s, ms) for s in ("48x40", "30x20") for v, ms in (("fp32", 1.0), ("4bit", 1.1))]}
    (tmp_path / "step.json").write_text(json.dumps(run))
    step_floor.main_with([str(tmp_path / "step.json"), "--repeats", "1", "--json", str(tmp_path / "floor.json")])
    rows = json.loads((tmp_path / "floor.json").read_text())["rows"]
    assert [r["shape"] for r in rows] == ["48x40", "30x20"]
    assert rows[0]["orders"] == [40, 40, 8, 40]
    for r in rows:
        assert r["floor_stat_step_ms"] > 0 and torch.isfinite(torch.tensor(r["floor_ratio"]))
    assert "48x40" in capsys.readouterr().out


def test_a_cycle_whose_root_interval_is_not_a_multiple_of_the_statistics_interval_is_refused(tmp_path):
    step_floor = load_script()
    (tmp_path / "step.json").write_text(json.dumps({"threads": 1, "stat_interval": 3, "root_interval": 10,
                                                    "max_preconditioner_dim": 40, "results": []}))
    with pytest.raises(SystemExit, match="not a multiple"):
        step_floor.main_with([str(tmp_path / "step.json")])
