"""The pipeline's report: written whole, with the plots matplotlib can draw, and without them when it is absent."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

from rlhf.report import write_report

RESULTS = {
    "reference": {"gold_score": 0.2, "allowed_refusal_rate": 0.5},
    "policy": {"gold_score": 0.6, "allowed_refusal_rate": 0.1},
    "samples": [{"category": "allowed", "prompt": "hi", "reference": "a", "policy": "b"}],
}


@pytest.mark.parametrize("with_matplotlib", [True, False])
def test_the_report_is_written_with_the_plots_that_can_be_drawn(tmp_path, monkeypatch, with_matplotlib):
    """matplotlib is the optional `report` extra: without it the evaluation's report was lost after all training."""
    if with_matplotlib:
        pytest.importorskip("matplotlib")  # installed by scripts/setup.sh (the `report` extra)
    else:
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    config = SimpleNamespace(output_dir=str(tmp_path), seed=0)
    report = write_report(config, {"sft": {"wall_seconds": 1.0}}, RESULTS)
    plots = ["training_curves.png", "eval_bars.png"] if with_matplotlib else []
    assert report["plots"] == plots
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(plots)
    assert json.loads((tmp_path / "report.json").read_text())["verdicts"]["gold_score"] == "improved"
    text = (tmp_path / "report.md").read_text()
    assert ("![training curves](training_curves.png)" in text) == with_matplotlib
    assert "| gold_score | 0.200 | 0.600 | improved |" in text
