"""Plain-text tables for the reports."""


def table(head, rows) -> str:
  """Left-aligned columns, two spaces apart; cells are str()-ed."""
  cells = [[str(c) for c in row] for row in [head, *rows]]
  widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                   for row in cells)
