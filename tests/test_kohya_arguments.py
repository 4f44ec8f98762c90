"""kohya's ``sdxl_train_network.py`` arguments, all of them: each is honoured, refused at start with one line
naming it, or not accepted (argparse stops naming it); none is parsed and ignored.

kohya's names come from ``tests/data/kohya_sdxl_train_network_args.json``, written from kohya's parser source at
the commit it names by ``tests/data/make_kohya_args_fixture.py`` (kohya is not imported here). The
classification is ``tools/argument_table.py``'s (see its docstring), which also generates the table of the
arguments not honoured in Limitations.md; a test checks that table is the generated one.
"""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))

import argument_table  # noqa: E402
from library.device_utils import UserError  # noqa: E402

FIXTURE = argument_table.load_fixture()
KOHYA_NAMES = [a["name"] for a in FIXTURE["arguments"]]


@pytest.fixture(scope="module")
def parser():
    return argument_table.port_parser()


@pytest.fixture(scope="module")
def classes(parser):
    return argument_table.classify(FIXTURE, parser)


def _baseline(tmp_path):
    """A command line that passes the start checks (the checkpoint does not exist: nothing may read it)."""
    return ["--pretrained_model_name_or_path", str(tmp_path / "no_such_model.safetensors"),
            "--output_dir", str(tmp_path / "out"), "--network_module", "networks.lora"]


def _given(parser, name):
    """What follows ``name`` on a command line giving it a value other than its default."""
    if name in argument_table.REFUSED_ELSEWHERE:
        return list(argument_table.REFUSED_ELSEWHERE[name][0])
    action = next(a for a in parser._actions if name in a.option_strings)
    if action.nargs == 0:  # store_true / store_false
        return []
    return ["1"] if action.choices is None else [next(str(c) for c in action.choices if c != action.default)]


def test_fixture_is_kohyas_whole_parser():
    assert re.fullmatch(r"[0-9a-f]{40}", FIXTURE["commit"])
    assert FIXTURE["count"] == len(KOHYA_NAMES) == len(set(KOHYA_NAMES))
    assert FIXTURE["entry"] == "sdxl_train_network.py:setup_parser"
    # every argument-adding function the issue names was followed
    for fn in ("train_network.py:setup_parser", "library/sdxl_train_util.py:add_sdxl_training_arguments",
               "library/train_util.py:add_sd_models_arguments", "library/train_util.py:add_optimizer_arguments",
               "library/train_util.py:add_training_arguments", "library/train_util.py:add_masked_loss_arguments",
               "library/train_util.py:add_dataset_arguments", "library/config_util.py:add_config_arguments",
               "library/custom_train_functions.py:add_custom_train_arguments", "library/utils.py:add_logging_arguments",
               "library/sai_model_spec.py:add_model_spec_arguments",
               "library/deepspeed_utils.py:add_deepspeed_arguments"):
        assert fn in FIXTURE["functions"]
    for name in ("--network_dim", "--cache_text_encoder_outputs", "--disable_mmap_load_safetensors", "--deepspeed",
                 "--huggingface_repo_id", "--metadata_title", "--console_log_level", "--prior_loss_weight",
                 "--caption_dropout_rate", "--in_json", "--weighted_captions", "--validation_split"):
        assert name in KOHYA_NAMES, name


def test_every_kohya_argument_is_honoured_refused_or_not_accepted(classes):
    counts = argument_table.counts(classes)
    not_accepted = [n for n, c in classes.items() if c["status"] == "not accepted"]
    print(f"\nkohya sdxl_train_network.py arguments ({len(classes)}, kohya {FIXTURE['commit'][:10]}): "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"not accepted ({len(not_accepted)}): {' '.join(not_accepted)}")
    ignored = {n: c["dest"] for n, c in classes.items() if c["status"] == "ignored"}
    assert not ignored, (f"parsed but never read by the trainer and not refused: {sorted(ignored)} (read it, add it "
                         "to library/train_args.NOT_IMPLEMENTED, or stop accepting it)")
    assert sum(counts.values()) == len(KOHYA_NAMES)


def test_an_argument_parsed_and_never_read_is_found():
    """The check itself: a kohya argument the parser accepts and nothing reads is "ignored"."""
    fake = argument_table.port_parser()
    fake.add_argument("--kohya_option_nobody_reads", action="store_true")
    fixture = dict(FIXTURE, arguments=FIXTURE["arguments"] + [{"name": "--kohya_option_nobody_reads"}])
    classes = argument_table.classify(fixture, fake)
    assert classes["--kohya_option_nobody_reads"]["status"] == "ignored"
    assert classes["--network_dim"]["status"] == "honoured"


