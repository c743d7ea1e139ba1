"""PNG plots of what `make bench` measured, for people who would rather look than read: the sections
record their samples here as they run, and `write` draws them at the end into bench-results/ (ignored by
git), next to the text the run printed. Only sections that run in the bench's own process record.

matplotlib is imported by `write` only (with its non-interactive backend), so that a section run alone
pays nothing for it."""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class _Distribution:
    title: str
    series: dict[str, list[float]]  # label -> samples
    unit: str


@dataclass(frozen=True)
class _Bars:
    title: str
    values: dict[str, float]  # label -> value
    unit: str


_recorded: list[_Distribution | _Bars] = []


def distribution(title: str, series: dict[str, list[float]], unit: str = "ms") -> None:
    """Samples to draw as cumulative distributions, one line per label."""
    _recorded.append(_Distribution(title, {label: sorted(values) for label, values in series.items() if values}, unit))


def bars(title: str, values: dict[str, float], unit: str) -> None:
    _recorded.append(_Bars(title, dict(values), unit))


def _file_name(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-").replace("--", "-") + ".png"


def write(directory: Path) -> list[Path]:
    """One PNG per recorded figure; the paths written."""
    if not _recorded:
        return []
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for figure in _recorded:
        fig, axes = pyplot.subplots(figsize=(8, 4.5), dpi=100)
        if isinstance(figure, _Distribution):
            for label, samples in figure.series.items():
                share = [(i + 1) / len(samples) for i in range(len(samples))]
                axes.plot(samples, share, label=f"{label} (n={len(samples)})")
            axes.set_xscale("log")
            axes.set_xlabel(figure.unit)
            axes.set_ylabel("share of calls at or below")
            axes.grid(True, which="both", alpha=0.3)
            axes.legend()
        else:
            labels = list(figure.values)
            axes.barh(labels, [figure.values[label] for label in labels])
            axes.invert_yaxis()
            axes.set_xlabel(figure.unit)
            axes.grid(True, axis="x", alpha=0.3)
        axes.set_title(figure.title)
        fig.tight_layout()
        path = directory / _file_name(figure.title)
        fig.savefig(path)
        pyplot.close(fig)
        written.append(path)
    return written
