"""results/paired.py, the one standard for comparisons (issue 39): its tests against closed forms and its wording."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("paired", ROOT / "results" / "paired.py")
paired = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paired)


def test_sign_test_is_the_exact_binomial_tail():
    assert paired.sign_test([1, 2, 3]) == pytest.approx(0.25)  # 3 of 3: 2 x 1/8, the smallest p with n = 3
    assert paired.sign_test([1, -2, 3]) == 1.0
    assert paired.sign_test([1] * 6) == pytest.approx(2 / 64)  # n = 6 is the first that can reach p < 0.05
    assert paired.sign_test([1, 0, 2]) == pytest.approx(0.5)  # a zero difference is dropped


@pytest.mark.parametrize("diffs", [[-5.86, -0.85, -4.22], [1.0, 3.0, 2.5], [0.3, 2.0]])
def test_paired_t_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(diffs):
    n = len(diffs)
    mean = sum(diffs) / n
    t = mean / math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)
    exact = 1 - 2 / math.pi * math.atan(abs(t)) if n == 2 else 1 - abs(t) / math.sqrt(2 + t * t)
    got_t, got_p = paired.t_test(diffs)
    assert got_t == pytest.approx(t) and got_p == pytest.approx(exact, abs=1e-6)


def test_the_wording_follows_the_test():
    assert "no difference shown with n = 3" in paired.describe([-5.86, -0.85, -4.22])  # every seed, p = 0.13
    assert "behind on every seed" in paired.describe([-5.86, -0.85, -4.22])
    mixed = paired.describe([4.81, -1.64, -2.75])
    assert "no difference shown with n = 3" in mixed and "every seed" not in mixed
    strong = paired.describe([2.49, 2.55])  # geo_dino geo minus sim, k-NN: paired t p = 0.008
    assert strong.startswith("+2.49 / +2.55: mean +2.52; B ahead on every seed (paired t p = 0.0076")


def test_arms_are_paired_by_seed_from_the_run_folders(tmp_path, capsys):
    for arm, values in (("a", [40.0, 39.0]), ("b", [42.0, 40.5])):
        for seed, v in enumerate(values):
            (tmp_path / f"{arm}_s{seed}").mkdir()
            (tmp_path / f"{arm}_s{seed}" / "final_metrics.json").write_text(json.dumps({"knn_top1": v}))
    paired.main([str(tmp_path / "a_s"), str(tmp_path / "b_s"), "--seeds", "0,1", "--keys", "knn_top1"])
    assert "+2.00 / +1.50: mean +1.75" in capsys.readouterr().out