def test_lists_name_kohya_arguments_and_stay_minimal(parser, classes):
    from library import train_args

    for name in (list(argument_table.REFUSED_ELSEWHERE) + list(argument_table.HONOURED_WITHOUT_READ)
                 + list(argument_table.REASONS)):
        assert name in KOHYA_NAMES, f"{name} is not a kohya sdxl_train_network.py argument"
    for name in train_args._NOT_IMPLEMENTED_NAMES:
        assert name in KOHYA_NAMES, f"NOT_IMPLEMENTED has {name}, not a kohya argument"
    for name in argument_table.REFUSED_ELSEWHERE:
        assert name not in train_args._NOT_IMPLEMENTED_NAMES, f"{name}: listed twice"
    for name, why in argument_table.HONOURED_WITHOUT_READ.items():  # once it is read, it leaves the list
        assert classes[name]["status"] == "honoured" and not classes[name]["read"], name
    for name, c in classes.items():  # the table's reasons are specific, not the generic fallback
        if c["status"] in ("refused", "not accepted"):
            assert c["reason"] and c["reason"] != argument_table.GENERIC_REASON[c["status"]], \
                f"{name} ({c['status']}): add its reason to tools/argument_table.REASONS"


def _refusal_cases():
    return argument_table.refusal_lists()


@pytest.mark.parametrize("name", _refusal_cases())
def test_refused_argument_stops_at_start_naming_it(name, parser, tmp_path, monkeypatch):
    """In process, through ``train()`` as the CLI calls it: the refusal comes before the checkpoint is
    loaded (it does not exist) and names the argument."""
    import sdxl_train_network
    from library import train_args

    trainer = sdxl_train_network.SdxlNetworkTrainer()

    def no_load(args):
        raise AssertionError(f"{name}: the checkpoint load was reached")

    monkeypatch.setattr(trainer, "load_target_model", no_load)
    args = train_args.parse_args(parser, _baseline(tmp_path) + [name] + _given(parser, name))
    with pytest.raises(UserError) as e:
        trainer.train(args, parser)
    message = str(e.value)
    assert name in message and "\n" not in message, message
    assert train_args._WHY_NOT.get(name, "") in message, message  # names why, not only what
    assert "no_such_model" not in message, message
    assert not (tmp_path / "out").exists()


def test_refused_argument_given_its_default_trains_on(parser, tmp_path):
    """Leaving a refused argument at its default is not a refusal (the start checks pass)."""
    import sdxl_train_network
    from library import train_args

    trainer = sdxl_train_network.SdxlNetworkTrainer()
    args = train_args.parse_args(parser, _baseline(tmp_path))
    trainer.verify_args(args, parser)


def test_every_not_accepted_argument_stops_in_argparse(parser, classes, tmp_path):
    from library import train_args

    not_accepted = [n for n, c in classes.items() if c["status"] == "not accepted"]
    for name in not_accepted:
        with pytest.raises(UserError) as e:
            train_args.parse_args(parser, _baseline(tmp_path) + [name])
        assert name in str(e.value), str(e.value)


@pytest.mark.parametrize("argv", [["--deepspeed"], ["--clip_skip", "2"], ["--no_such_kohya_option"]],
                         ids=["not_implemented", "refused_in_verify_args", "not_accepted"])
def test_refusal_through_the_real_cli(argv, tmp_path):
    """The real command line, no checkpoint: exit status 2 and one ``error:`` line naming the argument."""
    cmd = [sys.executable, os.path.join(ROOT, "sdxl_train_network.py")] + _baseline(tmp_path) + argv
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(errors) == 1 and argv[0] in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "no_such_model" not in errors[0], r.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_limitations_table_is_the_generated_one(classes):
    with open(argument_table.LIMITATIONS, encoding="utf-8") as f:
        text = f.read()
    current = argument_table.table_in(text)
    assert current is not None, "Limitations.md has no generated kohya argument table"
    assert current == argument_table.markdown_table(classes, FIXTURE), \
        "Limitations.md's kohya argument table is stale: run python tools/argument_table.py --write"


def test_fixture_matches_its_generator_output_format():
    """The fixture is the generator's JSON (loaded as such, not hand-edited into another shape)."""
    with open(argument_table.FIXTURE, encoding="utf-8") as f:
        raw = json.load(f)
    for a in raw["arguments"]:
        assert {"name", "options", "dest", "source", "default"} <= set(a), a
        assert a["name"] in a["options"] and a["name"].startswith("--")
