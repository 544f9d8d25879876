"""Property test over random command-line overrides: composed with Hydra's compose API
(`validation.load_config`) and validated by the checks run.py does before training
(`validation.validate_config`).

Valid overrides compose and validate; invalid ones raise a one-line ConfigError naming the key at fault;
nothing raises anything else (no traceback for a typo). No model or data is loaded.

Uses hypothesis when it is installed (`pip install -e .[dev]`), else a seeded random generator: the same
`draw` function builds a case from a `random.Random` either way.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from peftbench.errors import ConfigError
from peftbench.validation import load_config, validate_config

INVALID_STRINGS = ["abc", "true", "null", "inf", "nan", "[1,2]"]


@dataclass(frozen=True)
class Atom:
    """One override and whether it is valid for the method chosen."""

    override: str
    valid: bool

    @property
    def key(self) -> str:
        return self.override.partition("=")[0].lstrip("+~")


def _values(rnd: random.Random, good: list[str], bad: list[str]) -> tuple[str, bool]:
    if rnd.random() < 0.5:
        return rnd.choice(good), True
    return rnd.choice(bad), False


def _positive_int(rnd: random.Random) -> tuple[str, bool]:
    return _values(rnd, ["1", "4", "16", "256"], ["0", "-3", "2.5", *INVALID_STRINGS])


def _positive_number(rnd: random.Random) -> tuple[str, bool]:
    return _values(rnd, ["1", "0.5", "32", "1e3"], ["0", "-1", "-0.5", *INVALID_STRINGS])


def _fraction(rnd: random.Random) -> tuple[str, bool]:  # [0, 1)
    return _values(rnd, ["0", "0.0", "0.1", "0.5", "0.99"], ["1", "1.5", "-0.1", *INVALID_STRINGS])


# keys every method of a family accepts, each with a generator of (value, valid)
LORA_KEYS = {"method.r": _positive_int, "method.alpha": _positive_number, "method.dropout": _fraction}
METHOD_KEYS = {
    "lora": LORA_KEYS,
    "lora_plus": LORA_KEYS,
    "lora_fa": LORA_KEYS,
    "delta_lora": {
        "method.r": _positive_int,
        "method.alpha": _positive_number,
        "method.dropout": lambda rnd: _values(rnd, ["0", "0.0"], ["0.1", "0.5", "-1", *INVALID_STRINGS]),
        "method.warmup_steps": lambda rnd: _values(
            rnd, ["0", "10", "500", "0.1", "0.5"], ["-1", "1.5", "abc", "true", "null"]
        ),
        "method.update_ratio": lambda rnd: _values(rnd, ["0", "2", "0.5"], ["-1", "abc", "inf", "nan"]),
    },
    "vera": {
        "method.r": _positive_int,
        "method.dropout": _fraction,
        "method.d_initial": lambda rnd: _values(
            rnd, ["0.1", "1", "-0.5"], ["0", "abc", "nan", "inf", "null"]
        ),
        "method.projection_seed": lambda rnd: _values(rnd, ["0", "7"], ["-1", "1.5", "abc"]),
    },
}
COMMON_KEYS = {
    "optim.lr": lambda rnd: _values(rnd, ["1e-3", "0.01", "1"], ["0", "-1", "fast", "inf", "nan", "null"]),
    "optim.warmup_ratio": _fraction,
    "optim.weight_decay": lambda rnd: _values(rnd, ["0", "0.01"], ["-0.1", "abc"]),
    "batch_size": lambda rnd: _values(rnd, ["1", "2", "8"], ["0", "-2", "1.5", "abc", "true"]),
    "seed": lambda rnd: _values(rnd, ["0", "3", "1234"], ["-1", "abc", "1.5"]),
    "checkpoint.every_n_steps": lambda rnd: _values(rnd, ["1", "50", "null"], ["0", "-1", "1.5", "abc"]),
    "trainer.accumulate_grad_batches": lambda rnd: _values(rnd, ["1", "4"], ["0", "abc", "1.5"]),
    "trainer.max_steps": lambda rnd: _values(rnd, ["1", "40", "-1"], ["0", "-5", "abc"]),
    "resume": lambda rnd: _values(rnd, ["auto", "null"], ["/nonexistent/run_dir", "''"]),
}
# always invalid: keys that do not exist, options that do not exist, malformed overrides
UNKNOWN = [
    "method.rank=4",
    "method.lr=0.1",
    "optim.momentum=0.9",
    "trainer.foo=1",
    "foo=1",
    "method=nosuch",
    "model=nosuch",
    "trainer=nosuch",
    "optim=nosuch",
    "batch_size=[1",
]


def draw(rnd: random.Random) -> tuple[list[Atom], str]:
    """A random case: a method, then 0-4 overrides of its keys, the common keys, or unknown ones."""
    method = rnd.choice(sorted(METHOD_KEYS))
    atoms = [Atom(f"method={method}", True)]
    pool = {**METHOD_KEYS[method], **COMMON_KEYS}
    for key in rnd.sample(sorted(pool), rnd.randint(0, 4)):
        value, valid = pool[key](rnd)
        atoms.append(Atom(f"{key}={value}", valid))
    if rnd.random() < 0.15:
        atoms.append(Atom(rnd.choice(UNKNOWN), False))
    if rnd.random() < 0.1:  # a key of another method: not a key of this one's config
        other = rnd.choice([m for m in METHOD_KEYS if m != method])
        foreign = sorted(set(METHOD_KEYS[other]) - set(METHOD_KEYS[method]))
        if foreign:
            atoms.append(Atom(f"{rnd.choice(foreign)}=1", False))
    return atoms, method


def check_case(atoms: list[Atom]) -> None:
    overrides = [a.override for a in atoms]
    invalid = [a for a in atoms if not a.valid]
    try:
        cfg = load_config(overrides)
        validate_config(cfg)
    except ConfigError as err:
        message = str(err)
        assert invalid, f"valid overrides {overrides} were rejected: {message}"
        assert "\n" not in message, f"not one line: {message!r}"
        assert any(a.key in message for a in invalid), f"{message!r} names none of {invalid}"
        return
    assert not invalid, f"invalid overrides {[a.override for a in invalid]} were accepted ({overrides})"


# hypothesis caches what it learns under .hypothesis/ in the working directory: keep the repository clean
HYPOTHESIS_DIR = Path(tempfile.gettempdir()) / "peftbench-hypothesis"
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(HYPOTHESIS_DIR))
try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - the dev extra installs hypothesis
    st = None


if st is not None:

    @settings(
        max_examples=80,
        deadline=None,
        database=None,  # no .hypothesis/ directory in the repository
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(st.randoms(use_true_random=False))
    def test_random_overrides_validate_or_fail_with_one_clear_line(rnd: random.Random) -> None:
        atoms, _ = draw(rnd)
        check_case(atoms)

else:  # pragma: no cover

    @pytest.mark.parametrize("seed", range(80))
    def test_random_overrides_validate_or_fail_with_one_clear_line(seed: int) -> None:
        atoms, _ = draw(random.Random(seed))
        check_case(atoms)


@pytest.mark.parametrize("method", sorted(METHOD_KEYS))
def test_defaults_of_every_fuzzed_method_validate(method: str) -> None:
    validate_config(load_config([f"method={method}"]))


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("method.rank=4", "method.rank"),
        ("method.alpha=abc", "method.alpha"),
        ("method.dropout=abc", "method.dropout"),
        ("optim.warmup_ratio=abc", "optim.warmup_ratio"),
        ("optim.lr=inf", "optim.lr"),
        ("batch_size=[1", "batch_size=[1"),
        ("trainer=deepspeed", "pip install deepspeed"),
        ("trainer=fsdp", "trainer=ddp"),
        ("resume=/nonexistent/run", "resume="),
    ],
)
def test_known_bad_overrides_name_the_key(override: str, needle: str) -> None:
    import torch

    if override == "trainer=fsdp" and torch.cuda.is_available():
        pytest.skip("FSDP is valid on a CUDA machine")
    with pytest.raises(ConfigError) as caught:
        validate_config(load_config([override]))
    assert needle in str(caught.value) and "\n" not in str(caught.value)
