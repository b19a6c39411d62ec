"""Megatron-DeepSpeed's parser known by name: the flag list read from its ``arguments.py``
(the reader checked against argparse itself), and its flags reaching a fate, never argparse's
"unrecognized arguments"."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
from helpers.launch import REPO, dry_run

SNIPPET = '''
def add(parser):
    group = parser.add_argument_group(title="x")
    group.add_argument("--switch", action="store_true")
    group.add_argument("--off", action="store_false", dest="on")
    group.add_argument("--value", type=int, default=3)
    group.add_argument("--many", type=int, nargs="+")
    group.add_argument("--maybe", type=bool, nargs="?")
    group.add_argument("--two", nargs=2)
    group.add_argument("--alias-a", "--alias-b", type=str)
    group.add_argument("--const", action="store_const", const=5)
    return parser
'''


def _tool():
    spec = importlib.util.spec_from_file_location(
        "megatron_deepspeed_flags", REPO / "tools/megatron_deepspeed_flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_source_reader_agrees_with_argparse():
    """The arity read from the source equals what argparse builds from the same code
    ('?' counted as one value, as the list stores it)."""
    namespace: dict = {}
    exec(SNIPPET, namespace)  # noqa: S102 - the test's own snippet
    parser = namespace["add"](argparse.ArgumentParser())
    expected = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        nargs = 1 if action.nargs in (None, "?") else action.nargs
        for option in action.option_strings:
            expected[option] = nargs
    assert _tool().source_flags(SNIPPET) == expected


def test_the_list_is_megatron_deepspeeds_and_covers_the_compat_scripts():
    listed = json.loads((REPO / "localopt_plugin/training/megatron_deepspeed_flags.json")
                        .read_text())
    assert listed["commit"] == "4efb479d5317ce9b86096b9d8e3e8030b0b5263b"
    assert len(listed["flags"]) > 300 and listed["flags"]["--num-experts"] == "+"
    from localopt_plugin.training.megatron_flags import listed_flags

    known = listed_flags()
    for path in (REPO / "tests/data/compat/scripts").glob("*.flags"):
        if "Megatron-DeepSpeed" not in path.read_text().splitlines()[0]:
            continue
        flags = [w for w in path.read_text().split() if w.startswith("--")]
        from localopt_plugin.training.parser import build_parser

        own = set(build_parser()._option_string_actions)
        assert not [f for f in flags if f not in known and f not in own], path.name


@pytest.mark.parametrize("flags", [
    ["--cpu_torch_adam"], ["--universal-checkpoint"], ["--no-load-lr-state"],
    ["--random-ltd"], ["--enable-zbh1-pipeline"], ["--ds-sequence-parallel-fpdt"], ["--kd"],
    ["--profile", "pt"], ["--profile"]])
def test_megatron_deepspeed_flags_reach_a_fate(flags):
    """Each flag the issue found "unrecognized" now ends in one error line naming it (or
    runs); the parsers' different arities of --profile both parse."""
    status, _, err = dry_run(flags)
    assert "unrecognized arguments" not in err
    assert status == 2 and flags[0] in err and err.count("error:") == 1, err


def test_rotary_theta_is_megatron_lms_rotary_base():
    status, setup, err = dry_run(["--position-embedding-type", "rope",
                                  "--rotary-position-embeddings-theta", "500000"])
    assert status == 0, err
    assert "--rotary-position-embeddings-theta 500000 -> --rotary-base 500000" in setup[
        "flag notes"]


def test_a_name_the_parsers_read_differently_says_which_reading_applies():
    """Where Megatron-LM's and Megatron-DeepSpeed's parsers give one name different arities,
    the refusal or the dry run's note names both readings; a name they agree on does not."""
    lm = json.loads((REPO / "localopt_plugin/training/megatron_lm_flags.json").read_text())
    md = json.loads((REPO / "localopt_plugin/training/megatron_deepspeed_flags.json")
                    .read_text())
    differ = {f for f in lm["flags"] if f in md["flags"] and lm["flags"][f] != md["flags"][f]}
    assert {"--profile", "--num-experts"} <= differ
    status, _, err = dry_run(["--profile", "pt"])
    assert status == 2 and "Megatron-LM's parser reads --profile as a switch, " \
        "Megatron-DeepSpeed's as one value: neither runs here" in err, err
    status, setup, err = dry_run(["--num-experts", "1"])
    assert status == 0, err
    note = next(n for n in setup["flag notes"] if n.startswith("--num-experts"))
    assert "Megatron-DeepSpeed's as a list, and 1 changes nothing under either" in note, note
    status, _, err = dry_run(["--rampup-batch-size", "4", "4", "100"])
    assert "reads --rampup-batch-size as 3 values" in err, err
    status, _, err = dry_run(["--kd"])  # only Megatron-DeepSpeed defines it: no such note
    assert status == 2 and "parser reads" not in err, err


