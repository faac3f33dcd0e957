"""Stage 4: run directories -> the paper's tables (``tables.py``), report, CSV/LaTeX and plots
(``report.py``), the paper's own numbers (``paper_numbers.py``).

Reads the JSON files runs leave (``collect.py``); imports nothing from ``transfer``.
"""
