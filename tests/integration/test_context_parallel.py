"""Context parallelism (head-sharded all-to-all attention) against one process, for real over
gloo: 2 and 4 ranks, the shipped architecture (RoPE, RMSNorm, SwiGLU, untied, GQA with fewer
query groups than ranks included), full-sequence, fewer-frames and Local Opt. + ReCo at the
first, a middle and the last window; DeepSpeed's layouts with CP (DP x CP, ZeRO-1/3); what the
window pass communicates and what the kept context costs per rank. (Megatron-LM's pretrain()
with CP is in test_megatron_lm_pretrain.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers.configs import PRESET_TRAIN_FLAGS
from helpers.launch import REPO, TESTS, run_train, subprocess_env

pytestmark = pytest.mark.slow

CP_FLAGS = ("--cp-comm-type", "a2a")
LOCAL_OPT = ("--objective", "local-opt", "--regularizer", "reco", "--reco-reduction", "mean",
             "--reco-states", "pre-norm")


def _worker(tmp_path, ranks: int, *query_groups: int) -> dict:
    out = tmp_path / f"cp{ranks}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={ranks}", str(TESTS / "helpers" / "context_parallel_worker.py"),
           str(out), *map(str, query_groups)]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())["results"]


@pytest.mark.parametrize(("ranks", "query_groups"), [(2, (2, 1)), (4, (2,))],
                         ids=["cp2", "cp4"])
def test_context_parallel_gives_the_single_process_loss_and_gradients(tmp_path, ranks,
                                                                      query_groups):
    """Loss and every parameter's gradient (summed over the ranks' shares) within 1e-5 of the
    single-process run, fp32; without ReCo's halo exchange the comparison fails."""
    results = _worker(tmp_path, ranks, *query_groups)
    cases = {k: v for k, v in results.items() if not k.startswith(("no-halo", "bytes"))}
    assert len(cases) == 7 * len(query_groups)
    for name, result in cases.items():
        assert result["parameters"] == 15, name  # every weight of the model got a gradient
        assert result["loss"] <= 1e-5 and result["grads"] <= 1e-5, (name, result)
    for name, result in results.items():
        if name.startswith("no-halo"):  # negative control: straddling pairs lost
            assert result["loss"] > 1e-5 and result["grads"] > 1e-4, (name, result)
    for groups in query_groups:
        _check_window_bytes(results, ranks, groups)