def test_cpu_optimizer_runs_deepspeeds_cpu_adam(tmp_path, monkeypatch):
    """``--cpu-optimizer`` with Megatron-DeepSpeed's meaning: DeepSpeed's CPU Adam (AdamW mode)
    steps the parameters; its update equals torch's AdamW (the independent reference). Refused
    with SGD (Megatron-DeepSpeed asserts Adam), beside a JSON optimizer section, and where the
    parameters live on a GPU without ZeRO-Offload (CUDA mocked: no GPU here)."""
    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    from helpers.configs import train_args

    from localopt_plugin.errors import UserError
    from localopt_plugin.training import deepspeed_config
    from localopt_plugin.training.config import resolve
    from localopt_plugin.training.optim import build_optimizer, param_groups

    status, setup, err = dry_run(["--preset", "test", "--cpu-optimizer"])
    assert status == 0, err
    assert setup["optimizer"] == "DeepSpeed CPU Adam (AdamW, --cpu-optimizer)"

    config = resolve(train_args("--cpu-optimizer", "--lr", "1e-2", "--weight-decay", "0.1"),
                     1)[0]
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    reference = torch.nn.Linear(8, 4)
    reference.load_state_dict(model.state_dict())
    optimizer = build_optimizer(param_groups(model), config)
    assert isinstance(optimizer, DeepSpeedCPUAdam)
    torch_adamw = torch.optim.AdamW(param_groups(reference), lr=1e-2, weight_decay=0.1,
                                    betas=(0.9, 0.999), eps=1e-8)
    x = torch.randn(16, 8)
    for net, opt in ((model, optimizer), (reference, torch_adamw)):
        for _ in range(3):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model.weight, torch.nn.Linear(8, 4).weight)

    status, _, err = dry_run(["--preset", "test", "--cpu-optimizer", "--optimizer", "sgd"])
    assert status == 2 and "'CPU offloading is for Adam'" in err, err
    json_optimizer = tmp_path / "adam.json"
    json_optimizer.write_text(json.dumps({"optimizer": {"type": "AdamW",
                                                        "params": {"lr": 1e-3}}}))
    status, _, err = dry_run(["--preset", "test", "--cpu-optimizer", "--deepspeed_config",
                              str(json_optimizer)])
    assert status == 2 and "sets what --cpu-optimizer would set" in err, err
    monkeypatch.setattr(deepspeed_config, "cuda_available", lambda: True)
    with pytest.raises(UserError, match="--cpu-optimizer steps the parameters on the CPU.*"
                       "offload_optimizer"):
        resolve(train_args("--cpu-optimizer"), 1)


# localopt-train's defaults that are not Megatron-LM's (Megatron-DeepSpeed's, for its own
# flags), each for the reason docs/from-megatron.md gives
DEFAULTS_NOT_MEGATRONS = {
    "--num-layers": "Megatron requires the model's size; a tiny model runs without it",
    "--hidden-size": "as --num-layers", "--num-attention-heads": "as --num-layers",
    "--lr": "Megatron requires it; a smoke run needs none",
    "--transformer-impl": "local layers; TransformerEngine's need a GPU and are opted into",
    "--distributed-backend": "none: nccl with CUDA (Megatron's), gloo without",
    "--clip-grad": "none: the JSON's gradient_clipping, else 1.0 (Megatron's)",
    "--zero-stage": "none: the JSON's zero_optimization.stage (what Megatron-DeepSpeed's "
    "engine runs)",
}


def test_defaults_are_megatrons():
    """Every Megatron flag localopt-train declares defaults as Megatron-LM's parser does (as
    Megatron-DeepSpeed's for that parser's own flags), read from the recorded parsers (kept
    equal to the installed Megatron-LM by test_megatron_lm_flag_list_is_complete), except the
    deviations named above; a deviation that is no longer one fails too."""
    from localopt_plugin.training.config import MEGATRON_CONFIGS
    from localopt_plugin.training.megatron_flags import listed_defaults, same_default

    lm, md = listed_defaults()
    differ, compared = set(), 0
    for cls in MEGATRON_CONFIGS:
        for field in cls.flag_fields():
            flag = cls.flag(field.name)
            reference = lm if flag in lm else md if flag in md else None
            if reference is None:
                continue
            compared += 1
            if not same_default(field.default, reference[flag]):
                differ.add(flag)
    assert compared > 50  # the flags that take values (a switch is off unless given)
    assert differ == set(DEFAULTS_NOT_MEGATRONS)


def test_dry_run_says_which_disputed_default_applies():
    """A command with a Megatron-DeepSpeed flag that leaves out a flag whose default the two
    parsers disagree on is told which applies; a Megatron-LM command is not."""
    status, setup, err = dry_run(["--preset", "test", "--deepspeed", "--zero-stage", "0",
                                  "--eval-iters", "5"])
    assert status == 0, err
    note = next(n for n in setup["flag notes"] if n.startswith("defaults Megatron-LM and"))
    assert "--eval-interval none: Megatron-LM's default (Megatron-DeepSpeed's: 1000)" in note
    assert "--eval-iters" not in note  # given
    status, setup, err = dry_run(["--preset", "test", "--eval-iters", "5"])
    assert not [n for n in setup["flag notes"] if n.startswith("defaults Megatron-LM and")]


def test_zero_stage_and_the_json_must_agree(tmp_path):
    """Megatron-DeepSpeed trains with the JSON's stage; here the flag and the JSON must agree
    (before, the flag silently replaced the JSON's stage)."""
    config = tmp_path / "zero2.json"
    config.write_text(json.dumps({"train_batch_size": 2, "zero_optimization": {"stage": 2}}))
    status, _, err = dry_run(["--preset", "test", "--deepspeed_config", str(config),
                              "--zero-stage", "1"])
    assert status == 2 and err.count("error:") == 1, err
    assert "--zero-stage 1 disagrees with DeepSpeed config zero_optimization.stage=2" in err
    status, setup, err = dry_run(["--preset", "test", "--deepspeed_config", str(config),
                                  "--zero-stage", "2"])
    assert status == 0 and setup["deepspeed"]["zero_optimization"]["stage"] == 2, err
