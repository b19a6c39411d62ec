"""Window sampling: candidate starts, first-frame balancing, determinism across ranks."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch.multiprocessing as mp
from helpers.launch import TRAIN_MODULE, subprocess_env

from localopt_plugin.objectives.window_sampler import WindowSampler, candidate_starts


@pytest.mark.parametrize(("frames", "window", "stride", "expected"), [
    (5, 2, 1, [0, 1, 2, 3]),         # overlapping windows (S < W)
    (5, 2, 2, [0, 2, 3]),            # the last candidate always ends at the last frame
    (17, 4, 2, [0, 2, 4, 6, 8, 10, 12, 13]),
    (6, 3, 3, [0, 3]),
    (5, 5, 1, [0]),
])
def test_candidate_starts(frames, window, stride, expected):
    assert candidate_starts(frames, window, stride) == expected


@pytest.mark.parametrize(("frames", "window", "stride", "message"), [
    (5, 6, 1, "--local-opt-window-frames 6 exceeds the 5 latent frames"),
    (5, 2, 0, "--local-opt-stride-frames must be positive"),
    (5, 0, 1, "--local-opt-window-frames must be positive"),
])
def test_invalid_settings_fail_clearly(frames, window, stride, message):
    with pytest.raises(ValueError, match=message):
        WindowSampler(frames, window, stride, seed=0)


def test_probability_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match="first-window-prob"):
        WindowSampler(5, 2, 1, seed=0, first_prob=1.5)


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_first_window_frequency_close_to_p(p):
    sampler = WindowSampler(17, 2, 1, seed=3, first_prob=p, scope="micro-batch")
    draws = [sampler.draw(i, m) for i in range(5000) for m in range(2)]
    share = draws.count(0) / len(draws)
    assert abs(share - p) < 4 * (p * (1 - p) / len(draws)) ** 0.5 + 1e-3
    others = [d for d in draws if d]
    counts = [others.count(s) for s in sampler.starts[1:]]
    expected = len(others) / len(counts)  # the other windows are uniform
    assert max(abs(c - expected) for c in counts) < 5 * expected**0.5


def test_uniform_sampler_ignores_first_frame_bias():
    sampler = WindowSampler(5, 2, 1, seed=3, first_prob=None)
    draws = [sampler.draw(i, 0) for i in range(8000)]
    assert abs(draws.count(0) / len(draws) - 0.25) < 0.03


def test_draws_depend_only_on_seed_iteration_microbatch():
    a, b = (WindowSampler(9, 2, 1, seed=7, first_prob=0.5, scope="micro-batch")
            for _ in range(2))
    sequence_a = [a.draw(i, m) for i in range(50) for m in range(3)]
    # b draws in a different order (as after a resume): same answers per (iteration, micro)
    sequence_b = {(i, m): b.draw(i, m) for i in reversed(range(50)) for m in range(3)}
    assert sequence_a == [sequence_b[(i, m)] for i in range(50) for m in range(3)]
    assert len(set(sequence_a)) > 3


def _draw_on_rank(rank: int, world: int, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    sampler = WindowSampler(17, 2, 1, seed=11, first_prob=0.5, scope="micro-batch")
    mine = torch.tensor([sampler.draw(i, m) for i in range(100) for m in range(2)])
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    if rank == 0:
        queue.put([g.tolist() for g in gathered])
    dist.destroy_process_group()


def test_identical_draws_on_two_ranks():
    from localopt_plugin.training.distributed import _free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_draw_on_rank, args=(r, 2, port, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    rank0, rank1 = queue.get(timeout=120)
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert rank0 == rank1 and len(set(rank0)) > 3


def test_trainer_refuses_window_larger_than_video():
    proc = subprocess.run(
        [sys.executable, "-m", TRAIN_MODULE, "--objective", "local-opt",
         "--synthetic-frames", "5", "--local-opt-window-frames", "6", "--train-iters", "1"],
        capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode != 0
    assert "--local-opt-window-frames 6 exceeds the 5 latent frames" in proc.stderr


def test_trainer_refuses_sequence_length_too_short_for_the_video():
    proc = subprocess.run(
        [sys.executable, "-m", TRAIN_MODULE, "--seq-length", "64",
         "--synthetic-frames", "5", "--synthetic-frame-tokens", "64", "--train-iters", "1"],
        capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode != 0
    assert "--seq-length 64 is shorter than the dataset's samples (323 input tokens)" in (
        proc.stderr)


def test_scope_step_shares_one_window_per_iteration():
    """``step``: every global micro-batch of an iteration trains the same window;
    ``micro-batch``: they differ, and their draws follow the same distribution."""
    step = WindowSampler(17, 2, 1, seed=5, first_prob=0.5, scope="step")
    micro = WindowSampler(17, 2, 1, seed=5, first_prob=0.5, scope="micro-batch")
    for i in range(200):
        assert len({step.draw(i, m) for m in range(8)}) == 1
    per_iteration = [len({micro.draw(i, m) for m in range(8)}) for i in range(200)]
    assert max(per_iteration) > 2
    assert step.probabilities() == micro.probabilities()
    assert sum(step.probabilities()) == pytest.approx(1.0)
    assert step.probabilities()[0] == 0.5


def _adaptive(floor=0.25, decay=0.9, first_prob=0.5, seed=0, frames=6, window=2):
    from localopt_plugin.objectives.window_sampler import AdaptiveWindowSampler

    return AdaptiveWindowSampler(frames, window, 1, seed, first_prob=first_prob, floor=floor,
                                 decay=decay)


def test_adaptive_probabilities_follow_their_definition():
    """P(0) = p; the later starts share 1 - p: the floor evenly, the rest in proportion to the
    smoothed losses (an exponential moving average per start, computed here by hand); a start
    not trained yet counts the highest smoothed loss."""
    sampler = _adaptive(floor=0.2, decay=0.5)  # starts 0..4
    history = [(1, 2.0), (3, 1.0), (1, 4.0), (4, 0.5)]
    for start, loss in history:
        sampler.observe(start, loss)
    smoothed = {1: 0.5 * 2.0 + 0.5 * 4.0, 3: 1.0, 4: 0.5}
    losses = [smoothed.get(s, max(smoothed.values())) for s in (1, 2, 3, 4)]
    later = [0.2 / 4 + 0.8 * x / sum(losses) for x in losses]
    assert sampler.probabilities() == pytest.approx([0.5, *(0.5 * x for x in later)])
    # draw frequencies over many iterations (the state fixed) match the probabilities
    counts = [0] * 5
    draws = 20000
    for iteration in range(draws):
        counts[sampler.draw(iteration, 0)] += 1
    assert [c / draws for c in counts] == pytest.approx(sampler.probabilities(), abs=0.012)


def test_adaptive_draws_are_reproducible_resumable_and_ignore_rank_noise():
    """The same seed and losses draw the same windows; a sampler restored from a state_dict
    draws what the original does next; losses differing by float noise (another layout's
    reduction order) draw the same windows. Negative control: other losses move the draws."""
    def run(sampler, losses, start_at=0):
        starts = []
        for i, loss in enumerate(losses, start=start_at):
            start = sampler.draw(i, 0)
            starts.append(start)
            sampler.observe(start, loss(start))
        return starts

    def late_high(start):
        return 1.0 + start

    a, b = _adaptive(seed=3), _adaptive(seed=3)
    first = run(a, [late_high] * 40)
    assert first == run(b, [lambda s: late_high(s) * (1 + 1e-9)] * 40)
    restored = _adaptive(seed=3)
    restored.load_state_dict(a.state_dict())
    assert run(restored, [late_high] * 40, 40) == run(a, [late_high] * 40, 40)
    other = run(_adaptive(seed=3), [lambda s: 10.0 if s == 1 else 0.1] * 40)
    assert other != first
    assert other.count(1) > first.count(1)  # the high-loss start is drawn more


def test_adaptive_flags_are_refused_without_the_adaptive_sampler():
    from helpers.configs import train_args

    from localopt_plugin.errors import UserError
    from localopt_plugin.plugin import PluginConfig

    for flags, message in (
            (("--objective", "local-opt", "--local-opt-adaptive-floor", "0.3"),
             "--local-opt-adaptive-floor \\(only with --window-sampler adaptive\\)"),
            (("--objective", "full-sequence", "--local-opt-full-sequence-share", "0.3"),
             "--local-opt-full-sequence-share \\(only with --objective local-opt\\)"),
            (("--objective", "local-opt", "--window-sampler", "adaptive",
              "--local-opt-window-scope", "micro-batch"), "use --local-opt-window-scope step"),
            (("--objective", "local-opt", "--window-sampler", "adaptive",
              "--local-opt-adaptive-floor", "2"), "--local-opt-adaptive-floor must be in"),
            (("--objective", "local-opt", "--local-opt-full-sequence-share", "-1"),
             "--local-opt-full-sequence-share must be in")):
        with pytest.raises(UserError, match=message):
            PluginConfig.from_args(train_args(*flags))
    config = PluginConfig.from_args(train_args("--objective", "local-opt", "--window-sampler",
                                               "adaptive", "--local-opt-adaptive-floor", "0.4"))
    assert (config.window.floor, config.window.decay) == (0.4, 0.9)


def test_full_sequence_share_trains_whole_sequences_on_its_share_of_steps():
    """With share q, about q of the iterations plan the full-sequence objective's plan (the
    same tensors), the rest a window; the decision is per iteration, not per micro-batch."""
    import torch

    from localopt_plugin.data.layout import SampleLayout
    from localopt_plugin.objectives import FullSequence, build_objective
    from localopt_plugin.objectives.sequence import LocalOptConfig

    layout = SampleLayout(video_start=3, num_frames=5, frame_tokens=4)
    objective = build_objective("local-opt", layout, config=LocalOptConfig(0.3), seed=7)
    tokens = torch.arange(2 * layout.seq_length).reshape(2, -1)
    full = FullSequence(layout).plan(tokens)
    steps = [objective.plan(tokens, i, 0) for i in range(2000)]
    whole = [p for p in steps if p.metrics.get("full-sequence step") == 1.0]
    assert len(whole) / len(steps) == pytest.approx(0.3, abs=0.03)
    for plan in whole[:5]:
        assert plan.context_ids is None and torch.equal(plan.ids, full.ids)
        assert torch.equal(plan.labels, full.labels) and plan.loss_from == full.loss_from
    assert all(objective.full_sequence_step(i) == (objective.plan(tokens, i, 1).metrics[
        "full-sequence step"] == 1.0) for i in range(50))