def _check_window_bytes(results: dict, cp: int, groups: int) -> None:
    """The window pass's forward and backward send the same bytes with no context (first
    window) as with 3 context frames (last window), and exactly the all-to-all bytes of the
    window's own rows: the kept context crosses no rank. Its buffers on a rank are 1/cp of one
    process's over the groups each rank holds (groups replicated up to cp when fewer)."""
    first, last = results[f"bytes@0 groups={groups}"], results[f"bytes@3 groups={groups}"]
    assert first["collectives"]["context"] == {}
    assert last["collectives"]["context"]["all_to_all_single"] > 0
    for phase in ("window", "backward"):
        assert last["collectives"][phase] == first["collectives"][phase], phase
    s, b, d = first["window tokens"], first["batch"], first["head_dim"]
    heads, layers = first["heads"], first["layers"]
    kv = max(groups, cp)  # replicated groups when fewer than ranks (cp is a multiple here)
    rows = -(-s // cp)  # rank 0, which writes the record, holds the larger slice
    per_layer = 4 * b * d * (rows * heads + 2 * rows * kv + s * heads // cp)  # q, k, v, out
    assert last["collectives"]["window"]["all_to_all_single"] == layers * per_layer
    assert last["kept"] * cp * groups == last["reference kept"] * kv


def _values(records, key="lm loss"):
    return [r[key] for r in records if key in r]


def test_deepspeed_layouts_with_context_parallelism(tmp_path):
    """localopt-train with --context-parallel-size 2: CP=2 equals one process (ZeRO-0, a window
    per micro-batch), DP=2 x CP=2 (4 ranks) equals DP=2 (ZeRO-1), TP=2 x CP=2 (4 ranks, one
    replicated query group per rank) equals TP=2, so does TP=2 x CP=2 with --sequence-parallel
    (each context-parallel rank's rows padded and split over its TP ranks; ReCo's pairs across
    the tensor x context slices; without ReCo's halo it fails), and ZeRO-3 with CP=2 equals
    ZeRO-0 with CP=2, over several iterations of Local Opt. + ReCo; with DeepSpeed reducing over
    data-parallel ranks only (not the context-parallel shares) CP=2 fails."""
    flags = (*PRESET_TRAIN_FLAGS, *LOCAL_OPT)
    micro = (*flags, "--local-opt-window-scope", "micro-batch")
    step = (*flags, "--local-opt-window-scope", "step")
    cp2 = ("--context-parallel-size", "2", *CP_FLAGS)
    keys = ("lm loss", "reco loss", "window start", "grad norm")

    def same(got, want):
        for key in keys:
            assert _values(got, key) == pytest.approx(_values(want, key), rel=1e-4), key

    single = run_train(tmp_path, *micro, name="single")
    assert len({r["window start"] for r in single}) > 1
    zero0 = run_train(tmp_path, *micro, *cp2, "--zero-stage", "0", nproc=2, name="cp2")
    same(zero0, single)
    dp2 = run_train(tmp_path, *step, "--zero-stage", "1", nproc=2, name="dp2")
    same(run_train(tmp_path, *step, "--zero-stage", "1", *cp2, nproc=4, name="dp2cp2"), dp2)
    tp2 = ("--tensor-model-parallel-size", "2", "--make-vocab-size-divisible-by", "64")
    tp2_only = run_train(tmp_path, *micro, *tp2, nproc=2, name="tp2")
    same(run_train(tmp_path, *micro, *tp2, *cp2, nproc=4, name="tp2cp2"), tp2_only)
    same(run_train(tmp_path, *micro, *tp2, *cp2, "--sequence-parallel", nproc=4,
                   name="tp2cp2-sp"), tp2_only)
    no_halo = run_train(tmp_path, *micro, *tp2, *cp2, "--sequence-parallel", nproc=4,
                        name="tp2cp2-sp-no-halo",
                        script=TESTS / "helpers" / "train_without_reco_halo.py")
    assert _values(no_halo)[0] == pytest.approx(_values(tp2_only)[0], rel=1e-5)
    assert _values(no_halo, "reco loss") != pytest.approx(_values(tp2_only, "reco loss"),
                                                          rel=1e-4)
    same(run_train(tmp_path, *micro, "--zero-stage", "3", *cp2, nproc=2, name="cp2-zero3"),
         zero0)
    broken = run_train(tmp_path, *micro, *cp2, nproc=2, name="cp2-dp-reduction-only",
                       script=TESTS / "helpers" / "train_reducing_over_data_parallel_only.py")
    assert _values(broken)[0] == pytest.approx(_values(single)[0], rel=1e-5)
    assert _values(broken, "grad norm") != pytest.approx(_values(single, "grad norm"), rel=1e-3)


def test_context_parallel_run_resumes_exactly(tmp_path):
    """CP=2 (ZeRO-1) saved at iteration 2 and resumed gives the uninterrupted run's losses."""
    flags = (*PRESET_TRAIN_FLAGS, "--global-batch-size", "2", "--lr-decay-iters", "4",
             *LOCAL_OPT, "--context-parallel-size", "2", *CP_FLAGS, "--zero-stage", "1")
    whole = run_train(tmp_path, *flags, "--train-iters", "4", nproc=2, name="whole")
    ckpt = str(tmp_path / "ckpt")
    run_train(tmp_path, *flags, "--train-iters", "2", "--save", ckpt, "--save-interval", "2",
              nproc=2, name="first")
    resumed = run_train(tmp_path, *flags, "--train-iters", "4", "--load", ckpt, nproc=2,
                        name="resumed")
    assert [r["iteration"] for r in resumed if "lm loss" in r] == [3, 4]
    assert _values(resumed) == _values(whole)[2:]
