"""The main job's figures over several runs (seeds): each run's values, mean, min and max."""

from __future__ import annotations

import json

from localopt_plugin.commands.report import SPREAD_FIGURES, main, write_spread


def _run(directory, accuracy, nll):
    (directory / "eval").mkdir(parents=True)
    values = {"classes.json": {}, "nll.json": {}, "flow.json": {}}
    for i, (_, name, key) in enumerate(SPREAD_FIGURES):
        values[name][key] = {"accuracy": accuracy, "mean_nll": nll}.get(key, float(i))
    for name, content in values.items():
        (directory / "eval" / name).write_text(json.dumps(content))


def test_spread_table_lists_runs_and_their_mean_min_max(tmp_path):
    runs = [tmp_path / f"seed{s}" for s in (1, 2, 3)]
    for run, accuracy, nll in zip(runs, (0.875, 0.958, 0.792), (0.02, 0.03, 0.01), strict=True):
        _run(run, accuracy, nll)
    out = write_spread([str(r) for r in runs], str(tmp_path / "spread.md"))
    text = open(out).read()
    assert "| seed2 | 0.958 |" in text and text.startswith("# Main job over 3 runs (")
    mean = [line for line in text.splitlines() if line.startswith("| **mean**")][0]
    assert mean.split(" | ")[1] == f"{(0.875 + 0.958 + 0.792) / 3:.4g}"
    low = [line for line in text.splitlines() if line.startswith("| **min**")][0]
    assert low.split(" | ")[1] == "0.792" and "0.01 " in low
    saved = json.loads((tmp_path / "spread.json").read_text())
    assert [r["class accuracy"] for r in saved["runs"]] == [0.875, 0.958, 0.792]


def test_spread_refuses_an_unfinished_run(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--spread", str(tmp_path / "x.md")]) == 2
    assert "run launch/main_job.sh" in capsys.readouterr().err
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "several run directories need --spread" in capsys.readouterr().err
