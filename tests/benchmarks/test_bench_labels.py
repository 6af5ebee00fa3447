"""``dpmot bench labels`` and ``dpmot bench decode``: they run and their reports add up."""

from __future__ import annotations

import json

from dpmot_dist.cli import main


def test_bench_labels_reports_both_fits(capsys):
    argv = ["bench", "labels", "--classes", "4", "--per-class", "3", "--dim", "2"]
    assert main([*argv, "--iters", "5", "--eval-samples", "4096", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["n"] == 12 and r["global"]["seconds"] > 0 and r["by_label"]["seconds"] > 0
    assert r["ratio"] == r["by_label"]["seconds"] / r["global"]["seconds"]
    assert 0 <= r["global"]["tv"] <= 1 and 0 <= r["by_label"]["tv"] <= 1


def test_bench_decode_reports_both_runs(capsys):
    argv = ["bench", "decode", "--num", "8", "--image-size", "16", "--nfe", "2", "--json"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["decode"]["decode_fraction"] > 0 and r["latents"]["decode_fraction"] == 0
    assert r["decode"]["nfe"] == 4  # two guided DDIM steps
