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
    ["--cpu-optimizer"], ["--universal-checkpoint"], ["--no-load-lr-state"],
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
