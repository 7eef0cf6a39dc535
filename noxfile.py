"""The one entry point for tests, lint, type checks, docs, benchmarks and the example app."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]

PYTHON = "3.11"


def install(session: nox.Session, *args: str) -> None:
    """Install with a pip new enough for PEP 735 dependency groups."""
    session.install("--quiet", "--upgrade", "pip>=25.1")
    session.install("--quiet", *args)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Run the whole test suite with branch coverage, failing below the gate in
    pyproject.toml (PostgreSQL tests use GATEWAYKIT_TEST_POSTGRES_DSN, Redis tests
    GATEWAYKIT_TEST_REDIS_URL). The tests are spread over one worker per core (pytest-xdist;
    pytest-cov merges their data). Arguments go to pytest: ``-n 0`` runs them in one
    process; a subset wants ``--no-cov``, as the gate is for the whole suite."""
    install(session, "-e", ".[postgres,admin,metrics,otel,redis]", "--group", "test")
    spread = ("-n", "auto", "--durations=10")
    session.run("pytest", "--cov", "--cov-report=term", *spread, *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Ruff lint and format check."""
    install(session, "--group", "lint")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the library, its tests and examples."""
    install(session, "-e", ".[postgres,admin,metrics,otel,redis]", "--group", "typecheck")
    session.run("mypy")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Build the documentation site strictly."""
    install(session, "-e", ".", "--group", "docs")
    session.run("mkdocs", "build", "--strict")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks (never part of the test run); results are printed as tables."""
    install(session, "-e", ".[postgres,metrics,otel,redis]", "--group", "test", "--group", "bench")
    session.run("python", "-m", "tests.benchmarks", *session.posargs)


@nox.session(python=PYTHON)
def example(session: nox.Session) -> None:
    """Install gatewaykit and run the example gateway against the built-in fake provider."""
    install(session, "-e", ".[admin,metrics]", "--group", "examples")
    session.run("python", "examples/app.py", *session.posargs)
