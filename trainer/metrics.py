"""Continual-learning metrics over an accuracy matrix A[i][j] = accuracy on task j after learning task i.

Rows are the tasks learned so far; entry j of row i exists for j <= i (later tasks are unseen).
"""

from __future__ import annotations

from statistics import mean


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


def summary(matrix: list[list[float]]) -> dict[str, float]:
    return {
        "average_accuracy": average_accuracy(matrix),
        "forgetting": forgetting(matrix),
        "bwt": backward_transfer(matrix),
    }


def format_matrix(matrix: list[list[float]], names: list[str]) -> str:
    """The accuracy matrix as a Markdown table (rows: after learning task i; columns: task j)."""
    lines = ["| after \\ on | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, row in enumerate(matrix):
        cells = [f"{row[j]:.3f}" if j < len(row) else "" for j in range(len(names))]
        lines.append(f"| {names[i]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
