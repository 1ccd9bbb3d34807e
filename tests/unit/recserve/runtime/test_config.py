"""Command lines generated from config dataclasses: flags, defaults, parsing, nesting."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from recserve.contracts.errors import ConfigError
from recserve.runtime.config import add_arguments, from_args, option


def cpus(text: str) -> frozenset[int]:
    if not text.isdigit():
        raise ConfigError(f"not a CPU: {text!r}")
    return frozenset({int(text)})


@dataclass(frozen=True)
class Inner:
    batch: int = option(8, "batch size")


@dataclass(frozen=True)
class Config:
    model: Path = option(help="model")
    plan: Path | None = None  # not a flag: main decides
    inner: Inner = field(default_factory=Inner)
    rate: float = option(1.5, "rate")
    limit: int | None = option(None, "limit")
    fast: bool = option(False, "go fast")
    cpus: frozenset[int] | None = option(None, "cpus", parse=cpus)

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ConfigError("--rate must be positive")


def parse(argv: list[str]) -> Config:
    parser = argparse.ArgumentParser()
    add_arguments(parser, Config)
    return from_args(Config, parser.parse_args(argv), plan=Path("p"))


def test_defaults_types_and_nesting() -> None:
    assert parse(["--model", "m"]) == Config(Path("m"), Path("p"))
    got = parse(["--model", "m", "--batch", "3", "--rate", "2", "--limit", "7", "--fast"])
    assert got.inner.batch == 3 and got.rate == 2.0 and got.limit == 7 and got.fast
    assert parse(["--model", "m", "--cpus", "3"]).cpus == frozenset({3})


@pytest.mark.parametrize(
    "argv", [[], ["--model", "m", "--batch", "x"], ["--model", "m", "--cpus", "all"]]
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 2
    if "--cpus" in argv:
        assert "not a CPU: 'all'" in capsys.readouterr().err


def test_validation_stays_with_the_config() -> None:
    with pytest.raises(ConfigError):
        parse(["--model", "m", "--rate", "0"])
