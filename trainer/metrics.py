"""Continual-learning metrics over an accuracy matrix A[i][j] = accuracy on task j after learning task i.

Rows are the tasks learned so far; entry j of row i exists for j <= i (later tasks are unseen).
"""

from __future__ import annotations

from statistics import mean

from registry.folders import save_figure


def average_accuracy(matrix: list[list[float]]) -> float:
    """Mean accuracy over all tasks after the last one is learned."""
    return mean(matrix[-1])


def forgetting(matrix: list[list[float]]) -> float:
    """Mean over j < T of (best accuracy on j before the end) - (final accuracy on j); 0 for one task."""
    final, T = matrix[-1], len(matrix)
    if T < 2:
        return 0.0
    return mean(max(matrix[i][j] for i in range(j, T - 1)) - final[j] for j in range(T - 1))


def backward_transfer(matrix: list[list[float]]) -> float:
    """BWT: mean over j < T of (final accuracy on j) - (accuracy on j just after learning it)."""
    final, T = matrix[-1], len(matrix)
    if T < 2:
        return 0.0
    return mean(final[j] - matrix[j][j] for j in range(T - 1))


def summary(matrix: list[list[float]], alone: list[float | None] | None = None) -> dict[str, float | None]:
    return {
        "average_accuracy": average_accuracy(matrix),
        "forgetting": forgetting(matrix),
        "bwt": backward_transfer(matrix),
        "fwt": forward_transfer(matrix, alone or []),
        "fwt_tasks": len(_transfer_pairs(matrix, alone or [])),  # FWT's tasks: those with a trained-alone reference
    }


def format_matrix(matrix: list[list[float]], names: list[str]) -> str:
    """The accuracy matrix as a Markdown table (rows: after learning task i; columns: task j)."""
    lines = ["| after \\ on | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, row in enumerate(matrix):
        cells = [f"{row[j]:.3f}" if j < len(row) else "" for j in range(len(names))]
        lines.append(f"| {names[i]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def forward_transfer(matrix: list[list[float]], alone: list[float | None]) -> float | None:
    """FWT as SPG reports it: mean over tasks j >= 1 of (accuracy on j just after learning it in
    the sequence) - (accuracy of the same method trained on task j alone); None without references."""
    pairs = _transfer_pairs(matrix, alone)
    return mean(a - b for a, b in pairs) if pairs else None


def _transfer_pairs(matrix: list[list[float]], alone: list[float | None]) -> list[tuple[float, float]]:
    """(accuracy just after learning j, accuracy trained alone) for the tasks j >= 1 that have a reference."""
    return [(matrix[j][j], alone[j]) for j in range(1, len(matrix)) if j < len(alone) and alone[j] is not None]


def plot_matrix(matrix: list[list[float]], names: list[str], path: str, title: str) -> None:
    """Draw the accuracy matrix as a heatmap (rows: after learning task i; columns: task j)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.full((len(matrix), len(names)), np.nan)
    for i, row in enumerate(matrix):
        grid[i, : len(row)] = row
    size = max(4.0, 0.6 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(matrix)), names[: len(matrix)])
    ax.set(xlabel="accuracy on task", ylabel="after learning task", title=title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    save_figure(fig, path)
