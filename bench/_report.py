"""Shared by the micro-benchmarks: repeat a run and print each figure's median."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable


def report_medians(title: str, run: Callable[[], dict[str, float]], repeat: int) -> None:
    """Call ``run`` ``repeat`` times; print the median of each figure it returns."""
    runs = [run() for _ in range(repeat)]
    print(f"{title}, median of {repeat} runs")
    width = max(len(key) for key in runs[0])
    for key in runs[0]:
        median = statistics.median(r[key] for r in runs)
        shown = f"{median:,.0f}" if median >= 100 else f"{median:.1f}"  # small: 1 decimal
        print(f"  {key:<{width}} {shown:>12}")


def _whole_number_up_to(highest: int) -> Callable[[str], int]:
    """An argparse type: a whole number from 1 to ``highest``, else a usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if not 1 <= value <= highest:
            raise argparse.ArgumentTypeError(
                f"expected a whole number from 1 to {highest}, got {text!r}"
            )
        return value

    return parse


def job_rates(jobs: int, elapsed: float, step: str, steps_per_job: float = 3) -> dict[str, float]:
    """The figures of a run of ``jobs`` jobs of ``steps_per_job`` ``step``s each (a call,
    a request) in ``elapsed`` seconds: jobs/s, steps/s and µs per step."""
    steps = steps_per_job * jobs  # (a fraction where one step serves several jobs)
    return {
        "jobs/s": jobs / elapsed,
        f"{step}s/s": steps / elapsed,
        f"µs/{step}": elapsed / steps * 1e6,
    }


def jobs_main(
    doc: str,
    title: str,
    run: Callable[..., dict[str, float]],
    switches: dict[str, str] | None = None,
    numbers: dict[str, tuple[int, int, str]] | None = None,
) -> None:
    """The command line of a micro-benchmark that runs ``--jobs`` jobs ``--repeat``
    times: ``doc`` is its help, ``title`` names what one run measures (the count
    follows), ``run(jobs, **switched)`` does one run. ``switches``: flags of its own, a
    name (``long_poll`` is ``--long-poll``) and its help each, passed to ``run`` as
    keyword arguments, True when given. ``numbers``: options of its own that take a
    whole number, a name and its default, highest value and help each, passed the same
    way (shown in the title when not the default)."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    for name, help_text in (switches or {}).items():
        parser.add_argument("--" + name.replace("_", "-"), action="store_true", help=help_text)
    for name, (default, highest, help_text) in (numbers or {}).items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=_whole_number_up_to(highest),
            default=default,
            help=help_text,
        )
    args = parser.parse_args()
    switched: dict[str, bool | int] = {name: getattr(args, name) for name in switches or {}}
    shown = "".join(f", --{name.replace('_', '-')}" for name, on in switched.items() if on)
    for name, (default, _, _) in (numbers or {}).items():
        switched[name] = getattr(args, name)
        if switched[name] != default:
            shown += f", --{name.replace('_', '-')} {switched[name]}"
    report_medians(
        f"{title}{shown}, {args.jobs} jobs", lambda: run(args.jobs, **switched), args.repeat
    )
