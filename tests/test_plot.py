"""plot.py: the table reads each run's iteration 0 and last evaluation, and the seed spread."""
import json

import pytest

import plot


def write_run(folder, algo, accs):
    folder.mkdir()
    with open(folder / "metrics.jsonl", "w") as f:
        for i, acc in enumerate(accs):
            f.write(json.dumps({"iteration": i, "algo": algo, "eval_acc_autonomous": acc}) + "\n")


def test_table_has_first_last_and_seed_spread(tmp_path):
    write_run(tmp_path / "em-s0", "em", [0.4, 0.5, 0.7])
    write_run(tmp_path / "em-s1", "em", [0.4, 0.6, 0.5])
    runs = [plot.read_run(str(tmp_path / n)) for n in ("em-s0", "em-s1")]
    text = plot.table(runs)
    assert "| em-s0 | 2 | 0.40 -> 0.70 |" in text and "| em-s1 | 2 | 0.40 -> 0.50 |" in text
    assert "last 0.60 (spread 0.20)" in text


def test_a_folder_without_metrics_fails_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="metrics.jsonl: no such file"):
        plot.read_run(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 0}\nnot json\n')
    with pytest.raises(SystemExit, match=r"metrics.jsonl:2: bad JSON"):
        plot.read_run(str(tmp_path))
